"""The fast warp: ``F.affine_grid`` + ``F.grid_sample`` on the restorer's device.

The frame is uploaded once (pinned, non-blocking on CUDA) and stays on the device between
crop and paste as its own integers: uint8, or int32 for 16-bit frames (4× smaller than
floats while it waits for its batch); a frame already there in that form (``DevicePicture``:
the upscaler's output on the same GPU) is not uploaded at all. Crops and pastes read and write
each face's region only, sample in float32 whatever the restorer's precision (an fp16 grid is
off by up to a quarter pixel in a 512 crop), and the pasted frame comes back to the host as
integers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.faces.align import (
    face_affine,
    invert_affine,
    overlap_groups,
    paste_region,
    shift_affine,
    source_region,
)
from gpen_video.faces.pictures import to_uint8
from gpen_video.records import Frame, TrackedFace, check_shape
from gpen_video.warp.protocol import SMALL_FACE, SMOOTH_KERNEL, FaceCrops, check_paste
from gpen_video.warp.masks import face_mask


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


def _grid(affine: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """[1,h,w,2] float32 sampling grid for a dst-pixel → src-pixel affine."""
    theta = torch.from_numpy(grid_theta(affine, src_hw, dst_hw)[None]).to(device=device, dtype=torch.float32)
    return F.affine_grid(theta, [1, 1, *dst_hw], align_corners=True)


def frame_peak(dtype: np.dtype) -> int:
    """Largest value of a frame dtype (255 for uint8, 65535 for uint16)."""
    return int(np.iinfo(dtype).max)


def held_dtype(dtype: np.dtype) -> torch.dtype:
    """The integers a frame of ``dtype`` is held in on the device: uint8 for uint8, int32 for uint16."""
    return torch.uint8 if np.dtype(dtype) == np.uint8 else torch.int32


def upload_frame(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8/uint16 frame → [3,H,W] uint8/int32 tensor on ``device``."""
    host = torch.from_numpy(rgb if rgb.dtype == np.uint8 else rgb.astype(np.int32))
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True).permute(2, 0, 1)  # [3HW]


def download_frame(held: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """[3,H,W] held frame → (H, W, 3) host RGB of ``dtype``: ``upload_frame`` undone."""
    return held.permute(1, 2, 0).cpu().numpy().astype(dtype)  # [HW3]


class DevicePicture:
    """A frame's pixels left on the device in the form the torch warp holds them, carried as
    ``Frame.source`` (a ``records.PixelSource``): the upscale stage's output on the warp's GPU.

    ``TorchWarp.crop`` takes ``tensor`` as it is, so an enlarged frame with faces never visits
    the host before its paste; the host RGB is downloaded only when something reads it (a frame
    without faces, on its way to the writer). It is not a decoder picture: the writer encodes
    such a frame from its RGB, as any frame without ``io.decode.SourcePicture``.

    Attributes:
        tensor: [3,H,W] uint8, or int32 for 16-bit frames (``held_dtype``).
        shape, dtype: those of ``rgb``, known without a download.
    """

    def __init__(self, tensor: torch.Tensor, dtype: np.dtype) -> None:
        check_shape("DevicePicture.tensor", tensor, (3, None, None))
        if tensor.dtype != held_dtype(dtype):
            raise ValueError(f"DevicePicture.tensor must be {held_dtype(dtype)} for {np.dtype(dtype).name} frames, "
                             f"got {tensor.dtype}")
        self.tensor = tensor
        self.shape = (int(tensor.shape[1]), int(tensor.shape[2]), 3)
        self.dtype = np.dtype(dtype)
        self._rgb: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) the host RGB, downloaded once, on first read (the same array every time)."""
        with self._lock:
            if self._rgb is None:
                self._rgb = download_frame(self.tensor, self.dtype)
            return self._rgb

    @property
    def rgb_made(self) -> bool:
        return self._rgb is not None

    def scaled(self, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB, area-downscaled from ``rgb`` as ``faces.pictures`` does
        for a frame without a decoder picture."""
        return cv2.resize(to_uint8(self.rgb), (width, height), interpolation=cv2.INTER_AREA)


