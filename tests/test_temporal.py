"""Temporal stabilisation (restore/temporal.py) and the pose fade (faces/pose.py).

Small synthetic tracks in face space: a real face (scikit-image's astronaut) with fresh source
noise every frame, a blink (the eyes darken from one frame to the next) and a cut to another
face, through injected restorers: identity, and one that adds fresh texture noise every call
(as a GAN's invented texture changes with its input noise). The assertions are the issue's
targets; the last tests show that a filter doing nothing, and a plain (non-adaptive) average,
fail them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from gpen_video.faces.align import template
from gpen_video.faces.pose import MEAN_HALF_WIDTH, NOSE_DEPTH, fade_reach, fade_weights, yaw_degrees
from gpen_video.restore.temporal import (
    TemporalSettings,
    TrackStabiliser,
    colour_fix,
    flicker,
    ghost_frames,
    lowpass,
    mean_colour_error,
    motion_field,
    stabilise,
    warped_flicker,
)

S = 64  # crop side
N = 24  # frames
BLINK = 12  # first frame of the blink / of the other face
SETTINGS = TemporalSettings(motion_grid=8, colour_grid=8)  # grids scaled to the small crop

Filter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def stabilised(source: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    return stabilise(source, restored, SETTINGS)


def unfiltered(source: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    return restored


def plain_average(source: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """The same window and taper, but blind to motion (weights ignore the source)."""
    blind = TemporalSettings(reach=SETTINGS.reach, motion_threshold=1e9, motion_grid=8, colour_grid=8)
    return stabilise(source, restored, blind)


def face(mirror: bool = False) -> torch.Tensor:
    """[3,S,S] the astronaut's face, as an aligned crop would show it."""
    rgb = data.astronaut()[20:230, 150:330]
    if mirror:  # "another face": mirrored, and lit differently
        rgb = rgb[:, ::-1] * np.array([0.8, 0.9, 1.1])
    img = np.clip(resize(rgb / 255.0, (S, S), anti_aliasing=True), 0, 1)
    # in [0.15, 0.85]: the noise below rarely reaches 0 or 1, whose clipping would bias means
    return torch.from_numpy(0.15 + 0.7 * img).permute(2, 0, 1).float()


EYES = (slice(18, 30), slice(12, 52))  # rows, columns of the eyes in the S=64 crop


def clean_track(change: str = "blink") -> torch.Tensor:
    """[N,3,S,S]: a still face that blinks (eyes dark from BLINK on) or turns into another face."""
    frames = face()[None].repeat(N, 1, 1, 1)
    if change == "blink":
        eyes = frames[BLINK:, :, EYES[0], EYES[1]]
        frames[BLINK:, :, EYES[0], EYES[1]] = 0.15 + 0.3 * (eyes - 0.15)
    elif change == "cut":
        frames[BLINK:] = face(mirror=True)
    return frames


