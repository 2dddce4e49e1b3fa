"""Batched GPEN inference on aligned face crops.

Crops arrive as (N, S, S, 3) RGB arrays (uint8 or uint16) and leave the same way. The
restorer owns device placement, precision and batch size; on CUDA it steps the batch size
down when memory runs out instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


log = logging.getLogger(__name__)

def default_batch_size(device: torch.device) -> int:
    """CPU: 1, measured fastest per face on 2-core machines; CUDA: chosen by ``fit_batch_size``."""
    return 1 if device.type == "cpu" else 16


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class RestoreStats:
    faces: int = 0
    batches: int = 0
    oom_stepdowns: int = 0


class Restorer:
    """Runs a GPEN module on batches of crops.

    Args:
        model: a module mapping [N,3,S,S] RGB in [-1, 1] to the same.
        size: the crop side S the model expects.
        device: where the model runs (the module is moved there).
        dtype: compute precision.
        batch_size: faces per forward call; halved on CUDA out-of-memory errors.
        channels_last: use the channels-last memory format (faster convolutions on GPUs).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        size: int,
        *,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
        channels_last: bool | None = None,
    ) -> None:
        self.size = size
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(device=device, dtype=dtype, memory_format=fmt).eval()
        self.stats = RestoreStats()

    @torch.inference_mode()
    def restore(self, crops: np.ndarray) -> np.ndarray:
        """Restore (N, S, S, 3) RGB crops; returns an array of the same shape and dtype."""
        if crops.ndim != 4 or crops.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"crops must have shape (n, {self.size}, {self.size}, 3), got {crops.shape}")
        out = np.empty_like(crops)

        def run(start: int, stop: int) -> None:
            out[start:stop] = self._forward(crops[start:stop])

        self._in_batches(len(crops), run)
        return out

    @torch.inference_mode()
    def restore_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a float tensor [N,3,S,S] in [0, 1] already on the device (GPU path)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"x must have shape (n, 3, {self.size}, {self.size}), got {tuple(x.shape)}")
        parts: list[torch.Tensor] = []

        def run(start: int, stop: int) -> None:
            y = self._model(x[start:stop].to(self.dtype) * 2 - 1)
            parts.append(((y.float() + 1) * 0.5).clamp_(0, 1))

        self._in_batches(len(x), run)
        return torch.cat(parts) if parts else x.new_empty(x.shape)

    def _in_batches(self, n: int, run: Callable[[int, int], None]) -> None:
        """Call ``run(start, stop)`` over batches; halve the batch size on out-of-memory errors."""
        start = 0
        while start < n:
            stop = min(start + self.batch_size, n)
            try:
                run(start, stop)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                self.stats.oom_stepdowns += 1
                log.warning("out of GPU memory; batch size lowered to %d", self.batch_size)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            self.stats.batches += 1
            start = stop
        self.stats.faces += n

    def _model(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(self._prepare(x))
        return y[0] if isinstance(y, tuple) else y

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        scale = float(np.iinfo(crops.dtype).max)
        host = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)  # [NCHW]
        if self.device.type == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True).to(self.dtype) * (2 / scale) - 1
        y = ((self._model(x).float() + 1) * (scale / 2)).round_().clamp_(0, scale)
        return y.permute(0, 2, 3, 1).cpu().numpy().astype(crops.dtype)  # [NHWC]


def fit_batch_size(restorer: Restorer, *, limit: int = 128, headroom: float = 0.8) -> int:
    """Largest batch that fits the device's free memory, measured with a batch of one.

    Runs one face, reads the peak memory it took, and divides the free memory by it. On the
    CPU returns the restorer's current batch size.
    """
    if restorer.device.type != "cuda":
        return restorer.batch_size
    torch.cuda.synchronize(restorer.device)
    torch.cuda.reset_peak_memory_stats(restorer.device)
    base = torch.cuda.memory_allocated(restorer.device)
    probe = np.zeros((2, restorer.size, restorer.size, 3), np.uint8)
    saved, restorer.batch_size = restorer.batch_size, 2
    restorer.restore(probe)
    restorer.batch_size = saved
    per_face = max(1, (torch.cuda.max_memory_allocated(restorer.device) - base) // 2)
    free, _ = torch.cuda.mem_get_info(restorer.device)
    fitted = int(max(1, min(limit, free * headroom // per_face)))
    return 1 << (fitted.bit_length() - 1)
