"""Detection logs and face plans of segments, saved exactly in the work folder.

A segment's detection log (``write_log``) holds what detection found in each of its frames
(index, pts, faces, scene-cut features), without pixels: a resumed job, and the driver of a
Ray job, replay it through the planner instead of decoding and detecting those frames again
(``read_log``). A segment's plan (``write_plan``) holds the faces to restore in each of its
frames, for a worker that renders the segment without planning it (``read_plan``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gpen_video.faces.scenes import CutFeatures
from gpen_video.io.decode import VideoInfo
from gpen_video.jobs.workfolder import save_npz
from gpen_video.plan import Observation, placeholder_frame
from gpen_video.records import Detections, TrackedFace

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
    save_npz(path, arrays)
    return count


def read_log(path: Path, info: VideoInfo) -> Iterator[Observation]:
    """The observations ``write_log`` saved, in order, with pixel-less frames
    (``plan.placeholder_frame``) of the frames ``info`` describes (``VideoReader.info``)."""
    time_base, height, width, dtype = info.time_base, info.height, info.width, np.dtype(info.dtype)
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


def write_plan(path: Path, planned: Iterable[tuple[int, Sequence[TrackedFace]]]) -> None:
    """Save the faces to restore in each frame of a segment (``(frame index, faces)``), exactly,
    for a worker that renders the segment without planning it (``read_plan``)."""
    rows: dict[str, list] = {name: [] for name in ("frame", "track", "box", "landmarks", "raw", "has_raw", "score",
                                                   "has_score", "interpolated", "weight")}
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
            rows["weight"].append(face.weight)
            for name, value in (("box", face.box), ("landmarks", face.landmarks), ("raw", rows["raw"][-1])):
                dtypes.setdefault(name, value.dtype)
    shapes = {"box": (0, 4), "landmarks": (0, 5, 2), "raw": (0, 5, 2)}
    arrays = {
        name: (np.stack(rows[name]) if rows[name] else np.zeros(shapes[name], dtypes.get(name, np.float32)))
        for name in shapes
    }
    arrays.update(frame=np.array(rows["frame"], np.int64), track=np.array(rows["track"], np.int64),
                  has_raw=np.array(rows["has_raw"], bool), score=np.array(rows["score"], np.float64),
                  has_score=np.array(rows["has_score"], bool), interpolated=np.array(rows["interpolated"], bool),
                  weight=np.array(rows["weight"], np.float64))
    save_npz(path, arrays)


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
            score=float(a["score"][n]) if a["has_score"][n] else None, interpolated=bool(a["interpolated"][n]),
            weight=float(a["weight"][n])))
    return {index: tuple(found) for index, found in faces.items()}
