"""Command line: ``gpen-video restore``, ``gpen-video models`` and ``gpen-video web``.

Exit codes: 0 success; 1 some files of a folder failed, or an unexpected error; 2 bad
options or config; 3 unusable input; 4 output cannot be written; 5 weights problem;
6 device unavailable; 130 interrupted (Ctrl-C), 143 and 129 stopped by SIGTERM and SIGHUP. Errors print one line; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gpen_video import __version__
from gpen_video.config import Config, config_from_options
from gpen_video.errors import Cancelled, ConfigError, GpenVideoError, InputError, OutputError, describe
from gpen_video.formats import CODECS, check_container, is_image, media_kind
from gpen_video.io.encode import default_output_path
from gpen_video.io.files import check_output
from gpen_video.io.images import read_image

if TYPE_CHECKING:
    from gpen_video.jobs.run import JobResult

log = logging.getLogger("gpen_video")

class _UserFormatter(logging.Formatter):
    """``warning: …`` for problems, the bare message for progress news."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message


class _DebugFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")


class _Parser(argparse.ArgumentParser):
    """argparse with one line for a bad option: ``error: …`` (the usage is in ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _flag(parser: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    kwargs.setdefault("default", None)
    parser.add_argument(*names, **kwargs)


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


def _track_ids(value: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected track ids such as 3,7, got {value!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"track ids are whole numbers >= 0, got {value!r}")
    return ids


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def _degrees(value: str) -> float:
    try:
        degrees = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected degrees of head turn, e.g. 55, got {value!r}") from None
    if not 15 < degrees <= 90:
        raise argparse.ArgumentTypeError(f"degrees of head turn must be over 15 and at most 90, got {value!r}")
    return degrees


def _keep_days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days or inf, got {value!r}") from None
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"days are a number >= 0, got {value!r}")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpen-video", description="Restore faces in videos and images with GPEN.")
    parser.add_argument("--version", action="version", version=f"gpen-video {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    _flag(common, "-q", "--quiet", action="store_const", const=True, help="no progress bars or summary")
    _flag(common, "--cache-dir", help="where weights are cached (default $GPEN_VIDEO_HOME or the user cache dir)")
    _flag(common, "--mirror", help="base URL holding the weight files under their registry names")

    r = sub.add_parser("restore", parents=[common], help="restore the faces of a video, an image or a folder")
    r.add_argument("input", help="video, image, or folder of them")
    r.add_argument("-o", "--output", help="output file (folder when INPUT is a folder); default NAME.restored.EXT")
    r.add_argument("--config", help="TOML preset: a file or a name from configs/ (home-video, fast, archival)")
    r.add_argument("--report", help="write a JSON report of every track and frame here")
    _flag(r, "-y", "--overwrite", action="store_const", const=True, help="replace an existing output")
    g = r.add_argument_group("model")
    _flag(g, "--model", help="GPEN preset (see `gpen-video models`); default GPEN-BFR-512")
    _flag(g, "--weights", help="local checkpoint file; nothing is downloaded")
    _flag(g, "--offline", action="store_const", const=True, help="never download weights")
    _flag(g, "--device", help="auto, cpu, cuda or cuda:N")
    _flag(g, "--precision", choices=["auto", "fp16", "bf16", "fp32"])
    _flag(g, "--batch-size", type=_batch_size, help="faces per GPEN call, or auto (default): chosen for the device")
    _flag(g, "--warp", choices=["auto", "opencv", "torch"], help="crop/paste engine (auto: torch on CUDA)")
    d = r.add_argument_group("faces")
    _flag(d, "--detector", choices=["retinaface-mobile", "retinaface-r50"])
    _flag(d, "--detect-size", type=int, help="long side the detector sees (default 1024)")
    _flag(d, "--detect-every", type=int, metavar="K",
          help="detect the whole frame at least every K frames, only crops around the faces between "
               "(default 12; 0 or 1: every frame)")
    _flag(d, "--score-threshold", type=float, help="detector confidence threshold (default 0.9)")
    _flag(d, "--min-face", type=int, help="leave faces smaller than this many pixels alone (default 24)")
    _flag(d, "--only-largest-face", action="store_const", const=True,
          help="restore one person at a time: the largest track, until it ends")
    _flag(d, "--skip-tracks", type=_track_ids, help="leave these track ids alone (as in --report), e.g. 3,7")
    _flag(d, "--smooth-window", type=int, help="landmark smoothing window in frames (default 9)")
    _flag(d, "--max-gap", type=int, help="frames a face may be missed and still keep its track (default 8)")
    _flag(d, "--strength", type=float, help="0 keeps the original face, 1 the restored one (default 1)")
    _flag(d, "--mask", choices=["plain", "parse"], help="blend mask (parse downloads a face parser)")
    _flag(d, "--temporal", type=_on_off, metavar="on|off",
          help="steady faces: average each face over time where it holds still, keep the source's colour, "
               "fade out profiles and 1-2 frame tracks (default on)")
    _flag(d, "--max-yaw", type=_degrees, metavar="DEG",
          help="head turn at which restoration has faded out (default 55; with --temporal on)")
    u = r.add_argument_group("upscaling")
    _flag(u, "--upscale", type=int, choices=[1, 2, 3, 4], metavar="N",
          help="make the output N times larger (1, 2, 3 or 4; default 1), faces restored at the new size")
    _flag(u, "--upscaler", choices=["auto", "lanczos", "realesr-animevideov3", "realesrgan-x4plus"],
          help="how the frame is enlarged (auto: lanczos on the CPU, realesr-animevideov3 on CUDA)")
    o = r.add_argument_group("output")
    _flag(o, "--codec", choices=list(CODECS), help="output codec (README: which goes in which container)")
    _flag(o, "--crf", type=int, help="h264/h265 quality (default 18)")
    _flag(o, "--preset", help="x264/x265 preset (default medium)")
    _flag(o, "--deinterlace", choices=["auto", "off", "frame", "field"])
    _flag(o, "--strict", action="store_const", const=True, help="fail when a stream cannot be copied")
    j = r.add_argument_group("long jobs")
    _flag(j, "--segment-seconds", type=float, metavar="S",
          help="render videos in segments of about S seconds, each kept when done (default 30)")
    _flag(j, "--retries", type=int, metavar="N", help="tries again of a segment that fails (default 2)")
    _flag(j, "--work-dir", metavar="DIR", help="keep unfinished jobs' segments here (default: beside the output)")
    j.add_argument("--restart", action="store_true",
                   help="start afresh instead of resuming an interrupted job (or skipping a finished one)")
    j.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="render on Ray workers: a local Ray runtime, or the cluster at ADDRESS (put it after "
                        "INPUT, or write --ray=ADDRESS); needs gpen-video[ray] and storage every node sees")

    m = sub.add_parser("models", parents=[common], help="list weight presets, or download one")
    m.add_argument("action", nargs="?", choices=["list", "download"], default="list")
    m.add_argument("name", nargs="?", help="preset to download")

    w = sub.add_parser("web", parents=[common],
                       help="serve a page to preview and restore in a browser (needs gpen-video[web])")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    w.add_argument("--config", help="the page's initial preset: a file or a name from configs/")
    w.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (needed with a --host other than 127.0.0.1)")
    w.add_argument("--auth-file", metavar="FILE", help="require a login from this file of USER:PASSWORD lines")
    w.add_argument("--max-upload", default="8GB", help="largest upload, e.g. 500MB or 8GB (default 8GB)")
    w.add_argument("--media-dir", metavar="DIR", help="let the page pick inputs from files under DIR (nothing else)")
    w.add_argument("--jobs-dir", metavar="DIR", help="where jobs and results are kept (default: CACHE/web)")
    w.add_argument("--keep-days", type=_keep_days, default=7.0, metavar="DAYS",
                   help="delete finished jobs and their results this many days after they were made "
                        "(default 7; 0 deletes them at the next start; inf keeps them)")
    _flag(w, "--model", help="the page's initial GPEN preset")
    _flag(w, "--weights", help="local checkpoint file (fixes the model); nothing is downloaded")
    _flag(w, "--offline", action="store_const", const=True, help="never download weights")
    _flag(w, "--device", help="auto, cpu, cuda or cuda:N: jobs run one at a time on it")
    return parser


def _media_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and ".restored." not in p.name
        and media_kind(p) is not None
    )


def _summary(result: JobResult) -> str:
    head = f"{result.input.name} -> {result.output}: "
    if is_image(result.input):
        if result.unchanged:
            return head + "no face to restore; copied unchanged"
        reruns = f" ({result.fp32_reruns} rerun in fp32)" if result.fp32_reruns else ""
        return head + f"{_plural(result.faces_restored, 'face')} restored{reruns} in {result.seconds:.1f} s"
    extra = f", {result.damaged_frames} damaged frames dropped" if result.damaged_frames else ""
    if result.fp32_reruns:
        extra += f", {_plural(result.fp32_reruns, 'face')} rerun in fp32 (non-finite half-precision output)"
    if result.resumed_frames:
        extra += f"; {result.resumed_frames} of the frames were done by an earlier run"
    return head + (
        f"{_plural(result.frames, 'frame')}, {_plural(result.faces_restored, 'face')} restored, "
        f"{_plural(result.tracks, 'track')}, {result.seconds:.1f} s ({result.fps:.1f} fps){extra}"
    )


def _check_before_loading_models(input_path: Path, output_path: Path, *, overwrite: bool,
                                 report: Path | None, codec: str) -> None:
    """Fail on an unusable input, output or report path before spending time on weights."""
    from gpen_video.io.decode import probe

    check_output(input_path, output_path, overwrite=overwrite)
    if report is not None:
        check_output(input_path, report, overwrite=True)  # an old report is replaced; the input never
    if is_image(input_path):
        read_image(input_path)
    else:
        probe(input_path)
        check_container(codec, output_path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Bar:
    """A tqdm bar fed by the pipeline's ``progress(done, total)`` callback."""

    def __init__(self, name: str, quiet: bool) -> None:
        self.bar = tqdm(desc=name, unit="frame", disable=quiet, leave=False, dynamic_ncols=True)
        self.started = False

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        if not self.started:  # a resumed job starts at the frames done before: not in the rate
            self.started = True
            self.bar.initial = self.bar.n = done - 1
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _jobs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    source = Path(args.input)
    if not source.exists():
        raise InputError(f"input {source} does not exist; check the path")
    if not source.is_dir():
        if args.report and is_image(source):
            raise InputError(f"--report describes the tracks of a video; {source} is an image")
        return [(source, Path(args.output) if args.output else default_output_path(source))]
    if args.report:
        raise InputError("--report takes a single input file, not a folder")
    inputs = _media_in(source)
    if not inputs:
        raise InputError(f"folder {source} holds no video or image files")
    if args.output is None:
        return [(p, default_output_path(p)) for p in inputs]
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} is a file; a folder input needs an output folder (-o DIR)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir} ({exc.strerror}); choose another with -o") from None
    return [(p, out_dir / default_output_path(p).name) for p in inputs]


