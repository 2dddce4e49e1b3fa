"""Render a job's segments in this process, in one pass over the video.

Every frame is decoded once, from the keyframe before the first unfinished segment's read
range (``SegmentPlan.read_range``: its halo of frames before it); the segments before it are
replayed from their detection logs (``Job.replay``), so the planner reaches the state of an
uninterrupted run, and the halo's decoded pictures are put into the replayed frames. One
planner plans the whole video; the frames of unfinished segments and their halos are
restored, and each unfinished segment's frames are encoded into its own file in the work
folder (``SegmentSink``), and its detection log written beside it, then handed to
``Job.finished``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gpen_video.engine import Stages
from gpen_video.errors import DecodeError, OutputError
from gpen_video.io.decode import VideoInfo
from gpen_video.io.encode import VideoWriter
from gpen_video.jobs.logs import write_log
from gpen_video.jobs.run import Job, Rendered, SegmentDone, output_settings
from gpen_video.pipeline import DECODE_DEPTH, FramePipeline, RenderCounts
from gpen_video.plan import Observation, PlannedFrame
from gpen_video.records import Frame


class LocalRenderer:
    """Renders the segments of jobs with ``pipeline`` (its models, in this process)."""

    def __init__(self, pipeline: FramePipeline) -> None:
        self.pipeline = pipeline

    def output_settings(self) -> tuple[dict[str, object], str]:
        return output_settings(self.pipeline), self.pipeline.weights_hash

    def render(self, job: Job) -> Rendered:
        """One pass from the first unfinished segment's read range to the end."""
        layout, pipeline = job.plan.layout, self.pipeline
        first = job.manifest.first_unfinished
        prefix = len(layout) if first is None else first
        finished = frozenset(job.manifest.finished)
        unfinished = frozenset(job.unfinished)
        sink = SegmentSink(job, pipeline)
        counted = _Counted()
        counts = RenderCounts()
        job.ticker.done = job.manifest.frames_done
        try:
            with Stages(job.timer) as stages:
                frames: Iterable[Frame] = ()
                halo: dict[int, Frame] = {}
                if first is not None:
                    frames, halo = _decoded(job, first, stages)
                plan = pipeline.planner.plan(frames, stages=stages, report=job.report, replay=job.replay(range(prefix)),
                                             segment_of=layout.segment_of)
                todo = (_with_pixels(p, halo) for p in counted(plan)
                        if any(k in unfinished for k in layout.reading(p.frame)))
                for planned, frame in pipeline.render(todo, stages, layout.group_of, counts=counts,
                                                      keep=lambda f: layout.segment_of(f) not in finished):
                    start = time.perf_counter()
                    sink.write(planned, frame)
                    stages.time("encode", time.perf_counter() - start)
                    job.ticker.add(1)
                sink.finish()
        except BaseException:
            sink.abort()
            raise
        return Rendered(counted.faces, plan.stats, counts.fp32_reruns)


def _decoded(job: Job, first: int, stages: Stages) -> tuple[Iterator[Frame], dict[int, Frame]]:
    """The frames to plan from segment ``first`` on (decoded in a thread of ``stages``), and
    the decoded frames of its halo before it, by index: finished segments' frames, which the
    planner gets from their logs, so only their pictures are wanted."""
    layout = job.plan.layout
    start, _ = layout.read_range(first)
    before = range(first, first) if start is None else range(layout.segment_at(start), first)
    logged = [seen.frame for seen in job.replay(before) if seen.frame.pts is not None and seen.frame.pts >= start]
    if logged:
        decoded = job.plan.reader().frames(logged[0].pts, start_index=logged[0].index)
    else:
        replayed = sum(job.manifest.finished[k].frame_count for k in range(first))
        decoded = job.plan.reader().frames(layout.starts[first] if first > 0 else None, start_index=replayed)
    frames = stages.prefetch(decoded, DECODE_DEPTH, name="decode", timed=True)
    halo: dict[int, Frame] = {}
    for expected in logged:
        frame = next(frames, None)
        if frame is None or (frame.index, frame.pts) != (expected.index, expected.pts):
            got = "nothing" if frame is None else f"frame {frame.index} (pts {frame.pts})"
            raise DecodeError(f"{job.plan.src.name}: decoding {layout.describe(first - 1)} again gave {got} where "
                              f"its log has frame {expected.index} (pts {expected.pts}); the input changed: run "
                              "again with --restart")
        halo[frame.index] = frame
    return frames, halo


