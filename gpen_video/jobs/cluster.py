"""Render the segments of videos on Ray workers (``gpen-video restore ... --ray [ADDRESS]``).

Each worker is a Ray actor with its own ``FacePipeline`` (models loaded once): one per GPU of
the cluster, or one per CPU on a cluster without GPUs. A job's unfinished segments go through
three phases:

1. workers decode their segments (from the keyframe before each) and log what detection finds
   in every frame into the job's work folder (``jobs.logs.write_log``);
2. the driver replays all the logs through one planner, so tracks, their ids and the per-track
   selection are those of one pass over the whole video, and writes each segment's faces to
   restore (``jobs.logs.write_plan``), those of its halo frames too;
3. workers decode their segments' read ranges (``SegmentPlan.read_range``: the segment and its
   halo either side), restore the planned faces of them all, stabilise, and encode the
   segment's own frames into the segment file, which is handed to ``Job.finished`` as it arrives.

Everything else is the job engine's (``jobs.run``): the driver opens the job, resumes it,
counts failures, keeps the progress and the report and assembles the output, as for a local
job, so the output is byte-identical to a local run's and a job interrupted either way
resumes either way. A worker gets the input's description in its task and the frame index
from the work folder: it neither probes nor scans the input. Frames never travel through
Ray's object store: workers read the input and write the work folder themselves, so both must
be on storage every node sees at the same path.

For example, ``with RayWorkers(config) as workers: FacePipeline(config).restore_video("tape.mp4",
workers=workers)``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gpen_video.config import Config
from gpen_video.errors import Cancelled, ConfigError, EncodeError
from gpen_video.jobs.local import render_segment
from gpen_video.jobs.logs import read_log, read_plan, write_log, write_plan
from gpen_video.jobs.manifest import InputIdentity, Manifest
from gpen_video.jobs.run import Job, Rendered, SegmentDone, SegmentTask, job_identity, output_settings
from gpen_video.pipeline import FramePipeline, RenderCounts
from gpen_video.plan import PlannedFrame

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


class SegmentWorker:
    """What each Ray actor runs: one ``FramePipeline``, and the two phases of a segment."""

    def __init__(self, config: Config) -> None:
        self.pipeline = FramePipeline(config)

    def output_settings(self) -> tuple[dict[str, object], str]:
        return output_settings(self.pipeline), self.pipeline.weights_hash

    def observe(self, task: SegmentTask) -> int:
        """Phase 1: log what detection finds in the segment's frames; returns the frames."""
        with task.reader() as reader:
            return write_log(task.log, self.pipeline.planner.observe(task.frames(reader)))

    def render(self, task: SegmentTask, logs: Sequence[Path]) -> tuple[int, int]:
        """Phase 3: restore the planned faces of the segment's read range and encode the
        segment's frames into its file; ``logs``: the detection logs of the segments the range
        covers, in order. Returns the frames written and their faces run again in fp32 (the
        precision guard's reruns)."""
        faces = read_plan(task.plan)
        layout, counts = task.layout, RenderCounts()
        start, stop = layout.read_range(task.segment)
        with task.reader() as reader:
            logged = [seen for path in logs for seen in read_log(path, reader.info)
                      if (start is None or seen.frame.pts >= start) and (stop is None or seen.frame.pts < stop)]

            def planned() -> Iterator[PlannedFrame]:
                if not logged:
                    return
                first = logged[0].frame
                decoded = reader.frames(None if start is None else first.pts, start_index=first.index, stop_pts=stop)
                for frame, seen in zip(decoded, logged, strict=True):
                    if frame.index != seen.frame.index:
                        raise EncodeError(f"segment {task.segment} of {task.src} decoded frame {frame.index} where "
                                          f"its log has frame {seen.frame.index}; the input changed")
                    yield PlannedFrame(dataclasses.replace(seen, frame=frame), faces.get(frame.index, ()), ())

            frames = render_segment(self.pipeline, planned(), reader.info, task.output, group_of=layout.group_of,
                                    keep=lambda frame: layout.segment_of(frame) == task.segment, counts=counts)
        return frames, counts.fp32_reruns


