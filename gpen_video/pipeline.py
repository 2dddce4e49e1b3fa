"""Wire the stages: decode → plan (detect, track, smooth, select) → crop → restore → paste → encode.

Every frame is read once. The planner holds each frame back until its faces are final (the
smoother's look-ahead), crops run in one thread, GPEN fills whole batches from consecutive
frames, paste-back runs in another thread, and frames are written in order. ``FacePipeline``
is built once (models loaded once) and reused for any number of files or frame streams.

>>> pipeline = FacePipeline(load_config("fast", device="cpu"))          # doctest: +SKIP
>>> pipeline.restore_video("tape.mp4")                                   # doctest: +SKIP
>>> for rgb in pipeline.restore_frames(frames): ...                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from gpen_video.config import Config
from gpen_video.device import resolve_device, resolve_dtype
from gpen_video.engine import Stages, StageTimer
from gpen_video.errors import Cancelled, InputError
from gpen_video.faces.detect import FaceDetector, create_detector
from gpen_video.io.decode import VideoReader
from gpen_video.io.encode import VideoWriter, default_output_path
from gpen_video.io.files import check_output
from gpen_video.io.images import copy_unchanged, read_image, write_image
from gpen_video.plan import Plan, PlannedFrame, Planner
from gpen_video.records import Frame, TrackedFace
from gpen_video.report import ReportWriter
from gpen_video.restore.restorer import Restorer, default_batch_size, fit_batch_size, measure_face_bytes
from gpen_video.warp import FaceCrops, Warp, create_warp

log = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]
"""``progress(done_frames, total_frames_or_None)``, called as frames are written; raising
``gpen_video.Cancelled`` from it stops the job cleanly."""

MODEL_SETTINGS = ("model", "weights", "device", "precision", "detector", "detect_size", "score_threshold", "mask")
"""Config fields that decide which models a pipeline loads (see ``FacePipeline.reconfigured``)."""
DECODE_DEPTH = 8
"""Decoded frames queued ahead of the planner."""
STAGE_DEPTH = 16
"""Frames queued between crop, restore and paste. Higher: smoother pace, more memory."""
FRAMES_RATE = Fraction(25)
"""Nominal rate given to frames passed to ``restore_frames`` (only the report would show it)."""


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
    unchanged: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Restored:
    """One frame's crops with their restored faces ([M,3,S,S] in [0, 1]), or no faces."""

    crops: FaceCrops | None
    frame: Frame
    restored: torch.Tensor | None = None


