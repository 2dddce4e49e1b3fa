"""Throughput of the GPEN network: the fast path against the grouped reference and the machine's peak.

For each preset (random weights), batch size, precision and memory layout it prints faces/s
of the batched (default) path, its GFLOP/s (GPEN's operations per face as the original
computes them, ``bench_peak.gpen_flops``) and their share of this machine's matmul peak in the
same precision, measured in the same run (``bench_peak.matmul_peak``); then faces/s of the
original grouped-convolution path on the same weights and input, the ratio, the max abs
difference, and the PSNR of the batched output against the fp32 batched output (peak-to-peak
2, the [-1, 1] range). ``--against REV`` adds the network as it was at git revision REV (its
``model.py``, same weights), timed interleaved with the rest: before/after in one run.

    python benchmarks/bench_model.py --device cpu --presets GPEN-BFR-256 --batches 1,4 --iters 2
    python benchmarks/bench_model.py --device cpu --against 8cc521c   # before/after
    python benchmarks/bench_model.py --device cuda --precision fp32,fp16

Channels-last rows feed the network NHWC inputs (the module is not converted: its modulated
weights are 5-D; it lays out its derived weights like its input), as ``Restorer`` does. On the
CPU the process keeps freed heap memory (``device.keep_freed_heap``, as ``Restorer`` does)
unless ``--malloc-default``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_peak import gpen_flops, matmul_peak  # noqa: E402
from gpen_video.device import keep_freed_heap  # noqa: E402
from gpen_video.restore.model import GPEN, ModelConfig, build_model, preset_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def randomize(model: GPEN, seed: int = 0) -> GPEN:
    """Every parameter N(0, 0.5²), so no path (e.g. the zero-initialised feature gains) is dead."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def module_at(rev: str, path: str = "gpen_video/restore/model.py") -> ModuleType:
    """The module at ``path`` as it was at git revision ``rev``, imported on its own (a
    before/after comparison in one run)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    name = f"{Path(path).stem}_at_{rev}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, iters: int, warmup: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds per forward of each run and its last output.

    The runs alternate forward by forward so that load from other processes (a shared CPU)
    or clock changes hit every run alike.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, run in runs.items():
                _sync(x.device)
                start = time.perf_counter()
                outs[name] = run(x)
                _sync(x.device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outs[name]) for name in runs}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _converted(
    fp32_model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype, module: ModuleType | None = None
) -> torch.nn.Module:
    """A copy of ``fp32_model`` (built by ``module``'s ``build_model``) in ``dtype``."""
    model = (module.build_model if module else build_model)(config).eval().to(next(fp32_model.parameters()).device)
    model.load_state_dict(fp32_model.state_dict())
    return model.to(dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="GPEN-BFR-256,GPEN-BFR-512")
    parser.add_argument("--batches", default=None, help="comma list; default 1,4,16 on CUDA, 1,4 (512: 1) on CPU")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards per row (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3 CUDA, 1 CPU)")
    parser.add_argument("--precision", default=None, help="comma list of fp32,fp16,bf16 (default fp32,fp16 on "
                        "CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--channels-last", choices=["on", "off", "both"], default="both",
                        help="NHWC rows, NCHW rows, or both")
    parser.add_argument("--no-grouped", action="store_true", help="skip the grouped reference (large batches)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the network as it was at this git revision (before/after)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(model) (inductor); its first call, the compilation, is "
                             "printed on a line of its own")
    parser.add_argument("--malloc-default", action="store_true",
                        help="CPU: leave malloc returning freed memory (see device.keep_freed_heap)")
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
    layouts = {"on": [True], "off": [False], "both": [False, True]}[args.channels_last]
    heap = "" if cuda else ", freed heap kept" if not args.malloc_default and keep_freed_heap() else ", malloc default"
    old = module_at(args.against) if args.against else None

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# GPEN forward throughput on {name}, torch {torch.__version__}{heap}, random weights, "
          f"{iters} timed iters (median, runs interleaved) after {warmup} warm-up")
    peaks = {prec: matmul_peak(DTYPES[prec], device) for prec in precisions}
    print("# matmul peak: " + ", ".join(f"{prec} {peak / 1e9:.0f} GFLOP/s" for prec, peak in peaks.items()))
    flops = {preset: gpen_flops(preset_config(preset)) for preset in args.presets.split(",")}
    print("# GPEN per face: " + ", ".join(f"{preset} {f / 1e9:.1f} GFLOP" for preset, f in flops.items()))
    header = (f"{'preset':<13} {'batch':>5} {'prec':>5} {'layout':>6} {'f/s':>7} {'GFLOP/s':>7} {'peak':>5}"
              + (f" {'before f/s':>10} {'after/bef':>9}" if old else "")
              + f" {'grouped f/s':>11} {'speedup':>7} {'max|b-g|':>9} {'PSNR vs fp32':>12}")
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        config = preset_config(preset)
        fp32_model = randomize(build_model(config)).eval().to(device)
        old_fp32 = None
        if old:
            old_fp32 = old.build_model(config).eval().to(device)
            old_fp32.load_state_dict(fp32_model.state_dict())
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
                model = fp32_model if dtype == torch.float32 else _converted(fp32_model, config, dtype)
                runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"batched": model}
                if old_fp32 is not None:
                    runs["before"] = old_fp32 if dtype == torch.float32 else _converted(old_fp32, config, dtype, old)
                if not args.no_grouped:
                    runs["grouped"] = lambda x, model=model: model(x, impl="grouped")
                if args.compile:
                    runs["compiled"] = torch.compile(model, dynamic=False)
                for channels_last in layouts:
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    x = x32.to(dtype).contiguous(memory_format=fmt)
                    compile_s = math.nan
                    if args.compile:
                        start = time.perf_counter()
                        with torch.inference_mode():
                            runs["compiled"](x)
                        compile_s = time.perf_counter() - start
                    timed = time_runs(runs, x, iters, warmup)
                    t_b, out_b = timed["batched"]
                    rate = batch * flops[preset] / t_b
                    row = (f"{preset:<13} {batch:>5} {prec:>5} {'NHWC' if channels_last else 'NCHW':>6} "
                           f"{batch / t_b:>7.2f} {rate / 1e9:>7.0f} {rate / peaks[prec]:>5.0%}")
                    if "before" in timed:
                        t_o = timed["before"][0]
                        row += f" {batch / t_o:>10.2f} {t_o / t_b:>8.2f}x"
                    t_g, diff = math.nan, math.nan
                    if "grouped" in timed:
                        t_g, out_g = timed["grouped"]
                        diff = (out_b.float() - out_g.float()).abs().max().item()
                    print(row + f" {batch / t_g:>11.2f} {t_g / t_b:>6.2f}x {diff:>9.2e} {psnr(out_b, ref32):>12.1f}",
                          flush=True)
                    if "compiled" in timed:
                        t_c, out_c = timed["compiled"]
                        print(f"{'':<13} torch.compile: first call (compiling) {compile_s:.1f} s, then "
                              f"{batch / t_c:.2f} f/s ({t_b / t_c:.2f}x eager), max|c-b| "
                              f"{(out_c.float() - out_b.float()).abs().max().item():.2e}", flush=True)
                del model, runs
        del fp32_model, old_fp32
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
