"""The small pictures that detection and scene cuts look at, made as cheaply as the frame allows.

A decoded frame (``Frame.source`` is the decoder's picture) is downscaled by swscale straight
from its stored samples (``records.PixelSource.scaled``), so its full-size RGB is never made for
them; other frames (photos, arrays given to ``restore_frames``) are downscaled from their RGB
with OpenCV's area filter. A frame no larger than asked is used at its own size. Which of the
two a frame gets depends only on the frame, so a resumed or distributed job sees the same
pictures as an uninterrupted one.
"""

from __future__ import annotations

import cv2
import numpy as np

from gpen_video.records import Frame


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit copy of a uint8 or uint16 RGB image (16-bit full scale, rounded)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise ValueError(f"images must be uint8 or uint16, got {image.dtype}")


def scaled_picture(frame: Frame, long_side: int | None) -> tuple[np.ndarray, float, float]:
    """(h, w, 3) uint8 RGB copy of ``frame`` whose long side is at most ``long_side`` (never
    upscaled; None: full size), and its x and y scale (picture pixels per frame pixel)."""
    height, width = frame.shape[:2]
    scale = 1.0 if long_side is None else min(1.0, long_side / max(height, width))
    if scale == 1.0:
        return to_uint8(frame.rgb), 1.0, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if frame.source is not None:
        small = frame.source.scaled(*size)
    else:
        small = cv2.resize(to_uint8(frame.rgb), size, interpolation=cv2.INTER_AREA)
    return small, size[0] / width, size[1] / height
