"""Where a restore's CPU time goes, thread by thread.

    python benchmarks/bench_threads.py                 # the 720p one-face clip of run.py, 10 s
    python benchmarks/bench_threads.py --clip CLIP.mp4 --temporal off
    python benchmarks/bench_threads.py --per-second    # also the cores busy in each second

Runs one restore in this process (GPEN with random weights in the preset's architecture, at
the pipeline's batch size and precision, as ``run.py``'s rows) and samples every thread's CPU
time from ``/proc/self/task/*/stat`` every 50 ms. Named Python threads (the pipeline's stages)
are shown by name; native threads (torch's OpenMP workers, x264's and the decoder's threads,
onnxruntime's) by their kernel name and start order, since Python does not name them. A
thread's last 50 ms before it exits can be missed. Linux only.

It answers what ``e2e / (model + io)`` of ``run.py`` cannot: on a machine where every stage
shares the same cores, which work besides GPEN and the codec takes the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(tid: int) -> float | None:
    """CPU seconds (user + system) of thread ``tid`` of this process; None once it has exited."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class ThreadSampler:
    """Samples every thread's CPU seconds until stopped; ``totals`` by thread label, and
    ``per_second`` the cores the whole process kept busy."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self._ticks: list[tuple[float, float]] = []  # (wall clock, process CPU seconds)
        self._base = {int(tid): thread_cpu(int(tid)) or 0.0 for tid in os.listdir("/proc/self/task")}
        self._last: dict[int, float] = {}
        self._labels: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._ticks.append((time.perf_counter(), time.process_time()))
            named = {t.native_id: t.name for t in threading.enumerate() if t.native_id}
            for entry in os.listdir("/proc/self/task"):
                tid = int(entry)
                cpu = thread_cpu(tid)
                if cpu is None:
                    continue
                self._last[tid] = cpu
                if tid in named:
                    self._labels[tid] = named[tid]
                elif tid not in self._labels:
                    try:
                        with open(f"/proc/self/task/{tid}/comm") as comm:
                            self._labels[tid] = f"native {comm.read().strip()} #{len(self._labels)}"
                    except FileNotFoundError:
                        pass
            self._stop.wait(self.period)

    def per_second(self) -> list[float]:
        """Cores busy in each whole second since the sampler started: the process's CPU time
        (the sampler's own included, about 1 ms a tick), so threads that exited still count."""
        if len(self._ticks) < 2:
            return []
        start = self._ticks[0][0]
        out = []
        for second in range(int(self._ticks[-1][0] - start)):
            inside = [(t, c) for t, c in self._ticks if second <= t - start <= second + 1]
            if len(inside) >= 2:
                out.append((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))
        return out

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, cpu in self._last.items():
            label = self._labels.get(tid, f"native #{tid}")
            if label != self._thread.name:
                out[label] = out.get(label, 0.0) + cpu - self._base.get(tid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=None, help="default: run.py's 720p one-face clip, 10 s")
    parser.add_argument("--model", default="GPEN-BFR-256")
    parser.add_argument("--temporal", choices=["on", "off"], default="on")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="threads with less CPU are summed as 'the rest'")
    parser.add_argument("--per-second", action="store_true", help="also print the cores busy in each second of the job")
    args = parser.parse_args()

    from benchmarks.run import _restorer
    from gpen_video.config import load_config
    from gpen_video.jobs.api import FacePipeline
    from samples.make_demo import render_clip

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip
        if clip is None:
            clip = Path(tmp) / "1f-10s.mp4"
            render_clip(clip, seconds=10.0, size=(1280, 720), faces=1)
        restorer_args = argparse.Namespace(device="cpu", model=args.model, precision="auto", batch_size=None)
        pipeline = FacePipeline(load_config(None, device="cpu", temporal=args.temporal == "on"),
                                restorer=_restorer(restorer_args))
        start, cpu_start = time.perf_counter(), time.process_time()
        with ThreadSampler() as sampler:
            result = pipeline.restore_video(clip, Path(tmp) / "out.mp4")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    totals = sampler.totals()
    print(f"{clip.name}: {result.frames} frames, {result.faces_restored} faces, {args.model}, temporal {args.temporal}: "
          f"{wall:.1f} s wall, {cpu:.1f} CPU s ({cpu / wall:.2f} cores)")
    rest = 0.0
    for label, seconds in totals.items():
        if seconds >= args.min_seconds:
            print(f"  {label:<32} {seconds:6.1f} CPU s  {seconds / cpu:6.1%}")
        else:
            rest += seconds
    print(f"  {'the rest':<32} {rest:6.1f} CPU s  {rest / cpu:6.1%}")
    if args.per_second:
        cores = sampler.per_second()
        print("cores busy in each second of the job:")
        for first in range(0, len(cores), 15):
            print(f"  {first:3d} s: " + " ".join(f"{c:4.2f}" for c in cores[first:first + 15]))


if __name__ == "__main__":
    main()
