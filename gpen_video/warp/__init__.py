"""Cut faces out of a frame for GPEN and paste the restored faces back: one interface, two engines.

``create_warp`` chooses once, where a pipeline is built, between:
- ``OpenCVWarp`` (reference): OpenCV warps on the host over each face's region only;
- ``TorchWarp`` (fast on GPUs): ``F.affine_grid``/``F.grid_sample`` on the restorer's device,
  the frame kept there as integers between crop and paste.
Both give the same crops and the same pasted frames within the tolerances the tests state.

Crop: a bilinear warp of the face onto GPEN's five-point template (``faces.align``). Crop
pixels that fall outside the frame mirror the frame at its edge: a black band is something
GPEN never saw in training (FFHQ crops are reflect-padded), and it bleeds dark smears into
faces at frame edges. Mirrored pixels land outside the frame again when pasted.

Paste: per face, the restored crop (smoothed for faces under ``SMALL_FACE`` px) and its mask
are warped back into the face's region of the frame (bicubic image, bilinear mask), then
combined with a normalised weighted average:

    w_i = strength · m_i,   W = Σ w_i
    out = Σ w_i·f_i / max(1, W) + (1 − min(1, W)) · orig

For one face this is the original demo's ``m·f + (1 − m)·orig``. Where faces overlap it is a
mask-weighted average, continuous in every mask, so no seam appears where one mask overtakes
another (the demo keeps the face with the larger mask per pixel, which steps where masks
cross). ``strength`` scales the mask, so the faded-out part is the untouched frame: strength 0
returns the input frame itself, and pixels no mask touches are copied bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from gpen_video.records import Frame, TrackedFace, check_shape

WarpKind = Literal["auto", "opencv", "torch"]

SMALL_FACE = 100
"""Faces whose box's shorter side is under this many pixels get their restored crop smoothed
(the demo's 3×3 [1 2 1]² filter): GPEN invents detail at that scale that shimmers in video."""

SMOOTH_KERNEL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]).astype(np.float32) / 16.0
"""The small-face smoothing filter (3, 3) float32, sum 1."""


@dataclass(frozen=True)
class FaceCrops:
    """One frame's aligned face crops on their way to the model and back.

    Attributes:
        frame: the source frame.
        faces: the faces cropped, in order.
        affines: (M, 2, 3) float64 maps from frame pixels to crop pixels.
        pixels: [M,3,S,S] float32 RGB in [0, 1] on the restorer's device: the model input.
        held: what the warp that made the crops keeps for ``paste`` (the torch warp: the
            frame on the device); opaque to everyone else.
    """

    frame: Frame
    faces: tuple[TrackedFace, ...]
    affines: np.ndarray
    pixels: torch.Tensor
    held: object | None = None

    def __post_init__(self) -> None:
        m = len(self.faces)
        check_shape("FaceCrops.affines", self.affines, (m, 2, 3))
        check_shape("FaceCrops.pixels", self.pixels, (m, 3, None, None))
        if self.pixels.shape[2] != self.pixels.shape[3]:
            raise ValueError(f"FaceCrops.pixels must be square crops, got {tuple(self.pixels.shape)}")
        if self.pixels.dtype != torch.float32:
            raise ValueError(f"FaceCrops.pixels must be float32, got {self.pixels.dtype}")

    def __len__(self) -> int:
        return len(self.faces)


class Warp(Protocol):
    """Crop faces for the model and paste restored faces back (``OpenCVWarp``, ``TorchWarp``).

    Attributes:
        size: crop side S (the restorer's input size).
        device: where ``FaceCrops.pixels`` are put (the restorer's device).
    """

    size: int
    device: torch.device

    def crop(self, frame: Frame, faces: Sequence[TrackedFace]) -> FaceCrops:
        """Align every face of ``frame`` onto the template (no faces: empty crops)."""
        ...

    def paste(
        self, crops: FaceCrops, restored: torch.Tensor, *, strength: float, masks: np.ndarray | None = None
    ) -> Frame:
        """The frame with ``restored`` [M,3,S,S] (any float dtype, [0, 1]) blended in.

        ``masks``: (M, S, S) float32 in [0, 1] per face; default the plain ``face_mask(S)``.
        ``strength`` 0 returns ``crops.frame`` itself.
        """
        ...

    def held_bytes(self, height: int, width: int, dtype: np.dtype) -> int:
        """Device bytes a frame of that size and dtype occupies between crop and paste."""
        ...


def check_paste(crops: FaceCrops, restored: torch.Tensor, strength: float, masks: np.ndarray | None) -> None:
    """Raise ValueError unless ``restored`` and ``masks`` fit ``crops`` and strength is in [0, 1]."""
    m, size = len(crops), crops.pixels.shape[-1]
    check_shape("restored", restored, (m, 3, size, size))
    if not restored.is_floating_point():
        raise ValueError(f"restored must be a floating-point tensor in [0, 1], got {restored.dtype}")
    if masks is not None:
        check_shape("masks", masks, (m, size, size))
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def create_warp(kind: WarpKind, *, size: int, device: torch.device | str) -> Warp:
    """The warp for a job: ``opencv``, ``torch``, or ``auto`` (torch on CUDA, else OpenCV).

    Example:
        >>> warp = create_warp("auto", size=512, device=torch.device("cpu"))
        >>> type(warp).__name__
        'OpenCVWarp'
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    device = torch.device(device)
    if kind == "auto":
        kind = "torch" if device.type == "cuda" else "opencv"
    if kind == "opencv":
        from gpen_video.warp.opencv_warp import OpenCVWarp

        return OpenCVWarp(size, device=device)
    if kind == "torch":
        from gpen_video.warp.torch_warp import TorchWarp

        return TorchWarp(size, device=device)
    raise ValueError(f"unknown warp {kind!r}; use auto, opencv or torch")
