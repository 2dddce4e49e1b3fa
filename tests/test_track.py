"""Tracker on synthetic five-point faces."""

from __future__ import annotations

import numpy as np
import pytest

from gpen_video.records import Detections, TrackedFace
from gpen_video.faces.smooth import smooth_track
from gpen_video.faces.track import Tracker, group_by_track

FPS = 30.0
# ArcFace five-point template (112 px crop), centred, in face sizes.
TEMPLATE = (
    np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])
    - 56.0
) / 112.0


def face(cx: float, cy: float, size: float, angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Truth landmarks [5,2] and box [4] of a face centred at (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    lm = np.array([cx, cy]) + size * TEMPLATE @ rot.T
    box = np.array([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    return lm, box


def detections(faces: list[tuple[np.ndarray, np.ndarray]], rng, noise=1.5) -> Detections:
    if not faces:
        return Detections.empty()
    lms = np.stack([lm for lm, _ in faces]) + rng.normal(0, noise, (len(faces), 5, 2))
    boxes = np.stack([b for _, b in faces]) + rng.normal(0, noise, (len(faces), 4))
    scores = np.full(len(faces), 0.99)
    return Detections(boxes.astype(np.float32), lms.astype(np.float32), scores.astype(np.float32))


def run(tracker: Tracker, frames: list[Detections], start: int = 0) -> list[list[TrackedFace]]:
    return [tracker.update(start + i, d) for i, d in enumerate(frames)]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ------------------------------------------------------------------ tracker


def test_crossing_faces_keep_one_id_each():
    """Three faces whose paths cross (each crossing hides one face for a while) keep their ids."""
    rng = np.random.default_rng(1)
    n = 120
    t = np.arange(n) / FPS
    step = np.arange(n, dtype=np.float64)
    paths = [  # (cx, cy, size, angle) per frame: A left->right, B right->left, C top->bottom
        (40 + 6 * step, 240 + 20 * np.sin(2 * np.pi * 0.5 * t), 90 + 0 * t, 0.1 * np.sin(3 * t)),
        (700 - 6 * step, 250 + 15 * np.sin(2 * np.pi * 0.7 * t), 110 + 10 * np.sin(t), 0 * t),
        (290 + 20 * np.sin(2 * t), 40 + 5 * step, 80 + 0 * t, -0.1 + 0 * t),
    ]
    tracker = Tracker()
    owner: dict[int, set[int]] = {}  # track id -> truth faces it was given
    ids_of_face: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    last_seen, longest_miss, hidden = [-1, -1, -1], 0, 0
    for i in range(n):
        truth = [face(p[0][i], p[1][i], p[2][i], p[3][i]) for p in paths]
        visible = []
        for k, (_, box) in enumerate(truth):
            # a face more than 35 % covered by a bigger (nearer) one is not detected
            behind = any(
                box_iou(box, truth[j][1]) > 0.35 and paths[j][2][i] > paths[k][2][i]
                for j in range(3)
                if j != k
            )
            hidden += behind
            if not behind and rng.random() >= 0.03:
                visible.append(k)
                longest_miss = max(longest_miss, i - last_seen[k] - 1)
                last_seen[k] = i
        dets = detections([truth[k] for k in visible], rng)
        out = tracker.update(i, dets)
        assert len(out) == len(visible)
        for rec in out:
            same = [np.array_equal(rec.landmarks_raw, d) for d in dets.landmarks]
            k = visible[same.index(True)]
            owner.setdefault(rec.track_id, set()).add(k)
            ids_of_face[k].add(rec.track_id)
    assert hidden >= 8 and 3 <= longest_miss <= tracker.max_gap, "occlusions must fit max_gap"
    assert all(len(ids) == 1 for ids in ids_of_face.values()), ids_of_face
    assert all(len(faces) == 1 for faces in owner.values()), owner
    assert sorted(owner) == [0, 1, 2]


def test_fast_motion_is_followed_by_velocity_prediction():
    """A face accelerating to 0.8 face sizes per frame keeps its id thanks to prediction."""
    rng = np.random.default_rng(2)
    speed = np.minimum(0.05 * np.arange(30), 0.8) * 100  # px per frame, face size 100
    x = 50 + np.cumsum(speed)
    frames = [detections([face(x[i], 200, 100)], rng) for i in range(30)]
    ids = {rec.track_id for out in run(Tracker(), frames) for rec in out}
    assert ids == {0}
    # without velocity (prediction = last position) the same face falls apart
    no_prediction = Tracker()
    no_prediction._predict = lambda track, frame_index: track.state
    ids = {rec.track_id for out in run(no_prediction, frames) for rec in out}
    assert len(ids) > 1


def test_gate_rejects_far_detection():
    rng = np.random.default_rng(3)
    tracker = Tracker()
    first = tracker.update(0, detections([face(100, 100, 80)], rng))
    jumped = tracker.update(1, detections([face(400, 100, 80)], rng))  # 3.75 face sizes away
    grown = tracker.update(2, detections([face(400, 100, 200)], rng))  # 2.5x larger
    assert first[0].track_id != jumped[0].track_id
    assert grown[0].track_id not in (first[0].track_id, jumped[0].track_id)
    cost = tracker.cost_matrix(3, detections([face(100, 100, 80)], rng))
    assert cost.shape == (3, 1)
    assert np.isfinite(cost[0, 0]) and np.isinf(cost[1:, 0]).all()


@pytest.mark.parametrize("missing, same_id", [(3, True), (8, True), (9, False), (15, False)])
def test_gap_keeps_or_ends_track(missing, same_id):
    rng = np.random.default_rng(4)
    n = 40
    gap = range(15, 15 + missing)
    frames = [
        Detections.empty() if i in gap else detections([face(100 + 2.0 * i, 150, 90)], rng)
        for i in range(n)
    ]
    outs = run(Tracker(max_gap=8), frames)
    ids = [rec.track_id for out in outs for rec in out]
    assert (len(set(ids)) == 1) is same_id
    if not same_id:
        assert ids[-1] > ids[0]


def test_three_frame_gap_is_interpolated_under_the_same_id():
    rng = np.random.default_rng(5)
    n = 60
    truth = [face(100 + 3.0 * i, 150 + 10 * np.sin(i / 8), 90) for i in range(n)]
    frames = [
        Detections.empty() if i in (30, 31, 32) else detections([truth[i]], rng) for i in range(n)
    ]
    tracks = group_by_track(rec for out in run(Tracker(), frames) for rec in out)
    assert list(tracks) == [0]
    smoothed = smooth_track(tracks[0])
    assert [f.frame_index for f in smoothed] == list(range(n))
    filled = [f for f in smoothed if f.interpolated]
    assert [f.frame_index for f in filled] == [30, 31, 32]
    assert all(f.landmarks_raw is None and f.score is None for f in filled)
    for f in filled:
        err = np.linalg.norm(f.landmarks - truth[f.frame_index][0], axis=-1).mean()
        assert err < 2.5, err
        assert np.abs(f.box - truth[f.frame_index][1]).mean() < 3.0


def test_reset_ends_tracks_and_never_reuses_ids():
    rng = np.random.default_rng(6)
    tracker = Tracker()
    two = [face(100, 100, 80), face(300, 100, 80)]
    before = {r.track_id for i in range(5) for r in tracker.update(i, detections(two, rng))}
    assert before == {0, 1} and sorted(tracker.live_ids) == [0, 1]
    tracker.reset()
    assert tracker.live_ids == []
    after = {r.track_id for i in range(5, 10) for r in tracker.update(i, detections(two, rng))}
    assert len(after) == 2 and min(after) > max(before)
    tracker.reset()  # frame numbering may restart after a reset (e.g. a new clip)
    again = {r.track_id for r in tracker.update(0, detections(two, rng))}
    assert len(again) == 2 and min(again) > max(after)


def test_new_face_entering_gets_new_id_and_others_keep_theirs():
    rng = np.random.default_rng(7)
    tracker = Tracker()
    ids_a = set()
    for i in range(30):
        faces = [face(100 + i, 200, 90)] + ([face(400, 200 - i, 70)] if i >= 12 else [])
        out = tracker.update(i, detections(faces, rng))
        ids_a.add(out[0].track_id)
        if i >= 12:
            assert out[1].track_id == 1
    assert ids_a == {0}


def test_min_hits_suppresses_one_frame_false_positives():
    rng = np.random.default_rng(8)
    tracker = Tracker(min_hits=3)
    reported = []
    for i in range(10):
        faces = [face(100 + i, 100, 80)] + ([face(400, 300, 60)] if i == 4 else [])
        reported.append(tracker.update(i, detections(faces, rng)))
    assert [len(out) for out in reported] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert {r.track_id for out in reported for r in out} == {0}


def test_update_does_not_mutate_and_fills_records():
    rng = np.random.default_rng(9)
    dets = detections([face(100, 100, 80), face(300, 120, 90)], rng)
    copies = (dets.boxes.copy(), dets.landmarks.copy(), dets.scores.copy())
    out = Tracker().update(0, dets)
    assert len(out) == 2
    for rec, j in zip(out, range(2)):
        assert not rec.interpolated and rec.score == pytest.approx(float(dets.scores[j]))
        np.testing.assert_array_equal(rec.landmarks, dets.landmarks[j])
        np.testing.assert_array_equal(rec.landmarks_raw, dets.landmarks[j])
        assert not np.shares_memory(rec.landmarks, dets.landmarks)
        assert rec.landmarks_raw is not rec.landmarks
    for before, after in zip(copies, (dets.boxes, dets.landmarks, dets.scores)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"iou_weight": 1.5}, ValueError),
        ({"max_gap": -1}, ValueError),
        ({"min_hits": 0}, ValueError),
        ({"max_landmark_dist": 0}, ValueError),
        ({"velocity_smoothing": 0}, ValueError),
        ({}, None),
    ],
)
def test_tracker_arguments(kwargs, error):
    if error is None:
        Tracker(**kwargs)
    else:
        with pytest.raises(error):
            Tracker(**kwargs)


def test_frame_index_must_increase():
    tracker = Tracker()
    tracker.update(3, Detections.empty())
    with pytest.raises(ValueError, match="increase"):
        tracker.update(3, Detections.empty())

