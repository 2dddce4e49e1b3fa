"""Restore jobs of the web page: one folder per job, one worker thread per device.

::

    JOBS_DIR/
      <id>/job.json          the job's record, replaced atomically at every change of state
      <id>/input/NAME        an uploaded input, linked here so the job outlives the upload cache
      <id>/NAME.restored.EXT the output (written by ``restore_video``, its work files beside it)
    SERVED_DIR/<id>/NAME.restored.EXT   a hard link to a finished output: the only job file served

A job runs in the server's worker thread, not in the page's request, so closing or reloading
the page does not stop it; the page polls the job's state. One job runs at a time (the worker
owns the device); the others wait in order. When the server stops, or is killed, jobs that had
not finished keep the state ``queued`` or ``running`` in their ``job.json``; the next server on
the same folder queues them again and calls ``restore_video`` on the same input and output, so
the job continues wherever ``restore_video`` can resume it (its work folder beside the output),
and otherwise restarts. A job that ended (done, cancelled, failed) keeps only its record and
its output, until ``--keep-days`` after it was made: expired jobs are deleted when the server
starts and after each job, with Gradio's uploads of that age that no job uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpen_video.config import Config
from gpen_video.errors import Cancelled, GpenVideoError, describe
from gpen_video.io.encode import default_output_path
from gpen_video.io.files import write_atomic
from gpen_video.formats import is_image, output_suffix

log = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})


def owner_of(token: str) -> str:
    """The owner id stored in jobs for a browser's secret token (the token itself is not kept)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Job:
    """One restore job.

    Attributes:
        id: random hex id; also the job's folder name.
        owner: ``owner_of`` the token of the browser that made it; only that browser sees it.
        name: the input's name as the person knows it.
        input: the file restored.
        output: where the result is written.
        config: every setting of the job (``skip_tracks`` included).
        state: queued, running, done, failed or cancelled.
        created: time.time() when it was made.
        done_frames, total_frames: progress (total None when the container does not say).
        fps: frames written per second in this run; seconds_left: estimate, or None.
        error: one sentence when failed.
        faces_restored: faces restored, once done.
        seconds: how long the finished run took.
        served: the path the page may download, once done.
        runs: how many times the worker started it (more than one after a server restart).
        resumed_at: frames an interrupted earlier run had finished, where this run went on.
    """

    id: str
    owner: str
    name: str
    input: Path
    output: Path
    config: Config
    state: State = "queued"
    created: float = 0.0
    done_frames: int = 0
    total_frames: int | None = None
    fps: float = 0.0
    seconds_left: float | None = None
    error: str | None = None
    faces_restored: int = 0
    seconds: float = 0.0
    served: Path | None = None
    runs: int = 0
    resumed_at: int = 0

    @property
    def image(self) -> bool:
        return is_image(self.input)

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["config"] = {**dataclasses.asdict(self.config), "skip_tracks": list(self.config.skip_tracks)}
        for key in ("input", "output", "served"):
            data[key] = None if data[key] is None else str(data[key])
        return json.dumps(data, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes) -> "Job":
        data = json.loads(raw)
        settings = data.pop("config")
        settings["skip_tracks"] = tuple(settings.get("skip_tracks", ()))
        config = Config(**settings)
        for key in ("input", "output", "served"):
            data[key] = None if data[key] is None else Path(data[key])
        return Job(config=config, **data)