def noisy(frames: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (frames + sigma * torch.randn(frames.shape, generator=g)).clamp(0, 1)


def identity_restorer(source: torch.Tensor) -> torch.Tensor:
    return source.clone()


def texture_restorer(source: torch.Tensor) -> torch.Tensor:
    """Fresh 'invented' texture every call: zero-mean fine noise of 12 grey levels on the input."""
    return noisy(source, 12 / 255, seed=int(source.sum() * 1e3) % 2**31)


def per_frame(restorer: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """Restore frame by frame: a fresh call (fresh texture) per frame."""
    return torch.cat([restorer(source[i : i + 1]) for i in range(len(source))])


RESTORERS = {"identity": identity_restorer, "texture": texture_restorer}


def flicker_ratio(filt: Filter, restorer: Callable, change: str = "blink") -> float:
    clean = clean_track(change)
    source = noisy(clean, 6 / 255, seed=1)
    restored = per_frame(restorer, source)
    off = flicker(restored, clean)
    on = flicker(filt(source, restored), clean)
    assert off > 1.0, f"the restorer must flicker to measure anything ({off:.2f} grey levels)"
    return on / off


def ghosts(filt: Filter, restorer: Callable, change: str) -> int:
    clean = clean_track(change)
    source = noisy(clean, 6 / 255, seed=2)
    return ghost_frames(filt(source, per_frame(restorer, source)), clean, BLINK)


# ------------------------------------------------------------------ the filter's properties


@pytest.mark.parametrize("restorer", RESTORERS)
def test_flicker_falls_to_under_0_4_of_unfiltered(restorer: str) -> None:
    assert flicker_ratio(stabilised, RESTORERS[restorer]) <= 0.4


@pytest.mark.parametrize("restorer", RESTORERS)
@pytest.mark.parametrize("change", ["blink", "cut"])
def test_output_follows_an_abrupt_change_within_two_frames(restorer: str, change: str) -> None:
    """No frame before or after the change shows more than 10 % of the other side (block means)."""
    assert ghosts(stabilised, RESTORERS[restorer], change) <= 2


def test_blink_is_followed_at_once_and_the_still_face_keeps_averaging() -> None:
    """Per pixel: the eyes follow the blink in its very frame, while the rest of the face is
    still averaged across it (the change is local, so is the reaction)."""
    clean = clean_track("blink")
    source = noisy(clean, 6 / 255, seed=3)
    restored = per_frame(texture_restorer, source)
    out = stabilised(source, restored)
    eyes = (out[:, :, EYES[0], EYES[1]] - clean[:, :, EYES[0], EYES[1]]).mean((1, 2, 3)).abs() * 255
    assert float(eyes[BLINK - 1]) < 3 and float(eyes[BLINK]) < 3  # no pre- or post-echo of the blink
    chin = (slice(50, 62), slice(20, 44))
    out_chin = out[:, :, chin[0], chin[1]] - clean[:, :, chin[0], chin[1]]
    off_chin = restored[:, :, chin[0], chin[1]] - clean[:, :, chin[0], chin[1]]
    at = slice(BLINK - 2, BLINK + 2)
    assert out_chin[at].std() < 0.5 * off_chin[at].std()  # texture noise still averaged there


def test_colour_stays_the_sources() -> None:
    """A restorer that tints the face: the output's mean colour is the source's, frame by frame."""
    clean = clean_track("blink")
    source = noisy(clean, 6 / 255, seed=4)
    tint = torch.tensor([0.08, -0.05, 0.03])[None, :, None, None]
    restored = (per_frame(texture_restorer, source) + tint).clamp(0, 1)
    mask = torch.ones(S, S)
    off_err, _ = mean_colour_error(restored, source, mask)
    on_err, on_spread = mean_colour_error(stabilised(source, restored), source, mask)
    assert off_err > 15
    assert on_err < 1.5 and on_spread < 1.0


def test_colour_fix_keeps_the_restorers_detail() -> None:
    """Detail (high frequencies) comes from the restorer: a sharp restored face on a blurred
    source stays sharp, and takes the source's colour."""
    sharp = face()[None]
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False) * 0.8
    fixed = colour_fix(sharp, blurred, 8)
    grad = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert grad(fixed) > 0.9 * grad(sharp) > grad(blurred)
    assert abs(float(fixed.mean() - blurred.mean())) < 2 / 255 < 20 / 255 < float(sharp.mean() - blurred.mean())


STILL = dataclasses.replace(SETTINGS, motion_search=0)  # with motion: 172 neighbour pairs, matched in chunks


@pytest.mark.parametrize("settings", [STILL, SETTINGS], ids=["still", "motion"])
@pytest.mark.parametrize("splits", [[24], [5, 19], [1, 1, 10, 12], [7, 7, 7, 3]])
def test_chunking_does_not_change_a_bit(splits: list[int], settings: TemporalSettings) -> None:
    """Output ranges computed from only their frames ± reach equal one call over the whole track."""
    clean = clean_track("blink")
    source = noisy(clean, 6 / 255, seed=5)
    restored = per_frame(texture_restorer, source)
    whole = stabilise(source, restored, settings)
    parts, start, reach = [], 0, settings.reach
    for size in splits:
        lo, hi = max(0, start - reach), min(N, start + size + reach)
        parts.append(stabilise(source[lo:hi], restored[lo:hi], settings, output=(start - lo, start + size - lo)))
        start += size
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("settings", [STILL, SETTINGS], ids=["still", "motion"])
def test_streaming_equals_whole_tracks(settings: TemporalSettings) -> None:
    """Two tracks, one starting late and one ending early, pushed frame by frame."""
    clean = clean_track("blink")
    a_src = noisy(clean, 6 / 255, seed=6)
    b_src = noisy(clean_track("cut"), 6 / 255, seed=7)
    a_res, b_res = per_frame(texture_restorer, a_src), per_frame(texture_restorer, b_src)
    a_frames, b_frames = range(0, 17), range(5, 24)
    stream = TrackStabiliser(settings)
    got: dict[int, dict[int, torch.Tensor]] = {}
    for i in range(N):
        faces = {}
        if i in a_frames:
            faces[3] = (a_src[i], a_res[i])
        if i in b_frames:
            faces[4] = (b_src[i], b_res[i])
        for index, out in stream.push(i, faces):
            got[index] = out
        assert len(got) == max(0, i + 1 - settings.reach)  # released after `reach` later frames
    got.update(dict(stream.finish()))
    assert sorted(got) == list(range(N))
    want_a = stabilise(a_src[:17], a_res[:17], settings)
    want_b = stabilise(b_src[5:], b_res[5:], settings)
    assert torch.equal(torch.stack([got[i][3] for i in a_frames]), want_a)
    assert torch.equal(torch.stack([got[i][4] for i in b_frames]), want_b)
    assert all(set(got[i]) == ({3} if i in a_frames else set()) | ({4} if i in b_frames else set()) for i in got)
    assert not stream._held


def test_the_restorers_channels_last_layout_changes_no_bit_and_is_not_kept() -> None:
    """The restorer hands channels-last crops on the CPU: the stream gives the bits of
    contiguous ones, and holds its frames contiguous (every neighbour warp and weighted sum
    reads them, 1.5-4x slower strided)."""
    source = noisy(clean_track("blink"), 6 / 255, seed=9)
    restored = per_frame(texture_restorer, source)
    nhwc = restored.contiguous(memory_format=torch.channels_last)
    assert not nhwc.is_contiguous()

    def streamed(crops: torch.Tensor) -> torch.Tensor:
        stream = TrackStabiliser(SETTINGS)
        done = [item for i in range(N) for item in stream.push(i, {1: (source[i], crops[i])})] + stream.finish()
        return torch.stack([faces[1] for _, faces in done])

    stream = TrackStabiliser(SETTINGS)
    for i in range(SETTINGS.reach):
        stream.push(i, {1: (source[i], nhwc[i])})
    assert all(part.is_contiguous() for frame in stream._held[1].values() for part in frame)
    got = streamed(nhwc)
    assert torch.equal(got, streamed(restored))
    assert torch.equal(got, stabilise(source, nhwc, SETTINGS))


def test_reach_zero_is_the_colour_fix_alone() -> None:
    clean = clean_track("blink")
    source = noisy(clean, 6 / 255, seed=8)
    restored = per_frame(texture_restorer, source)
    settings = TemporalSettings(reach=0, colour_grid=8)
    assert torch.equal(stabilise(source, restored, settings), colour_fix(restored, source, 8))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="source must have shape"):
        stabilise(torch.zeros(3, 3, 8, 8), torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="reach must be >= 0"):
        TemporalSettings(reach=-1)
    with pytest.raises(ValueError, match="in order without gaps"):
        stream = TrackStabiliser()
        stream.push(0, {})
        stream.push(2, {})


