"""Half precision you can trust: auto's choice per device, the load-time check against fp32 with
its fallback and cache, and the per-batch guard that reruns non-finite faces in fp32."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import random_state_dict
from skimage.data import astronaut

import gpen_video.restore.precision as precision
from gpen_video import FacePipeline, load_config
from gpen_video.cli import _summary, main
from gpen_video.device import has_native_bf16, resolve_dtype, safe_dtype
from gpen_video.errors import WeightsError
from gpen_video.faces.detect import create_detector
from gpen_video.jobs.run import JobResult
from gpen_video.restore.model import ModelConfig, build_model
from gpen_video.restore.precision import (
    CHECK_PSNR_DB,
    check_faces,
    choose_precision,
    nonfinite_faces,
)
from gpen_video.restore.restorer import Restorer, build_restorer
from samples.make_demo import render_clip

CPU = torch.device("cpu")
WARNING = "failed the precision check"


def overflowing_state_dict(config: ModelConfig, seed: int = 0, k: float = 1000.0) -> dict[str, torch.Tensor]:
    """Random GPEN weights whose first two encoder layers are scaled up k and k² times, the third
    scaled down k², and the decoder's noise weights of the two finest levels (which inject those
    features) scaled down to match: the same function in exact arithmetic, but the second
    layer's activations (about 10⁶) overflow fp16 (largest 65504)."""
    state = random_state_dict(config, seed)
    state["ecd0.0.0.weight"] *= k
    state["ecd0.0.1.bias"] *= k
    state["ecd1.0.1.weight"] *= k
    state["ecd1.0.2.bias"] *= k * k
    state["ecd2.0.1.weight"] /= k * k
    last = sum(1 for key in state if key.startswith("generator.convs.") and key.endswith("noise.weight")) - 1
    for conv, scale in ((last, k), (last - 1, k), (last - 2, k * k), (last - 3, k * k)):
        state[f"generator.convs.{conv}.noise.weight"] /= scale
    return state


