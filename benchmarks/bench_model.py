"""Throughput of the GPEN network: batched modulated conv against the grouped reference.

For each preset (random weights), batch size, precision and memory layout it prints faces/s
of the batched (default) path and of the original grouped-convolution path on the same
weights and input, their ratio, the max abs difference between them, and the PSNR of the
batched output against the fp32 batched output (peak-to-peak 2, the [-1, 1] range).

    python benchmarks/bench_model.py --device cpu --presets GPEN-BFR-256 --batches 1,4 --iters 2
    python benchmarks/bench_model.py --device cuda --precision fp32,fp16   # adds channels_last rows

Channels-last rows feed the network NHWC inputs (the module is not converted: its modulated
weights are 5-D; it lays out its derived weights like its input), as ``Restorer`` does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.restore.model import GPEN, build_model, preset_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def randomize(model: GPEN, seed: int = 0) -> GPEN:
    """Every parameter N(0, 0.5²), so no path (e.g. the zero-initialised feature gains) is dead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impls(
    model: GPEN, x: torch.Tensor, impls: list[str], iters: int, warmup: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds per forward of each impl and its last output.

    The impls alternate forward by forward so that load from other processes (a shared CPU)
    or clock changes hit every impl alike.
    """
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for impl in impls:
                _sync(x.device)
                start = time.perf_counter()
                outs[impl] = model(x, impl=impl)
                _sync(x.device)
                if i >= warmup:
                    times[impl].append(time.perf_counter() - start)
    return {impl: (statistics.median(times[impl]), outs[impl]) for impl in impls}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="GPEN-BFR-256,GPEN-BFR-512")
    parser.add_argument("--batches", default=None, help="comma list; default 1,4,16 on CUDA, 1,4 (512: 1) on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards per row (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--precision", default=None, help="comma list of fp32,fp16,bf16 (default fp32,fp16 on "
                        "CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off", "both"], default="auto",
                        help="auto: both on CUDA, off on CPU")
    parser.add_argument("--no-grouped", action="store_true", help="skip the grouped reference (large batches)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    precisions = (args.precision or ("fp32,fp16" if cuda else "fp32,bf16")).split(",")
    layouts = {"auto": [False, True] if cuda else [False], "on": [True], "off": [False], "both": [False, True]}[
        args.channels_last]

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# GPEN forward throughput on {name}, torch {torch.__version__}, random weights, "
          f"{iters} timed iters (median, impls interleaved) after {warmup} warm-up")
    header = (f"{'preset':<13} {'batch':>5} {'prec':>5} {'layout':>6} {'batched f/s':>11} {'grouped f/s':>11} "
              f"{'speedup':>7} {'max|b-g|':>9} {'PSNR vs fp32':>12}")
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        config = preset_config(preset)
        fp32_model = randomize(build_model(config)).eval().to(device)
        if args.batches:
            batches = [int(b) for b in args.batches.split(",")]
        else:
            batches = [1, 4, 16] if cuda else ([1] if config.size >= 512 else [1, 4])
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            x32 = (torch.rand(batch, 3, config.size, config.size, generator=gen) * 2 - 1).to(device)
            with torch.inference_mode():
                ref32 = fp32_model(x32)
            for prec in precisions:
                dtype = DTYPES[prec]
                model = fp32_model if dtype == torch.float32 else build_model(config).eval().to(device)
                if model is not fp32_model:
                    model.load_state_dict(fp32_model.state_dict())
                    model = model.to(dtype)
                for channels_last in layouts:
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    x = x32.to(dtype).contiguous(memory_format=fmt)
                    impls = ["batched"] if args.no_grouped else ["batched", "grouped"]
                    timed = time_impls(model, x, impls, iters, warmup)
                    t_b, out_b = timed["batched"]
                    if args.no_grouped:
                        t_g, diff = math.nan, math.nan
                    else:
                        t_g, out_g = timed["grouped"]
                        diff = (out_b.float() - out_g.float()).abs().max().item()
                    quality = psnr(out_b, ref32)
                    print(f"{preset:<13} {batch:>5} {prec:>5} {'NHWC' if channels_last else 'NCHW':>6} "
                          f"{batch / t_b:>11.2f} {batch / t_g:>11.2f} {t_g / t_b:>6.2f}x {diff:>9.2e} "
                          f"{quality:>12.1f}", flush=True)
                if model is not fp32_model:
                    del model
        del fp32_model
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
