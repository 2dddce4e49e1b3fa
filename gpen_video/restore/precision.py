"""The half-precision guard: a network runs in fp16/bf16 only after it has shown it can.

Trained StyleGAN2-style weights can overflow fp16 (NVIDIA's StyleGAN2-ADA runs only its
highest-resolution layers in fp16, with activations clamped); an overflow turns into NaN or
saturated crops that would be pasted onto every face. So whenever a network is loaded in half
precision, ``choose_precision`` runs one check batch of faces through it in that precision and
in fp32 and keeps the half precision only when every value is finite and the PSNR against fp32
is at least ``CHECK_PSNR_DB`` on every face. Otherwise it warns once, in one line, and the
network runs in the safe precision (``device.safe_dtype``: bf16 where the device computes it
natively, checked the same way, else fp32). The measurement is cached per weights hash, device
name, precision and torch version under ``<cache dir>/precision/``, so it costs once per machine.

After loading, ``nonfinite_faces`` is the per-batch guard: one reduction on the device tells
whether a batch's output is finite; only when it is not are the bad faces found and run again
in fp32 by the caller (``Restorer`` for GPEN).

The API is generic, for any ``nn.Module`` (GPEN, the face parser, upscaler networks): give it
the module in fp32, a check batch already in the network's input convention, the dtype, and
how to read its output.

Example (any module; ``forward`` and ``unit`` say how to run it and read its output):
    >>> net = torch.nn.Conv2d(3, 3, 1)
    >>> faces = check_faces(64) * 2 - 1                       # [2,3,64,64] in [-1, 1]
    >>> choice = choose_precision(net, faces, torch.bfloat16, device=torch.device("cpu"),
    ...                           name="conv", cache_dir=None, cache=False, unit=lambda y: y.sigmoid())
    >>> choice.used in ("bf16", "fp32")
    True
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.device import device_name, dtype_name, safe_dtype

log = logging.getLogger(__name__)

CHECK_PSNR_DB = 35.0
"""Least PSNR (dB, on [0, 1] images) of a half-precision output against fp32 on each check
face. 35 dB is an RMS error of 1.8 % (4.5 of 255 levels): well under the 52 dB that bf16 and
the 71 dB that fp16 measure on a working network (README, Precision), and far above what an
overflow gives (NaN, or saturated crops near 10 dB). Higher: half precision is refused for
smaller differences; lower: visible differences pass."""

CHECK_FACES = Path(__file__).with_name("data") / "check_faces.png"
"""Two aligned 256×256 faces side by side (``samples/make_check_faces.py``): scikit-image's
astronaut sharp and degraded. Shipped, so the check needs no job input and gives the same
verdict for every job (the precision is part of a job's identity, fixed before it starts)."""

Forward = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
Unit = Callable[[torch.Tensor], torch.Tensor]


def first_output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, or its first item when it returns a tuple (GPEN, the parser)."""
    y = module(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def signed_unit(y: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (GPEN's output) as float32 in [0, 1]."""
    return ((y.float() + 1) * 0.5).clamp(0, 1)


@lru_cache(maxsize=1)
def _check_strip() -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(CHECK_FACES), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"the precision check faces {CHECK_FACES} are missing; reinstall gpen-video")
    return np.ascontiguousarray(bgr[..., ::-1])


def check_faces(size: int) -> torch.Tensor:
    """The shipped check faces as [2,3,size,size] float32 RGB in [0, 1] (resized with antialiasing)."""
    strip = torch.from_numpy(_check_strip().copy()).permute(2, 0, 1).float() / 255  # [3,256,512]
    faces = torch.stack(strip.chunk(2, dim=2))  # [2,3,256,256]
    if size != faces.shape[-1]:
        faces = F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return faces.clamp(0, 1)