def run_restore(args: argparse.Namespace, config: Config) -> int:
    from gpen_video.restore.weights import default_cache_dir, get_spec

    get_spec(config.model, kind="gpen")  # a bad --model is reported before any file is touched
    jobs = _jobs(args)
    overwrite = bool(args.overwrite)
    if len(jobs) == 1:
        report = Path(args.report) if args.report else None
        _check_before_loading_models(*jobs[0], overwrite=overwrite, report=report, codec=config.codec)
    workers = None
    if args.ray is not None:
        from gpen_video.jobs.cluster import RayWorkers, import_ray

        import_ray()  # without Ray: one line saying what to install, before any model is loaded
    from gpen_video.jobs.api import FacePipeline  # after the checks: importing these takes seconds
    from gpen_video.jobs.workfolder import FinishedOutputs

    pipeline = FacePipeline(config, download_progress=not args.quiet)
    if args.ray is not None:
        workers = RayWorkers(config, address=args.ray or None)
    folder = Path(args.input).is_dir()
    finished = FinishedOutputs(Path(config.cache_dir or default_cache_dir()) / "finished")
    together = workers is not None and len(jobs) > 1  # files at once, their segments spread over the workers
    cancel = threading.Event()

    def restore(input_path: Path, output_path: Path) -> tuple[str, str]:
        """One file: ("done" | "skipped" | "failed", the line to print)."""
        try:
            image = is_image(input_path)
            job = (pipeline if image else workers or pipeline).job_identity(input_path) if folder else None
            if job is not None and not args.restart and finished.matches(job, output_path):
                return "skipped", (f"{input_path.name} -> {output_path}: restored before with the same settings; "
                                   "skipped (--restart does it again)")
            if image:
                result = pipeline.restore_image(input_path, output_path, overwrite=overwrite)
            else:
                with _Bar(input_path.name, args.quiet or together) as bar:
                    result = pipeline.restore_video(
                        input_path, output_path, overwrite=overwrite, report=args.report, progress=bar,
                        cancel=cancel, restart=args.restart, workers=workers,
                    )
            if job is not None:
                finished.add(job, output_path)
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - a folder goes on with the next file
            if len(jobs) == 1:
                raise
            reason = describe(exc)
            if args.debug:
                log.exception("failed: %s", input_path)
            print(f"error: {input_path}: {reason}", file=sys.stderr)
            return "failed", f"  failed: {input_path.name}: {reason}"
        return "done", _summary(result)

    def shown(outcome: tuple[str, str]) -> tuple[str, str]:
        if outcome[0] != "failed" and not args.quiet:
            print(outcome[1], file=sys.stderr)
        return outcome

    try:
        if together:  # videos at once on the workers; images here, one at a time, meanwhile
            with ThreadPoolExecutor(max_workers=workers.count) as pool:
                futures = {job: pool.submit(lambda job: shown(restore(*job)), job)
                           for job in jobs if not is_image(job[0])}
                try:
                    ended = {job: shown(restore(*job)) for job in jobs if job not in futures}
                    ended.update((job, future.result()) for job, future in futures.items())
                    outcomes = [ended[job] for job in jobs]
                except BaseException:
                    cancel.set()  # the other files stop too
                    raise
        else:
            outcomes = [shown(restore(*job)) for job in jobs]
    finally:
        if workers is not None:
            workers.close()
    failed = [line for kind, line in outcomes if kind == "failed"]
    done, skipped = (sum(kind == wanted for kind, _ in outcomes) for wanted in ("done", "skipped"))
    if len(jobs) > 1 and not args.quiet:
        print(f"{done} restored, {f'{skipped} skipped, ' if skipped else ''}{len(failed)} failed", file=sys.stderr)
        for line in failed:
            print(line, file=sys.stderr)
    return 1 if failed else 0


