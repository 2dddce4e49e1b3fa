"""The machine's matmul peak in fp32 and bf16/fp16, and GPEN's floating-point operations per face.

The peak is the best of a few large square ``torch.matmul`` calls; GPEN's count is one forward
of the grouped (original) formulation under ``torch.utils.flop_counter.FlopCounterMode``, on
the meta device: every convolution (the blur filters included) and linear layer, one
multiply-add counted as two operations. The rewritings of the fast path do not change it.

    python benchmarks/bench_peak.py --device cpu --presets GPEN-BFR-256,GPEN-BFR-512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.restore.model import ModelConfig, build_model, preset_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 6144, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` [n,n] @ [n,n] products (after one warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def gpen_flops(config: ModelConfig) -> int:
    """Floating-point operations of one face through GPEN, counted as the original computes it."""
    with torch.device("meta"):
        model = build_model(config, modconv="grouped").eval().requires_grad_(False)
        x = torch.zeros(1, 3, config.size, config.size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="GPEN-BFR-256,GPEN-BFR-512")
    parser.add_argument("--precision", default="fp32,bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for prec in args.precision.split(","):
        print(f"{prec} matmul peak on {device}: {matmul_peak(DTYPES[prec], device) / 1e9:.0f} GFLOP/s")
    for preset in args.presets.split(","):
        print(f"{preset}: {gpen_flops(preset_config(preset)) / 1e9:.1f} GFLOP per face")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
