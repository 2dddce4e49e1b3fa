"""Restorer (value mapping, precisions, memory layout, out-of-memory step-down), batch fitting,
device and precision choice, and the face-parsing masker."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_state_dict

from gpen_video.device import cpu_flags, free_memory, resolve_device, resolve_dtype
from gpen_video.errors import DeviceError, WeightsError
from gpen_video.restore.model import build_model
from gpen_video.restore.parsing import ParsingMasker, parse_net
from gpen_video.restore.restorer import Restorer, fit_batch_size, measure_face_bytes
from gpen_video.warp.masks import labels_to_mask
from tests.devices import DEVICES
from tests.numerics import assert_close_to_scale


class Negate(torch.nn.Module):
    def forward(self, x):
        return -x


class Flaky(torch.nn.Module):
    """Identity that runs out of memory above ``limit`` faces per call."""

    def __init__(self, limit: int, message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> None:
        super().__init__()
        self.limit, self.message = limit, message
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(self.message)
        return x


def psnr_unit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [0, 1]."""
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------- values and shapes


def test_value_mapping_and_output_dtype():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = Restorer(Negate(), 8, batch_size=2).restore_tensor(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # -x in [-1, 1] is 1 - v in [0, 1]
    torch.testing.assert_close(y, 1 - x, atol=1e-6, rtol=0)


def test_output_is_clipped_to_range():
    class Loud(torch.nn.Module):
        def forward(self, x):
            return x * 5

    x = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 1, 4).expand(1, 3, 4, 4)
    y = Restorer(Loud(), 4).restore_tensor(x)
    assert y[0, :, 0].tolist() == [[0.0, 0.5, 1.0, 0.0]] * 3


