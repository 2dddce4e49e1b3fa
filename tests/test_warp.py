"""Crop and paste: masks, the OpenCV reference, the torch warp, and the two against each other."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.faces.align import overlap_groups, paste_region, source_region, template
from gpen_video.records import Frame, TrackedFace
from gpen_video.restore.model import build_model
from gpen_video.restore.restorer import Restorer
from gpen_video.warp import FaceCrops, create_warp
from gpen_video.warp.masks import face_mask, labels_to_mask
from gpen_video.warp.opencv_warp import OpenCVWarp, paste_faces, warp_crop
from gpen_video.warp.torch_warp import TorchWarp
from tests.clips import psnr
from tests.devices import DEVICES
from tests.geometry import apply, similarity

# The astronaut's five landmarks in skimage.data.astronaut() (512×512), read off the image:
# enough for geometry, which is what these tests are about.
ASTRONAUT_LANDMARKS = np.array([[200, 103], [246, 103], [223, 124], [205, 146], [243, 146]], np.float64)
KINDS = ["opencv", "torch"]


def tracked(lm: np.ndarray, box_side: float = 150.0) -> TrackedFace:
    centre = lm.mean(0)
    box = np.r_[centre - box_side / 2, centre + box_side / 2].astype(np.float32)
    return TrackedFace(0, 0, box, None, lm.astype(np.float32), None)


def face_at(affine: np.ndarray, size: int, box_side: float = 150.0) -> TrackedFace:
    """A face whose landmarks give exactly this frame → crop affine."""
    return tracked(apply(np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2], template(size)), box_side)


def as_frame(rgb: np.ndarray) -> Frame:
    return Frame(0, 0, 1, rgb)


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(M, S, S, 3) integer crops → [M,3,S,S] float32 in [0, 1]."""
    return torch.from_numpy(crops.astype(np.float32) / np.iinfo(crops.dtype).max).permute(0, 3, 1, 2)


