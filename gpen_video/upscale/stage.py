"""The upscaling stage of the frame stream: frames in, frames ``scale``× larger out, and the
faces planned on them mapped onto the larger frames.

Detection and planning see the original frame (cheaper, and what the logs of a resumed job
hold); this stage runs between the planner and the crop. It enlarges each frame and moves its
planned faces to the new size, so GPEN's crops are taken from, and pasted back into, the
larger frame: a 100 px face comes out as a 200 px face at 2×, with GPEN's detail.

- Frames are enlarged in batches of consecutive frames (``batch_size``; a network on CUDA
  gains from it), and a batch never spans two batch groups of a job (segments and their halos:
  ``jobs.segments.SegmentPlan.group_of``), so a resumed job enlarges each frame exactly as an
  uninterrupted one did.
- The enlarged frame has no decoder picture: the writer can splice the decoder's samples only
  into a picture of their own size, so every pixel is converted. Its ``Frame.source`` is None
  (its RGB is on the host), or, with ``on_device`` (the pipeline asks where the upscaler and the
  torch warp share a GPU), a ``warp.torch_warp.DevicePicture``: the pixels stay on the device
  from upscale to paste, and reach the host only when read (a frame without faces, for the
  writer) or as the paste's result.
- A network upscaler runs in ``--precision``, after the same half-precision check as GPEN
  (``restore.precision.choose_precision``); its tiles bound its memory.

Example:
    >>> from fractions import Fraction
    >>> from gpen_video.upscale.upscaler import LanczosUpscaler
    >>> stage = UpscaleStage(LanczosUpscaler(2), name="lanczos")
    >>> stage.enlarge([Frame(0, 0, Fraction(1, 25), np.zeros((9, 16, 3), np.uint8))])[0].rgb.shape
    (18, 32, 3)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

from gpen_video.config import Config
from gpen_video.device import resolve_dtype
from gpen_video.engine import Stages
from gpen_video.io.decode import VideoInfo
from gpen_video.records import Frame, TrackedFace
from gpen_video.restore.precision import check_faces, choose_precision
from gpen_video.upscale.upscaler import NetworkUpscaler, UpscaleConfig, Upscaler, create_upscaler
from gpen_video.warp.torch_warp import DevicePicture, held_dtype

T = TypeVar("T")

CUDA_BATCH = 4
"""Frames per network call on CUDA. Higher: fewer, fuller kernel launches; memory grows with
it (one tile's activations per frame). On the CPU frames go one at a time."""
CHECK_SIZE = 32
"""Side of the check faces a network upscaler's half precision is measured on (its input;
the output is 4× that). Small: on this project's 2-core CPU the check of realesrgan-x4plus
took 23 s at 64 px (fp32 and bf16 runs), so about 6 s at 32; it is cached per machine."""


def scale_points(points: np.ndarray, scale: int) -> np.ndarray:
    """Pixel coordinates in a frame as coordinates in the frame ``scale``× larger.

    The origin is the centre of the top-left pixel (``records``), so the frame's corner at
    -0.5 stays at -0.5 and a pixel's centre lands on the centre of its enlarged block:
    x' = (x + 0.5)·scale − 0.5.

    >>> scale_points(np.array([[0.0, 0.0], [9.5, -0.5]], np.float32), 2).tolist()
    [[0.5, 0.5], [19.5, -0.5]]
    """
    return ((points + 0.5) * scale - 0.5).astype(points.dtype)


def scale_face(face: TrackedFace, scale: int) -> TrackedFace:
    """``face`` (box, landmarks) in the pixels of its frame ``scale``× larger."""
    raw = face.landmarks_raw
    return dataclasses.replace(
        face, box=scale_points(face.box.reshape(2, 2), scale).reshape(4),
        landmarks=scale_points(face.landmarks, scale), landmarks_raw=None if raw is None else scale_points(raw, scale),
    )


def scaled_info(info: VideoInfo, scale: int) -> VideoInfo:
    """The description of ``info``'s frames ``scale``× larger: only the sizes change (timing,
    colour, rotation, aspect ratio and bit depth are the source's)."""
    if scale == 1:
        return info
    return dataclasses.replace(info, width=info.width * scale, height=info.height * scale,
                               coded_width=info.coded_width * scale, coded_height=info.coded_height * scale)


def resolve_upscaler(name: str, device: torch.device) -> str:
    """``Config.upscaler`` with ``auto`` chosen: Lanczos on the CPU, where a network costs about
    an hour per minute of SD video (README, Upscaling), realesr-animevideov3 on CUDA."""
    if name != "auto":
        return name
    return "realesr-animevideov3" if device.type == "cuda" else "lanczos"


class UpscaleStage:
    """Enlarges planned frames in batches and maps their faces onto the enlarged frames.

    Args:
        upscaler: the frame upscaler (built once per pipeline).
        name: its name in ``upscale.UPSCALERS`` (part of a job's identity).
        batch_size: consecutive frames per upscaler call.
        device: where the frames are enlarged (a network's device; Lanczos runs on the CPU).
    """

    def __init__(self, upscaler: Upscaler, *, name: str, batch_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.upscaler, self.name, self.batch_size, self.device = upscaler, name, batch_size, torch.device(device)
        self.scale = upscaler.scale

    @property
    def dtype(self) -> torch.dtype:
        """What the upscaler computes in (part of a job's identity)."""
        return self.upscaler.dtype if isinstance(self.upscaler, NetworkUpscaler) else torch.float32

    def device_bytes(self, height: int, width: int) -> int:
        """An upper bound of the device memory one call on frames of this size takes besides
        the frames: for a network, three feature maps of its width over a padded tile at its
        native output scale, per frame of a batch; nothing for Lanczos (it runs on the CPU)."""
        up = self.upscaler
        if not isinstance(up, NetworkUpscaler):
            return 0
        h, w = (min(side, up.tile or side) + 2 * up.tile_pad for side in (height, width))
        itemsize = torch.finfo(up.dtype).bits // 8
        return self.batch_size * 3 * up.config.num_feat * up.config.scale ** 2 * h * w * itemsize

    def enlarge(self, frames: Sequence[Frame], *, on_device: bool = False) -> list[Frame]:
        """The frames (all of one size and dtype) ``scale``× larger, without decoder pictures.

        ``on_device``: leave each enlarged frame's pixels on ``device`` as a ``DevicePicture``
        (the torch warp's integers; the host RGB is made when read) instead of downloading them.
        Both give the same pixels."""
        rgb = np.stack([f.rgb for f in frames])  # [NHW3]
        top = float(np.iinfo(rgb.dtype).max)
        x = torch.from_numpy(rgb.astype(np.float32)).to(self.device).permute(0, 3, 1, 2).div_(top)  # [N3HW]
        y = self.upscaler(x).mul_(top).round_()  # [N3(sH)(sW)], whole numbers in [0, top]
        if on_device:  # one tensor per frame, so a frame waiting for its paste holds only itself
            held = held_dtype(rgb.dtype)
            return [dataclasses.replace(f, rgb=None, source=DevicePicture(y[i].to(held), rgb.dtype))
                    for i, f in enumerate(frames)]
        big = y.permute(0, 2, 3, 1).cpu().numpy().astype(rgb.dtype)  # [N(sH)(sW)3]
        return [dataclasses.replace(f, rgb=big[i], source=None) for i, f in enumerate(frames)]

    def run(self, items: Iterable[T], frame_of: Callable[[T], Frame], stages: Stages,
            group_of: Callable[[Frame], int] | None = None, *, on_device: bool = False) -> Iterator[tuple[T, Frame]]:
        """Each item with its frame (``frame_of(item)``) enlarged (``enlarge``), in order; batches
        never span two groups of ``group_of`` (``jobs.segments.SegmentPlan.group_of``) nor two
        frame sizes. Busy time goes to ``stages`` as "upscale"."""
        held: list[tuple[T, Frame]] = []
        group = None
        for item in items:
            frame = frame_of(item)
            previous, group = group, group_of(frame) if group_of is not None else None
            if held and (group != previous or frame.rgb.shape != held[0][1].rgb.shape):
                yield from self._flush(held, stages, on_device)
            held.append((item, frame))
            if len(held) >= self.batch_size:
                yield from self._flush(held, stages, on_device)
        if held:
            yield from self._flush(held, stages, on_device)

    def _flush(self, held: list[tuple[T, Frame]], stages: Stages, on_device: bool) -> Iterator[tuple[T, Frame]]:
        start = time.perf_counter()
        frames = self.enlarge([frame for _, frame in held], on_device=on_device)
        stages.time("upscale", time.perf_counter() - start)
        batch = [(item, big) for (item, _), big in zip(held, frames)]
        held.clear()
        yield from batch


def _network_output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _unit(y: torch.Tensor) -> torch.Tensor:
    return y.float().clamp(0, 1)


def build_upscale_stage(config: Config, device: torch.device, *, progress: bool = False) -> UpscaleStage | None:
    """The stage ``config.upscale`` asks for (None for 1): the upscaler resolved for
    ``device``, its weights loaded as ``config`` says (cache, offline, mirror), a network's
    half precision checked against fp32 as GPEN's is."""
    if config.upscale == 1:
        return None
    name = resolve_upscaler(config.upscaler, device)

    def guard(network: torch.nn.Module) -> torch.dtype:
        return choose_precision(network, check_faces(CHECK_SIZE), resolve_dtype(config.precision, device),
                                device=device, name=name, cache_dir=config.cache_dir, forward=_network_output,
                                unit=_unit).dtype

    upscaler = create_upscaler(UpscaleConfig(name, scale=config.upscale), device=device, cache_dir=config.cache_dir,
                               offline=config.offline, progress=progress, mirror=config.mirror, guard=guard)
    on_device = isinstance(upscaler, NetworkUpscaler)
    return UpscaleStage(upscaler, name=name, batch_size=CUDA_BATCH if on_device and device.type == "cuda" else 1,
                        device=device if on_device else "cpu")


__all__ = ["CUDA_BATCH", "UpscaleStage", "build_upscale_stage", "resolve_upscaler", "scale_face",
           "scale_points", "scaled_info"]
