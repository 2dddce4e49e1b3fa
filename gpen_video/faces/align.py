"""Face geometry: the GPEN five-point template, the frame → crop similarity, and regions.

Everything here is numpy geometry shared by both warp implementations (``gpen_video.warp``):
where a crop's pixels come from in the frame (``source_region``), where a pasted crop lands
(``paste_region``), and which pasted faces overlap (``overlap_groups``). Affines are (2, 3)
float64 matrices mapping frame pixels to crop pixels, integer coordinates at pixel centres
(OpenCV's convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gpen_video.records import check_shape

_TEMPLATE_512 = np.array(
    [
        [202.041, 242.884],
        [309.430, 242.290],
        [256.077, 303.959],
        [211.960, 366.828],
        [300.891, 366.336],
    ],
    dtype=np.float64,
)
"""GPEN's five landmarks (eyes, nose tip, mouth corners) in pixels of a 512×512 crop."""

_LINEAR_MARGIN = 2
"""Source pixels read around a bilinear sample's preimage box (1 needed, 1 for rounding)."""
_CUBIC_MARGIN = 3
"""Frame pixels added around a pasted crop's box so bicubic reads and mask tails are covered."""

Region = tuple[int, int, int, int]
"""(x0, y0, x1, y1) pixel box of a frame, end-exclusive."""


def template(size: int) -> np.ndarray:
    """The five template points (5, 2) float64 for a ``size``×``size`` crop.

    The 512 template scaled linearly (pixel coordinates, as the original demo does).

    >>> template(256)[0]
    array([101.0205, 121.442 ])
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return _TEMPLATE_512 * (size / 512.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` to ``dst``.

    Umeyama (1991) without reflection: the proper rotation that minimises
    ``sum |s·R·src_i + t − dst_i|²``.

    Args:
        src: (n, 2) points, n ≥ 2, not all equal.
        dst: (n, 2) points.

    Returns:
        (2, 3) float64 matrix ``[s·R | t]``.

    >>> m = similarity_transform(np.array([[0, 0], [1, 0]]), np.array([[1, 1], [1, 3]]))
    >>> np.round(m, 6).tolist()
    [[0.0, -2.0, 1.0], [2.0, 0.0, 1.0]]
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    check_shape("src", src, (None, 2))
    check_shape("dst", dst, (len(src), 2))
    if len(src) < 2:
        raise ValueError(f"a similarity needs at least 2 point pairs, got {len(src)}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("source points must not all coincide")
    cov = dst_c.T @ src_c / len(src)  # [2,2]
    u, sig, vt = np.linalg.svd(cov)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / src_var
    out = np.empty((2, 3), dtype=np.float64)
    out[:, :2] = scale * rot
    out[:, 2] = dst_mean - scale * rot @ src_mean
    return out


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix, as (2, 3) float64."""
    check_shape("affine", affine, (2, 3))
    full = np.vstack([np.asarray(affine, np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def shift_affine(affine: np.ndarray, x0: float, y0: float) -> np.ndarray:
    """The affine ``p ↦ affine(p + (x0, y0))``: the same map read from a region at (x0, y0)."""
    out = np.array(affine, dtype=np.float64)
    out[:, 2] += out[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return out


def crop_preimage_box(affine: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """Bounding box (x_min, y_min, x_max, y_max) in the frame of the crop's pixel centres.

    ``affine`` maps frame pixels to crop pixels; the crop's corners are mapped back.
    """
    inv = invert_affine(affine)
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], np.float64)
    pts = corners @ inv.T  # [4,2]
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())


def _reflect_span(lo: int, hi: int, length: int) -> tuple[int, int]:
    """Pixel span [lo, hi] (inclusive) clipped to [0, length) so that reflected reads stay inside.

    A read at −k mirrors to k and one at length−1+k to length−1−k, so the clipped span must
    also cover those; if it is clipped on both sides it is the whole axis and always correct.
    """
    if lo < 0:
        hi = max(hi, -lo)
    if hi > length - 1:
        lo = min(lo, 2 * (length - 1) - hi)
    return max(lo, 0), min(hi, length - 1)


def source_region(affine: np.ndarray, size: int, height: int, width: int) -> Region:
    """The frame region a bilinear crop warp reads from, mirrored borders included.

    Pixels of a crop that fall outside the frame are mirrored at its edge (OpenCV's
    BORDER_REFLECT_101), so the region also covers the pixels those reads mirror to.
    """
    x_min, y_min, x_max, y_max = crop_preimage_box(affine, size)
    x0, x1 = _reflect_span(
        math.floor(x_min) - _LINEAR_MARGIN, math.ceil(x_max) + _LINEAR_MARGIN, width
    )
    y0, y1 = _reflect_span(
        math.floor(y_min) - _LINEAR_MARGIN, math.ceil(y_max) + _LINEAR_MARGIN, height
    )
    return x0, y0, x1 + 1, y1 + 1


def face_affine(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(2, 3) float64 similarity mapping frame pixels to a ``size`` crop for five landmarks."""
    check_shape("landmarks", np.asarray(landmarks), (5, 2))
    return similarity_transform(landmarks, template(size))


def paste_region(affine: np.ndarray, size: int, height: int, width: int) -> Region | None:
    """The frame region a crop covers when pasted back; None if it lies outside the frame.

    The crop square [−0.5, S − 0.5]² is mapped back into the frame and widened by a few
    pixels for bicubic support.
    """
    inv = invert_affine(affine)
    lo, hi = -0.5, size - 0.5
    corners = np.array([[lo, lo, 1], [hi, lo, 1], [lo, hi, 1], [hi, hi, 1]], np.float64) @ inv.T  # [4,2]
    x0 = max(math.floor(corners[:, 0].min()) - _CUBIC_MARGIN, 0)
    y0 = max(math.floor(corners[:, 1].min()) - _CUBIC_MARGIN, 0)
    x1 = min(math.ceil(corners[:, 0].max()) + _CUBIC_MARGIN + 1, width)
    y1 = min(math.ceil(corners[:, 1].max()) + _CUBIC_MARGIN + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def overlap_groups(regions: Sequence[Region]) -> list[tuple[Region, list[int]]]:
    """Group regions whose boxes overlap, transitively.

    Returns each group's bounding box and the indices of its members. The groups' boxes are
    pairwise disjoint, so each can be blended on its own.

    >>> overlap_groups([(0, 0, 10, 10), (20, 0, 30, 10), (5, 5, 25, 8)])
    [((0, 0, 30, 10), [0, 2, 1])]
    """
    groups = [(tuple(box), [i]) for i, box in enumerate(regions)]
    merged = True
    while merged:
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                (ax0, ay0, ax1, ay1), am = groups[a]
                (bx0, by0, bx1, by1), bm = groups[b]
                if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                    groups[a] = ((min(ax0, bx0), min(ay0, by0), max(ax1, bx1), max(ay1, by1)), am + bm)
                    del groups[b]
                    merged = True
                    break
            if merged:
                break
    return groups
