"""Face geometry: template, similarity fit, face affines, crop and paste regions, overlap groups.

The crops and pastes themselves are tested in test_warp.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from gpen_video.faces.align import (
    face_affine,
    invert_affine,
    overlap_groups,
    paste_region,
    shift_affine,
    similarity_transform,
    source_region,
    template,
)
from tests.geometry import apply, similarity


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


def test_face_affine_maps_landmarks_onto_the_template() -> None:
    truth = similarity(0.4, -12, 140, 70)  # crop 512 → frame
    lm = apply(truth, template(512))
    affine = face_affine(lm, 256)
    np.testing.assert_allclose(apply(affine, lm), template(256), atol=1e-9)
    with pytest.raises(ValueError, match=r"landmarks must have shape \(5, 2\)"):
        face_affine(np.zeros((4, 2)), 256)


def test_invert_and_shift() -> None:
    a = similarity(1.7, 33, 12, -4)
    pts = np.random.default_rng(0).uniform(-50, 50, (6, 2))
    np.testing.assert_allclose(apply(invert_affine(a), apply(a, pts)), pts, atol=1e-9)
    np.testing.assert_allclose(apply(shift_affine(a, 7, -3), pts), apply(a, pts + [7, -3]), atol=1e-9)


def sampled_pixels(affine: np.ndarray, size: int) -> np.ndarray:
    """Every frame pixel a bilinear crop reads, mirrored into the frame as REFLECT_101 does."""
    ys, xs = np.mgrid[0:size, 0:size]
    pts = apply(invert_affine(affine), np.c_[xs.ravel(), ys.ravel()].astype(np.float64))
    return np.concatenate([np.floor(pts), np.floor(pts) + 1]).astype(int)


def mirror(v: np.ndarray, length: int) -> np.ndarray:
    period = 2 * (length - 1)
    v = np.abs(v) % period
    return np.where(v > length - 1, period - v, v)


@pytest.mark.parametrize(
    "affine",
    [similarity(2.5, 10, -300, -200), similarity(2.0, -30, -640, -420), similarity(3.0, 0, 300, -40),
     similarity(0.5, 5, 10, 10)],
    ids=["inside", "corner", "mostly-out", "larger-than-frame"],
)
def test_source_region_covers_every_read(affine: np.ndarray) -> None:
    height, width, size = 300, 400, 128
    x0, y0, x1, y1 = source_region(affine, size, height, width)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    reads = sampled_pixels(affine, size)
    xs, ys = mirror(reads[:, 0], width), mirror(reads[:, 1], height)
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def test_paste_region_bounds_the_crop_and_is_none_outside() -> None:
    # the crop square [-0.5, 63.5]² lands on frame x in [49.5, 113.5], y in [19.5, 83.5];
    # the region adds a 3-pixel bicubic margin on each side, end-exclusive
    affine = similarity(1.0, 0, -50, -20)
    assert paste_region(affine, 64, 200, 300) == (46, 16, 118, 88)
    assert paste_region(affine, 64, 60, 300) == (46, 16, 118, 60)  # clipped to the frame
    assert paste_region(similarity(1.0, 0, 500, 500), 64, 200, 300) is None


def test_overlap_groups_are_disjoint_and_cover_their_members() -> None:
    rng = np.random.default_rng(5)
    boxes = []
    for _ in range(12):
        x, y = rng.integers(0, 300, 2)
        w, h = rng.integers(5, 60, 2)
        boxes.append((int(x), int(y), int(x + w), int(y + h)))
    groups = overlap_groups(boxes)
    assert sorted(i for _, members in groups for i in members) == list(range(12))
    for a, (ga, ma) in enumerate(groups):
        for i in ma:
            bx0, by0, bx1, by1 = boxes[i]
            assert ga[0] <= bx0 and ga[1] <= by0 and bx1 <= ga[2] and by1 <= ga[3]
        for gb, _ in groups[a + 1:]:
            assert not (ga[0] < gb[2] and gb[0] < ga[2] and ga[1] < gb[3] and gb[1] < ga[3])
    assert overlap_groups([]) == []
