"""Face-parsing blend masks (``--mask parse``): only the face's own pixels are blended.

GPEN's parser (``ParseNet-latest.pth``, PSFRGAN's network; facexlib has the same layout) labels
every pixel of a restored crop; ``warp.masks.labels_to_mask`` keeps the face labels and
softens the border like the plain mask. The parser runs in fp32 unless asked otherwise; in
fp16/bf16 it is checked against fp32 at load like GPEN (``restore.precision``), and faces whose
logits are not finite are parsed again in fp32.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpen_video.errors import WeightsError
from gpen_video.restore.precision import check_faces, choose_precision, nonfinite_faces, unchecked
from gpen_video.warp.masks import labels_to_mask

log = logging.getLogger(__name__)

PARSE_SIZE = 512
"""Input side of the face parser (its checkpoint is built for 512×512)."""


def parse_net() -> torch.nn.Module:
    """GPEN's ``ParseNet-latest`` architecture with random weights: maps [N,3,L,L] in [−1, 1]
    to (logits [N,19,L,L], image)."""
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(
        in_size=PARSE_SIZE,
        out_size=PARSE_SIZE,
        min_feat_size=32,
        base_ch=64,
        parsing_ch=19,
        res_depth=10,
        relu_type="LeakyReLU",
        norm_type="bn",
        ch_range=[32, 256],
    )


@dataclass
class ParseStats:
    crops: int = 0
    batches: int = 0
    fp32_reruns: int = 0


def parser_logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The parser's logits [N,19,L,L] for input [N,3,L,L] in [-1, 1]."""
    return net(x)[0]


def parser_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities in [0, 1]: what the precision check compares against fp32."""
    return logits.float().softmax(dim=1)


class ParsingMasker:
    """Blend masks from GPEN's face parser for restored crops.

    Against the plain feathered square it keeps hair, background and collars from being
    replaced; it costs one parser pass per face (469 GFLOP at 512, more than GPEN-BFR-512's
    276) and a weights download.

    Args:
        path: a local ``ParseNet-latest.pth``; when None the weights are resolved (and
            downloaded unless ``offline``) through ``gpen_video.restore.weights``.
        device: where the parser runs.
        cache_dir: weights cache directory (None: the default).
        offline: never download.
        mirror: fetch from this server instead of the official address.
        progress: show a download progress bar.
        batch_size: crops per parser call. Higher: faster on GPUs, more memory.
        input_size: side the crops are resized to for the parser (fully convolutional). It
            was trained at 512; smaller is quadratically faster and coarser.
        dtype: compute precision; fp16/bf16 are checked against fp32 first and may fall back.

    Example::

        masker = ParsingMasker(path="ParseNet-latest.pth")
        masks = masker.masks(restored)  # [M,3,S,S] in [0, 1] → (M, S, S)
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        offline: bool = False,
        mirror: str | None = None,
        progress: bool = False,
        batch_size: int = 4,
        input_size: int = PARSE_SIZE,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from gpen_video.restore.weights import resolve_weights

        file = Path(
            resolve_weights(
                "ParseNet", path=path, cache_dir=cache_dir, offline=offline, progress=progress, mirror=mirror
            )
        )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(
                f"face parser weights {file} cannot be read ({exc}); delete the file and download it again"
            ) from None
        net = parse_net()
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise WeightsError(
                f"{file} is not a ParseNet-latest checkpoint ({first}); pass the parser from GPEN's weights"
            ) from None
        self._setup(net, device, batch_size, input_size, dtype, cache_dir)
        log.info("face parser loaded from %s", file)

    @classmethod
    def from_network(
        cls,
        net: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        input_size: int = PARSE_SIZE,
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> ParsingMasker:
        """A masker around a ready module mapping [N,3,L,L] in [−1, 1] to (logits [N,19,L,L], …)."""
        masker = cls.__new__(cls)
        masker._setup(net, device, batch_size, input_size, dtype, cache_dir)
        return masker

    def _setup(self, net: torch.nn.Module, device: str | torch.device, batch_size: int, input_size: int,
               dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if input_size < 32 or input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {input_size}")
        self.input_size = input_size
        self.device = torch.device(device)
        net = net.float().eval()
        self.precision = unchecked(dtype) if dtype == torch.float32 else choose_precision(
            net, check_faces(input_size) * 2 - 1, dtype, device=self.device, name="face parser",
            cache_dir=cache_dir, forward=parser_logits, unit=parser_probabilities,
        )
        self.dtype = self.precision.dtype
        self._fp32_master = copy.deepcopy(net).cpu() if self.dtype != torch.float32 else None
        self._fp32_net: torch.nn.Module | None = None
        self.net = net.to(device=self.device, dtype=self.dtype)
        self.batch_size = batch_size
        self.stats = ParseStats()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N,19,L,L] of input [N,3,L,L] float32 in [-1, 1]; faces whose half-precision
        logits are not finite are parsed again in fp32."""
        logits = parser_logits(self.net, x.to(self.dtype))
        bad = nonfinite_faces(logits)
        if bad is None or not len(bad):
            return logits
        if self._fp32_master is None:
            raise WeightsError("the face parser gives non-finite output in fp32; its weights are damaged: "
                               "delete ParseNet-latest.pth and download it again")
        if self._fp32_net is None:
            self._fp32_net = self._fp32_master.to(self.device).eval()
        logits = logits.float()
        logits[bad] = parser_logits(self._fp32_net, x[bad])
        self.stats.fp32_reruns += len(bad)
        return logits

    @torch.inference_mode()
    def labels(self, restored: torch.Tensor) -> np.ndarray:
        """Parser labels (M, L, L) uint8, L = ``input_size``, for [M,3,S,S] RGB crops in [0, 1]."""
        if restored.ndim != 4 or restored.shape[1] != 3:
            raise ValueError(f"restored must have shape (M, 3, S, S), got {tuple(restored.shape)}")
        side = self.input_size
        out = np.empty((len(restored), side, side), np.uint8)
        for start in range(0, len(restored), self.batch_size):
            x = restored[start : start + self.batch_size].to(self.device).float() * 2.0 - 1.0  # [N3SS]
            if x.shape[-1] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            logits = self._logits(x)  # [N,19,L,L]
            out[start : start + len(x)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            self.stats.batches += 1
        self.stats.crops += len(restored)
        return out

    def masks(self, restored: torch.Tensor) -> np.ndarray:
        """Blend masks (M, S, S) float32 in [0, 1] for restored crops [M,3,S,S] in [0, 1]."""
        size = restored.shape[-1]
        out = np.empty((len(restored), size, size), np.float32)
        for i, labels in enumerate(self.labels(restored)):
            out[i] = labels_to_mask(labels, size)
        return out