def _logs_read(job: Job, k: int) -> tuple[Path, ...]:
    """The detection logs of the segments segment ``k``'s read range covers, in order."""
    layout = job.plan.layout
    start, stop = layout.read_range(k)
    first, last = layout.segment_at(start), len(layout) - 1 if stop is None else layout.segment_at(stop - 1)
    return tuple(path for j in range(first, last + 1) if (path := job.log_of(j)) is not None)


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

    def output_settings(self) -> tuple[dict[str, object], str]:
        """The settings and weights' hash of the workers' pipelines (their device and precision)."""
        return self.ray.get(self.actors[0].output_settings.remote())

    def job_identity(self, src: str | Path) -> Manifest:
        """What makes a job on ``src`` give the bytes it gives, rendered on these workers."""
        return job_identity(self, InputIdentity.of(src))

    def render(self, job: Job) -> Rendered:
        tasks = {k: job.tasks[k] for k in job.unfinished}
        self._run(job, "observe", tasks, lambda k, frames: None)
        faces, stats = self._plan(job, tasks)

        reruns = 0

        def finished(k: int, result: tuple[int, int]) -> None:
            nonlocal reruns
            frames, segment_reruns = result
            reruns += segment_reruns
            job.finished(SegmentDone(k, tasks[k].output if frames else None, frames, tasks[k].log))
            job.ticker.add(frames)

        self._run(job, "render", tasks, finished, lambda k: (_logs_read(job, k),))
        return Rendered(faces, stats, reruns)

    def _plan(self, job: Job, tasks: dict[int, SegmentTask]) -> tuple[int, object]:
        """Phase 2: replay every segment's log through one planner; write the plans of
        ``tasks``, each with the faces of its whole read range."""
        layout = job.plan.layout
        plan = job.pipeline.planner.plan((), report=job.report, replay=job.replay(range(len(layout))),
                                          segment_of=layout.segment_of)
        faces = 0
        chosen: dict[int, list[tuple[int, tuple]]] = {}
        written: set[int] = set()

        def flush(before: int) -> None:
            for k in sorted(k for k in chosen if k < before):
                write_plan(tasks[k].plan, chosen.pop(k))
                written.add(k)

        for planned in plan:
            faces += len(planned.faces)
            reading = layout.reading(planned.frame)
            flush(before=reading.start)  # no later frame is in their ranges
            for k in reading:
                if k in tasks:
                    chosen.setdefault(k, [])
                    if planned.faces:
                        chosen[k].append((planned.frame.index, planned.faces))
        flush(before=len(layout))
        for k in tasks.keys() - written:  # segments no frame reached
            write_plan(tasks[k].plan, [])
        return faces, plan.stats

    def _run(self, job: Job, phase: str, tasks: dict[int, SegmentTask], done: Callable[[int, Any], None],
             more: Callable[[int], tuple] = lambda k: ()) -> None:
        """Run ``phase`` of every task on the workers, a failed one again as ``job.retries``
        allows; ``done(k, result)`` with the worker's return value as each finishes, in the
        order they finish. ``more(k)``: the phase's arguments after the task."""
        ray = self.ray
        waiting = sorted(tasks)
        free = list(range(len(self.actors)))
        running: dict = {}  # ref -> (segment, actor number)
        try:
            while waiting or running:
                while waiting and free:
                    k, n = waiting.pop(0), free.pop(0)
                    running[getattr(self.actors[n], phase).remote(tasks[k], *more(k))] = (k, n)
                ready, _ = _signalled(ray.wait, list(running), num_returns=1, timeout=POLL_SECONDS)
                job.ticker.check()
                for ref in ready:
                    k, n = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        self.actors[n] = self._actor.remote(self.config)  # a new worker in its place
                        job.retries.failed(k, exc, on="Ray worker")
                        waiting.insert(0, k)
                    except ray.exceptions.RayTaskError as exc:
                        job.retries.failed(k, exc.cause if exc.cause is not None else exc, on="Ray worker")
                        waiting.insert(0, k)
                    else:
                        done(k, result)
                    free.append(n)
        finally:
            for ref in running:
                ray.cancel(ref)
