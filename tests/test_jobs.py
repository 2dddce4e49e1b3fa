"""The job engine: a job reads its input once to open it, keeps the frame index in its work
folder, and counts damaged frames from the job's plan, however it is rendered."""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import av
import pytest
import torch

from gpen_video.config import load_config
from gpen_video.errors import Cancelled
from gpen_video.faces.detect import create_detector
from gpen_video.io import decode
from gpen_video.io.decode import VideoReader
from gpen_video.jobs.api import FacePipeline
from gpen_video.jobs.workfolder import work_dir_for
from gpen_video.restore.restorer import Restorer
from samples.make_demo import render_clip
from tests.clips import make_clip, truncate

SEGMENT = 0.64
"""Three segments of the test clip (16, 16 and 28 frames)."""


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=320)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "tape.mp4"
    render_clip(path, seconds=2.4, size=(320, 180), faces=1)
    return path


def pipeline_for(detector) -> FacePipeline:
    config = load_config(None, device="cpu", segment_seconds=SEGMENT)
    return FacePipeline(config, restorer=Restorer(torch.nn.Identity(), 256), detector=detector)


class Opens:
    """Every open of one file, by any of the ways Python and PyAV open files."""

    def __init__(self, monkeypatch, path: Path):
        self.path = path.resolve()
        self.calls: list[str] = []
        for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (av, "open")):
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._counting(original, f"{owner.__name__}.{name}"))

    def _counting(self, original, name: str):
        def opened(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                try:
                    same = Path(os.fsdecode(file)).resolve() == self.path
                except (OSError, ValueError):
                    same = False
                if same:
                    self.calls.append(name)
            return original(file, *args, **kwargs)

        return opened


def test_a_fresh_local_restore_opens_the_input_three_times(detector, clip, tmp_path, monkeypatch):
    """Identity, description, frame index and the output check share one handle; then one
    decode, and one stream copy at assembly."""
    pipeline = pipeline_for(detector)
    opens = Opens(monkeypatch, clip)
    result = pipeline.restore_video(clip, tmp_path / "out.mp4")
    monkeypatch.undo()
    assert result.frames == 60 and result.damaged_frames == 0
    assert opens.calls == ["builtins.open", "av.open", "av.open"], opens.calls
    assert len(list(tmp_path.iterdir())) == 1  # the work folder is gone with its index


def test_a_resumed_run_reads_the_index_from_the_work_folder(detector, clip, tmp_path, monkeypatch):
    pipeline = pipeline_for(detector)
    out = tmp_path / "out.mp4"
    whole = pipeline.restore_video(clip, tmp_path / "whole.mp4")

    def stop(done: int, total: int | None) -> None:
        if done >= 40:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        pipeline.restore_video(clip, out, progress=stop)
    assert (work_dir_for(out) / "index.npz").is_file()
    scans = []
    read = decode.IndexBuilder.read
    monkeypatch.setattr(decode.IndexBuilder, "read", lambda self, container: scans.append(1) or read(self, container))
    result = pipeline.restore_video(clip, out)
    assert scans == [] and result.resumed_frames == 32
    assert out.read_bytes() == (tmp_path / "whole.mp4").read_bytes() and whole.frames == result.frames == 60


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Path, int]:
    """A Matroska file cut in half: the frames lost as a whole decode counts them."""
    path = make_clip(tmp_path_factory.mktemp("damaged") / "cut.mkv", frames=60, size=(96, 64), audio_tracks=0)
    truncate(path, 0.5)
    with VideoReader(path) as reader:
        decoded = sum(1 for _ in reader.frames())
        lost = reader.damaged_frames
    assert 0 < decoded < 60 and lost > 0
    return path, lost


def test_damaged_frames_of_a_local_job_are_those_a_decode_counts(detector, damaged, tmp_path):
    path, lost = damaged
    result = pipeline_for(detector).restore_video(path, tmp_path / "out.mkv")
    assert result.damaged_frames == lost


def test_a_job_on_an_avi_with_repeated_pictures_counts_no_damage(detector, tmp_path):
    from tests.test_decode import avi_with_gaps

    path = avi_with_gaps(tmp_path / "gaps.avi", [0, *range(2, 12)])
    result = pipeline_for(detector).restore_video(path, tmp_path / "out.mkv")
    assert (result.frames, result.damaged_frames) == (11, 0)
