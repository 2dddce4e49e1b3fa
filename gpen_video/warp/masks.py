"""Blend masks: the original demo's feathered square, its border softening, parser labels.

A mask is (S, S) float32 in [0, 1] over a restored crop: how much of the restored face
replaces the frame at each crop pixel.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from gpen_video.records import check_shape

FACE_LABELS = tuple(range(1, 13))
"""Parser labels kept as face: skin, nose, glasses, eyes, brows, ears, mouth, lips (GPEN's map).

Labels 0 background, 13 hair, 14 hat, 15 earring, 16 necklace, 17 neck, 18 cloth are left
as they were: GPEN restores faces, and hair or clothes pasted from a 512 crop flicker.
"""


def _mask_geometry(size: int) -> tuple[int, int, float]:
    """Inset, odd Gaussian kernel side and sigma of the demo's mask, scaled from 512."""
    k = size / 512.0
    return round(26 * k), max(1, round(101 * k)) | 1, 4.0 * k


def soften_mask(mask: np.ndarray) -> np.ndarray:
    """The demo's border treatment: zero a 26/512 border, blur twice (101/512 px, σ 4/512)."""
    size = mask.shape[0]
    check_shape("mask", mask, (size, size))
    inset, ksize, sigma = _mask_geometry(size)
    out = np.array(mask, dtype=np.float32)
    if inset:
        out[:inset] = 0
        out[-inset:] = 0
        out[:, :inset] = 0
        out[:, -inset:] = 0
    for _ in range(2):
        out = cv2.GaussianBlur(out, (ksize, ksize), sigma)
    return out


@functools.lru_cache(maxsize=8)
def face_mask(size: int) -> np.ndarray:
    """The demo's plain mask (S, S) float32 in [0, 1]: a feathered square, cached, read-only.

    A filled square inset by 26 px of 512 (symmetric; the demo's rectangle is one pixel
    wider on its right and bottom), blurred twice with a 101×101 Gaussian of sigma 4, all
    scaled with ``size``.

    >>> m = face_mask(256); round(float(m[128, 128]), 6), float(m[0, 0]) < 1e-4
    (1.0, True)
    """
    if size <= 0:
        raise ValueError(f"mask size must be positive, got {size}")
    out = soften_mask(np.ones((size, size), np.float32))
    out.setflags(write=False)
    return out


def labels_to_mask(labels: np.ndarray, size: int) -> np.ndarray:
    """A (size, size) float32 blend mask from one parser label map (L, L) of ints.

    Face labels become 1, the rest 0; the border is zeroed and blurred at the label map's
    scale (as the demo does at 512), then the result is resized to ``size``.
    """
    check_shape("labels", labels, (labels.shape[0], labels.shape[0]))
    face = np.isin(labels, FACE_LABELS).astype(np.float32)
    soft = soften_mask(face)
    if soft.shape[0] != size:
        interp = cv2.INTER_AREA if size < soft.shape[0] else cv2.INTER_LINEAR
        soft = cv2.resize(soft, (size, size), interpolation=interp)
    return np.clip(soft, 0.0, 1.0)
