"""Paste restored face crops back into their frame without seams.

Per face, the restored crop (optionally smoothed for small faces) and its mask are
inverse-warped into the face's bounding region of the frame only (bicubic image, bilinear
mask). Faces are then combined with a normalised weighted average:

    w_i = strength · m_i,   W = Σ w_i
    out = Σ w_i·f_i / max(1, W) + (1 − min(1, W)) · orig

For one face this is the original demo's ``m·f + (1 − m)·orig``. Where faces overlap
it is a mask-weighted average of them, which is continuous in every mask, so no seam
appears where one mask overtakes another (the demo keeps the face with the larger mask
per pixel, which steps where the masks cross). ``strength`` scales the mask instead of
blending the restored crop with a resampled copy of the original crop as the demo does:
the faded-out part is then the untouched frame, so strength 0 returns the input exactly.
Pixels where every mask is zero are copied from the input bit for bit.

Two paths: ``paste_faces`` (reference, OpenCV, numpy frames) and ``paste_faces_torch``
(fast, any device, tensors).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.faces.align import grid_theta, invert_affine, shift_affine
from gpen_video.errors import WeightsError
from gpen_video.records import AlignedFace, check_shape

log = logging.getLogger(__name__)

SMALL_FACE = 100
"""Faces whose box's shorter side is under this many pixels get their restored crop smoothed."""

_SMOOTH_KERNEL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]).astype(np.float32) / 16.0
_CUBIC_MARGIN = 3
"""Frame pixels added around a face's box so bicubic reads and mask tails are covered."""

PARSE_SIZE = 512
"""Input side of the face parser (its checkpoint is built for 512×512)."""

FACE_LABELS = tuple(range(1, 13))
"""Parser labels kept as face: skin, nose, glasses, eyes, brows, ears, mouth, lips (GPEN's map).

Labels 0 background, 13 hair, 14 hat, 15 earring, 16 necklace, 17 neck, 18 cloth are left
as they were: GPEN restores faces, and hair or clothes pasted from a 512 crop flicker.
"""


# ---------------------------------------------------------------------------- masks


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


# ---------------------------------------------------------------------------- regions