class JobStore:
    """Jobs by id, kept in memory and in ``root/<id>/job.json``; safe to use from any thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        for record in sorted(root.glob("*/job.json")):
            try:
                job = Job.from_json(record.read_bytes())
            except (ValueError, TypeError, KeyError, GpenVideoError) as exc:
                log.warning("ignoring the unreadable job record %s (%s)", record, exc)
                continue
            self._jobs[job.id] = job

    def create(self, owner: str, source: Path, name: str, config: Config, *, link_input: bool) -> Job:
        """A new queued job restoring ``source`` (linked into the job folder when
        ``link_input``: an upload that the upload cache may delete)."""
        job_id = secrets.token_hex(16)
        folder = self.root / job_id
        folder.mkdir()
        source_path = source
        if link_input:
            (folder / "input").mkdir()
            source_path = folder / "input" / Path(name).name
            try:
                os.link(source, source_path)
            except OSError:
                shutil.copyfile(source, source_path)
        output = folder / default_output_path(Path(Path(name).name)).name
        if not is_image(output):  # the input's container, unless it cannot hold the codec
            output = output.with_suffix(output_suffix(output.suffix, config.codec))
        job = Job(job_id, owner, name, source_path, output, config, created=time.time())
        self.save(job)
        return job

    def save(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
        write_atomic(self.root / job.id / "job.json", job.to_json())
        return job

    def set(self, job_id: str, *, persist: bool = False, **changes) -> Job:
        """The job with ``changes``; written to disk when ``persist`` (changes of state)."""
        with self._lock:
            job = dataclasses.replace(self._jobs[job_id], **changes)
            self._jobs[job_id] = job
        if persist:
            write_atomic(self.root / job.id / "job.json", job.to_json())
        return job

    def get(self, job_id: str | None, owner: str | None = None) -> Job | None:
        """The job, or None if there is none with this id (of this ``owner``, when given)."""
        with self._lock:
            job = self._jobs.get(job_id) if job_id else None
        return job if job is not None and (owner is None or job.owner == owner) else None

    def latest(self, owner: str) -> Job | None:
        with self._lock:
            mine = [j for j in self._jobs.values() if j.owner == owner]
        return max(mine, key=lambda j: j.created, default=None)

    def unfinished(self) -> list[Job]:
        """Jobs a stopped or killed server left queued or running, oldest first."""
        with self._lock:
            return sorted((j for j in self._jobs.values() if j.state in ACTIVE), key=lambda j: j.created)

    def expire(self, keep_seconds: float, served: Path, now: float | None = None) -> list[Job]:
        """Forget the jobs that ended more than ``keep_seconds`` after they were made, and delete
        their folders and served files, oldest first; returns them. Running and waiting jobs stay."""
        limit = (time.time() if now is None else now) - keep_seconds
        with self._lock:
            old = sorted((j for j in self._jobs.values() if j.state not in ACTIVE and j.created < limit),
                         key=lambda j: j.created)
            for job in old:
                del self._jobs[job.id]
        for job in old:
            shutil.rmtree(self.root / job.id, ignore_errors=True)
            shutil.rmtree(served / job.id, ignore_errors=True)
        return old

    def tidy(self, job: Job) -> None:
        """Remove what an ended job no longer needs from its folder: the input copy and any work
        files (a cancelled or failed job is not continued), keeping the record and the output."""
        for entry in (self.root / job.id).iterdir():
            if entry.name in ("job.json", job.output.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


class Pipelines:
    """The one set of loaded models of the server's device, reconfigured per use.

    ``get(config)`` shares the loaded models whenever the model, weights, device and detector
    settings are unchanged (``FacePipeline.reconfigured``), so changing strength, codec or the
    faces to skip never reloads weights; a new model is loaded once and then kept.
    """

    def __init__(self, pipeline) -> None:
        self._current = pipeline
        self._lock = threading.Lock()

    def get(self, config: Config):
        with self._lock:
            if config != self._current.config:
                self._current = self._current.reconfigured(config)
            return self._current


class JobRunner:
    """Runs queued jobs one at a time in a worker thread that uses the server's device.

    Args:
        store: where jobs are kept.
        pipelines: the models (``Pipelines``).
        served: the folder finished outputs are linked into for download.
    """

    def __init__(self, store: JobStore, pipelines: Pipelines, served: Path, keep_seconds: float = math.inf) -> None:
        self.store = store
        self.pipelines = pipelines
        self.served = served
        self.keep_seconds = keep_seconds
        self._queue: deque[str] = deque()
        self._wake = threading.Condition()
        self._running: str | None = None
        self._cancels: dict[str, threading.Event] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="gpen-video-jobs", daemon=True)

    def expire(self) -> None:
        """Delete the jobs (and their results) that ended longer than ``keep_seconds`` ago,
        and uploads no job uses that are as old."""
        if math.isinf(self.keep_seconds):
            return
        for job in self.store.expire(self.keep_seconds, self.served):
            log.info("job %s (%s) is older than the results are kept; deleted", job.id, job.name)
        limit = time.time() - self.keep_seconds
        for entry in self.served.iterdir():  # Gradio's upload and cache folders
            if self.store.get(entry.name) is None and entry.lstat().st_mtime < limit:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def start(self) -> None:
        """Delete expired jobs; queue the jobs a previous server left unfinished; start working."""
        self.expire()
        for job in self.store.unfinished():
            if not job.input.exists():
                self.store.set(job.id, persist=True, state="failed",
                               error=f"the input of {job.name} is gone, so the job cannot continue")
                continue
            log.info("job %s (%s) was interrupted; queued again", job.id, job.name)
            self.store.set(job.id, persist=True, state="queued", done_frames=0, fps=0.0, seconds_left=None)
            self._queue.append(job.id)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job (it stays queued for the next server) and the worker."""
        with self._wake:
            self._stopping = True
            if self._running is not None:
                self._cancels[self._running].set()
            self._wake.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._wake:
            self._queue.append(job.id)
            self._wake.notify_all()

    def cancel(self, job_id: str) -> None:
        """Stop a running job (nothing is written) or take a waiting one out of the queue."""
        with self._wake:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self.store.tidy(self.store.get(job_id))
                self.store.set(job_id, persist=True, state="cancelled", seconds_left=None)
            elif job_id == self._running:
                self._cancels[job_id].set()

    def ahead(self, job_id: str) -> int:
        """Jobs that run before this waiting one (the running job included)."""
        with self._wake:
            waiting = list(self._queue)
            running = self._running is not None
        return (waiting.index(job_id) if job_id in waiting else 0) + running

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs of every page."""
        with self._wake:
            return int(self._running is not None), len(self._queue)

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                self._running = job_id
                self._cancels[job_id] = threading.Event()
            try:
                self._run(self.store.get(job_id))
            finally:
                with self._wake:
                    self._running = None
                    self._cancels.pop(job_id, None)

    def _progress(self, job: Job) -> Callable[[int, int | None], None]:
        started: list[tuple[float, int]] = []

        def update(done: int, total: int | None) -> None:
            now = time.monotonic()
            if not started:
                started.append((now, done - 1))
                if done > 1:
                    self.store.set(job.id, persist=True, resumed_at=done - 1)
            t0, d0 = started[0]
            fps = (done - d0) / (now - t0) if now > t0 else 0.0
            left = (total - done) / fps if total and fps > 0 else None
            self.store.set(job.id, done_frames=done, total_frames=total, fps=fps, seconds_left=left)

        return update

    def _run(self, job: Job) -> None:
        job = self.store.set(job.id, persist=True, state="running", runs=job.runs + 1, error=None, resumed_at=0)
        ended = self._outcome(job)
        if ended["state"] != "queued":
            self.store.tidy(job)
        self.store.set(job.id, persist=True, seconds_left=None, **ended)
        self.expire()

    def _outcome(self, job: Job) -> dict:
        """Run the job; the changes that record how it ended."""
        started = time.monotonic()
        try:
            pipeline = self.pipelines.get(job.config)
            if job.image:
                result = pipeline.restore_image(job.input, job.output, overwrite=True)
            else:
                result = pipeline.restore_video(
                    job.input, job.output, overwrite=True, progress=self._progress(job),
                    cancel=self._cancels[job.id],
                )
        except Cancelled:
            return {"state": "queued" if self._stopping else "cancelled"}  # stopping: the next server goes on
        except GpenVideoError as exc:
            return {"state": "failed", "error": _named(str(exc), job)}
        except Exception as exc:  # noqa: BLE001 - the page gets one line, the log the traceback
            log.exception("job %s (%s) failed", job.id, job.name)
            return {"state": "failed", "error": _named(describe(exc, "the server's log has the details"), job)}
        return {
            "state": "done", "served": self._serve(job), "faces_restored": result.faces_restored,
            "done_frames": result.frames, "total_frames": result.frames, "seconds": time.monotonic() - started,
        }

    def _serve(self, job: Job) -> Path:
        folder = self.served / job.id
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / job.output.name
        target.unlink(missing_ok=True)
        try:
            os.link(job.output, target)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(job.output, target)
        return target


def _named(message: str, job: Job) -> str:
    """``message`` with the server's paths of the job replaced by the names the person knows."""
    return message.replace(str(job.input), job.name).replace(str(job.output), job.output.name)
