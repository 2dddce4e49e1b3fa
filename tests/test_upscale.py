"""The upscaling stage: shapes, tiles equal whole frames, non-native scales, precision, Lanczos, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.errors import ConfigError
from gpen_video.upscale.networks import RRDBConfig, SRVGGConfig, build_network
from gpen_video.upscale.upscaler import (
    LanczosUpscaler,
    NetworkUpscaler,
    UpscaleConfig,
    create_upscaler,
    resize_bicubic,
)
from tests.devices import DEVICES
from tests.ncnn_files import random_state


def _face(h: int, w: int, y: int = 40, x: int = 140) -> torch.Tensor:
    """A real face crop as [13HW] float RGB in [0, 1]."""
    rgb = np.ascontiguousarray(data.astronaut()[y:y + h, x:x + w])
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255


def _random_net(config: RRDBConfig | SRVGGConfig, seed: int = 0) -> torch.nn.Module:
    net = build_network(config)
    net.load_state_dict(random_state(config, seed=seed, std=0.1))
    return net


TINY_SRVGG = SRVGGConfig(scale=4, num_conv=3, num_feat=8)  # reach 5 px
TINY_RRDB_X2 = RRDBConfig(scale=2, num_block=1, num_feat=8, num_grow_ch=4)  # pixel-unshuffled input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("kind", ["lanczos", "srvgg", "rrdb-x2"])
def test_output_size_range_dtype_device(kind: str, scale: int, device: str) -> None:
    frames = _face(23, 31).repeat(2, 1, 1, 1).to(device)  # odd sides, a batch of two
    if kind == "lanczos":
        up = LanczosUpscaler(scale)
    else:
        net = _random_net(TINY_SRVGG if kind == "srvgg" else TINY_RRDB_X2).to(device)
        up = NetworkUpscaler(net, scale, tile=16, tile_pad=8)
    out = up(frames)
    assert out.shape == (2, 3, 23 * scale, 31 * scale)
    assert out.dtype == frames.dtype and out.device == frames.device
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out[0], out[1])  # frames of a batch are independent
    assert frames.equal(_face(23, 31).repeat(2, 1, 1, 1).to(device))  # input untouched


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("config", [TINY_SRVGG, TINY_RRDB_X2], ids=["srvgg", "rrdb-x2"])
def test_tiles_equal_the_whole_frame_when_the_pad_covers_the_reach(config, scale: int) -> None:
    net = _random_net(config, seed=1)
    frames = _face(45, 61)
    whole = NetworkUpscaler(net, scale, tile=0)(frames)
    tiled = NetworkUpscaler(net, scale, tile=16, tile_pad=config.receptive_radius)(frames)
    assert (tiled - whole).abs().max() < 1e-5


def test_short_pad_shows_seams_so_the_test_above_can_fail() -> None:
    net = _random_net(TINY_SRVGG, seed=1)
    frames = _face(45, 61)
    whole = NetworkUpscaler(net, 4, tile=0)(frames)
    tiled = NetworkUpscaler(net, 4, tile=16, tile_pad=1)(frames)
    assert (tiled - whole).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_animevideov3_tiles_equal_whole_frame(scale: int) -> None:
    frames = _face(64, 80)
    whole = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=scale, tile=0))(frames)
    tiled = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=scale, tile=24))(frames)  # default pad 18
    assert (tiled - whole).abs().max() < 1e-5


@pytest.mark.slow
def test_shipped_rrdb_tiles_match_whole_frame_within_a_tenth_of_a_level() -> None:
    """RRDBNet reaches ~350 px; the default 64 px of context leaves < 0.1 of an 8-bit level here (32 left seams)."""
    frames = _face(160, 160)
    whole = create_upscaler(UpscaleConfig("realesrgan-x4plus-anime", scale=4, tile=0))(frames)
    tiled = create_upscaler(UpscaleConfig("realesrgan-x4plus-anime", scale=4, tile=80))(frames)
    assert (tiled - whole).abs().max() < 0.1 / 255


def test_non_native_scale_is_the_native_output_resized() -> None:
    net = _random_net(TINY_SRVGG, seed=2)
    frames = _face(20, 28)
    native = NetworkUpscaler(net, 4, tile=0)(frames)
    with torch.inference_mode():
        raw = net(frames)
    for scale in (2, 3):
        want = resize_bicubic(raw, (20 * scale, 28 * scale)).clamp(0, 1)
        assert (NetworkUpscaler(net, scale, tile=0)(frames) - want).abs().max() < 1e-6
    assert (native - raw.clamp(0, 1)).abs().max() < 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_close_to_fp32(dtype: torch.dtype, tolerance: float) -> None:
    frames = _face(24, 32, y=100, x=180)
    ref = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2, tile=0))(frames)
    half = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2, tile=0), dtype=dtype)
    assert next(half.network.parameters()).dtype == dtype
    out = half(frames)
    assert out.dtype == torch.float32
    error = (out - ref).abs().mean()
    assert 0 < error < tolerance


def test_precision_option_picks_the_dtype() -> None:
    up = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2, precision="bf16"))
    assert up.dtype == torch.bfloat16 and next(up.network.parameters()).dtype == torch.bfloat16


def test_lanczos_is_opencvs_and_keeps_flat_areas_flat() -> None:
    import cv2

    frames = _face(30, 40)
    up = create_upscaler(UpscaleConfig("lanczos", scale=3))
    rgb = (frames[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    want = cv2.resize(rgb, (120, 90), interpolation=cv2.INTER_LANCZOS4)
    got = up.upscale_rgb(rgb)
    assert got.shape == (90, 120, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1
    flat = torch.full((1, 3, 8, 8), 0.25)
    assert (up(flat) - 0.25).abs().max() < 1e-6


def test_upscale_rgb_batches_and_checks_its_input() -> None:
    up = LanczosUpscaler(2)
    rgb = np.zeros((3, 10, 12, 3), np.uint8)
    assert up.upscale_rgb(rgb).shape == (3, 20, 24, 3)
    with pytest.raises(ValueError, match=r"rgb must be uint8 with shape \(h, w, 3\) or \(n, h, w, 3\), got float32"):
        up.upscale_rgb(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"frames must have shape \(\*, 3, \*, \*\), got \(1, 4, 5, 5\)"):
        up(torch.zeros(1, 4, 5, 5))


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 1}, r"upscale scale must be 2, 3 or 4, got 1 \(1 means no upscaling\)"),
    ({"scale": 8}, r"upscale scale must be 2, 3 or 4, got 8"),
    ({"upscaler": "esrgan"}, r"unknown upscaler 'esrgan'; choose one of lanczos, realesrgan-x4plus, "),
    ({"tile": 8}, r"upscale tile must be 0 \(whole frames\) or at least 16 pixels, got 8"),
    ({"tile_pad": -1}, r"upscale tile_pad must be >= 0, got -1"),
    ({"precision": "int8"}, r"precision must be one of fp32, bf16, fp16, got 'int8'"),
])
def test_bad_options_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UpscaleConfig(**kwargs)


def test_config_is_frozen() -> None:
    with pytest.raises(Exception):
        UpscaleConfig().scale = 3  # type: ignore[misc]
