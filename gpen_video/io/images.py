"""Still images: read as RGB (with alpha), write atomically by extension."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from gpen_video.errors import InputError, OutputError
from gpen_video.io.files import write_atomic

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) RGB uint8/uint16 and the alpha channel if there is one."""
    if not path.is_file():
        raise InputError(f"input {path} does not exist; check the path")
    data = np.fromfile(str(path), dtype=np.uint8)
    flags = cv2.IMREAD_UNCHANGED if path.suffix.lower() in {".png", ".tif", ".tiff"} else cv2.IMREAD_COLOR
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise InputError(f"input {path} is not a readable image; check that the file is complete")
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"input {path} has {image.dtype} pixels; only 8- and 16-bit images are supported")
    alpha = None
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        alpha = image[:, :, 3].copy()
        image = image[:, :, :3]
    return np.ascontiguousarray(image[:, :, ::-1]), alpha


def write_image(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Encode by the path's extension to a temporary file beside it, then rename."""
    bgr = rgb[:, :, ::-1]
    if alpha is not None:
        bgr = np.dstack([bgr, alpha])
    ok, data = cv2.imencode(path.suffix.lower() or ".png", np.ascontiguousarray(bgr))
    if not ok:
        raise OutputError(f"cannot encode {path} as {path.suffix}; pick another image extension")
    write_atomic(path, data.tobytes())