def _with_pixels(planned: PlannedFrame, halo: dict[int, Frame]) -> PlannedFrame:
    """``planned`` with its decoded picture where it is a replayed frame of the halo."""
    frame = halo.pop(planned.frame.index, None)
    if frame is None:
        return planned
    return dataclasses.replace(planned, observation=dataclasses.replace(planned.observation, frame=frame))


def render_segment(pipeline: FramePipeline, planned: Iterable[PlannedFrame], info: VideoInfo, path: Path, *,
                   group_of: Callable[[Frame], int] | None = None, keep: Callable[[Frame], bool] | None = None,
                   counts: RenderCounts | None = None) -> int:
    """Restore the planned frames of one segment and its halo (faces already chosen: a plan
    made elsewhere) and encode the segment's (``keep``) into the segment file ``path``, as a
    local job does, batched by ``group_of``. Returns the frames written; with none, no file is
    made."""
    c = pipeline.config
    writer: VideoWriter | None = None
    written = 0
    try:
        with Stages() as stages:
            for _, frame in pipeline.render(planned, stages, group_of, keep=keep, counts=counts):
                if writer is None:
                    writer = VideoWriter(path, pipeline.output_info(info), codec=c.codec, crf=c.crf, preset=c.preset,
                                         overwrite=True, copy_streams=False).__enter__()
                writer.write(frame)
                written += 1
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if writer is not None:
        writer.__exit__(None, None, None)
    return written


class _Counted:
    """Counts the faces to restore in planned frames passing through (all frames: a resumed
    job counts those of the segments it did not do again too)."""

    def __init__(self) -> None:
        self.faces = 0

    def __call__(self, planned: Iterable[PlannedFrame]) -> Iterator[PlannedFrame]:
        for p in planned:
            self.faces += len(p.faces)
            yield p


class SegmentSink:
    """Writes the frames of each segment into its own file in the work folder and, when the
    segment is complete, its detection log, then hands both to ``Job.finished``."""

    def __init__(self, job: Job, pipeline: FramePipeline) -> None:
        self.job, self.config = job, pipeline.config
        self.info = pipeline.output_info(job.plan.info)
        self.current: int | None = None
        self.writer: VideoWriter | None = None
        self.observations: list[Observation] = []

    def write(self, planned: PlannedFrame, frame: Frame) -> None:
        """Write one frame; a segment is finished as soon as it has all its planned frames (the
        stabiliser holds the next segment's first frames back), or when a later one starts."""
        layout = self.job.plan.layout
        k = layout.segment_of(frame)
        if self.current is None or k > self.current:
            self._close(until=k)
            self.current = k
        elif k in self.job.manifest.finished:
            raise DecodeError(f"{self.job.plan.src.name}: {layout.describe(k)} decoded more frames than its index "
                              "holds; run again with --restart")
        if self.writer is None:
            c = self.config
            writer = VideoWriter(self.job.tasks[self.current].output, self.info, codec=c.codec, crf=c.crf,
                                 preset=c.preset, overwrite=True, copy_streams=False)
            self._named(writer.__enter__)
            self.writer = writer
        self._named(self.writer.write, frame)
        self.observations.append(planned.observation.without_pixels())  # a segment's frames would fill memory
        if k + 1 < len(layout) and len(self.observations) == layout.frame_counts[k]:
            self._close(until=k + 1)  # the last one is finished by ``finish``

    def finish(self) -> None:
        """Record the segment being written and any later one no frame reached (a damaged
        input that ends early)."""
        self._close(until=len(self.job.plan.layout))

    def _close(self, until: int) -> None:
        """Finish the current segment and record the unfinished ones before ``until`` as empty."""
        job = self.job
        if self.current is not None and self.current not in job.manifest.finished:
            path = None
            if self.writer is not None:
                writer, self.writer = self.writer, None
                self._named(writer.__exit__, None, None, None)
                path = writer.output_path
            log_path = job.tasks[self.current].log
            self._named(write_log, log_path, self.observations)
            job.finished(SegmentDone(self.current, path, len(self.observations), log_path))
        self.observations = []
        start = 0 if self.current is None else self.current + 1
        for k in range(start, until):
            if k not in job.manifest.finished:
                job.finished(SegmentDone(k, None, 0, None))

    def abort(self) -> None:
        """Drop the segment being written (its temporary file)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def _named(self, fn, *args):
        """Run ``fn``; an output problem in the work folder names the output it is for."""
        try:
            return fn(*args)
        except OutputError as exc:
            exc.args = (f"writing {self.job.dst} failed: {exc}",)
            raise
