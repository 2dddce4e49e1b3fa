"""Temporal stabilisation of restored faces, per track, in face space.

Frame-by-frame restoration flickers: the network sees a slightly different noisy input every
frame and invents a slightly different texture and colour each time, although the face has
not changed. This stage removes that flicker after the restorer and before the paste.

Where it works: on the restored crops of one track, in GPEN's template space. The crops are
aligned with smoothed landmarks, so one template pixel is the same point of the face in every
frame of the track, and a plain per-pixel filter over time needs no optical flow.

What it does, per track (``stabilise``):

1. Colour fix (``colour_fix``): the restored crop keeps the *source* crop's low frequencies
   (colour, shading) and takes only its detail from the restorer: ``restored − low(restored) +
   low(source)``, with ``low`` an image pyramid down to ``colour_grid``² and back (a
   Laplacian-pyramid split). A restorer that shifts skin tone or exposure cannot shift it.
2. Zero-phase, motion-adaptive average: frame t's output is a per-pixel weighted mean of the
   colour-fixed crops s ∈ [t − reach, t + reach] of its track, weight ``k(s − t) · w_ts``:
   ``k`` a Hann taper (symmetric: no lag, no lead), ``w_ts = exp(−(d_ts / motion_threshold)²)``
   where ``d_ts`` is how much the *source* changed between t and s at that place (mean
   absolute difference of the source crops pooled to ``motion_grid``², dilated by one cell and
   interpolated back). Where the face holds still (d ≈ 0, source noise averaged out by the
   pooling) the frames are averaged and the restorer's fresh texture cancels; where the source
   changes (mouth, blink, head turn, light change, another face) the other frames get weight
   ≈ 0 and the output is the current frame at once: nothing ghosts, before or after a change.
   The weights come from the source, not from the restored crops: restored crops differ
   between frames also where the face did not change (that difference is the flicker), so
   they cannot tell flicker from motion; the source can.
3. Motion compensation (``motion_search`` > 0): before 2., each neighbour s is moved onto
   frame t by the sources' motion field (``motion_field``: block matching of the sources at
   64², 8×8 blocks, sub-pixel, interpolated to full size), and ``d_ts`` is measured on the
   moved source. A face that talks or turns a little is then averaged too instead of
   following the current frame alone; where the match fails, ``d_ts`` stays large and the
   neighbour still gets no weight, so nothing ghosts.

Locality: a frame's output depends only on its track's frames within ``reach`` of it (fewer
at the ends of a track), and every operation is elementwise or a fixed-size per-frame
operation, so the result is bit-identical however frames are batched or chunked
(``TrackStabiliser`` streams; tests check chunkings against one call). In the pipeline
(``FramePipeline.render``) it runs after the restorer, in the planner's order, holding
``reach`` frames. Its windows reach across the segment edges of a job: a job that renders a
segment alone (resumed, or on a ``--ray`` worker) restores ``reach`` halo frames beyond each
of its edges too (``jobs.segments.SegmentPlan.read_range``), so every window is whole and the
bytes are those of an uninterrupted run. The pose and track fades
(``faces.pose.fade_weights``, streamed by ``faces.fade.TrackFader`` in the planner) multiply
each face's paste mask, so a faded-out face is the untouched frame.

Tensors: ``[N,3,S,S]`` float RGB in [0, 1], on any device; nothing is copied to the host.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.config import Config
from gpen_video.faces.pose import fade_weights
from gpen_video.records import check_shape


@dataclass(frozen=True)
class TemporalSettings:
    """The stage's settings (``of`` reads them from a ``Config``).

    Attributes:
        reach: frames either side of a frame that its output averages (L). Higher: steadier
            (flicker of fresh texture falls roughly as 1/(reach + 1)), flatter invented
            texture (it cancels too), more frames held and re-restored at segment starts.
            0 turns the average off (the colour fix stays).
        motion_search: how far (pixels of the 64² grey pictures, 2 ≈ 8 px of a 256 crop) a
            neighbour's blocks are searched for the frame's, to move the neighbour onto the
            frame before averaging, so a face that moves (talks, turns a little) is averaged
            too; 0: neighbours are averaged where they are (moving parts then follow the
            current frame alone). Higher: follows larger motion, costs more.
        motion_threshold: source change (mean absolute difference of pooled crops, [0, 1]
            scale) at which a neighbour's weight has fallen to 1/e. Higher: also averages
            through slow changes (steadier, but small real movements soften and can smear);
            lower: follows smaller changes (source noise and compression then break the
            averaging up, and flicker returns).
        motion_grid: side of the grid the source change is measured on (the crop pooled to
            ``motion_grid``²). Coarser (lower): more robust to source noise, but a change is
            localised less precisely (more of the face around it stops averaging).
        colour_grid: side of the grid below which frequencies come from the source (colour,
            shading). Higher: more of the source's mid frequencies (its blur and noise) are
            kept; lower: more of the restorer's own colour and shading survives. 0: no colour
            fix.
        max_yaw: head yaw (degrees, from the five landmarks) at and beyond which a face is
            not restored; GPEN fills profiles with frontal-looking features. See
            ``faces.pose.fade_weights``.
        yaw_band: degrees below ``max_yaw`` over which restoration fades out.
        fade_frames: length of a fade in or out, in frames. Longer: gentler, but a face turned
            away briefly stays faded for longer around it.
        min_track_frames: shorter tracks are not restored at all.
    """

    reach: int = 4
    motion_search: int = 2
    motion_threshold: float = 0.03
    motion_grid: int = 32
    colour_grid: int = 16
    max_yaw: float = 55.0
    yaw_band: float = 15.0
    fade_frames: int = 9
    min_track_frames: int = 3

    def __post_init__(self) -> None:
        if self.reach < 0:
            raise ValueError(f"reach must be >= 0, got {self.reach}")
        if not self.motion_threshold > 0:
            raise ValueError(f"motion_threshold must be > 0, got {self.motion_threshold}")
        if self.motion_grid < 1 or self.colour_grid < 0:
            raise ValueError(f"need motion_grid >= 1 and colour_grid >= 0, got {self.motion_grid}, {self.colour_grid}")

    @classmethod
    def of(cls, config: Config) -> TemporalSettings | None:
        """The settings of ``config`` (its ``temporal_*``, ``motion_threshold``, ``colour_grid``,
        ``max_yaw``, ``fade_frames``, ``min_track_frames``); None when ``config.temporal`` is off.

        >>> from gpen_video.config import load_config
        >>> TemporalSettings.of(load_config(None, max_yaw=40.0)).max_yaw, TemporalSettings.of(load_config(None, temporal=False))
        (40.0, None)
        """
        if not config.temporal:
            return None
        return cls(reach=config.temporal_reach, motion_search=config.motion_search,
                   motion_threshold=config.motion_threshold,
                   colour_grid=config.colour_grid, max_yaw=config.max_yaw, fade_frames=config.fade_frames,
                   min_track_frames=config.min_track_frames)

    def fade(self, landmarks: np.ndarray, wanted: np.ndarray | None = None, *,
             fade_start: bool = False, fade_end: bool = False) -> np.ndarray:
        """``faces.pose.fade_weights`` with these settings: (N,) paste weights of one track."""
        return fade_weights(
            landmarks, wanted, max_yaw=self.max_yaw, yaw_band=self.yaw_band, fade_frames=self.fade_frames,
            min_track_frames=self.min_track_frames, fade_start=fade_start, fade_end=fade_end,
        )


# ------------------------------------------------------------------ per-frame operations
# Everything below is elementwise, or works on one frame at a time with a fixed shape, so a
# frame's result never depends on which other frames share its call (bit-identical chunks).


def lowpass(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The low band of an image pyramid: ``x`` [N,C,H,W] halved (2×2 means) down to about
    ``grid``² and expanded back (bilinear doubling, a 3×3 mean at every coarse level, a plain
    bilinear step to full size); same shape as ``x``.

    Every step is separable and linear, so the whole pyramid is one matrix per axis, built once
    per size (``_pyramid``): ``up_y · (down_y · x · down_xᵀ) · up_xᵀ``, four small matrix
    products instead of a dozen image passes. Each image's result does not depend on the
    others in the batch.
    """
    height, width = x.shape[-2:]
    levels, side = 0, min(height, width)
    while grid > 0 and side >= 2 * grid:
        levels, side = levels + 1, (side + 1) // 2
    if levels == 0:
        return x
    down_y, up_y = (m.to(x.dtype) for m in _pyramid(height, levels, x.device))
    down_x, up_x = (m.to(x.dtype) for m in _pyramid(width, levels, x.device))
    coarse = torch.matmul(torch.matmul(down_y, x), down_x.T)  # [N,C,h,w]
    return torch.matmul(torch.matmul(up_y, coarse), up_x.T)


