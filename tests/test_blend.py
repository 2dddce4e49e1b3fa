"""Paste-back: masks, the identity round trip, strength, seams, edges, dtypes, torch path, parser."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.warp import blend
from gpen_video.faces.align import align_faces, template
from gpen_video.warp.blend import (
    ParsingMasker,
    face_mask,
    labels_to_mask,
    paste_faces,
    paste_faces_torch,
)
from gpen_video.errors import WeightsError
from gpen_video.records import AlignedFace, TrackedFace
from tests.devices import DEVICES
from tests.geometry import apply, similarity

# The astronaut's five landmarks in skimage.data.astronaut() (512×512), read off the image:
# enough for geometry, which is what these tests are about.
ASTRONAUT_LANDMARKS = np.array([[200, 103], [246, 103], [223, 124], [205, 146], [243, 146]], np.float64)


def tracked(lm: np.ndarray, box_side: float = 150.0) -> TrackedFace:
    centre = lm.mean(0)
    box = np.r_[centre - box_side / 2, centre + box_side / 2].astype(np.float32)
    return TrackedFace(0, 0, box, None, lm.astype(np.float32), None)


def aligned_at(affine: np.ndarray, size: int, box_side: float = 150.0, dtype: type = np.uint8) -> AlignedFace:
    """An AlignedFace with a given frame → crop affine (its crop is a placeholder)."""
    lm = apply(np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2], template(size))
    return AlignedFace(tracked(lm, box_side), np.zeros((size, size, 3), dtype), affine)


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(peak**2 / err)) if err > 0 else float("inf")


def support(affine: np.ndarray, size: int, shape: tuple[int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """Whole-frame warp of the mask (an independent reference for where a face may touch)."""
    m = face_mask(size) if mask is None else mask
    return cv2.warpAffine(m, affine, shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


@pytest.fixture(scope="module")
def astronaut_scene() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut placed in a 400×560 frame (scale 0.6, 12°, offset) and her landmarks there."""
    place = similarity(0.6, 12, 170, 40)
    frame = cv2.warpAffine(data.astronaut(), place, (560, 400), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    return frame, apply(place, ASTRONAUT_LANDMARKS)


# ---------------------------------------------------------------------------- mask


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


# ---------------------------------------------------------------------------- identity round trip


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("size", [256, 512])
def test_identity_restore_round_trip(astronaut_scene: tuple, size: int, dtype: type) -> None:
    """Align, "restore" with the identity, paste: the frame comes back."""
    frame8, lm = astronaut_scene
    peak = 255.0 if dtype == np.uint8 else 65535.0
    frame = frame8.astype(dtype) * (1 if dtype == np.uint8 else 257)
    before = frame.copy()
    (face,) = align_faces(frame, [tracked(lm)], size)
    out = paste_faces(frame, [face], [face.crop])
    np.testing.assert_array_equal(frame, before)
    assert out.dtype == dtype and out.shape == frame.shape and out is not frame

    m = support(face.affine, size, frame.shape[:2])
    inner = m > 0.5
    assert inner.sum() > 4000
    assert psnr(out[inner], frame[inner], peak) >= 38.0
    np.testing.assert_array_equal(out[m == 0], frame[m == 0])
    # the face really was pasted: the pixels that changed lie inside the face
    changed = np.any(out != frame, axis=-1)
    assert changed.any() and np.all(m[changed] > 0)


def test_paste_matches_whole_frame_reference(astronaut_scene: tuple) -> None:
    """Region-limited warps and the blend equal a whole-frame computation written out here."""
    frame, lm = astronaut_scene
    size = 256
    rng = np.random.default_rng(0)
    (face,) = align_faces(frame, [tracked(lm, 150)], size)
    restored = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    restored = cv2.GaussianBlur(restored, (0, 0), 2)
    h, w = frame.shape[:2]
    warped = cv2.warpAffine(restored, face.affine, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    m = 0.7 * support(face.affine, size, (h, w))[..., None]
    expected = np.clip(np.rint(m * warped + (1 - m) * frame), 0, 255)
    got = paste_faces(frame, [face], [restored], strength=0.7)
    assert np.abs(got.astype(int) - expected).max() <= 1


# ---------------------------------------------------------------------------- strength


def test_strength_zero_is_exact_and_half_is_halfway(astronaut_scene: tuple) -> None:
    frame, lm = astronaut_scene
    (face,) = align_faces(frame, [tracked(lm)], 256)
    different = 255 - face.crop
    zero = paste_faces(frame, [face], [different], strength=0.0)
    np.testing.assert_array_equal(zero, frame)
    full = paste_faces(frame, [face], [different], strength=1.0).astype(np.float64)
    half = paste_faces(frame, [face], [different], strength=0.5).astype(np.float64)
    assert np.abs(half - (full + frame) / 2).max() <= 1.0
    assert np.abs(full - frame).max() > 100  # the test would notice a no-op


# ---------------------------------------------------------------------------- overlapping faces


def overlap_scene(a: int, b: int, background: int, offset: float) -> np.ndarray:
    """Two unrotated faces, 1.0 frame px per crop px at 128, restored to flat ``a`` and ``b``."""
    size = 128
    frame = np.full((200, 320, 3), background, np.uint8)
    faces, crops = [], []
    for value, cx in ((a, 110.0), (b, 110.0 + offset)):
        affine = similarity(1.0, 0, size / 2 - 0.5 - cx, size / 2 - 0.5 - 100.0)
        faces.append(aligned_at(affine, size))
        crops.append(np.full((size, size, 3), value, np.uint8))
    return paste_faces(frame, faces[: 2 if offset else 1], crops[: 2 if offset else 1])


def max_step(img: np.ndarray) -> int:
    x = img[..., 0].astype(int)
    return int(max(np.abs(np.diff(x, axis=0)).max(), np.abs(np.diff(x, axis=1)).max()))


def test_overlapping_faces_blend_without_seam() -> None:
    """Two faces restored to very different flat values: the output steps no more than one
    face does across its own feathered edge with the same contrast (the demo's
    larger-mask-wins rule would jump by the full contrast where the masks cross)."""
    two = overlap_scene(200, 50, 128, offset=60.0)
    single = overlap_scene(200, 128, 50, offset=0.0)  # one face, contrast 150 against its background
    assert max_step(two) <= max_step(single) + 1
    assert max_step(single) < 60  # a feathered edge, not a hard one
    # both masks are ~1 in the middle of the overlap: the average of the two faces
    assert abs(int(two[100, 140, 0]) - 125) <= 1
    assert two[100, 90, 0] == 200 and two[100, 200, 0] == 50


def test_overlap_is_continuous_where_mask_sum_crosses_one() -> None:
    """Sliding the second face changes the result smoothly (no switch between rules)."""
    outs = [overlap_scene(220, 40, 128, offset=float(o)).astype(int) for o in (100, 101)]
    assert np.abs(outs[0] - outs[1]).max() < 40


# ---------------------------------------------------------------------------- edges, errors, dtypes


def test_face_partly_outside_the_frame(astronaut_scene: tuple) -> None:
    frame, lm = astronaut_scene
    h, w = frame.shape[:2]
    shift = np.array([w - lm[:, 0].mean() + 10, -lm[:, 1].mean() + 20])  # centre past the right edge
    lm_edge = lm + shift
    shifted = cv2.warpAffine(frame, np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float64), (w, h),
                             borderMode=cv2.BORDER_REFLECT_101)
    (face,) = align_faces(shifted, [tracked(lm_edge)], 256)
    out = paste_faces(shifted, [face], [face.crop])
    m = support(face.affine, 256, (h, w))
    assert 500 < (m > 0.5).sum() < 0.5 * (support(face.affine, 256, (10 * h, 10 * w)) > 0.5).sum()
    np.testing.assert_array_equal(out[m == 0], shifted[m == 0])
    assert psnr(out[m > 0.5], shifted[m > 0.5], 255) >= 38.0


def test_face_entirely_outside_leaves_frame_untouched() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    affine = similarity(1.0, 0, 300, 300)  # the crop sits far left and above the frame
    face = aligned_at(affine, 128)
    out = paste_faces(frame, [face], [np.full((128, 128, 3), 255, np.uint8)])
    np.testing.assert_array_equal(out, frame)


def test_small_faces_are_smoothed() -> None:
    frame = np.zeros((200, 200, 3), np.uint8)
    checker = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    affine = similarity(1.0, 0, -36, -36)
    big = paste_faces(frame, [aligned_at(affine, 128, box_side=150)], [checker])
    small = paste_faces(frame, [aligned_at(affine, 128, box_side=60)], [checker])
    centre = (slice(90, 110), slice(90, 110))
    assert big[centre].std() > 100 and small[centre].std() < 20


def test_nothing_is_mutated(astronaut_scene: tuple) -> None:
    frame, lm = astronaut_scene
    faces = align_faces(frame, [tracked(lm), tracked(lm + 15)], 256)
    restored = [255 - f.crop for f in faces]
    masks = [face_mask(256).copy(), face_mask(256).copy()]
    copies = (frame.copy(), [r.copy() for r in restored], [m.copy() for m in masks])
    out = paste_faces(frame, faces, restored, masks=masks, strength=0.8)
    assert not np.shares_memory(out, frame)
    np.testing.assert_array_equal(frame, copies[0])
    for a, b in zip(restored + masks, copies[1] + copies[2]):
        np.testing.assert_array_equal(a, b)


def test_paste_reads_only_face_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = np.zeros((1080, 1920, 3), np.uint8)
    sizes: list[tuple[int, int]] = []
    original = cv2.warpAffine

    def spy(src: np.ndarray, m: np.ndarray, dsize: tuple[int, int], *args: object, **kwargs: object) -> np.ndarray:
        sizes.append(dsize)
        return original(src, m, dsize, *args, **kwargs)

    monkeypatch.setattr(cv2, "warpAffine", spy)
    face = aligned_at(similarity(2.0, 10, 128 - 2 * 900, 128 - 2 * 500), 256)
    paste_faces(frame, [face], [np.full((256, 256, 3), 9, np.uint8)])
    assert sizes and all(w * h < 200 * 200 for w, h in sizes)


@pytest.mark.parametrize(
    "frame, crop, kwargs, error",
    [
        (np.zeros((50, 50, 3), np.float32), np.zeros((32, 32, 3), np.float32), {}, "uint8 or uint16"),
        (np.zeros((50, 50, 3), np.uint8), np.zeros((32, 32, 3), np.uint16), {}, "frame's dtype"),
        (np.zeros((50, 50, 3), np.uint8), np.zeros((32, 30, 3), np.uint8), {}, "must have shape"),
        (np.zeros((50, 50, 3), np.uint8), np.zeros((32, 32, 3), np.uint8), {"strength": 1.5}, "strength"),
        (np.zeros((50, 50, 3), np.uint8), np.zeros((32, 32, 3), np.uint8),
         {"masks": [np.ones((16, 16), np.float32)]}, "masks"),
    ],
)
def test_paste_rejects_bad_input(frame: np.ndarray, crop: np.ndarray, kwargs: dict, error: str) -> None:
    face = aligned_at(similarity(1.0, 0, -5, -5), 32)
    with pytest.raises(ValueError, match=error):
        paste_faces(frame, [face], [crop], **kwargs)


# ---------------------------------------------------------------------------- torch path


def test_torch_paste_matches_opencv(astronaut_scene: tuple) -> None:
    """Three faces (two overlapping, one small and smoothed, one at the edge), custom masks."""
    frame, lm = astronaut_scene
    h, w = frame.shape[:2]
    lms = [lm, lm + [40, 10], lm + [w - lm[:, 0].mean() - 5, 0]]
    boxes = [150, 60, 150]
    faces = [align_faces(frame, [tracked(p, b)], 128)[0] for p, b in zip(lms, boxes)]
    rng = np.random.default_rng(1)
    restored = [cv2.GaussianBlur(255 - f.crop, (0, 0), 1.0) for f in faces]
    masks = [face_mask(128).copy(), face_mask(128) * 0.8, np.clip(rng.uniform(0, 1.3, (128, 128)), 0, 1)]
    masks = [cv2.GaussianBlur(m.astype(np.float32), (0, 0), 3) for m in masks]
    ref = paste_faces(frame, faces, restored, masks=masks, strength=0.9)

    got = paste_faces_torch(
        torch.from_numpy(frame).permute(2, 0, 1).float(),
        torch.from_numpy(np.stack(restored)).permute(0, 3, 1, 2).float(),
        np.stack([f.affine for f in faces]),
        torch.from_numpy(np.stack(masks)),
        0.9,
        smooth=[f.face.size < blend.SMALL_FACE for f in faces],
    )
    got8 = got.round().clamp(0, 255).permute(1, 2, 0).numpy()
    diff = np.abs(got8 - ref)
    # OpenCV samples at 1/32-px rounded positions with 8-bit fixed-point weights.
    assert diff.max() <= 3 and diff.mean() < 0.05
    untouched = np.all([support(f.affine, 128, (h, w), m) == 0 for f, m in zip(faces, masks)], axis=0)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy()[untouched], frame[untouched])


