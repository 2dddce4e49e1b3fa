"""The Python API: FacePipeline built once, restore_video / restore_frames, progress, cancel,
and every exit path stopping the stage threads."""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from gpen_video import Cancelled, FacePipeline, GpenVideoError, load_config
from gpen_video.faces.detect import create_detector
from gpen_video.restore.restorer import Restorer
from samples.make_demo import render_clip

ROOT = Path(__file__).resolve().parent.parent
SIZE = (320, 192)


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=640)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api") / "clip.mp4"
    render_clip(path, seconds=1.2, size=SIZE, faces=1, seed=3)
    return path


def pipeline_for(detector, **overrides) -> FacePipeline:
    config = load_config(None, device="cpu", **overrides)
    return FacePipeline(config, restorer=Restorer(torch.nn.Identity(), 256), detector=detector)


def stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gpen-video-")]


def frame_count(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_restore_video_writes_beside_the_input_and_reports_progress(detector, clip, tmp_path):
    src = tmp_path / "tape.mp4"
    shutil.copy(clip, src)
    calls: list[tuple[int, int | None]] = []
    result = pipeline_for(detector).restore_video(src, progress=lambda done, total: calls.append((done, total)))
    assert result.output == tmp_path / "tape.restored.mp4" and result.output.exists()
    assert [done for done, _ in calls] == list(range(1, result.frames + 1))
    assert result.frames == frame_count(src) == 30
    assert {total for _, total in calls} == {30}
    assert result.faces_restored == 30 and result.tracks == 1
    assert stage_threads() == []


def test_one_pipeline_serves_many_files(detector, clip, tmp_path):
    pipeline = pipeline_for(detector)
    outs = [pipeline.restore_video(clip, tmp_path / f"out{i}.mp4") for i in range(2)]
    assert [r.faces_restored for r in outs] == [30, 30]
    assert pipeline.restorer.stats.faces == 60


@pytest.mark.parametrize("how", ["progress", "event"])
def test_cancel_stops_cleanly(detector, clip, tmp_path, how):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cancel = threading.Event()

    def progress(done, total):
        if done == 5:
            if how == "progress":
                raise Cancelled()
            cancel.set()

    with pytest.raises(Cancelled):
        pipeline_for(detector).restore_video(clip, out_dir / "out.mp4", report=out_dir / "r.json",
                                             progress=progress, cancel=cancel)
    assert list(out_dir.iterdir()) == []
    assert stage_threads() == []


def test_restore_frames_arrays_in_arrays_out_in_order(detector, clip):
    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = list(pipeline_for(detector).restore_frames(iter(frames)))
    assert len(out) == len(frames)
    for a, b in zip(frames, out):
        assert b.shape == a.shape and b.dtype == np.uint8
        # identity network: the face round-trips (interpolation error only), the rest is exact
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.mean() < 1.0
        assert (diff.max(axis=-1) == 0).mean() > 0.5
    assert stage_threads() == []


def test_restore_frames_closed_early_stops_every_stage(detector):
    face = astronaut()[::2, ::2]
    gen = pipeline_for(detector).restore_frames(face.copy() for _ in range(200))
    first = next(gen)
    assert first.shape == face.shape
    gen.close()
    assert stage_threads() == []


def test_restore_frames_rejects_wrong_arrays(detector):
    from gpen_video.errors import InputError

    with pytest.raises(InputError, match="frame 0 must be an"):
        list(pipeline_for(detector).restore_frames([np.zeros((8, 8), np.uint8)]))
    assert stage_threads() == []


class Boom(RuntimeError):
    pass


def inject(pipeline: FacePipeline, stage: str, monkeypatch) -> None:
    """Make ``stage`` fail on its 6th call (the detector's 2nd: it sees 8 frames a call)."""
    calls = {"n": 0}
    fail_at = 2 if stage == "detect" else 6

    def failing(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise Boom(stage)
            return fn(*args, **kwargs)

        return wrapped

    if stage == "decode":
        from gpen_video.io import decode

        original = decode.VideoReader.frames

        def frames(self, *args, **kwargs):
            for i, frame in enumerate(original(self, *args, **kwargs)):
                if i == 6:
                    raise Boom(stage)
                yield frame

        monkeypatch.setattr(decode.VideoReader, "frames", frames)
    elif stage == "detect":
        monkeypatch.setattr(pipeline.detector, "detect", failing(pipeline.detector.detect))
    elif stage == "crop":
        monkeypatch.setattr(pipeline.warp, "crop", failing(pipeline.warp.crop))
    elif stage == "restore":
        monkeypatch.setattr(pipeline.restorer, "restore_tensor", failing(pipeline.restorer.restore_tensor))
    elif stage == "paste":
        monkeypatch.setattr(pipeline.warp, "paste", failing(pipeline.warp.paste))
    elif stage == "encode":
        from gpen_video.io import encode

        monkeypatch.setattr(encode.VideoWriter, "write", failing(encode.VideoWriter.write))


@pytest.mark.parametrize("stage", ["decode", "detect", "crop", "restore", "paste", "encode"])
def test_an_error_in_any_stage_stops_every_thread_and_frees_memory(detector, clip, tmp_path, stage, monkeypatch):
    pipeline = pipeline_for(detector, detect_size=320, retries=0)
    pipeline.restore_video(clip, tmp_path / "warm.mp4")  # first-use allocations out of the way
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    inject(pipeline, stage, monkeypatch)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GpenVideoError, match=rf"segment 1 of 1 \(frames 0-29\) failed once: Boom: {stage}") as failed:
        pipeline.restore_video(clip, out_dir / "out.mp4", report=out_dir / "r.json")
    assert isinstance(failed.value.__cause__, Boom)
    del failed
    assert stage_threads() == [], f"threads left after an error in {stage}"
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    frame_bytes = SIZE[0] * SIZE[1] * 3
    assert after - before < 2 * frame_bytes, f"{(after - before) / frame_bytes:.1f} frames still held"
    assert list(out_dir.iterdir()) == []


def test_library_honours_gpen_video_home(gpen256_file, clip, tmp_path, monkeypatch, detector):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(gpen256_file, home / "GPEN-BFR-256.pth")
    monkeypatch.setenv("GPEN_VIDEO_HOME", str(home))
    pipeline = FacePipeline(load_config(None, model="GPEN-BFR-256", device="cpu", offline=True), detector=detector)
    assert pipeline.restorer.size == 256
    assert (home / "GPEN-BFR-256.pth.sha256").exists()


def readme_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lacks the api-example block"
    return match.group(1)


def test_the_readme_api_example_runs(gpen256_file, clip, tmp_path):
    """The README's Python example, run as written, against a cached random-weight model."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(gpen256_file, home / "GPEN-BFR-256.pth")
    shutil.copy(clip, tmp_path / "tape.mp4")
    script = tmp_path / "example.py"
    script.write_text(readme_api_example())
    env = {"GPEN_VIDEO_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tape.restored.mp4").exists()
    assert frame_count(tmp_path / "tape.restored.mp4") == 30
    assert "faces restored" in done.stdout


def test_batch_fit_counts_the_frames_held_on_the_device(detector):
    """``--batch-size auto`` on CUDA, driven through an injected free-memory figure: the torch
    warp keeps frames on the device, so a large frame size must lower the batch."""
    import numpy as np

    pipeline = pipeline_for(detector, warp="torch")
    face = 300 << 20
    free = 24 << 30
    small = pipeline.fit_batch(360, 640, np.uint8, free_bytes=free, face_bytes=face)
    large = pipeline.fit_batch(2160, 3840, np.uint16, free_bytes=free, face_bytes=face)
    assert large < small
    for height, width, dtype, batch in ((360, 640, np.uint8, small), (2160, 3840, np.uint16, large)):
        frame = pipeline.warp.held_bytes(height, width, dtype)
        assert batch * face + pipeline.frames_on_device(batch) * frame <= 0.8 * free
        assert 2 * batch * face + pipeline.frames_on_device(2 * batch) * frame > 0.8 * free
    opencv = pipeline_for(detector, warp="opencv")
    assert opencv.fit_batch(2160, 3840, np.uint16, free_bytes=free, face_bytes=face) >= large


def test_restore_faces_previews_one_frame_from_a_plan(detector, clip):
    """The web page's preview: a frame's planned faces restored alone equal the frame that
    restore_video produces for it. (Temporal off: with it on, the preview needs the frames
    around, see test_the_preview_with_its_neighbours_is_the_jobs_frame.)"""
    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    pipeline = pipeline_for(detector, temporal=False)
    from gpen_video.records import Frame
    from fractions import Fraction

    planned = list(pipeline.planner.plan(Frame(i, i, Fraction(1, 25), f) for i, f in enumerate(frames)))
    whole = list(pipeline.restore_frames(iter(frames)))
    for index in (0, 12, 29):
        preview = pipeline.restore_faces(frames[index], planned[index].faces)
        np.testing.assert_array_equal(preview, whole[index])
    assert pipeline.restore_faces(frames[3], ()) is frames[3]


def test_reconfigured_shares_the_models(detector):
    pipeline = pipeline_for(detector)
    other = pipeline.reconfigured(pipeline.config.replace(strength=0.5, only_largest_face=True, codec="ffv1"))
    assert other.restorer is pipeline.restorer and other.detector is pipeline.detector
    assert other.config.strength == 0.5 and other.planner.only_largest_face