@functools.lru_cache(maxsize=16)
def _pyramid(size: int, levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``lowpass`` along one axis of ``size`` samples as matrices: down [c,size] (``levels``
    halvings, 2-sample means, a last odd sample alone) and up [size,c] (linear doubling, a
    3-sample mean at every coarse level, a plain linear step to full size), found by passing
    every unit impulse through the one-dimensional steps."""
    y = torch.eye(size, device=device)[:, None, :]  # [size,1,size]
    sizes = [size]
    for _ in range(levels):
        y = F.avg_pool1d(y, 2, ceil_mode=True)
        sizes.append(y.shape[-1])
    down = y[:, 0].T.contiguous()
    y = torch.eye(sizes[-1], device=device)[:, None, :]
    for i, n in enumerate(reversed(sizes[:-1])):
        y = F.interpolate(y, size=n, mode="linear", align_corners=False)
        if i < levels - 1:  # not at full size, where the 3-sample mean would blur detail
            y = F.avg_pool1d(y, 3, stride=1, padding=1, count_include_pad=False)
    return down, y[:, 0].T.contiguous()


def colour_fix(restored: torch.Tensor, source: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """The restored crops with the source crops' low frequencies: ``r − low(r) + low(s)``
    (computed as ``r + low(s − r)``, one pyramid).

    Args:
        restored, source: [N,3,S,S] float in [0, 1].
        grid: pyramid grid side (``TemporalSettings.colour_grid``); 0 returns ``restored``.

    Returns:
        [N,3,S,S] float32, clipped to [0, 1].
    """
    check_shape("restored", restored, (None, 3, None, None))
    check_shape("source", source, tuple(restored.shape))
    if grid == 0:
        return restored.float()
    r, s = restored.float(), source.float().to(restored.device)
    return (r + lowpass(s - r, grid)).clamp_(0.0, 1.0)


def _pooled(source: torch.Tensor, grid: int) -> torch.Tensor:
    """[N,3,S,S] → [N,3,g,g] block means (g = ``grid``, or S when smaller)."""
    g = min(grid, source.shape[-1])
    return F.adaptive_avg_pool2d(source.float(), g)


def _change_weights(a: torch.Tensor, b: torch.Tensor, threshold: float) -> torch.Tensor:
    """Neighbour weights from pooled sources a, b [N,3,g,g] → [N,1,g,g] in (0, 1]."""
    d = ((a[:, 0] - b[:, 0]).abs() + (a[:, 1] - b[:, 1]).abs() + (a[:, 2] - b[:, 2]).abs()) * (1.0 / 3.0)
    d = F.max_pool2d(d[:, None], 3, stride=1, padding=1)  # [N1gg]: a change reaches one cell further
    return torch.exp(-((d * (1.0 / threshold)) ** 2))


def time_taper(reach: int) -> list[float]:
    """Hann weights of offsets 0..reach (1 at 0, falling to near 0 just past ``reach``)."""
    return [0.5 * (1.0 + float(np.cos(np.pi * k / (reach + 1)))) for k in range(reach + 1)]


# ------------------------------------------------------------------ one track


def stabilise(
    source: torch.Tensor,
    restored: torch.Tensor,
    settings: TemporalSettings = TemporalSettings(),
    *,
    output: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Stabilise one track's restored crops (consecutive frames).

    Args:
        source: [N,3,S,S] the crops given to the restorer, float in [0, 1].
        restored: [N,3,S,S] what the restorer returned for them.
        settings: the stage's settings.
        output: ``(start, stop)``: return only frames start..stop−1; every frame given still
            serves as a neighbour. Frames beyond ``reach`` of the range are not needed. None:
            all frames.

    Returns:
        [stop − start,3,S,S] float32 in [0, 1], on ``restored``'s device. Frame t equals what a
        call with only frames t − reach .. t + reach (as far as the track has them) returns.

    Example:
        >>> x = torch.rand(1, 3, 16, 16).expand(6, 3, 16, 16)
        >>> noisy = (x + 0.1 * torch.randn(6, 3, 16, 16)).clamp(0, 1)
        >>> out = stabilise(x, noisy, TemporalSettings(colour_grid=0))
        >>> bool((out - x).abs().mean() < (noisy - x).abs().mean() / 2)
        True
    """
    check_shape("restored", restored, (None, 3, None, None))
    check_shape("source", source, tuple(restored.shape))
    n = len(restored)
    start, stop = (0, n) if output is None else output
    if not 0 <= start <= stop <= n:
        raise ValueError(f"output must be a range within 0..{n}, got {output}")
    lo, hi = max(0, start - settings.reach), min(n, stop + settings.reach)
    return _averaged(*_prepared(source[lo:hi], restored[lo:hi], settings), settings, start - lo, stop - lo)


def _prepared(source: torch.Tensor, restored: torch.Tensor, settings: TemporalSettings
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-frame half of ``stabilise``: colour-fixed crops [M,3,S,S], pooled sources
    [M,3,g,g] and the sources at the side motion is matched on [M,3,m,m]. Per frame, so
    computed once per frame however many windows it serves."""
    # contiguous: the restorer hands channels-last crops on the CPU, and the warps and sums
    # that read each frame up to 2·reach + 1 times ran 1.5-4× slower on that layout
    src, res = source.to(restored.device).contiguous(), restored.contiguous()
    small = F.adaptive_avg_pool2d(src.float(), min(MATCH_SIZE, src.shape[-1]))
    return colour_fix(res, src, settings.colour_grid), _pooled(src, settings.motion_grid), small


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[N,3,m,m] RGB → [N,1,m,m] luma."""
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


MATCH_SIZE = 64
"""Side of the grey pictures motion is matched on (``motion_search`` counts their pixels)."""
MATCH_BLOCKS = 8
"""Blocks per side of the motion field: one displacement per block, interpolated between."""
MATCH_CHUNK = 64
"""Frame pairs matched at once (a cost volume of 25 MiB per chunk and ±2 px)."""
SHIFT_COST = 0.002
"""Cost added per pixel of displacement (grey levels in [0, 1]): where the source is flat,
matching cannot tell shifts apart, and the field stays at 0."""


def motion_field(a: torch.Tensor, b: torch.Tensor, search: int) -> torch.Tensor:
    """Where each block of ``a`` is found in ``b``: [T,2,B,B] displacements (x, y) in pixels of
    the grey pictures ``a``, ``b`` [T,1,m,m], with ``b(p + d) ≈ a(p)``, within ``search`` pixels
    either way, refined below a pixel by a parabola through the best match's neighbours.

    Block matching by mean absolute difference over every candidate shift at once (a cost
    volume of views into the padded ``b``): a fixed-size computation per pair of frames, so a
    pair's field does not depend on the others in the batch.
    """
    if len(a) > MATCH_CHUNK:  # bounds the cost volume's memory
        return torch.cat([motion_field(a[i : i + MATCH_CHUNK], b[i : i + MATCH_CHUNK], search)
                          for i in range(0, len(a), MATCH_CHUNK)])
    t, m = len(a), a.shape[-1]
    block = max(1, m // MATCH_BLOCKS)
    blocks = m // block
    side = 2 * search + 1
    n = blocks * block
    padded = F.pad(b, (search,) * 4, mode="replicate")[:, 0]  # [T,m+2s,m+2s]
    target = a[:, 0, :n, :n]
    diff = torch.empty((t, side * side, n, n), dtype=a.dtype, device=a.device)  # [T,(y,x),n,n]
    for y in range(side):  # a shift at a time: copying a strided 5-D view of all shifts took 2.4× as long
        for x in range(side):
            torch.sub(padded[:, y : y + n, x : x + n], target, out=diff[:, y * side + x])  # b moved by (x, y) − search
    diff.abs_()
    offsets = torch.arange(-search, search + 1, device=a.device).abs()
    penalty = (SHIFT_COST * (offsets[:, None] + offsets[None, :])).to(a.dtype)  # [y,x]
    cost = F.avg_pool2d(diff, block).view(t, side, side, blocks, blocks) + penalty[:, :, None, None]
    best = cost.flatten(1, 2).argmin(1)  # [TBB]
    by, bx = best // side, best % side

    def refined(along_x: bool) -> torch.Tensor:
        at = bx if along_x else by
        lo_i, hi_i = (at - 1).clamp(min=0), (at + 1).clamp(max=side - 1)

        def c(ix: torch.Tensor) -> torch.Tensor:
            y, x = (by, ix) if along_x else (ix, bx)
            return cost.gather(1, y[:, None, None].expand(-1, 1, side, -1, -1)).squeeze(1).gather(
                1, x[:, None]).squeeze(1)

        c0, cm, cp = c(at), c(lo_i), c(hi_i)
        curve = cm - 2 * c0 + cp
        inside = (curve > 1e-9) & (at > 0) & (at < side - 1) & (c0 > SHIFT_COST * (bx - search).abs().add(
            (by - search).abs()) + 1e-6)  # an exact match stays exact
        step = torch.where(inside, (cm - cp) / (2 * curve.clamp(min=1e-9)),
                           torch.zeros_like(c0)).clamp(-0.5, 0.5)
        return (at - search).float() + step

    return torch.stack([refined(True), refined(False)], 1)  # [T2BB]


def _sampling_grid(field: torch.Tensor, match_size: int, size: int) -> torch.Tensor:
    """``grid_sample``'s grid [T,size,size,2] that moves each pixel by ``field`` [T,2,B,B]
    (pixels of ``match_size``), interpolated bilinearly to ``size`` (as ``F.interpolate``, by
    one separable product), laid out contiguously: ``grid_sample`` reads such a grid 1.4× as
    fast as the product's strided result."""
    spread, base = _grid_parts(field.shape[-1], size, field.device)
    d = torch.einsum("by,tcbe,ex->tyxc", spread, field * (2.0 / match_size), spread)  # [T,S,S,2]
    return d.contiguous().add_(base)


@functools.lru_cache(maxsize=8)
def _grid_parts(blocks: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,S] bilinear weights of each block at each pixel, and [S,S,2] the pixels' centres in
    ``grid_sample``'s coordinates (x, y)."""
    eye = torch.eye(blocks, device=device)[:, None, :]  # [B,1,B]
    spread = F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0]  # [B,S]
    centres = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=device)
    return spread, torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1)


