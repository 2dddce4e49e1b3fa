"""Weights registry: downloads from a local server, resume, validation and error messages."""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpen_video.errors import ConfigError, DownloadError, WeightsError
from gpen_video.restore.model import ModelConfig
from gpen_video.restore.weights import (
    REGISTRY,
    WeightSpec,
    default_cache_dir,
    list_models,
    load_gpen,
    resolve_weights,
)


@pytest.fixture
def tiny_spec(tiny_config: ModelConfig, http_server) -> WeightSpec:
    return WeightSpec(
        name="GPEN-tiny", kind="gpen", filename="GPEN-tiny.pth", urls=(http_server.url("GPEN-tiny.pth"),),
        size_bytes=1_300_000, config=tiny_config, origin="tests",
    )


@pytest.fixture
def served_tiny(tiny_gpen_checkpoint, http_server) -> Path:
    src = tiny_gpen_checkpoint("GPEN-tiny.pth")
    dst = http_server.root / "GPEN-tiny.pth"
    dst.write_bytes(src.read_bytes())
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_entries_are_complete() -> None:
    assert [n for n, s in REGISTRY.items() if s.kind == "gpen"] == [
        "GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024", "GPEN-BFR-2048"]
    assert REGISTRY["RetinaFace-R50"].kind == "detector" and REGISTRY["ParseNet"].kind == "parser"
    for spec in REGISTRY.values():
        assert spec.urls[0].startswith("https://") and spec.licence
    assert REGISTRY["GPEN-BFR-2048"].urls[0].endswith("FilePath=pytorch_model-2048.pt")
    with pytest.raises(Exception):
        REGISTRY["GPEN-BFR-512"].sha256 = "x"  # frozen


def test_download_records_sha256_and_reuses_cache(tiny_spec, served_tiny, http_server, tmp_path) -> None:
    cache = tmp_path / "cache"
    path = resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    assert path == cache / "GPEN-tiny.pth"
    assert path.read_bytes() == served_tiny.read_bytes()
    assert (cache / "GPEN-tiny.pth.sha256").read_text().split()[0] == _sha(served_tiny)
    assert not (cache / "GPEN-tiny.pth.part").exists()
    http_server.fail_status = 500
    assert resolve_weights(tiny_spec, cache_dir=cache, progress=False) == path
    assert len(http_server.requests) == 1


def test_real_preset_spec_with_url_override(gpen256_file, http_server, tmp_path) -> None:
    (http_server.root / "GPEN-BFR-256.pth").symlink_to(gpen256_file)
    cache = tmp_path / "cache"
    url = http_server.url("GPEN-BFR-256.pth")
    assert resolve_weights("GPEN-BFR-256", cache_dir=cache, url=url, progress=False) == cache / "GPEN-BFR-256.pth"
    model = load_gpen("GPEN-BFR-256", cache_dir=cache, offline=True)
    assert not model.training
    want = torch.load(gpen256_file, weights_only=True)
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_wrong_preset_file_is_named(gpen256_file, http_server, tmp_path) -> None:
    (http_server.root / "GPEN-BFR-256.pth").symlink_to(gpen256_file)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"holds GPEN-BFR-256 weights, not GPEN-BFR-512; pass --model GPEN-BFR-256"):
        resolve_weights("GPEN-BFR-512", cache_dir=cache, url=http_server.url("GPEN-BFR-256.pth"), progress=False)
    assert not (cache / "GPEN-BFR-512.pth").exists() and not (cache / "GPEN-BFR-512.pth.part").exists()
    n = len(http_server.requests)
    with pytest.raises(WeightsError, match=rf"{gpen256_file.name} holds GPEN-BFR-256 weights, not GPEN-BFR-512"):
        load_gpen("GPEN-BFR-512", path=gpen256_file, cache_dir=cache)
    assert len(http_server.requests) == n


def test_truncated_download_leaves_no_file_then_resumes(tiny_spec, served_tiny, http_server, tmp_path) -> None:
    cache = tmp_path / "cache"
    cut = served_tiny.stat().st_size // 3
    http_server.truncate_at = cut
    with pytest.raises(DownloadError, match=rf"could not download GPEN-tiny from http://127\.0\.0\.1:\d+/GPEN-tiny\.pth: "
                                            rf"the transfer broke off after {cut:,} of"):
        resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    assert not (cache / "GPEN-tiny.pth").exists()
    assert (cache / "GPEN-tiny.pth.part").stat().st_size == cut
    http_server.truncate_at = None
    path = resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    assert http_server.requests[-1][1] == f"bytes={cut}-"
    assert path.read_bytes() == served_tiny.read_bytes()


def test_resume_when_server_ignores_range(tiny_spec, served_tiny, http_server, tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "GPEN-tiny.pth.part").write_bytes(b"garbage that must not stay in front")
    http_server.ignore_range = True
    path = resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    assert path.read_bytes() == served_tiny.read_bytes()


