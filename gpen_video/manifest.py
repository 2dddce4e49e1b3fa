"""The work folder of a segmented job, and the manifest that lets a later run resume it.

A job writes its segment files into a work folder (default: ``.NAME.gpen-work`` beside the
output ``NAME``). After each finished segment, ``manifest.json`` there is replaced atomically
(written whole to a temporary file, flushed, renamed), so after Ctrl-C, ``kill -9`` or a power
cut it describes exactly the segments that are complete. It records:

- the input's identity: size, modification time and the SHA-256 of its first MiB;
- a hash of the settings that change pixels (the caller says which), the weights' hash and
  the encoder software (other builds make other bytes);
- the segment plan, and per finished segment its frames, file name, size and SHA-256, and the
  same of its detection log: what detection found in each of its frames (``write_log``), which
  a resumed job replays through the planner instead of decoding those frames again.

A later run with the same job builds the manifest it expects and ``WorkFolder.resume`` compares:
everything equal and every finished file present with its size → those segments are kept;
anything else → a fresh start, with one line saying why. After the output is written, the work
folder is removed. ``FinishedOutputs`` remembers the jobs whose output was written, so a folder
job run again skips them.

Example::

    work = WorkFolder(work_dir_for(Path("tape.restored.mp4")))
    manifest, reason = work.resume(expected)
    for segment in plan:
        if segment.index not in manifest.finished: ...                     # encode it, then
        manifest = work.record(manifest, segment.index, path, frames)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from fractions import Fraction
from pathlib import Path

import numpy as np

from gpen_video.errors import OutputError
from gpen_video.faces.scenes import CutFeatures
from gpen_video.io import files
from gpen_video.plan import Observation, placeholder_frame
from gpen_video.records import Detections, TrackedFace

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
FORMAT = 2
"""Version of the manifest and log layout; a work folder of another version is not resumed."""
HEAD_BYTES = 1 << 20
"""How much of the input's start is hashed: enough to tell files apart, cheap on a 100 GB tape."""
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


def _canonical(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Enum):
        return _canonical(value.value)
    if isinstance(value, (Fraction, Path)):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"setting of type {type(value).__name__} cannot be hashed: {value!r}; "
                    "give str, int, float, bool, None, Fraction, Path, or lists/dicts of them")


