"""Enlarged frames kept on the device from upscale to paste (``DevicePicture``): the same
pixels and bytes as the host path, the crop reading the device tensor with no host RGB made,
and frames without faces downloaded once, for the writer.

The path is meant for CUDA (a network upscaler and the torch warp on one GPU); the pipeline
tests turn it on for the CPU, where it runs the same code."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from gpen_video.faces.detect import create_detector
from gpen_video.pipeline import STAGE_DEPTH
from gpen_video.records import Frame
from gpen_video.restore.restorer import Restorer
from gpen_video.upscale.stage import UpscaleStage
from gpen_video.upscale.upscaler import LanczosUpscaler
from gpen_video.warp.torch_warp import DevicePicture, TorchWarp
from samples.make_demo import render_clip
from tests.clips import make_clip
from tests.devices import DEVICES
from tests.test_upscale_pipeline import Brighter, one_face_clip, pipeline_for
from tests.test_warp import face_at, frame_u8, similarity, widen


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=320)


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory) -> Path:
    return one_face_clip(tmp_path_factory.mktemp("faces"))


def small_frames(dtype: type, count: int = 3) -> list[Frame]:
    rng = np.random.default_rng(4)
    top = np.iinfo(dtype).max
    return [Frame(i, i, Fraction(1, 25), rng.integers(0, top, (9, 16, 3), dtype=dtype, endpoint=True))
            for i in range(count)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_enlarged_pixels_stay_on_the_device_until_read(device, dtype):
    stage = UpscaleStage(LanczosUpscaler(2), name="lanczos", batch_size=3, device=device)
    frames = small_frames(dtype)
    host, kept = stage.enlarge(frames), stage.enlarge(frames, on_device=True)
    for big, frame in zip(host, kept):
        picture = frame.source
        assert isinstance(picture, DevicePicture) and not frame.rgb_made and not picture.rgb_made
        assert frame.shape == (18, 32, 3) and frame.dtype == dtype  # known without a download
        held = picture.tensor
        assert held.device.type == torch.device(device).type and held.shape == (3, 18, 32)
        assert held.dtype == (torch.uint8 if dtype == np.uint8 else torch.int32)
        assert held.untyped_storage().nbytes() == held.numel() * held.element_size()  # not a view of its batch
        np.testing.assert_array_equal(frame.rgb, big.rgb)
        assert frame.rgb.dtype == dtype and picture.rgb_made and frame.rgb is picture.rgb


def test_a_device_picture_of_the_wrong_integers_is_refused():
    with pytest.raises(ValueError, match=r"DevicePicture.tensor must be torch.int32 for uint16 frames"):
        DevicePicture(torch.zeros((3, 4, 4), dtype=torch.uint8), np.uint16)
    with pytest.raises(ValueError, match=r"must have shape \(3, n, n\), got \(4, 4, 3\)"):
        DevicePicture(torch.zeros((4, 4, 3), dtype=torch.uint8), np.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_torch_warp_crops_a_device_frame_in_place(device, dtype):
    """Crop and paste of a frame kept on the device equal those of the same frame on the host;
    neither makes the kept frame's host RGB, and the pasted frame drops the device copy."""
    small = Frame(0, 0, Fraction(1, 25), widen(frame_u8(150, 200), dtype))
    stage = UpscaleStage(LanczosUpscaler(2), name="lanczos", device=device)
    (host,), (kept,) = stage.enlarge([small]), stage.enlarge([small], on_device=True)
    warp = TorchWarp(64, device=device)
    faces = [face_at(similarity(0.5, 10, -60, -40), 64), face_at(similarity(0.4, -5, -150, -90), 64, box_side=80)]
    want, got = warp.crop(host, faces), warp.crop(kept, faces)
    assert got.held is kept.source.tensor  # the upscaler's tensor itself, nothing uploaded
    assert not kept.rgb_made and not kept.source.rgb_made
    torch.testing.assert_close(got.pixels, want.pixels, rtol=0, atol=0)
    restored = 1.0 - want.pixels
    expected, pasted = warp.paste(want, restored, strength=0.8), warp.paste(got, restored, strength=0.8)
    assert not kept.source.rgb_made, "the paste downloads its result, not the frame it pasted into"
    assert pasted.source is None and pasted.rgb.dtype == dtype
    np.testing.assert_array_equal(pasted.rgb, expected.rgb)


