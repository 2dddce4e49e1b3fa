"""Which compute device and precision a job runs on, and how much memory the device has free."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from gpen_video.errors import DeviceError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags (as Linux names them) of native bf16 arithmetic: AVX512-BF16 or AMX."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} was asked for but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name} does not exist ({torch.cuda.device_count()} CUDA devices); pick another index"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them; empty where there is no such file."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def resolve_dtype(precision: str, device: torch.device, *, flags: Iterable[str] | None = None) -> torch.dtype:
    """The compute dtype for ``--precision``.

    ``auto``: fp16 on CUDA; on the CPU bf16 where it has native bf16 arithmetic (AVX512-BF16
    or AMX: 1.8× faster than fp32 in issue 8's measurement, 52 dB PSNR against fp32 on
    GPEN-BFR-256 in ``benchmarks/bench_model.py``), else fp32 (CPU fp16 convolutions, and
    bf16 without hardware support, are slow).

    Args:
        precision: auto, fp32, fp16 or bf16.
        device: the device the model runs on.
        flags: the CPU's feature flags (default: read with ``cpu_flags()``).
    """
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.float16
    native = NATIVE_BF16_FLAGS & frozenset(cpu_flags() if flags is None else flags)
    return torch.bfloat16 if native else torch.float32


def free_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); GPU-only."""
    if device.type != "cuda":
        raise ValueError(f"free memory is only measured on CUDA devices, not {device}")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
