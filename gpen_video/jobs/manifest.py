"""What a job is, and how far it got: the manifest a later run compares to resume it.

A job's manifest records:

- the input's identity: size, modification time and the SHA-256 of its first MiB
  (``InputIdentity``);
- a hash of the settings that change pixels (the caller says which), the weights' hash and
  the encoder software (other builds make other bytes);
- the segment plan, and per finished segment its frames, file name, size and SHA-256, and the
  same of its detection log (``jobs.logs``), which a resumed job replays through the planner
  instead of decoding those frames again.

``jobs.workfolder`` keeps it on disk beside the segments, replaced atomically after each one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

FORMAT = 2
"""Version of the manifest, log and index layout; a work folder of another version is not resumed."""
HEAD_BYTES = 1 << 20
"""How much of the input's start is hashed: enough to tell files apart, cheap on a 100 GB tape."""


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
        with open(path, "rb") as handle:
            return cls.read(handle)

    @classmethod
    def read(cls, handle: BinaryIO) -> InputIdentity:
        """The identity of the file open as ``handle`` (read from its start; left at its start)."""
        stat = os.fstat(handle.fileno())
        handle.seek(0)
        head = handle.read(HEAD_BYTES)
        handle.seek(0)
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
    def for_job(cls, identity: InputIdentity, settings: Mapping[str, object], weights_hash: str,
                encoder: str, plan: Sequence[tuple[int, int]] = ()) -> Manifest:
        """The manifest of a job that has not finished any segment yet."""
        return cls(input=identity, settings_hash=settings_hash(settings),
                   weights_hash=weights_hash, encoder=encoder,
                   plan=tuple((int(a), int(b)) for a, b in plan))