def test_the_pipeline_keeps_frames_on_the_device_only_beside_a_gpu_torch_warp(detector):
    """On the CPU there is no copy to save: Lanczos (always on the CPU), either warp, stays on
    the host path; the memory fit counts the upscaler's queue and batch once it is on."""
    for warp in ("opencv", "torch"):
        assert not pipeline_for(detector, warp=warp).upscale_on_device
    pipeline = pipeline_for(detector, warp="torch")
    fit = dict(free_bytes=1 << 29, face_bytes=24 << 20)
    host_held, host_batch = pipeline.frames_on_device(8), pipeline.fit_batch(576, 720, np.uint8, **fit)
    pipeline.upscale_on_device = True
    assert pipeline.frames_on_device(8) == host_held + STAGE_DEPTH + pipeline.upscale.batch_size
    assert pipeline.fit_batch(576, 720, np.uint8, **fit) < host_batch


class Watched:
    """What the crop and the upscale stage of a pipeline saw: the frame given to each crop
    (with whether its host RGB existed then) and every enlarged frame's source."""

    def __init__(self, pipeline) -> None:
        self.cropped: dict[int, bool] = {}
        self.sources: dict[int, object] = {}
        crop, enlarge = pipeline.warp.crop, pipeline.upscale.enlarge

        def watched_crop(frame, faces):
            self.cropped[frame.index] = frame.rgb_made
            return crop(frame, faces)

        def watched_enlarge(frames, **kwargs):
            out = enlarge(frames, **kwargs)
            self.sources.update((f.index, f.source) for f in out)
            return out

        pipeline.warp.crop, pipeline.upscale.enlarge = watched_crop, watched_enlarge


@pytest.fixture(scope="module")
def face_leaves(tmp_path_factory) -> Path:
    """1 s, 25 frames: a face in the first 12, then none."""
    path = tmp_path_factory.mktemp("leaves") / "leaves.mp4"
    render_clip(path, seconds=1.0, size=(320, 180), visible=lambda face, index: index < 12)
    return path


@pytest.fixture(scope="module")
def turned_10_bit(tmp_path_factory) -> Path:
    """4 frames of 10-bit 4:2:2 shown turned by 90°, no faces: int32 on the device."""
    return make_clip(tmp_path_factory.mktemp("ten") / "turned.mov", frames=4, size=(48, 32),
                     pix_fmt="yuv422p10le", rotation=90)


@pytest.mark.parametrize("clip", ["face_leaves", "turned_10_bit"])
def test_a_job_kept_on_the_device_writes_the_bytes_of_the_host_path(detector, request, tmp_path, clip):
    """The same job with frames kept on the device from upscale to paste and without: the
    same bytes. Each frame with faces reached its crop with no host RGB made, and never made
    one (only the paste's result is downloaded); each frame without faces was downloaded
    once, by the writer."""
    src = request.getfixturevalue(clip)
    suffix = src.suffix
    host, kept = tmp_path / f"host{suffix}", tmp_path / f"kept{suffix}"
    pipeline_for(detector, Brighter(), warp="torch").restore_video(src, host)
    pipeline = pipeline_for(detector, Brighter(), warp="torch")
    pipeline.upscale_on_device = True
    seen = Watched(pipeline)
    pipeline.restore_video(src, kept)
    assert kept.read_bytes() == host.read_bytes()

    assert seen.sources and all(isinstance(s, DevicePicture) for s in seen.sources.values())
    assert not any(seen.cropped.values()), "a crop was given a frame whose host RGB was made"
    for index, picture in seen.sources.items():
        assert picture.rgb_made == (index not in seen.cropped), index
    if clip == "face_leaves":
        assert 0 < len(seen.cropped) < len(seen.sources) == 25, "frames with and without faces"
    else:
        assert not seen.cropped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_network_upscaler_keeps_frames_on_the_gpu(detector, face_clip, tmp_path):
    """The real case: realesr-animevideov3 and the torch warp (``--warp auto``) on one GPU."""
    from gpen_video.config import load_config
    from gpen_video.jobs.api import FacePipeline

    def cuda_pipeline() -> FacePipeline:
        config = load_config(None, device="cuda", upscale=2, upscaler="realesr-animevideov3", precision="fp32",
                             cache_dir=str(tmp_path / "cache"))
        return FacePipeline(config, restorer=Restorer(Brighter(), 256, device="cuda"), detector=detector)

    host, kept = tmp_path / "host.mp4", tmp_path / "kept.mp4"
    reference = cuda_pipeline()
    assert reference.upscale_on_device
    reference.upscale_on_device = False
    reference.restore_video(face_clip, host)
    pipeline = cuda_pipeline()
    seen = Watched(pipeline)
    pipeline.restore_video(face_clip, kept)
    assert kept.read_bytes() == host.read_bytes()
    assert seen.cropped and not any(seen.cropped.values())
    assert all(s.tensor.is_cuda for s in seen.sources.values())

