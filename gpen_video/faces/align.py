"""Cut each face out of its frame onto the GPEN five-point template.

Two paths compute the same crops:
- ``align_faces`` (reference, CPU): OpenCV bilinear warps, each read from the small part of
  the frame the crop actually covers, never from a warp of the whole frame.
- ``align_faces_torch`` (fast, any device): ``F.affine_grid`` + ``F.grid_sample`` on frames
  that are already tensors, for GPU pipelines; also reads only each crop's region.

Pixels of a crop that fall outside the frame are filled by mirroring the frame at its edge
(OpenCV's BORDER_REFLECT_101, ``np.pad(mode="reflect")``). The original demo fills them with
black; a hard black band inside the crop is something GPEN never saw in training (FFHQ crops
are reflect-padded at image edges) and it bleeds dark smears into the visible part of faces
at frame edges. Mirrored pixels keep the crop natural; they land outside the frame again
when the face is pasted back, so they are never shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.records import AlignedFace, TrackedFace, check_shape

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

_BORDER = cv2.BORDER_REFLECT_101
_LINEAR_MARGIN = 2
"""Source pixels read around a bilinear sample's preimage box (1 needed, 1 for rounding)."""


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


def source_region(affine: np.ndarray, size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The frame region (x0, y0, x1, y1), end-exclusive, a bilinear crop warp reads from."""
    x_min, y_min, x_max, y_max = crop_preimage_box(affine, size)
    x0, x1 = _reflect_span(
        math.floor(x_min) - _LINEAR_MARGIN, math.ceil(x_max) + _LINEAR_MARGIN, width
    )
    y0, y1 = _reflect_span(
        math.floor(y_min) - _LINEAR_MARGIN, math.ceil(y_max) + _LINEAR_MARGIN, height
    )
    return x0, y0, x1 + 1, y1 + 1


def warp_crop(rgb: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """One (size, size, C) bilinear crop of ``rgb`` under ``affine`` (frame → crop pixels).

    Reads only the sub-image the crop covers; equal to a whole-frame ``cv2.warpAffine``.
    """
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = source_region(affine, size, height, width)
    sub = rgb[y0:y1, x0:x1]
    inv = invert_affine(shift_affine(affine, x0, y0))
    return cv2.warpAffine(
        sub, inv, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=_BORDER
    )


def face_affine(landmarks: np.ndarray, size: int) -> np.ndarray:
    """(2, 3) float64 similarity mapping frame pixels to a ``size`` crop for five landmarks."""
    check_shape("landmarks", np.asarray(landmarks), (5, 2))
    return similarity_transform(landmarks, template(size))


def align_faces(rgb: np.ndarray, faces: Sequence[TrackedFace], size: int) -> list[AlignedFace]:
    """Crop every face of one frame onto the GPEN template (reference path).

    Args:
        rgb: (H, W, 3) RGB frame, uint8 or uint16.
        faces: the faces of this frame; their ``landmarks`` drive the alignment.
        size: crop side S in pixels (the restorer's input size).

    Returns:
        One AlignedFace per face, in order: crop (S, S, 3) of the frame's dtype and the
        affine (2, 3) mapping frame pixels to crop pixels.

    Example:
        >>> aligned = align_faces(frame.rgb, faces, 512)  # doctest: +SKIP
    """
    check_shape("rgb", rgb, (None, None, 3))
    if rgb.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"rgb must be uint8 or uint16, got {rgb.dtype}")
    out = []
    for face in faces:
        affine = face_affine(face.landmarks, size)
        out.append(AlignedFace(face=face, crop=warp_crop(rgb, affine, size), affine=affine))
    return out


def _to_norm(height: int, width: int) -> np.ndarray:
    """3×3 map from pixel coordinates to ``align_corners=True`` grid coordinates.

    With ``align_corners=True`` −1 and +1 are the centres of the first and last pixels, which
    is OpenCV's convention (integer coordinates at pixel centres).
    """
    sx = 2.0 / (width - 1) if width > 1 else 1.0
    sy = 2.0 / (height - 1) if height > 1 else 1.0
    return np.array([[sx, 0.0, -1.0], [0.0, sy, -1.0], [0.0, 0.0, 1.0]])


def grid_theta(affine: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """``F.affine_grid`` theta (2, 3), align_corners=True, for a dst-pixel → src-pixel affine.

    Args:
        affine: (2, 3) map from destination pixels to source pixels.
        src_hw: (H, W) of the image sampled from.
        dst_hw: (H, W) of the output grid.
    """
    full = np.vstack([np.asarray(affine, np.float64), [0.0, 0.0, 1.0]])
    return (_to_norm(*src_hw) @ full @ np.linalg.inv(_to_norm(*dst_hw)))[:2]


def align_faces_torch(
    frames: torch.Tensor,
    frame_ids: Sequence[int] | torch.Tensor,
    affines: np.ndarray | torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Crop faces from frames already on a device (fast path; ``align_faces`` is the reference).

    Bilinear sampling with mirrored borders, matching ``align_faces`` up to OpenCV's 1/32-pixel
    coordinate rounding. Like the reference it reads only each crop's source region, and it
    samples in float32 whatever the frames' dtype (an fp16 grid would be off by up to a pixel).

    Args:
        frames: [N,3,H,W] floating-point frames.
        frame_ids: (M,) index into ``frames`` of each face.
        affines: (M, 2, 3) maps from frame pixels to crop pixels.
        size: crop side S.

    Returns:
        [M,3,S,S] crops, dtype and device of ``frames``.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must have shape (N, 3, H, W), got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"frames must be a floating-point tensor, got {frames.dtype}")
    affines = np.asarray(affines.cpu() if isinstance(affines, torch.Tensor) else affines, np.float64)
    ids = np.asarray(frame_ids.cpu() if isinstance(frame_ids, torch.Tensor) else frame_ids, np.int64)
    check_shape("affines", affines, (None, 2, 3))
    check_shape("frame_ids", ids, (len(affines),))
    height, width = frames.shape[-2:]
    out = frames.new_empty((len(affines), 3, size, size))  # [M3SS]
    for i, (fid, affine) in enumerate(zip(ids, affines)):
        x0, y0, x1, y1 = source_region(affine, size, height, width)
        sub = frames[int(fid) : int(fid) + 1, :, y0:y1, x0:x1].float()  # [13hw]
        theta = grid_theta(invert_affine(shift_affine(affine, x0, y0)), (y1 - y0, x1 - x0), (size, size))
        theta_t = torch.from_numpy(theta[None]).to(device=frames.device, dtype=torch.float32)
        grid = F.affine_grid(theta_t, [1, 3, size, size], align_corners=True)  # [1SS2]
        out[i] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    return out
