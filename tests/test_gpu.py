"""CUDA paths end to end (skipped without a GPU)."""

import numpy as np
import pytest
import torch

from gpen_video.restore.model import build_model, preset_config
from gpen_video.restore.restorer import Restorer, fit_batch_size

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fit_batch_size_fits_and_runs():
    config = preset_config("GPEN-BFR-256")
    restorer = Restorer(build_model(config), config.size, device=torch.device("cuda"), dtype=torch.float16)
    batch = fit_batch_size(restorer)
    assert batch >= 1 and batch & (batch - 1) == 0
    restorer.batch_size = batch
    out = restorer.restore(np.zeros((batch, config.size, config.size, 3), np.uint8))
    assert out.shape == (batch, config.size, config.size, 3)


def test_gpu_pipeline_matches_cpu_reference(tmp_path):
    """Identity network: CUDA crop/paste (torch) against the CPU OpenCV path."""
    import av

    from gpen_video.config import load_config
    from gpen_video.pipeline import FacePipeline
    from samples.make_demo import render_clip
    from tests.clips import psnr

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    clip = tmp_path / "clip.mp4"
    render_clip(clip, seconds=1, size=(480, 272), faces=2, audio=False)
    decoded = {}
    for device in ("cpu", "cuda"):
        config = load_config(None, device=device, overwrite=True, codec="ffv1")
        restorer = Restorer(Identity(), 256, device=torch.device(device), dtype=torch.float16 if device == "cuda" else torch.float32)
        out = tmp_path / f"{device}.mkv"
        FacePipeline(config, restorer=restorer, progress=False).restore_video(clip, out)
        with av.open(str(out)) as c:
            decoded[device] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded["cpu"]) == len(decoded["cuda"]) == 25
    assert min(psnr(a, b) for a, b in zip(decoded["cpu"], decoded["cuda"])) > 38
