"""What the half-precision guard costs, and what it measures, on random GPEN weights.

For each preset and precision (fp16, bf16) it prints, in one run:

- the load-time check (``restore.precision.choose_precision``): its verdict, the worst check
  face's PSNR against fp32, and its cost the first time on a machine (weights hash + one fp32
  and one half-precision forward of the two check faces) and afterwards (hash + cache read);
- the per-batch guard (``nonfinite_faces``: one float32 sum on the device and one scalar read)
  against a batch's forward in that precision, per batch size: the guard's share must stay
  under 1 %; with the forward's faces/s and, on CUDA, its peak device memory.

    python benchmarks/bench_precision.py --device cpu --presets GPEN-BFR-256 --batches 1,4
    python benchmarks/bench_precision.py --device cuda --presets GPEN-BFR-256,GPEN-BFR-512
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import DTYPES, randomize  # noqa: E402
from gpen_video.device import device_name  # noqa: E402
from gpen_video.restore.model import build_model, preset_config  # noqa: E402
from gpen_video.restore.precision import (  # noqa: E402
    CHECK_PSNR_DB,
    check_faces,
    choose_precision,
    module_digest,
    nonfinite_faces,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def load_rows(model: torch.nn.Module, size: int, dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """The check's verdict and cost with an empty cache, then with the cache filled."""
    batch = check_faces(size) * 2 - 1
    hash_s, _ = timed(lambda: module_digest(model), device)
    with tempfile.TemporaryDirectory() as cache:
        first_s, choice = timed(lambda: choose_precision(model, batch, dtype, device=device, name="bench",
                                                         cache_dir=cache, safe=torch.float32), device)
        again_s, again = timed(lambda: choose_precision(model, batch, dtype, device=device, name="bench",
                                                        cache_dir=cache, safe=torch.float32), device)
    assert again.checks[0].cached
    check = choice.checks[0]
    return {"verdict": "pass" if check.passed() else "FAIL", "psnr": check.psnr_db, "hash_s": hash_s,
            "first_s": first_s, "cached_s": again_s}


def batch_rows(model: torch.nn.Module, size: int, dtype: torch.dtype, device: torch.device, batches: list[int],
               iters: int) -> list[tuple[int, float, float, float]]:
    """(batch, median forward s, median guard s, peak MiB) per batch size, the guard run on the
    forward's output; the peak is CUDA's allocated memory during the forwards (NaN on the CPU)."""
    half = model.to(device=device, dtype=dtype)
    faces = check_faces(size).to(device)
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = (faces.repeat((b + 1) // 2, 1, 1, 1)[:b] * 2 - 1).to(dtype)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            half(x)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            forward, guard = [], []
            for _ in range(iters):
                seconds, y = timed(lambda: half(x), device)
                forward.append(seconds)
                guard.append(min(timed(lambda: nonfinite_faces(y), device)[0] for _ in range(20)))
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            rows.append((b, statistics.median(forward), statistics.median(guard), peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="GPEN-BFR-256")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--batches", default=None, help="comma list; default 1,4 on the CPU, 1,8,32 on CUDA")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards per row (default 2 CPU, 10 CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batches or ("1,8,32" if cuda else "1,4")).split(",")]
    iters = args.iters or (10 if cuda else 2)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench_precision: {device_name(device)} ({device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}, {when}")
    print(f"check: 2 shipped faces, pass = all finite and PSNR >= {CHECK_PSNR_DB:g} dB against fp32 on each")
    print()
    print(f"{'preset':<14} {'prec':<5} {'verdict':<7} {'PSNR dB':>8} {'hash s':>7} {'check s':>8} {'cached s':>9}"
          f"   {'batch':>5} {'forward s':>10} {'faces/s':>8} {'peak MiB':>9} {'guard ms':>9} {'guard %':>8}")
    worst = 0.0
    for preset in args.presets.split(","):
        config = preset_config(preset)
        for name in args.precisions.split(","):
            model = randomize(build_model(config)).eval().requires_grad_(False)
            load = load_rows(model, config.size, DTYPES[name], device)
            rows = batch_rows(model, config.size, DTYPES[name], device, batches, iters)
            for i, (b, forward_s, guard_s, peak) in enumerate(rows):
                share = 100 * guard_s / forward_s
                worst = max(worst, share)
                head = (f"{preset:<14} {name:<5} {load['verdict']:<7} {load['psnr']:>8.1f} {load['hash_s']:>7.2f} "
                        f"{load['first_s']:>8.2f} {load['cached_s']:>9.2f}" if i == 0 else " " * 64)
                print(f"{head}   {b:>5} {forward_s:>10.4f} {b / forward_s:>8.1f} {peak:>9.0f} {guard_s * 1e3:>9.3f} "
                      f"{share:>7.3f}%", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    print()
    print(f"largest per-batch guard share: {worst:.3f} % of a batch's forward (target < 1 %)")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