def test_torch_paste_strength_zero_and_default_mask() -> None:
    frame = torch.rand(3, 90, 100) * 255
    crops = torch.full((1, 3, 64, 64), 10.0)
    affine = similarity(1.0, 0, -18, -13)[None]
    np.testing.assert_array_equal(paste_faces_torch(frame, crops, affine, None, 0.0).numpy(), frame.numpy())
    out = paste_faces_torch(frame, crops, affine, None, 1.0)
    assert out[:, 13 + 32, 18 + 32].tolist() == pytest.approx([10.0] * 3, abs=1e-3)
    assert torch.equal(out[:, :5], frame[:, :5])


# ---------------------------------------------------------------------------- parsing mask


class OneHotParser(torch.nn.Module):
    """Stands in for ParseNet: logits that pick a fixed label map for every input."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("labels", torch.from_numpy(labels).long())
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x)
        one_hot = torch.nn.functional.one_hot(self.labels, 19).permute(2, 0, 1).float()
        return one_hot[None].expand(len(x), -1, -1, -1), x


def test_parse_labels_map_to_face_only() -> None:
    labels = np.full((512, 512), 13, np.int64)  # hair everywhere
    yy, xx = np.indices((512, 512))
    labels[(yy - 256) ** 2 + (xx - 256) ** 2 < 150**2] = 1  # skin disc
    labels[(yy - 220) ** 2 + (xx - 200) ** 2 < 15**2] = 4  # an eye on it
    labels[430:, 150:360] = 17  # neck below
    net = OneHotParser(labels)
    masker = ParsingMasker.from_network(net, batch_size=2)
    crops = np.zeros((3, 256, 256, 3), np.uint16)
    crops[1] = 65535
    masks = masker.masks(crops)
    assert masks.shape == (3, 256, 256) and masks.dtype == np.float32
    assert len(net.seen) == 2 and net.seen[0].shape == (2, 3, 512, 512)
    assert net.seen[0][0].unique().tolist() == [-1.0] and net.seen[0][1].unique().tolist() == [1.0]
    m = masks[0]
    assert m[128, 128] == pytest.approx(1.0, abs=1e-4)
    assert m[110, 100] == pytest.approx(1.0, abs=1e-4)  # the eye counts as face
    assert m[10, 10] < 1e-4 and m[250, 128] < 1e-3  # hair and neck do not
    np.testing.assert_allclose(masks[1], m)
    np.testing.assert_allclose(m, labels_to_mask(labels, 256))


def test_parse_mask_border_treatment_matches_plain_mask() -> None:
    """All-skin labels give the plain feathered square."""
    m = labels_to_mask(np.ones((512, 512), np.int64), 512)
    np.testing.assert_allclose(m, face_mask(512), atol=1e-6)


@pytest.fixture(scope="module")
def parsenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("parsenet") / "ParseNet-latest.pth"
    torch.save(blend._parse_net().state_dict(), path)
    return path


def test_parse_masker_runs_with_random_weights(parsenet_file: Path) -> None:
    # the parser is fully convolutional: 128 instead of 512 keeps this test fast
    masker = ParsingMasker(parsenet_file, progress=False, input_size=128, batch_size=2)
    crops = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    masks = masker.masks(crops)
    assert masks.shape == (2, 128, 128) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert masker.stats.crops == 2


def test_parse_masker_rejects_other_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "ParseNet-latest.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="ParseNet"):
        ParsingMasker(path)


def test_parse_masks_paste(astronaut_scene: tuple) -> None:
    """A parse mask restricts the paste to the parsed region."""
    frame, lm = astronaut_scene
    (face,) = align_faces(frame, [tracked(lm)], 256)
    labels = np.zeros((512, 512), np.int64)
    labels[:, :256] = 1  # only the left half is face
    mask = labels_to_mask(labels, 256)
    out = paste_faces(frame, [face], [255 - face.crop], masks=[mask])
    m = support(face.affine, 256, frame.shape[:2], mask)
    np.testing.assert_array_equal(out[m == 0], frame[m == 0])
    right = support(face.affine, 256, frame.shape[:2], face_mask(256)) > 0.99
    assert (right & (m < 1e-6)).sum() > 1000  # the right half of the face stayed as it was




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-2), (torch.float16, 0.5), (torch.bfloat16, 2.0)])
def test_torch_paste_precision_and_device(astronaut_scene: tuple, device: str, dtype: torch.dtype, tol: float) -> None:
    """Against float32 on the CPU; fp16/bf16 only lose their storage precision (≤ half an ulp at 255)."""
    frame, lm = astronaut_scene
    faces = [align_faces(frame, [tracked(p)], 256)[0] for p in (lm, lm + 30)]
    frame_t = torch.from_numpy(frame).permute(2, 0, 1).float()
    crops = torch.from_numpy(np.stack([255 - f.crop for f in faces])).permute(0, 3, 1, 2).float()
    affines = np.stack([f.affine for f in faces])
    ref = paste_faces_torch(frame_t, crops, affines, None, 0.8)
    got = paste_faces_torch(frame_t.to(device, dtype), crops.to(device, dtype), affines, None, 0.8)
    assert got.dtype == dtype and got.device.type == device
    assert (got.float().cpu() - ref).abs().max() <= tol
