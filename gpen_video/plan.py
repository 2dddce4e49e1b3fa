"""Frames in, frames with the faces to restore out, in one decode.

::

    frames ─► detect thread: scene-cut signature, detector in batches
           ─► track (reset at scene cuts) ─► smooth (zero-phase look-ahead, gaps filled)
           ─► select per track ─► PlannedFrame

Each frame is held until the smoother has seen the later frames its fit reaches
(``LookaheadSmoother.context``), so the landmarks equal those of smoothing every whole track,
while detection of later frames runs in a background thread. Nothing is kept per frame or per
face beyond that window, however long the video: the report, if any, goes to its own spool.

What detection finds in a frame (its faces and its scene-cut features) is an ``Observation``:
everything the planner needs of the frame besides its index and pts. A resumed job replays the
observations an earlier run logged (``Planner.plan(..., replay=...)``) instead of decoding and
detecting those frames again; the tracker, smoother, cut detector and selection then reach the
state of an uninterrupted run exactly, so the frames after them are planned alike.

Which faces are restored is decided per track, never per frame, so a restored face neither
flickers on and off nor jumps between two similar people:

- ``min_face``: a track is restored from the first frame at which the median size (shorter
  box side) of its detections within ``context`` frames either side reaches ``min_face``; from
  then on it stays restored until it ends.
- ``only_largest_face``: when no track is chosen, the restorable track of the frame with the
  largest median size (lowest id on a tie) is chosen; it stays chosen until it ends (a scene
  cut ends every track), then the next one is chosen the same way.
- ``skip_tracks``: ids (as in the report) that are never restored.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gpen_video.engine import Stages
from gpen_video.faces.detect import FaceDetector, runs_torch_network
from gpen_video.faces.fade import TrackFader
from gpen_video.faces.pose import fade_reach
from gpen_video.faces.follow import FollowingDetector, to_frame_pixels
from gpen_video.faces.pictures import scaled_picture
from gpen_video.faces.scenes import CutFeatures, SceneCutDetector, frame_cut_features
from gpen_video.faces.smooth import LookaheadSmoother
from gpen_video.faces.track import Tracker
from gpen_video.records import Detections, Frame, TrackedFace
from gpen_video.restore.temporal import TemporalSettings


class ReportSink(Protocol):
    """What the planner feeds a report (``report.ReportWriter`` is one): every released
    frame with its tracked faces and the ids restored in it, and every scene cut."""

    def add_frame(self, frame: Frame, faces: Sequence[TrackedFace], restored: Collection[int]) -> None: ...

    def add_scene_cut(self, frame_index: int) -> None: ...


@dataclass(frozen=True)
class Observation:
    """What detection found in one frame: all the planner needs of it besides its index and pts.

    Attributes:
        frame: the frame. A replayed frame has no pixels: its ``rgb`` is a read-only
            placeholder of the right shape and dtype (``placeholder_frame``).
        detections: the detector's faces, in the frame's pixels.
        cut: the frame's scene-cut features (``faces.scenes.cut_features``).
    """

    frame: Frame
    detections: Detections
    cut: CutFeatures

    def without_pixels(self) -> Observation:
        """This observation with a placeholder frame: what a log of many frames may keep."""
        f = self.frame
        height, width = f.shape[:2]
        return dataclasses.replace(self, frame=placeholder_frame(f.index, f.pts, f.time_base, height, width,
                                                                 f.dtype))


def placeholder_frame(index: int, pts: int | None, time_base, height: int, width: int, dtype) -> Frame:
    """A frame without pixels for a replayed ``Observation``: zeros through a zero-strided view,
    so it costs no memory and cannot be written to."""
    rgb = np.broadcast_to(np.zeros((1, 1, 3), dtype), (height, width, 3))
    return Frame(index, pts, time_base, rgb)


@dataclass(frozen=True)
class PlannedFrame:
    """One frame and its faces, released once the look-ahead has seen enough later frames.

    Attributes:
        observation: the frame as read (not modified) and what detection found in it.
        faces: the faces to restore, smoothed (gaps filled), by track id, each with its paste
            weight (> 0; faces faded out to 0 are not listed).
        tracked: every tracked face of the frame, restored or not, by track id.
    """

    observation: Observation
    faces: tuple[TrackedFace, ...]
    tracked: tuple[TrackedFace, ...]

    @property
    def frame(self) -> Frame:
        return self.observation.frame


@dataclass(frozen=True)
class PlanStats:
    """Counts of one plan (final once it is exhausted).

    Attributes:
        frames: frames released.
        scene_cuts: shots started after the first.
        tracks: tracks with at least one face released.
        restored_tracks: tracks with at least one face to restore.
    """

    frames: int
    scene_cuts: int
    tracks: int
    restored_tracks: int


@dataclass
class _TrackState:
    """What the selection knows of one live track."""

    on: bool = False


class Planner:
    """Detects, tracks, smooths and selects the faces of a stream of frames; reusable across videos.

    Args:
        detector: finds the faces; called from a background thread with ``detect_batch``
            frames at a time.
        smooth_window: smoother length in frames (``smooth_track``). Longer: steadier faces,
            slower reaction to motion, and more frames held (see ``delay``).
        max_gap: frames a track may go undetected and still be continued, the gap filled in
            (``Tracker``). Longer bridges longer misses but holds more frames.
        min_face: smallest median face size (pixels, shorter box side) of a restored track.
        only_largest_face: restore one track at a time (see the module docstring).
        skip_tracks: track ids never restored.
        detect_batch: frames per detector call when every frame is detected whole
            (``detect_every`` <= 1). Higher: better accelerator use, more frames held.
        detect_every: K, most frames between two full-frame detections; between them the
            detector sees only crops around the faces it follows (``faces.follow``). Higher:
            cheaper, a new face found up to K frames late. 0 or 1: every frame whole.
        detect_size: long side of the copy of each frame the detector sees (made from the
            decoded samples, ``faces.pictures``); None: the frame itself.
        chunk: frames smoothed per call. Higher: less smoothing work per frame, more frames
            held.
        temporal: the pose and track fades of ``TemporalSettings`` (``faces.fade``), which hold
            ``fade_reach`` more frames; None: every selected face has weight 1.

    Example:
        >>> import numpy as np
        >>> from fractions import Fraction
        >>> from gpen_video.records import Detections, Frame
        >>> class NoFaces:
        ...     def detect(self, images):
        ...         return [Detections.empty() for _ in images]
        >>> planner = Planner(NoFaces())
        >>> frames = (Frame(i, i, Fraction(1, 25), np.zeros((8, 8, 3), np.uint8)) for i in range(50))
        >>> plan = planner.plan(frames)
        >>> [p.frame.index for p in plan] == list(range(50)), plan.stats.frames
        (True, 50)
    """

    def __init__(
        self,
        detector: FaceDetector,
        *,
        smooth_window: int = 9,
        max_gap: int = 8,
        min_face: int = 24,
        only_largest_face: bool = False,
        skip_tracks: Iterable[int] = (),
        detect_batch: int = 8,
        detect_every: int = 1,
        detect_size: int | None = None,
        chunk: int = 16,
        temporal: TemporalSettings | None = None,
    ) -> None:
        if smooth_window < 1:
            raise ValueError(f"smooth_window must be >= 1, got {smooth_window}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        if detect_batch < 1:
            raise ValueError(f"detect_batch must be >= 1, got {detect_batch}")
        self.detector = detector
        self.smooth_window = smooth_window
        self.max_gap = max_gap
        self.min_face = min_face
        self.only_largest_face = only_largest_face
        self.skip_tracks = frozenset(skip_tracks)
        self.detect_batch = detect_batch
        if detect_every < 0:
            raise ValueError(f"detect_every must be >= 0, got {detect_every}")
        self.detect_every = detect_every
        self.detect_size = detect_size
        self.chunk = chunk
        self.temporal = temporal
        self._lookahead = LookaheadSmoother(window=smooth_window, max_gap=max_gap, chunk=chunk)

    @property
    def delay(self) -> int:
        """Most frames the planner holds at once (read, not yet released): the look-ahead,
        plus the detection queue and the batch being detected."""
        return self._lookahead.delay + 3 * self.detect_batch + self.fade_reach

    @property
    def fade_reach(self) -> int:
        """Frames a frame is held after the smoother released it, until its weights are final."""
        t = self.temporal
        return 0 if t is None else max(fade_reach(t.fade_frames), t.min_track_frames - 1)

    @property
    def context(self) -> int:
        """Frames either side of a frame that its smoothing and its ``min_face`` median see."""
        return self._lookahead.context

    def plan(
        self,
        frames: Iterable[Frame],
        *,
        stages: Stages | None = None,
        report: ReportSink | None = None,
        replay: Iterable[Observation] = (),
        segment_of: Callable[[Frame], int] | None = None,
    ) -> Plan:
        """Plan one video: ``frames`` in order, consecutive indices (the first may be any).

        Args:
            frames: the decoded frames; iterated in a background thread.
            stages: the job's stage threads (the detection thread joins them, its time goes
                to ``stages.timer`` as "detect" and "plan"); None: the plan runs its own and
                stops them when exhausted or closed.
            report: fed every released frame and scene cut (not written: call its ``write``).
            replay: observations of the frames before ``frames``, logged by an earlier run:
                planned exactly as if their frames had been detected, without pixels. Their
                planned frames come first (with the placeholder pixels they came with).
            segment_of: the segment (unit of work of a resumable job) of a frame. Detection
                batches never span two segments, so a job resumed at a segment detects every
                frame in the same batch as an uninterrupted one (a batch's company can change
                a detector's result in the last bits on some devices). None: one segment.

        Returns:
            An iterator of ``PlannedFrame``, one per frame, in order; its ``stats`` are final
            once it is exhausted.
        """
        return Plan(self, frames, stages, report, replay, segment_of)

    def observe(
        self, frames: Iterable[Frame], *, segment_of: Callable[[Frame], int] | None = None,
        stages: Stages | None = None,
    ) -> Iterator[Observation]:
        """What detection finds in each frame (faces, scene-cut features), in the caller's
        thread: the first half of ``plan``, which a job spread over workers runs where the
        frames are decoded, and whose results ``plan(replay=...)`` then takes.

        Args:
            frames: the frames, in order.
            segment_of: as for ``plan``: batches never span two segments.
            stages: where the detector's time goes ("detect"); None: not timed.
        """
        if self.detect_every > 1:
            yield from self._followed(frames, segment_of, stages)
            return
        batch: list[tuple[Frame, np.ndarray, float, float, CutFeatures]] = []
        segment = None

        def detect() -> Iterator[Observation]:
            start = time.perf_counter()
            found = self.detector.detect([picture for _, picture, _, _, _ in batch])
            if stages is not None:
                stages.time("detect", time.perf_counter() - start)
            if len(found) != len(batch):
                raise ValueError(f"the detector returned {len(found)} results for {len(batch)} images")
            for (frame, _, sx, sy, cut), detections in zip(batch, found):
                yield Observation(frame, to_frame_pixels(detections, (0.0, 0.0), sx, sy), cut)

        for frame in frames:
            if segment_of is not None:
                segment, previous = segment_of(frame), segment
                if batch and segment != previous:
                    yield from detect()
                    batch = []
            batch.append((frame, *scaled_picture(frame, self.detect_size), frame_cut_features(frame)))
            if len(batch) == self.detect_batch:
                yield from detect()
                batch = []
        if batch:
            yield from detect()

    def _followed(self, frames: Iterable[Frame], segment_of: Callable[[Frame], int] | None,
                  stages: Stages | None) -> Iterator[Observation]:
        """``observe`` with ``detect_every`` > 1: a ``FollowingDetector``, and scene cuts of its
        own (both reset at each segment, so a segment is detected alike wherever it starts)."""
        follow = FollowingDetector(self.detector, every=self.detect_every, detect_size=self.detect_size,
                                   keep=self.max_gap)
        cuts = SceneCutDetector()
        segment = None
        for frame in frames:
            start = time.perf_counter()
            if segment_of is not None:
                segment, previous = segment_of(frame), segment
                if segment != previous:
                    follow.reset()
                    cuts.reset()
            cut = frame_cut_features(frame)
            detections = follow.update(frame, shot_start=cuts.update_features(cut))
            if stages is not None:
                stages.time("detect", time.perf_counter() - start)
            yield Observation(frame, detections, cut)


class Plan(Iterator[PlannedFrame]):
    """The frames of one video with their faces; made by ``Planner.plan``."""

    def __init__(self, planner: Planner, frames: Iterable[Frame], stages: Stages | None, report: ReportSink | None,
                 replay: Iterable[Observation] = (), segment_of: Callable[[Frame], int] | None = None):
        self._planner = planner
        self._segment_of = segment_of
        self._own_stages = stages is None
        self._stages = Stages() if stages is None else stages
        self._report = report
        self._tracker = Tracker(max_gap=planner.max_gap)
        self._smoother = LookaheadSmoother(window=planner.smooth_window, max_gap=planner.max_gap, chunk=planner.chunk)
        self._sizes: dict[int, deque[tuple[int, float]]] = {}
        self._live: dict[int, _TrackState] = {}
        self._chosen: int | None = None
        self._restored_live: set[int] = set()  # live tracks restored in some frame so far
        fade = planner.temporal
        self._fader = None if fade is None else TrackFader(fade.fade, planner.fade_reach)
        self._frames = self._cuts = self._tracks = self._restored = 0
        self._run = self._planned(replay, frames)

    @property
    def stats(self) -> PlanStats:
        return PlanStats(self._frames, self._cuts, self._tracks, self._restored)

    def __next__(self) -> PlannedFrame:
        return next(self._run)

    def close(self) -> None:
        """Stop early: stop the detection thread if the plan runs its own."""
        self._run.close()

    # ------------------------------------------------------------------ detection thread

    # ------------------------------------------------------------------ caller's thread

    def _planned(self, replay: Iterable[Observation], frames: Iterable[Frame]) -> Iterator[PlannedFrame]:
        detect_batch = self._planner.detect_batch
        held: deque[tuple[Observation, bool]] = deque()
        cuts = SceneCutDetector()
        try:
            observed = self._planner.observe(frames, segment_of=self._segment_of, stages=self._stages)
            detected = self._stages.prefetch(observed, 2 * detect_batch, name="detect",
                                             network=runs_torch_network(self._planner.detector))
            for n, seen in enumerate(itertools.chain(replay, detected)):
                start = time.perf_counter()
                frame = seen.frame
                cut = cuts.update_features(seen.cut) and n > 0
                if cut:
                    self._tracker.reset()
                    self._cuts += 1
                    if self._report is not None:
                        self._report.add_scene_cut(frame.index)
                faces = self._tracker.update(frame.index, seen.detections)
                for face in faces:
                    self._sizes.setdefault(face.track_id, deque()).append((face.frame_index, face.size))
                held.append((seen, cut or n == 0))
                ready = self._faded(self._release(*held.popleft(), i, fs) for i, fs in self._smoother.push(frame.index, faces))
                self._stages.time("plan", time.perf_counter() - start)
                yield from ready
            start = time.perf_counter()
            ready = self._faded([self._release(*held.popleft(), i, fs) for i, fs in self._smoother.finish()], end=True)
            self._stages.time("plan", time.perf_counter() - start)
            yield from ready
        finally:
            if self._own_stages:
                self._stages.close()

    def _faded(self, selected: Iterable[tuple[PlannedFrame, bool]], end: bool = False) -> list[PlannedFrame]:
        """Planned frames with their faces' paste weights, once final (``faces.fade``): faces of
        weight 0 dropped; the report and the counts fed."""
        fader = self._fader
        if fader is None:
            return [self._final(p, {f.track_id: 1.0 for f in p.faces}) for p, _ in selected]
        ready = [r for p, shot_start in selected
                 for r in fader.push(p, p.frame.index, p.tracked, [f.track_id for f in p.faces], shot_start)]
        if end:
            ready += fader.finish()
        return [self._final(p, weights) for p, weights in ready]

    def _final(self, planned: PlannedFrame, weights: dict[int, float]) -> PlannedFrame:
        faces = tuple(dataclasses.replace(f, weight=weights[f.track_id]) if weights[f.track_id] != 1.0 else f
                      for f in planned.faces if weights[f.track_id] > 0.0)
        restored = {f.track_id for f in faces}
        self._restored += len(restored - self._restored_live)
        self._restored_live = {f.track_id for f in planned.tracked} & (self._restored_live | restored)
        self._frames += 1
        if self._report is not None:
            self._report.add_frame(planned.frame, planned.tracked, restored)
        return dataclasses.replace(planned, faces=faces)

    def _median_size(self, track_id: int, index: int) -> float:
        """Median size of the track's detections within ``context`` frames of ``index``."""
        reach = self._smoother.context
        sizes = [s for i, s in self._sizes.get(track_id, ()) if abs(i - index) <= reach]
        return float(np.median(sizes)) if sizes else 0.0

    def _forget_sizes_before(self, index: int) -> None:
        for track_id in list(self._sizes):
            sizes = self._sizes[track_id]
            while sizes and sizes[0][0] < index:
                sizes.popleft()
            if not sizes:
                del self._sizes[track_id]

    def _release(self, seen: Observation, shot_start: bool, index: int,
                 faces: list[TrackedFace]) -> tuple[PlannedFrame, bool]:
        """The frame with the faces the selection restores (weights not yet applied), and
        whether it starts a shot."""
        frame = seen.frame
        if frame.index != index:
            raise AssertionError(f"released frame {index} but held frame {frame.index}")
        planner = self._planner
        self._forget_sizes_before(index - self._smoother.context)
        tracked = tuple(sorted(faces, key=lambda f: f.track_id))
        live: dict[int, _TrackState] = {}
        for face in tracked:
            state = self._live.get(face.track_id)
            if state is None:
                state = _TrackState()
                self._tracks += 1
            if not state.on and face.track_id not in planner.skip_tracks:
                state.on = self._median_size(face.track_id, index) >= planner.min_face
            live[face.track_id] = state
        self._live = live  # a track missing from a released frame has ended (gaps are filled)
        chosen = [f for f in tracked if live[f.track_id].on]
        if planner.only_largest_face:
            if self._chosen not in live:
                best = max(chosen, key=lambda f: (self._median_size(f.track_id, index), -f.track_id), default=None)
                self._chosen = None if best is None else best.track_id
            chosen = [f for f in chosen if f.track_id == self._chosen]
        return PlannedFrame(seen, tuple(chosen), tracked), shot_start