def held_frame(frame: Frame, device: torch.device) -> torch.Tensor:
    """``frame`` as [3,H,W] held integers on ``device``: a ``DevicePicture``'s own tensor
    (moved only if it is on another device), else its RGB uploaded."""
    if isinstance(frame.source, DevicePicture):
        return frame.source.tensor.to(device)
    return upload_frame(frame.rgb, device)


def crop_faces_torch(frame: torch.Tensor, affines: np.ndarray, size: int, *, peak: int) -> torch.Tensor:
    """Crop faces from one frame tensor: [M,3,S,S] float32 in [0, 1] on the frame's device.

    Bilinear with mirrored borders, as ``opencv_warp.warp_crop`` up to OpenCV's 1/32-pixel
    rounding; only each crop's source region is converted to float.

    Args:
        frame: [3,H,W] frame values in [0, peak], any dtype.
        affines: (M, 2, 3) maps from frame pixels to crop pixels.
        size: crop side S.
        peak: the value that maps to 1.
    """
    check_shape("frame", frame, (3, None, None))
    check_shape("affines", affines, (None, 2, 3))
    height, width = frame.shape[-2:]
    out = torch.empty((len(affines), 3, size, size), dtype=torch.float32, device=frame.device)  # [M3SS]
    for i, affine in enumerate(affines):
        x0, y0, x1, y1 = source_region(affine, size, height, width)
        sub = frame[None, :, y0:y1, x0:x1].float().div_(peak)  # [13hw]
        grid = _grid(invert_affine(shift_affine(affine, x0, y0)), (y1 - y0, x1 - x0), (size, size), frame.device)
        out[i] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    return out


