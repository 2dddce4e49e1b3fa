"""Detection that follows the faces (``faces.follow``): full frames every K frames, crops between.

A ``SquareDetector`` finds white squares (the "faces") in whatever picture it is given, whole
frame or crop, so the schedule's crops and their mapping back to frame pixels are checked
against the truth drawn into each frame.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest

from gpen_video.faces.follow import FollowingDetector
from gpen_video.plan import Planner
from gpen_video.records import Detections, Frame

SIZE = (360, 640)  # (H, W)
FACE = 40


class SquareDetector:
    """Finds white squares: box = the square, landmarks at fixed places inside it. Records the
    shape of every picture it is given, call by call."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []

    def detect(self, images):
        self.calls.append([im.shape for im in images])
        out = []
        for im in images:
            count, _, stats, _ = cv2.connectedComponentsWithStats((im[..., 0] > 128).astype(np.uint8))
            boxes = np.array([[x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5] for x, y, w, h, _ in stats[1:count]],
                             np.float32).reshape(-1, 4)
            unit = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)
            size = boxes[:, 2:] - boxes[:, :2]
            landmarks = boxes[:, None, :2] + unit[None] * size[:, None]
            out.append(Detections(boxes, landmarks.astype(np.float32), np.full(len(boxes), 0.99, np.float32)))
        return out

    @property
    def full_calls(self) -> int:
        return sum(1 for c in self.calls if c == [(*SIZE, 3)])


def square_frames(n: int, corners) -> list[Frame]:
    """n frames with a white FACE-pixel square at ``corners(i)`` (a list of (x, y); none: empty)."""
    frames = []
    for i in range(n):
        rgb = np.full((*SIZE, 3), 30, np.uint8)
        for x, y in corners(i):
            rgb[y:y + FACE, x:x + FACE] = 255
        frames.append(Frame(i, i, Fraction(1, 25), rgb))
    return frames


def test_no_faces_costs_one_full_detection_every_k_frames():
    detector = SquareDetector()
    follow = FollowingDetector(detector, every=10)
    found = [follow.update(f) for f in square_frames(100, lambda i: [])]
    assert all(len(d) == 0 for d in found)
    assert len(detector.calls) == detector.full_calls == 10
    assert (follow.full_frames, follow.crop_frames) == (10, 0)


def test_a_followed_face_is_detected_in_one_crop_per_frame_in_frame_pixels():
    detector = SquareDetector()
    follow = FollowingDetector(detector, every=10, margin=2.0)
    frames = square_frames(60, lambda i: [(100 + 3 * i, 150 + i)])
    found = [follow.update(f) for f in frames]
    for i, det in enumerate(found):
        assert len(det) == 1, i
        np.testing.assert_allclose(det.boxes[0], [99.5 + 3 * i, 149.5 + i, 139.5 + 3 * i, 189.5 + i], atol=1e-4)
    assert detector.full_calls == 6  # frames 0, 10, ..., 50
    crops = [c for c in detector.calls if c != [(*SIZE, 3)]]
    assert len(crops) == 54 and all(c == [(96, 96, 3)] for c in crops)  # 2 x 40 px, rounded up to 32s


@pytest.mark.parametrize("enters", [1, 23, 37])
def test_a_face_entering_is_found_within_k_frames(enters):
    every = 8
    follow = FollowingDetector(SquareDetector(), every=every)
    frames = square_frames(60, lambda i: [(300, 100)] if i >= enters else [])
    first = next(i for i, f in enumerate(frames) if len(follow.update(f)))
    assert enters <= first < enters + every


def test_a_lost_face_sends_the_frame_to_full_detection_and_new_faces_halve_k():
    detector = SquareDetector()
    follow = FollowingDetector(detector, every=10)
    # one face jumps far at frame 5 (out of its crop): found again in the same frame
    frames = square_frames(20, lambda i: [(100, 100)] if i < 5 else [(500, 250)])
    found = [follow.update(f) for f in frames]
    assert all(len(d) == 1 for d in found)
    assert detector.calls[5] == [(96, 96, 3)] and detector.calls[6] == [(*SIZE, 3)]
    assert found[5].boxes[0][0] == pytest.approx(499.5)
    # the face lost is still looked for in its crop for ``keep`` frames, beside the new one's
    assert detector.calls[7] == [(96, 96, 3)] * 2
    # that full detection found a face not followed before: the next one comes 5 frames later
    fulls = [n for n, c in enumerate(detector.calls) if c == [(*SIZE, 3)]]
    assert fulls[:3] == [0, 6, 11]


def test_scene_cuts_and_reset_detect_the_whole_frame():
    detector = SquareDetector()
    follow = FollowingDetector(detector, every=10)
    frames = square_frames(12, lambda i: [(100, 100)])
    for f in frames[:4]:
        follow.update(f)
    follow.update(frames[4], shot_start=True)
    follow.reset()
    follow.update(frames[5])
    assert [c == [(*SIZE, 3)] for c in detector.calls] == [True, False, False, False, True, True]


def test_crops_covering_most_of_the_frame_give_way_to_a_full_detection():
    detector = SquareDetector()
    follow = FollowingDetector(detector, every=10)
    corners = [(x, y) for x in (10, 160, 310, 460) for y in (10, 100, 190, 280)]  # 16 crops > half the frame
    for f in square_frames(5, lambda i: corners):
        assert len(follow.update(f)) == 16
    assert detector.full_calls == 5


def test_following_matches_every_frame_detection_on_the_planner():
    """The planner's tracks with K = 6 equal those of detecting every frame whole, for faces
    that stay in view (the squares' detections are exact either way)."""
    corners = lambda i: [(60 + 2 * i, 80), (400 - i, 200 + i)]  # noqa: E731
    every_frame = list(Planner(SquareDetector(), detect_every=1).plan(square_frames(50, corners)))
    followed = list(Planner(SquareDetector(), detect_every=6).plan(square_frames(50, corners)))
    for a, b in zip(every_frame, followed):
        assert [f.track_id for f in a.faces] == [f.track_id for f in b.faces]
        for fa, fb in zip(a.faces, b.faces):
            np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=1e-4)


def test_a_segment_observed_from_its_start_is_observed_alike():
    """The schedule restarts at each segment: observing frames k.. of a segment boundary k
    gives the very detections and features of observing the whole stream (resume, Ray)."""
    corners = lambda i: [(60 + 2 * i, 80)] + ([(400, 200)] if i >= 17 else [])  # noqa: E731
    frames = square_frames(60, corners)
    planner = Planner(SquareDetector(), detect_every=8)
    segment_of = lambda f: f.index // 25  # noqa: E731
    whole = list(planner.observe(frames, segment_of=segment_of))
    resumed = list(planner.observe(frames[25:], segment_of=segment_of))
    for a, b in zip(whole[25:], resumed):
        assert np.array_equal(a.detections.boxes, b.detections.boxes)
        assert np.array_equal(a.detections.landmarks, b.detections.landmarks)
        assert np.array_equal(a.cut.chroma, b.cut.chroma)
