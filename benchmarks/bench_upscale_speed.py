"""Frames per second of the upscaling stage's networks, per precision, on one device.

Speed does not depend on the picture, so the input is a generated frame (no files needed:
this runs on a bare GPU machine). Each row runs the stage's upscaler as ``--upscale 2`` builds
it (the default tiles) on a batch of frames after one warm-up call, and prints frames/s, input
megapixels/s and, on CUDA, the peak memory allocated.

    python benchmarks/bench_upscale_speed.py --device cuda                     # SD (720x576), fp32/fp16/bf16
    python benchmarks/bench_upscale_speed.py --device cpu --size 96x64 --frames 1 --precisions fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.errors import GpenVideoError  # noqa: E402
from gpen_video.upscale.upscaler import PRECISION_DTYPES, UpscaleConfig, create_upscaler  # noqa: E402


def frames_per_second(name: str, precision: str, device: torch.device, size: tuple[int, int], frames: int,
                      scale: int) -> tuple[float, float]:
    """(frames/s, peak CUDA MiB or 0) of ``frames`` frames of ``size`` (width, height)."""
    up = create_upscaler(UpscaleConfig(name, scale=scale), device=device, dtype=PRECISION_DTYPES[precision],
                         offline=True, progress=False)
    w, h = size
    batch = torch.rand(frames, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)  # [N3HW]
    with torch.inference_mode():
        up(batch[:1])  # warm-up: kernels chosen, memory pooled
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        up(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return frames / seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--upscalers", default="realesr-animevideov3,realesrgan-x4plus")
    parser.add_argument("--precisions", default=None, help="comma list (default fp32,fp16,bf16 on CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--size", default="720x576", help="input frame, WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=None, help="frames timed (default 16 CUDA, 1 CPU)")
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    precisions = (args.precisions or ("fp32,fp16,bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    frames = args.frames or (16 if device.type == "cuda" else 1)
    w, h = (int(v) for v in args.size.split("x"))
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# upscaler speed, {name_of}, torch {torch.__version__}, {w}x{h} input, x{args.scale}, {frames} frames")
    print(f"{'upscaler':<22} {'prec':>5} {'frames/s':>9} {'input MP/s':>11} {'peak MiB':>9}")
    for name in args.upscalers.split(","):
        for precision in precisions:
            try:
                fps, peak = frames_per_second(name, precision, device, (w, h), frames, args.scale)
            except GpenVideoError as exc:  # the weights are not installed here
                print(f"{name:<22} {precision:>5}  skipped: {exc}")
                continue
            print(f"{name:<22} {precision:>5} {fps:>9.2f} {fps * w * h / 1e6:>11.2f} {peak:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
