"""Detection that follows the faces: the whole frame now and then, crops around known faces between.

Full-frame detection costs the same whatever the frame shows, and most frames show the faces
of the frame before, a little moved. ``FollowingDetector.update`` therefore detects the whole
frame (its copy of long side ``detect_size``) only

- on the first frame after ``reset`` (a segment's start) and on a scene cut;
- every ``every`` frames (K), or ceil(K/2) frames after a full detection (other than the
  first of a shot) found a face that was not being followed (new faces come together: a
  crowd, a group walking in);
- on a frame where a face found in the frame before is not found again in its crop (it
  turned, left or was hidden): the whole frame is searched at once;

and in between only square crops around each known face's predicted box (constant velocity),
cut from the same copy at the same scale, all in one detector call. A frame with no known face
and no full detection due costs nothing. So a face entering the frame is found within K frames,
and the cost per frame follows the faces, not the frame size. Everything depends only on the
frames since ``reset``: a resumed job and a Ray worker starting at a segment detect alike.

``every`` = 1 detects every whole frame: the reference the planner batches itself
(``Planner(detect_every=1)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpen_video.faces.detect import FaceDetector
from gpen_video.faces.pictures import scaled_picture
from gpen_video.faces.track import box_iou
from gpen_video.records import Detections, Frame

MIN_CROP = 32
"""Smallest crop side (pixels of the detector's copy): RetinaFace's coarsest stride."""


@dataclass
class _Known:
    """A face being followed: its box when last found, and its velocity (frame pixels)."""

    box: np.ndarray  # [4] float64 x1, y1, x2, y2
    velocity: np.ndarray  # [4] per frame
    last: int  # frame index last found

    def predicted(self, index: int) -> np.ndarray:
        return self.box + self.velocity * (index - self.last)


def to_frame_pixels(det: Detections, offset: tuple[float, float], sx: float, sy: float) -> Detections:
    """Detections in a picture cut at ``offset`` from a copy scaled by (sx, sy), in frame pixels."""
    x0, y0 = offset
    boxes = (det.boxes + np.array([x0, y0, x0, y0], np.float32)) / np.array([sx, sy, sx, sy], np.float32)
    landmarks = (det.landmarks + np.array([x0, y0], np.float32)) / np.array([sx, sy], np.float32)
    return Detections(boxes.astype(np.float32), landmarks.astype(np.float32), det.scores)


class FollowingDetector:
    """Runs a detector on whole frames every K frames and on crops around the faces between.

    Args:
        detector: finds faces in the pictures given (whole copies or crops).
        every: K, most frames between two full-frame detections. Higher: cheaper (a face-free
            video costs ~1/K of detecting every frame), but a face entering the frame is found
            up to K frames later; lower: found sooner, costs more. 1: every frame whole.
        detect_size: long side of the copy detected (``faces.pictures.scaled_picture``); None:
            the frame's own size.
        margin: crop side in face sizes (the longer side of the predicted box). Higher follows
            faster motion and worse predictions, and costs more per face; lower is cheaper.
        keep: frames a face not found again is still searched for in its crop (the tracker's
            ``max_gap``). Longer finds a face again after a longer miss, at the cost of crops.
        max_share: crops cost more than the whole frame when their area passes this share of
            it; the whole frame is detected then.

    Example:
        >>> from fractions import Fraction
        >>> class NoFaces:
        ...     calls = 0
        ...     def detect(self, images):
        ...         NoFaces.calls += 1
        ...         return [Detections.empty() for _ in images]
        >>> follow = FollowingDetector(NoFaces(), every=10)
        >>> frames = [Frame(i, i, Fraction(1, 25), np.zeros((64, 64, 3), np.uint8)) for i in range(30)]
        >>> [len(follow.update(f)) for f in frames] == [0] * 30, NoFaces.calls
        (True, 3)
    """

    def __init__(self, detector: FaceDetector, *, every: int, detect_size: int | None = None, margin: float = 2.0,
                 keep: int = 8, max_share: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin}")
        self.detector = detector
        self.every = every
        self.detect_size = detect_size
        self.margin = margin
        self.keep = keep
        self.max_share = max_share
        self.full_frames = 0
        """Frames detected whole so far (counts for tests and benchmarks)."""
        self.crop_frames = 0
        """Frames detected in crops only so far."""
        self.reset()

    def reset(self) -> None:
        """Forget every face (a segment's start): the next frame is detected whole."""
        self._known: list[_Known] = []
        self._since: int | None = None
        self._interval = self.every

    def update(self, frame: Frame, *, shot_start: bool = False) -> Detections:
        """The faces of the next frame (indices increasing), in its pixels.

        Args:
            frame: the frame.
            shot_start: the frame starts a new shot (a scene cut): detected whole.
        """
        index = frame.index
        live = [k for k in self._known if index - k.last <= self.keep]
        fresh = shot_start or self._since is None  # every face is new: no reason to look sooner
        self._since = None if self._since is None else self._since + 1
        due = fresh or self._since >= self._interval
        if not due and not live:
            self._known = []
            return Detections.empty()
        picture, sx, sy = scaled_picture(frame, self.detect_size)
        found = None if due else self._in_crops(picture, sx, sy, live, index)
        matched = None if found is None else self._matches(live, found, index)
        if matched is not None and _lost(live, matched, index):
            found = None
        if found is None:
            found = to_frame_pixels(self.detector.detect([picture])[0], (0.0, 0.0), sx, sy)
            matched = self._matches(live, found, index)
            new = len(found) - len(matched)
            self._interval = self.every if new == 0 or fresh else math.ceil(self.every / 2)
            self._since = 0
            self.full_frames += 1
        else:
            self.crop_frames += 1
        self._known = _remembered(live, found, matched, index)
        return found

    def _in_crops(self, picture: np.ndarray, sx: float, sy: float, live: list[_Known],
                  index: int) -> Detections | None:
        """The faces found in one square crop per known face (all crops of one size, one
        detector call), in frame pixels; None where the crops would cost more than the frame."""
        height, width = picture.shape[:2]
        scale = np.array([sx, sy, sx, sy])
        boxes = [k.predicted(index) * scale for k in live]  # picture pixels
        side = max(MIN_CROP, max(max(b[2] - b[0], b[3] - b[1]) * self.margin for b in boxes))
        side = MIN_CROP * math.ceil(side / MIN_CROP)
        if side > min(height, width) or len(boxes) * side * side > self.max_share * height * width:
            return None
        corners = []
        for b in boxes:
            # on the whole picture's grid of the coarsest stride, so the network's anchors fall
            # where they fall in a full detection, and the landmarks agree with it
            x0 = min(MIN_CROP * round((b[0] + b[2] - side) / 2 / MIN_CROP), width - side)
            y0 = min(MIN_CROP * round((b[1] + b[3] - side) / 2 / MIN_CROP), height - side)
            x0, y0 = max(int(x0), 0), max(int(y0), 0)
            if (x0, y0) not in corners:
                corners.append((x0, y0))
        results = self.detector.detect([picture[y0:y0 + side, x0:x0 + side] for x0, y0 in corners])
        kept = []
        for (x0, y0), det in zip(corners, results):
            b = det.boxes
            # a face cut by the crop's edge is left to the crop around it (or the next full detection)
            whole = (((b[:, 0] > 0.5) | (x0 == 0)) & ((b[:, 1] > 0.5) | (y0 == 0))
                     & ((b[:, 2] < side - 1.5) | (x0 + side == width)) & ((b[:, 3] < side - 1.5) | (y0 + side == height)))
            kept.append(to_frame_pixels(det.select(whole), (x0, y0), sx, sy))
        merged = Detections(np.concatenate([d.boxes for d in kept]), np.concatenate([d.landmarks for d in kept]),
                            np.concatenate([d.scores for d in kept]))
        return _suppressed(merged)

    def _matches(self, live: list[_Known], found: Detections, index: int) -> dict[int, int]:
        """Greedy pairs {detection: known face} whose centres are within half a face size."""
        pairs = []
        for j, k in enumerate(live):
            p = k.predicted(index)
            size = max(p[2] - p[0], p[3] - p[1], 1e-6)
            for i, b in enumerate(found.boxes):
                distance = math.hypot((b[0] + b[2] - p[0] - p[2]) / 2, (b[1] + b[3] - p[1] - p[3]) / 2) / size
                if distance < 0.5:
                    pairs.append((distance, i, j))
        matched: dict[int, int] = {}
        for _, i, j in sorted(pairs):
            if i not in matched and j not in matched.values():
                matched[i] = j
        return matched


def _lost(live: list[_Known], matched: dict[int, int], index: int) -> bool:
    """Whether a face found in the frame before has no detection ``matched`` to it."""
    return any(k.last == index - 1 and j not in matched.values() for j, k in enumerate(live))


def _remembered(live: list[_Known], found: Detections, matched: dict[int, int], index: int) -> list[_Known]:
    """The faces known after ``index``: those found (continuing their ``matched`` known face's
    motion) and the known ones not found (``update`` drops those ``keep`` frames after they were
    last found)."""
    known = [k for j, k in enumerate(live) if j not in matched.values()]
    for i, box in enumerate(found.boxes.astype(np.float64)):
        if i in matched:
            k = live[matched[i]]
            step = (box - k.box) / (index - k.last)
            known.append(_Known(box, 0.5 * (k.velocity + step), index))
        else:
            known.append(_Known(box, np.zeros(4), index))
    return known


def _suppressed(det: Detections, iou: float = 0.4) -> Detections:
    """The detections without those overlapping a higher-scored one by more than ``iou`` (the
    same face found in two crops), highest score first."""
    order = np.argsort(-det.scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if not keep or box_iou(det.boxes[i:i + 1], det.boxes[keep]).max() <= iou:
            keep.append(int(i))
    return det.select(np.array(keep, np.int64))
