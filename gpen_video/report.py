"""The ``--report`` JSON: every track, every frame, raw and used landmarks, and what was restored.

Faces arrive as the planner releases frames. Each face's JSON entry is made once and spooled to
a private temporary SQLite database: on disk in SQLite's temporary folder (``$SQLITE_TMPDIR``,
``$TMPDIR``, else ``/var/tmp``), about as large as the report, with a bounded page cache. SQLite
deletes it when the writer is closed, and the file is already unlinked while in use, so a
killed run leaves nothing behind. ``ReportWriter.write`` then streams the document from it, tracks by id and
faces by frame, into a file that appears only when complete. Memory stays bounded however long
the video: a 2-hour tape is about 180,000 frames.

Shape (README, ``--report``)::

    {"input": "tape.mp4", "frames": 1500, "fps": 25.0,
     "precision": {"requested": "fp16", "used": "fp16", "reason": "...", "checks": [...],
                   "fp32_reruns": 0},
     "scene_cuts": [412],
     "tracks": [{"id": 0, "restored": true, "frames": [
       {"index": 0, "pts": 0, "time": 0.0, "score": 0.998, "box": [x1, y1, x2, y2],
        "landmarks_raw": [[x, y], ...5], "landmarks": [[x, y], ...5], "interpolated": false,
        "restored": true}, ...]}, ...]}

A track's ``restored`` is true when any of its frames was restored. ``precision`` (present when
the job set it) is the precision GPEN ran in and why (``restore.precision``), and how many faces
were restored again in fp32 because their half-precision output was not finite.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpen_video.io.files import atomic_file
from gpen_video.records import Frame, TrackedFace

SPOOL_CACHE_KIB = 8192
"""SQLite page cache of the spool; beyond it pages go to the temporary file."""


def _rounded(array: np.ndarray | None) -> list | None:
    """Coordinates as nested lists of floats rounded to 1/1000 pixel."""
    return None if array is None else np.round(array.astype(np.float64), 3).tolist()


def face_entry(face: TrackedFace, frame: Frame, *, restored: bool) -> dict[str, Any]:
    """One face's entry in a track's ``frames`` list."""
    return {
        "index": face.frame_index,
        "pts": frame.pts,
        "time": None if frame.pts is None else round(float(frame.pts * frame.time_base), 6),
        "score": None if face.score is None else round(float(face.score), 4),
        "box": _rounded(face.box),
        "landmarks_raw": _rounded(face.landmarks_raw),
        "landmarks": _rounded(face.landmarks),
        "interpolated": bool(face.interpolated),
        "restored": restored,
    }


class ReportWriter:
    """Collects the report while frames are planned; ``write`` produces the JSON file.

    Not for concurrent use: feed it from one thread at a time (the planner's), then write.

    Args:
        input_path: the video the report describes (its ``input`` key).
        fps: the stream's average frame rate (``fps`` key; 0.0 when unknown).

    Example:
        >>> import numpy as np, json, tempfile, pathlib
        >>> from fractions import Fraction
        >>> lm = np.array([[40, 50], [70, 50], [55, 65], [43, 80], [67, 80]], np.float32)
        >>> face = TrackedFace(0, 0, np.array([25, 25, 85, 95], np.float32), lm, lm, 0.99)
        >>> frame = Frame(0, 0, Fraction(1, 25), np.zeros((4, 4, 3), np.uint8))
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "report.json"
        >>> with ReportWriter("clip.mp4", fps=25.0) as report:
        ...     report.add_frame(frame, [face], restored={0})
        ...     report.write(out)
        >>> json.loads(out.read_text())["tracks"][0]["restored"]
        True
    """

    def __init__(self, input_path: str | Path, *, fps: float) -> None:
        self.input_path = str(input_path)
        self.fps = float(fps)
        self.frames = 0
        """Frames added so far."""
        self.precision: dict[str, Any] | None = None
        """The ``precision`` entry, set by the job before ``write`` (None: left out)."""
        self._db = sqlite3.connect("", check_same_thread=False)  # private on-disk temporary
        self._db.execute(f"PRAGMA cache_size = -{SPOOL_CACHE_KIB}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE faces (track_id INTEGER, frame_index INTEGER, restored INTEGER, entry TEXT)")
        self._db.execute("CREATE TABLE cuts (frame_index INTEGER)")

    def __enter__(self) -> "ReportWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_frame(self, frame: Frame, faces: Sequence[TrackedFace], restored: Collection[int]) -> None:
        """Record one frame: every tracked face in it, and the ids of the tracks restored in it."""
        self.frames += 1
        rows = []
        for face in faces:
            done = face.track_id in restored
            entry = json.dumps(face_entry(face, frame, restored=done), separators=(",", ":"))
            rows.append((face.track_id, face.frame_index, int(done), entry))
        self._db.executemany("INSERT INTO faces VALUES (?, ?, ?, ?)", rows)

    def add_scene_cut(self, frame_index: int) -> None:
        """Record that a new shot starts at ``frame_index``."""
        self._db.execute("INSERT INTO cuts VALUES (?)", (frame_index,))

    def write(self, path: str | Path) -> None:
        """Write the JSON document to ``path``; it appears only when complete."""
        self._db.execute("CREATE INDEX IF NOT EXISTS by_track ON faces (track_id, frame_index)")
        head: dict[str, Any] = {"input": self.input_path, "frames": self.frames, "fps": self.fps}
        if self.precision is not None:
            head["precision"] = self.precision
        with atomic_file(path) as out:
            out.write(json.dumps(head)[:-1].encode("utf-8"))
            cuts = (str(i) for (i,) in self._db.execute("SELECT frame_index FROM cuts ORDER BY frame_index"))
            out.write(f', "scene_cuts": [{", ".join(cuts)}],\n "tracks": ['.encode("utf-8"))
            tracks = self._db.execute(
                "SELECT track_id, MAX(restored) FROM faces GROUP BY track_id ORDER BY track_id"
            )
            for n, (track_id, restored) in enumerate(tracks):
                out.write(b",\n" if n else b"\n")
                out.write(f'  {{"id": {track_id}, "restored": {json.dumps(bool(restored))}, "frames": ['.encode("utf-8"))
                entries = self._db.execute(
                    "SELECT entry FROM faces WHERE track_id = ? ORDER BY frame_index", (track_id,)
                )
                for k, (entry,) in enumerate(entries):
                    out.write(((",\n   " if k else "\n   ") + entry).encode("utf-8"))
                out.write(b"]}")
            out.write(b"\n]}\n")

    def close(self) -> None:
        """Drop the spool (SQLite deletes its temporary file). Idempotent."""
        self._db.close()