def smooth_crops(crops: torch.Tensor) -> torch.Tensor:
    """The small-face 3×3 smoothing of [M,3,S,S] crops, borders mirrored (OpenCV's default)."""
    kernel = torch.from_numpy(SMOOTH_KERNEL).to(crops)[None, None].expand(3, 1, 3, 3)  # [3133]
    return F.conv2d(F.pad(crops, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)


def paste_faces_torch(
    frame: torch.Tensor,
    restored: torch.Tensor,
    affines: np.ndarray,
    *,
    peak: int,
    smooth: Sequence[bool],
    strength: float = 1.0,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blend restored crops back into a frame tensor; only the faces' regions are computed.

    Same blend as ``opencv_warp.paste_faces``: bicubic (A = −0.75, as OpenCV) for the image,
    bilinear for the mask, float32 sums, rounded and clipped to [0, peak] at the end.

    Args:
        frame: [3,H,W] integer frame values in [0, peak]; never modified.
        restored: [M,3,S,S] restored crops in [0, 1], any float dtype.
        affines: (M, 2, 3) maps from frame pixels to crop pixels.
        peak: the frame value of 1.0.
        smooth: (M,) whether each crop gets the small-face smoothing.
        strength: 0 keeps the frame, 1 uses the restored faces fully.
        masks: [M,S,S] masks in [0, 1]; default the plain ``face_mask(S)``.

    Returns:
        A new [3,H,W] tensor of ``frame``'s dtype.
    """
    check_shape("frame", frame, (3, None, None))
    if frame.is_floating_point():
        raise ValueError(f"frame must hold integers, got {frame.dtype}")
    m = len(affines)
    check_shape("restored", restored, (m, 3, None, None))
    size = restored.shape[-1]
    if masks is not None:
        check_shape("masks", masks, (m, size, size))
    out = frame.clone()
    if strength == 0.0 or m == 0:
        return out
    height, width = frame.shape[-2:]
    crops = restored.float() * peak  # [M3SS]
    which = [i for i, s in enumerate(smooth) if s]
    if which:
        crops[which] = smooth_crops(crops[which])
    if masks is None:
        masks = torch.from_numpy(face_mask(size).copy()).to(frame.device)[None].expand(m, size, size)
    masks = masks.float().clamp(0.0, 1.0)

    regions, faces = [], []
    for i in range(m):
        region = paste_region(affines[i], size, height, width)
        if region is not None:
            regions.append(region)
            faces.append(i)
    for (gx0, gy0, gx1, gy1), members in overlap_groups(regions):
        orig = frame[:, gy0:gy1, gx0:gx1]  # [3hw]
        weighted = torch.zeros(orig.shape, dtype=torch.float32, device=frame.device)
        weight = torch.zeros((1, gy1 - gy0, gx1 - gx0), dtype=torch.float32, device=frame.device)
        for k in members:
            i = faces[k]
            x0, y0, x1, y1 = regions[k]
            grid = _grid(shift_affine(affines[i], x0, y0), (size, size), (y1 - y0, x1 - x0), frame.device)  # [1hw2]
            face = F.grid_sample(crops[i : i + 1], grid, mode="bicubic", padding_mode="border", align_corners=True)
            mk = F.grid_sample(masks[i][None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            w = mk[0] * strength  # [1hw]
            weighted[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] += w * face[0]
            weight[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] += w
        blended = weighted / weight.clamp(min=1.0) + (1.0 - weight.clamp(max=1.0)) * orig.float()
        blended = blended.round_().clamp_(0, peak).to(frame.dtype)
        out[:, gy0:gy1, gx0:gx1] = torch.where(weight > 0, blended, orig)
    return out


class TorchWarp:
    """The fast ``Warp``: crops and pastes with ``grid_sample`` on ``device``.

    Args:
        size: crop side S.
        device: where frames are held and crops made (the restorer's device).
    """

    def __init__(self, size: int, *, device: torch.device | str = "cpu") -> None:
        self.size = size
        self.device = torch.device(device)
        self.hold_device: torch.device | None = self.device
        self._plain_mask = torch.from_numpy(face_mask(size).copy()).to(self.device)  # [SS]

    def crop(self, frame: Frame, faces: Sequence[TrackedFace]) -> FaceCrops:
        faces = tuple(faces)
        size = self.size
        if not faces:
            empty = torch.empty((0, 3, size, size), dtype=torch.float32, device=self.device)
            return FaceCrops(frame, faces, np.zeros((0, 2, 3)), empty)
        affines = np.stack([face_affine(f.landmarks, size) for f in faces])
        held = held_frame(frame, self.device)
        pixels = crop_faces_torch(held, affines, size, peak=frame_peak(frame.dtype))
        return FaceCrops(frame, faces, affines, pixels, held)

    def paste(
        self, crops: FaceCrops, restored: torch.Tensor, *, strength: float, masks: np.ndarray | None = None
    ) -> Frame:
        check_paste(crops, restored, strength, masks)
        frame = crops.frame
        if strength == 0.0 or not len(crops):
            return frame
        if crops.held is None:
            raise ValueError("these crops were not made by a TorchWarp (no frame held on the device)")
        if masks is None:
            masks_t = self._plain_mask[None].expand(len(crops), self.size, self.size)
        else:
            masks_t = torch.from_numpy(np.asarray(masks, np.float32)).to(self.device)
        out = paste_faces_torch(
            crops.held,
            restored.to(self.device),
            crops.affines,
            peak=frame_peak(frame.dtype),
            smooth=[f.size < SMALL_FACE for f in crops.faces],
            strength=strength,
            masks=masks_t,
        )
        # a decoder picture stays for the writer's splice; a device one is spent, and its memory freed
        source = None if isinstance(frame.source, DevicePicture) else frame.source
        return replace(frame, rgb=download_frame(out, frame.dtype), source=source)

    def held_bytes(self, height: int, width: int, dtype: np.dtype) -> int:
        return height * width * 3 * (1 if np.dtype(dtype) == np.uint8 else 4)
