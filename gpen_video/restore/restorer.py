"""Batched GPEN inference on aligned face crops already on the device.

Crops arrive as [N,3,S,S] float RGB in [0, 1] (``warp.FaceCrops.pixels``) and leave the same
way in float32. The restorer owns the model's device, precision, memory layout and batch
size; when the device runs out of memory it halves the batch instead of failing. In fp16/bf16
every batch's output is checked on the device with one reduction, and faces whose output is not
finite are restored again in fp32 (``RestoreStats.fp32_reruns``): a non-finite face is never
returned. ``build_restorer`` checks half precision against fp32 before a job starts
(``restore.precision``). How large a
batch fits is a pure function of measured sizes (``fit_batch_size``), so it is tested
anywhere; only the measurement itself (``measure_face_bytes``, ``device.free_memory``) needs
a GPU; ``fit_cuda_batch_size`` combines the three there.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from time import perf_counter
from typing import TypeVar

import torch

from gpen_video.device import free_memory, keep_freed_heap, resolve_dtype
from gpen_video.errors import WeightsError
from gpen_video.restore.precision import (
    PrecisionChoice,
    check_faces,
    choose_precision,
    nonfinite_faces,
    unchecked,
)

log = logging.getLogger(__name__)


def default_batch_size(device: torch.device, size: int, dtype: torch.dtype) -> int:
    """CUDA: 16 until ``fit_batch_size``. CPU: 4 for crops up to 256 in bf16 (GPEN-BFR-256:
    1.17× the faces/s of batch 1 alone, 12 % less time end to end on 2 cores), else 1 (fp32
    gains nothing from batching; GPEN-BFR-512's activations are hundreds of MiB a face)."""
    if device.type != "cpu":
        return 16
    return 4 if size <= 256 and dtype == torch.bfloat16 else 1


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device allocator's out-of-memory error."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@dataclass(frozen=True)
class RestoreStats:
    """Counters of a restorer's work: faces restored, forward calls, out-of-memory step-downs,
    and faces whose half-precision output was not finite and were restored again in fp32."""

    faces: int = 0
    batches: int = 0
    oom_stepdowns: int = 0
    fp32_reruns: int = 0


class Restorer:
    """Runs a GPEN module on batches of crops.

    Args:
        model: a module mapping [N,3,S,S] RGB in [-1, 1] to the same (or a tuple whose
            first item is that).
        size: the crop side S the model expects.
        device: where the model runs (the module is moved there).
        dtype: compute precision (float32, float16 or bfloat16).
        batch_size: faces per forward call; halved on out-of-memory errors.
        channels_last: feed the model channels-last (NHWC) inputs; None: on. Faster
            convolutions on GPUs, and on the CPU oneDNN's NHWC kernels run GPEN-BFR-512 about
            1.3× (fp32) to 2× (bf16) faster than NCHW (README, Performance). The module itself
            is not converted: GPEN's modulated weights are 5-D, and it lays out its derived
            weights like its input.
        precision: how ``dtype`` was chosen (``build_restorer``), for the report.

    In fp16/bf16 the restorer keeps an fp32 copy of the module on the host, moved to the
    device the first time a face must be restored again in fp32. On the CPU it makes the
    process keep freed heap memory (``device.keep_freed_heap``): large activations then
    reuse pages instead of faulting fresh ones in every forward.

    Example:
        >>> restorer = Restorer(torch.nn.Identity(), 8)
        >>> restorer.restore_tensor(torch.full((2, 3, 8, 8), 0.25)).unique().tolist()
        [0.25]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
        channels_last: bool | None = None,
        precision: PrecisionChoice | None = None,
    ) -> None:
        self.size = size
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.channels_last = True if channels_last is None else channels_last
        if self.device.type == "cpu":
            keep_freed_heap()
        self.precision = precision if precision is not None else unchecked(dtype)
        self._fp32_master = copy.deepcopy(model).cpu() if dtype != torch.float32 else None
        self._fp32_model: torch.nn.Module | None = None
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.stats = RestoreStats()

    @torch.inference_mode()
    def restore_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Restore crops [N,3,S,S] float in [0, 1] on the device; returns float32 [N,3,S,S] in [0, 1]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"x must have shape (n, 3, {self.size}, {self.size}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor in [0, 1], got {x.dtype}")
        parts: list[torch.Tensor] = []

        def run(start: int, stop: int) -> None:
            signed = x[start:stop].float() * 2 - 1  # [N3SS] in [-1, 1]
            y = self._finite(self._model(signed.to(self.dtype)), signed)
            parts.append(((y.float() + 1) * 0.5).clamp_(0, 1))

        self._in_batches(len(x), run)
        return torch.cat(parts) if parts else torch.empty(x.shape, dtype=torch.float32, device=x.device)

    def _in_batches(self, n: int, run: Callable[[int, int], None]) -> None:
        """Call ``run(start, stop)`` over batches; halve the batch size on out-of-memory errors."""
        start = 0
        while start < n:
            stop = min(start + self.batch_size, n)
            try:
                run(start, stop)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                self.stats = replace(self.stats, oom_stepdowns=self.stats.oom_stepdowns + 1)
                log.warning("out of device memory; batch size lowered to %d", self.batch_size)
                torch.cuda.empty_cache()  # a no-op unless CUDA is in use
                continue
            self.stats = replace(self.stats, batches=self.stats.batches + 1)
            start = stop
        self.stats = replace(self.stats, faces=self.stats.faces + n)

    def _model(self, x: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = (model or self.model)(x)
        return y[0] if isinstance(y, tuple) else y

    def _finite(self, y: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """``y`` with every face whose output is not finite restored again in fp32 from
        ``signed`` (the batch's fp32 input in [-1, 1]); WeightsError if fp32 fails too."""
        bad = nonfinite_faces(y)
        if bad is None or not len(bad):
            return y
        if self._fp32_master is None:
            raise WeightsError(
                f"the restoring network gives non-finite output in fp32 for {len(bad)} of {len(y)} faces; "
                f"its weights are damaged: delete them and download them again, or pass another file"
            )
        if self._fp32_model is None:
            log.warning("%d of %d faces gave non-finite %s output; such faces are restored again in fp32",
                        len(bad), len(y), self.precision.used)
            self._fp32_model = self._fp32_master.to(self.device).eval()
        again = self._model(signed[bad], self._fp32_model)
        if nonfinite_faces(again) is not None:
            raise WeightsError(
                f"the restoring network gives non-finite output for {len(bad)} faces in {self.precision.used} "
                f"and in fp32; its weights are damaged: delete them and download them again, or pass another file"
            )
        y = y.float()
        y[bad] = again
        self.stats = replace(self.stats, fp32_reruns=self.stats.fp32_reruns + len(bad))
        return y


def build_restorer(
    model: torch.nn.Module,
    size: int,
    *,
    name: str,
    device: torch.device,
    precision: str = "auto",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Restorer:
    """A restorer for a GPEN module in fp32 whose half precision, if any, passed its check.

    ``precision`` (auto, fp32, fp16, bf16) resolves with ``device.resolve_dtype``; fp16/bf16
    then go through ``precision.choose_precision`` on the shipped check faces, which may fall
    back to bf16 or fp32 (one warning line; ``Restorer.precision`` says why).

    Args:
        model: the network in fp32, weights loaded (``weights.load_gpen``).
        size: its crop side S.
        name: the preset's name, for messages (``GPEN-BFR-512``).
        device: where it runs.
        precision: ``Config.precision``.
        batch_size: faces per call; None: ``default_batch_size(device, size, dtype)``.
        cache_dir: ``Config.cache_dir``; precision verdicts are cached under it.
    """
    choice = choose_precision(
        model, check_faces(size) * 2 - 1, resolve_dtype(precision, device),
        device=device, name=name, cache_dir=cache_dir,
    )
    return Restorer(model, size, device=device, dtype=choice.dtype,
                    batch_size=batch_size or default_batch_size(device, size, choice.dtype), precision=choice)


def fit_batch_size(
    *,
    free_bytes: int,
    per_face_bytes: int,
    frame_bytes: int,
    frames_held: Callable[[int], int],
    limit: int = 128,
    headroom: float = 0.8,
) -> int:
    """The largest power-of-two batch whose faces and held frames fit the free device memory.

    Picks the largest b = 2^k ≤ ``limit`` with
    ``b·per_face_bytes + frames_held(b)·frame_bytes ≤ headroom·free_bytes``; 1 when none fits
    (the out-of-memory step-down is then the last resort).

    Args:
        free_bytes: free device memory before the job (``device.free_memory``).
        per_face_bytes: device bytes one more face in a batch costs (``measure_face_bytes``).
        frame_bytes: device bytes one frame held between crop and paste costs
            (``Warp.held_bytes``; 0 when frames stay on the host).
        frames_held: frames the pipeline holds on the device at batch size b (the frames
            waiting to fill a batch plus those in the queues between stages).
        limit: largest batch considered. Higher: fewer calls, more latency and memory.
        headroom: share of the free memory to plan for. Lower: safer against fragmentation
            and other processes, smaller batches.

    >>> fit_batch_size(free_bytes=1000, per_face_bytes=100, frame_bytes=10, frames_held=lambda b: b + 4)
    4
    """
    if free_bytes < 0 or per_face_bytes <= 0 or frame_bytes < 0:
        raise ValueError(
            f"need free_bytes >= 0, per_face_bytes > 0, frame_bytes >= 0; got {free_bytes}, {per_face_bytes}, {frame_bytes}"
        )
    if limit < 1 or not 0.0 < headroom <= 1.0:
        raise ValueError(f"need limit >= 1 and headroom in (0, 1]; got {limit}, {headroom}")
    budget = headroom * free_bytes
    best, b = 1, 1
    while b <= limit:
        if b * per_face_bytes + frames_held(b) * frame_bytes <= budget:
            best = b
        b *= 2
    return best


def measure_face_bytes(restorer: Restorer) -> int:
    """Device bytes one more face in a batch costs, measured on CUDA with a batch of two.

    The model's peak working memory per face (after a warm-up, so cached weights are not
    counted) plus the face's float32 input crop, which waits on the device for its batch.
    """
    device = restorer.device
    if device.type != "cuda":
        raise ValueError(f"face memory is only measured on CUDA devices, not {device}")
    probe = torch.zeros((2, 3, restorer.size, restorer.size), device=device)
    saved_batch, saved_stats = restorer.batch_size, restorer.stats
    restorer.batch_size = 2
    try:
        restorer.restore_tensor(probe)  # warm-up: derived weights, cuDNN plans
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        restorer.restore_tensor(probe)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    finally:
        restorer.batch_size, restorer.stats = saved_batch, saved_stats
    return max(1, peak // 2) + probe[0].numel() * probe.element_size()


def fit_cuda_batch_size(
    restorer: Restorer,
    *,
    frame_bytes: int,
    frames_held: Callable[[int], int],
    limit: int = 128,
    headroom: float = 0.8,
) -> int:
    """``fit_batch_size`` with the per-face cost and the free memory measured on the restorer's
    CUDA device (the measuring forwards' cached blocks are released first)."""
    per_face = measure_face_bytes(restorer)
    torch.cuda.empty_cache()
    return fit_batch_size(
        free_bytes=free_memory(restorer.device),
        per_face_bytes=per_face,
        frame_bytes=frame_bytes,
        frames_held=frames_held,
        limit=limit,
        headroom=headroom,
    )


Item = TypeVar("Item")


def restored_in_batches(
    restorer: Restorer,
    items: Iterable[tuple[Item, bool]],
    crops: Callable[[Item], torch.Tensor | None],
    *,
    max_held: int,
    timed: Callable[[float], None] | None = None,
) -> Iterator[tuple[Item, torch.Tensor | None]]:
    """Restore the crops of consecutive items in whole batches, in order: each ``(item,
    flush_first)`` in, each item with its restored faces ([M,3,S,S], or None where
    ``crops(item)`` is None) out. A partial batch waits for more faces; it is run when
    ``max_held`` items wait behind it (so the stages after it do not stall), at the end, and
    before an item whose ``flush_first`` is true (a segment edge)."""
    held: list[Item] = []
    faces = 0

    def flush() -> Iterator[tuple[Item, torch.Tensor | None]]:
        nonlocal faces
        pixels = [c for c in map(crops, held) if c is not None]
        restored = None
        if pixels:
            start = perf_counter()
            restored = restorer.restore_tensor(torch.cat(pixels))
            if timed is not None:
                timed(perf_counter() - start)
        offset = 0
        for item in held:
            c = crops(item)
            if c is None:
                yield item, None
            else:
                yield item, restored[offset : offset + len(c)]
                offset += len(c)
        held.clear()
        faces = 0

    for item, flush_first in items:
        if held and flush_first:
            yield from flush()
        held.append(item)
        c = crops(item)
        faces += 0 if c is None else len(c)
        if faces >= restorer.batch_size or len(held) >= max_held:
            yield from flush()
    if held:
        yield from flush()
