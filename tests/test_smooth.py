"""The zero-phase landmark smoother on synthetic five-point faces with known true paths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import savgol_filter

from gpen_video.records import TrackedFace
from gpen_video.faces.smooth import LookaheadSmoother, smooth_track, smooth_tracks

FPS = 30.0
N = 120
NOISE = 1.5
# ArcFace five-point template (112 px crop), centred, in face sizes.
TEMPLATE = (
    np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])
    - 56.0
) / 112.0


def truth_path(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """A face translating, zooming and rolling along sinusoids: [n,5,2] landmarks, [n,4] boxes."""
    t = np.arange(n) / FPS
    cx = 320 + 60 * np.sin(2 * np.pi * 0.4 * t)
    cy = 240 + 25 * np.sin(2 * np.pi * 0.7 * t + 1)
    size = 110 + 15 * np.sin(2 * np.pi * 0.3 * t)
    angle = 0.25 * np.sin(2 * np.pi * 0.5 * t)
    return faces_at(cx, cy, size, angle)


def faces_at(cx, cy, size, angle) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # [n,2,2]
    offsets = np.einsum("nij,pj->npi", rot, TEMPLATE) * np.asarray(size)[:, None, None]
    centre = np.stack([cx, cy], -1)
    lm = centre[:, None, :] + offsets
    half = np.asarray(size)[:, None] / 2
    box = np.concatenate([centre - half, centre + half], -1)
    return lm, box


def observe(lm, box, rng, *, missing=(), outliers=(), noise=NOISE, track_id=0) -> list[TrackedFace]:
    """Detector-like records: Gaussian noise, some frames missing, some shifted far away."""
    faces = []
    for i in range(len(lm)):
        if i in missing:
            continue
        raw = lm[i] + rng.normal(0, noise, (5, 2))
        if i in outliers:
            raw = raw + np.array([22.0, -14.0])
        raw = raw.astype(np.float32)
        b = (box[i] + rng.normal(0, noise, 4)).astype(np.float32)
        faces.append(TrackedFace(track_id, i, b, raw, raw.copy(), 0.98))
    return faces


def stack(faces: list[TrackedFace]) -> tuple[np.ndarray, np.ndarray]:
    idx = np.array([f.frame_index for f in faces])
    return idx, np.stack([f.landmarks for f in faces]).astype(np.float64)


def error(lm: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(lm - truth, axis=-1).mean())


def jitter(lm: np.ndarray) -> float:
    """Mean frame-to-frame acceleration of the points (px / frame^2); lm [n,5,2], no gaps."""
    return float(np.linalg.norm(lm[2:] - 2 * lm[1:-1] + lm[:-2], axis=-1).mean())


# ------------------------------------------------------------------ zero-phase smoother


@pytest.mark.parametrize("space", ["similarity", "points"])
def test_smoothing_removes_noise_and_jitter(space):
    rng = np.random.default_rng(10)
    lm, box = truth_path()
    missing = {17, 18, 50, 51, 52, 90}
    faces = observe(lm, box, rng, missing=missing, outliers={70})
    out = smooth_track(faces, space=space)
    assert [f.frame_index for f in out] == list(range(N))
    idx, raw = stack(faces)
    _, smooth = stack(out)
    clean = np.array([i not in (70,) for i in idx])
    raw_err = error(raw[clean], lm[idx][clean])
    smooth_err = error(smooth, lm)
    assert smooth_err < 1.2 and smooth_err < 0.6 * raw_err, (smooth_err, raw_err)
    assert np.abs(smooth - lm).max() < 5.0  # nowhere, not even at the outlier or the ends
    # raw jitter over the runs of consecutive detections; smoothed over every frame
    runs = [
        i for i in range(1, len(idx) - 1)
        if idx[i + 1] - idx[i - 1] == 2 and 70 not in idx[i - 1 : i + 2]
    ]
    accel = [np.linalg.norm(raw[i + 1] - 2 * raw[i] + raw[i - 1], axis=-1).mean() for i in runs]
    raw_jitter = float(np.mean(accel))
    assert jitter(smooth) * 3 < raw_jitter, (jitter(smooth), raw_jitter)
    assert jitter(smooth) < 1.5 * jitter(lm) + 0.5
    boxes = np.stack([f.box for f in out])
    assert np.abs(boxes - box).mean() < 1.5


def test_outlier_is_left_out():
    rng = np.random.default_rng(11)
    lm, box = truth_path(60)
    faces = observe(lm, box, rng, outliers={30})
    _, robust = stack(smooth_track(faces))
    _, plain = stack(smooth_track(faces, outlier_factor=None))
    near = slice(26, 35)
    assert error(robust[near], lm[near]) < 1.2
    assert error(plain[near], lm[near]) > 2 * error(robust[near], lm[near])
    kept = smooth_track(faces)[30]
    assert not kept.interpolated and np.array_equal(kept.landmarks_raw, faces[30].landmarks_raw)


def test_zero_phase_has_no_lag():
    """On a noisy linear ramp the output is centred on the truth, at the ends too."""
    rng = np.random.default_rng(12)
    n, speed = 120, 3.0
    x = 100 + speed * np.arange(n)
    lm, box = faces_at(x, 200 + 0 * x, 100 + 0 * x, 0 * x)
    faces = observe(lm, box, rng)
    _, smooth = stack(smooth_track(faces))
    along = (smooth - lm)[..., 0]  # signed error along the motion (+x)
    assert abs(along.mean()) < 0.15, along.mean()
    assert abs(along[:10].mean()) < 0.6 and abs(along[-10:].mean()) < 0.6
    assert jitter(smooth) * 3 < jitter(stack(faces)[1])


def test_gaps_are_filled_smoothly():
    rng = np.random.default_rng(13)
    lm, box = truth_path(60)
    gap = {20, 21, 22}
    faces = observe(lm, box, rng, missing=gap | {40, 41, 42, 43, 44, 45, 46, 47})
    out = smooth_track(faces)
    filled = [f for f in out if f.interpolated]
    assert {f.frame_index for f in filled} == gap | set(range(40, 48))
    for f in filled:
        assert f.landmarks_raw is None and f.score is None and f.track_id == 0
        assert error(f.landmarks, lm[f.frame_index]) < 3.0
        assert np.abs(f.box - box[f.frame_index]).mean() < 4.0
    assert not any(f.interpolated for f in out if f.frame_index not in gap | set(range(40, 48)))
    unfilled = smooth_track(faces, fill_gaps=False)
    assert [f.frame_index for f in unfilled] == [f.frame_index for f in faces]


def test_batched_fit_equals_reference_and_savgol():
    rng = np.random.default_rng(14)
    lm, box = truth_path(50)
    faces = observe(lm, box, rng, missing={5, 6, 30})
    for space in ("similarity", "points"):
        fast = stack(smooth_track(faces, space=space))[1]
        slow = stack(smooth_track(faces, space=space, reference=True))[1]
        np.testing.assert_allclose(fast, slow, atol=1e-4)
    # gap-free, points space, no outlier pass: exactly Savitzky-Golay (interp ends)
    full = observe(lm, box, rng)
    got = stack(smooth_track(full, space="points", outlier_factor=None))[1]
    want = savgol_filter(stack(full)[1], 9, 2, axis=0, mode="interp")
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_output_range_gives_the_same_records():
    rng = np.random.default_rng(19)
    lm, box = truth_path(60)
    faces = observe(lm, box, rng, missing={5, 6, 30}, outliers={33})
    whole = smooth_track(faces)
    part = smooth_track(faces, output=(25, 40))
    assert [f.frame_index for f in part] == list(range(25, 41))
    for f in part:
        np.testing.assert_array_equal(f.landmarks, whole[f.frame_index].landmarks)
        assert f.interpolated == whole[f.frame_index].interpolated
    assert smooth_track(faces, output=(100, 120)) == []


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9, 30])
def test_short_tracks_and_ends_have_no_artefacts(n):
    """Noise-free constant-acceleration motion passes unchanged whatever the length."""
    t = np.arange(n, dtype=np.float64)
    lm, box = faces_at(50 + 4 * t + 0.3 * t**2, 80 - 2 * t, 90 + t, 0.01 * t)
    faces = observe(lm, box, np.random.default_rng(0), noise=0.0)
    for space in ("points", "similarity"):
        out = smooth_track(faces, space=space)
        assert len(out) == n
        tol = 1e-3 if space == "points" or n < 3 else 0.05
        assert np.abs(stack(out)[1] - lm).max() < tol


def test_similarity_space_keeps_the_face_shape_under_rotation():
    """A face spinning fast keeps its size in similarity space; x/y smoothing shrinks it."""
    t = np.arange(40, dtype=np.float64)
    lm, box = faces_at(200 + 0 * t, 200 + 0 * t, 100 + 0 * t, 0.35 * t)  # 20 deg per frame
    faces = observe(lm, box, np.random.default_rng(0), noise=0.0)

    def eye_distance(out):
        pts = stack(out)[1]
        return np.linalg.norm(pts[:, 1] - pts[:, 0], axis=-1)

    true = np.linalg.norm(lm[:, 1] - lm[:, 0], axis=-1)
    sim = eye_distance(smooth_track(faces, space="similarity"))
    pts = eye_distance(smooth_track(faces, space="points"))
    assert np.abs(sim - true).max() < 1e-3
    assert np.abs(pts - true).max() > 0.3


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(15)
    lm, box = truth_path(30)
    faces = observe(lm, box, rng, missing={10})
    before = [(f.landmarks.copy(), f.box.copy(), f.landmarks_raw.copy()) for f in faces]
    out = smooth_track(faces)
    for f, (l, b, r) in zip(faces, before):
        np.testing.assert_array_equal(f.landmarks, l)
        np.testing.assert_array_equal(f.box, b)
        np.testing.assert_array_equal(f.landmarks_raw, r)
    detected = [f for f in out if not f.interpolated]
    for o, f in zip(detected, faces):
        assert o.landmarks_raw is f.landmarks_raw and o.score == f.score
    assert all(o.landmarks.dtype == np.float32 and o.box.dtype == np.float32 for o in out)


def test_smooth_tracks_handles_each_track():
    rng = np.random.default_rng(16)
    lm, box = truth_path(40)
    tracks = {
        3: observe(lm, box, rng, missing={4}, track_id=3),
        7: observe(lm[:12] + 300, box[:12] + 300, rng, track_id=7),
    }
    out = smooth_tracks(tracks, window=5)
    assert sorted(out) == [3, 7] and len(out[3]) == 40 and len(out[7]) == 12
    assert all(f.track_id == tid for tid, fs in out.items() for f in fs)
    np.testing.assert_allclose(stack(out[3])[1], stack(smooth_track(tracks[3], window=5))[1])


def test_window_one_only_fills_gaps():
    rng = np.random.default_rng(17)
    lm, box = truth_path(20)
    faces = observe(lm, box, rng, missing={8})
    out = smooth_track(faces, window=1)
    for f in out:
        if not f.interpolated:
            np.testing.assert_allclose(f.landmarks, f.landmarks_raw, atol=1e-4)
    assert out[8].interpolated


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (lambda fs: [fs[1], fs[0]], {}),  # frames out of order
        (lambda fs: [fs[0], fs[0]], {}),  # repeated frame
        (lambda fs: [fs[0], TrackedFace(9, 5, fs[1].box, None, fs[1].landmarks, None)], {}),
        (lambda fs: fs, {"window": 0}),
        (lambda fs: fs, {"space": "affine"}),
    ],
)
def test_smooth_track_rejects_bad_input(make, kwargs):
    lm, box = truth_path(4)
    faces = observe(lm, box, np.random.default_rng(0))
    with pytest.raises(ValueError):
        smooth_track(make(faces), **kwargs)


def test_empty_track():
    assert smooth_track([]) == []


# ------------------------------------------------------------------ streaming smoother


@pytest.mark.parametrize("chunk", [1, 16])
def test_lookahead_equals_whole_track_smoothing(chunk):
    """Streaming with a look-ahead gives the whole-track result: same frames, same faces, same
    gap fills, landmarks equal to floating-point precision for tracks with ordinary misses."""
    rng = np.random.default_rng(7)
    lm, box = truth_path()
    tracks = {
        0: observe(lm, box, rng, missing={10, 11, 12, 60}, outliers={30}, track_id=0),
        1: [f for f in observe(lm + 200, box + 200, rng, track_id=1) if 20 <= f.frame_index < 90],
        2: [f for f in observe(lm - 100, box - 100, rng, missing={101, 102}, track_id=2) if f.frame_index >= 95],
    }
    whole = smooth_tracks(tracks, window=9)
    by_frame: dict[int, list[TrackedFace]] = {}
    for faces in tracks.values():
        for f in faces:
            by_frame.setdefault(f.frame_index, []).append(f)
    smoother = LookaheadSmoother(window=9, max_gap=8, chunk=chunk)
    released = []
    for i in range(N):
        released += smoother.push(i, by_frame.get(i, []))
        assert not released or released[-1][0] <= i - smoother.context
    released += smoother.finish()
    assert [i for i, _ in released] == list(range(N))
    got = {(f.track_id, f.frame_index): f for _, faces in released for f in faces}
    want = {(f.track_id, f.frame_index): f for faces in whole.values() for f in faces}
    assert got.keys() == want.keys()
    for key, face in want.items():
        np.testing.assert_allclose(got[key].landmarks, face.landmarks, atol=1e-3)
        assert got[key].interpolated == face.interpolated


def test_lookahead_starts_at_any_frame_and_rejects_frames_out_of_order():
    rng = np.random.default_rng(8)
    lm, box = truth_path(40)
    faces = observe(lm, box, rng, missing={20})
    start = 1000
    moved = [TrackedFace(0, f.frame_index + start, f.box, f.landmarks_raw, f.landmarks, f.score) for f in faces]
    smoother = LookaheadSmoother(window=9, max_gap=8)
    by_frame = {f.frame_index: [f] for f in moved}
    released = [r for i in range(start, start + 40) for r in smoother.push(i, by_frame.get(i, []))]
    released += smoother.finish()
    assert [i for i, _ in released] == list(range(start, start + 40))
    got = np.stack([fs[0].landmarks for _, fs in released])
    np.testing.assert_allclose(got, stack(smooth_track(faces))[1], atol=1e-3)
    assert smoother.finish() == []
    with pytest.raises(ValueError, match="in order"):
        smoother.push(start + 41, [])


def test_lookahead_with_nothing_pushed_releases_nothing():
    assert LookaheadSmoother().finish() == []