def run_models(args: argparse.Namespace, config: Config) -> int:
    from gpen_video.restore.weights import default_cache_dir, list_models, resolve_weights

    if args.action == "download":
        if not args.name:
            raise ConfigError("name the preset to download, e.g. `gpen-video models download GPEN-BFR-512`")
        path = resolve_weights(args.name, cache_dir=config.cache_dir, mirror=config.mirror, progress=not args.quiet)
        print(path)
        return 0
    rows = list_models(config.cache_dir)
    print(f"cache: {config.cache_dir or default_cache_dir()}")
    for row in rows:
        state = ("cached, verified" if row.verified else "cached") if row.present else "not downloaded"
        size = f"{row.size_bytes / 1e6:.0f} MB" if row.size_bytes else "?"
        print(f"{row.name:<16} {row.kind:<9} {size:>7}  {state:<17} {row.path}")
    return 0


def run_web(args: argparse.Namespace, config: Config) -> int:
    """``gpen-video web``: check the options, then serve until Ctrl-C or SIGTERM."""
    from gpen_video.restore.weights import default_cache_dir, get_spec
    from gpen_video.web.access import check_binding, parse_size, read_auth
    from gpen_video.web.media import MediaDir

    get_spec(config.model, kind="gpen")
    accounts = read_auth(args.auth, args.auth_file)
    check_binding(args.host, accounts)
    max_upload = parse_size(args.max_upload)
    media = MediaDir(args.media_dir) if args.media_dir else None
    jobs_dir = Path(args.jobs_dir) if args.jobs_dir else Path(config.cache_dir or default_cache_dir()) / "web"
    try:
        from gpen_video.web.app import WebOptions, serve
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] != "gradio":
            raise
        raise ConfigError('the web page needs Gradio: pip install "gpen-video[web]"') from None
    names = ("model", "weights", "offline", "device", "cache_dir", "mirror")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    options = WebOptions(
        jobs_dir=jobs_dir.expanduser().resolve(), host=args.host, port=args.port, preset=args.config,
        overrides=overrides, accounts=accounts, max_upload=max_upload, media_dir=media, keep_days=args.keep_days,
    )

    def ready(url: str) -> None:
        print(f"gpen-video web: open {url} (Ctrl-C stops; unfinished jobs continue at the next start)", flush=True)

    try:
        serve(options, ready=ready)
    except (KeyboardInterrupt, Cancelled):
        print("gpen-video web stopped; unfinished jobs continue when it starts again", file=sys.stderr)
    return 0


def _stop_on(signum: int, _frame: object) -> None:
    raise Cancelled(f"stopped by {signal.Signals(signum).name}; nothing was written", signal=signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_DebugFormatter() if args.debug else _UserFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("gpen_video").setLevel(
        logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    )
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop_on)
    try:
        config = config_from_options(getattr(args, "config", None), vars(args))
        if args.command == "restore":
            with logging_redirect_tqdm():  # a warning while a bar is drawn gets a line of its own
                return run_restore(args, config)
        if args.command == "web":
            return run_web(args, config)
        return run_models(args, config)
    except Cancelled as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    except GpenVideoError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one line for users, traceback with --debug
        if args.debug:
            raise
        print(f"error: {describe(exc, 'run again with --debug for details')}", file=sys.stderr)
        return 1