def settings_hash(settings: Mapping[str, object]) -> str:
    """SHA-256 of ``settings`` as canonical JSON (sorted keys), e.g. the config fields that
    change pixels. Equal settings give equal hashes whatever the key order.

    >>> settings_hash({"crf": 18, "codec": "h264"}) == settings_hash({"codec": "h264", "crf": 18})
    True
    """
    text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputIdentity:
    """What tells an input file apart from an edited or replaced one, without reading it all.

    Attributes:
        size: bytes.
        mtime_ns: modification time, nanoseconds.
        head_sha256: SHA-256 of the first ``HEAD_BYTES`` bytes.
    """

    size: int
    mtime_ns: int
    head_sha256: str

    @classmethod
    def of(cls, path: str | Path) -> InputIdentity:
        path = Path(path)
        stat = path.stat()
        with open(path, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        return cls(size=stat.st_size, mtime_ns=stat.st_mtime_ns, head_sha256=hashlib.sha256(head).hexdigest())

    def change(self, other: InputIdentity) -> str | None:
        """How ``other`` (the input now) differs from this one, or None."""
        if other.size != self.size:
            return f"its size changed ({self.size} -> {other.size} bytes)"
        if other.head_sha256 != self.head_sha256:
            return "its content changed"
        if other.mtime_ns != self.mtime_ns:
            return "it was modified since (its modification time changed)"
        return None


@dataclass(frozen=True)
class SegmentRecord:
    """A finished segment file.

    Attributes:
        index: the segment's position in the plan.
        first_frame: its first frame index, as planned.
        frame_count: frames written (fewer than planned where frames of a damaged input could
            not be decoded; 0 when none could, and then there is no file).
        file: the file's name inside the work folder ("" when it has no frame).
        size: the file's size in bytes.
        sha256: the file's SHA-256.
        log: its detection log's name inside the work folder.
        log_size, log_sha256: the log's size and SHA-256.
    """

    index: int
    first_frame: int
    frame_count: int
    file: str
    size: int
    sha256: str
    log: str = ""
    log_size: int = 0
    log_sha256: str = ""

    def files(self) -> list[tuple[str, int, str]]:
        """(name, size, sha256) of each file the record stands for."""
        return [(name, size, digest) for name, size, digest in
                ((self.file, self.size, self.sha256), (self.log, self.log_size, self.log_sha256)) if name]


@dataclass(frozen=True)
class Manifest:
    """Everything a later run must find unchanged to keep this job's finished segments.

    Attributes:
        input: identity of the input file.
        settings_hash: ``settings_hash`` of the settings that change pixels.
        weights_hash: SHA-256 of the model weights ("" when no model runs).
        encoder: the software making segment bytes (``segments.encoder_identity()``).
        plan: ``(first_frame, frame_count)`` of every planned segment, in order.
        segments: the finished ones, by index.
        format: layout version (``FORMAT``).
    """

    input: InputIdentity
    settings_hash: str
    weights_hash: str
    encoder: str
    plan: tuple[tuple[int, int], ...]
    segments: tuple[SegmentRecord, ...] = ()
    format: int = FORMAT
    finished: dict[int, SegmentRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        finished = {s.index: s for s in self.segments}
        if len(finished) != len(self.segments):
            raise ValueError("a segment index appears twice among the finished segments")
        for record in self.segments:
            if not 0 <= record.index < len(self.plan):
                raise ValueError(f"finished segment {record.index} is not in the plan of {len(self.plan)}")
            first, count = self.plan[record.index]
            if record.first_frame != first or record.frame_count < 0:
                raise ValueError(f"finished segment {record.index} has {record.frame_count} frames from "
                                 f"frame {record.first_frame}; the plan says {count} from frame {first}")
        object.__setattr__(self, "finished", finished)

    @property
    def frames_done(self) -> int:
        return sum(s.frame_count for s in self.segments)

    @property
    def complete(self) -> bool:
        return len(self.finished) == len(self.plan)

    def with_segment(self, record: SegmentRecord) -> Manifest:
        """This manifest with ``record`` finished (replacing an earlier record of its index)."""
        kept = [s for s in self.segments if s.index != record.index]
        return replace(self, segments=tuple(sorted([*kept, record], key=lambda s: s.index)))

    def fresh(self) -> Manifest:
        """The same job with no segment finished."""
        return replace(self, segments=())

    @property
    def first_unfinished(self) -> int | None:
        """The first segment not finished (None when all are)."""
        return next((k for k in range(len(self.plan)) if k not in self.finished), None)

    def mismatch(self, job: Manifest) -> str | None:
        """Why this (stored) manifest does not describe ``job``; None if it does."""
        reason = self.job_mismatch(job)
        if reason is None and self.plan != job.plan:
            return "the segment plan changed (another segment length or frame count)"
        return reason

    def job_mismatch(self, job: Manifest) -> str | None:
        """Like ``mismatch``, leaving the segment plan out: the same input, settings, weights and
        encoder software (``job`` may have no plan)."""
        if self.format != job.format:
            return f"the work folder was written by another version of gpen-video (format {self.format})"
        change = self.input.change(job.input)
        if change is not None:
            return f"the input changed: {change}"
        if self.settings_hash != job.settings_hash:
            return "the settings changed"
        if self.weights_hash != job.weights_hash:
            return "the model weights changed"
        if self.encoder != job.encoder:
            return f"the encoder software changed ({self.encoder} -> {job.encoder})"
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("finished")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; raises ValueError (with the reason) for anything malformed."""
        try:
            data = json.loads(text)
            return cls(
                input=InputIdentity(**data["input"]),
                settings_hash=str(data["settings_hash"]),
                weights_hash=str(data["weights_hash"]),
                encoder=str(data["encoder"]),
                plan=tuple((int(a), int(b)) for a, b in data["plan"]),
                segments=tuple(SegmentRecord(**s) for s in data["segments"]),
                format=int(data["format"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def for_job(cls, input_path: str | Path, settings: Mapping[str, object], weights_hash: str,
                encoder: str, plan: Sequence[tuple[int, int]] = ()) -> Manifest:
        """The manifest of a job that has not finished any segment yet."""
        return cls(input=InputIdentity.of(input_path), settings_hash=settings_hash(settings),
                   weights_hash=weights_hash, encoder=encoder,
                   plan=tuple((int(a), int(b)) for a, b in plan))


class WorkFolder:
    """The folder holding one job's segment files and its manifest.

    Only names this class makes are ever deleted in it (the manifest, the lock, ``segment-*``
    files and their temporary files), and the folder itself only once empty. Hold ``lock()``
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
        """Where the detection log of segment ``index`` is written (``write_log``)."""
        return self.segment_path(index, LOG_SUFFIX)

    def plan_path(self, index: int) -> Path:
        """Where the faces to restore in segment ``index`` are written for a worker (``write_plan``)."""
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
            log: its detection log in this folder (``write_log``).
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
                and (e.name.startswith((SEGMENT_PREFIX, f".{SEGMENT_PREFIX}", f".{MANIFEST_NAME}"))
                     or e.name in (MANIFEST_NAME, LOCK_NAME))]

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


# --- detection logs ---


CHROMA_BINS, LUMA_BINS = 37, 16
"""Sizes of ``CutFeatures.chroma`` and ``.luma`` (checked by its constructor)."""


def write_log(path: Path, observations: Iterable[Observation]) -> int:
    """Save what detection found in each of a segment's frames (index, pts, faces, scene-cut
    features), exactly (float32 detections, float64 features), atomically. The frames' pixels
    are not kept. Returns the number of frames."""
    rows: dict[str, list] = {name: [] for name in
                             ("index", "pts", "has_pts", "faces", "boxes", "landmarks", "scores", "chroma", "luma",
                              "mean_luma")}
    for o in observations:
        rows["index"].append(o.frame.index)
        rows["pts"].append(o.frame.pts if o.frame.pts is not None else 0)
        rows["has_pts"].append(o.frame.pts is not None)
        rows["faces"].append(len(o.detections))
        rows["boxes"].append(o.detections.boxes)
        rows["landmarks"].append(o.detections.landmarks)
        rows["scores"].append(o.detections.scores)
        rows["chroma"].append(o.cut.chroma)
        rows["luma"].append(o.cut.luma)
        rows["mean_luma"].append(o.cut.mean_luma)
    count = len(rows["index"])
    empty = Detections.empty()
    arrays = {
        "index": np.array(rows["index"], np.int64),
        "pts": np.array(rows["pts"], np.int64),
        "has_pts": np.array(rows["has_pts"], bool),
        "faces": np.array(rows["faces"], np.int64),
        "boxes": np.concatenate([empty.boxes, *rows["boxes"]]).astype(np.float32),
        "landmarks": np.concatenate([empty.landmarks, *rows["landmarks"]]).astype(np.float32),
        "scores": np.concatenate([empty.scores, *rows["scores"]]).astype(np.float32),
        "chroma": np.array(rows["chroma"], np.float64).reshape(count, CHROMA_BINS),
        "luma": np.array(rows["luma"], np.float64).reshape(count, LUMA_BINS),
        "mean_luma": np.array(rows["mean_luma"], np.float64),
    }
    _save_npz(path, arrays)
    return count


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_atomic(path, buffer.getvalue(), overwrite=True)


def read_log(path: Path, *, time_base: Fraction, height: int, width: int, dtype: np.dtype) -> Iterator[Observation]:
    """The observations ``write_log`` saved, with pixel-less frames of the given size and dtype
    (``plan.placeholder_frame``), in order."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    ends = np.cumsum(arrays["faces"])
    starts = ends - arrays["faces"]
    for n in range(arrays["index"].size):
        pts = int(arrays["pts"][n]) if arrays["has_pts"][n] else None
        frame = placeholder_frame(int(arrays["index"][n]), pts, time_base, height, width, dtype)
        a, b = starts[n], ends[n]
        detections = Detections(arrays["boxes"][a:b], arrays["landmarks"][a:b], arrays["scores"][a:b])
        cut = CutFeatures(arrays["chroma"][n], arrays["luma"][n], float(arrays["mean_luma"][n]))
        yield Observation(frame, detections, cut)


# --- plans (for segments rendered elsewhere) ---


def write_plan(path: Path, planned: Iterable[tuple[int, Sequence[TrackedFace]]]) -> None:
    """Save the faces to restore in each frame of a segment (``(frame index, faces)``), exactly,
    for a worker that renders the segment without planning it (``read_plan``)."""
    rows: dict[str, list] = {name: [] for name in ("frame", "track", "box", "landmarks", "raw", "has_raw", "score",
                                                   "has_score", "interpolated")}
    dtypes: dict[str, np.dtype] = {}
    for index, faces in planned:
        for face in faces:
            rows["frame"].append(index)
            rows["track"].append(face.track_id)
            rows["box"].append(face.box)
            rows["landmarks"].append(face.landmarks)
            rows["raw"].append(face.landmarks if face.landmarks_raw is None else face.landmarks_raw)
            rows["has_raw"].append(face.landmarks_raw is not None)
            rows["score"].append(0.0 if face.score is None else face.score)
            rows["has_score"].append(face.score is not None)
            rows["interpolated"].append(face.interpolated)
            for name, value in (("box", face.box), ("landmarks", face.landmarks), ("raw", rows["raw"][-1])):
                dtypes.setdefault(name, value.dtype)
    shapes = {"box": (0, 4), "landmarks": (0, 5, 2), "raw": (0, 5, 2)}
    arrays = {
        name: (np.stack(rows[name]) if rows[name] else np.zeros(shapes[name], dtypes.get(name, np.float32)))
        for name in shapes
    }
    arrays.update(frame=np.array(rows["frame"], np.int64), track=np.array(rows["track"], np.int64),
                  has_raw=np.array(rows["has_raw"], bool), score=np.array(rows["score"], np.float64),
                  has_score=np.array(rows["has_score"], bool), interpolated=np.array(rows["interpolated"], bool))
    _save_npz(path, arrays)


def read_plan(path: Path) -> dict[int, tuple[TrackedFace, ...]]:
    """The faces ``write_plan`` saved, by frame index (frames without faces are absent)."""
    with np.load(path) as data:
        a = {name: data[name] for name in data.files}
    faces: dict[int, list[TrackedFace]] = {}
    for n in range(a["frame"].size):
        index = int(a["frame"][n])
        faces.setdefault(index, []).append(TrackedFace(
            track_id=int(a["track"][n]), frame_index=index, box=a["box"][n],
            landmarks_raw=a["raw"][n] if a["has_raw"][n] else None, landmarks=a["landmarks"][n],
            score=float(a["score"][n]) if a["has_score"][n] else None, interpolated=bool(a["interpolated"][n])))
    return {index: tuple(found) for index, found in faces.items()}


# --- finished outputs ---


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
