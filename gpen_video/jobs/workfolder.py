"""The work folder of a segmented job: its segment files, their logs, the input's frame index
and the manifest that lets a later run resume the job.

A job writes its segment files into a work folder (default: ``.NAME.gpen-work`` beside the
output ``NAME``). After each finished segment, ``manifest.json`` there is replaced atomically
(written whole to a temporary file, flushed, renamed), so after Ctrl-C, ``kill -9`` or a power
cut it describes exactly the segments that are complete. The input's ``VideoIndex`` is kept
there too (``index.npz``), so Ray workers and resumed runs read it instead of demuxing the
whole input again.

A later run with the same job builds the manifest it expects and ``WorkFolder.resume`` compares:
everything equal and every finished file present with its size: those segments are kept;
anything else: a fresh start, with one line saying why. After the output is written, the work
folder is removed. ``FinishedOutputs`` remembers the jobs whose output was written, so a folder
job run again skips them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np

from gpen_video.errors import OutputError
from gpen_video.io import files
from gpen_video.io.decode import VideoIndex
from gpen_video.jobs.manifest import FORMAT, InputIdentity, Manifest, SegmentRecord, file_sha256

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
INDEX_NAME = "index.npz"
SEGMENT_PREFIX = "segment-"
LOG_SUFFIX = ".log.npz"
PLAN_SUFFIX = ".plan.npz"


def work_dir_for(output_path: Path, work_root: Path | None = None) -> Path:
    """The work folder of the job writing ``output_path``.

    By default ``.NAME.gpen-work`` beside the output. With ``work_root`` (``--work-dir``), a
    folder inside it named after the output and its full path (jobs writing outputs of the
    same name in different folders do not meet).

    >>> work_dir_for(Path("/v/tape.restored.mp4")).as_posix()
    '/v/.tape.restored.mp4.gpen-work'
    """
    output_path = Path(output_path)
    if work_root is None:
        return output_path.with_name(f".{output_path.name}.gpen-work")
    digest = hashlib.sha256(str(output_path.absolute()).encode()).hexdigest()[:8]
    return Path(work_root) / f"{output_path.name}-{digest}.gpen-work"


class WorkFolder:
    """The folder holding one job's segment files and its manifest.

    Only names this class makes are ever deleted in it (the manifest, the lock, the index,
    ``segment-*`` files and their temporary files), and the folder itself only once empty. Hold ``lock()``
    while working in it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST_NAME

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this run: a second run of the same job (another terminal, a
        folder job started twice) gets OutputError instead of overwriting segments in use.
        The lock goes with the process, so a killed run never leaves it held.

        Raises:
            OutputError: another process holds it, or the folder cannot be created.
        """
        self._mkdir()
        with files.FileLock(self.path / LOCK_NAME, OutputError(
                f"another gpen-video run is working in {self.path}; wait for it to finish or stop it, then run again")):
            yield

    def segment_path(self, index: int, suffix: str) -> Path:
        """Where segment ``index`` is written (``suffix`` such as ``.mp4`` picks the container)."""
        return self.path / f"{SEGMENT_PREFIX}{index:05d}{suffix}"

    def log_path(self, index: int) -> Path:
        """Where the detection log of segment ``index`` is written (``jobs.logs.write_log``)."""
        return self.segment_path(index, LOG_SUFFIX)

    @property
    def index_path(self) -> Path:
        """Where the input's frame index is kept (``save_index``)."""
        return self.path / INDEX_NAME

    def plan_path(self, index: int) -> Path:
        """Where the faces to restore in segment ``index`` are written for a worker
        (``jobs.logs.write_plan``)."""
        return self.segment_path(index, PLAN_SUFFIX)

    def load(self) -> tuple[Manifest | None, str | None]:
        """The stored manifest, or (None, why not) when there is none or it cannot be read."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"the manifest in {self.path} cannot be read ({exc})"
        try:
            return Manifest.from_json(text), None
        except ValueError as exc:
            return None, f"the manifest in {self.path} is unusable: {exc}"

    def resume(self, job: Manifest, *, restart: bool = False, verify: bool = False) -> tuple[Manifest, str | None]:
        """The manifest to continue ``job`` with, and why an earlier run's work was dropped.

        Returns ``(stored manifest, None)`` when an earlier run of the same job left finished
        segments whose files are all there with their recorded sizes (and, with ``verify``,
        hashes); else ``(job with nothing finished, reason)``, the reason being None when there
        was nothing to resume. In that case the folder is emptied of earlier segments and the
        fresh manifest is written.

        Raises:
            OutputError: the work folder cannot be created or written.
        """
        stored, reason = self.load()
        if stored is not None and not restart:
            reason = stored.mismatch(job) or self._damage(stored, verify)
            if reason is None:
                return stored, None
        elif restart and stored is not None:
            reason = "a restart was asked for"
        fresh = job.fresh()
        self._clear()
        self.save(fresh)
        return fresh, (f"starting afresh: {reason}" if reason else None)

    def _damage(self, manifest: Manifest, verify: bool) -> str | None:
        for record in manifest.segments:
            for name, recorded, digest in record.files():
                path = self.path / name
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    return f"segment file {name} is missing"
                if size != recorded:
                    return f"segment file {name} has {size} bytes, {recorded} were written"
                if verify and file_sha256(path) != digest:
                    return f"segment file {name} is damaged (its SHA-256 changed)"
        return None

    def record(self, manifest: Manifest, index: int, path: Path | None, frame_count: int,
               log: Path | None = None) -> Manifest:
        """Add the finished segment ``index`` to ``manifest``, save it atomically, and return it.

        Args:
            path: its file in this folder (None when no frame of it could be decoded).
            frame_count: frames in it (fewer than planned where the input was damaged).
            log: its detection log in this folder (``jobs.logs.write_log``).
        """
        for file in (path, log):
            if file is not None and Path(file).parent.resolve() != self.path.resolve():
                raise ValueError(f"segment file {file} is not in the work folder {self.path}")
        first_frame, _ = manifest.plan[index]

        def described(file: Path | None) -> tuple[str, int, str]:
            return ("", 0, "") if file is None else (file.name, file.stat().st_size, file_sha256(file))

        name, size, digest = described(path)
        log_name, log_size, log_digest = described(log)
        record = SegmentRecord(index=index, first_frame=first_frame, frame_count=frame_count,
                               file=name, size=size, sha256=digest, log=log_name, log_size=log_size,
                               log_sha256=log_digest)
        updated = manifest.with_segment(record)
        self.save(updated)
        return updated

    def save(self, manifest: Manifest) -> None:
        """Replace the manifest atomically (a crash leaves the old one or the new one)."""
        self._mkdir()
        files.write_atomic(self.manifest_path, manifest.to_json().encode(), overwrite=True)

    def _mkdir(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the work folder {self.path} ({exc.strerror}); choose "
                              "another place with --work-dir") from None

    def _ours(self) -> list[Path]:
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        return [Path(e.path) for e in entries
                if e.is_file(follow_symlinks=False)
                and (e.name.startswith((SEGMENT_PREFIX, f".{SEGMENT_PREFIX}", f".{MANIFEST_NAME}", f".{INDEX_NAME}"))
                     or e.name in (MANIFEST_NAME, LOCK_NAME, INDEX_NAME))]

    def _clear(self) -> None:
        for path in self._ours():
            if path.name not in (MANIFEST_NAME, LOCK_NAME):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the segment files, the manifest and the folder (after a finished job). A
        folder that still holds other files is left, with a warning."""
        for path in self._ours():
            path.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("work folder %s holds files gpen-video did not write; it was left in place", self.path)



