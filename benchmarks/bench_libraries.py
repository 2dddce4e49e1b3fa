"""Where a restore's CPU time goes, library by library, against GPEN alone and the bare I/O loop.

    python benchmarks/bench_libraries.py                  # run.py's 720p one-face clip, 10 s
    python benchmarks/bench_libraries.py --clip CLIP.mp4 --temporal off
    python benchmarks/bench_libraries.py --repeat 3       # medians of 3 rounds (noisy machines)

Runs three of ``run.py``'s rows, each in its own process under ``perf record`` (a CPU-clock
sample every 4 ms on every thread): the whole pipeline on the clip (``e2e``), GPEN alone on as
many faces as the pipeline restored (``model``) and the bare PyAV decode+encode loop of the
clip (``io``). It prints the CPU seconds each shared library took in each row, and what the
pipeline spent beyond the other two together. That difference is the work besides GPEN and the
codec that ``e2e / (model + io)`` pays for on a machine where every stage shares the same cores.
``bench_threads.py`` answers the same question by stage (thread); this answers it by code:
onnxruntime for detection, swscale for colour conversion, OpenCV for the warps, libtorch
outside GPEN's own kernels for the stabiliser, libgomp for OpenMP threads that wait by spinning.

Needs Linux ``perf`` (Debian: ``apt install linux-perf``) and permission to profile one's own
processes (``kernel.perf_event_paranoid`` <= 2). Each process's start-up (importing torch) is in
its row, so the difference holds one start-up less than the two rows it subtracts. On a shared
VM the same work can take 20 % more CPU time in one process than in the next (x264's, GPEN's):
the large libraries' differences are then noise, which ``--repeat`` (rows interleaved, medians)
narrows; the small libraries, which only the pipeline runs, are what the difference is for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUN = Path(__file__).with_name("run.py")
HZ = 250
ROWS = ("e2e", "model", "io")


def profiled(row: list[str], data: Path) -> dict:
    """Run ``run.py --measure`` ``row`` under perf; its JSON result."""
    cmd = ["perf", "record", "-q", "-F", str(HZ), "-e", "cpu-clock", "-o", str(data), "--",
           sys.executable, str(RUN), *row]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def seconds_by_library(data: Path) -> dict[str, float]:
    """CPU seconds per shared library (perf's samples / rate); JIT code (oneDNN's kernels) as ``[JIT]``."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "-n", "--stdio"],
                            check=True, capture_output=True, text=True).stdout
    seconds: dict[str, float] = defaultdict(float)
    for line in report.splitlines():
        fields = line.split()
        if line.startswith("#") or len(fields) < 3 or not fields[0].endswith("%"):
            continue
        name = "[JIT]" if fields[2] == "[JIT]" else fields[2].split("-")[0].split(".so")[0].split(".cpython")[0]
        seconds[name] += int(fields[1]) / HZ
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=None, help="default: run.py's one-face clip, 1280x720, 10 s")
    parser.add_argument("--temporal", choices=["on", "off"], default="on")
    parser.add_argument("--rows", type=int, default=14, help="libraries shown (by e2e CPU time)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three rows (figures: medians)")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("bench_libraries.py needs Linux perf (Debian: apt install linux-perf)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = Path(args.clip) if args.clip else folder / "1f-10s.mp4"
        if args.clip is None:
            from samples.make_demo import render_clip

            render_clip(clip, seconds=10.0, size=(1280, 720), faces=1)
        common = ["--device", "cpu", "--precision", "auto", "--clip", str(clip)]
        rounds: list[dict[str, dict[str, float]]] = []
        walls: dict[str, list[float]] = defaultdict(list)
        for _ in range(max(1, args.repeat)):
            e2e = profiled(["--measure", "e2e" if args.temporal == "on" else "e2e-off", *common], folder / "e2e.data")
            model = profiled(["--measure", "model", "--model-faces", str(e2e["faces"]), *common], folder / "model.data")
            io = profiled(["--measure", "io", *common], folder / "io.data")
            for name, row in zip(ROWS, (e2e, model, io)):
                walls[name].append(row["seconds"])
            rounds.append({name: seconds_by_library(folder / f"{name}.data") for name in ROWS})
    seconds = {r: {k: statistics.median(one[r].get(k, 0.0) for one in rounds)
                   for k in set().union(*(one[r] for one in rounds))} for r in ROWS}

    print(f"# CPU seconds by library, perf cpu-clock at {HZ} Hz; clip {clip.name}, temporal {args.temporal}, "
          f"{len(rounds)} round(s), medians")
    print(f"# wall: e2e {statistics.median(walls['e2e']):.1f} s ({e2e['faces']} faces), "
          f"model {statistics.median(walls['model']):.1f} s, io {statistics.median(walls['io']):.1f} s")
    print(f"{'library':<28} {'e2e':>7} {'model':>7} {'io':>7} {'e2e-m-io':>9}")
    libraries = sorted(set().union(*seconds.values()), key=lambda k: -seconds["e2e"].get(k, 0.0))

    def summed(names: list[str]) -> list[float]:
        return [sum(seconds[r].get(k, 0.0) for k in names) for r in ROWS]

    table = [(name, summed([name])) for name in libraries[: args.rows]]
    table += [("(the rest)", summed(libraries[args.rows:])), ("total", summed(libraries))]
    for name, (e, m, i) in table:
        print(f"{name[:28]:<28} {e:>7.1f} {m:>7.1f} {i:>7.1f} {e - m - i:>9.1f}")


if __name__ == "__main__":
    main()