def gpen(config: ModelConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(config).eval().requires_grad_(False)
    model.load_state_dict(state)
    return model


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without native bf16: the safe precision is fp32."""
    monkeypatch.setattr("gpen_video.device.cpu_flags", lambda *a, **k: frozenset({"fpu", "avx2"}))


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr("gpen_video.device.cpu_flags", lambda *a, **k: frozenset({"avx512_bf16"}))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


# ---------------------------------------------------------------------------- auto on each device


@pytest.fixture
def mocked_cuda(monkeypatch):
    """A CUDA device that exists; ``set(bf16)`` decides what ``is_bf16_supported`` says."""
    calls: list[bool] = []
    state = {"bf16": False}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return state["bf16"] or including_emulation  # emulation is always "supported", never native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return state, calls


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_picks_bf16_where_the_gpu_computes_it(mocked_cuda, bf16, expected):
    state, calls = mocked_cuda
    state["bf16"] = bf16
    cuda = torch.device("cuda:0")
    assert resolve_dtype("auto", cuda) == expected
    assert calls == [False], "emulated bf16 (slower than fp16 on Turing/Pascal) must not count"
    assert safe_dtype(cuda) == (torch.bfloat16 if bf16 else torch.float32)
    assert resolve_dtype("fp16", cuda) == torch.float16 and resolve_dtype("fp32", cuda) == torch.float32


def test_auto_on_the_cpu_is_unchanged():
    assert resolve_dtype("auto", CPU, flags={"avx512_bf16"}) == torch.bfloat16
    assert resolve_dtype("auto", CPU, flags={"avx2"}) == torch.float32
    assert has_native_bf16(CPU, flags={"amx_bf16"}) and not has_native_bf16(CPU, flags=set())


# ---------------------------------------------------------------------------- the per-batch reduction


def test_nonfinite_faces_finds_the_rows():
    y = torch.zeros(5, 3, 4, 4, dtype=torch.float16)
    assert nonfinite_faces(y) is None
    y[1, 2, 3, 3] = math.nan
    y[3, 0, 0, 0] = math.inf
    y[4, 1, 1, 1] = -math.inf
    assert nonfinite_faces(y).tolist() == [1, 3, 4]
    big = torch.full((2, 3, 64, 64), 3e38, dtype=torch.bfloat16)  # finite, but the sum overflows
    assert len(nonfinite_faces(big)) == 0


def test_check_faces_ship_with_the_package():
    assert precision.CHECK_FACES.is_file()
    for size in (64, 256, 512):
        faces = check_faces(size)
        assert faces.shape == (2, 3, size, size) and faces.dtype == torch.float32
        assert 0 <= faces.min() and faces.max() <= 1 and faces.std() > 0.1
    sharp, degraded = check_faces(256)
    assert (sharp - degraded).abs().mean() > 0.01  # two different faces, not one twice


# ---------------------------------------------------------------------------- load-time check


@pytest.mark.parametrize("requested", ["fp16", "auto"])
def test_overflowing_checkpoint_falls_back_to_fp32_with_one_warning(tiny_config, tmp_path, no_native_bf16,
                                                                    monkeypatch, caplog, requested):
    if requested == "auto":  # a GPU without native bf16: auto means fp16
        monkeypatch.setattr("gpen_video.restore.restorer.resolve_dtype", lambda p, d, **k: torch.float16)
    state = overflowing_state_dict(tiny_config)
    faces = check_faces(64)
    with torch.inference_mode():
        assert torch.isfinite(gpen(tiny_config, state)(faces * 2 - 1)).all()
        assert not torch.isfinite(gpen(tiny_config, state).half()(faces.half() * 2 - 1)).all()
    caplog.set_level(logging.INFO)
    restorer = build_restorer(gpen(tiny_config, state), 64, name="tiny", device=CPU, precision=requested,
                              cache_dir=tmp_path)
    assert restorer.dtype == torch.float32
    choice = restorer.precision
    assert (choice.requested, choice.used) == ("fp16", "fp32")
    assert [(c.dtype, c.finite) for c in choice.checks] == [("fp16", False)]
    assert "non-finite output" in choice.reason and "running in fp32" in choice.reason
    assert len(warnings(caplog)) == 1 and "\n" not in warnings(caplog)[0]
    reference = Restorer(gpen(tiny_config, state), 64).restore_tensor(faces)
    got = restorer.restore_tensor(faces)
    assert got.numpy().tobytes() == reference.numpy().tobytes()
    assert restorer.stats.fp32_reruns == 0


def test_overflowing_checkpoint_keeps_bf16_where_the_device_has_it(tiny_config, tmp_path, native_bf16, caplog):
    """fp16 fails; the safe precision bf16 has fp32's range, passes its own check and is used."""
    state = overflowing_state_dict(tiny_config)
    caplog.set_level(logging.INFO)
    restorer = build_restorer(gpen(tiny_config, state), 64, name="tiny", device=CPU, precision="fp16",
                              cache_dir=tmp_path)
    assert restorer.dtype == torch.bfloat16
    assert [(c.dtype, c.finite) for c in restorer.precision.checks] == [("fp16", False), ("bf16", True)]
    assert restorer.precision.checks[1].psnr_db >= CHECK_PSNR_DB
    assert len(warnings(caplog)) == 1
    auto = build_restorer(gpen(tiny_config, state), 64, name="tiny", device=CPU, precision="auto", cache_dir=tmp_path)
    assert auto.precision.used == "bf16" and auto.precision.requested == "bf16"
    assert len(warnings(caplog)) == 1, "bf16 passed: no second warning"


@pytest.mark.parametrize("requested", ["fp16", "bf16"])
def test_normal_checkpoint_keeps_half_precision_and_the_verdict_is_cached(tiny_config, tmp_path, no_native_bf16,
                                                                        monkeypatch, caplog, requested):
    state = random_state_dict(tiny_config, seed=4)
    caplog.set_level(logging.INFO)
    first = build_restorer(gpen(tiny_config, state), 64, name="tiny", device=CPU, precision=requested,
                           cache_dir=tmp_path)
    assert first.precision.used == requested and first.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[requested]
    (check,) = first.precision.checks
    assert check.finite and check.psnr_db >= CHECK_PSNR_DB and not check.cached
    assert "passed the precision check" in first.precision.reason
    cached = list((tmp_path / "precision").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["dtype"] == requested

    runs: list[torch.dtype] = []
    real_run = precision._run
    monkeypatch.setattr(precision, "_run", lambda m, b, dtype, d, f: runs.append(dtype) or real_run(m, b, dtype, d, f))
    second = build_restorer(gpen(tiny_config, state), 64, name="tiny", device=CPU, precision=requested,
                            cache_dir=tmp_path)
    assert runs == [], "the second load must not run the check again"
    assert second.precision.used == requested and second.precision.checks[0].cached
    assert second.precision.checks[0].psnr_db == pytest.approx(check.psnr_db, abs=0.01)
    # another dtype, or other weights, are other entries
    build_restorer(gpen(tiny_config, random_state_dict(tiny_config, seed=5)), 64, name="tiny", device=CPU,
                   precision=requested, cache_dir=tmp_path)
    assert len(runs) == 2 and len(list((tmp_path / "precision").glob("*.json"))) == 2
    assert warnings(caplog) == []


def test_a_psnr_below_the_threshold_fails_too(tiny_config, tmp_path, no_native_bf16, caplog):
    """bf16 is finite here, at about 54 dB: a threshold above that refuses it."""
    state = random_state_dict(tiny_config, seed=4)
    choice = choose_precision(gpen(tiny_config, state), check_faces(64) * 2 - 1, torch.bfloat16, device=CPU,
                              name="tiny", cache_dir=tmp_path, threshold=90.0)
    assert choice.used == "fp32" and choice.checks[0].finite and choice.checks[0].psnr_db < 90
    assert "< 90 dB" in choice.reason and len(warnings(caplog)) == 1


def test_fp32_is_not_checked(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_run", lambda *a: pytest.fail("fp32 needs no check"))
    restorer = build_restorer(gpen(tiny_config, random_state_dict(tiny_config)), 64, name="tiny", device=CPU,
                              precision="fp32", cache_dir=tmp_path)
    assert restorer.precision.used == "fp32" and not (tmp_path / "precision").exists()


def test_the_generic_guard_takes_any_module(tmp_path, no_native_bf16):
    """An upscaler-like module with its own output convention (logits → sigmoid)."""

    class Blowup(torch.nn.Module):
        def forward(self, x):
            return (x * 1e5) * 1e-5 + x.mean()  # 1e5 overflows fp16 on the way

    batch = check_faces(32) * 2 - 1
    choice = choose_precision(Blowup(), batch, torch.float16, device=CPU, name="blowup", cache_dir=tmp_path,
                              forward=lambda m, x: m(x), unit=torch.sigmoid)
    assert choice.used == "fp32" and not choice.checks[0].finite
    fine = choose_precision(torch.nn.Conv2d(3, 3, 1), batch, torch.bfloat16, device=CPU, name="conv",
                            cache_dir=tmp_path, forward=lambda m, x: m(x), unit=torch.sigmoid)
    assert fine.used == "bf16" and fine.checks[0].psnr_db >= CHECK_PSNR_DB


def test_an_unwritable_cache_only_costs_the_check_again(tiny_config, tmp_path, no_native_bf16):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    restorer = build_restorer(gpen(tiny_config, random_state_dict(tiny_config)), 64, name="tiny", device=CPU,
                              precision="bf16", cache_dir=blocker)
    assert restorer.precision.used == "bf16"


# ---------------------------------------------------------------------------- non-finite faces in a job


class Negate(torch.nn.Module):
    def forward(self, x):
        return -x


class NaNForSomeFaces(torch.nn.Module):
    """Negation, except that in half precision every other call returns NaN for its first face
    (the fp32 reruns are not counted as calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.half_calls = 0

    def forward(self, x):
        y = -x
        if x.dtype != torch.float32:
            self.half_calls += 1
            if self.half_calls % 2 == 0:
                y = y.clone()
                y[0] = math.nan
        return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_faces_are_rerun_in_fp32_and_counted(dtype, caplog):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    restorer = Restorer(NaNForSomeFaces(), 8, dtype=dtype, batch_size=2)
    caplog.set_level(logging.INFO)
    got = restorer.restore_tensor(x)
    assert torch.isfinite(got).all()
    assert restorer.stats.fp32_reruns == 1 and restorer.stats.batches == 3  # calls 1, 2, 3: the 2nd is bad
    fp32 = Restorer(Negate(), 8).restore_tensor(x)
    half = Restorer(Negate(), 8, dtype=dtype).restore_tensor(x)
    assert not torch.equal(fp32, half)  # the two precisions are told apart
    assert got[2].numpy().tobytes() == fp32[2].numpy().tobytes()  # the rerun face: fp32's bytes
    assert got[[0, 1, 3, 4, 5]].numpy().tobytes() == half[[0, 1, 3, 4, 5]].numpy().tobytes()
    assert len([r for r in caplog.records if "restored again in fp32" in r.getMessage()]) == 1


def test_non_finite_fp32_output_is_an_error_not_a_face():
    class Broken(torch.nn.Module):
        def forward(self, x):
            return x * math.nan

    with pytest.raises(WeightsError, match="non-finite output in fp32"):
        Restorer(Broken(), 8).restore_tensor(torch.rand(2, 3, 8, 8))
    with pytest.raises(WeightsError, match="in fp16 and in fp32"):
        Restorer(Broken(), 8, dtype=torch.float16).restore_tensor(torch.rand(2, 3, 8, 8))


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=640)


def test_nan_faces_in_a_video_are_rerun_pasted_and_reported(detector, tmp_path):
    clip = tmp_path / "clip.mp4"
    render_clip(clip, seconds=0.4, size=(320, 192), faces=1, seed=3)
    config = load_config(None, device="cpu")
    guarded = FacePipeline(config, restorer=Restorer(NaNForSomeFaces(), 256, dtype=torch.float16), detector=detector)
    plain = FacePipeline(config, restorer=Restorer(NaNForSomeFaces(), 256), detector=detector)
    report = tmp_path / "r.json"
    result = guarded.restore_video(clip, tmp_path / "out.mp4", report=report)
    assert result.faces_restored == 10 and result.fp32_reruns == 5
    data = json.loads(report.read_text())
    assert data["precision"]["fp32_reruns"] == 5 and data["precision"]["used"] == "fp16"
    assert "fp32" in _summary(result) and "5 faces rerun in fp32" in _summary(result)
    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    got = list(guarded.restore_frames(iter(frames)))
    want = list(plain.restore_frames(iter(frames)))
    assert guarded.restorer.stats.fp32_reruns == 10
    for a, b, source in zip(got, want, frames):
        # the negated face differs from the frame; NaN pasted would be black or garbage
        assert np.abs(a.astype(int) - source).max() > 100
        assert np.abs(a.astype(int) - b).max() <= 2  # fp16 rounding of the other faces only


def test_summary_without_reruns_says_nothing_of_them(tmp_path):
    result = JobResult(tmp_path / "a.mp4", tmp_path / "b.mp4", frames=3, faces_restored=3, tracks=1, seconds=1.0)
    assert "fp32" not in _summary(result)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def overflowing_256(tmp_path_factory) -> Path:
    from gpen_video.restore.model import preset_config

    path = tmp_path_factory.mktemp("overflow") / "GPEN-BFR-256-overflow.pth"
    torch.save(overflowing_state_dict(preset_config("GPEN-BFR-256"), seed=1), path)
    return path


@pytest.fixture
def portrait(tmp_path) -> Path:
    canvas = np.full((320, 480, 3), 90, np.uint8)
    canvas[:, 80:400] = cv2.resize(astronaut(), (320, 320))
    path = tmp_path / "portrait.png"
    cv2.imwrite(str(path), canvas[:, :, ::-1])
    return path


def test_cli_fp16_on_overflowing_weights_gives_the_fp32_bytes(overflowing_256, portrait, tmp_path, capsys,
                                                                no_native_bf16, monkeypatch):
    common = ["--model", "GPEN-BFR-256", "--weights", overflowing_256, "--device", "cpu", "--cache-dir", tmp_path]
    runs = {}
    for name, flag in (("fp32", "fp32"), ("fp16", "fp16"), ("fp16-cached", "fp16"), ("auto", "auto")):
        if name == "auto":  # as on a GPU without native bf16
            monkeypatch.setattr("gpen_video.restore.restorer.resolve_dtype", lambda p, d, **k: torch.float16)
        out = tmp_path / f"{name}.png"
        code = main([str(a) for a in ("restore", portrait, "-o", out, "--precision", flag, *common)])
        err = capsys.readouterr().err
        assert code == 0, err
        runs[name] = (out.read_bytes(), err)
    for name in ("fp16", "fp16-cached", "auto"):
        data, err = runs[name]
        assert data == runs["fp32"][0], f"{name}: output differs from the fp32 run"
        lines = [line for line in err.splitlines() if WARNING in line]
        assert len(lines) == 1 and lines[0].startswith("warning: GPEN-BFR-256: fp16 failed"), err
    assert WARNING not in runs["fp32"][1]
    assert cv2.imread(str(tmp_path / "fp32.png")).astype(int).std() > 10


# ---------------------------------------------------------------------------- the GPU script


def test_gpu_check_script_is_valid_and_exits_cleanly_without_cuda(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script itself (minutes)")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable,
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "auto -> torch." in done.stdout and "no CUDA device" in done.stdout


def test_every_step_of_the_gpu_script_runs_on_the_cpu(tmp_path):
    """``--cpu-smoke`` runs each step's command at toy sizes: a GPU lent for minutes is not
    spent on a typo."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--cpu-smoke"], capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable,
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert ": exit " not in done.stdout, done.stdout  # no step failed
    out = done.stdout
    assert re.search(r"GPEN-BFR-256 +bf16 +pass", out)  # the guard's verdict
    assert re.search(r"GPEN-BFR-256 +1 +bf16 +NCHW +\d+\.\d+", out)  # forward faces/s
    assert re.search(r"e2e 1f +pipeline, 1 face\(s\) +10 +10 ", out)  # end to end: 10 frames, 10 faces
    assert re.search(r"realesr-animevideov3 +bf16 +\d+\.\d+", out)  # upscaler frames/s


# ---------------------------------------------------------------------------- the face parser


class NaNParser(torch.nn.Module):
    """A parser whose half-precision logits are NaN for the first face of every call once armed
    (after the load-time check, which would otherwise refuse the half precision)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.armed = False

    def forward(self, x):
        logits, image = self.net(x)
        if self.armed and x.dtype != torch.float32:
            logits = logits.clone()
            logits[0] = math.nan
        return logits, image


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parser_in_half_precision_is_checked_and_guarded(tmp_path, no_native_bf16, dtype):
    from gpen_video.restore.parsing import ParsingMasker, parse_net

    torch.manual_seed(0)
    state = parse_net().eval().state_dict()
    net = parse_net()
    net.load_state_dict(state)
    masker = ParsingMasker.from_network(net, input_size=64, batch_size=2, dtype=dtype, cache_dir=tmp_path)
    check = masker.precision.checks[0]
    assert check.dtype == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] and check.finite
    assert masker.precision.used == (check.dtype if check.passed() else "fp32")
    assert len(list((tmp_path / "precision").glob("*.json"))) == 1

    guarded_net = NaNParser(parse_net())
    guarded_net.net.load_state_dict(state)
    guarded = ParsingMasker.from_network(guarded_net, input_size=64, batch_size=2, cache_dir=tmp_path, dtype=dtype)
    assert guarded.precision.used == masker.precision.used
    if guarded.precision.used == "fp32":
        pytest.skip("this half precision failed its check on random parser weights; nothing to guard")
    guarded.net.armed = True
    plain_net = parse_net()
    plain_net.load_state_dict(state)
    plain = ParsingMasker.from_network(plain_net.float(), input_size=64, batch_size=2)
    crops = check_faces(64).repeat(2, 1, 1, 1)  # 4 crops, 2 calls: faces 0 and 2 get NaN logits
    labels = guarded.labels(crops)
    assert guarded.stats.fp32_reruns == 2
    reference = plain.labels(crops)
    assert np.array_equal(labels[[0, 2]], reference[[0, 2]])  # parsed again in fp32
