"""Wire the stages: decode → detect → track → smooth → align → restore → blend → encode.

Two passes by default. Pass 1 (``analyse``) decodes, detects and tracks the whole video,
keeping only the small per-face records, then smooths every track with a zero-phase
smoother and fills short gaps. Pass 2 (``render``) decodes again, crops, restores in
batches, blends and encodes, every stage in its own thread. ``single_pass`` does both in
one decode with a causal smoother, for inputs that cannot be read twice.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpen_video.config import Config
from gpen_video.device import resolve_device, resolve_dtype
from gpen_video.engine import StageTimer, prefetch, timed_map
from gpen_video.faces import align, detect, smooth, track
from gpen_video.io.decode import VideoReader
from gpen_video.io.encode import VideoWriter
from gpen_video.io.files import check_output
from gpen_video.io.images import read_image, write_image
from gpen_video.records import AlignedFace, Detections, Frame, TrackedFace
from gpen_video.report import build_report, write_json_atomic
from gpen_video.restore.restorer import Restorer, default_batch_size, fit_batch_size
from gpen_video.warp import blend

log = logging.getLogger(__name__)

DETECT_BATCH = 8
"""Frames per detector call in pass 1. Higher: better accelerator use, more memory."""
MIN_FACE_HISTORY = 250
"""Faces of a track whose median size decides ``min_face`` in single-decode modes."""


@dataclass(frozen=True)
class Analysis:
    """What pass 1 learnt: every frame's timestamp and every track's faces."""

    pts: tuple[int | None, ...]
    time_base: Fraction
    rate: Fraction | None
    tracks: dict[int, list[TrackedFace]]
    restored_tracks: frozenset[int]
    faces_by_frame: dict[int, list[TrackedFace]]
    scene_cuts: tuple[int, ...] = ()


@dataclass(frozen=True)
class JobResult:
    """Summary of one restored file."""

    input: Path
    output: Path
    frames: int
    faces_restored: int
    tracks: int
    seconds: float
    damaged_frames: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Work:
    """One frame on its way through pass 2.

    ``crops`` are (M, S, S, 3) arrays on the OpenCV path and [M,3,S,S] tensors in [0, 1] on
    the torch path, where ``pixels`` holds the frame on the device as a [3,H,W] tensor of the
    frame's integer values (uint8, or int32 for 16-bit frames), four times smaller than floats
    while the frame waits for its batch.
    """

    frame: Frame
    aligned: list[AlignedFace]
    crops: np.ndarray | torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    restored: np.ndarray | torch.Tensor | None = None


def select_faces(faces: Sequence[TrackedFace], *, only_largest: bool) -> list[TrackedFace]:
    """The faces of one frame to restore (largest first when only one is wanted)."""
    if only_largest and faces:
        return [max(faces, key=lambda f: f.size)]
    return list(faces)


def _median_size(faces: Sequence[TrackedFace]) -> float:
    return float(np.median([f.size for f in faces]))


class FacePipeline:
    """Models and settings of a job, built once and reused across files.

    Args:
        config: the job's settings.
        restorer: an already built restorer (tests pass one with an identity network).
        detector: an already built detector.
        progress: show tqdm bars on stderr.
    """

    def __init__(
        self,
        config: Config,
        *,
        restorer: Restorer | None = None,
        detector: detect.FaceDetector | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.progress = progress and not config.quiet
        self.device = resolve_device(config.device) if restorer is None else restorer.device
        self.restorer = restorer if restorer is not None else self._build_restorer()
        self.detector = detector if detector is not None else detect.create_detector(
            config.detector,
            detect_size=config.detect_size,
            score_threshold=config.score_threshold,
            device=str(self.device),
            cache_dir=config.cache_dir,
            offline=config.offline,
            mirror=config.mirror,
            progress=self.progress,
        )
        self.torch_warp = config.warp == "torch" or (config.warp == "auto" and self.device.type == "cuda")
        self.masker = None
        if config.mask == "parse":
            self.masker = blend.ParsingMasker(
                device=str(self.device),
                cache_dir=config.cache_dir,
                offline=config.offline,
                mirror=config.mirror,
                progress=self.progress,
            )

    def _build_restorer(self) -> Restorer:
        from gpen_video.restore.weights import load_gpen, spec_for

        dtype = resolve_dtype(self.config.precision, self.device)
        model = load_gpen(
            self.config.model,
            path=self.config.weights,
            cache_dir=self.config.cache_dir,
            offline=self.config.offline,
            mirror=self.config.mirror,
            progress=self.progress,
        )
        size = spec_for(self.config.model).config.size
        batch = self.config.batch_size or default_batch_size(self.device)
        restorer = Restorer(model, size, device=self.device, dtype=dtype, batch_size=batch)
        if self.config.batch_size is None and self.device.type == "cuda":
            restorer.batch_size = fit_batch_size(restorer)
            log.info("batch size %d fits the free GPU memory", restorer.batch_size)
        return restorer

    # ------------------------------------------------------------------ pass 1

    def _bar(self, total: int | None, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="frame", disable=not self.progress, leave=False, dynamic_ncols=True)

    def _detections(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, Detections, bool]]:
        """(frame, detections, starts_new_shot) for every frame, detected in small batches."""
        cuts = track.SceneCutDetector()
        batch: list[tuple[Frame, bool]] = []

        def flush() -> Iterator[tuple[Frame, Detections, bool]]:
            found = self.detector.detect([f.rgb for f, _ in batch])
            for (frame, cut), det in zip(batch, found):
                yield frame, det, cut
            batch.clear()

        for frame in frames:
            batch.append((frame, cuts.update(track.cut_signature(frame.rgb))))
            if len(batch) == DETECT_BATCH:
                yield from flush()
        if batch:
            yield from flush()

    @staticmethod
    def _decoded(reader: VideoReader, timer: StageTimer | None) -> Iterator[Frame]:
        return prefetch(reader.frames(), 8, name="decode", timer=timer)

    def _detected(self, reader: VideoReader, timer: StageTimer | None) -> Iterator[tuple[Frame, Detections, bool]]:
        """Decoded frames with their detections and scene-cut flags, two threads ahead."""
        return prefetch(self._detections(self._decoded(reader, timer)), 2 * DETECT_BATCH, name="detect")

    def analyse(self, path: Path, *, timer: StageTimer | None = None) -> Analysis:
        """Pass 1: detect and track every face, then smooth each track without lag."""
        tracker = track.Tracker(max_gap=self.config.max_gap)
        pts: list[int | None] = []
        raw: dict[int, list[TrackedFace]] = defaultdict(list)
        cuts: list[int] = []
        with VideoReader(path, deinterlace=self.config.deinterlace) as reader:
            time_base, rate = reader.info.time_base, reader.info.average_rate
            detected = self._detected(reader, timer)
            with self._bar(reader.info.frame_count, "analyse") as bar:
                for frame, det, cut in detected:
                    pts.append(frame.pts)
                    if cut and frame.index > 0:
                        tracker.reset()
                        cuts.append(frame.index)
                    for face in tracker.update(frame.index, det):
                        raw[face.track_id].append(face)
                    bar.update()
        tracks = smooth.smooth_tracks(raw, window=self.config.smooth_window)
        return self._select(tuple(pts), time_base, rate, tracks, tuple(cuts))

    def _select(
        self,
        pts: tuple[int | None, ...],
        time_base: Fraction,
        rate: Fraction | None,
        tracks: dict[int, list[TrackedFace]],
        cuts: tuple[int, ...] = (),
    ) -> Analysis:
        restored = frozenset(
            tid for tid, faces in tracks.items() if faces and _median_size(faces) >= self.config.min_face
        )
        by_frame: dict[int, list[TrackedFace]] = defaultdict(list)
        for tid in restored:
            for face in tracks[tid]:
                by_frame[face.frame_index].append(face)
        chosen = {
            index: select_faces(faces, only_largest=self.config.only_largest_face) for index, faces in by_frame.items()
        }
        return Analysis(pts, time_base, rate, tracks, restored, chosen, cuts)

    # ------------------------------------------------------------------ pass 2

    def _crop(self, item: tuple[Frame, list[TrackedFace]]) -> _Work:
        frame, faces = item
        if not faces:
            return _Work(frame, [])
        if not self.torch_warp:
            aligned = align.align_faces(frame.rgb, faces, self.restorer.size)
            return _Work(frame, aligned, np.stack([a.crop for a in aligned]))
        size = self.restorer.size
        affines = np.stack([align.face_affine(f.landmarks, size) for f in faces])
        pixels = self._upload(frame.rgb)
        crops = align.align_faces_torch(self._unit(pixels, frame)[None], [0] * len(faces), affines, size)  # [M3SS]
        empty = np.zeros((0, 0, 3), frame.rgb.dtype)
        aligned = [AlignedFace(f, empty, a) for f, a in zip(faces, affines)]
        return _Work(frame, aligned, crops, pixels)

    def _upload(self, rgb: np.ndarray) -> torch.Tensor:
        """[3,H,W] integer tensor on the restorer's device (pinned, non-blocking copy)."""
        host = torch.from_numpy(rgb if rgb.dtype == np.uint8 else rgb.astype(np.int32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True).permute(2, 0, 1)  # [3HW]

    @staticmethod
    def _unit(pixels: torch.Tensor, frame: Frame) -> torch.Tensor:
        """The frame's values as float32 in [0, 1]."""
        return pixels.float().div_(float(np.iinfo(frame.rgb.dtype).max))

    def _restore_in_batches(self, items: Iterable[_Work], timer: StageTimer | None) -> Iterator[_Work]:
        """Fill whole batches from consecutive frames (and every track in them), keep order.

        A partial batch waits for more faces; it is flushed when the frames held back behind
        it would stall the encoder, and at the end.
        """
        batch = self.restorer.batch_size
        max_held = max(16, 2 * batch)
        held: list[_Work] = []
        crops = 0

        def flush() -> Iterator[_Work]:
            nonlocal crops
            if crops:
                start = time.perf_counter()
                parts = [w.crops for w in held if w.aligned]
                if self.torch_warp:
                    restored = self.restorer.restore_tensor(torch.cat(parts))
                else:
                    restored = self.restorer.restore(np.concatenate(parts))
                if timer is not None:
                    timer.add("restore", time.perf_counter() - start)
            offset = 0
            for work in held:
                n = len(work.aligned)
                yield replace(work, crops=None, restored=restored[offset : offset + n]) if n else work
                offset += n
            held.clear()
            crops = 0

        for work in items:
            held.append(work)
            crops += len(work.aligned)
            if crops >= batch or len(held) >= max_held:
                yield from flush()
        if held:
            yield from flush()

    def _masks(self, restored: np.ndarray | torch.Tensor) -> np.ndarray | None:
        if self.masker is None:
            return None
        if isinstance(restored, torch.Tensor):
            restored = (restored * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        elif restored.dtype != np.uint8:
            restored = (restored >> 8).astype(np.uint8)
        return self.masker.masks(restored)

    def _blend(self, work: _Work) -> Frame:
        frame = work.frame
        if not work.aligned:
            return frame
        masks = self._masks(work.restored)
        strength = self.config.strength
        if not self.torch_warp:
            rgb = blend.paste_faces(frame.rgb, work.aligned, list(work.restored), strength=strength, masks=masks)
            return replace(frame, rgb=rgb)
        mask_t = None if masks is None else torch.from_numpy(masks).to(self.device)
        small = [a.face.size < blend.SMALL_FACE for a in work.aligned]
        affines = np.stack([a.affine for a in work.aligned])
        out = blend.paste_faces_torch(self._unit(work.pixels, frame), work.restored, affines, mask_t, strength, smooth=small)
        scale = float(np.iinfo(frame.rgb.dtype).max)
        out = (out * scale).round_().clamp_(0, scale).permute(1, 2, 0)  # [HW3]
        host = out.to(torch.uint8 if frame.rgb.dtype == np.uint8 else torch.int32).cpu().numpy()
        return replace(frame, rgb=host.astype(frame.rgb.dtype, copy=False))

    def render(
        self,
        frames: Iterable[tuple[Frame, list[TrackedFace]]],
        writer: VideoWriter,
        *,
        total: int | None,
        timer: StageTimer | None = None,
    ) -> None:
        """Pass 2: crop, restore, blend and write every frame in order."""
        cropped = prefetch(timed_map(self._crop, frames, name="crop", timer=timer), 16, name="crop")
        restored = self._restore_in_batches(cropped, timer)
        blended = prefetch(timed_map(self._blend, restored, name="blend", timer=timer), 16, name="blend")
        with self._bar(total, "restore") as bar:
            for frame in blended:
                start = time.perf_counter()
                writer.write(frame)
                if timer is not None:
                    timer.add("encode", time.perf_counter() - start)
                bar.update()

    # ------------------------------------------------------------------ jobs

    def _writer(self, source: VideoReader, output: Path) -> VideoWriter:
        c = self.config
        return VideoWriter(
            output, source, codec=c.codec, crf=c.crf, preset=c.preset, strict=c.strict, overwrite=c.overwrite
        )

    def restore_video(self, input_path: str | Path, output_path: str | Path, *, report_path: str | Path | None = None) -> JobResult:
        """Restore every face of a video; write the output (and the JSON report) atomically."""
        input_path, output_path = Path(input_path), Path(output_path)
        check_output(input_path, output_path, overwrite=self.config.overwrite)
        started = time.perf_counter()
        timer = StageTimer()
        faces_before = self.restorer.stats.faces
        if self.config.single_pass or self.config.lookahead:
            analysis, damaged = self._one_decode(input_path, output_path, timer)
        else:
            analysis = self.analyse(input_path, timer=timer)
            with VideoReader(input_path, deinterlace=self.config.deinterlace) as reader:
                with self._writer(reader, output_path) as writer:
                    frames = self._decoded(reader, timer)
                    planned = ((f, analysis.faces_by_frame.get(f.index, [])) for f in frames)
                    self.render(planned, writer, total=len(analysis.pts), timer=timer)
                damaged = reader.damaged_frames
        if report_path is not None:
            write_json_atomic(report_path, self.report(input_path, analysis))
        return JobResult(
            input=input_path,
            output=output_path,
            frames=len(analysis.pts),
            faces_restored=self.restorer.stats.faces - faces_before,
            tracks=len(analysis.restored_tracks),
            seconds=time.perf_counter() - started,
            damaged_frames=damaged,
            stage_seconds=dict(timer.busy),
        )

    def _one_decode(self, input_path: Path, output_path: Path, timer: StageTimer) -> tuple[Analysis, int]:
        """Detect, track, smooth and restore in a single decode.

        ``lookahead``: zero-phase smoothing as in two passes, each frame held back until the
        smoother has seen enough later ones, while detection runs alongside restoration.
        ``single_pass``: a causal One-Euro filter, no frames held back.
        """
        c = self.config
        tracker = track.Tracker(max_gap=c.max_gap)
        pts: list[int | None] = []
        cuts: list[int] = []
        tracks: dict[int, list[TrackedFace]] = defaultdict(list)
        recent_sizes: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=MIN_FACE_HISTORY))

        def release(frame: Frame, faces: list[TrackedFace]) -> tuple[Frame, list[TrackedFace]]:
            for face in faces:
                tracks[face.track_id].append(face)
                recent_sizes[face.track_id].append(face.size)
            keep = [f for f in faces if np.median(recent_sizes[f.track_id]) >= c.min_face]
            return frame, select_faces(keep, only_largest=c.only_largest_face)

        def tracked(detected: Iterable[tuple[Frame, Detections, bool]]) -> Iterator[tuple[Frame, list[TrackedFace]]]:
            for frame, det, cut in detected:
                pts.append(frame.pts)
                if cut and frame.index > 0:
                    tracker.reset()
                    cuts.append(frame.index)
                yield frame, tracker.update(frame.index, det)

        def lookahead(items: Iterable[tuple[Frame, list[TrackedFace]]]) -> Iterator[tuple[Frame, list[TrackedFace]]]:
            smoother = smooth.LookaheadSmoother(window=c.smooth_window, max_gap=c.max_gap)
            held: deque[Frame] = deque()
            for frame, faces in items:
                held.append(frame)
                for _, ready in smoother.push(frame.index, faces):
                    yield release(held.popleft(), ready)
            for _, ready in smoother.finish():
                yield release(held.popleft(), ready)

        def causal(items: Iterable[tuple[Frame, list[TrackedFace]]]) -> Iterator[tuple[Frame, list[TrackedFace]]]:
            smoother = smooth.OneEuroSmoother(frame_step=float(1 / rate) if rate else 1 / 30)
            for frame, faces in items:
                if cuts and cuts[-1] == frame.index:
                    smoother.reset()
                yield release(frame, smoother.update(faces, frame.time))

        with VideoReader(input_path, deinterlace=c.deinterlace) as reader:
            rate, time_base = reader.info.average_rate, reader.info.time_base
            with self._writer(reader, output_path) as writer:
                smoothed = (lookahead if c.lookahead else causal)(tracked(self._detected(reader, timer)))
                self.render(smoothed, writer, total=reader.info.frame_count, timer=timer)
            damaged = reader.damaged_frames
        return self._select(tuple(pts), time_base, rate, dict(tracks), tuple(cuts)), damaged

    def report(self, input_path: Path, analysis: Analysis) -> dict:
        return build_report(
            input_path,
            fps=float(analysis.rate) if analysis.rate else 0.0,
            pts=analysis.pts,
            time_base=analysis.time_base,
            tracks=analysis.tracks,
            restored_tracks=set(analysis.restored_tracks),
            extra={"scene_cuts": list(analysis.scene_cuts)},
        )

    # ------------------------------------------------------------------ images

    def restore_image(self, input_path: str | Path, output_path: str | Path) -> JobResult:
        """Restore every face of one still image (jpg/png/bmp/webp/tiff)."""
        input_path, output_path = Path(input_path), Path(output_path)
        started = time.perf_counter()
        check_output(input_path, output_path, overwrite=self.config.overwrite)
        rgb, alpha = read_image(input_path)
        frame = Frame(0, 0, Fraction(1), rgb)
        det = self.detector.detect([rgb])[0]
        faces = [
            TrackedFace(i, 0, det.boxes[i], det.landmarks[i], det.landmarks[i], float(det.scores[i]))
            for i in range(len(det))
        ]
        faces = select_faces([f for f in faces if f.size >= self.config.min_face], only_largest=self.config.only_largest_face)
        before = self.restorer.stats.faces
        (work,) = self._restore_in_batches([self._crop((frame, faces))], None)
        write_image(output_path, self._blend(work).rgb, alpha)
        return JobResult(
            input=input_path,
            output=output_path,
            frames=1,
            faces_restored=self.restorer.stats.faces - before,
            tracks=len(faces),
            seconds=time.perf_counter() - started,
        )