def support(affine: np.ndarray, size: int, shape: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Whole-frame warp of the mask (an independent reference for where a face may touch)."""
    m = face_mask(size) if mask is None else mask
    return cv2.warpAffine(m, affine, shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def widen(rgb8: np.ndarray, dtype: type) -> np.ndarray:
    return rgb8.astype(dtype) * (257 if dtype == np.uint16 else 1)


@pytest.fixture(scope="module")
def astronaut_scene() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut placed in a 400×560 frame (scale 0.6, 12°, offset) and her landmarks there."""
    place = similarity(0.6, 12, 170, 40)
    frame = cv2.warpAffine(data.astronaut(), place, (560, 400), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    return frame, apply(place, ASTRONAUT_LANDMARKS)


def three_faces(frame: np.ndarray, lm: np.ndarray) -> list[TrackedFace]:
    """Two overlapping faces (one small, so smoothed) and one half past the right edge."""
    w = frame.shape[1]
    return [tracked(lm, 150), tracked(lm + [40, 10], 60), tracked(lm + [w - lm[:, 0].mean() - 5, 0], 150)]


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_face_mask_shape_values_symmetry(size: int) -> None:
    m = face_mask(size)
    assert m.shape == (size, size) and m.dtype == np.float32
    assert m[size // 2, size // 2] == pytest.approx(1.0, abs=1e-6)
    assert m.min() >= 0 and m.max() <= 1 + 1e-6
    for corner in (m[0, 0], m[0, -1], m[-1, 0], m[-1, -1]):
        assert corner < 1e-4
    np.testing.assert_allclose(m, m[::-1], atol=1e-6)
    np.testing.assert_allclose(m, m[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(m, m.T, atol=1e-6)
    row = m[size // 2, : size // 2]
    assert np.all(np.diff(row) >= -1e-7), "rises monotonically from the border to the centre"
    # the feather sits where the demo puts it: half height at the 26/512 inset
    assert m[size // 2, round(26 * size / 512)] == pytest.approx(0.5, abs=0.08)


def test_face_mask_is_cached_read_only_and_scales() -> None:
    assert face_mask(512) is face_mask(512)
    with pytest.raises(ValueError):
        face_mask(512)[0, 0] = 1
    small = cv2.resize(face_mask(512), (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(small - face_mask(256)).max() < 0.03


def test_parse_mask_border_treatment_matches_plain_mask() -> None:
    """All-skin labels give the plain feathered square."""
    m = labels_to_mask(np.ones((512, 512), np.int64), 512)
    np.testing.assert_allclose(m, face_mask(512), atol=1e-6)


# ---------------------------------------------------------------------------- OpenCV crop

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
    m = similarity(scale * size / 256, angle, 0, 0)
    m[:, 2] = np.array([size / 2 - 0.5, size / 2 - 0.5]) - m[:, :2] @ np.array([cx, cy])
    return m


def frame_u8(height: int = 300, width: int = 400) -> np.ndarray:
    return cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_region_crop_equals_whole_frame_warp(name: str, dtype: type) -> None:
    frame = widen(frame_u8(), dtype)
    size = 256
    affine = crop_affine(name, size)
    whole = cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    got = warp_crop(frame, affine, size)
    assert got.dtype == dtype and got.shape == (size, size, 3)
    diff = np.abs(got.astype(np.int64) - whole)
    # OpenCV rounds sample positions to 1/32 px from the matrix it is given (and 16-bit
    # weights in float); shifting the matrix to the region can flip that rounding for a few
    # samples: one 8-bit level, or a few 16-bit levels (1/65 of an 8-bit one).
    if dtype == np.uint8:
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    else:
        assert diff.max() <= 4 and (diff > 0).mean() < 0.1


def test_crop_reads_only_the_face_region(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = np.zeros((1080, 1920, 3), np.uint8)
    seen: list[tuple[int, ...]] = []
    original = cv2.warpAffine

    def spy(src: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        seen.append(src.shape)
        return original(src, *args, **kwargs)

    monkeypatch.setattr(cv2, "warpAffine", spy)
    affine = similarity(4.0, 10, 128 - 4 * 900, 128 - 4 * 500)
    OpenCVWarp(256).crop(as_frame(frame), [face_at(affine, 256)])
    (shape,) = seen
    assert shape[0] * shape[1] < 100 * 100
    assert source_region(affine, 256, 1080, 1920)[2] <= 1920


@pytest.mark.parametrize("kind", KINDS)
def test_crop_maps_landmarks_onto_the_template(kind: str) -> None:
    frame = frame_u8()
    truth = similarity(0.4, -12, 140, 70)  # crop 512 → frame
    lm = apply(truth, template(512))
    crops = create_warp(kind, size=256, device=torch.device("cpu")).crop(as_frame(frame), [tracked(lm)])
    assert isinstance(crops, FaceCrops) and len(crops) == 1
    np.testing.assert_allclose(apply(crops.affines[0], lm), template(256), atol=1e-3)
    assert crops.pixels.shape == (1, 3, 256, 256) and crops.pixels.dtype == torch.float32
    whole = cv2.warpAffine(frame, crops.affines[0], (256, 256), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    got = crops.pixels[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(got - whole).max() <= 4 and np.abs(got - whole).mean() < 0.6


@pytest.mark.parametrize("kind", KINDS)
def test_no_faces_gives_empty_crops_and_the_same_frame(kind: str) -> None:
    warp = create_warp(kind, size=64, device=torch.device("cpu"))
    frame = as_frame(frame_u8(50, 60))
    crops = warp.crop(frame, [])
    assert crops.pixels.shape == (0, 3, 64, 64) and crops.affines.shape == (0, 2, 3)
    assert warp.paste(crops, crops.pixels, strength=1.0) is frame


# ---------------------------------------------------------------------------- the two warps agree


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_crops_agree(dtype: type) -> None:
    """Faces inside, at edges, in a corner and mostly outside; uint8 and uint16 frames."""
    frame = as_frame(widen(frame_u8(), dtype))
    size = 128
    rng = np.random.default_rng(3)
    faces = []
    for name in PLACEMENTS:
        affine = crop_affine(name, size)
        affine[:, 2] += rng.uniform(-0.5, 0.5, 2)
        faces.append(face_at(affine, size))
    ref = OpenCVWarp(size).crop(frame, faces)
    got = TorchWarp(size).crop(frame, faces)
    np.testing.assert_array_equal(got.affines, ref.affines)
    diff = (got.pixels - ref.pixels).abs() * 255  # in 8-bit levels
    # OpenCV rounds to the frame's integers (half a level of uint8) and samples at positions
    # rounded to 1/32 px; torch samples at exact positions in float32.
    bound = 0.51 if dtype == np.uint8 else 0.02
    assert diff.max() <= bound and diff.mean() < 0.5 * bound, (diff.max(), diff.mean())


def restored_for(crops: FaceCrops) -> torch.Tensor:
    """A stand-in for GPEN: the inverted, blurred crops, far from the originals."""
    inverted = 1.0 - crops.pixels
    return torch.nn.functional.avg_pool2d(inverted, 3, stride=1, padding=1, count_include_pad=False)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pasted_frames_agree(astronaut_scene: tuple, dtype: type) -> None:
    """Overlapping faces, a small (smoothed) one, one at the edge, custom masks, strength 0.9."""
    rgb8, lm = astronaut_scene
    frame = as_frame(widen(rgb8, dtype))
    h, w = rgb8.shape[:2]
    faces = three_faces(rgb8, lm)
    rng = np.random.default_rng(1)
    masks = [face_mask(128).copy(), face_mask(128) * 0.8, np.clip(rng.uniform(0, 1.3, (128, 128)), 0, 1)]
    masks = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 3) for m in masks])
    out = {}
    for kind in KINDS:
        warp = create_warp(kind, size=128, device=torch.device("cpu"))
        crops = warp.crop(frame, faces)
        out[kind] = warp.paste(crops, restored_for(crops), strength=0.9, masks=masks).rgb
        assert out[kind].dtype == dtype and out[kind].shape == frame.rgb.shape
    peak = np.iinfo(dtype).max
    diff = np.abs(out["torch"].astype(np.int64) - out["opencv"]) / (peak / 255)
    # OpenCV samples at 1/32-px rounded positions with fixed-point weights and pastes crops
    # rounded to integers: a final rounding may flip.
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    affines = OpenCVWarp(128).crop(frame, faces).affines
    untouched = np.all([support(a, 128, (h, w), m) == 0 for a, m in zip(affines, masks)], axis=0)
    assert untouched.mean() > 0.5
    for kind in KINDS:
        np.testing.assert_array_equal(out[kind][untouched], frame.rgb[untouched])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_identity_restore_round_trip(astronaut_scene: tuple, kind: str, dtype: type) -> None:
    """Crop, "restore" with the identity, paste: the frame comes back."""
    rgb8, lm = astronaut_scene
    frame = as_frame(widen(rgb8, dtype))
    before = frame.rgb.copy()
    warp = create_warp(kind, size=256, device=torch.device("cpu"))
    crops = warp.crop(frame, [tracked(lm)])
    out = warp.paste(crops, crops.pixels, strength=1.0).rgb
    np.testing.assert_array_equal(frame.rgb, before)
    assert out.dtype == dtype and out.shape == frame.rgb.shape and out is not frame.rgb
    m = support(crops.affines[0], 256, rgb8.shape[:2])
    inner = m > 0.5
    assert inner.sum() > 4000
    assert psnr(out[inner], frame.rgb[inner]) >= 38.0
    np.testing.assert_array_equal(out[m == 0], frame.rgb[m == 0])
    changed = np.any(out != frame.rgb, axis=-1)
    assert changed.any() and np.all(m[changed] > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_is_the_input_and_half_is_halfway(astronaut_scene: tuple, kind: str) -> None:
    rgb8, lm = astronaut_scene
    frame = as_frame(rgb8)
    warp = create_warp(kind, size=128, device=torch.device("cpu"))
    crops = warp.crop(frame, [tracked(lm)])
    different = 1.0 - crops.pixels
    assert warp.paste(crops, different, strength=0.0) is frame
    full = warp.paste(crops, different, strength=1.0).rgb.astype(np.float64)
    half = warp.paste(crops, different, strength=0.5).rgb.astype(np.float64)
    off = np.abs(half - (full + rgb8) / 2)
    # rounding of both; where bicubic overshoots the range, only ``full`` is clipped
    assert off.max() <= 2.0 and (off > 1.0).mean() < 1e-3
    assert np.abs(full - rgb8).max() > 100  # the test would notice a no-op


def test_opencv_paste_matches_whole_frame_reference(astronaut_scene: tuple) -> None:
    """Region-limited warps and the blend equal a whole-frame computation written out here."""
    rgb8, lm = astronaut_scene
    size = 256
    warp = OpenCVWarp(size)
    crops = warp.crop(as_frame(rgb8), [tracked(lm)])
    restored = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 2)
    h, w = rgb8.shape[:2]
    affine = crops.affines[0]
    warped = cv2.warpAffine(restored, affine, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    m = 0.7 * support(affine, size, (h, w))[..., None]
    expected = np.clip(np.rint(m * warped + (1 - m) * rgb8), 0, 255)
    got = warp.paste(crops, to_tensor(restored[None]), strength=0.7).rgb
    off = np.abs(got.astype(int) - expected)
    touched = m[..., 0] > 0
    # 1/32-px sample positions and the blend's float rounding flip a rounding now and then
    assert off.max() <= 1 and off[touched].mean() < 0.01, (off.max(), off[touched].mean())
    np.testing.assert_array_equal(got[~touched], rgb8[~touched])


# ---------------------------------------------------------------------------- overlapping faces


def overlap_scene(kind: str, a: int, b: int, background: int, offset: float) -> np.ndarray:
    """Two unrotated faces, 1.0 frame px per crop px at 128, restored to flat ``a`` and ``b``."""
    size = 128
    frame = as_frame(np.full((200, 320, 3), background, np.uint8))
    faces = [face_at(similarity(1.0, 0, size / 2 - 0.5 - cx, size / 2 - 0.5 - 100.0), size)
             for cx in (110.0, 110.0 + offset)][: 2 if offset else 1]
    warp = create_warp(kind, size=size, device=torch.device("cpu"))
    crops = warp.crop(frame, faces)
    flat = torch.tensor([a, b][: len(faces)], dtype=torch.float32).view(-1, 1, 1, 1) / 255
    return warp.paste(crops, flat.expand(-1, 3, size, size), strength=1.0).rgb


def max_step(img: np.ndarray) -> int:
    x = img[..., 0].astype(int)
    return int(max(np.abs(np.diff(x, axis=0)).max(), np.abs(np.diff(x, axis=1)).max()))


@pytest.mark.parametrize("kind", KINDS)
def test_overlapping_faces_blend_without_seam(kind: str) -> None:
    """Two faces restored to very different flat values: the output steps no more than one
    face does across its own feathered edge with the same contrast (the demo's
    larger-mask-wins rule would jump by the full contrast where the masks cross)."""
    two = overlap_scene(kind, 200, 50, 128, offset=60.0)
    single = overlap_scene(kind, 200, 128, 50, offset=0.0)  # one face, contrast 150 against its background
    assert max_step(two) <= max_step(single) + 1
    assert max_step(single) < 60  # a feathered edge, not a hard one
    # both masks are ~1 in the middle of the overlap: the average of the two faces
    assert abs(int(two[100, 140, 0]) - 125) <= 1
    assert two[100, 90, 0] == 200 and two[100, 200, 0] == 50


@pytest.mark.parametrize("kind", KINDS)
def test_overlap_is_continuous_where_mask_sum_crosses_one(kind: str) -> None:
    """Sliding the second face changes the result smoothly (no switch between rules)."""
    outs = [overlap_scene(kind, 220, 40, 128, offset=float(o)).astype(int) for o in (100, 101)]
    assert np.abs(outs[0] - outs[1]).max() < 40


# ---------------------------------------------------------------------------- edges, small faces, errors


@pytest.mark.parametrize("kind", KINDS)
def test_face_partly_outside_the_frame(astronaut_scene: tuple, kind: str) -> None:
    rgb8, lm = astronaut_scene
    h, w = rgb8.shape[:2]
    shift = np.array([w - lm[:, 0].mean() + 10, -lm[:, 1].mean() + 20])  # centre past the right edge
    shifted = cv2.warpAffine(rgb8, np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float64), (w, h),
                             borderMode=cv2.BORDER_REFLECT_101)
    warp = create_warp(kind, size=256, device=torch.device("cpu"))
    crops = warp.crop(as_frame(shifted), [tracked(lm + shift)])
    out = warp.paste(crops, crops.pixels, strength=1.0).rgb
    m = support(crops.affines[0], 256, (h, w))
    assert 500 < (m > 0.5).sum() < 0.5 * (support(crops.affines[0], 256, (10 * h, 10 * w)) > 0.5).sum()
    np.testing.assert_array_equal(out[m == 0], shifted[m == 0])
    assert psnr(out[m > 0.5], shifted[m > 0.5]) >= 38.0


@pytest.mark.parametrize("kind", KINDS)
def test_face_entirely_outside_leaves_frame_untouched(kind: str) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    warp = create_warp(kind, size=128, device=torch.device("cpu"))
    crops = warp.crop(as_frame(rgb), [face_at(similarity(1.0, 0, 300, 300), 128)])
    out = warp.paste(crops, torch.ones(1, 3, 128, 128), strength=1.0).rgb
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("kind", KINDS)
def test_small_faces_are_smoothed(kind: str) -> None:
    frame = as_frame(np.zeros((200, 200, 3), np.uint8))
    checker = torch.from_numpy(np.indices((128, 128)).sum(0) % 2).float().expand(1, 3, 128, 128)
    affine = similarity(1.0, 0, -36, -36)
    warp = create_warp(kind, size=128, device=torch.device("cpu"))
    big = warp.paste(warp.crop(frame, [face_at(affine, 128, box_side=150)]), checker, strength=1.0).rgb
    small = warp.paste(warp.crop(frame, [face_at(affine, 128, box_side=60)]), checker, strength=1.0).rgb
    centre = (slice(90, 110), slice(90, 110))
    assert big[centre].std() > 100 and small[centre].std() < 20


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_is_mutated(astronaut_scene: tuple, kind: str) -> None:
    rgb8, lm = astronaut_scene
    frame = as_frame(rgb8.copy())
    warp = create_warp(kind, size=128, device=torch.device("cpu"))
    crops = warp.crop(frame, [tracked(lm), tracked(lm + 15)])
    restored = 1.0 - crops.pixels
    masks = np.stack([face_mask(128), face_mask(128)])
    copies = (frame.rgb.copy(), crops.pixels.clone(), restored.clone(), masks.copy())
    out = warp.paste(crops, restored, masks=masks, strength=0.8)
    assert not np.shares_memory(out.rgb, frame.rgb)
    np.testing.assert_array_equal(frame.rgb, copies[0])
    assert torch.equal(crops.pixels, copies[1]) and torch.equal(restored, copies[2])
    np.testing.assert_array_equal(masks, copies[3])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_one_face_blend_is_the_overlap_blend(astronaut_scene: tuple, dtype: type) -> None:
    """A face alone is blended by its own code path; joined by an overlapping face whose mask is
    zero (so the weighted average has the same terms), the overlap path gives the same bytes."""
    rgb8, lm = astronaut_scene
    frame = widen(rgb8, dtype)
    size, rng = 128, np.random.default_rng(3)
    affines = OpenCVWarp(size).crop(as_frame(frame), [tracked(lm), tracked(lm + 25)]).affines
    regions = [paste_region(a, size, *frame.shape[:2]) for a in affines]
    assert [members for _, members in overlap_groups(regions)] == [[0, 1]]  # one group: the overlap path
    top = np.iinfo(dtype).max
    restored = rng.integers(0, top + 1, (2, size, size, 3)).astype(dtype)
    mask = np.clip(rng.uniform(-0.2, 1.2, (size, size)), 0, 1).astype(np.float32)
    for strength in (1.0, 0.7):
        alone = paste_faces(frame, affines[:1], restored[:1], smooth=[False], strength=strength, masks=mask[None])
        joined = paste_faces(frame, affines, restored, smooth=[False, False], strength=strength,
                             masks=np.stack([mask, np.zeros_like(mask)]))
        np.testing.assert_array_equal(alone, joined)
        assert np.abs(alone.astype(np.int64) - frame).max() > top // 4  # the face was pasted


def test_opencv_paste_reads_only_face_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = np.zeros((1080, 1920, 3), np.uint8)
    sizes: list[tuple[int, int]] = []
    original = cv2.warpAffine

    def spy(src: np.ndarray, m: np.ndarray, dsize: tuple[int, int], *args: object, **kwargs: object) -> np.ndarray:
        sizes.append(dsize)
        return original(src, m, dsize, *args, **kwargs)

    affine = similarity(2.0, 10, 128 - 2 * 900, 128 - 2 * 500)
    monkeypatch.setattr(cv2, "warpAffine", spy)
    paste_faces(frame, affine[None], np.full((1, 256, 256, 3), 9, np.uint8), smooth=[False])
    assert sizes and all(w * h < 200 * 200 for w, h in sizes)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "restored, kwargs, error",
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), {}, "floating-point"),
        (torch.zeros(1, 3, 32, 30), {}, "restored must have shape"),
        (torch.zeros(2, 3, 32, 32), {}, "restored must have shape"),
        (torch.zeros(1, 3, 32, 32), {"strength": 1.5}, "strength"),
        (torch.zeros(1, 3, 32, 32), {"masks": np.ones((1, 16, 16), np.float32)}, "masks must have shape"),
    ],
)
def test_paste_rejects_bad_input(kind: str, restored: torch.Tensor, kwargs: dict, error: str) -> None:
    warp = create_warp(kind, size=32, device=torch.device("cpu"))
    crops = warp.crop(as_frame(np.zeros((50, 50, 3), np.uint8)), [face_at(similarity(1.0, 0, -5, -5), 32)])
    with pytest.raises(ValueError, match=error):
        warp.paste(crops, restored, **{"strength": 1.0, **kwargs})


def test_create_warp_chooses_once() -> None:
    cpu = torch.device("cpu")
    assert isinstance(create_warp("auto", size=64, device=cpu), OpenCVWarp)
    assert isinstance(create_warp("torch", size=64, device=cpu), TorchWarp)
    with pytest.raises(ValueError, match="unknown warp 'cuda'"):
        create_warp("cuda", size=64, device=cpu)  # type: ignore[arg-type]


def test_held_bytes_count_the_frame_on_the_device() -> None:
    cpu = torch.device("cpu")
    assert create_warp("opencv", size=64, device=cpu).held_bytes(1080, 1920, np.uint8) == 0
    warp = create_warp("torch", size=64, device=cpu)
    assert warp.held_bytes(1080, 1920, np.uint8) == 1080 * 1920 * 3
    assert warp.held_bytes(1080, 1920, np.uint16) == 1080 * 1920 * 3 * 4
    crops = warp.crop(as_frame(np.zeros((108, 192, 3), np.uint16)), [face_at(similarity(1.0, 0, -5, -5), 64)])
    assert crops.held.numel() * crops.held.element_size() == warp.held_bytes(108, 192, np.uint16)


def test_parse_mask_restricts_the_paste(astronaut_scene: tuple) -> None:
    rgb8, lm = astronaut_scene
    warp = OpenCVWarp(256)
    crops = warp.crop(as_frame(rgb8), [tracked(lm)])
    labels = np.zeros((512, 512), np.int64)
    labels[:, :256] = 1  # only the left half is face
    mask = labels_to_mask(labels, 256)
    out = warp.paste(crops, 1.0 - crops.pixels, strength=1.0, masks=mask[None]).rgb
    m = support(crops.affines[0], 256, rgb8.shape[:2], mask)
    np.testing.assert_array_equal(out[m == 0], rgb8[m == 0])
    right = support(crops.affines[0], 256, rgb8.shape[:2]) > 0.99
    assert (right & (m < 1e-6)).sum() > 1000  # the right half of the face stayed as it was


# ---------------------------------------------------------------------------- devices and precisions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_warp_with_half_precision_restored_faces(astronaut_scene: tuple, device: str, dtype: torch.dtype) -> None:
    """fp16/bf16 restorer output pastes like float32: a final rounding may flip."""
    rgb8, lm = astronaut_scene
    frame = as_frame(rgb8)
    ref_warp, warp = TorchWarp(128), TorchWarp(128, device=torch.device(device))
    faces = three_faces(rgb8, lm)
    restored = restored_for(ref_warp.crop(frame, faces))
    ref = ref_warp.paste(ref_warp.crop(frame, faces), restored, strength=0.8).rgb
    crops = warp.crop(frame, faces)
    assert crops.pixels.device.type == device and crops.held.device.type == device
    got = warp.paste(crops, restored.to(device, dtype), strength=0.8).rgb
    diff = np.abs(got.astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < (0.005 if dtype == torch.float16 else 0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gpen_through_the_torch_warp(tiny_gpen_checkpoint, tiny_config, dtype: torch.dtype) -> None:
    """Crop → GPEN (64 px, fp16 or bf16) → paste on the torch warp against float32 on the
    OpenCV reference: the restored frame within 40 dB."""
    state = torch.load(tiny_gpen_checkpoint(), weights_only=True)
    frame = as_frame(frame_u8(120, 160))
    faces = [face_at(similarity(0.8, 8, -40, -20), 64), face_at(similarity(0.9, -5, -90, -50), 64)]
    outs = {}
    for kind, precision in (("opencv", torch.float32), ("torch", dtype)):
        model = build_model(tiny_config)
        model.load_state_dict(state)
        restorer = Restorer(model, 64, dtype=precision, batch_size=2, channels_last=kind == "torch")
        warp = create_warp(kind, size=64, device=restorer.device)
        crops = warp.crop(frame, faces)
        outs[kind] = warp.paste(crops, restorer.restore_tensor(crops.pixels), strength=1.0).rgb
    changed = np.any(outs["opencv"] != frame.rgb, axis=-1)
    assert changed.mean() > 0.2
    assert psnr(outs["torch"], outs["opencv"]) >= 40.0
