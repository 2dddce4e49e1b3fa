"""Alignment: template, similarity fit, region-limited crops, and the torch path against OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.faces import align
from gpen_video.faces.align import (
    align_faces,
    align_faces_torch,
    similarity_transform,
    source_region,
    template,
)
from gpen_video.records import TrackedFace
from tests.devices import DEVICES
from tests.geometry import apply, similarity


def face_from_landmarks(lm: np.ndarray, frame_index: int = 0, track_id: int = 0) -> TrackedFace:
    pad = 0.8 * np.ptp(lm[:, 0])
    box = np.r_[lm.min(0) - pad, lm.max(0) + pad].astype(np.float32)
    return TrackedFace(track_id, frame_index, box, None, lm.astype(np.float32), None)


def frame_u8(height: int = 300, width: int = 400) -> np.ndarray:
    return cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA)


def test_template_is_gpen_512_scaled_linearly() -> None:
    t512 = template(512)
    assert t512.shape == (5, 2)
    np.testing.assert_allclose(t512[0], [202.041, 242.884])
    np.testing.assert_allclose(t512[4], [300.891, 366.336])
    np.testing.assert_allclose(template(256) * 2, t512)
    np.testing.assert_allclose(template(1024) / 2, t512)
    # left eye left of right eye, mouth below nose below eyes, symmetric about the centre
    assert t512[0, 0] < t512[1, 0] and t512[0, 1] < t512[2, 1] < t512[3, 1]
    assert abs((t512[0, 0] + t512[1, 0]) / 2 - 256) < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_similarity_recovers_known_transform(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = similarity(rng.uniform(0.2, 5), rng.uniform(-180, 180), *rng.uniform(-500, 500, 2))
    src = rng.uniform(0, 300, (5, 2))
    got = similarity_transform(src, apply(truth, src))
    np.testing.assert_allclose(got, truth, atol=1e-8)
    cv_fit, _ = cv2.estimateAffinePartial2D(src, apply(truth, src), method=cv2.LMEDS)
    np.testing.assert_allclose(got, cv_fit, rtol=1e-5, atol=1e-4)  # LMEDS refines less precisely


@pytest.mark.parametrize("seed", range(5))
def test_similarity_is_the_least_squares_fit(seed: int) -> None:
    """With noise: equal to the linear least-squares fit over (a, b, tx, ty) of [[a, −b], [b, a]]."""
    rng = np.random.default_rng(100 + seed)
    src = rng.uniform(0, 100, (5, 2))
    dst = apply(similarity(1.7, 20, 30, -5), src) + rng.normal(0, 3, (5, 2))
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)
    np.testing.assert_allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_similarity_never_reflects() -> None:
    src = template(512)
    mirrored = src * [-1, 1]
    got = similarity_transform(src, mirrored)
    assert np.linalg.det(got[:, :2]) > 0


@pytest.mark.parametrize(
    "src, dst, error",
    [
        (np.zeros((5, 3)), np.zeros((5, 2)), "src must have shape"),
        (np.zeros((5, 2)), np.zeros((4, 2)), "dst must have shape"),
        (np.ones((5, 2)), np.zeros((5, 2)), "must not all coincide"),
        (np.ones((1, 2)), np.zeros((1, 2)), "at least 2"),
    ],
)
def test_similarity_rejects_bad_input(src: np.ndarray, dst: np.ndarray, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        similarity_transform(src, dst)


# faces: (scale of the crop relative to the frame, angle, where the face centre sits)
PLACEMENTS = {
    "inside": (2.5, 10.0, (200.0, 140.0)),
    "small": (5.0, -25.0, (120.0, 200.0)),
    "large": (0.6, 5.0, (200.0, 150.0)),
    "left-edge": (2.0, 15.0, (10.0, 150.0)),
    "corner": (2.0, -30.0, (395.0, 295.0)),
    "mostly-out": (3.0, 0.0, (-60.0, 50.0)),
}


def crop_affine(name: str, size: int) -> np.ndarray:
    """A frame → crop similarity putting the crop centre on the placement's face centre."""
    scale, angle, (cx, cy) = PLACEMENTS[name]
    s = scale * size / 256
    m = similarity(s, angle, 0, 0)
    m[:, 2] = np.array([size / 2 - 0.5, size / 2 - 0.5]) - m[:, :2] @ np.array([cx, cy])
    return m


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_region_crop_equals_whole_frame_warp(name: str, dtype: type) -> None:
    frame = frame_u8().astype(dtype) * (257 if dtype == np.uint16 else 1)
    size = 256
    affine = crop_affine(name, size)
    whole = cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    got = align.warp_crop(frame, affine, size)
    assert got.dtype == dtype and got.shape == (size, size, 3)
    diff = np.abs(got.astype(np.int64) - whole)
    # OpenCV rounds sample positions to 1/32 px from the matrix it is given (and 16-bit
    # weights in float); shifting the matrix to the region can flip that rounding for a few
    # samples: one 8-bit level, or a few 16-bit levels (1/65 of an 8-bit one).
    if dtype == np.uint8:
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    else:
        assert diff.max() <= 4 and (diff > 0).mean() < 0.1


