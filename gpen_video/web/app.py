"""The Gradio page of ``gpen-video web``: upload, faces found, preview, restore, download.

What runs where:

- Finding faces and previews run in the page's request (one at a time on the server), with
  the models the jobs use (``Pipelines``): changing strength or the faces to restore never
  reloads weights.
- A restore is a job in ``JobRunner``'s worker thread. The page keeps the job's id in the
  browser (``gr.BrowserState``, localStorage) and polls its state with a ``gr.Timer``, so a
  closed or reloaded page shows the job again, and the job goes on meanwhile. A browser sees
  only its own jobs.
- Gradio serves only its own folder (``served/``): uploads, the images the page shows, and
  links to finished outputs. Job folders and ``--media-dir`` are outside it and also listed in
  Gradio's ``blocked_paths``.
"""

from __future__ import annotations

import html
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (before importing gradio)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from gpen_video import formats  # noqa: E402
from gpen_video.config import CONFIG_DIR, Config, config_from_options  # noqa: E402
from gpen_video.errors import ConfigError, GpenVideoError, describe  # noqa: E402
from gpen_video.io.files import FileLock  # noqa: E402
from gpen_video.web.access import DEFAULT_MAX_UPLOAD  # noqa: E402
from gpen_video.web.analysis import Analysis, analyse  # noqa: E402
from gpen_video.web.jobs import ACTIVE, Job, JobRunner, JobStore, Pipelines, owner_of  # noqa: E402
from gpen_video.web.media import MediaDir  # noqa: E402

log = logging.getLogger(__name__)

ANALYSE_SECONDS = 60.0
"""Seconds from the start of a video in which faces are looked for before a restore."""
POLL_SECONDS = 1.0
"""How often the page asks for the state of its job."""
CODECS = [(entry.label, name) for name, entry in formats.CODECS.items()]
PLAYABLE = {("h264", ".mp4")}
"""(codec, container) pairs that browsers play: other results are offered for download only."""
CSS = """
#error .gv-error { color: #b00020; font-weight: 600; margin: 0; }
#progress .gv-job p { margin: 0.2em 0; }
#progress progress { width: 100%; height: 1.2em; }
"""


@dataclass(frozen=True)
class WebOptions:
    """How ``serve`` runs the page.

    Attributes:
        host, port: where to listen; a host other than the loopback needs ``accounts``.
        preset: ``--config``: a preset name or TOML file, the page's initial preset.
        overrides: settings given on the command line (model, weights, device, offline, ...);
            they win over every preset, as in ``gpen-video restore``.
        accounts: (user, password) pairs; empty: no login.
        max_upload: bytes one upload may have.
        media_dir: ``--media-dir``, or None.
        jobs_dir: the app's own folder (jobs, served files, browser secret).
        keep_days: days an ended job's result and record are kept; inf: for ever.
    """

    jobs_dir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    preset: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    accounts: list[tuple[str, str]] = field(default_factory=list)
    max_upload: int = DEFAULT_MAX_UPLOAD
    media_dir: MediaDir | None = None
    keep_days: float = 7.0


def _clock(seconds: float) -> str:
    seconds = max(0.0, seconds)
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def _eta(seconds: float) -> str:
    minutes, rest = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def _display(rgb: np.ndarray) -> np.ndarray:
    return (rgb >> 8).astype(np.uint8) if rgb.dtype == np.uint16 else rgb


def _error(message: str | None) -> dict:
    if not message:
        return gr.update(value="", visible=False)
    return gr.update(value=f'<p class="gv-error" role="alert">{html.escape(message)}</p>', visible=True)


def _message(exc: Exception, doing: str) -> str:
    """One line for the page: a GpenVideoError's own sentence; anything else is logged."""
    if not isinstance(exc, GpenVideoError):
        log.exception("%s failed", doing)
    return describe(exc, f"in {doing}; the server's log has the details")