def test_corrupt_download_is_deleted(tiny_spec, http_server, tmp_path) -> None:
    (http_server.root / "GPEN-tiny.pth").write_bytes(os.urandom(2_000_000))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"GPEN-tiny\.pth\.part \(downloaded from http://.*\) is not a PyTorch "
                                           r"weights file that loads safely"):
        resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_truncated_local_file_is_reported(tiny_spec, served_tiny, tmp_path) -> None:
    bad = tmp_path / "cut.pth"
    bad.write_bytes(served_tiny.read_bytes()[:200_000])
    with pytest.raises(WeightsError, match=r"cut\.pth is truncated \(200,000 bytes, expected about "
                                           r"1,300,000\); delete it"):
        resolve_weights(tiny_spec, path=bad)


def test_file_missing_only_its_end_is_truncated_whatever_its_size(tiny_spec, served_tiny, tmp_path) -> None:
    data = served_tiny.read_bytes()
    spec = replace(tiny_spec, size_bytes=len(data))
    bad = tmp_path / "tail.pth"
    bad.write_bytes(data[:-100])
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec, path=bad)
    assert str(info.value) == (f"{bad} is truncated ({len(data) - 100:,} bytes, expected about {len(data):,}); "
                               "delete it and download GPEN-tiny again, or pass a complete file with --weights")


class TrainingOptions:
    """Stands for the classes training scripts pickle beside the weights."""


@pytest.mark.parametrize(
    ("extra", "global_name"),
    [(TrainingOptions(), f"{TrainingOptions.__module__}.TrainingOptions"),
     (argparse.Namespace(lr=0.002, batch=8), "argparse.Namespace")],
)
@pytest.mark.parametrize("with_weights", [True, False], ids=["full-size", "small"])
def test_checkpoint_holding_python_objects_is_not_called_truncated(
    tiny_spec, tiny_gpen_checkpoint, tmp_path, extra, global_name, with_weights
) -> None:
    plain = tiny_gpen_checkpoint("plain.pth")
    spec = replace(tiny_spec, size_bytes=plain.stat().st_size)
    path = tmp_path / "train.pth"
    torch.save({"g_ema": torch.load(plain, weights_only=True), "args": extra} if with_weights
               else {"g_ema": extra}, path)
    assert (path.stat().st_size > 0.9 * spec.size_bytes) == with_weights
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec, path=path)
    assert str(info.value) == (
        f"{path} holds Python objects that cannot be loaded safely ({global_name}), not only tensors; "
        "if you trust it, save its weights again as a plain state_dict (torch.save(model.state_dict(), path)), "
        "or pass the official GPEN-tiny file")


def test_small_file_that_is_not_a_checkpoint_is_not_called_truncated(tiny_spec, tmp_path) -> None:
    page = tmp_path / "GPEN-tiny.pth"
    page.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(WeightsError) as info:
        resolve_weights(tiny_spec, path=page)
    assert str(info.value) == (f"{page} is not a PyTorch weights file that loads safely (UnpicklingError: "
                               "Unsupported operand 60); pass a file of GPEN-tiny")


def test_folder_given_as_weights_file_is_named_a_folder(tiny_spec, tiny_gpen_checkpoint, tmp_path) -> None:
    folder = tiny_gpen_checkpoint("GPEN-tiny.pth").parent
    with pytest.raises(WeightsError) as info:
        resolve_weights(tiny_spec, path=folder)
    assert str(info.value) == (f"weights path {folder} is a folder; --weights takes a .pth file, e.g. "
                               f"{folder / 'GPEN-tiny.pth'}")
    missing = tmp_path / "no such folder"
    with pytest.raises(WeightsError) as info:
        resolve_weights(tiny_spec, path=missing)
    assert str(info.value) == f"weights file {missing} does not exist; check the path given to --weights"


def test_incomplete_state_dict_is_reported(tiny_spec, tiny_gpen_checkpoint, tmp_path) -> None:
    path = tiny_gpen_checkpoint("partial.pth")
    state = torch.load(path, weights_only=True)
    del state["generator.to_rgbs.3.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"does not match the GPEN-tiny layout \(1 missing keys "
                                           r"\(generator\.to_rgbs\.3\.bias\)\)"):
        resolve_weights(tiny_spec, path=path)


def test_training_checkpoint_with_g_ema_is_accepted(tiny_spec, tiny_gpen_checkpoint) -> None:
    path = tiny_gpen_checkpoint("train.pt", wrap=True)
    model = load_gpen(tiny_spec, path=path)
    assert torch.equal(model.final_linear[0].bias, torch.load(path, weights_only=True)["g_ema"]["final_linear.0.bias"])


def test_tampered_cached_file_fails_sha256(tiny_spec, served_tiny, tmp_path) -> None:
    cache = tmp_path / "cache"
    path = resolve_weights(tiny_spec, cache_dir=cache, progress=False)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"GPEN-tiny\.pth does not match its recorded sha256 .*; delete it "
                                           r"\(and GPEN-tiny\.pth\.sha256\) to download GPEN-tiny again"):
        resolve_weights(tiny_spec, cache_dir=cache, progress=False)


