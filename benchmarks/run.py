"""One command, one table: where the time of a restore goes, and how much the engine hides.

    python benchmarks/run.py                      # 720p, 10 s, 0/1/4 faces, memory 10 s vs 60 s
    python benchmarks/run.py --seconds 4 --long-seconds 12 --faces 1   # a quicker look
    python benchmarks/run.py --part pipeline --faces 1 --long-seconds 0 --repeat 5   # noisy machines
    python benchmarks/run.py --part segments --segment-options "--seconds 60 --repeat 2"

Rows, each measured in a fresh process (so peak memory is per row) on generated clips
(scikit-image's astronaut moving, degraded, with AAC audio):

1. ``io``       bare PyAV decode → encode, the writer's encoder settings (x264 with a fixed
                thread count, deterministic, CPU-independent, stitchable), audio copied: the
                I/O ceiling the ratios divide by, on each row's own clip (``io 0f``, ``io 4f``:
                x264's work depends on the picture); ``io x264``: the 1-face clip's loop with
                x264's own defaults (faster on 2 cores: shows what the writer's settings cost)
2. ``nofaces``  the whole pipeline on a clip without faces: decode, detection, encode
3. ``model``    model-only faces/s (random weights in the preset's architecture; speed does
                not depend on the values), at the pipeline's batch size and precision
4. ``e2e``      the whole pipeline with 1 and 4 faces, and on the long clip (one decode,
                detection alongside restoration, start-up included); ``e2e 1f off``: the
                1-face clip with ``--temporal off``, the temporal stage's cost end to end

5. segments, resume and ``--ray`` (``benchmarks/bench_segments.py``, run as a child after the
   table; ``--part`` picks, ``--segment-options`` passes its options): 30 s segments against one
   segment, a job killed half-way and run again against a whole run, two files with ``--ray``
   (2 local workers) against one after the other.
6. temporal stabilisation (``benchmarks/bench_temporal.py``, run as a child; ``--temporal-options``
   passes its options): flicker (plain and flow-warped), ghosts, colour and cost on the real
   crowd clip and a damaged still face, through identity, fresh-noise and Real-ESRGAN restorers.

``--repeat N`` runs every row of 1-4 N times, in rounds (io, model, pipeline rows, then again),
and prints medians over the rounds: each round's ratio divides rows measured minutes apart, so
on a machine whose speed drifts (a shared VM) one round can be off by 10 % either way; the
rounds' ratios are printed too.

Ratios: ``e2e / (model + io)`` (CPU target ≤ 1.25: every stage shares two cores, so the best
an engine can do is hide everything but the sum) and efficiency = slowest stage alone ÷
end-to-end (GPU target ≥ 0.85); cores = CPU seconds ÷ wall seconds of the row's process (2.00
is every core of this machine busy all the time). Memory: peak RSS (and peak CUDA memory) of the 10 s and
the long clip.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and
    exec, so a child would report the parent's peak (the clip generator's) if that was higher."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def _restorer(args):
    import torch

    from gpen_video.device import resolve_device, resolve_dtype
    from gpen_video.restore.model import build_model, preset_config
    from gpen_video.restore.restorer import Restorer, default_batch_size, fit_cuda_batch_size

    device = resolve_device(args.device)
    config = preset_config(args.model)
    torch.manual_seed(0)
    model = build_model(config)
    dtype = resolve_dtype(args.precision, device)
    batch = args.batch_size or default_batch_size(device, config.size, dtype)
    restorer = Restorer(model, config.size, device=device, dtype=dtype, batch_size=batch)
    if args.batch_size is None and device.type == "cuda":
        restorer.batch_size = fit_cuda_batch_size(restorer, frames_held=lambda batch: 0)
    return restorer


def measure(kind: str, clip: str, args) -> dict:
    """One row, in this process."""
    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    row: dict = {"kind": kind, "clip": Path(clip).name}
    if kind in ("io", "io-x264"):
        from benchmarks.bench_io import bare

        with tempfile.TemporaryDirectory() as tmp:
            row["frames"] = bare(Path(clip), Path(tmp) / "out.mp4", args.crf, args.preset,
                                 writer_settings=kind == "io")
    elif kind == "model":
        restorer = _restorer(args)
        crops = torch.rand(args.model_faces, 3, restorer.size, restorer.size, generator=torch.Generator().manual_seed(0))
        crops = crops.to(restorer.device)
        restorer.restore_tensor(crops[: restorer.batch_size])  # warm-up
        if restorer.device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        restorer.restore_tensor(crops)
        if restorer.device.type == "cuda":
            torch.cuda.synchronize()
        row["faces"] = len(crops)
        row["batch"] = restorer.batch_size
        row["precision"] = str(restorer.dtype).removeprefix("torch.")
    else:
        from gpen_video.config import load_config
        from gpen_video.jobs.api import FacePipeline

        config = load_config(None, device=args.device, crf=args.crf, preset=args.preset, temporal=kind != "e2e-off")
        pipeline = FacePipeline(config, restorer=_restorer(args))
        with tempfile.TemporaryDirectory() as tmp:
            result = pipeline.restore_video(clip, Path(tmp) / "out.mp4")
        row.update(frames=result.frames, faces=result.faces_restored, stages=result.stage_seconds)
        row["batch"] = pipeline.restorer.batch_size
    row["seconds"] = time.perf_counter() - start
    row["cpu_s"] = time.process_time() - cpu_start
    row["rss_mib"] = _peak_rss_mib()
    if torch.cuda.is_available():
        row["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_child(kind: str, clip: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--clip", str(clip)]
    for name in ("device", "model", "precision", "crf", "preset", "model_faces"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_clips(folder: Path, args) -> dict[str, Path]:
    from samples.make_demo import render_clip

    w, h = (int(v) for v in args.size.split("x"))
    clips = {}
    for faces in sorted({0, 1, *args.faces}):
        clips[f"{faces}f"] = folder / f"{faces}f-{args.seconds:g}s.mp4"
        render_clip(clips[f"{faces}f"], seconds=args.seconds, size=(w, h), faces=faces, paths=[] if faces == 0 else None)
    if args.long_seconds:
        clips["long"] = folder / f"1f-{args.long_seconds:g}s.mp4"
        render_clip(clips["long"], seconds=args.long_seconds, size=(w, h), faces=1)
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="default GPEN-BFR-256 on CPU, GPEN-BFR-512 on CUDA")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--long-seconds", type=float, default=60.0, help="0 skips the memory comparison")
    parser.add_argument("--faces", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--model-faces", type=int, default=None, help="faces timed in the model row")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the pipeline table's rows, interleaved (figures: medians over the rounds)")
    parser.add_argument("--part", choices=["all", "pipeline", "segments", "temporal"], default="all")
    parser.add_argument("--segment-options", default="", help="options of benchmarks/bench_segments.py")
    parser.add_argument("--temporal-options", default="", help="options of benchmarks/bench_temporal.py")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.model = args.model or ("GPEN-BFR-512" if cuda else "GPEN-BFR-256")
    args.model_faces = args.model_faces or (512 if cuda else 64)
    if args.measure:
        print(json.dumps(measure(args.measure, args.clip, args)))
        return

    if args.part in ("all", "pipeline"):
        pipeline_table(args, cuda)
    if args.part in ("all", "segments"):
        sys.stdout.flush()
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_segments.py")),
                        *shlex.split(args.segment_options)], check=True)
    if args.part in ("all", "temporal"):
        sys.stdout.flush()
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_temporal.py")),
                        *shlex.split(args.temporal_options)], check=True)


def measured_rows(clips: dict[str, Path], args) -> list[tuple[str, str, dict, dict | None]]:
    """One round of rows 1-4, each in a fresh process, back to back: (name, what, row, bare loop
    of its clip or None)."""
    # each pipeline row divides by the bare loop on its own clip: x264's cost depends on
    # what the picture shows (the no-face clip costs it about 15 % more than the 1-face one)
    io = {kind: run_child("io", clips[kind], args) for kind in dict.fromkeys(["1f", "0f", *(f"{n}f" for n in args.faces)])}
    rows = [("io", "bare PyAV decode+encode, 1-face clip", io["1f"], None),
            ("io x264", "the same, x264's default settings", run_child("io-x264", clips["1f"], args), None),
            ("io 0f", "bare PyAV decode+encode, no-face clip", io["0f"], None),
            *((f"io {n}f", f"bare PyAV decode+encode, {n}-face clip", io[f"{n}f"], None)
              for n in args.faces if n != 1),
            ("model", f"{args.model} alone", run_child("model", clips["1f"], args), None)]
    rows.append(("nofaces", "pipeline, no faces", run_child("nofaces", clips["0f"], args), io["0f"]))
    for faces in args.faces:
        clip = f"{faces}f"
        rows.append((f"e2e {clip}", f"pipeline, {faces} face(s)", run_child("e2e", clips[clip], args), io[clip]))
        if faces == 1:
            rows.append(("e2e 1f off", "pipeline, 1 face, --temporal off", run_child("e2e-off", clips[clip], args),
                         io[clip]))
    if "long" in clips:  # the 1-face clip's content, longer: its bare loop's rate
        rows.append(("e2e long", f"pipeline, 1 face, {args.long_seconds:g} s", run_child("e2e", clips["long"], args),
                     io["1f"]))
    return rows


def ratio(row: dict, bare: dict, per_face: float) -> tuple[float, float, float]:
    """(model + io seconds, e2e / (model + io), efficiency) of a pipeline row."""
    alone_io, alone_model = row.get("frames", 0) * bare["seconds"] / bare["frames"], row.get("faces", 0) * per_face
    return alone_io + alone_model, row["seconds"] / (alone_io + alone_model), max(alone_io, alone_model) / row["seconds"]


def pipeline_table(args, cuda: bool) -> None:
    """Rows 1-4: one table of I/O, model and whole-pipeline time; with ``--repeat N``, N rounds
    of every row, interleaved, and each figure the median over the rounds."""
    import statistics

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args)
        rounds = [measured_rows(clips, args) for _ in range(args.repeat)]
    models = [next(row for name, _, row, _ in rows if name == "model") for rows in rounds]
    per_face = [m["seconds"] / m["faces"] for m in models]
    precision = models[0]["precision"]

    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(f"gpen-video benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, GPU: {gpu}; {args.model} {precision}, {args.size}, "
          f"{args.seconds:g} s at 25 fps")
    if args.repeat > 1:
        print(f"# {args.repeat} rounds, every row once per round, back to back; each figure is the median over "
              f"the rounds, and e2e/(m+io) the median of each round's own ratio")
    print(f"{'row':<10} {'what':<36} {'frames':>6} {'faces':>6} {'s':>8} {'fps':>7} {'faces/s':>8} "
          f"{'model+io':>9} {'e2e/(m+io)':>10} {'effic.':>7} {'cores':>5} {'RSS MiB':>8} {'GPU MiB':>8}")
    per_round: dict[str, list[float]] = {}
    for i, (name, what, row, bare) in enumerate(rounds[0]):
        runs = [rows[i][2] for rows in rounds]
        frames, faces, secs = row.get("frames", 0), row.get("faces", 0), statistics.median(r["seconds"] for r in runs)
        cells = [f"{name:<10}", f"{what:<36}", f"{frames:>6}", f"{faces:>6}", f"{secs:>8.1f}",
                 f"{frames / secs if frames else 0:>7.1f}", f"{faces / secs if faces else 0:>8.2f}"]
        if bare is not None:
            figures = [ratio(rows[i][2], rows[i][3], pf) for rows, pf in zip(rounds, per_face)]
            per_round[name] = [r for _, r, _ in figures]
            cells += [f"{statistics.median(f[0] for f in figures):>9.1f}", f"{statistics.median(per_round[name]):>10.2f}",
                      f"{statistics.median(f[2] for f in figures):>7.2f}"]
        else:
            cells += [f"{'':>9}", f"{'':>10}", f"{'':>7}"]
        cores = statistics.median(r["cpu_s"] / r["seconds"] for r in runs)
        cells += [f"{cores:>5.2f}", f"{max(r['rss_mib'] for r in runs):>8.0f}", f"{max(r.get('cuda_mib', 0) for r in runs):>8.0f}"]
        print(" ".join(cells))
        if row.get("stages"):
            stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in row["stages"]}
            busy = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
            print(f"{'':<10} busy seconds by stage: {busy}")
    if args.repeat > 1:
        print("e2e/(m+io) of each round, in order:")
        for name, values in per_round.items():
            print(f"  {name:<10} " + " ".join(f"{v:.2f}" for v in values)
                  + f"   median {statistics.median(values):.2f}, range {min(values):.2f}-{max(values):.2f}")


if __name__ == "__main__":
    main()