def _moved(x: torch.Tensor, field: torch.Tensor | None, match_size: int) -> torch.Tensor:
    """``x`` [T,C,n,n] sampled where ``field`` says each pixel's match is (as is without one)."""
    if field is None:
        return x
    grid = _sampling_grid(field, match_size, x.shape[-1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


Frames = torch.Tensor | Sequence[torch.Tensor]
"""A run of prepared frames: one tensor [N,...], or a list of per-frame [1,...] tensors (a
stream's window, read without copying)."""


def _span(x: Frames, start: int, stop: int) -> torch.Tensor:
    """Frames ``start..stop−1`` of ``x`` as one tensor."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return x[start] if stop == start + 1 else torch.cat(list(x[start:stop]))


def _averaged(fixed: Frames, pooled: Frames, small: Frames, settings: TemporalSettings,
              start: int, stop: int) -> torch.Tensor:
    """The temporal half of ``stabilise``: frames ``start..stop−1`` of the prepared frames
    averaged with their neighbours among them, each neighbour moved onto the frame by the
    sources' motion field (``motion_search`` > 0)."""
    if settings.reach == 0 or stop == start:
        return _span(fixed, start, stop)
    device, size, match_size = fixed[0].device, fixed[0].shape[-1], small[0].shape[-1]
    n = len(fixed)
    taper = time_taper(settings.reach)
    reach, m = settings.reach, stop - start
    # weights on the motion grid, normalised there (cheap), then interpolated to full size:
    # bilinear interpolation keeps their sum at 1 per pixel, so full-size work is one
    # interpolation and one multiply-add per neighbour
    weights = torch.zeros((2 * reach + 1, m, 1, *pooled[0].shape[-2:]), device=device)  # [K,T,1,g,g]
    weights[reach] = taper[0]
    # output frames t whose neighbour t + k exists: t in [max(start, −k), min(stop, n − k))
    spans = {k: (max(start, -k), min(stop, n - k)) for k in range(-reach, reach + 1)
             if k and max(start, -k) < min(stop, n - k)}
    counts = [t1 - t0 for t0, t1 in spans.values()]

    def gathered(x: Frames, shift: bool) -> torch.Tensor:  # every neighbour pair at once: [P,...]
        return torch.cat([_span(x, t0 + k * shift, t1 + k * shift) for k, (t0, t1) in spans.items()])

    fields: dict[int, torch.Tensor] = {}
    if spans:
        if settings.motion_search:
            small_there = gathered(small, True)
            field = motion_field(_grey(gathered(small, False)), _grey(small_there), settings.motion_search)
            moved = F.adaptive_avg_pool2d(_moved(small_there, field, match_size), pooled[0].shape[-1])
            fields = dict(zip(spans, field.split(counts)))
        else:
            moved = gathered(pooled, True)
        change = _change_weights(gathered(pooled, False), moved, settings.motion_threshold).split(counts)
        for (k, (t0, t1)), w in zip(spans.items(), change):
            weights[k + reach, t0 - start : t1 - start] = taper[abs(k)] * w
    total = weights[0].clone()
    for k in range(1, 2 * reach + 1):  # summed in one order: chunks add up alike
        total += weights[k]
    weights /= total
    out = torch.zeros_like(_span(fixed, start, stop))  # [T3SS]
    spread, _ = _grid_parts(weights.shape[-1], size, device)  # [g,S]: bilinear, as F.interpolate
    for k, (t0, t1) in sorted({0: (start, stop), **spans}.items()):
        w = spread.T @ weights[k + reach, t0 - start : t1 - start] @ spread  # [T1SS]
        out[t0 - start : t1 - start].addcmul_(w, _moved(_span(fixed, t0 + k, t1 + k), fields.get(k),
                                                        match_size))
    return out


# ------------------------------------------------------------------ streaming


class TrackStabiliser:
    """``stabilise`` while frames stream past, for every track of a job at once.

    ``push`` takes each frame's restored faces in order and returns the frames that are now
    final: frame i once frame i + ``reach`` has been pushed. Tracks are contiguous in a plan
    and ids are never reused (``faces.track.Tracker``), so a track missing from a frame has
    ended and no later frame can reach back into it. Only the last 2·``reach`` + 1 frames of
    each live track are held. The result equals ``stabilise`` over each whole track, bit for
    bit.

    Example:
        >>> st = TrackStabiliser(TemporalSettings(reach=2))
        >>> x = torch.rand(1, 3, 8, 8)
        >>> done = [f for i in range(5) for f in st.push(i, {7: (x, x)})] + st.finish()
        >>> [(i, sorted(faces)) for i, faces in done]
        [(0, [7]), (1, [7]), (2, [7]), (3, [7]), (4, [7])]
    """

    def __init__(self, settings: TemporalSettings = TemporalSettings()) -> None:
        self.settings = settings
        self._held: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # track → frame → prepared
        self._pending: deque[tuple[int, tuple[int, ...]]] = deque()  # frames not yet released
        self._last: int | None = None

    @property
    def delay(self) -> int:
        """Frames pushed after a frame before it is released."""
        return self.settings.reach

    def push(
        self, frame_index: int, faces: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[int, dict[int, torch.Tensor]]]:
        """Add one frame: ``{track_id: (source [3,S,S] or [1,3,S,S], restored, same shape)}``.

        Returns ``(frame_index, {track_id: stabilised [3,S,S]})`` for each frame now final, in order.
        """
        if self._last is not None and frame_index != self._last + 1:
            raise ValueError(f"frames must be pushed in order without gaps: got {frame_index} after {self._last}")
        self._last = frame_index
        for track_id, (src, res) in faces.items():
            size = res.shape[-2:]
            prepared = _prepared(src.reshape(1, 3, *size), res.reshape(1, 3, *size), self.settings)
            self._held.setdefault(track_id, {})[frame_index] = prepared
        self._pending.append((frame_index, tuple(faces)))
        released = []
        while self._pending and self._pending[0][0] + self.settings.reach <= frame_index:
            released.append(self._release(*self._pending.popleft()))
        return released

    def finish(self) -> list[tuple[int, dict[int, torch.Tensor]]]:
        """Release every frame still held (end of the video)."""
        released = [self._release(*p) for p in list(self._pending)]
        self._pending.clear()
        self._held.clear()
        self._last = None
        return released

    def _release(self, index: int, track_ids: Iterable[int]) -> tuple[int, dict[int, torch.Tensor]]:
        reach, out = self.settings.reach, {}
        for track_id in track_ids:
            held = self._held[track_id]
            window = [i for i in range(index - reach, index + reach + 1) if i in held]
            prepared = [[held[i][part] for i in window] for part in range(3)]
            at = window.index(index)
            out[track_id] = _averaged(*prepared, self.settings, at, at + 1)[0]
            for i in [i for i in held if i <= index - reach]:  # no later frame reaches back to it
                del held[i]
            if not held or (max(held) == index and index < self._last):  # emptied, or ended here
                del self._held[track_id]
        return index, out


Item = TypeVar("Item")


def stabilised_stream(
    items: Iterable[tuple[Item, bool]],
    settings: TemporalSettings,
    *,
    index: Callable[[Item], int],
    faces: Callable[[Item], Mapping[int, tuple[torch.Tensor, torch.Tensor]]],
    timed: Callable[[float], None] | None = None,
) -> Iterator[tuple[Item, dict[int, torch.Tensor]]]:
    """A ``TrackStabiliser`` over a stream of frames: each ``(item, starts_afresh)`` in, each
    item with its stabilised faces (``{track_id: [3,S,S]}``) out, in order, ``reach`` items
    later. ``starts_afresh`` releases everything held first and starts a new stabiliser (a gap
    in the frames: nothing on one side reaches the other). ``index(item)`` is the frame index,
    ``faces(item)`` its ``{track_id: (source, restored)}``; ``timed(seconds)`` gets the time spent."""
    stabiliser = TrackStabiliser(settings)
    held: deque = deque()

    def released(done: list[tuple[int, dict[int, torch.Tensor]]]) -> Iterator[tuple[Item, dict[int, torch.Tensor]]]:
        for frame_index, stable in done:
            item = held.popleft()
            if index(item) != frame_index:
                raise AssertionError(f"stabilised frame {frame_index} but held frame {index(item)}")
            yield item, stable

    for item, afresh in items:
        if afresh:
            yield from released(stabiliser.finish())
        start = perf_counter()
        held.append(item)
        done = stabiliser.push(index(item), faces(item))
        if timed is not None:
            timed(perf_counter() - start)
        yield from released(done)
    yield from released(stabiliser.finish())


# ------------------------------------------------------------------ measures


def flicker(frames: torch.Tensor, reference: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> float:
    """Flicker of ``frames`` [N,3,S,S] in face space, in grey levels of 255: the mean absolute
    frame-to-frame change of each pixel (mean over channels) beyond the change of ``reference``
    (the source's own change; None: nothing subtracted) at the same pixel, within ``mask``
    [S,S] or [N−1,S,S] per frame pair (weights; None: everywhere).

    The subtraction is per pixel, and only change beyond the source's counts: a restorer that
    renders the face flatter than the source (less change where the source moves) cannot
    offset, with its calm, the flicker it adds elsewhere.
    """
    d = (frames[1:].float() - frames[:-1].float()).abs().mean(1)  # [N-1,S,S]
    if reference is not None:
        ref = reference.float().to(d.device)
        d = (d - (ref[1:] - ref[:-1]).abs().mean(1)).clamp_(min=0.0)
    m = torch.ones_like(d) if mask is None else mask.to(d).expand_as(d)
    return float((d * m).sum() / m.sum() * 255.0)


def warped_flicker(frames: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Flicker of ``frames`` [N,3,S,S] with the motion taken out: each frame against the frame
    before it warped onto it by the optical flow of the *source* crops ``source`` (OpenCV's
    Farnebäck, on the host: a measure, not a stage), beyond the source's own warped error at
    the same pixel, in grey levels of 255, within ``mask`` [S,S] and where the flow stays in
    the crop.

    ``flicker`` counts every change beyond the source's, so a restorer that renders a moving
    edge sharper than the source shows change there although nothing flickers; warped, real
    motion cancels in both terms and what remains is change the source does not explain (the
    temporal warping error of video restoration papers, relative to the source's).
    """
    out = frames.float().cpu().permute(0, 2, 3, 1).numpy()  # [NSS3]
    src = source.float().cpu().permute(0, 2, 3, 1).numpy()
    size = out.shape[1]
    m = np.ones((size, size), np.float32) if mask is None else mask.float().cpu().numpy()
    grey = [cv2.cvtColor((np.clip(x, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for x in src]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    total = weight = 0.0
    for t in range(1, len(out)):
        flow = cv2.calcOpticalFlowFarneback(grey[t], grey[t - 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)  # t → t−1
        map_x, map_y = xs + flow[..., 0], ys + flow[..., 1]
        inside = (map_x >= 0) & (map_x <= size - 1) & (map_y >= 0) & (map_y <= size - 1)

        def warped_error(x: np.ndarray) -> np.ndarray:
            back = cv2.remap(x[t - 1], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            return np.abs(x[t] - back).mean(-1)

        d = np.clip(warped_error(out) - warped_error(src), 0.0, None)
        w = m * inside
        total += float((d * w).sum())
        weight += float(w.sum())
    return total / max(weight, 1e-9) * 255.0


def ghost_frames(output: torch.Tensor, target: torch.Tensor, change_at: int, *, cells: int = 8,
                 tolerance: float = 0.1) -> int:
    """Frames around an abrupt change at ``change_at`` whose output still shows the other side.

    Compares ``cells``² block means (robust to the restorer's texture noise) of ``output`` and
    ``target`` [N,3,S,S] (what the output should show: the clean or the unfiltered frames) over
    the blocks the change touches (those whose jump is at least half the largest); a frame counts
    when its mean block error there exceeds ``tolerance`` × the target's mean jump there.
    """
    o = F.adaptive_avg_pool2d(output.float(), cells)  # [N3cc]
    t = F.adaptive_avg_pool2d(target.float().to(output.device), cells)
    jump = (t[change_at] - t[change_at - 1]).abs().mean(0)  # [cc]
    changed = jump >= 0.5 * jump.max()
    err = (o - t).abs().mean(1)[:, changed].mean(1)  # [N]
    return int((err > tolerance * jump[changed].mean()).sum())


def mean_colour_error(output: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Per-frame mean colour of ``output`` against ``source`` within ``mask`` [S,S]: the mean and the
    spread (standard deviation over frames) of the per-frame error's length, in grey levels."""
    m = mask.to(output.device, torch.float32)
    mean = lambda x: (x.float() * m).sum((2, 3)) / m.sum()  # noqa: E731  [N,3]
    err = (mean(output) - mean(source.to(output.device))).norm(dim=1) * 255.0  # [N]
    return float(err.mean()), float(err.std()) if len(err) > 1 else 0.0


__all__ = [
    "TemporalSettings", "TrackStabiliser", "colour_fix", "flicker", "ghost_frames", "lowpass",
    "mean_colour_error", "motion_field", "stabilise", "time_taper", "warped_flicker",
]