def _presets(chosen: str | None) -> tuple[list[tuple[str, str]], str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    choices = [("Default", "")] + [(n.replace("-", " ").capitalize(), n) for n in names]
    if chosen and chosen not in names:
        choices.append((Path(chosen).name, chosen))
    return choices, chosen or ""


class WebApp:
    """The page's handlers around one job runner; ``build()`` makes the Gradio Blocks."""

    def __init__(self, options: WebOptions, pipelines: Pipelines, store: JobStore, runner: JobRunner,
                 served: Path, analyses: Path, secret: str) -> None:
        self.options = options
        self.pipelines = pipelines
        self.store = store
        self.runner = runner
        self.served = served
        self.analyses = analyses
        self.secret = secret
        self.pinned_model = "weights" in options.overrides and options.overrides["weights"] is not None

    # ------------------------------------------------------------------ settings

    def config(self, preset: str, model: str, strength: float, only_largest: bool, codec: str, upscale: int = 1,
               skip: tuple[int, ...] = ()) -> Config:
        """The job's settings: the preset, the command line's flags, then the page's choices."""
        chosen = dict(strength=float(strength), only_largest_face=bool(only_largest), codec=codec,
                      upscale=int(upscale), skip_tracks=tuple(sorted(skip)))
        if not self.pinned_model:
            chosen["model"] = model
        return config_from_options(preset or None, {**self.options.overrides, **chosen})

    def preset_values(self, preset: str) -> tuple:
        try:
            c = config_from_options(preset or None, self.options.overrides)
        except GpenVideoError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), _error(str(exc))
        return c.model, c.strength, c.only_largest_face, c.codec, c.upscale, _error(None)

    # ------------------------------------------------------------------ faces found

    @staticmethod
    def forget(previous: Analysis | None) -> None:
        """Delete the preview frames of an analysis that a new one replaces."""
        if previous is not None and previous.samples:
            shutil.rmtree(previous.samples[0].path.parent, ignore_errors=True)

    def find_faces(self, source: Path, name: str, previous: Analysis | None, settings: tuple,
                   progress: gr.Progress) -> tuple:
        """Outputs: analysis, error, summary, gallery, faces, frame slider, before/after, restore."""
        self.forget(previous)
        folder = self.analyses / secrets.token_hex(8)
        try:
            pipeline = self.pipelines.get(self.config(*settings))
            found = analyse(
                pipeline, source, folder, name=name, seconds=ANALYSE_SECONDS,
                progress=lambda done, total: progress((done, total), desc="Finding faces", unit="frames"),
            )
        except Exception as exc:  # noqa: BLE001 - one line in the page, the traceback in the log
            shutil.rmtree(folder, ignore_errors=True)
            message = _message(exc, "finding faces in " + name).replace(str(source), name)
            return (None, _error(message), "", [], gr.update(choices=[], value=[]),
                    gr.update(interactive=False), None,
                    gr.update(interactive=False))
        restorable = [t for t in found.tracks if t.restorable]
        labels = [(f"Face {t.track_id} · {_clock(t.first)}–{_clock(t.last)}", t.track_id) for t in restorable]
        if found.image:
            labels = [(f"Face {t.track_id}", t.track_id) for t in restorable]
        gallery = [(t.thumbnail, f"Face {t.track_id}") for t in restorable]
        samples = found.samples
        step = samples[1].index - samples[0].index if len(samples) > 1 else 1
        middle = samples[len(samples) // 2].index
        frame = gr.update(visible=False)
        if len(samples) > 1:
            frame = gr.update(minimum=samples[0].index, maximum=samples[-1].index, step=step, value=middle,
                              interactive=True, visible=True)
        error = None if restorable else f"No face to restore was found in {name}; restoring it would change nothing."
        return (found, _error(error), self.summary(found), gallery,
                gr.update(choices=labels, value=[t.track_id for t in restorable]), frame, None,
                gr.update(interactive=True))

    def summary(self, found: Analysis) -> str:
        restorable = sum(t.restorable for t in found.tracks)
        small = len(found.tracks) - restorable
        name = found.name.replace("*", "\\*").replace("_", "\\_")
        faces = f"{restorable} face{'s' if restorable != 1 else ''}"
        if found.image:
            text = f"**{name}**: {faces} found."
        elif found.complete:
            text = f"**{name}**: {faces} found in {found.frames} frames."
        else:
            text = (f"**{name}**: {faces} found in the first {_clock(found.samples[-1].time)} "
                    f"({found.frames} frames). People who first appear later are not listed; they are restored.")
        if small:
            text += f" {small} more {'is' if small == 1 else 'are'} too small to restore and left alone."
        return text

    def preview(self, found: Analysis | None, index: float, checked: list[int], settings: tuple) -> tuple:
        """Outputs: before/after, error."""
        if found is None or not found.samples:
            return None, gr.skip()
        sample = found.sample_near(int(index))
        try:
            pipeline = self.pipelines.get(self.config(*settings))
            rgb = sample.rgb()
            reach = pipeline.temporal.reach if pipeline.temporal is not None and pipeline.upscale is None else 0
            after = pipeline.restore_faces(rgb, [f for f in sample.faces if f.track_id in set(checked or [])],
                                           neighbours=found.neighbours(sample, reach) if reach else ())
        except Exception as exc:  # noqa: BLE001 - one line in the page, the traceback in the log
            return None, _error(_message(exc, "the preview"))
        scale = after.shape[0] // rgb.shape[0]  # --upscale: before shown at the same size, pixels repeated
        before = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1) if scale > 1 else rgb
        return (_display(before), _display(after)), _error(None)

    # ------------------------------------------------------------------ jobs

    def browser(self, state: dict | None) -> dict:
        state = dict(state or {})
        if not state.get("token"):
            state["token"] = secrets.token_urlsafe(24)
        return state

    def job_of(self, state: dict | None) -> Job | None:
        if not state or not state.get("token"):
            return None
        return self.store.get(state.get("job"), owner_of(state["token"]))

    def job_html(self, job: Job | None) -> str:
        if job is None:
            return ""
        name = html.escape(job.name)
        running, waiting = self.runner.counts()
        total = job.total_frames or 0
        if job.state == "queued":
            ahead = self.runner.ahead(job.id)
            status = f"waiting: {ahead} job{'s' if ahead != 1 else ''} ahead of yours"
        elif job.state == "running":
            if job.done_frames == 0:
                status = "starting (loading the model, reading the first frames)"
            else:
                status = f"{job.done_frames}" + (f" / {total}" if total else "") + f" frames · {job.fps:.1f} fps"
                if job.seconds_left is not None:
                    status += f" · {_eta(job.seconds_left)} left"
        elif job.state == "done" and job.image:
            status = f"done: {job.faces_restored} face{'s' if job.faces_restored != 1 else ''} restored"
        elif job.state == "done":
            status = (f"done: {job.done_frames} frame{'s' if job.done_frames != 1 else ''}, "
                      f"{job.faces_restored} face{'s' if job.faces_restored != 1 else ''} restored "
                      f"in {_eta(job.seconds)}")
            if job.served is not None and (job.config.codec, job.served.suffix.lower()) not in PLAYABLE:
                kind = f"{job.config.codec.upper()} {job.served.suffix}"
                status += f"; browsers do not play {kind} files, download it below"
        elif job.state == "cancelled":
            status = "cancelled; nothing was written"
        else:
            status = "failed (see the message above)"
        if job.resumed_at and job.state in ACTIVE:
            status += f" · continued after a server restart from frame {job.resumed_at}"
        elif job.runs > 1 and job.state in ACTIVE:
            status += " · started again after a server restart"
        bar_max = total if total else max(job.done_frames, 1)
        bar_value = bar_max if job.state == "done" else job.done_frames
        queue = f"Server: {running} job running, {waiting} waiting." if job.state in ACTIVE else ""
        return (
            f'<div class="gv-job" data-job="{job.id}" data-state="{job.state}" '
            f'data-done="{job.done_frames}" data-total="{total}">'
            f"<p><b>{name}</b>: {html.escape(status)}</p>"
            f'<progress max="{bar_max}" value="{bar_value}"></progress>'
            f"<p><small>{queue}</small></p></div>"
        )

    def job_outputs(self, job: Job | None) -> tuple:
        """Outputs: shown, timer, progress, error, video, file, cancel."""
        active = job is not None and job.state in ACTIVE
        video = file = None
        if job is not None and job.state == "done" and job.served is not None:
            file = str(job.served)
            if (job.config.codec, job.served.suffix.lower()) in PLAYABLE:
                video = str(job.served)
        error = _error(job.error) if job is not None and job.state == "failed" else gr.skip()
        shown = [job.id, job.state] if job is not None else None
        return (shown, gr.Timer(active=active), self.job_html(job), error, video, file,
                gr.update(interactive=active))

    def on_load(self, state: dict | None) -> tuple:
        state = self.browser(state)
        media = gr.update(choices=self.options.media_dir.names()) if self.options.media_dir else gr.skip()
        return (state, media, *self.job_outputs(self.job_of(state)))

    def on_tick(self, state: dict | None, shown: list | None) -> tuple:
        job = self.job_of(state)
        skip = gr.skip()
        if job is None:
            return (None, gr.Timer(active=False), "", skip, skip, skip, skip)
        if shown == [job.id, job.state]:
            active = job.state in ACTIVE
            return (skip, skip if active else gr.Timer(active=False), self.job_html(job) if active else skip,
                    skip, skip, skip, skip)
        return self.job_outputs(job)

    def on_restore(self, state: dict | None, found: Analysis | None, checked: list[int], *settings) -> tuple:
        """Outputs: browser, shown, timer, progress, error, video, file, cancel."""
        state = self.browser(state)
        skip = gr.skip()
        if found is None:
            return (state, skip, skip, skip, _error("Choose a video or photo first."), skip, skip, skip)
        try:
            skipped = [t.track_id for t in found.tracks if t.restorable and t.track_id not in set(checked or [])]
            config = self.config(*settings, skip=tuple(skipped))
        except GpenVideoError as exc:
            return (state, skip, skip, skip, _error(str(exc)), skip, skip, skip)
        if not found.describes(config):
            return (state, skip, skip, skip, _error("The preset changed how faces are found; wait until "
                                                    "they are found again, then restore."), skip, skip, skip)
        upload = found.source.is_relative_to(self.served)
        job = self.store.create(owner_of(state["token"]), found.source, found.name, config, link_input=upload)
        self.runner.submit(job)
        state["job"] = job.id
        shown, timer, progress, _, video, file, cancel = self.job_outputs(job)
        return (state, shown, timer, progress, _error(None), video, file, cancel)

    def on_cancel(self, state: dict | None) -> dict:
        job = self.job_of(state)
        if job is not None:
            self.runner.cancel(job.id)
        return gr.update(interactive=False)

    # ------------------------------------------------------------------ layout

    def build(self) -> gr.Blocks:
        base = config_from_options(self.options.preset, self.options.overrides)
        preset_choices, preset_value = _presets(self.options.preset)
        from gpen_video.restore.weights import REGISTRY

        models = [spec.name for spec in REGISTRY.values() if spec.kind == "gpen"]
        with gr.Blocks(title="gpen-video") as demo:
            browser = gr.BrowserState({"token": None, "job": None}, storage_key="gpen-video", secret=self.secret)
            analysis = gr.State(None)
            shown = gr.State(None)
            timer = gr.Timer(POLL_SECONDS, active=False)
            gr.Markdown("# gpen-video\nRestore the faces in a video or photo. Everything else stays as it was: "
                        "frames, timing, sound and colour.")
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.File(label="Video or photo", elem_id="input-file", type="filepath")
                    media = gr.Dropdown([], value=None, label="… or a file from the server's media folder",
                                        elem_id="media-file", visible=self.options.media_dir is not None)
                    preset = gr.Dropdown(preset_choices, value=preset_value, label="Preset", elem_id="preset")
                    model = gr.Dropdown(models, value=base.model, label="Model", elem_id="model",
                                        interactive=not self.pinned_model,
                                        info="Larger models: sharper faces, slower." if not self.pinned_model
                                        else "Set by the server (--weights).")
                    strength = gr.Slider(0, 1, value=base.strength, step=0.05, label="Strength", elem_id="strength",
                                         info="0 keeps the original face, 1 uses the restored one.")
                    only_largest = gr.Checkbox(base.only_largest_face, label="Only the largest face",
                                               elem_id="only-largest-face")
                    codec = gr.Dropdown(CODECS, value=base.codec, label="Output codec", elem_id="codec")
                    upscale = gr.Radio([("1×", 1), ("2×", 2), ("3×", 3), ("4×", 4)], value=base.upscale,
                                       label="Upscale", elem_id="upscale",
                                       info="Make the result larger; faces are restored at the new size.")
                with gr.Column(scale=2):
                    error = gr.HTML("", elem_id="error", visible=False)
                    summary = gr.Markdown("", elem_id="analysis")
                    gallery = gr.Gallery(label="Faces found", elem_id="face-thumbnails", columns=6, fit_columns=False,
                                         height=200, allow_preview=False, object_fit="contain", interactive=False)
                    faces = gr.CheckboxGroup([], label="Restore these faces (untick a person to leave them alone)",
                                             elem_id="faces")
                    frame = gr.Slider(0, 1, value=0, step=1, label="Preview frame", elem_id="preview-frame",
                                      interactive=False)
                    before_after = gr.ImageSlider(label="Before / after", elem_id="before-after", type="numpy")
                    with gr.Row():
                        restore = gr.Button("Restore", variant="primary", elem_id="restore-button", interactive=False)
                        cancel = gr.Button("Cancel", elem_id="cancel-button", interactive=False)
                    progress = gr.HTML("", elem_id="progress")
                    video = gr.Video(label="Result", elem_id="output-video", interactive=False)
                    result = gr.File(label="Download", elem_id="output-file", interactive=False)

            settings = [preset, model, strength, only_largest, codec, upscale]
            found_outputs = [analysis, error, summary, gallery, faces, frame, before_after, restore]
            job_outputs = [shown, timer, progress, error, video, result, cancel]
            models_lane = {"concurrency_limit": 1, "concurrency_id": "models"}

            def from_upload(path, previous, *values, progress=gr.Progress()):
                if not path:
                    self.forget(previous)
                    return (None, _error(None), "", [], gr.update(choices=[], value=[]), gr.skip(), None,
                            gr.update(interactive=False))
                return self.find_faces(Path(path), Path(path).name, previous, values, progress)

            def from_media(name, previous, *values, progress=gr.Progress()):
                if not name:
                    return tuple(gr.skip() for _ in found_outputs)
                try:
                    path = self.options.media_dir.resolve(name)
                except GpenVideoError as exc:
                    return (None, _error(str(exc)), *(gr.skip() for _ in found_outputs[2:]))
                return self.find_faces(path, name, previous, values, progress)

            def again(found, *values, progress=gr.Progress()):
                if found is None:
                    return tuple(gr.skip() for _ in found_outputs)
                return self.find_faces(found.source, found.name, found, values, progress)

            def show_preview(found, index, checked, *values):
                return self.preview(found, index, checked, values)

            preview_inputs = [analysis, frame, faces, *settings]
            preview_outputs = [before_after, error]
            upload.upload(from_upload, [upload, analysis, *settings], found_outputs, **models_lane).then(
                show_preview, preview_inputs, preview_outputs, **models_lane)
            upload.clear(from_upload, [upload, analysis, *settings], found_outputs)
            media.input(from_media, [media, analysis, *settings], found_outputs, **models_lane).then(
                show_preview, preview_inputs, preview_outputs, **models_lane)
            preset.input(self.preset_values, [preset], [model, strength, only_largest, codec, upscale, error]).then(
                again, [analysis, *settings], found_outputs, **models_lane).then(
                show_preview, preview_inputs, preview_outputs, **models_lane)
            only_largest.input(again, [analysis, *settings], found_outputs, **models_lane).then(
                show_preview, preview_inputs, preview_outputs, **models_lane)
            for trigger in (frame.input, strength.input, faces.input, model.input):
                trigger(show_preview, preview_inputs, preview_outputs, trigger_mode="always_last", **models_lane)

            restore.click(self.on_restore, [browser, analysis, faces, *settings],
                          [browser, shown, timer, progress, error, video, result, cancel])
            cancel.click(self.on_cancel, [browser], [cancel])
            timer.tick(self.on_tick, [browser, shown], job_outputs, show_progress="hidden")
            demo.load(self.on_load, [browser], [browser, media, *job_outputs])
        return demo


