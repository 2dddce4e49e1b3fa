"""Planner speed and memory over a long video: memory must not grow with length.

Drives ``Planner`` with a scripted detector (no decoding, no network, tiny 8×8 frames) over
``--frames`` frames of ``tests.test_plan.long_scene``: a long track present throughout (a
news anchor) and three tracks that come and go, with detector misses; only the largest face
restored; the ``--report`` writer on, and the report written at the end. Run:

    python benchmarks/bench_plan.py [--frames 100000] [--no-trace]

Two runs: an untraced one (frames/s, RSS now and peak RSS at 10 %, 50 % and 100 % of the
frames, then the report write) and, unless ``--no-trace``, one under ``tracemalloc`` (current
and peak traced Python memory at the same points; about 3× slower).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.plan import Planner  # noqa: E402
from gpen_video.report import ReportWriter  # noqa: E402
from tests.test_plan import ScriptedDetector, long_scene, tiny_frames  # noqa: E402


def rss_mib() -> tuple[float, float]:
    """(resident now, peak resident) of this process in MiB."""
    with open("/proc/self/status") as status:
        now = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return now / 1024, max(now, peak) / 1024


def run(frames: int, folder: Path, *, traced: bool) -> None:
    checkpoints = {frames // 10, frames // 2, frames}
    planner = Planner(ScriptedDetector(long_scene))
    label = "tracemalloc" if traced else "untraced"
    print(f"\n# {label} run, {frames} frames, look-ahead delay {planner.delay} frames")
    if traced:
        print(f"{'frames':>8} {'frames/s':>9} {'traced MiB':>11} {'traced peak MiB':>16}")
        tracemalloc.start()
    else:
        print(f"{'frames':>8} {'frames/s':>9} {'RSS MiB':>8} {'peak RSS MiB':>13}")
    started = time.perf_counter()

    def row(done: int | str, rate: float) -> None:
        if traced:
            now, peak = (v / 2**20 for v in tracemalloc.get_traced_memory())
        else:
            now, peak = rss_mib()
        width = 11 if traced else 8
        print(f"{done:>8} {rate:>9.0f} {now:>{width}.2f} {peak:>{width + 5}.2f}", flush=True)

    with ReportWriter("long.mp4", fps=25.0) as report:
        plan = planner.plan(tiny_frames(frames), report=report)
        for planned in plan:
            done = planned.frame.index + 1
            if done in checkpoints:
                row(done, done / (time.perf_counter() - started))
        stats = plan.stats
        path = folder / f"{label}.json"
        start = time.perf_counter()
        report.write(path)
        write_seconds = time.perf_counter() - start
        row("written", 0.0)
    if traced:
        tracemalloc.stop()
    print(
        f"report: {path.stat().st_size / 2**20:.1f} MiB written in {write_seconds:.1f} s; "
        f"{stats.tracks} tracks, {stats.restored_tracks} restored, {stats.frames} frames"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run(args.frames, Path(folder), traced=False)
        if not args.no_trace:
            run(args.frames, Path(folder), traced=True)


if __name__ == "__main__":
    main()
