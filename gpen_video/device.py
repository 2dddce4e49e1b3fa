"""Which compute device and precision a job runs on, how much memory the device has free, and
how many CPU threads a stage's thread may use."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
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


def has_native_bf16(device: torch.device, *, flags: Iterable[str] | None = None) -> bool:
    """Whether ``device`` computes bf16 in hardware.

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` on that device (compute
    capability 8.0 and newer: Ampere, Ada, Hopper, Blackwell); the emulated bf16 of older GPUs
    is slower than fp16 and does not count. CPU: AVX512-BF16 or AMX in ``flags`` (default:
    read with ``cpu_flags()``).
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return bool(NATIVE_BF16_FLAGS & frozenset(cpu_flags() if flags is None else flags))


def resolve_dtype(precision: str, device: torch.device, *, flags: Iterable[str] | None = None) -> torch.dtype:
    """The compute dtype for ``--precision``.

    ``auto``: on CUDA bf16 where the GPU computes it natively (``has_native_bf16``): it has
    fp32's exponent range, so trained StyleGAN2 weights cannot overflow it as they can fp16;
    fp16 on older GPUs (Turing, Pascal). On the CPU bf16 where it has native bf16 arithmetic
    (AVX512-BF16 or AMX: 1.8× faster than fp32 in issue 8's measurement, 52 dB PSNR against
    fp32 on GPEN-BFR-256 in ``benchmarks/bench_model.py``), else fp32 (CPU fp16 convolutions,
    and bf16 without hardware support, are slow). Whatever is chosen, half precision is then
    checked against fp32 (``restore.precision``).

    Args:
        precision: auto, fp32, fp16 or bf16.
        device: the device the model runs on.
        flags: the CPU's feature flags (default: read with ``cpu_flags()``).
    """
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return torch.bfloat16 if has_native_bf16(device, flags=flags) else torch.float32


def safe_dtype(device: torch.device, *, flags: Iterable[str] | None = None) -> torch.dtype:
    """The precision a network falls back to when half precision fails its check: bf16
    where the device computes it natively (fp32's range, so no overflow), else fp32."""
    return torch.bfloat16 if has_native_bf16(device, flags=flags) else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``--precision``'s name of a dtype: fp32, fp16 or bf16."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no precision name for {dtype}; use float32, float16 or bfloat16")


def device_name(device: torch.device, *, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What the device is, for caching what was measured on it: the GPU's name and compute
    capability, or the CPU's model name (its architecture where /proc/cpuinfo is missing)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def free_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); GPU-only."""
    if device.type != "cuda":
        raise ValueError(f"free memory is only measured on CUDA devices, not {device}")
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def keep_freed_heap() -> bool:
    """Ask glibc's malloc to keep freed memory in the process instead of returning it.

    Without this each large tensor (above 32 MiB, every GPEN-BFR-512 activation) is a fresh
    ``mmap`` whose pages fault on first write: on a 2-core CPU that cost GPEN-BFR-512 bf16 about
    40 % of a forward. The price is a resident size that stays at its peak. Process-wide, and
    idempotent; call it before the threads that run the network start. Returns False where
    the C library is not glibc (nothing changed).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    # One arena: a thread's own arena is capped at 64 MiB and would mmap larger blocks anyway
    # (threads that have already allocated keep theirs).
    return all(mallopt(option, value) for option, value in
               ((m_mmap_max, 0), (m_trim_threshold, 2**30), (m_arena_max, 1)))


def limit_cpu_threads(count: int) -> bool:
    """Run the calling thread's torch CPU operations on at most ``count`` threads; every other
    thread keeps its own count.

    torch's CPU thread pool is OpenMP's, whose thread count belongs to the calling thread, but
    ``torch.set_num_threads`` also sets the process default (which threads that have not yet run
    an operation take up, the restorer's among them) and drops oneDNN's cached kernels, so it
    cannot limit one thread. The stages beside the restorer (decode, detection, crops, the
    stabiliser, paste-back) run small tensor operations, where a second thread gains little
    and its wake-ups and spinning take CPU time from GPEN and the encoder: the stabiliser took
    21.8 CPU ms a face on two threads against 15.8 on one. Returns False where torch has no
    OpenMP or its ``omp_set_num_threads`` cannot be found (nothing changed).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    setter = _omp_set_num_threads()
    if setter is None:
        return False
    torch.get_num_threads()  # a thread's first use sets its count from the process default: before ours
    setter(count)
    return True


def light_stage_threads() -> int:
    """torch CPU threads for a stage that runs no network: one for every eight of torch's
    threads, at least one (``limit_cpu_threads`` says why so few)."""
    return max(1, torch.get_num_threads() // 8)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """The OpenMP runtime's ``omp_set_num_threads`` that torch loaded, or None."""
    import ctypes

    if not torch.backends.openmp.is_available():
        return None
    try:
        setter = ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], None
    return setter