def module_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 of modules' classes, parameter names, shapes, dtypes and values, in order: what
    makes their outputs differ (precision-check caches, a job's identity)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(type(module).__qualname__.encode())
        for name, tensor in module.state_dict().items():
            values = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {values.dtype} {tuple(tensor.shape)}".encode())
            digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def nonfinite_faces(y: torch.Tensor) -> torch.Tensor | None:
    """None when every value of ``y`` [N,...] is finite, else the indices (on ``y``'s device)
    of the rows that are not.

    The common case costs one reduction on the device (a float32 sum is finite exactly when
    no value is inf or NaN, unless finite values add up past 3.4e38) and one scalar read.
    """
    if bool(torch.isfinite(torch.sum(y, dtype=torch.float32))):
        return None
    bad = ~torch.isfinite(y.reshape(len(y), -1)).all(dim=1)
    return bad.nonzero().squeeze(1)


@dataclass(frozen=True)
class PrecisionCheck:
    """One measurement: a network in ``dtype`` against itself in fp32 on the check faces.

    Attributes:
        dtype: fp16 or bf16.
        finite: every output value was finite.
        psnr_db: the worst face's PSNR against fp32 (inf when equal; NaN when not finite).
        cached: read from the cache, not measured now.
    """

    dtype: str
    finite: bool
    psnr_db: float
    cached: bool = False

    def passed(self, threshold: float = CHECK_PSNR_DB) -> bool:
        return self.finite and self.psnr_db >= threshold

    def why(self, threshold: float = CHECK_PSNR_DB) -> str:
        """The verdict in a few words."""
        if not self.finite:
            return "non-finite output"
        relation = "≥" if self.psnr_db >= threshold else "<"
        return f"{self.psnr_db:.1f} dB against fp32 ({relation} {threshold:g} dB)"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a network runs in, and why.

    Attributes:
        requested: what ``--precision`` resolved to (fp32, fp16 or bf16).
        used: what the network runs in.
        reason: one sentence (for the report).
        checks: the measurements made or read, in order tried.
    """

    requested: str
    used: str
    reason: str
    checks: tuple[PrecisionCheck, ...] = field(default=())

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.used]

    def as_report(self) -> dict[str, Any]:
        """The report's ``precision`` entry."""
        return {"requested": self.requested, "used": self.used, "reason": self.reason,
                "checks": [{k: v for k, v in asdict(c).items() if k != "cached"} | {"psnr_db": _json_db(c.psnr_db)}
                           for c in self.checks]}


def _json_db(value: float) -> float | str | None:
    return None if math.isnan(value) else "inf" if math.isinf(value) else round(value, 2)


def unchecked(dtype: torch.dtype, reason: str = "") -> PrecisionChoice:
    """The record of a network run in ``dtype`` without a check (fp32, or a caller's choice)."""
    name = dtype_name(dtype)
    if not reason:
        reason = "fp32 needs no precision check" if name == "fp32" else f"{name} without a precision check"
    return PrecisionChoice(name, name, reason)


def _run(module: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype, device: torch.device,
         forward: Forward) -> torch.Tensor:
    """``forward`` of a copy of ``module`` in ``dtype`` on ``device``; the module is not changed."""
    work = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        y = forward(work, batch.to(device=device, dtype=dtype))
        return y.float().cpu()


def measure(module: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype, *, device: torch.device,
            forward: Forward = first_output, unit: Unit = signed_unit,
            reference: torch.Tensor | None = None) -> PrecisionCheck:
    """Run ``batch`` through ``module`` in ``dtype`` and fp32 and compare (``reference``: the
    fp32 output, when already computed)."""
    if reference is None:
        reference = _run(module, batch, torch.float32, device, forward)
    y = _run(module, batch, dtype, device, forward)
    if not bool(torch.isfinite(y).all()):
        return PrecisionCheck(dtype_name(dtype), False, math.nan)
    a, b = unit(y).double(), unit(reference).double()
    mse = (a - b).square().reshape(len(a), -1).mean(dim=1).max().item()
    return PrecisionCheck(dtype_name(dtype), True, math.inf if mse == 0 else 10 * math.log10(1.0 / mse))


class VerdictCache:
    """Measurements kept as small JSON files, one per (weights, device, precision, torch, check faces).

    Args:
        folder: where they live (``<cache dir>/precision``); None keeps nothing.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    @staticmethod
    def key(weights: str, device: str, dtype: str) -> str:
        check = hashlib.sha256(CHECK_FACES.read_bytes()).hexdigest()
        text = f"{weights}|{device}|{dtype}|torch {torch.__version__}|{check}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> PrecisionCheck | None:
        if self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            psnr = data["psnr_db"]
            return PrecisionCheck(str(data["dtype"]), bool(data["finite"]),
                                  math.nan if psnr is None else math.inf if psnr == "inf" else float(psnr), cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, check: PrecisionCheck, about: dict[str, str]) -> None:
        if self.folder is None:
            return
        from gpen_video.io.files import write_atomic

        record = {"dtype": check.dtype, "finite": check.finite, "psnr_db": _json_db(check.psnr_db), **about}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / f"{key}.json", (json.dumps(record, indent=1) + "\n").encode("utf-8"))
        except OSError as exc:  # a read-only cache only costs the check again next time
            log.debug("precision verdict not cached in %s: %s", self.folder, exc)


def verdict_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``<cache dir>/precision``, the cache dir being the weights' (``Config.cache_dir``, else
    ``weights.default_cache_dir()``)."""
    from gpen_video.restore.weights import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "precision"


def choose_precision(
    module: torch.nn.Module,
    batch: torch.Tensor,
    dtype: torch.dtype,
    *,
    device: torch.device,
    name: str,
    cache_dir: str | os.PathLike[str] | None,
    forward: Forward = first_output,
    unit: Unit = signed_unit,
    threshold: float = CHECK_PSNR_DB,
    safe: torch.dtype | None = None,
    cache: bool = True,
) -> PrecisionChoice:
    """The precision ``module`` may run in on ``device``, given the one asked for.

    fp32 is returned as it is. For fp16/bf16 the check batch runs in that precision and in
    fp32 (on copies; ``module`` is not changed) unless the cache knows the result; a failure
    tries the safe precision the same way, then fp32, and logs one warning line.

    Args:
        module: the network in fp32 (weights as loaded), on any device.
        batch: the check input [N,...] float32 in the network's input convention (GPEN:
            ``check_faces(size) * 2 - 1``).
        dtype: the precision asked for.
        device: where the network will run.
        name: the network's name, for the warning (``GPEN-BFR-512``).
        cache_dir: the weights cache folder (None: the default); verdicts go to its
            ``precision/`` subfolder.
        forward: runs the module on a batch and returns the output tensor to check.
        unit: maps that output to float32 images in [0, 1] for the PSNR.
        threshold: least PSNR (dB) on every check item.
        safe: the fallback before fp32 (default ``device.safe_dtype(device)``).
        cache: read and write cached verdicts.
    Returns:
        A ``PrecisionChoice``; its ``dtype`` is what to load the network in.
    """
    requested = dtype_name(dtype)
    if dtype == torch.float32:
        return unchecked(dtype)
    device = torch.device(device)
    safe = safe_dtype(device) if safe is None else safe
    candidates = [dtype] + ([safe] if safe not in (dtype, torch.float32) else [])
    verdicts = VerdictCache(verdict_folder(cache_dir) if cache else None)
    weights = module_digest(module)
    where = device_name(device)
    reference: torch.Tensor | None = None
    checks: list[PrecisionCheck] = []
    for candidate in candidates:
        key = VerdictCache.key(weights, where, dtype_name(candidate))
        check = verdicts.get(key)
        if check is None:
            if reference is None:
                reference = _run(module, batch, torch.float32, device, forward)
            check = measure(module, batch, candidate, device=device, forward=forward, unit=unit, reference=reference)
            verdicts.put(key, check, {"network": name, "device": where, "torch": torch.__version__})
        checks.append(check)
        if check.passed(threshold):
            break
    chosen = next((c.dtype for c in checks if c.passed(threshold)), "fp32")
    first = checks[0]
    if chosen == requested:
        reason = f"{requested} passed the precision check ({first.why(threshold)} on the check faces)"
    else:
        tried = "; ".join(f"{c.dtype}: {c.why(threshold)}" for c in checks)
        reason = f"{requested} failed the precision check on {where} ({tried}); running in {chosen}"
        log.warning("%s: %s", name, reason)
    return PrecisionChoice(requested, chosen, reason, tuple(checks))