class FacePipeline:
    """Models and settings of a job, built once and reused across files.

    Args:
        config: the job's settings (``load_config``). Weights are fetched only when
            ``config.offline`` is False and they are not cached; ``config.weights`` never
            downloads.
        restorer: an already built restorer (tests pass one with an identity network).
        detector: an already built detector.
        download_progress: show a progress bar on stderr while weights download.

    >>> pipeline = FacePipeline(load_config(None, device="cpu"))        # doctest: +SKIP
    >>> pipeline.restore_video("a.mp4", "a.restored.mp4").faces_restored  # doctest: +SKIP
    """

    def __init__(
        self,
        config: Config,
        *,
        restorer: Restorer | None = None,
        detector: FaceDetector | None = None,
        download_progress: bool = False,
    ) -> None:
        self.config = config
        self._face_bytes: int | None = None
        self.device = resolve_device(config.device) if restorer is None else restorer.device
        self.restorer = restorer if restorer is not None else self._build_restorer(download_progress)
        self.detector = detector if detector is not None else create_detector(
            config.detector,
            detect_size=config.detect_size,
            score_threshold=config.score_threshold,
            device=str(self.device),
            cache_dir=config.cache_dir,
            offline=config.offline,
            mirror=config.mirror,
            progress=download_progress,
        )
        self.planner = Planner(
            self.detector,
            smooth_window=config.smooth_window,
            max_gap=config.max_gap,
            min_face=config.min_face,
            only_largest_face=config.only_largest_face,
            skip_tracks=config.skip_tracks,
        )
        self.warp: Warp = create_warp(config.warp, size=self.restorer.size, device=self.device)
        self.masker = None
        if config.mask == "parse":
            from gpen_video.restore.parsing import ParsingMasker

            self.masker = ParsingMasker(
                device=str(self.device),
                cache_dir=config.cache_dir,
                offline=config.offline,
                mirror=config.mirror,
                progress=download_progress,
            )

    def _build_restorer(self, download_progress: bool) -> Restorer:
        from gpen_video.restore.weights import get_spec, load_gpen

        c = self.config
        model = load_gpen(
            c.model, path=c.weights, cache_dir=c.cache_dir, offline=c.offline, mirror=c.mirror,
            progress=download_progress,
        )
        size = get_spec(c.model).config.size
        restorer = Restorer(
            model, size, device=self.device, dtype=resolve_dtype(c.precision, self.device),
            batch_size=c.batch_size or default_batch_size(self.device),
        )
        return restorer

    def fit_batch(self, height: int, width: int, dtype: np.dtype, *, free_bytes: int, face_bytes: int) -> int:
        """The batch size that fits ``free_bytes`` of device memory for frames of this size,
        counting the frames the pipeline holds on the device (``frames_on_device``)."""
        return fit_batch_size(
            free_bytes=free_bytes,
            per_face_bytes=face_bytes,
            frame_bytes=self.warp.held_bytes(height, width, dtype),
            frames_held=self.frames_on_device,
        )

    def _fit_cuda_batch(self, height: int, width: int, dtype: np.dtype) -> None:
        """``--batch-size auto`` on CUDA: refit for each video, whose frame size changes what
        the held frames cost."""
        if self.config.batch_size is not None or self.device.type != "cuda":
            return
        if self._face_bytes is None:
            self._face_bytes = measure_face_bytes(self.restorer)
        free, _ = torch.cuda.mem_get_info(self.device)
        self.restorer.batch_size = self.fit_batch(height, width, dtype, free_bytes=free, face_bytes=self._face_bytes)
        log.info("batch size %d fits the free GPU memory", self.restorer.batch_size)

    def frames_on_device(self, batch_size: int) -> int:
        """Most frames the torch warp holds on the device at once with ``batch_size``: the
        crop queue, the frames waiting for a full batch, and the paste queue."""
        return STAGE_DEPTH + self._max_held(batch_size) + STAGE_DEPTH + 2

    @staticmethod
    def _max_held(batch_size: int) -> int:
        return max(STAGE_DEPTH, 2 * batch_size)

    # ------------------------------------------------------------------ stages

    def _crop(self, planned: PlannedFrame) -> _Restored:
        if not planned.faces:
            return _Restored(None, planned.frame)
        return _Restored(self.warp.crop(planned.frame, planned.faces), planned.frame)

    def _restore_in_batches(self, items: Iterable[_Restored], stages: Stages) -> Iterator[_Restored]:
        """Fill whole batches from consecutive frames (and every track in them), keep order.

        A partial batch waits for more faces; it is flushed when the frames held back behind
        it would stall the encoder, and at the end.
        """
        batch = self.restorer.batch_size
        max_held = self._max_held(batch)
        held: list[_Restored] = []
        faces = 0

        def flush() -> Iterator[_Restored]:
            nonlocal faces
            if faces:
                start = time.perf_counter()
                restored = self.restorer.restore_tensor(torch.cat([w.crops.pixels for w in held if w.crops]))
                stages.time("restore", time.perf_counter() - start)
                offset = 0
                for work in held:
                    if work.crops is None:
                        yield work
                        continue
                    n = len(work.crops.faces)
                    yield _Restored(work.crops, work.frame, restored[offset : offset + n])
                    offset += n
            else:
                yield from held
            held.clear()
            faces = 0

        for work in items:
            held.append(work)
            faces += len(work.crops.faces) if work.crops else 0
            if faces >= batch or len(held) >= max_held:
                yield from flush()
        if held:
            yield from flush()

    def _paste(self, work: _Restored) -> Frame:
        if work.crops is None:
            return work.frame
        masks = self.masker.masks(work.restored) if self.masker is not None else None
        return self.warp.paste(work.crops, work.restored, strength=self.config.strength, masks=masks)

    def _restored_frames(self, frames: Iterable[Frame], stages: Stages, report: ReportWriter | None) -> tuple[Plan, Iterator[Frame]]:
        plan = self.planner.plan(frames, stages=stages, report=report)
        cropped = stages.map(self._crop, plan, name="crop", depth=STAGE_DEPTH)
        restored = self._restore_in_batches(cropped, stages)
        return plan, stages.map(self._paste, restored, name="paste", depth=STAGE_DEPTH)

    # ------------------------------------------------------------------ jobs

    def restore_video(
        self,
        src: str | Path,
        dst: str | Path | None = None,
        *,
        overwrite: bool = False,
        report: str | Path | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> JobResult:
        """Restore every face of a video into ``dst`` (default ``NAME.restored.EXT`` beside it).

        The output (and the JSON ``report``) appear only when complete; on any error, on
        ``Cancelled`` raised by ``progress`` and when ``cancel`` is set, nothing is left
        behind and every stage thread is stopped before this returns.

        Args:
            src: the input video.
            dst: the output file; its extension chooses the container.
            overwrite: replace an existing ``dst``.
            report: write the per-track JSON report here.
            progress: ``progress(done_frames, total_frames_or_None)`` after each frame written.
            cancel: set it (from any thread) to stop the job; raises ``Cancelled``.

        Raises:
            Cancelled: the job was stopped by ``progress`` or ``cancel``.
            GpenVideoError: a subclass saying what is wrong with the input, output or weights.

        >>> FacePipeline(config).restore_video("tape.mp4", progress=print)  # doctest: +SKIP
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output_path(src)
        check_output(src, dst, overwrite=overwrite)
        started = time.perf_counter()
        timer = StageTimer()
        faces_before = self.restorer.stats.faces
        written = 0
        with VideoReader(src, deinterlace=self.config.deinterlace) as reader:
            info = reader.info
            self._fit_cuda_batch(info.height, info.width, info.dtype)
            writer_report = ReportWriter(src, fps=float(info.average_rate or 0)) if report else None
            try:
                with Stages(timer) as stages, self._writer(reader, dst, overwrite) as writer:
                    frames = stages.prefetch(reader.frames(), DECODE_DEPTH, name="decode", timed=True)
                    planner, restored = self._restored_frames(frames, stages, writer_report)
                    for frame in restored:
                        start = time.perf_counter()
                        writer.write(frame)
                        stages.time("encode", time.perf_counter() - start)
                        written += 1
                        _tick(progress, cancel, written, info.frame_count)
                if writer_report is not None:
                    writer_report.write(report)
            finally:
                if writer_report is not None:
                    writer_report.close()
            damaged = reader.damaged_frames
        stats = planner.stats
        return JobResult(
            input=src,
            output=dst,
            frames=written,
            faces_restored=self.restorer.stats.faces - faces_before,
            tracks=stats.restored_tracks,
            seconds=time.perf_counter() - started,
            damaged_frames=damaged,
            stage_seconds=dict(timer.busy),
        )

    def _writer(self, reader: VideoReader, dst: Path, overwrite: bool) -> VideoWriter:
        c = self.config
        return VideoWriter(dst, reader, codec=c.codec, crf=c.crf, preset=c.preset, strict=c.strict, overwrite=overwrite)

    def restore_frames(
        self,
        frames: Iterable[np.ndarray],
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[np.ndarray]:
        """Restore a stream of frames: (H, W, 3) uint8 RGB arrays in, restored arrays out, in order.

        Frames are tracked and smoothed as in a video, so each output comes after the
        planner's look-ahead (about 2 x smooth_window + max_gap frames) has been read.
        Closing the returned generator early stops every stage.

        >>> for out in FacePipeline(config).restore_frames(camera_frames()):  # doctest: +SKIP
        ...     show(out)
        """

        def records() -> Iterator[Frame]:
            for index, rgb in enumerate(frames):
                if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                    raise InputError(f"frame {index} must be an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
                yield Frame(index, index, 1 / FRAMES_RATE, rgb)

        with Stages() as stages:
            source = stages.prefetch(records(), DECODE_DEPTH, name="frames")
            _, restored = self._restored_frames(source, stages, None)
            for done, frame in enumerate(restored, 1):
                yield frame.rgb
                _tick(progress, cancel, done, None)

    def restore_faces(self, rgb: np.ndarray, faces: Sequence[TrackedFace]) -> np.ndarray:
        """Restore the given faces of one frame (a preview: faces come from an earlier plan,
        e.g. a report or ``Planner.plan``), returning the frame with them pasted back."""
        frame = Frame(0, 0, Fraction(1), rgb)
        if not faces:
            return rgb
        crops = self.warp.crop(frame, tuple(faces))
        restored = self.restorer.restore_tensor(crops.pixels)
        return self._paste(_Restored(crops, frame, restored)).rgb

    def reconfigured(self, config: Config) -> "FacePipeline":
        """A pipeline for ``config`` that shares this one's models where the settings that
        build them (model, weights, device, precision, detector, mask) are unchanged."""
        same = {name: getattr(config, name) == getattr(self.config, name) for name in MODEL_SETTINGS}
        if not same["model"] or not same["weights"] or not same["device"] or not same["precision"]:
            return FacePipeline(config)
        detector_same = all(same[n] for n in ("detector", "detect_size", "score_threshold"))
        other = FacePipeline(config, restorer=self.restorer, detector=self.detector if detector_same else None)
        if same["mask"] and self.masker is not None:
            other.masker = self.masker
        return other

    def restore_image(self, src: str | Path, dst: str | Path | None = None, *, overwrite: bool = False) -> JobResult:
        """Restore every face of one still image (jpg/png/bmp/webp/tiff).

        The image is restored upright (EXIF orientation applied) and written back the same
        way round with its metadata and colour profile; an image where no face was restored
        is copied byte for byte.
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output_path(src)
        started = time.perf_counter()
        check_output(src, dst, overwrite=overwrite)
        image = read_image(src)
        frame = Frame(0, 0, Fraction(1), image.rgb)
        before = self.restorer.stats.faces
        with Stages() as stages:
            planner, restored = self._restored_frames([frame], stages, None)
            (out,) = list(restored)
        faces = self.restorer.stats.faces - before
        if faces:
            write_image(dst, out.rgb, image, overwrite=overwrite)
        else:
            copy_unchanged(src, dst, overwrite=overwrite)
        return JobResult(
            input=src, output=dst, frames=1, faces_restored=faces, tracks=planner.stats.restored_tracks,
            seconds=time.perf_counter() - started, unchanged=not faces,
        )


def _tick(progress: Progress | None, cancel: threading.Event | None, done: int, total: int | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled; nothing was written")
    if progress is not None:
        progress(done, total)
