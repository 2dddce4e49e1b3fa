"""``FacePipeline``: the public entry point, a ``FramePipeline`` that also restores files.

A video is restored by the job engine (``jobs.run.run_job``): in segments, in a work folder,
resumable, here (``jobs.local.LocalRenderer``) or on Ray workers (``jobs.cluster.RayWorkers``),
with the same bytes either way. An image is one frame, read and written by ``io.images``.

For example, ``FacePipeline(load_config("fast", device="cpu")).restore_video("tape.mp4")``
writes ``tape.restored.mp4`` beside the input and returns a ``JobResult``.
"""

from __future__ import annotations

import threading
import time
from fractions import Fraction
from pathlib import Path

from gpen_video.engine import Stages
from gpen_video.io.encode import default_output_path
from gpen_video.io.files import check_output
from gpen_video.io.images import copy_unchanged, enlarged, read_image, write_image
from gpen_video.jobs.local import LocalRenderer
from gpen_video.jobs.manifest import InputIdentity, Manifest
from gpen_video.jobs.run import JobResult, Progress, Renderer, job_identity, output_settings, run_job
from gpen_video.pipeline import FramePipeline
from gpen_video.records import Frame

__all__ = ["FacePipeline", "JobResult"]


class FacePipeline(FramePipeline):
    """Models and settings of a job, built once and reused across files (see ``FramePipeline``
    for the arguments)."""

    def output_settings(self) -> tuple[dict[str, object], str]:
        """The settings that make this pipeline's output bytes, and its weights' hash."""
        return output_settings(self), self.weights_hash

    def job_identity(self, src: str | Path) -> Manifest:
        """What makes a job on ``src`` give the bytes it gives (input, settings, weights,
        encoder software), without its segments: a folder run compares it with the job that
        wrote an existing output."""
        return job_identity(self, InputIdentity.of(src))

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
        workers: Renderer | None = None,
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
            workers: render the segments there instead of in this process
                (``jobs.cluster.RayWorkers``); the output is the same.

        Raises:
            Cancelled: the job was stopped by ``progress`` or ``cancel``.
            GpenVideoError: a subclass saying what is wrong with the input, output or weights;
                for a segment that failed ``Config.retries + 1`` times, naming it and its frames.
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output_path(src)
        renderer = workers if workers is not None else LocalRenderer(self)
        return run_job(renderer, self, src, dst, overwrite=overwrite, report=report, progress=progress,
                       cancel=cancel, restart=restart)

    def restore_image(self, src: str | Path, dst: str | Path | None = None, *, overwrite: bool = False) -> JobResult:
        """Restore every face of one still image (jpg/png/bmp/webp/tiff).

        The image is restored upright (EXIF orientation applied) and written back the same
        way round with its metadata and colour profile; an image where no face was restored
        is copied byte for byte (with ``Config.upscale`` > 1 it is written enlarged).
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output_path(src)
        started = time.perf_counter()
        check_output(src, dst, overwrite=overwrite)
        image = read_image(src)
        frame = Frame(0, 0, Fraction(1), image.rgb)
        before, reruns = self.restorer.stats.faces, self.restorer.stats.fp32_reruns
        with Stages() as stages:
            plan = self.still_planner.plan([frame], stages=stages)
            ((_, out),) = list(self.render(plan, stages))
        faces = self.restorer.stats.faces - before
        if self.upscale is not None:
            write_image(dst, out.rgb, enlarged(image, out.rgb), overwrite=overwrite)
        elif faces:
            write_image(dst, out.rgb, image, overwrite=overwrite)
        else:
            copy_unchanged(src, dst, overwrite=overwrite)
        return JobResult(
            input=src, output=dst, frames=1, faces_restored=faces, tracks=plan.stats.restored_tracks,
            seconds=time.perf_counter() - started, unchanged=not faces and self.upscale is None,
            fp32_reruns=self.restorer.stats.fp32_reruns - reruns,
        )
