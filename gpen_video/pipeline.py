"""Wire the stages of one frame stream: plan (detect, track, smooth, select, fade) → upscale
(with ``--upscale N``) → crop → restore → stabilise → paste.

``FramePipeline`` holds a job's models (built once, reused for any number of streams) and
wires them: the planner holds each frame back until its faces are final (the smoother's
look-ahead), the upscaler (``upscale.stage``) enlarges frames in one thread (on the GPU the
torch warp uses, they stay there until their paste: ``upscale_on_device``), crops (of the
faces moved to the enlarged frame) run in another, GPEN fills whole batches from consecutive
frames in a thread of its own, the temporal stabiliser averages each track's restored crops
over ``reach`` frames (across segment edges: a job renders ``reach`` halo frames beyond them,
restored but not written) and paste-back follows it in another thread, and frames come out in
order (``render``). New stages of the frame stream go here, between the planner and the
writer. Files, segments, resuming and Ray are the job layer's (``gpen_video.jobs``), which
also gives the public ``FacePipeline``: this class with ``restore_video`` and ``restore_image``.

For example, ``FramePipeline(load_config("fast", device="cpu")).restore_frames(frames)``
restores a stream of (H, W, 3) uint8 RGB arrays, in order.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

import numpy as np
import torch

from gpen_video.config import Config
from gpen_video.device import resolve_device
from gpen_video.engine import Stages
from gpen_video.errors import Cancelled, InputError
from gpen_video.faces.detect import FaceDetector, create_detector
from gpen_video.io.decode import VideoInfo
from gpen_video.plan import PlannedFrame, Planner
from gpen_video.records import Frame, TrackedFace
from gpen_video.restore.restorer import (Restorer, build_restorer, fit_batch_size, measure_face_bytes,
                                         restored_in_batches)
from gpen_video.restore.temporal import TemporalSettings, stabilise, stabilised_stream
from gpen_video.restore.precision import module_digest
from gpen_video.upscale.stage import UpscaleStage, build_upscale_stage, scale_face, scaled_info
from gpen_video.warp import FaceCrops, Warp, create_warp
from gpen_video.warp.masks import face_mask

log = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]
"""``progress(done_frames, total_frames_or_None)``, called as frames come out; raising
``gpen_video.Cancelled`` from it stops the stream cleanly."""

MODEL_SETTINGS = ("model", "weights", "device", "precision", "detector", "detect_size", "score_threshold", "mask",
                  "upscale", "upscaler")
"""Config fields that decide which models a pipeline loads (see ``FramePipeline.reconfigured``)."""
DECODE_DEPTH = 8
"""Decoded frames queued ahead of the planner."""
STAGE_DEPTH = 16
"""Frames queued between crop, restore and paste. Higher: smoother pace, more memory."""
FRAMES_RATE = Fraction(25)
"""Nominal rate given to frames passed to ``restore_frames`` (only the report would show it)."""
Neighbour = tuple[int, np.ndarray, Sequence[TrackedFace]]
"""A frame near a previewed one: its offset from it, its (H, W, 3) RGB pixels, its planned faces."""


@dataclass(frozen=True)
class _Restored:
    """One planned frame, the frame it is restored into (``planned.frame``, or its copy
    ``upscale``× larger, without a decoder picture), its crops and their restored faces
    ([M,3,S,S] in [0, 1]), or no faces; ``fp32_reruns``: faces of the restorer's batch that
    ran again in fp32, counted on the batch's first frame."""

    planned: PlannedFrame
    frame: Frame
    crops: FaceCrops | None
    restored: torch.Tensor | None = None
    fp32_reruns: int = 0


@dataclass
class RenderCounts:
    """What a ``FramePipeline.render`` did for the frames it gave out (not those it only
    restored as neighbours): faces the restorer ran again in fp32."""

    fp32_reruns: int = 0


