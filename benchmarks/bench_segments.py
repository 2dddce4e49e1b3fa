"""What segments cost, and what resuming saves, end to end.

1. Segmenting: the whole pipeline (GPEN-BFR-256 with random weights unless ``--model none``,
   which restores with an identity network: a pessimistic bound, as the model's time no longer
   hides anything) on one clip, rendered as one segment and as ``--segment-seconds``
   segments, alternating, ``--repeat`` times. Segmenting adds the index scan, an encoder start
   and an IDR picture per segment, the segment files' and logs' hashes, and the assembly
   (a stream copy of the whole video); the cost is the difference, as a share of the
   one-segment time.
2. Resuming: the command line on a second clip, run whole, then killed with SIGKILL about
   half-way and run again: once killed right after the segment that completes half of the
   frames was recorded, once at half of the whole run's wall time (inside a segment, whose
   part done is lost). The resumed run's wall time is compared with the whole run's.
3. Ray: the command line on a folder of two clips, one after the other in this process, and
   with ``--ray`` (a local Ray runtime: one worker per CPU, the files at once).

    python benchmarks/bench_segments.py [--seconds 90] [--size 640x360] [--segment-seconds 30]
        [--resume-seconds 40] [--resume-segment-seconds 5] [--ray-seconds 10] [--repeat 2]
        [--model GPEN-BFR-256|none] [--only segmenting|resuming|ray]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Clock:
    """Wall and CPU seconds (every thread of this process) of a ``with`` block."""

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def _pipeline(model: str, segment_seconds: float, detector, restorer):
    from gpen_video.config import load_config
    from gpen_video.jobs.api import FacePipeline

    config = load_config(None, device="cpu", segment_seconds=segment_seconds)
    return FacePipeline(config, restorer=restorer, detector=detector)


def _restorer(model: str):
    import torch

    from gpen_video.device import resolve_dtype
    from gpen_video.restore.model import build_model, preset_config
    from gpen_video.restore.restorer import Restorer

    if model == "none":
        return Restorer(torch.nn.Identity(), 256)
    config = preset_config(model)
    torch.manual_seed(0)
    return Restorer(build_model(config), config.size, dtype=resolve_dtype("auto", torch.device("cpu")))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}..{max(values):.2f})"


def segmenting(args, tmp: Path) -> None:
    from gpen_video.faces.detect import create_detector
    from samples.make_demo import render_clip

    width, height = map(int, args.size.split("x"))
    clip = tmp / "segmenting.mp4"
    render_clip(clip, seconds=args.seconds, size=(width, height), faces=1, seed=3)
    detector, restorer = create_detector("retinaface-mobile"), _restorer(args.model)
    variants = {"one segment": 1e9, f"{args.segment_seconds:g} s segments": args.segment_seconds}
    times: dict[str, list[Clock]] = {name: [] for name in variants}
    segments = {}
    print(f"1. segmenting: {args.seconds:g} s at {width}x{height}, 25 fps, one face, AAC; model {args.model}; "
          f"x264 medium crf 18; {args.repeat} runs each, alternating")
    for run in range(args.repeat):
        for name, seconds in list(variants.items())[:: -1 if run % 2 else 1]:
            pipeline = _pipeline(args.model, seconds, detector, restorer)
            out = tmp / f"out-{run}-{seconds:g}.mp4"
            with Clock() as clock:
                result = pipeline.restore_video(clip, out)
            times[name].append(clock)
            from gpen_video.jobs.opening import open_job

            segments[name] = len(open_job(clip, deinterlace="auto", segment_seconds=seconds).layout)
            print(f"   run {run + 1} {name:18} {clock.wall:7.2f} s wall {clock.cpu:7.2f} s CPU "
                  f"({result.frames} frames, {result.faces_restored} faces, {segments[name]} segments)")
            out.unlink()
    one, seg = (times[name] for name in variants)
    print(f"   {'':22} {'wall s, median (min..max)':>28} {'CPU s':>24}")
    for name in variants:
        print(f"   {name:22} {_spread([c.wall for c in times[name]]):>28} {_spread([c.cpu for c in times[name]]):>24}")
    wall = [s.wall / o.wall - 1 for o, s in zip(one, seg)]
    cpu = [s.cpu / o.cpu - 1 for o, s in zip(one, seg)]
    print(f"   segmenting cost per run pair: wall {', '.join(f'{100 * w:+.1f} %' for w in wall)}; "
          f"CPU {', '.join(f'{100 * c:+.1f} %' for c in cpu)}")
    print(f"   median: wall {100 * statistics.median(wall):+.1f} %, CPU {100 * statistics.median(cpu):+.1f} % "
          "(target <= 3 %)")


_CLI = [sys.executable, "-m", "gpen_video", "restore"]


def _cli_args(args, clip: Path, out: Path, weights: Path) -> list[str]:
    return [*_CLI, str(clip), "-o", str(out), "--model", "GPEN-BFR-256", "--weights", str(weights), "--device", "cpu",
            "--segment-seconds", str(args.resume_segment_seconds), "-q", "-y"]


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def _killed(cmd: list[str], work: Path, *, at_fraction: float | None = None, after_seconds: float | None = None) -> float:
    """Run ``cmd`` and SIGKILL it: once the manifest shows ``at_fraction`` of the frames done,
    or after ``after_seconds``. Returns the fraction of frames recorded as done."""
    proc = subprocess.Popen(cmd, cwd=ROOT)
    start = time.perf_counter()
    manifest = work / "manifest.json"
    done = 0.0
    while proc.poll() is None:
        if manifest.exists():
            try:
                data = json.loads(manifest.read_text())
                done = sum(s["frame_count"] for s in data["segments"]) / sum(c for _, c in data["plan"])
            except (ValueError, KeyError, ZeroDivisionError):
                pass
        if (at_fraction is not None and done >= at_fraction) or (
                after_seconds is not None and time.perf_counter() - start >= after_seconds):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    data = json.loads(manifest.read_text())
    return sum(s["frame_count"] for s in data["segments"]) / sum(c for _, c in data["plan"])


def resuming(args, tmp: Path) -> None:
    import torch

    from gpen_video.jobs.workfolder import work_dir_for
    from gpen_video.restore.model import preset_config
    from samples.make_demo import render_clip
    from tests.conftest import random_state_dict

    weights = tmp / "GPEN-BFR-256.pth"
    torch.save(random_state_dict(preset_config("GPEN-BFR-256"), seed=1), weights)
    clip = tmp / "resuming.mp4"
    render_clip(clip, seconds=args.resume_seconds, size=(320, 180), faces=1, seed=4)
    out = tmp / "resumed.mp4"
    cmd = _cli_args(args, clip, out, weights)
    print(f"2. resuming: gpen-video restore on {args.resume_seconds:g} s at 320x180, one face, GPEN-BFR-256, "
          f"--segment-seconds {args.resume_segment_seconds:g}, killed with SIGKILL about half-way")
    rows: dict[str, list[float]] = {"whole run": [], "after a kill at a recorded half": [],
                                    "after a kill at half the time": []}
    done: dict[str, list[float]] = {k: [] for k in rows}
    for run in range(args.repeat):
        whole = _run(cmd)
        rows["whole run"].append(whole)
        out.unlink()
        for name, how in (("after a kill at a recorded half", {"at_fraction": 0.5}),
                          ("after a kill at half the time", {"after_seconds": whole / 2})):
            done[name].append(_killed(cmd, work_dir_for(out), **how))
            rows[name].append(_run(cmd))
            out.unlink()
        print(f"   run {run + 1}: whole {whole:.1f} s; " + "; ".join(
            f"{name} ({100 * done[name][-1]:.0f} % of frames kept) {rows[name][-1]:.1f} s"
            for name in list(rows)[1:]))
    for name in list(rows)[1:]:
        ratios = [r / w for r, w in zip(rows[name], rows["whole run"])]
        print(f"   {name}: resumed run / whole run {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f}; target <= 0.60)")


def with_ray(args, tmp: Path) -> None:
    import shutil

    import torch

    from gpen_video.restore.model import preset_config
    from samples.make_demo import render_clip
    from tests.conftest import random_state_dict

    weights = tmp / "GPEN-BFR-256.pth"
    if not weights.exists():
        torch.save(random_state_dict(preset_config("GPEN-BFR-256"), seed=1), weights)
    folder = tmp / "ray-in"
    folder.mkdir()
    render_clip(folder / "a.mp4", seconds=args.ray_seconds, size=(320, 180), faces=1, seed=5)
    shutil.copy(folder / "a.mp4", folder / "b.mp4")
    print(f"3. Ray: gpen-video restore on a folder of two {args.ray_seconds:g} s clips at 320x180, one face, "
          "GPEN-BFR-256: one after the other, and with --ray (2 local workers, one per CPU)")
    times: dict[str, list[float]] = {"one after the other": [], "--ray": []}
    for run in range(args.repeat):
        for name in list(times)[:: -1 if run % 2 else 1]:
            out = tmp / f"ray-out-{run}-{name.strip('-').replace(' ', '-')}"
            cmd = [*_CLI, str(folder), "-o", str(out), "--model", "GPEN-BFR-256", "--weights", str(weights),
                   "--device", "cpu", "-q", "--cache-dir", str(tmp / "cache"), "--restart"]
            times[name].append(_run(cmd + (["--ray"] if name == "--ray" else [])))
            print(f"   run {run + 1} {name:20} {times[name][-1]:7.1f} s")
    ratios = [r / s for r, s in zip(times["--ray"], times["one after the other"])]
    print(f"   --ray / one after the other: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}; this machine has {os.cpu_count()} cores for both)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--segment-seconds", type=float, default=30.0)
    parser.add_argument("--resume-seconds", type=float, default=40.0)
    parser.add_argument("--resume-segment-seconds", type=float, default=5.0)
    parser.add_argument("--ray-seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--model", default="GPEN-BFR-256", help="GPEN preset, or none (identity network)")
    parser.add_argument("--only", choices=["segmenting", "resuming", "ray"])
    args = parser.parse_args()
    print(f"bench_segments, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "segmenting"):
            segmenting(args, Path(tmp))
        if args.only in (None, "resuming"):
            resuming(args, Path(tmp))
        if args.only in (None, "ray"):
            with_ray(args, Path(tmp))


if __name__ == "__main__":
    main()