def _secret(folder: Path) -> str:
    """The key of the browser's stored state; kept so that a restarted server still reads it."""
    path = folder / "browser-secret"
    if not path.exists():
        from gpen_video.io.files import write_atomic

        write_atomic(path, secrets.token_urlsafe(24).encode())
        path.chmod(0o600)
    return path.read_text().strip()


def serve(options: WebOptions, *, ready=None) -> None:
    """Run the page until interrupted (KeyboardInterrupt or a signal's exception).

    Loads the models first, so a problem with weights or the device ends the command with its
    one-line error before anything listens. ``ready(url)`` is called once the page is up.
    Unfinished jobs of an earlier server on ``options.jobs_dir`` are queued again.
    """
    from gpen_video.jobs.api import FacePipeline

    home = options.jobs_dir.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(home / "server.lock", ConfigError(
        f"another gpen-video web server uses {home}; stop it or give another --jobs-dir")).acquire()
    served, jobs, analyses = home / "served", home / "jobs", home / "analysis"
    shutil.rmtree(analyses, ignore_errors=True)
    for folder in (served, jobs, analyses):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(served)  # Gradio's uploads and served files: nothing else

    config = config_from_options(options.preset, options.overrides)
    pipelines = Pipelines(FacePipeline(config, download_progress=True))
    store = JobStore(jobs)
    runner = JobRunner(store, pipelines, served, keep_seconds=options.keep_days * 86400)
    web = WebApp(options, pipelines, store, runner, served.resolve(), analyses, _secret(home))
    demo = web.build()
    demo.queue(default_concurrency_limit=None)
    runner.start()
    blocked = [str(jobs.resolve()), str(analyses.resolve())]
    if options.media_dir is not None:
        blocked.append(str(options.media_dir.root))
    try:
        try:
            _, url, _ = demo.launch(
                server_name=options.host, server_port=options.port, auth=options.accounts or None,
                max_file_size=options.max_upload, prevent_thread_lock=True, blocked_paths=blocked,
                ssr_mode=False, quiet=True, show_error=False, footer_links=[], css=CSS,
                theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
            )
        except OSError as exc:
            where = f"{options.host}:{options.port}"
            raise ConfigError(f"cannot listen on {where} ({exc}); choose another --port") from None
        if ready is not None:
            ready(url)
        while True:
            time.sleep(0.5)
    finally:
        demo.close()
        runner.stop()
        lock.release()
