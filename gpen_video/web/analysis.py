"""The quick look before a restore: the faces (tracks) of a video or photo, and frames to preview.

The planner of the pipeline that will restore the file runs over the same decoded frames
(``VideoReader`` with the job's ``deinterlace``) with the same settings, so the track ids shown
are exactly the ids ``Config.skip_tracks`` (and ``--report``) use. A long video is analysed for
its first ``seconds`` only: the tracker numbers tracks in the order they appear, so the ids of
the tracks seen there are final; a person first seen later is not listed, and is restored.

A few frames (at most ``MAX_SAMPLES``, evenly spaced) are kept as lossless PNG files with their
planned faces, so a preview restores exactly what the job will, without decoding again. With
each, the planned faces of the ``PREVIEW_REACH`` frames either side are kept too: a preview
with temporal stabilisation decodes those frames again (``Analysis.neighbours``) and averages
each face with its track there, as the job does.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from gpen_video.config import Config
from gpen_video.io.decode import VideoReader
from gpen_video.formats import is_image
from gpen_video.io.images import read_image
from gpen_video.pipeline import Neighbour
from gpen_video.records import Frame, TrackedFace

MAX_SAMPLES = 60
"""Frames kept for the preview slider. More: finer choice, more disk and analysis time."""
PREVIEW_REACH = 8
"""Frames either side of a kept frame whose planned faces are kept for its preview: the
largest ``temporal_reach`` a preview averages over in full."""
THUMBNAIL = 128
"""Long side of a track's thumbnail, pixels."""
TRACKING_SETTINGS = ("detector", "detect_size", "detect_every", "score_threshold", "smooth_window", "max_gap",
                     "deinterlace")
"""Config fields that change which tracks exist and their ids: an analysis made with other
values does not describe the job."""

Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class TrackSummary:
    """One person (track) of the analysed part.

    Attributes:
        track_id: the id ``Config.skip_tracks`` takes.
        first, last: times (seconds) of its first and last frame.
        frames: frames it is in.
        restorable: the planner restores it somewhere (``min_face``, ``only_largest_face``).
        thumbnail: (h, w, 3) uint8 RGB crop around its largest appearance.
    """

    track_id: int
    first: float
    last: float
    frames: int
    restorable: bool
    thumbnail: np.ndarray


@dataclass(frozen=True)
class NearbyFrame:
    """A frame near a kept one: where it is in the stream, and the faces the job would restore."""

    index: int
    pts: int | None
    faces: tuple[TrackedFace, ...]


@dataclass(frozen=True)
class Sample:
    """A frame kept for the preview: its pixels on disk, the faces the job would restore, and
    the frames within ``PREVIEW_REACH`` of it (as far as the analysis read), in order."""

    index: int
    time: float
    path: Path
    faces: tuple[TrackedFace, ...]
    nearby: tuple[NearbyFrame, ...] = ()

    def rgb(self) -> np.ndarray:
        """(H, W, 3) RGB, uint8 or uint16, exactly as decoded."""
        bgr = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
        return np.ascontiguousarray(bgr[:, :, ::-1])


@dataclass(frozen=True)
class Analysis:
    """What ``analyse`` found.

    Attributes:
        source: the file analysed.
        name: its name as the person knows it (an upload's original name).
        image: the source is a still image.
        frames: frames analysed.
        complete: every frame of the source was analysed.
        tracks: one entry per track, by id.
        samples: frames kept for the preview, in order.
        config: the settings analysed with (see ``TRACKING_SETTINGS``).
    """

    source: Path
    name: str
    image: bool
    frames: int
    complete: bool
    tracks: tuple[TrackSummary, ...]
    samples: tuple[Sample, ...]
    config: Config

    def sample_near(self, index: int) -> Sample:
        """The kept frame closest to frame ``index``."""
        return min(self.samples, key=lambda s: abs(s.index - index))

    def neighbours(self, sample: Sample, reach: int) -> list[Neighbour]:
        """The frames within ``reach`` of ``sample`` (``FramePipeline.restore_faces``'s
        ``neighbours``), decoded again from the source from the keyframe before them."""
        near = {n.pts: n for n in sample.nearby if 0 < abs(n.index - sample.index) <= reach}
        if self.image or not near or None in near:
            return []
        first = min(near.values(), key=lambda n: n.index)
        frames = _reader(self.source, self.config.deinterlace).frames(
            first.pts, start_index=first.index, stop_pts=max(near) + 1)
        try:
            return [(near[f.pts].index - sample.index, f.rgb, near[f.pts].faces) for f in frames if f.pts in near]
        finally:
            frames.close()

    def describes(self, config: Config) -> bool:
        """True when a job with ``config`` gives tracks the ids shown here."""
        return all(getattr(config, name) == getattr(self.config, name) for name in TRACKING_SETTINGS)


