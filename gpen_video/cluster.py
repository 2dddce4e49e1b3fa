"""Render the segments of videos on Ray workers (``gpen-video restore ... --ray [ADDRESS]``).

Each worker is a Ray actor with its own ``FacePipeline`` (models loaded once): one per GPU of
the cluster, or one per CPU on a cluster without GPUs. A job's unfinished segments go through
three phases:

1. workers decode their segments (from the keyframe before each) and log what detection finds
   in every frame into the job's work folder (``manifest.write_log``);
2. the driver replays all the logs through one planner, so tracks, their ids and the per-track
   selection are those of one pass over the whole video, and writes each segment's faces to
   restore (``manifest.write_plan``);
3. workers decode their segments again, restore the planned faces and encode the segment
   files, each recorded in the manifest as it arrives.

The driver then assembles the output as a local job does (``FacePipeline.restore_video``):
the output is byte-identical to a local run's, and a job interrupted either way resumes either
way. Frames never travel through Ray's object store: workers read the input and write the work
folder themselves, so both must be on storage every node sees at the same path.

>>> workers = RayWorkers(load_config("fast"))                           # doctest: +SKIP
>>> FacePipeline(config).restore_video("tape.mp4", workers=workers)      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpen_video.config import Config
from gpen_video.errors import Cancelled, ConfigError, EncodeError, GpenVideoError
from gpen_video.io.decode import VideoReader
from gpen_video.manifest import Manifest, read_log, read_plan, write_log, write_plan
from gpen_video.pipeline import FacePipeline, Rendered, VideoJob
from gpen_video.plan import Observation, PlannedFrame
from gpen_video.records import Frame
from gpen_video.report import ReportWriter
from gpen_video.segments import SEGMENT_SUFFIX

log = logging.getLogger(__name__)

INSTALL_HINT = 'the --ray option needs Ray: pip install "gpen-video[ray]"'
POLL_SECONDS = 0.2
"""How often the driver checks for a cancel while workers run."""
CONNECT_SECONDS = 5.0
"""How long the head node of ``--ray ADDRESS`` has to answer."""


def import_ray():
    """The ``ray`` module, or ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class SegmentTask:
    """One segment of one video, as a worker reads and writes it (paths on shared storage).

    Attributes:
        src: the input video.
        deinterlace: ``Config.deinterlace`` of the job.
        index: the segment's position in the plan.
        first_frame: its first frame's index.
        start_pts, stop_pts: its frames' pts range in the reader's time base (None: from the
            start, to the end).
        log: its detection log; plan: its faces to restore; segment: its file.
    """

    src: Path
    deinterlace: str
    index: int
    first_frame: int
    start_pts: int | None
    stop_pts: int | None
    log: Path
    plan: Path
    segment: Path

    def frames(self, reader: VideoReader) -> Iterator[Frame]:
        """The segment's frames, decoded from the keyframe before it."""
        return reader.frames(self.start_pts, start_index=self.first_frame, stop_pts=self.stop_pts)


class SegmentWorker:
    """What each Ray actor runs: one ``FacePipeline``, and the two phases of a segment."""

    def __init__(self, config: Config) -> None:
        self.pipeline = FacePipeline(config)

    def job_identity(self, src: Path, plan: tuple[tuple[int, int], ...]) -> Manifest:
        return self.pipeline.job_identity(src, plan)

    def observe(self, task: SegmentTask) -> int:
        """Phase 1: log what detection finds in the segment's frames; returns the frames."""
        with VideoReader(task.src, deinterlace=task.deinterlace) as reader:
            return write_log(task.log, self.pipeline.planner.observe(task.frames(reader)))

    def render(self, task: SegmentTask) -> int:
        """Phase 3: restore the planned faces and encode the segment file; returns the frames."""
        faces = read_plan(task.plan)
        with VideoReader(task.src, deinterlace=task.deinterlace) as reader:
            info = reader.info
            logged = read_log(task.log, time_base=info.time_base, height=info.height, width=info.width,
                              dtype=np.dtype(info.dtype))

            def planned() -> Iterator[PlannedFrame]:
                for frame, seen in zip(task.frames(reader), logged, strict=True):
                    if frame.index != seen.frame.index:
                        raise EncodeError(f"segment {task.index} of {task.src} decoded frame {frame.index} where "
                                          f"its log has frame {seen.frame.index}; the input changed")
                    yield PlannedFrame(dataclasses.replace(seen, frame=frame), faces.get(frame.index, ()), ())

            return self.pipeline.render_segment(reader, planned(), task.segment)


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}