@pytest.mark.parametrize(
    "x, error",
    [
        (torch.zeros(1, 3, 4, 4), r"\(n, 3, 8, 8\)"),
        (torch.zeros(3, 8, 8), r"\(n, 3, 8, 8\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_input_is_rejected(x, error):
    with pytest.raises(ValueError, match=error):
        Restorer(Negate(), 8).restore_tensor(x)


def test_empty_batch():
    restorer = Restorer(Negate(), 8)
    assert restorer.restore_tensor(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)
    assert restorer.stats.batches == 0


# ---------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB", "DefaultCPUAllocator: out of memory"])
def test_out_of_memory_steps_batch_down_and_finishes(message):
    model = Flaky(limit=5, message=message)
    restorer = Restorer(model, 16, batch_size=32)
    x = torch.rand(40, 3, 16, 16)
    y = restorer.restore_tensor(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert restorer.batch_size == 4
    assert restorer.stats.oom_stepdowns == 3 and restorer.stats.faces == 40 and restorer.stats.batches == 10
    assert model.calls[:4] == [32, 16, 8, 4] and max(model.calls[3:]) <= 4


def test_out_of_memory_at_batch_one_is_raised():
    with pytest.raises(torch.OutOfMemoryError):
        Restorer(Flaky(limit=0), 8, batch_size=4).restore_tensor(torch.rand(2, 3, 8, 8))


def test_other_errors_are_not_swallowed():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    restorer = Restorer(Broken(), 8, batch_size=4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        restorer.restore_tensor(torch.zeros(2, 3, 8, 8))
    assert restorer.batch_size == 4 and restorer.stats.oom_stepdowns == 0


# ---------------------------------------------------------------------------- precisions and layout


@pytest.fixture(scope="module")
def tiny_gpen_state(tiny_config):
    """The 64-px reference architecture with random weights."""
    return tiny_config, random_state_dict(tiny_config, seed=2)


def tiny_restorer(state, **kwargs) -> Restorer:
    config, weights = state
    model = build_model(config)
    model.load_state_dict(weights)
    return Restorer(model, config.size, **kwargs)


def faces_64(n: int = 3) -> torch.Tensor:
    """Smooth random crops in [0, 1]: low-frequency noise like faces, not white noise."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
    return torch.nn.functional.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_restorer_close_to_fp32(tiny_gpen_state, device, dtype, channels_last):
    x = faces_64()
    ref = tiny_restorer(tiny_gpen_state).restore_tensor(x)
    restorer = tiny_restorer(
        tiny_gpen_state, device=torch.device(device), dtype=dtype, batch_size=2, channels_last=channels_last
    )
    got = restorer.restore_tensor(x.to(device))
    assert got.dtype == torch.float32 and got.device.type == device and restorer.stats.batches == 2
    assert ref.std() > 0.05  # the network really does something
    assert psnr_unit(got.cpu(), ref) >= 40.0


def test_channels_last_reaches_the_model_on_cpu(tiny_gpen_state):
    seen: list[bool] = []
    restorer = tiny_restorer(tiny_gpen_state, channels_last=True)
    restorer.model.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = faces_64(2)
    got = restorer.restore_tensor(x)
    assert seen == [True, True]
    # another memory layout picks other convolution kernels: same values to 5 digits of their scale
    nchw = tiny_restorer(tiny_gpen_state, channels_last=False).restore_tensor(x)
    assert_close_to_scale(got, nchw, rel=1e-5, what="restored faces")
    assert Restorer(Negate(), 8).channels_last  # default on, the CPU included (faster there too)


# ---------------------------------------------------------------------------- batch size


@pytest.mark.parametrize(
    "free, per_face, frame, held, limit, expected",
    [
        (1000, 100, 0, lambda b: 0, 128, 8),  # 8 faces = 800 = 0.8 × 1000
        (1000, 100, 10, lambda b: b + 4, 128, 4),  # 8 faces + 12 frames = 920 > 800
        (10**10, 1, 1, lambda b: 2 * b, 128, 128),  # the limit
        (10**10, 1, 1, lambda b: 2 * b, 100, 64),  # a power of two under a limit that is none
        (50, 100, 0, lambda b: 0, 128, 1),  # nothing fits: 1, the step-down does the rest
        (2**30, 2**20, 6_220_800, lambda b: max(16, 2 * b) + 32, 128, 32),  # 1080p frames dominate
    ],
)
def test_fit_batch_size(free, per_face, frame, held, limit, expected):
    got = fit_batch_size(free_bytes=free, per_face_bytes=per_face, frame_bytes=frame, frames_held=held, limit=limit)
    assert got == expected
    budget = 0.8 * free
    if got > 1:
        assert got * per_face + held(got) * frame <= budget
    if 2 * got <= limit:
        assert 2 * got * per_face + held(2 * got) * frame > budget


def test_fit_batch_size_counts_held_frames():
    """The same memory fits fewer faces when the pipeline holds more frames on the device."""
    common = {"free_bytes": 8 * 2**30, "per_face_bytes": 40 * 2**20, "frame_bytes": 4 * 1920 * 1080 * 3}
    light = fit_batch_size(**common, frames_held=lambda b: 0)
    heavy = fit_batch_size(**common, frames_held=lambda b: max(16, 2 * b) + 32)
    assert light == 128 and heavy == 64


@pytest.mark.parametrize(
    "kwargs, error",
    [({"per_face_bytes": 0}, "per_face_bytes > 0"), ({"free_bytes": -1}, "free_bytes >= 0"),
     ({"limit": 0}, "limit >= 1"), ({"headroom": 1.5}, "headroom")],
)
def test_fit_batch_size_rejects_bad_input(kwargs, error):
    args = {"free_bytes": 1000, "per_face_bytes": 10, "frame_bytes": 0, "frames_held": lambda b: 0} | kwargs
    with pytest.raises(ValueError, match=error):
        fit_batch_size(**args)


def test_memory_measurements_are_cuda_only():
    with pytest.raises(ValueError, match="CUDA"):
        measure_face_bytes(Restorer(Negate(), 8))
    with pytest.raises(ValueError, match="CUDA"):
        free_memory(torch.device("cpu"))


# ---------------------------------------------------------------------------- device and precision


@pytest.mark.parametrize(
    "precision, device, flags, expected",
    [
        ("auto", "cpu", {"fpu", "avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
        ("auto", "cpu", {"fpu", "avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
        ("auto", "cpu", {"fpu", "avx2", "avx512f"}, torch.float32),
        ("auto", "cpu", set(), torch.float32),
        ("auto", "cuda", set(), torch.float16),
        ("fp32", "cpu", {"avx512_bf16"}, torch.float32),
        ("fp16", "cpu", set(), torch.float16),
        ("bf16", "cpu", set(), torch.bfloat16),
    ],
)
def test_resolve_dtype(precision, device, flags, expected):
    assert resolve_dtype(precision, torch.device(device), flags=flags) == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert resolve_dtype("auto", torch.device("cpu"), flags=cpu_flags(info)) == torch.bfloat16


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------- parsing mask


class OneHotParser(torch.nn.Module):
    """Stands in for ParseNet: logits that pick a fixed label map for every input."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("labels", torch.from_numpy(labels).long())
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x)
        one_hot = torch.nn.functional.one_hot(self.labels, 19).permute(2, 0, 1).float()
        return one_hot[None].expand(len(x), -1, -1, -1), x


def test_parse_labels_map_to_face_only() -> None:
    labels = np.full((512, 512), 13, np.int64)  # hair everywhere
    yy, xx = np.indices((512, 512))
    labels[(yy - 256) ** 2 + (xx - 256) ** 2 < 150**2] = 1  # skin disc
    labels[(yy - 220) ** 2 + (xx - 200) ** 2 < 15**2] = 4  # an eye on it
    labels[430:, 150:360] = 17  # neck below
    net = OneHotParser(labels)
    masker = ParsingMasker.from_network(net, batch_size=2)
    restored = torch.zeros(3, 3, 256, 256)
    restored[1] = 1.0
    masks = masker.masks(restored)
    assert masks.shape == (3, 256, 256) and masks.dtype == np.float32
    assert len(net.seen) == 2 and net.seen[0].shape == (2, 3, 512, 512)
    assert net.seen[0][0].unique().tolist() == [-1.0] and net.seen[0][1].unique().tolist() == [1.0]
    m = masks[0]
    assert m[128, 128] == pytest.approx(1.0, abs=1e-4)
    assert m[110, 100] == pytest.approx(1.0, abs=1e-4)  # the eye counts as face
    assert m[10, 10] < 1e-4 and m[250, 128] < 1e-3  # hair and neck do not
    np.testing.assert_allclose(masks[1], m)
    np.testing.assert_allclose(m, labels_to_mask(labels, 256))
    assert masker.stats.crops == 3 and masker.stats.batches == 2


@pytest.fixture(scope="module")
def parsenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("parsenet") / "ParseNet-latest.pth"
    torch.save(parse_net().state_dict(), path)
    return path


def test_parse_masker_runs_with_random_weights(parsenet_file: Path) -> None:
    # the parser is fully convolutional: 128 instead of 512 keeps this test fast
    masker = ParsingMasker(parsenet_file, progress=False, input_size=128, batch_size=2)
    masks = masker.masks(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    assert masks.shape == (2, 128, 128) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert masker.stats.crops == 2


def test_parse_masker_rejects_other_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "ParseNet-latest.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsError, match="ParseNet"):
        ParsingMasker(path)


_REUSE_PROBE = """
import resource, sys, torch
from gpen_video.device import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap()
def step():  # like a network's activations: 64, 64 and 128 MiB, freed at once
    a = torch.ones(2**24); b = a * 2; return float(torch.cat([a, b])[-1])
for _ in range(4):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_restorer_process_reuses_freed_activation_memory():
    """keep_freed_heap (called by Restorer on the CPU): repeated large activations reuse freed
    pages instead of faulting fresh ones (measured: 0 or 32768 faults against 262156)."""
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], capture_output=True, text=True,
                                 check=True).stdout)
        for mode in ("default", "keep")
    }
    assert faults["default"] > 100_000 and faults["keep"] * 4 < faults["default"], faults
