"""GPEN, the GAN-prior face restoration network (Yang et al., CVPR 2021), in plain PyTorch.

Parameter and buffer names equal the official checkpoints', so released files load with
``load_state_dict(..., strict=True)`` and no renaming. The modulated convolution runs in a
batched form by default: each layer either folds the style, demodulation, gain and bias into
one per-sample weight (when that weight is smaller than the activations, e.g. batch 1 at high
resolution) or scales the activations by the style and the output by the rest (large batches),
and writes bias + leaky ReLU straight into the concatenation with the encoder feature. The
original grouped-convolution form, unfused, stays beside it as the reference
(``modconv="grouped"``). On the CPU the stride-2 transposed convolutions run as polyphase 2x2
convolutions (``polyphase_weight``): up to twice as fast in oneDNN, never slower (measured).
All resampling is upfirdn2d written with ordinary torch ops, so the network runs wherever
torch does.

Shape letters: N batch, C/I input channels, O output channels, H/W height/width, k kernel
size, S style dimension.

Example:
    >>> model = GPEN.from_preset("GPEN-BFR-256").eval()
    >>> with torch.inference_mode():
    ...     restored = model(torch.zeros(1, 3, 256, 256))  # RGB in [-1, 1]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

ModConv = Literal["batched", "grouped"]

_SQRT2 = math.sqrt(2.0)
_BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
_HALF_TYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one GPEN network (all released presets concatenate encoder features)."""

    size: int                    # face crop side in pixels, a power of two >= 8
    style_dim: int = 512         # latent width of the mapping network
    n_mlp: int = 8               # layers of the mapping network
    channel_multiplier: int = 2  # widens layers at 64 px and above
    narrow: float = 1.0          # scales every channel count (0.5 for GPEN-BFR-256)

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {self.size}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    def channels(self, resolution: int) -> int:
        """Channel count of the feature maps at ``resolution`` (the official table)."""
        cm, n = self.channel_multiplier, self.narrow
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm,
                 256: 64 * cm, 512: 32 * cm, 1024: 16 * cm, 2048: 8 * cm}
        return int(table[resolution] * n)


PRESET_CONFIGS: dict[str, ModelConfig] = {
    "GPEN-BFR-256": ModelConfig(size=256, channel_multiplier=1, narrow=0.5),
    "GPEN-BFR-512": ModelConfig(size=512, channel_multiplier=2, narrow=1.0),
    "GPEN-BFR-1024": ModelConfig(size=1024, channel_multiplier=2, narrow=1.0),
    "GPEN-BFR-2048": ModelConfig(size=2048, channel_multiplier=2, narrow=1.0),
}


