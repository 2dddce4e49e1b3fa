"""What only a GPU can show: measured memory, pinned uploads (skipped without CUDA).

Every torch path CUDA runs is also tested on the CPU (test_model, test_restore, test_warp,
parametrised over tests.devices.DEVICES); this file keeps the GPU-only measurements.
"""

import numpy as np
import pytest
import torch

from gpen_video.device import free_memory
from gpen_video.records import Frame
from gpen_video.restore.model import build_model, preset_config
from gpen_video.restore.restorer import Restorer, fit_batch_size, measure_face_bytes
from gpen_video.warp import create_warp
from tests.test_warp import face_at, frame_u8, similarity

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fitted_batch_runs_with_its_frames_held():
    config = preset_config("GPEN-BFR-256")
    device = torch.device("cuda")
    restorer = Restorer(build_model(config), config.size, device=device, dtype=torch.float16)
    per_face = measure_face_bytes(restorer)
    assert 3 * 256 * 256 * 4 < per_face < 2**30
    assert restorer.stats.faces == 0  # the probe is not counted as work
    warp = create_warp("torch", size=config.size, device=device)
    frame_bytes = warp.held_bytes(1080, 1920, np.uint8)
    batch = fit_batch_size(
        free_bytes=free_memory(device), per_face_bytes=per_face, frame_bytes=frame_bytes,
        frames_held=lambda b: max(16, 2 * b) + 32,
    )
    assert batch >= 1 and batch & (batch - 1) == 0
    restorer.batch_size = batch
    held = [torch.zeros(3, 1080, 1920, dtype=torch.uint8, device=device) for _ in range(max(16, 2 * batch) + 32)]
    out = restorer.restore_tensor(torch.rand(batch, 3, config.size, config.size, device=device))
    assert out.shape == (batch, 3, config.size, config.size) and restorer.stats.oom_stepdowns == 0
    del held


def test_cuda_warp_matches_the_cpu_reference():
    """Pinned upload, crop, fp16-like restored faces and paste on CUDA against OpenCV on the CPU."""
    frame = Frame(0, 0, 1, frame_u8(240, 320))
    faces = [face_at(similarity(1.0, 5, -40, -30), 128), face_at(similarity(1.2, -5, -120, -60), 128)]
    outs = {}
    for kind, device in (("opencv", "cpu"), ("torch", "cuda")):
        warp = create_warp(kind, size=128, device=torch.device(device))
        crops = warp.crop(frame, faces)
        assert crops.pixels.device.type == device
        restored = (1.0 - crops.pixels).to(torch.float16)
        outs[kind] = warp.paste(crops, restored, strength=1.0).rgb
    diff = np.abs(outs["torch"].astype(int) - outs["opencv"])
    assert diff.max() <= 1 and diff.mean() < 0.05
