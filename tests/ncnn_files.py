"""Write Real-ESRGAN networks as ncnn ``.param``/``.bin`` pairs, in the layout ncnn itself reads.

The writer is independent of ``gpen_video.upscale.ncnn``'s reader: it emits the same layer
graph as the shipped files (Split layers for blobs used twice, fused leaky ReLU in
Convolution, Eltwise with coefficients, Interp, PixelShuffle), so ncnn can run what it writes
and tests can compare ncnn's output with ours.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from gpen_video.upscale.networks import RRDBConfig, SRVGGConfig

FP16_TAG = 0x01306B47
LRELU = "9=2 -23310=1,2.000000e-01"


class _Graph:
    def __init__(self) -> None:
        self.layers: list[tuple[str, str, list[str], list[str], str]] = []
        self.blobs: list[bytes] = []
        self.n = 0

    def add(self, kind: str, inputs: list[str], params: str = "", output: str | None = None) -> str:
        self.n += 1
        out = output or f"b{self.n}"
        self.layers.append((kind, f"{kind}_{self.n}", inputs, [out], params))
        return out

    def conv(self, x: str, weight: torch.Tensor, bias: torch.Tensor, act: str = "", fp16: bool = True,
             output: str | None = None) -> str:
        w = weight.detach().numpy().astype(np.float32)
        if fp16:
            data = w.astype("<f2").tobytes()
            self.blobs.append(struct.pack("<I", FP16_TAG) + data + b"\0" * ((-len(data)) % 4))
        else:
            self.blobs.append(struct.pack("<I", 0) + w.astype("<f4").tobytes())
        self.blobs.append(bias.detach().numpy().astype("<f4").tobytes())
        params = f"0={w.shape[0]} 1=3 4=1 5=1 6={w.size} {act}".strip()
        return self.add("Convolution", [x], params, output)

    def prelu(self, x: str, slope: torch.Tensor) -> str:
        self.blobs.append(slope.detach().numpy().astype("<f4").tobytes())
        return self.add("PReLU", [x], f"0={slope.numel()}")

    def write(self, param: Path, bin_path: Path | None = None) -> None:
        uses = Counter(b for _, _, inputs, _, _ in self.layers for b in inputs)
        lines, seen = [], Counter()
        for kind, name, inputs, outputs, params in self.layers:
            renamed = []
            for b in inputs:
                if uses[b] > 1:
                    renamed.append(f"{b}_splitncnn_{seen[b]}")
                    seen[b] += 1
                else:
                    renamed.append(b)
            lines.append((kind, name, renamed, outputs, params))
            for b in outputs:
                if uses[b] > 1:
                    splits = [f"{b}_splitncnn_{i}" for i in range(uses[b])]
                    lines.append(("Split", f"split_{b}", [b], splits, ""))
        blob_count = len({b for _, _, ins, outs, _ in lines for b in ins + outs})
        text = ["7767517", f"{len(lines)} {blob_count}"]
        for kind, name, ins, outs, params in lines:
            text.append(f"{kind:<24} {name:<24} {len(ins)} {len(outs)} {' '.join(ins + outs)} {params}".rstrip())
        param.write_text("\n".join(text) + "\n")
        (bin_path or param.with_suffix(".bin")).write_bytes(b"".join(self.blobs))


def write_srvgg(state: dict[str, torch.Tensor], config: SRVGGConfig, param: Path, *, fp16: bool = True,
                output_factor: float = 1.0) -> None:
    """An SRVGGNetCompact as the shipped realesr-animevideov3 files are laid out."""
    g = _Graph()
    x = g.add("Input", [], "0=0", output="data")
    h = x
    for i in range(config.num_conv + 1):
        h = g.conv(h, state[f"body.{2 * i}.weight"], state[f"body.{2 * i}.bias"], fp16=fp16)
        h = g.prelu(h, state[f"body.{2 * i + 1}.weight"])
    last = 2 * config.num_conv + 2
    h = g.conv(h, state[f"body.{last}.weight"], state[f"body.{last}.bias"], fp16=fp16)
    h = g.add("PixelShuffle", [h], f"0={config.scale}")
    s = float(config.scale)
    base = g.add("Interp", [x], f"0=1 1={s:e} 2={s:e}")
    if output_factor == 1.0:
        g.add("BinaryOp", [h, base], "0=0", output="output")
    else:
        y = g.add("BinaryOp", [h, base], "0=0")
        g.add("Interp", [y], f"0=3 1={output_factor:e} 2={output_factor:e}", output="output")
    g.write(param)


def write_rrdb(state: dict[str, torch.Tensor], config: RRDBConfig, param: Path, *, fp16: bool = True) -> None:
    """An x4 RRDBNet as the shipped realesrgan-x4plus files are laid out."""
    assert config.scale == 4
    g = _Graph()

    def conv(x: str, name: str, act: str = "", output: str | None = None) -> str:
        return g.conv(x, state[f"{name}.weight"], state[f"{name}.bias"], act, fp16, output)

    x = g.add("Input", [], "0=0", output="data")
    first = conv(x, "conv_first")
    h = first
    for b in range(config.num_block):
        block_in = h
        for r in (1, 2, 3):
            rdb_in, feats = h, [h]
            for i in range(1, 5):
                cat = feats[0] if len(feats) == 1 else g.add("Concat", list(feats))
                feats.append(conv(cat, f"body.{b}.rdb{r}.conv{i}", LRELU))
            c5 = conv(g.add("Concat", list(feats)), f"body.{b}.rdb{r}.conv5")
            h = g.add("Eltwise", [c5, rdb_in], "0=1 -23301=2,2.000000e-01,1.000000e+00")
        h = g.add("Eltwise", [h, block_in], "0=1 -23301=2,2.000000e-01,1.000000e+00")
    h = g.add("BinaryOp", [first, conv(h, "conv_body")], "0=0")
    for name in ("conv_up1", "conv_up2"):
        h = conv(g.add("Interp", [h], "0=1 1=2.000000e+00 2=2.000000e+00"), name, LRELU)
    h = conv(h, "conv_hr", LRELU)
    conv(h, "conv_last", output="output")
    g.write(param)


def random_state(config: RRDBConfig | SRVGGConfig, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights in the official layout; PReLU slopes around 0.2 as trained ones are."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in config.layout().items():
        value = torch.randn(shape, generator=gen) * std
        if len(shape) == 1 and key.endswith(".weight"):
            value = 0.2 + value
        state[key] = value
    return state


def run_ncnn(param: Path, rgb: np.ndarray, bin_path: Path | None = None) -> np.ndarray:
    """ncnn's fp32 CPU output [3, H', W'] for uint8 RGB [H, W, 3] scaled to [0, 1]."""
    import ncnn

    net = ncnn.Net()
    for option in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed",
                   "use_bf16_storage"):
        setattr(net.opt, option, False)
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0
    assert net.load_model(str(bin_path or param.with_suffix(".bin"))) == 0
    h, w = rgb.shape[:2]
    mat = ncnn.Mat.from_pixels(np.ascontiguousarray(rgb), ncnn.Mat.PixelType.PIXEL_RGB, w, h)
    mat.substract_mean_normalize([0.0, 0.0, 0.0], [1 / 255.0] * 3)
    ex = net.create_extractor()
    ex.input("data", mat)
    status, out = ex.extract("output")
    assert status == 0
    return np.array(out)