def assert_shape(name: str, tensor: torch.Tensor, shape: Sequence[int | None]) -> None:
    """Raise ValueError unless ``tensor`` has ``shape`` (None matches any size)."""
    actual = tuple(tensor.shape)
    if len(actual) != len(shape) or any(e is not None and e != a for e, a in zip(shape, actual)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {actual}")


# --------------------------------------------------------------------------- resampling


def blur_kernel(factor: int = 1) -> torch.Tensor:
    """Outer product of [1, 3, 3, 1], normalised to sum 1, times ``factor**2``."""
    k = torch.tensor(_BLUR_TAPS)
    k = k[None, :] * k[:, None]
    return k / k.sum() * factor**2


def upfirdn2d(
    x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative crops), convolve with ``kernel``, decimate.

    The same ``up``, ``down`` and ``pad`` (before, after) apply to both spatial axes; each
    channel is filtered on its own. Output side: ``(H*up + pad0 + pad1 - kh) // down + 1``.
    """
    n, c, h, w = x.shape  # [NCHW]
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    p0, p1 = pad
    if p0 or p1:
        x = F.pad(x, [p0, p1, p0, p1])
    kh, kw = kernel.shape
    taps = kernel.flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, kh, kw)  # [C1kk]
    x = F.conv2d(x, taps, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


class _Derived(nn.Module):
    """Base for modules that memoise tensors derived from their parameters.

    Inference repeats the same weight scaling every call; the memo keeps the result keyed on
    each source's version counter, storage, dtype and device, so ``load_state_dict``,
    ``.to()``, ``.half()`` or an optimizer step invalidate it. While autograd records (grad
    enabled and a source requires grad) nothing is memoised. After editing parameters
    through ``.data`` call ``GPEN.clear_cache()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    def _derive(
        self, name: str, sources: Sequence[torch.Tensor], make: Callable[[], torch.Tensor], *key: Any
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            return make()
        try:
            full_key = tuple((s._version, s.data_ptr(), s.dtype, s.device) for s in sources) + key
        except RuntimeError:  # inference tensors carry no version counter
            return make()
        hit = self._memo.get(name)
        if hit is not None and hit[0] == full_key:
            return hit[1]
        value = make()
        self._memo[name] = (full_key, value)
        return value

    def _clear_memo(self) -> None:
        self._memo.clear()


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Blur(nn.Module):
    """Low-pass [1,3,3,1]² filter with padding; ``factor`` compensates a preceding upsampling."""

    def __init__(self, pad: tuple[int, int], factor: int = 1) -> None:
        super().__init__()
        self.register_buffer("kernel", blur_kernel(factor))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)

    def padded(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(x) + bias[c]`` with the (symmetric) padding done by the convolution itself."""
        p0, p1 = self.pad
        if p0 != p1:
            out = self(x)
            return out if bias is None else out.add_(bias.to(out.dtype).view(1, -1, 1, 1))
        c = x.shape[1]
        taps = self.kernel.flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, *self.kernel.shape)  # [C1kk]
        b = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, taps.contiguous(memory_format=_layout_of(x)), b, padding=p0, groups=c)


class Upsample(nn.Module):
    """2x upsampling by zero insertion and the blur filter (ToRGB's skip path)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.register_buffer("kernel", blur_kernel(factor))
        p = len(_BLUR_TAPS) - factor
        self.factor = factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


# --------------------------------------------------------------------------- layers


class PixelNorm(nn.Module):
    """Normalise each latent to unit root mean square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


def _bias_lrelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """sqrt(2) * leaky_relu(x + bias, 0.2), bias over dim 1; in place when autograd is off."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    b = bias.to(x.dtype).view(shape)
    if torch.is_grad_enabled():
        return F.leaky_relu(x + b, 0.2) * _SQRT2
    return F.leaky_relu(x.add(b), 0.2, inplace=True).mul_(_SQRT2)


def lrelu_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out = leaky_relu(x, 0.2)``, written into ``out`` (e.g. a slice of a concatenation)."""
    return torch.ops.aten.leaky_relu.out(x, 0.2, out=out)


def affine_lrelu_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``out = leaky_relu(x * scale + bias, 0.2)`` in two passes over ``out``, no temporary.

    ``scale`` and ``bias`` broadcast against ``x``. With ``scale = sqrt(2)·a`` and
    ``bias = sqrt(2)·b`` this is ``sqrt(2)·leaky_relu(x·a + b)``: the leaky ReLU is positively
    homogeneous, so the gain folds into its input.
    """
    torch.addcmul(bias, x, scale, out=out)
    return F.leaky_relu(out, 0.2, inplace=True)


class FusedLeakyReLU(nn.Module):
    """Bias, leaky ReLU (slope 0.2), gain sqrt(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bias_lrelu(x, self.bias)


class EqualLinear(_Derived):
    """Linear layer with equalised learning rate: weight used as ``weight * lr_mul / sqrt(in)``."""

    def __init__(
        self,
        in_dim: int,            # input features
        out_dim: int,           # output features
        bias_init: float = 0.0,  # initial bias (1 for style modulations)
        lr_mul: float = 1.0,    # learning-rate multiplier (0.01 in the mapping network)
        activation: bool = False,  # fused leaky ReLU after the bias
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._derive("w", [self.weight], lambda: (self.weight * self.scale).to(x.dtype), x.dtype)
        b = self._derive("b", [self.bias], lambda: (self.bias * self.lr_mul).to(x.dtype), x.dtype)
        if self.activation:
            return _bias_lrelu(F.linear(x, w), b)
        return F.linear(x, w, b)


class EqualConv2d(_Derived):
    """Convolution with equalised learning rate: weight used as ``weight / sqrt(in * k * k)``."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = _layout_of(x)
        w = self._derive(
            "w", [self.weight],
            lambda: (self.weight * self.scale).to(x.dtype).contiguous(memory_format=fmt),
            x.dtype, fmt,
        )  # [OIkk]
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, b, stride=self.stride, padding=self.padding)


class ConvLayer(nn.Sequential):
    """Encoder layer: [Blur] → EqualConv2d (stride 2 when downsampling) → FusedLeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False) -> None:
        layers: list[nn.Module] = []
        if downsample:
            p = (len(_BLUR_TAPS) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False))
        layers.append(FusedLeakyReLU(out_ch))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The blur's padding inside its convolution, sqrt(2) and the bias inside the
        # main convolution, then one in-place leaky ReLU.
        *blur, conv, act = self
        if blur:
            x = blur[0].padded(x)
        fmt = _layout_of(x)
        w = conv._derive(
            "w_gain", [conv.weight],
            lambda: (conv.weight * (conv.scale * _SQRT2)).to(x.dtype).contiguous(memory_format=fmt),
            x.dtype, fmt,
        )  # [OIkk]
        b = conv._derive("b_gain", [act.bias], lambda: (act.bias * _SQRT2).to(x.dtype), x.dtype)
        out = F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding)
        return F.leaky_relu(out, 0.2, inplace=True)  # [NOHW]


class ModulatedConv2d(_Derived):
    """StyleGAN2 modulated convolution, optionally with 2x upsampling (transposed conv + blur).

    ``forward(x, latent, impl, gain, bias)`` returns ``gain · modconv(x) + bias[o]``.
    ``impl="batched"`` picks, per call, the cheaper of two exact rewritings. When one sample's
    weight [OIkk] holds fewer values than its input [IHW] (batch 1 at 64 px and above), the
    style, the demodulation and ``gain`` go into that weight and ``bias`` into the
    convolution (or the blur after it): no pass over the activations at all. Otherwise (large
    batches, small maps) the input is scaled by the style, one convolution runs with the shared
    weight, and its output is scaled by gain × demodulation (computed in fp32) with the bias
    added in the same pass. ``impl="grouped"`` is the original per-sample weight with a grouped
    convolution, gain and bias applied afterwards, kept as the reference.
    """

    def __init__(
        self,
        in_ch: int,              # input channels
        out_ch: int,             # output channels
        kernel_size: int,        # square kernel side
        style_dim: int,          # latent width
        demodulate: bool = True,  # normalise each output filter (False in ToRGB)
        upsample: bool = False,  # double the resolution
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size = in_ch, out_ch, kernel_size
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            factor = 2
            p = (len(_BLUR_TAPS) - factor) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + factor - 1, p // 2 + 1), factor=factor)
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2

    def styles(self, latent: torch.Tensor) -> torch.Tensor:
        """Per-sample input-channel scales, fp32. [NS] → [NI]"""
        return self.modulation(latent.float())

    def forward(
        self,
        x: torch.Tensor,
        latent: torch.Tensor,
        impl: ModConv = "batched",
        gain: float = 1.0,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert_shape("ModulatedConv2d input", x, (None, self.in_ch, None, None))
        s = self.styles(latent)  # [NI] fp32
        if impl == "batched":
            return self._batched(x, s, gain, bias)
        if impl != "grouped":
            raise ValueError(f"impl must be 'batched' or 'grouped', got {impl!r}")
        out = self._grouped(x, s)
        if self.upsample:
            out = self.blur(out)
        if gain != 1.0:
            out = out * gain
        return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)

    def folds_style(self, x: torch.Tensor) -> bool:
        """Whether ``_batched`` puts the style into the weight for input ``x`` (see the class)."""
        return x.shape[0] == 1 and self.out_ch * self.kernel_size**2 <= x.shape[2] * x.shape[3]

    def _batched(self, x: torch.Tensor, s: torch.Tensor, gain: float, bias: torch.Tensor | None) -> torch.Tensor:
        n, dtype, fmt = x.shape[0], x.dtype, _layout_of(x)
        if self.demodulate and dtype in _HALF_TYPES and not self.folds_style(x):
            # Demodulation cancels any per-sample style gain; unit max keeps fp16 in range.
            s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        a = torch.full((n, self.out_ch), gain, device=s.device)  # [NO] fp32: gain × demodulation
        if self.demodulate:
            wsq = self._derive(
                "wsq", [self.weight], lambda: (self.weight[0].float() * self.scale).square().sum(dim=(2, 3))
            )  # [OI] fp32
            a = a * torch.rsqrt(s.square() @ wsq.t() + 1e-8)
        b = None if bias is None else bias.to(dtype)
        if self.folds_style(x):
            poly = self.upsample and _polyphase(x)
            w32 = self._derive(
                "w32", [self.weight],
                lambda: (polyphase_weight if poly else lambda w: w)(self.weight[0].float() * self.scale), poly,
            )  # [OIkk] or [(4O)I22] fp32
            a = a.view(-1).repeat_interleave(len(w32) // self.out_ch)
            w = (w32 * s.view(1, self.in_ch, 1, 1) * a.view(-1, 1, 1, 1)).to(dtype)
            if not self.upsample:
                return F.conv2d(x, w.contiguous(memory_format=fmt), b, padding=self.padding)  # [NOHW]
            return self._upsampled(x, w if poly else w.transpose(0, 1), b, fmt)
        xs = x * s.to(dtype).view(n, self.in_ch, 1, 1)  # [NIHW]
        a = a.to(dtype).view(n, self.out_ch, 1, 1)
        if self.upsample:
            poly = _polyphase(x)
            w = self._derive(
                "wt", [self.weight],
                lambda: (polyphase_weight if poly else lambda w: w.transpose(0, 1))(
                    (self.weight[0] * self.scale).to(dtype)
                ).contiguous(memory_format=fmt),
                dtype, fmt, poly,
            )  # [(4O)I22] or [IOkk]
            return self._upsampled(xs, w, b, fmt, a)  # the blur is per channel: it commutes with ``a``
        w = self._derive(
            "w", [self.weight],
            lambda: (self.weight[0] * self.scale).to(dtype).contiguous(memory_format=fmt),
            dtype, fmt,
        )  # [OIkk]
        out = F.conv2d(xs, w, padding=self.padding)  # [NOHW]
        return out.mul_(a) if b is None else torch.addcmul(b.view(1, -1, 1, 1), out, a)

    def _upsampled(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, fmt: torch.memory_format,
        a: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """blur(conv_transpose(x, w, stride 2) · a) + b, from a polyphase weight [(4O)I22]
        (``polyphase_weight``) or a transposed-convolution weight [IOkk]."""
        w = w.contiguous(memory_format=fmt)
        if w.shape[0] == 4 * self.out_ch:
            # Its last row and column are zero: the blur's padding then yields one extra
            # row and column of output, cropped below.
            out = F.pixel_shuffle(F.conv2d(x, w, padding=1), 2)  # [NO(2H+2)(2W+2)]
        else:
            out = F.conv_transpose2d(x, w, stride=2)  # [NO(2H+1)(2W+1)]
        if a is not None:
            out.mul_(a)
        out = self.blur.padded(out, b)
        return out[:, :, : 2 * x.shape[2], : 2 * x.shape[3]]  # [NO(2H)(2W)]

    def _grouped(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n, _, h, w_ = x.shape
        k = self.kernel_size
        weight = self.scale * self.weight * s.view(n, 1, self.in_ch, 1, 1)  # [NOIkk]
        if self.demodulate:
            d = torch.rsqrt(weight.square().sum(dim=(2, 3, 4)) + 1e-8)  # [NO]
            weight = weight * d.view(n, self.out_ch, 1, 1, 1)
        weight = weight.to(x.dtype)
        xg = x.reshape(1, n * self.in_ch, h, w_)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(n * self.in_ch, self.out_ch, k, k)
            out = F.conv_transpose2d(xg, weight, stride=2, groups=n)
        else:
            out = F.conv2d(xg, weight.reshape(n * self.out_ch, self.in_ch, k, k), padding=self.padding, groups=n)
        return out.reshape(n, self.out_ch, out.shape[2], out.shape[3])


# Which of a 3-tap transposed convolution's taps feeds each phase of its stride-2 output:
# [phase, tap of the 2x2 polyphase kernel] -> 3x3 tap, 3 meaning none (zero).
_POLYPHASE_TAPS = torch.tensor([[2, 0], [3, 1]])


def _polyphase(x: torch.Tensor) -> bool:
    """oneDNN's transposed convolutions run at a third of its convolutions' rate (measured,
    bf16 and fp32); cuDNN's do not, so the polyphase form is for the CPU only."""
    return x.device.type == "cpu"


def polyphase_weight(w: torch.Tensor) -> torch.Tensor:
    """The stride-2 transposed convolution by ``w`` [OI33] as an ordinary 2x2 convolution with
    4·O outputs (padding 1) followed by ``pixel_shuffle(·, 2)``: [OI33] → [(4O)I22].

    Output channel ``4o + 2p + q`` is phase (p, q) of channel o (its output pixel (2m+p,
    2n+q)); the result equals ``conv_transpose2d(x, w.transpose(0, 1), stride=2)`` padded
    with one zero row and column at the end.
    """
    o, i, k, _ = w.shape
    if k != 3:
        raise ValueError(f"polyphase_weight needs a 3x3 kernel, got {k}x{k}")
    idx = _POLYPHASE_TAPS.to(w.device)
    wz = F.pad(w, [0, 1, 0, 1])  # [OI44], tap 3 is zero
    wp = wz[:, :, idx[:, None, :, None], idx[None, :, None, :]]  # [OI(p)(q)(ky)(kx)]
    return wp.permute(0, 2, 3, 1, 4, 5).reshape(4 * o, i, 2, 2)


class NoiseInjection(nn.Module):
    """GPEN's "noise": the encoder feature map of the same resolution, scaled and concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, feature * self.weight.to(feature.dtype)], dim=1)  # [N(2O)HW]


class StyledConv(nn.Module):
    """Modulated conv → concat encoder feature → FusedLeakyReLU over 2·out channels.

    ``impl="batched"`` computes the same in place: sqrt(2) and the first half of the bias go
    into the modulated convolution, and each half of the concatenation is written once by its
    leaky ReLU (``lrelu_into``, ``affine_lrelu_into``); ``"grouped"`` runs the modules one by
    one, as the original does.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(2 * out_ch)

    def forward(self, x: torch.Tensor, latent: torch.Tensor, feature: torch.Tensor, impl: ModConv) -> torch.Tensor:
        if impl == "grouped":
            return self.activate(self.noise(self.conv(x, latent, impl), feature))
        o = self.conv.out_ch
        bias = self.activate.bias * _SQRT2  # [2O]
        out = self.conv(x, latent, impl, gain=_SQRT2, bias=bias[:o])  # [NOHW]
        n, _, h, w = out.shape
        assert_shape("StyledConv encoder feature", feature, (n, o, h, w))
        gain = (self.noise.weight * _SQRT2).to(out.dtype)
        bias = bias[o:].to(out.dtype).view(1, o, 1, 1)
        if torch.is_grad_enabled():  # ``out=`` does not record autograd
            return torch.cat([F.leaky_relu(out, 0.2), F.leaky_relu(torch.addcmul(bias, feature, gain), 0.2)], 1)
        y = torch.empty((n, 2 * o, h, w), dtype=out.dtype, device=out.device, memory_format=_layout_of(x))
        lrelu_into(y[:, :o], out)
        affine_lrelu_into(y[:, o:], feature, gain, bias)
        return y  # [N(2O)HW]


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB plus bias, added to the upsampled previous RGB."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(
        self, x: torch.Tensor, latent: torch.Tensor, impl: ModConv, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.conv(x, latent, impl, bias=self.bias.view(3))  # [N3HW]
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    """Learned 4x4 start map, shared by every sample."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, 4, 4))

    def forward(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.input.to(dtype).expand(batch, -1, -1, -1)  # [NC44]


class Generator(nn.Module):
    """StyleGAN2 synthesis network whose every layer also takes an encoder feature map."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        ch = config.channels
        self.style = nn.Sequential(
            PixelNorm(),
            *(EqualLinear(config.style_dim, config.style_dim, lr_mul=0.01, activation=True)
              for _ in range(config.n_mlp)),
        )
        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, config.style_dim)
        self.to_rgb1 = ToRGB(2 * ch(4), config.style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        prev = ch(4)
        for level in range(3, config.log_size + 1):
            out = ch(2**level)
            self.convs.append(StyledConv(2 * prev, out, 3, config.style_dim, upsample=True))
            self.convs.append(StyledConv(2 * out, out, 3, config.style_dim))
            self.to_rgbs.append(ToRGB(2 * out, config.style_dim))
            prev = out

    def forward(self, latent: torch.Tensor, features: Sequence[torch.Tensor], impl: ModConv) -> torch.Tensor:
        """latent [NS] fp32 (already mapped); features [NCHW] from 4x4 up to full size."""
        # The constant start map takes the input's layout, so channels-last runs end to end.
        x = self.input(latent.shape[0], features[0].dtype).contiguous(memory_format=_layout_of(features[-1]))
        x = self.conv1(x, latent, features[0], impl)
        skip = self.to_rgb1(x, latent, impl)
        for i, to_rgb in enumerate(self.to_rgbs):
            feature = features[i + 1]
            x = self.convs[2 * i](x, latent, feature, impl)
            x = self.convs[2 * i + 1](x, latent, feature, impl)
            skip = to_rgb(x, latent, impl, skip)
        return skip


class GPEN(nn.Module):
    """GPEN blind face restoration network (the official ``FullGenerator``, isconcat=True).

    ``forward(x)`` takes aligned face crops, RGB in [-1, 1], [N3HW] with H = W = size, and
    returns the restored crops in the same shape and range (not clamped). The compute dtype
    and memory format follow the input: fp16/bf16 inputs run in half precision with the
    mapping network and demodulation in fp32.
    """

    def __init__(
        self,
        size: int,                   # face crop side in pixels
        style_dim: int = 512,        # latent width
        n_mlp: int = 8,              # mapping network depth
        channel_multiplier: int = 2,  # widens layers at 64 px and above
        narrow: float = 1.0,         # scales every channel count
        modconv: ModConv = "batched",  # "grouped": the original formulation (reference path)
    ) -> None:
        super().__init__()
        self.config = ModelConfig(size, style_dim, n_mlp, channel_multiplier, narrow)
        self.modconv: ModConv = modconv
        ch = self.config.channels
        self.generator = Generator(self.config)
        self.n_encoder = self.config.log_size - 1
        res = size
        self.ecd0 = nn.Sequential(ConvLayer(3, ch(res), 1))
        for i in range(1, self.n_encoder):
            setattr(self, f"ecd{i}", nn.Sequential(ConvLayer(ch(res), ch(res // 2), 3, downsample=True)))
            res //= 2
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 16, style_dim, activation=True))

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "GPEN":
        """A randomly initialised network with the architecture of preset ``name``."""
        return build_model(preset_config(name), **kwargs)

    def clear_cache(self) -> None:
        """Drop memoised scaled weights (only needed after editing parameters via ``.data``)."""
        for m in self.modules():
            if isinstance(m, _Derived):
                m._clear_memo()

    def forward(self, x: torch.Tensor, impl: ModConv | None = None) -> torch.Tensor:
        size = self.config.size
        assert_shape("GPEN input", x, (None, 3, size, size))
        impl = impl or self.modconv
        features = []
        h = x
        for i in range(self.n_encoder):
            h = getattr(self, f"ecd{i}")(h)
            features.append(h)  # [NCHW], size … 4
        latent = self.final_linear(h.flatten(1).float())  # [NS] fp32
        latent = self.generator.style(latent)
        out = self.generator(latent, features[::-1], impl)
        assert_shape("GPEN output", out, (x.shape[0], 3, size, size))
        return out


def preset_config(name: str) -> ModelConfig:
    """The architecture of a released preset; ValueError names the known ones."""
    try:
        return PRESET_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown GPEN preset {name!r}; known: {', '.join(PRESET_CONFIGS)}") from None


def build_model(config: ModelConfig, **kwargs: Any) -> GPEN:
    """A randomly initialised GPEN of ``config`` (``kwargs``: e.g. ``modconv="grouped"``)."""
    return GPEN(config.size, config.style_dim, config.n_mlp, config.channel_multiplier, config.narrow, **kwargs)


# --------------------------------------------------------------------------- layout checks


@functools.lru_cache(maxsize=16)
def _expected_layout_cached(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = build_model(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of a ``config`` network with its shape, in the official order."""
    return dict(_expected_layout_cached(config))


def _short_list(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def layout_mismatch(state_dict: Mapping[str, Any], config: ModelConfig) -> str | None:
    """None when ``state_dict`` has exactly the keys and shapes of ``config``; else a description.

    The description reads like "2 missing keys (ecd7.0.1.weight, …), 1 wrong shape
    (ecd0.0.0.weight: expected (64, 3, 1, 1), got (32, 3, 1, 1))".
    """
    expected = expected_layout(config)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: expected {expected[k]}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != expected[k]
    ]
    parts = []
    if not_tensors:
        parts.append(f"{len(not_tensors)} values that are not tensors ({_short_list(not_tensors)})")
    if missing:
        parts.append(f"{len(missing)} missing keys ({_short_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_short_list(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} wrong shapes ({_short_list(wrong, 2)})")
    return "; ".join(parts) or None


def identify_preset(state_dict: Mapping[str, Any], candidates: Mapping[str, ModelConfig] | None = None) -> str | None:
    """Name of the preset whose layout ``state_dict`` matches exactly, or None."""
    for name, config in (candidates or PRESET_CONFIGS).items():
        if layout_mismatch(state_dict, config) is None:
            return name
    return None