@functools.lru_cache(maxsize=4)
def _reader(source: Path, deinterlace: str) -> VideoReader:
    """A reader per analysed video, so its index (for seeking) is scanned once."""
    return VideoReader(source, deinterlace=deinterlace)


def _thumbnail(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    grow = 0.35 * max(x2 - x1, y2 - y1)
    h, w = rgb.shape[:2]
    left, top = max(0, int(x1 - grow)), max(0, int(y1 - grow))
    right, bottom = min(w, int(math.ceil(x2 + grow))), min(h, int(math.ceil(y2 + grow)))
    crop = rgb[top:bottom, left:right]
    if crop.dtype == np.uint16:
        crop = (crop >> 8).astype(np.uint8)
    scale = THUMBNAIL / max(crop.shape[:2])
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    return cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def analyse(
    pipeline,
    source: Path,
    folder: Path,
    *,
    name: str | None = None,
    seconds: float = 60.0,
    progress: Progress | None = None,
) -> Analysis:
    """Find the tracks of ``source`` with ``pipeline``'s planner, keeping preview frames in ``folder``.

    Args:
        pipeline: the ``FacePipeline`` (its config decides detection and tracking); it must not
            skip tracks, or skipped ones would look unrestorable.
        source: a video or an image.
        folder: an empty folder for the preview frames.
        name: what to call the source in messages (default: its file name).
        seconds: analyse at most this much of a video, from its start.
        progress: ``progress(frames_done, frames_expected)``.

    Raises:
        GpenVideoError: the source cannot be read (InputError, DecodeError).
    """
    config: Config = pipeline.config
    image = is_image(source)
    reader: VideoReader | None = None
    limit: int | None = None
    if image:
        picture = read_image(source)
        frames: Iterator[Frame] = iter([Frame(0, 0, Fraction(1), picture.rgb)])
        expected: int | None = 1
    else:
        reader = VideoReader(source, deinterlace=config.deinterlace)
        info = reader.info
        rate = info.average_rate
        limit = max(1, math.ceil(seconds * rate)) if rate else None
        known = [n for n in (limit, info.frame_count) if n]
        expected = min(known) if known else None
        decoded = reader.frames()
        frames = itertools.islice(decoded, limit) if limit else decoded
    step = max(1, math.ceil((expected or MAX_SAMPLES) / MAX_SAMPLES))
    folder.mkdir(parents=True, exist_ok=True)
    firsts: dict[int, float] = {}
    lasts: dict[int, float] = {}
    counts: dict[int, int] = {}
    largest: dict[int, float] = {}
    thumbs: dict[int, np.ndarray] = {}
    restorable: set[int] = set()
    kept: list[tuple[int, float, Path, tuple[TrackedFace, ...], tuple[NearbyFrame, ...], list[NearbyFrame]]] = []
    before: deque[NearbyFrame] = deque(maxlen=PREVIEW_REACH)
    done = 0
    plan = (pipeline.still_planner if image else pipeline.planner).plan(frames)
    try:
        for planned in plan:
            frame = planned.frame
            for face in planned.tracked:
                tid = face.track_id
                firsts.setdefault(tid, frame.time)
                lasts[tid] = frame.time
                counts[tid] = counts.get(tid, 0) + 1
                area = float((face.box[2] - face.box[0]) * (face.box[3] - face.box[1]))
                if area > largest.get(tid, -1.0):
                    largest[tid] = area
                    thumbs[tid] = _thumbnail(frame.rgb, face.box)
            restorable.update(f.track_id for f in planned.faces)
            here = NearbyFrame(frame.index, frame.pts, planned.faces)
            for *_, after in kept[-(PREVIEW_REACH // step + 1):]:
                if len(after) < PREVIEW_REACH:
                    after.append(here)
            if done % step == 0:
                path = folder / f"frame-{frame.index:08d}.png"
                cv2.imwrite(str(path), np.ascontiguousarray(frame.rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
                kept.append((frame.index, frame.time, path, planned.faces, tuple(before), []))
            before.append(here)
            done += 1
            if progress is not None:
                progress(done, expected)
    finally:
        plan.close()
        if reader is not None:
            decoded.close()
            reader.close()
    complete = image or limit is None or done < limit or done == info.frame_count
    tracks = tuple(
        TrackSummary(tid, firsts[tid], lasts[tid], counts[tid], tid in restorable, thumbs[tid])
        for tid in sorted(firsts)
    )
    samples = tuple(Sample(index, time, path, faces, (*near, *after)) for index, time, path, faces, near, after in kept)
    return Analysis(source, name or source.name, image, done, complete, tracks, samples, config)