class FramePipeline:
    """The models and settings of a job, built once and reused across streams and files.

    Args:
        config: the job's settings (``load_config``). Weights are fetched only when
            ``config.offline`` is False and they are not cached; ``config.weights`` never
            downloads.
        restorer: an already built restorer (tests pass one with an identity network).
        detector: an already built detector.
        upscale: an already built upscaling stage for ``config.upscale`` > 1.
        download_progress: show a progress bar on stderr while weights download.

    Attributes:
        upscale_on_device: whether enlarged frames keep their pixels on the device from upscale
            to paste (``UpscaleStage.enlarge(on_device=True)``): where the upscaler runs on the
            GPU the warp holds frames on. Same pixels either way; on the CPU there is no copy
            to save, so it is off there unless a test turns it on.
    """

    def __init__(
        self,
        config: Config,
        *,
        restorer: Restorer | None = None,
        detector: FaceDetector | None = None,
        upscale: UpscaleStage | None = None,
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
        self.temporal = TemporalSettings.of(config)
        self.planner = self._planner(self.temporal)
        self.upscale = upscale if upscale is not None else build_upscale_stage(config, self.device,
                                                                              progress=download_progress)
        self.warp: Warp = create_warp(config.warp, size=self.restorer.size, device=self.device)
        self.upscale_on_device = (self.upscale is not None and self.upscale.device.type != "cpu"
                                  and self.upscale.device == self.warp.hold_device)
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

    @property
    def halo(self) -> int:
        """Frames beyond a segment's edges whose restored faces its own frames are stabilised
        with: the stabiliser's ``reach`` (0 with ``temporal`` off)."""
        return self.temporal.reach if self.temporal is not None else 0

    def _planner(self, temporal: TemporalSettings | None) -> Planner:
        c = self.config
        return Planner(self.detector, smooth_window=c.smooth_window, max_gap=c.max_gap, min_face=c.min_face,
                       only_largest_face=c.only_largest_face, skip_tracks=c.skip_tracks, temporal=temporal,
                       detect_every=c.detect_every, detect_size=c.detect_size)

    @cached_property
    def still_planner(self) -> Planner:
        """The planner of a still image: no fades (a photo's face is one frame, not a short
        track); the stabiliser still gives it the colour fix."""
        return self._planner(None)

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

    def output_info(self, info: VideoInfo) -> VideoInfo:
        """What this pipeline's frames are, given its input's ``info``: ``config.upscale``× larger."""
        return scaled_info(info, self.config.upscale)

    def fit_batch(self, height: int, width: int, dtype: np.dtype, *, free_bytes: int, face_bytes: int) -> int:
        """The batch size that fits ``free_bytes`` of device memory for input frames of this
        size, counting the frames the pipeline holds on the device (``frames_on_device``),
        which are the upscaled ones, and what the upscaler needs."""
        scale = self.config.upscale
        upscaler_bytes = self.upscale.device_bytes(height, width) if self.upscale is not None else 0
        return fit_batch_size(
            free_bytes=free_bytes - upscaler_bytes,
            per_face_bytes=face_bytes,
            frame_bytes=self.warp.held_bytes(height * scale, width * scale, dtype),
            frames_held=self.frames_on_device,
        )

    def fit_cuda_batch(self, height: int, width: int, dtype: np.dtype) -> None:
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
        crop queue, the frames waiting for a full batch, the restored queue and the paste
        queue; with ``upscale_on_device`` also the upscaler's queue and batch (its frames are
        already there)."""
        reach = self.temporal.reach if self.temporal is not None else 0
        upscaled = STAGE_DEPTH + self.upscale.batch_size if self.upscale_on_device else 0
        return (upscaled + STAGE_DEPTH + self._max_held(batch_size) + self._restored_depth(batch_size) + reach
                + STAGE_DEPTH + 2)

    @staticmethod
    def _max_held(batch_size: int) -> int:
        return max(STAGE_DEPTH, 2 * batch_size)

    @staticmethod
    def _restored_depth(batch_size: int) -> int:
        """Restored frames queued for the stabiliser: one batch, so the restorer starts the
        next while they are stabilised and pasted."""
        return max(2, batch_size)

    def _crop(self, item: tuple[PlannedFrame, Frame]) -> _Restored:
        planned, frame = item
        if not planned.faces:
            return _Restored(planned, frame, None)
        scale = self.config.upscale
        faces = planned.faces if scale == 1 else tuple(scale_face(face, scale) for face in planned.faces)
        return _Restored(planned, frame, self.warp.crop(frame, faces))

    def _restore_in_batches(self, items: Iterable[_Restored], stages: Stages,
                            group_of: Callable[[Frame], int] | None = None) -> Iterator[_Restored]:
        """Whole batches from consecutive frames (``restored_in_batches``), never spanning two
        groups of ``group_of`` (a batch's company can change results in the last bits, and a
        resumed job must restore each frame alike: ``SegmentPlan.group_of``)."""
        reruns = self.restorer.stats.fp32_reruns
        for work, restored in restored_in_batches(
            self.restorer, _group_starts(items, group_of), lambda w: w.crops and w.crops.pixels,
            max_held=self._max_held(self.restorer.batch_size), timed=lambda seconds: stages.time("restore", seconds),
        ):
            now = self.restorer.stats.fp32_reruns
            if restored is not None or now != reruns:
                work = dataclasses.replace(work, restored=restored, fp32_reruns=now - reruns)
            reruns = now
            yield work

    def _stabilise(self, items: Iterable[_Restored], stages: Stages) -> Iterator[_Restored]:
        """Each frame's restored faces stabilised over their tracks (``stabilised_stream``),
        afresh after a gap in the frames (a job's frames that are neither rendered nor a halo);
        a frame's window reaches across segment edges into the halo frames."""
        if self.temporal is None:
            yield from items
            return
        for work, faces in stabilised_stream(
            _after_gaps(items), self.temporal, index=lambda w: w.planned.frame.index,
            faces=lambda w: {} if w.crops is None else {
                f.track_id: (w.crops.pixels[i], w.restored[i]) for i, f in enumerate(w.crops.faces)},
            timed=lambda seconds: stages.time("temporal", seconds),
        ):
            if work.crops is None:
                yield work
            else:
                yield dataclasses.replace(work, restored=torch.stack([faces[f.track_id] for f in work.crops.faces]))

    def _paste(self, work: _Restored) -> tuple[PlannedFrame, Frame]:
        if work.crops is None:
            return work.planned, work.frame
        return work.planned, self._pasted(work.crops, work.restored)

    def _pasted(self, crops: FaceCrops, restored: torch.Tensor) -> Frame:
        """Paste ``restored``, each face's mask times its weight (the planner's fades)."""
        masks = self.masker.masks(restored) if self.masker is not None else None
        weights = np.array([f.weight for f in crops.faces], np.float32)
        if np.any(weights != 1.0):
            plain = face_mask(self.warp.size)[None] if masks is None else masks
            masks = plain * weights[:, None, None]  # (M,S,S)
        return self.warp.paste(crops, restored, strength=self.config.strength, masks=masks)

    def render(self, planned: Iterable[PlannedFrame], stages: Stages, group_of: Callable[[Frame], int] | None = None,
               *, keep: Callable[[Frame], bool] | None = None, counts: RenderCounts | None = None,
               ) -> Iterator[tuple[PlannedFrame, Frame]]:
        """Each planned frame with its faces restored and pasted back (into the frame upscaled
        ``config.upscale``×), in order, in the threads of ``stages``.

        Args:
            planned: consecutive frames, with gaps only between groups.
            group_of: batches never span two of its groups (``SegmentPlan.group_of``).
            keep: which frames come out; the others (a segment's halo) are restored only as
                their neighbours' company in the stabiliser. None: all.
            counts: what the frames that come out cost, added up there.
        """
        if self.upscale is None:
            framed: Iterable[tuple[PlannedFrame, Frame]] = ((p, p.frame) for p in planned)
        else:
            framed = stages.prefetch(self.upscale.run(planned, _frame_of, stages, group_of,
                                                      on_device=self.upscale_on_device),
                                    STAGE_DEPTH, name="upscale", network=True)
        cropped = stages.map(self._crop, framed, name="crop", depth=STAGE_DEPTH)
        # the restorer in a thread of its own: it is the slowest stage on a CPU, and the
        # stabiliser's and the paste's work would otherwise stall it (a 720p one-face job took
        # 11 % longer)
        batches = stages.prefetch(self._restore_in_batches(cropped, stages, group_of),
                                  self._restored_depth(self.restorer.batch_size), name="restore", network=True)
        restored = self._stabilise(batches, stages)
        return stages.map(self._paste, _kept(restored, keep, counts), name="paste", depth=STAGE_DEPTH,
                          network=self.masker is not None)

    @cached_property
    def weights_hash(self) -> str:
        """SHA-256 of the restoring networks' weights as loaded (GPEN, and the face parser of
        ``mask="parse"``): part of a job's identity, computed once per pipeline."""
        return module_digest(self.restorer.model, *([self.masker.net] if self.masker is not None else []))

    def restore_frames(
        self,
        frames: Iterable[np.ndarray],
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[np.ndarray]:
        """Restore a stream of frames: (H, W, 3) uint8 RGB arrays in, restored arrays out (``config.upscale``
        times larger), in order.

        Frames are tracked and smoothed as in a video, so each output comes after the
        planner's look-ahead (about 2 x smooth_window + max_gap frames) has been read.
        Closing the returned generator early stops every stage.

        For example, ``for out in pipeline.restore_frames(camera_frames()): show(out)``.
        """

        def records() -> Iterator[Frame]:
            for index, rgb in enumerate(frames):
                if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                    raise InputError(f"frame {index} must be an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
                yield Frame(index, index, 1 / FRAMES_RATE, rgb)

        with Stages() as stages:
            source = stages.prefetch(records(), DECODE_DEPTH, name="frames")
            restored = self.render(self.planner.plan(source, stages=stages), stages)
            for done, (_, frame) in enumerate(restored, 1):
                yield frame.rgb
                _tick(progress, cancel, done, None)

    def restore_faces(self, rgb: np.ndarray, faces: Sequence[TrackedFace], *,
                      neighbours: Sequence[Neighbour] = ()) -> np.ndarray:
        """Restore the given faces of one frame (a preview: faces come from an earlier plan,
        e.g. a report or ``Planner.plan``, in ``rgb``'s pixels), returning the frame with them
        pasted back, ``config.upscale``× larger as the job's frames are.

        With ``temporal`` on, the colour fix and the faces' weights apply, and each face is
        averaged with its track's faces in ``neighbours``: ``(offset, rgb, faces)`` of the
        frames around this one (offset −reach..reach, 0 left out) with their planned faces.
        Given every frame within ``reach``, the preview is the job's frame: the restorer
        runs on each neighbour's faces of the tracks shown, up to 2·reach + 1 times the
        work of one frame. With ``upscale`` the neighbours are not used (each would have to
        be enlarged): one frame shows the colour fix and weights only."""
        frame = Frame(0, 0, Fraction(1), rgb)
        faces = tuple(f for f in faces if f.weight > 0)
        if self.upscale is not None:
            frame = self.upscale.enlarge([frame], on_device=self.upscale_on_device)[0]
            faces = tuple(scale_face(face, self.config.upscale) for face in faces)
            neighbours = ()
        if not faces:
            return frame.rgb
        crops = self.warp.crop(frame, faces)
        if self.temporal is None:
            return self._pasted(crops, self.restorer.restore_tensor(crops.pixels)).rgb
        reach, shown = self.temporal.reach, {f.track_id for f in faces}
        around: list[tuple[int, FaceCrops]] = []
        for offset, pixels, planned in neighbours:
            wanted = tuple(f for f in planned if f.weight > 0 and f.track_id in shown)
            if wanted and 0 < abs(offset) <= reach:
                around.append((offset, self.warp.crop(Frame(offset, offset, Fraction(1), pixels), wanted)))
        frames = sorted([(0, crops), *around], key=lambda item: item[0])
        restored = self.restorer.restore_tensor(torch.cat([c.pixels for _, c in frames]))
        results = dict(zip([o for o, _ in frames], restored.split([len(c.faces) for _, c in frames])))
        stable = []
        for face in crops.faces:
            track = [(o, c.pixels[j], results[o][j]) for o, c in frames
                     for j, f in enumerate(c.faces) if f.track_id == face.track_id]  # in frame order
            at = [o for o, _, _ in track].index(0)
            source, result = torch.stack([t[1] for t in track]), torch.stack([t[2] for t in track])
            stable.append(stabilise(source, result, self.temporal, output=(at, at + 1))[0])
        return self._pasted(crops, torch.stack(stable)).rgb

    def reconfigured(self, config: Config) -> FramePipeline:
        """A pipeline for ``config`` that shares this one's models where the settings that
        build them (model, weights, device, precision, detector, mask, upscaling) are unchanged."""
        same = {name: getattr(config, name) == getattr(self.config, name) for name in MODEL_SETTINGS}
        if not same["model"] or not same["weights"] or not same["device"] or not same["precision"]:
            return type(self)(config)
        detector_same = all(same[n] for n in ("detector", "detect_size", "score_threshold"))
        upscale_same = same["upscale"] and same["upscaler"]
        other = type(self)(config, restorer=self.restorer, detector=self.detector if detector_same else None,
                           upscale=self.upscale if upscale_same else None)
        if same["mask"] and self.masker is not None:
            other.masker = self.masker
        return other


def _frame_of(planned: PlannedFrame) -> Frame:
    return planned.frame


def _group_starts(items: Iterable[_Restored], group_of: Callable[[Frame], int] | None
                  ) -> Iterator[tuple[_Restored, bool]]:
    """Each item, and whether its frame starts another group than the item before's."""
    group = None
    for n, work in enumerate(items):
        if group_of is None:
            yield work, False
            continue
        group, previous = group_of(work.planned.frame), group
        yield work, n > 0 and group != previous


def _after_gaps(items: Iterable[_Restored]) -> Iterator[tuple[_Restored, bool]]:
    """Each item, and whether frames are missing between it and the item before."""
    previous = None
    for work in items:
        index = work.planned.frame.index
        yield work, previous is not None and index != previous + 1
        previous = index


def _kept(items: Iterable[_Restored], keep: Callable[[Frame], bool] | None,
          counts: RenderCounts | None) -> Iterator[_Restored]:
    for work in items:
        if keep is None or keep(work.planned.frame):
            if counts is not None:
                counts.fp32_reruns += work.fp32_reruns
            yield work


def _tick(progress: Progress | None, cancel: threading.Event | None, done: int, total: int | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled; nothing was written")
    if progress is not None:
        progress(done, total)
