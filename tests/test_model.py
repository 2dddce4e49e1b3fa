"""GPEN network: fidelity to the original, official layouts, fast paths against reference paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_state_dict
from scipy.signal import convolve2d

from gpen_video.restore import model as model_module
from gpen_video.restore.model import (
    GPEN,
    PRESET_CONFIGS,
    ConvLayer,
    ModelConfig,
    ModulatedConv2d,
    affine_lrelu_into,
    build_model,
    expected_layout,
    identify_preset,
    layout_mismatch,
    lrelu_into,
    polyphase_weight,
    upfirdn2d,
)
from gpen_video.restore.weights import REGISTRY
from tests.devices import DEVICES

LAYOUTS = next(
    (p for p in (Path(__file__).parent / "data" / "layouts.json", Path("/work/shared/gpen/layouts.json")) if p.exists()),
    None,
)
GPEN_SPECS = [s for s in REGISTRY.values() if s.kind == "gpen"]


def _tiny_model(config: ModelConfig, seed: int = 0, **kwargs) -> GPEN:
    model = build_model(config, **kwargs)
    model.load_state_dict(random_state_dict(config, seed), strict=True)
    return model.eval()


def _reference_model(reference_64: dict) -> GPEN:
    c = reference_64["config"]
    model = GPEN(c["size"], c["style_dim"], c["n_mlp"], c["channel_multiplier"], c["narrow"])
    model.load_state_dict(reference_64["state_dict"], strict=True)
    return model.eval()


@pytest.mark.parametrize("impl", ["batched", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_original_implementation(reference_64: dict, impl: str, channels_last: bool) -> None:
    model = _reference_model(reference_64)
    x = reference_64["input"]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(x, impl=impl)
    assert out.shape == reference_64["output"].shape
    err = (out - reference_64["output"]).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.2e} against the original implementation"


def test_batched_and_grouped_agree_on_random_weights(tiny_config: ModelConfig) -> None:
    config = ModelConfig(size=32, style_dim=32, n_mlp=2, channel_multiplier=2, narrow=0.05)
    for cfg, seed in ((tiny_config, 3), (config, 4)):
        model = _tiny_model(cfg, seed)
        x = torch.rand(3, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        with torch.inference_mode():
            fast, slow = model(x), model(x, impl="grouped")
        assert fast.abs().max() > 0.1
        assert (fast - slow).abs().max().item() <= 1e-5 * max(1.0, slow.abs().max().item())


def test_samples_in_a_batch_are_independent(reference_64: dict) -> None:
    model = _reference_model(reference_64)
    x = reference_64["input"]
    with torch.inference_mode():
        both = model(x)
        second = model(x[1:])
    assert (both[1:] - second).abs().max().item() <= 1e-5


def test_memoised_weights_follow_new_state_dict(reference_64: dict, tiny_config: ModelConfig) -> None:
    model = _reference_model(reference_64)
    x = reference_64["input"]
    with torch.inference_mode():
        model(x)
    other = random_state_dict(tiny_config, seed=7)
    model.load_state_dict(other, strict=True)
    fresh = _tiny_model(tiny_config, seed=7)
    with torch.inference_mode():
        assert torch.allclose(model(x), fresh(x), atol=1e-6)
        assert (model(x) - reference_64["output"]).abs().max() > 0.1


def test_rejects_wrong_input_shape(reference_64: dict) -> None:
    model = _reference_model(reference_64)
    with pytest.raises(ValueError, match=r"GPEN input must have shape \(\*, 3, 64, 64\), got \(1, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(("up", "pad"), [(1, (2, 2)), (1, (1, 1)), (2, (2, 1)), (2, (-1, 0))])
def test_upfirdn2d_matches_direct_convolution(up: int, pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = rng.standard_normal((6, 5))
    kernel = rng.standard_normal((4, 4))
    up_img = np.zeros((6 * up, 5 * up))
    up_img[::up, ::up] = img
    p0, p1 = pad
    padded = np.pad(up_img, ((max(p0, 0), max(p1, 0)),) * 2)
    padded = padded[max(-p0, 0): padded.shape[0] - max(-p1, 0), max(-p0, 0): padded.shape[1] - max(-p1, 0)]
    want = convolve2d(padded, kernel, mode="valid")
    got = upfirdn2d(torch.from_numpy(img)[None, None], torch.from_numpy(kernel), up=up, pad=pad)[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("spec", GPEN_SPECS, ids=lambda s: s.name)
def test_official_layout_loads_strictly(spec) -> None:
    if LAYOUTS is None:
        pytest.skip("layouts.json not found (tests/data or /work/shared/gpen)")
    preset = json.loads(LAYOUTS.read_text())[spec.name]
    assert {k: v for k, v in preset["config"].items() if k != "isconcat"} == {
        "size": spec.config.size, "style_dim": spec.config.style_dim, "n_mlp": spec.config.n_mlp,
        "channel_multiplier": spec.config.channel_multiplier, "narrow": spec.config.narrow,
    }
    official = {key: torch.empty(shape) for key, shape in preset["state_dict"]}
    model = build_model(spec.config)
    model.load_state_dict(official, strict=True)
    assert list(model.state_dict()) == [key for key, _ in preset["state_dict"]]
    assert sum(v.numel() for v in model.state_dict().values()) == preset["num_values"]
    assert layout_mismatch(official, spec.config) is None
    assert identify_preset(official) == spec.name


def test_layout_mismatch_describes_the_difference() -> None:
    cfg = PRESET_CONFIGS["GPEN-BFR-256"]
    state = {k: torch.empty(s, device="meta") for k, s in expected_layout(cfg).items()}
    del state["final_linear.0.bias"]
    state["extra.weight"] = torch.empty(1, device="meta")
    state["ecd0.0.0.weight"] = torch.empty(64, 3, 1, 1, device="meta")
    text = layout_mismatch(state, cfg)
    assert text is not None
    assert "1 missing keys (final_linear.0.bias)" in text
    assert "1 unexpected keys (extra.weight)" in text
    assert "ecd0.0.0.weight: expected (32, 3, 1, 1), got (64, 3, 1, 1)" in text
    assert identify_preset(state) is None


def psnr_pm1(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(reference_64: dict, device: str, dtype: torch.dtype) -> None:
    """fp16 (the CUDA default) and bf16 (the CPU default with native bf16), contiguous and
    channels-last, against the fp32 reference output: PSNR ≥ 40 dB on any device (measured
    here on the CPU: about 71 dB fp16, 54 dB bf16)."""
    model = _reference_model(reference_64).to(device)
    x = reference_64["input"].to(device)
    with torch.inference_mode():
        ref = model(x, impl="grouped").float()
        outs = {"fp32 weights": model(x.to(dtype))}  # the network casts its weights to the input's dtype
        half = model.to(dtype)
        outs["NCHW"] = half(x.to(dtype))
        outs["NHWC"] = half(x.to(dtype).contiguous(memory_format=torch.channels_last))
    assert (ref.cpu() - reference_64["output"]).abs().max().item() < 1e-3  # TF32 may be on
    for layout, out in outs.items():
        assert out.dtype == dtype and torch.isfinite(out).all(), layout
        assert psnr_pm1(out.float(), ref) >= 40.0, layout


# ---------------------------------------------------------------------------- fused fast paths


def test_polyphase_weight_equals_the_transposed_convolution() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)  # [OIkk]
    ref = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)  # [NO(2H+1)(2W+1)]
    got = F.pixel_shuffle(F.conv2d(x, polyphase_weight(w), padding=1), 2)  # [NO(2H+2)(2W+2)]
    assert got.shape == (2, 4, 14, 16)
    torch.testing.assert_close(got[:, :, :13, :15], ref, rtol=1e-12, atol=1e-12)
    assert got[:, :, 13].abs().max() == 0 and got[:, :, :, 15].abs().max() == 0
    with pytest.raises(ValueError, match="3x3 kernel, got 1x1"):
        polyphase_weight(w[:, :, :1, :1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_activations_equal_the_unfused_reference(channels_last: bool) -> None:
    """Written into the halves of a concatenation, equal to sqrt(2)·leaky_relu(x·a + b) to fp32 rounding."""
    gen = torch.Generator().manual_seed(4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, f = (torch.randn(2, 3, 5, 6, generator=gen).contiguous(memory_format=fmt) for _ in range(2))
    a, b = torch.randn(1, 3, 1, 1, generator=gen), torch.randn(1, 3, 1, 1, generator=gen)
    y = torch.empty(2, 6, 5, 6, memory_format=fmt)
    lrelu_into(y[:, :3], x)
    affine_lrelu_into(y[:, 3:], f, a * math.sqrt(2), b * math.sqrt(2))
    ref = torch.cat([F.leaky_relu(x, 0.2), F.leaky_relu(f * a + b, 0.2) * math.sqrt(2)], 1)
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-6)
    assert (y < 0).any()  # the negative slope was exercised


@pytest.mark.parametrize("downsample", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_layer_fused_equals_its_modules_one_by_one(downsample: bool, channels_last: bool) -> None:
    torch.manual_seed(5)
    layer = ConvLayer(4, 6, 3, downsample=downsample)
    with torch.no_grad():
        layer[-1].bias.normal_()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=fmt)
    with torch.inference_mode():
        got, ref = layer(x), torch.nn.Sequential.forward(layer, x)
    assert got.shape == ref.shape == (2, 6, 4 if downsample else 8, 4 if downsample else 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [False, True])
@pytest.mark.parametrize(("batch", "side", "folds"), [(1, 8, True), (1, 2, False), (3, 8, False)])
@pytest.mark.parametrize("polyphase", [True, False])
def test_modulated_conv_fast_paths_equal_the_grouped_reference(
    monkeypatch: pytest.MonkeyPatch, upsample: bool, demodulate: bool, batch: int, side: int, folds: bool,
    polyphase: bool,
) -> None:
    """Style in the weight (batch 1, large maps) or on the activations, polyphase (CPU) or
    transposed upsampling (CUDA's choice, forced here), each with gain and bias."""
    monkeypatch.setattr(model_module, "_polyphase", lambda x: polyphase)
    torch.manual_seed(6)
    conv = ModulatedConv2d(5, 4, 3, 16, demodulate=demodulate, upsample=upsample).eval()
    x, latent, bias = torch.randn(batch, 5, side, side), torch.randn(batch, 16), torch.randn(4)
    assert conv.folds_style(x) is folds
    with torch.inference_mode():
        got = conv(x, latent, "batched", gain=1.5, bias=bias)
        ref = conv(x, latent, "grouped", gain=1.5, bias=bias)
    assert got.shape == ref.shape == (batch, 4, side * (1 + upsample), side * (1 + upsample))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fast_path_records_autograd_and_matches_inference(reference_64: dict) -> None:
    model = _reference_model(reference_64)
    x = reference_64["input"][:1].clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.inference_mode():
        torch.testing.assert_close(out.detach(), model(x.detach()), rtol=1e-5, atol=1e-5)
