"""The ``--report`` JSON: every track, every frame, raw and used landmarks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from gpen_video.io.files import write_atomic
from gpen_video.records import TrackedFace


def _points(array) -> list[list[float]] | None:
    return None if array is None else [[round(float(x), 3), round(float(y), 3)] for x, y in array]


def build_report(
    input_path: str | Path,
    *,
    fps: float,
    pts: Sequence[int | None],
    time_base: Fraction,
    tracks: Mapping[int, Sequence[TrackedFace]],
    restored_tracks: set[int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dictionary.

    Args:
        pts: presentation timestamp of every decoded frame, by frame index.
        tracks: every track's faces in frame order (after smoothing / interpolation).
        restored_tracks: ids of the tracks that were restored (all when None).
    """

    def frame_entry(face: TrackedFace) -> dict[str, Any]:
        frame_pts = pts[face.frame_index]
        return {
            "index": face.frame_index,
            "pts": frame_pts,
            "time": round(float(frame_pts * time_base), 6) if frame_pts is not None else None,
            "score": None if face.score is None else round(float(face.score), 4),
            "box": [round(float(v), 3) for v in face.box],
            "landmarks_raw": _points(face.landmarks_raw),
            "landmarks": _points(face.landmarks),
            "interpolated": bool(face.interpolated),
        }

    report: dict[str, Any] = {
        "input": str(input_path),
        "frames": len(pts),
        "fps": float(fps),
        "tracks": [
            {
                "id": int(track_id),
                "restored": restored_tracks is None or track_id in restored_tracks,
                "frames": [frame_entry(face) for face in faces],
            }
            for track_id, faces in sorted(tracks.items())
        ],
    }
    report.update(extra or {})
    return report


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    write_atomic(path, json.dumps(data, indent=1).encode("utf-8"))