# ------------------------------------------------------------------ the tests can fail


def test_a_filter_that_does_nothing_fails_the_flicker_target() -> None:
    assert flicker_ratio(unfiltered, texture_restorer) > 0.9


@pytest.mark.parametrize("change", ["blink", "cut"])
def test_a_motion_blind_average_fails_the_following_target(change: str) -> None:
    assert ghosts(plain_average, texture_restorer, change) > 2


def test_a_filter_that_does_nothing_fails_the_colour_target() -> None:
    clean = clean_track("blink")
    source = noisy(clean, 6 / 255, seed=4)
    tint = torch.tensor([0.08, -0.05, 0.03])[None, :, None, None]
    restored = (per_frame(texture_restorer, source) + tint).clamp(0, 1)
    assert mean_colour_error(unfiltered(source, restored), source, torch.ones(S, S))[0] > 1.5


# ------------------------------------------------------------------ pose and fades


def turned(yaw: float, pitch: float = 0.0, roll: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """(5, 2) landmarks of the model face (template points, nose ``NOSE_DEPTH`` forward) turned
    by yaw/pitch/roll degrees, scaled orthographic view."""
    t = template(512) - template(512)[[0, 1, 3, 4]].mean(0)
    pts = np.c_[t, [0, 0, NOSE_DEPTH, 0, 0]]  # [5,3]: x right, y down, z towards the camera
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return scale * (pts @ (rz @ ry @ rx).T)[:, :2] + 300.0


@pytest.mark.parametrize("yaw", [-70, -45, -20, 0, 10, 30, 60])
@pytest.mark.parametrize("roll", [0, 25])
def test_yaw_is_recovered_from_five_points(yaw: float, roll: float) -> None:
    got = yaw_degrees(turned(yaw, roll=roll, scale=0.3)[None])[0]
    assert abs(got - yaw) < 0.5


def test_yaw_ignores_moderate_pitch_within_a_few_degrees() -> None:
    got = yaw_degrees(np.stack([turned(30, pitch=p) for p in (-15, 0, 15)]))
    assert np.all(np.abs(got - 30) < 3)
    assert abs(MEAN_HALF_WIDTH - 49.1) < 0.1


def test_fade_out_beyond_max_yaw_is_smooth_and_complete() -> None:
    yaws = np.r_[np.zeros(20), np.linspace(0, 80, 30), np.full(20, 80), np.linspace(80, 0, 30)]
    lm = np.stack([turned(y) for y in yaws])
    w = fade_weights(lm, max_yaw=55, yaw_band=15, fade_frames=9)
    assert np.all(w[np.abs(yaws) >= 55] == 0)  # never restored beyond max_yaw
    assert np.all(w[:15] == 1) and np.all(w[-5:] == 1)
    assert np.abs(np.diff(w)).max() <= 1 / 9 + 1e-9  # no pops: at most 1/fade_frames per frame


def test_fade_in_and_out_where_restoration_starts_and_stops_mid_shot() -> None:
    lm = np.repeat(turned(0)[None], 40, 0)
    wanted = np.zeros(40, bool)
    wanted[10:30] = True
    w = fade_weights(lm, wanted, fade_frames=5)
    assert np.all(w[~wanted] == 0)
    np.testing.assert_allclose(w[10:15], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(w[25:30], [1.0, 0.8, 0.6, 0.4, 0.2])
    ends = fade_weights(lm[:20], fade_frames=5, fade_start=True, fade_end=True)
    np.testing.assert_allclose(ends[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(ends[-5:], [1.0, 0.8, 0.6, 0.4, 0.2])
    held = fade_weights(lm[:20], fade_frames=5)  # a track cut by scene cuts: no fade at its ends
    assert np.all(held == 1)


@pytest.mark.parametrize("length", [1, 2])
def test_tracks_of_one_or_two_frames_are_not_restored(length: int) -> None:
    assert np.all(fade_weights(np.repeat(turned(0)[None], length, 0)) == 0)
    assert np.all(fade_weights(np.repeat(turned(0)[None], 3, 0)) == 1)


def test_fade_depends_only_on_frames_within_its_reach() -> None:
    rng = np.random.default_rng(0)
    yaws = np.cumsum(rng.normal(0, 8, 60)).clip(-85, 85)
    lm = np.stack([turned(y) for y in yaws])
    whole = fade_weights(lm, fade_frames=9)
    reach = fade_reach(9)
    for t in (10, 30, 45):
        part = fade_weights(lm[t - reach : t + reach + 1], fade_frames=9)
        assert part[reach] == whole[t]


def test_docstring_examples_run() -> None:
    import doctest

    from gpen_video.faces import pose
    from gpen_video.restore import temporal

    for module in (pose, temporal):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_warped_flicker_counts_flicker_not_motion() -> None:
    """A texture sliding 1 px a frame, restored by a sharpening network: ``flicker`` counts its
    sharper moving edges as change beyond the source's (4.7 grey levels), ``warped_flicker``
    takes the motion out (0.29); fresh texture noise still counts (14.4)."""
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.random((64, 160, 3)).astype(np.float32), (0, 0), 2.0)
    big = (big - big.min()) / (big.max() - big.min())
    crops = np.stack([big[:, i : i + 64] for i in range(12)])
    src = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    blur = torch.from_numpy(np.stack([cv2.GaussianBlur(c, (0, 0), 1.5) for c in crops])).permute(0, 3, 1, 2)
    sharp = (src + 1.5 * (src - blur)).clamp(0, 1)
    noisy = (src + 0.05 * torch.randn(src.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert warped_flicker(src, src) == 0.0
    assert flicker(sharp, src) > 3.0 and warped_flicker(sharp, src) < 0.5
    assert warped_flicker(noisy, src) > 10.0


def sliding_texture(frames: int = 16, step: int = 2) -> torch.Tensor:
    """[N,3,64,64] crops of a smooth random texture sliding ``step`` px a frame to the left."""
    rng = np.random.default_rng(0)
    big = cv2.GaussianBlur(rng.random((64, 64 + step * frames, 3)).astype(np.float32), (0, 0), 2.0)
    big = (big - big.min()) / (big.max() - big.min())
    return torch.from_numpy(np.stack([big[:, step * i : step * i + 64] for i in range(frames)])).permute(0, 3, 1, 2)


def test_the_motion_field_finds_where_a_block_went() -> None:
    crops = sliding_texture()
    grey = crops.mean(1, keepdim=True)
    field = motion_field(grey[1:2], grey[0:1], 4)  # frame 1's content is 2 px further right in frame 0
    inner = field[0, :, 1:-1, 1:-1]  # blocks away from the borders
    assert torch.allclose(inner[0], torch.full_like(inner[0], 2.0), atol=0.25) and inner[1].abs().max() <= 0.25
    down = motion_field(grey[1:2].transpose(2, 3), grey[0:1].transpose(2, 3), 4)[0, :, 1:-1, 1:-1]  # moving down
    assert torch.allclose(down[1], torch.full_like(down[1], 2.0), atol=0.25) and down[0].abs().max() <= 0.25
    assert torch.equal(motion_field(grey[:3], grey[:3], 4), torch.zeros(3, 2, 8, 8)), "an exact match stays at 0"


def pyramid_passes(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``lowpass`` as the image passes it stands for: 2×2 means down to about ``grid``², bilinear
    doubling with a 3×3 mean at every coarse level, a plain bilinear step to full size."""
    sizes, y = [tuple(x.shape[-2:])], x
    while grid > 0 and min(y.shape[-2:]) >= 2 * grid:
        y = torch.nn.functional.avg_pool2d(y, 2, ceil_mode=True)
        sizes.append(tuple(y.shape[-2:]))
    for i, size in enumerate(reversed(sizes[:-1])):
        y = torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        if i < len(sizes) - 2:
            y = torch.nn.functional.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
    return y


@pytest.mark.parametrize(("shape", "grid"), [((2, 3, 256, 256), 16), ((1, 3, 255, 255), 16), ((1, 2, 37, 53), 4),
                                             ((1, 1, 20, 20), 16), ((3, 3, 64, 64), 0)])
def test_the_lowpass_matrices_are_the_pyramids_image_passes(shape: tuple[int, ...], grid: int) -> None:
    """One matrix per axis gives what the passes give, odd and unequal sides included, and
    each image's result does not depend on the others in the batch."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(lowpass(x, grid), pyramid_passes(x, grid), atol=1e-5)
    assert torch.equal(lowpass(x[-1:], grid)[0], lowpass(x, grid)[-1])


def test_motion_compensation_steadies_a_moving_face() -> None:
    """A face moving 2 px a frame in face space with fresh noise every frame: moved onto each
    frame before averaging, the neighbours take the noise out where they would otherwise be
    left alone (the source changes there); without motion compensation the flicker stays."""
    src = sliding_texture()
    noisy = (src + 0.08 * torch.randn(src.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    still = TemporalSettings(motion_search=0, motion_grid=8, colour_grid=8)
    moving = dataclasses.replace(still, motion_search=4)
    off = warped_flicker(noisy, src)
    assert warped_flicker(stabilise(src, noisy, moving), src) <= 0.3 * off  # measured 0.18
    assert warped_flicker(stabilise(src, noisy, still), src) > 0.6 * off  # measured 0.86
    error = lambda out: float((out - src).abs().mean())  # noqa: E731
    assert error(stabilise(src, noisy, moving)) < 0.6 * error(noisy)  # no smear: closer to the clean face