def test_small_face_reads_only_its_region(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = np.zeros((1080, 1920, 3), np.uint8)
    seen: list[tuple[int, ...]] = []
    original = cv2.warpAffine

    def spy(src: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        seen.append(src.shape)
        return original(src, *args, **kwargs)

    monkeypatch.setattr(cv2, "warpAffine", spy)
    affine = similarity(4.0, 10, 0, 0)
    affine[:, 2] = [128 - 4 * 900, 128 - 4 * 500]
    align.warp_crop(frame, affine, 256)
    (shape,) = seen
    assert shape[0] * shape[1] < 100 * 100
    assert source_region(affine, 256, 1080, 1920)[2] <= 1920


def test_align_faces_maps_landmarks_onto_template() -> None:
    frame = frame_u8()
    truth = similarity(0.4, -12, 140, 70)  # crop 512 → frame
    lm = apply(truth, template(512))
    (aligned,) = align_faces(frame, [face_from_landmarks(lm)], 256)
    np.testing.assert_allclose(apply(aligned.affine, lm), template(256), atol=1e-3)
    assert aligned.crop.shape == (256, 256, 3) and aligned.crop.dtype == np.uint8
    whole = cv2.warpAffine(frame, aligned.affine, (256, 256), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    assert np.abs(aligned.crop.astype(int) - whole).max() <= 1


def test_align_faces_rejects_float_frames() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        align_faces(np.zeros((10, 10, 3), np.float32), [], 256)


def test_torch_path_matches_opencv() -> None:
    """Two frames, five faces (two at edges); float frames so only OpenCV's rounding differs."""
    rng = np.random.default_rng(3)
    frames = [frame_u8(), np.ascontiguousarray(frame_u8()[::-1, ::-1])]
    size = 128
    names = ["inside", "left-edge", "corner", "small", "mostly-out"]
    ids = [0, 0, 1, 1, 1]
    affines = np.stack([crop_affine(n, size) for n in names])
    affines[:, :, 2] += rng.uniform(-0.5, 0.5, (len(names), 2))
    tensor = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    got = align_faces_torch(tensor, ids, affines, size).permute(0, 2, 3, 1).numpy()
    assert got.shape == (5, size, size, 3)
    for k, (fid, affine) in enumerate(zip(ids, affines)):
        ref = align.warp_crop(frames[fid].astype(np.float32), affine, size)
        diff = np.abs(got[k] - ref)
        # OpenCV samples at positions rounded to 1/32 px; torch at exact ones.
        assert diff.max() < 4.0, names[k]
        assert diff.mean() < 0.1, names[k]




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float16, 0.5), (torch.bfloat16, 2.0)])
def test_torch_path_precision_and_device(device: str, dtype: torch.dtype, tol: float) -> None:
    """Against float32 on the CPU; fp16/bf16 only lose their storage precision (≤ half an ulp at 255)."""
    frames = torch.from_numpy(np.stack([frame_u8()])).permute(0, 3, 1, 2).float()
    affines = np.stack([crop_affine(n, 256) for n in ("inside", "corner", "mostly-out")])
    ref = align_faces_torch(frames, [0, 0, 0], affines, 256)
    got = align_faces_torch(frames.to(device, dtype), [0, 0, 0], affines, 256)
    assert got.dtype == dtype and got.device.type == device
    assert (got.float().cpu() - ref).abs().max() <= tol