def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as one ``.npz``, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_atomic(path, buffer.getvalue(), overwrite=True)


def save_index(path: Path, index: VideoIndex, identity: InputIdentity) -> None:
    """Keep ``index`` of the input ``identity`` describes at ``path``."""
    save_npz(path, {"pts": index.pts, "keyframes": index.keyframes,
                    "time_base": np.array([index.time_base.numerator, index.time_base.denominator], np.int64),
                    "stream_index": np.array(index.stream_index, np.int64), "format": np.array(FORMAT, np.int64),
                    "identity": np.array(json.dumps([identity.size, identity.mtime_ns, identity.head_sha256]))})


def load_index(path: Path, identity: InputIdentity | None = None) -> VideoIndex | None:
    """The index ``save_index`` kept at ``path``; None when there is none, it cannot be read, or
    it was made of another input than ``identity`` (None: not checked)."""
    try:
        with np.load(path) as data:
            if int(data["format"]) != FORMAT:
                return None
            size, mtime_ns, head = json.loads(str(data["identity"]))
            if identity is not None and InputIdentity(size, mtime_ns, head) != identity:
                return None
            num, den = (int(v) for v in data["time_base"])
            return VideoIndex(pts=data["pts"], keyframes=data["keyframes"], time_base=Fraction(num, den),
                              stream_index=int(data["stream_index"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("the frame index %s is unusable: %s", path, exc)
        return None


class FinishedOutputs:
    """What jobs wrote which outputs, so that a folder job run again skips finished files.

    One small JSON file per output (named after its absolute path) in ``folder``: the job's
    manifest and the output's size and modification time when it was written. An output counts
    as finished only while it is still that very file and the job is the same (input,
    settings, weights, encoder software: ``Manifest.job_mismatch``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _record_path(self, output: Path) -> Path:
        digest = hashlib.sha256(str(Path(output).absolute()).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.json"

    def add(self, job: Manifest, output: Path) -> None:
        """Remember that ``job`` wrote ``output`` (just now, as it is)."""
        stat = Path(output).stat()
        record = {"output": str(Path(output).absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "manifest": json.loads(job.to_json())}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            files.write_atomic(self._record_path(output), json.dumps(record).encode(), overwrite=True)
        except OSError as exc:
            log.warning("cannot remember that %s is finished (%s); a later folder run will do it again", output, exc)

    def matches(self, job: Manifest, output: Path) -> bool:
        """Whether ``output`` is the finished output of ``job``."""
        try:
            record = json.loads(self._record_path(output).read_text(encoding="utf-8"))
            stat = Path(output).stat()
            stored = Manifest.from_json(json.dumps(record["manifest"]))
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return (record.get("output") == str(Path(output).absolute()) and record.get("size") == stat.st_size
                and record.get("mtime_ns") == stat.st_mtime_ns and stored.job_mismatch(job) is None)