def paste_region(affine: np.ndarray, size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Frame region (x0, y0, x1, y1), end-exclusive, a crop covers when pasted; None if none.

    ``affine`` maps frame pixels to crop pixels; the crop square [−0.5, S − 0.5]² is mapped
    back and widened by a few pixels for bicubic support.
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


def _clusters(boxes: list[tuple[int, int, int, int]]) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Group boxes whose hulls overlap: each group's hull, and its members, disjoint hulls."""
    groups = [(box, [i]) for i, box in enumerate(boxes)]
    merged = True
    while merged:
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                (ax0, ay0, ax1, ay1), am = groups[a]
                (bx0, by0, bx1, by1), bm = groups[b]
                if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                    hull = (min(ax0, bx0), min(ay0, by0), max(ax1, bx1), max(ay1, by1))
                    groups[a] = (hull, am + bm)
                    del groups[b]
                    merged = True
                    break
            if merged:
                break
    return groups


# ---------------------------------------------------------------------------- reference path


def _dtype_max(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max)


def paste_faces(
    rgb: np.ndarray,
    aligned: Sequence[AlignedFace],
    restored: Sequence[np.ndarray],
    *,
    strength: float = 1.0,
    masks: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Blend restored crops back into a frame (reference path, OpenCV).

    Args:
        rgb: (H, W, 3) RGB frame, uint8 or uint16; never modified.
        aligned: the crops' records (their ``affine`` maps frame pixels to crop pixels and
            their ``face.size`` decides the small-face smoothing).
        restored: (S, S, 3) restored crops, same dtype as ``rgb``, one per aligned face.
        strength: 0 keeps the frame, 1 uses the restored faces fully.
        masks: (S, S) float masks in [0, 1] per face; default the plain ``face_mask(S)``.

    Returns:
        A new (H, W, 3) frame of ``rgb``'s dtype; pixels no mask touches equal ``rgb``'s.

    Example:
        >>> out = paste_faces(frame.rgb, aligned, gpen(crops), strength=0.8)  # doctest: +SKIP
    """
    check_shape("rgb", rgb, (None, None, 3))
    if rgb.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"rgb must be uint8 or uint16, got {rgb.dtype}")
    if len(restored) != len(aligned):
        raise ValueError(f"got {len(restored)} restored crops for {len(aligned)} aligned faces")
    if masks is not None and len(masks) != len(aligned):
        raise ValueError(f"got {len(masks)} masks for {len(aligned)} aligned faces")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    out = rgb.copy()
    if strength == 0.0 or not aligned:
        return out
    height, width = rgb.shape[:2]

    regions: list[tuple[int, int, int, int]] = []
    faces: list[int] = []
    for i, (face, crop) in enumerate(zip(aligned, restored)):
        size = crop.shape[0]
        check_shape(f"restored[{i}]", crop, (size, size, 3))
        if crop.dtype != rgb.dtype:
            raise ValueError(f"restored[{i}] must have the frame's dtype {rgb.dtype}, got {crop.dtype}")
        region = paste_region(face.affine, size, height, width)
        if region is not None:
            regions.append(region)
            faces.append(i)

    top = _dtype_max(rgb.dtype)
    for (gx0, gy0, gx1, gy1), members in _clusters(regions):
        orig = rgb[gy0:gy1, gx0:gx1].astype(np.float32)  # [hw3]
        weighted = np.zeros_like(orig)
        weight = np.zeros(orig.shape[:2], np.float32)
        for k in members:
            i = faces[k]
            x0, y0, x1, y1 = regions[k]
            crop = restored[i]
            size = crop.shape[0]
            if aligned[i].face.size < SMALL_FACE:
                crop = cv2.filter2D(crop, -1, _SMOOTH_KERNEL)
            mask = face_mask(size) if masks is None else np.asarray(masks[i], np.float32)
            check_shape(f"masks[{i}]", mask, (size, size))
            into = shift_affine(aligned[i].affine, x0, y0)
            dsize = (x1 - x0, y1 - y0)
            face = cv2.warpAffine(
                crop, into, dsize, flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
            )
            m = cv2.warpAffine(
                mask, into, dsize, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT
            )
            w = np.clip(m, 0.0, 1.0) * np.float32(strength)  # [hw]
            sl = (slice(y0 - gy0, y1 - gy0), slice(x0 - gx0, x1 - gx0))
            weighted[sl] += w[..., None] * face.astype(np.float32)
            weight[sl] += w
        total = weight[..., None]
        blended = weighted / np.maximum(total, 1.0) + (1.0 - np.minimum(total, 1.0)) * orig
        blended = np.clip(np.rint(blended), 0.0, top).astype(rgb.dtype)
        out[gy0:gy1, gx0:gx1] = np.where(total > 0, blended, rgb[gy0:gy1, gx0:gx1])
    return out


# ---------------------------------------------------------------------------- fast path


def paste_faces_torch(
    frame: torch.Tensor,
    crops: torch.Tensor,
    affines: np.ndarray | torch.Tensor,
    masks: torch.Tensor | None = None,
    strength: float = 1.0,
    *,
    smooth: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Blend restored crops back into a frame tensor (fast path; ``paste_faces`` is the reference).

    Same blend as ``paste_faces`` with ``F.grid_sample`` over each face's region: bicubic
    (A = −0.75, as OpenCV) for the image, bilinear for the mask. Not rounded or clipped: the
    result stays in the frame's float range (bicubic overshoot included) until the caller
    converts it.

    Args:
        frame: [3,H,W] float frame; never modified.
        crops: [M,3,S,S] restored crops in the frame's value range.
        affines: (M, 2, 3) maps from frame pixels to crop pixels.
        masks: [M,S,S] masks in [0, 1]; default the plain ``face_mask(S)``.
        strength: 0 keeps the frame, 1 uses the restored faces fully.
        smooth: (M,) whether to apply the small-face 3×3 smoothing to each crop.

    Returns:
        A new [3,H,W] tensor.
    """
    if frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"frame must have shape (3, H, W), got {tuple(frame.shape)}")
    if not frame.is_floating_point():
        raise ValueError(f"frame must be a floating-point tensor, got {frame.dtype}")
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must have shape (M, 3, S, S), got {tuple(crops.shape)}")
    n, size = crops.shape[0], crops.shape[-1]
    affines = np.asarray(affines.cpu() if isinstance(affines, torch.Tensor) else affines, np.float64)
    check_shape("affines", affines, (n, 2, 3))
    if masks is not None and tuple(masks.shape) != (n, size, size):
        raise ValueError(f"masks must have shape ({n}, {size}, {size}), got {tuple(masks.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    out = frame.clone()
    if strength == 0.0 or n == 0:
        return out
    height, width = frame.shape[-2:]
    # Sampling grids and sums stay float32 whatever the frame's dtype: an fp16 grid is off
    # by up to a quarter pixel in a 512 crop.
    crops = crops.float()
    if smooth is not None:
        which = [i for i, s in enumerate(smooth) if s]
        if which:
            kernel = torch.from_numpy(_SMOOTH_KERNEL).to(crops)[None, None].expand(3, 1, 3, 3)
            picked = F.pad(crops[which], (1, 1, 1, 1), mode="reflect")  # reflect = OpenCV's REFLECT_101
            crops = crops.clone()
            crops[which] = F.conv2d(picked, kernel, groups=3)
    if masks is None:
        masks = torch.from_numpy(face_mask(size).copy()).to(crops.device)[None].expand(n, size, size)
    masks = masks.float().clamp(0.0, 1.0)

    regions, faces = [], []
    for i in range(n):
        region = paste_region(affines[i], size, height, width)
        if region is not None:
            regions.append(region)
            faces.append(i)
    for (gx0, gy0, gx1, gy1), members in _clusters(regions):
        orig = frame[:, gy0:gy1, gx0:gx1]  # [3hw]
        weighted = orig.new_zeros(orig.shape, dtype=torch.float32)
        weight = orig.new_zeros((1, gy1 - gy0, gx1 - gx0), dtype=torch.float32)
        for k in members:
            i = faces[k]
            x0, y0, x1, y1 = regions[k]
            theta = grid_theta(shift_affine(affines[i], x0, y0), (size, size), (y1 - y0, x1 - x0))
            theta_t = torch.from_numpy(theta[None]).to(device=frame.device, dtype=torch.float32)
            grid = F.affine_grid(theta_t, [1, 1, y1 - y0, x1 - x0], align_corners=True)  # [1hw2]
            face = F.grid_sample(crops[i : i + 1], grid, mode="bicubic", padding_mode="border", align_corners=True)
            m = F.grid_sample(masks[i][None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            w = m[0] * strength  # [1hw]
            weighted[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] += w * face[0]
            weight[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] += w
        blended = weighted / weight.clamp(min=1.0) + (1.0 - weight.clamp(max=1.0)) * orig.float()
        out[:, gy0:gy1, gx0:gx1] = torch.where(weight > 0, blended.to(frame.dtype), orig)
    return out


# ---------------------------------------------------------------------------- parsing mask


def _parse_net() -> torch.nn.Module:
    """GPEN's ``ParseNet-latest`` architecture (PSFRGAN's parser; facexlib has the same layout)."""
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(
        in_size=PARSE_SIZE,
        out_size=PARSE_SIZE,
        min_feat_size=32,
        base_ch=64,
        parsing_ch=19,
        res_depth=10,
        relu_type="LeakyReLU",
        norm_type="bn",
        ch_range=[32, 256],
    )


@dataclass
class ParseStats:
    crops: int = 0
    batches: int = 0


class ParsingMasker:
    """Face-parsing masks for ``--mask parse``: only the face's own pixels are blended.

    Runs GPEN's parser (``ParseNet-latest.pth``) on restored crops at 512×512, keeps the
    labels in ``FACE_LABELS``, then applies the plain mask's border treatment. Against the
    plain square it keeps hair, background and collars from being replaced; it costs one
    parser pass per face (469 GFLOP at 512, more than GPEN-BFR-512's 276) and a weights download.

    Args:
        path: a local ``ParseNet-latest.pth``; when None the weights are resolved (and
            downloaded unless ``offline``) through ``gpen_video.restore.weights``.
        device: where the parser runs.
        cache_dir: weights cache directory (None: the default).
        offline: never download.
        progress: show a download progress bar.
        batch_size: crops per parser call. Higher: faster on GPUs, more memory.
        input_size: side the crops are resized to for the parser (fully convolutional). It
            was trained at 512; smaller is quadratically faster and coarser.

    Example:
        >>> masker = ParsingMasker(path="ParseNet-latest.pth")  # doctest: +SKIP
        >>> masks = masker.masks(restored_crops)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        offline: bool = False,
        mirror: str | None = None,
        progress: bool = False,
        batch_size: int = 4,
        input_size: int = PARSE_SIZE,
    ) -> None:
        from gpen_video.restore.weights import resolve_weights

        file = Path(
            resolve_weights(
                "ParseNet", path=path, cache_dir=cache_dir, offline=offline, progress=progress, mirror=mirror
            )
        )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(
                f"face parser weights {file} cannot be read ({exc}); delete the file and download it again"
            ) from None
        net = _parse_net()
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise WeightsError(
                f"{file} is not a ParseNet-latest checkpoint ({first}); pass the parser from GPEN's weights"
            ) from None
        self._setup(net, device, batch_size, input_size)
        log.info("face parser loaded from %s", file)

    @classmethod
    def from_network(
        cls,
        net: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        input_size: int = PARSE_SIZE,
    ) -> "ParsingMasker":
        """A masker around a ready module mapping [N,3,L,L] in [−1, 1] to (logits [N,19,L,L], …)."""
        masker = cls.__new__(cls)
        masker._setup(net, device, batch_size, input_size)
        return masker

    def _setup(self, net: torch.nn.Module, device: str | torch.device, batch_size: int, input_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if input_size < 32 or input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
        self.input_size = input_size
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size
        self.stats = ParseStats()

    @torch.inference_mode()
    def labels(self, crops: np.ndarray) -> np.ndarray:
        """Parser labels (M, L, L) uint8, L = ``input_size``, for (M, S, S, 3) RGB crops (uint8 or uint16)."""
        check_shape("crops", crops, (None, None, None, 3))
        if crops.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"crops must be uint8 or uint16, got {crops.dtype}")
        top = _dtype_max(crops.dtype)
        side = self.input_size
        out = np.empty((len(crops), side, side), np.uint8)
        for start in range(0, len(crops), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_size]))
            x = chunk.to(self.device).permute(0, 3, 1, 2).float() * (2.0 / top) - 1.0  # [N3SS]
            if x.shape[-1] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            logits = self.net(x)[0]  # [N,19,L,L]
            out[start : start + len(chunk)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            self.stats.batches += 1
        self.stats.crops += len(crops)
        return out

    def masks(self, crops: np.ndarray) -> np.ndarray:
        """Blend masks (M, S, S) float32 in [0, 1] for restored crops (M, S, S, 3) RGB."""
        size = crops.shape[1]
        check_shape("crops", crops, (None, size, size, 3))
        out = np.empty((len(crops), size, size), np.float32)
        for i, labels in enumerate(self.labels(crops)):
            out[i] = labels_to_mask(labels, size)
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
