"""Small typed records the stages pass to each other.

Conventions shared by every stage:
- Images are numpy arrays (H, W, 3) in RGB order, ``uint8`` for 8-bit sources and
  ``uint16`` (full 16-bit scale) for sources of higher bit depth.
- Coordinates are float pixels in the *displayed* (upright) frame, origin at the
  top-left corner of the top-left pixel's centre (OpenCV's convention).
- Five-point landmarks are ordered: left eye, right eye, nose tip, left mouth corner,
  right mouth corner, as seen in the image.
- Times are exact: ``pts`` in units of ``time_base`` (a ``Fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np


def check_shape(name: str, array: np.ndarray, shape: tuple[int | None, ...]) -> None:
    """Raise ValueError unless ``array`` has ``shape`` (None matches any size)."""
    actual = tuple(array.shape)
    ok = len(actual) == len(shape) and all(e is None or e == a for e, a in zip(shape, actual))
    if not ok:
        want = "(" + ", ".join("n" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {actual}")


class PixelSource(Protocol):
    """The picture behind a frame's pixels: its RGB, made on first use, and small copies (the
    decoder's made straight from its stored samples). The decoder's picture
    (``io.decode.SourcePicture``) is one; an enlarged frame's pixels left on the GPU
    (``warp.torch_warp.DevicePicture``) another."""

    shape: tuple[int, int, int]
    dtype: np.dtype

    @property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) the upright RGB, converted once on first read (the same array every time)."""

    @property
    def rgb_made(self) -> bool:
        """Whether ``rgb`` has been converted yet."""

    def scaled(self, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 upright RGB, downscaled from the stored samples."""


@dataclass(frozen=True)
class Frame:
    """One decoded video frame, upright as a player shows it.

    Attributes:
        index: position in decode output order, counting from 0.
        pts: presentation timestamp in ``time_base`` units (None if the stream has none).
        time_base: the stream's time base.
        rgb: (H, W, 3) RGB image, uint8 or uint16. A frame built with ``rgb=None`` and a
            ``source`` takes it from ``source.rgb`` on first read: the decoder's frames do,
            so a frame no stage reads the pixels of (no face to restore) is never converted
            to RGB, and the writer passes its picture to the encoder as it is.
        source: the ``PixelSource`` behind the frame, or None. The decoder's own picture
            (``io.decode.SourcePicture``) is what the writer may pass through where ``rgb``
            is unchanged; stages that derive a frame (``dataclasses.replace``) keep it, so it
            travels with the frame instead of being looked up in the reader. An enlarged
            frame has none, or its pixels on the device (``warp.torch_warp.DevicePicture``),
            which the writer encodes from ``rgb`` like any other frame.
    """

    index: int
    pts: int | None
    time_base: Fraction
    rgb: np.ndarray
    source: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.__dict__["rgb"] is None:
            if self.source is None:
                raise ValueError("a Frame without rgb needs a source to take it from")
            del self.__dict__["rgb"]  # read through __getattr__, from the source
        if len(self.shape) != 3 or self.shape[2] != 3:
            raise ValueError(f"Frame.rgb must have shape (n, n, 3), got {self.shape}")
        if self.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"Frame.rgb must be uint8 or uint16, got {self.dtype}")

    def __getattr__(self, name: str) -> Any:
        if name != "rgb" or "source" not in self.__dict__:  # not a lazy frame's pixels
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        rgb = self.source.rgb
        object.__setattr__(self, "rgb", rgb)
        return rgb

    @property
    def rgb_made(self) -> bool:
        """Whether ``rgb`` exists yet: False for a decoded frame no stage has read the pixels of."""
        return "rgb" in self.__dict__

    @property
    def shape(self) -> tuple[int, int, int]:
        """``rgb.shape``, known without converting a decoded frame's pixels."""
        return tuple(self.__dict__["rgb"].shape) if self.rgb_made else tuple(self.source.shape)

    @property
    def dtype(self) -> np.dtype:
        """``rgb.dtype``, known without converting a decoded frame's pixels."""
        return np.dtype(self.__dict__["rgb"].dtype if self.rgb_made else self.source.dtype)

    @property
    def time(self) -> float:
        """Presentation time in seconds (0.0 when pts is unknown)."""
        return float(self.pts * self.time_base) if self.pts is not None else 0.0


@dataclass(frozen=True)
class Detections:
    """Faces found in one frame.

    Attributes:
        boxes: (n, 4) float32 x1, y1, x2, y2.
        landmarks: (n, 5, 2) float32.
        scores: (n,) float32 detector confidence in [0, 1].
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        check_shape("Detections.boxes", self.boxes, (n, 4))
        check_shape("Detections.landmarks", self.landmarks, (n, 5, 2))
        check_shape("Detections.scores", self.scores, (n,))

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32)
        )

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections at the given indices or boolean mask."""
        return Detections(self.boxes[keep], self.landmarks[keep], self.scores[keep])


@dataclass(frozen=True)
class TrackedFace:
    """One face of one track in one frame.

    Attributes:
        track_id: stable id of the face across frames.
        frame_index: the ``Frame.index`` it belongs to.
        box: (4,) float32 x1, y1, x2, y2.
        landmarks_raw: (5, 2) float32 as detected, or None where the frame was interpolated.
        landmarks: (5, 2) float32 used for alignment (smoothed / interpolated).
        score: detector confidence, or None where interpolated.
        interpolated: True where the detector missed and the face was filled in.
        weight: how much of the restored face to paste, in [0, 1] (the planner's pose and
            track fades; 0 is never restored).
    """

    track_id: int
    frame_index: int
    box: np.ndarray
    landmarks_raw: np.ndarray | None
    landmarks: np.ndarray
    score: float | None
    interpolated: bool = False
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_shape("TrackedFace.box", self.box, (4,))
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"TrackedFace.weight must be in [0, 1], got {self.weight}")
        check_shape("TrackedFace.landmarks", self.landmarks, (5, 2))
        if self.landmarks_raw is not None:
            check_shape("TrackedFace.landmarks_raw", self.landmarks_raw, (5, 2))

    @property
    def size(self) -> float:
        """Shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))