def test_published_sha256_mismatch_deletes_download(tiny_spec, served_tiny, tmp_path) -> None:
    spec = replace(tiny_spec, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"has sha256 [0-9a-f]{64}, not the published 0{64}"):
        resolve_weights(spec, cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


def test_hand_placed_file_is_validated_and_recorded(tiny_spec, served_tiny, tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "GPEN-tiny.pth").write_bytes(served_tiny.read_bytes())
    assert resolve_weights(tiny_spec, cache_dir=cache, offline=True) == cache / "GPEN-tiny.pth"
    assert (cache / "GPEN-tiny.pth.sha256").read_text().split()[0] == _sha(served_tiny)


def test_offline_and_missing_names_url_and_path(tmp_path) -> None:
    cache = tmp_path / "cache"
    spec = REGISTRY["GPEN-BFR-512"]
    with pytest.raises(WeightsError) as info:
        resolve_weights("GPEN-BFR-512", cache_dir=cache, offline=True)
    text = str(info.value)
    assert spec.urls[0] in text and str(cache / "GPEN-BFR-512.pth") in text and "--weights PATH" in text
    assert not cache.exists()


def test_path_argument_never_downloads(tiny_spec, tiny_gpen_checkpoint, http_server) -> None:
    local = tiny_gpen_checkpoint("mine.pth")
    assert resolve_weights(tiny_spec, path=local, url=http_server.url("GPEN-tiny.pth")) == local
    with pytest.raises(WeightsError, match=r"weights file .*missing\.pth does not exist"):
        resolve_weights(tiny_spec, path=local.parent / "missing.pth")
    assert http_server.requests == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("status", "url_name", "expected"),
    [
        (None, "absent.pth", r"HTTP 404"),
        (503, "GPEN-tiny.pth", r"HTTP 503"),
        ("refused", None, r"(Connection refused|Errno)"),
    ],
)
def test_download_errors_are_one_actionable_sentence(tiny_spec, http_server, tmp_path, status, url_name, expected):
    cache = tmp_path / "cache"
    if status == "refused":
        url = f"http://127.0.0.1:{_closed_port()}/GPEN-tiny.pth"
    else:
        http_server.fail_status = status
        url = http_server.url(url_name)
    with pytest.raises(DownloadError, match=rf"^could not download GPEN-tiny from {url}: .*{expected}.*; download "
                                            rf"it by hand and put it at {cache / 'GPEN-tiny.pth'}, or pass --weights PATH$"):
        resolve_weights(tiny_spec, cache_dir=cache, url=url, progress=False)
    assert not (cache / "GPEN-tiny.pth").exists()


def test_mirror_replaces_base_url(tiny_spec, served_tiny, http_server, tmp_path) -> None:
    spec = replace(tiny_spec, urls=("https://unreachable.invalid/GPEN-tiny.pth",))
    resolve_weights(spec, cache_dir=tmp_path / "c", mirror=f"http://127.0.0.1:{http_server.port}/", progress=False)
    assert http_server.requests[0][0] == "/GPEN-tiny.pth"


def test_list_models_reports_cache(tmp_path, gpen256_file) -> None:
    (tmp_path / "GPEN-BFR-256.pth").symlink_to(gpen256_file)
    rows = {r.name: r for r in list_models(tmp_path)}
    assert set(rows) == set(REGISTRY)
    assert rows["GPEN-BFR-256"].present and rows["GPEN-BFR-256"].size_bytes == gpen256_file.stat().st_size
    assert not rows["GPEN-BFR-512"].present and rows["GPEN-BFR-512"].path == tmp_path / "GPEN-BFR-512.pth"
    assert rows["ParseNet"].kind == "parser"


def test_default_cache_dir_prefers_environment(tmp_path) -> None:
    assert default_cache_dir({"GPEN_VIDEO_HOME": str(tmp_path)}) == tmp_path
    assert "gpen-video" in str(default_cache_dir({}))


def test_load_gpen_rejects_non_gpen_entries(tmp_path) -> None:
    with pytest.raises(WeightsError, match="RetinaFace-R50 is a detector file, not a GPEN preset"):
        load_gpen("RetinaFace-R50", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown model 'GPEN-BFR-999'; choose one of GPEN-BFR-256"):
        resolve_weights("GPEN-BFR-999", cache_dir=tmp_path)