def _restore_signal_handlers(handlers: dict) -> None:
    """Install ``handlers`` again, also where Python still lists them: Ray's C++ core replaces
    the process's SIGINT action underneath Python's table."""
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _signalled(call: Callable, *args, **kwargs):
    """``call(*args, **kwargs)``, a Ray call in Cython. A signal handler that raises while it
    runs (Ctrl-C, SIGTERM as ``Cancelled``) surfaces as a SystemError caused by that exception:
    raise the exception itself, so the job stops the way it stops elsewhere."""
    try:
        return call(*args, **kwargs)
    except SystemError as exc:
        if isinstance(exc.__cause__, (KeyboardInterrupt, Cancelled)):
            raise exc.__cause__ from None
        raise


def _check_answers(address: str) -> None:
    """ConfigError unless something listens at ``host:port`` (Ray itself waits minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or address, int(port)), timeout=CONNECT_SECONDS).close()
    except ValueError:
        raise ConfigError(f"--ray {address}: give the cluster's head as HOST:PORT (e.g. 10.0.0.5:6379), "
                          "or no address for a local Ray runtime") from None
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there with "
                          "`ray start --head --port=6379`, or check the address") from None


class RayWorkers:
    """Ray actors rendering the segments of jobs (``FacePipeline.restore_video(workers=...)``).

    Args:
        config: the settings every worker builds its pipeline with (weights are resolved on
            each worker: give ``weights`` on shared storage, or let each node's cache hold them).
        address: a Ray cluster to join ("auto" or ``host:port``); None starts a local Ray
            runtime with this machine's GPUs and CPUs (or uses the one already started).

    Raises:
        ConfigError: Ray is not installed.
    """

    def __init__(self, config: Config, address: str | None = None) -> None:
        self.ray = ray = import_ray()
        if address not in (None, "auto"):
            _check_answers(address)
        if not ray.is_initialized():
            refused = (ConnectionError, getattr(ray.exceptions, "AuthenticationError", ConnectionError))
            handlers = _signal_handlers()
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)  # this tool says what matters in its own words
            except refused as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"cannot join the Ray cluster at {address or 'auto'} ({detail}); check that "
                                  "`ray status` works on this machine: the same Ray version, and the same "
                                  "RAY_AUTH_MODE and token as the cluster") from None
            finally:
                _restore_signal_handlers(handlers)  # ray.init takes SIGTERM over: the caller's stops cleanly
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        self.count = gpus or max(1, int(resources.get("CPU", 1)))
        self._actor = ray.remote(num_gpus=1)(SegmentWorker) if gpus else ray.remote(num_cpus=1)(SegmentWorker)
        self.config = config
        self.actors = [self._actor.remote(config) for _ in range(self.count)]
        log.info("Ray: %d worker%s (%s)", self.count, "s" if self.count > 1 else "",
                 "one per GPU" if gpus else "one per CPU")

    def close(self) -> None:
        """Stop the actors (their models' memory is freed); the Ray runtime stays up."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def job_identity(self, src: str | Path, plan: tuple[tuple[int, int], ...] = ()) -> Manifest:
        """The job's identity as the workers' pipelines (their device and precision) see it."""
        return self.ray.get(self.actors[0].job_identity.remote(Path(src), tuple(plan)))

    def render(self, pipeline: FacePipeline, job: VideoJob, manifest: Manifest) -> Rendered:
        layout, work = job.layout, job.work
        info = job.reader.info
        todo = [k for k in range(len(layout)) if k not in manifest.finished]
        tasks = {k: SegmentTask(
            src=job.src.absolute(), deinterlace=self.config.deinterlace, index=k, first_frame=layout.first_frames[k],
            start_pts=layout.starts[k] if k > 0 else None,
            stop_pts=layout.starts[k + 1] if k + 1 < len(layout) else None,
            log=work.log_path(k).absolute(), plan=work.plan_path(k).absolute(),
            segment=work.segment_path(k, SEGMENT_SUFFIX[self.config.codec]).absolute()) for k in todo}
        if manifest.frames_done and job.progress is not None:  # the bar starts where earlier runs got to
            job.progress(manifest.frames_done, layout.total_frames or None)
        self._run(job, "observe", tasks, lambda k, frames: None)

        report = ReportWriter(job.src, fps=float(info.average_rate or 0)) if job.report else None
        try:
            faces, stats = self._plan(pipeline, job, manifest, tasks, report)
            done = manifest.frames_done

            def finished(k: int, frames: int) -> None:
                nonlocal manifest, done
                manifest = work.record(manifest, k, tasks[k].segment if frames else None, frames, tasks[k].log)
                done += frames
                if job.progress is not None:
                    job.progress(done, layout.total_frames or None)

            self._run(job, "render", tasks, finished)
        except BaseException:
            if report is not None:
                report.close()
            raise
        paths = [work.path / manifest.finished[k].file for k in range(len(layout)) if manifest.finished[k].file]
        return Rendered(paths, manifest.frames_done, faces, stats, report)

    def _plan(self, pipeline: FacePipeline, job: VideoJob, manifest: Manifest, tasks: dict[int, SegmentTask],
              report: ReportWriter | None):
        """Phase 2: replay every segment's log through one planner; write the plans of ``tasks``."""
        layout, work, info = job.layout, job.work, job.reader.info

        def logged() -> Iterator[Observation]:
            for k in range(len(layout)):
                path = tasks[k].log if k in tasks else work.path / manifest.finished[k].log
                if k in tasks or manifest.finished[k].log:
                    yield from read_log(path, time_base=info.time_base, height=info.height, width=info.width,
                                        dtype=np.dtype(info.dtype))

        plan = pipeline.planner.plan((), report=report, replay=logged(), segment_of=layout.segment_of)
        faces = 0
        current: int | None = None
        chosen: list[tuple[int, tuple]] = []
        written: set[int] = set()

        def flush() -> None:
            if current in tasks:
                write_plan(tasks[current].plan, chosen)
                written.add(current)

        for planned in plan:
            faces += len(planned.faces)
            k = layout.segment_of(planned.frame)
            if k != current:
                flush()
                current, chosen = k, []
            if planned.faces:
                chosen.append((planned.frame.index, planned.faces))
        flush()
        for k in tasks.keys() - written:  # segments no frame reached
            write_plan(tasks[k].plan, [])
        return faces, plan.stats

    def _run(self, job: VideoJob, phase: str, tasks: dict[int, SegmentTask], done: Callable[[int, int], None]) -> None:
        """Run ``phase`` of every task on the workers, a failed one again up to ``Config.retries``
        times; ``done(k, frames)`` as each finishes, in the order they finish."""
        ray = self.ray
        waiting = sorted(tasks)
        failures: dict[int, int] = {}
        free = list(range(len(self.actors)))
        running: dict = {}  # ref -> (segment, actor number)
        try:
            while waiting or running:
                while waiting and free:
                    k, n = waiting.pop(0), free.pop(0)
                    running[getattr(self.actors[n], phase).remote(tasks[k])] = (k, n)
                ready, _ = _signalled(ray.wait, list(running), num_returns=1, timeout=POLL_SECONDS)
                if job.cancel is not None and job.cancel.is_set():
                    raise Cancelled("the job was cancelled")
                for ref in ready:
                    k, n = running.pop(ref)
                    try:
                        frames = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        self.actors[n] = self._actor.remote(self.config)  # a new worker in its place
                        self._failed(job, k, exc, failures)
                        waiting.insert(0, k)
                    except ray.exceptions.RayTaskError as exc:
                        self._failed(job, k, exc.cause if exc.cause is not None else exc, failures)
                        waiting.insert(0, k)
                    else:
                        done(k, frames)
                    free.append(n)
        finally:
            for ref in running:
                ray.cancel(ref)

    def _failed(self, job: VideoJob, k: int, exc: BaseException, failures: dict[int, int]) -> None:
        """Count a failure of segment ``k``; raise when it may not be tried again."""
        if isinstance(exc, GpenVideoError) and not isinstance(exc, EncodeError):
            raise exc
        failures[k] = failures.get(k, 0) + 1
        cause = str(exc) if isinstance(exc, GpenVideoError) else f"{type(exc).__name__}: {exc}"
        cause = cause.strip().splitlines()[0] if cause.strip() else type(exc).__name__  # Ray's are pages long
        if failures[k] > self.config.retries:
            times = "once" if failures[k] == 1 else f"{failures[k]} times"
            raise GpenVideoError(f"{job.src.name}: {job.layout.describe(k)} failed {times} on the Ray workers: "
                                 f"{cause}") from exc
        log.warning("%s: %s failed on a Ray worker (%s); trying it again (%d of %d)", job.src.name,
                    job.layout.describe(k), cause, failures[k], self.config.retries)
