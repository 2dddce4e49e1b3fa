"""The warp interface both engines implement (``Warp``), the crops they exchange
(``FaceCrops``) and the rules they share; ``gpen_video.warp`` re-exports all of it."""

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
        hold_device: where the frame waits between crop and paste (the torch warp: ``device``),
            or None for the host. A frame already there (``torch_warp.DevicePicture``) is
            cropped without a copy.
    """

    size: int
    device: torch.device
    hold_device: torch.device | None

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
