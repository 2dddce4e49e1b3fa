"""The codec/container table (``gpen_video/formats.py``): every pair it allows is restored
through the command line and through the web page's job runner, and decodes with the right
codec, frame count and timestamps; every pair it refuses is refused before any work.

The restorer is an identity network (nothing to download), so the test measures the codec and
container, not GPEN.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from gpen_video import formats
from gpen_video.config import load_config
from gpen_video.errors import ConfigError
from gpen_video.faces.detect import create_detector
from gpen_video.jobs.api import FacePipeline
from gpen_video.restore.restorer import Restorer
from tests.clips import make_clip

PAIRS = [(codec, suffix) for codec, entry in formats.CODECS.items() for suffix in entry.suffixes]
FRAMES = 12


def _identity_pipeline(detector):
    def build(config, **_kwargs) -> FacePipeline:
        return FacePipeline(config, restorer=Restorer(torch.nn.Identity(), 256), detector=detector)

    return build


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=256)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One H.264 clip per container of the table (the web page keeps the input's container)."""
    folder = tmp_path_factory.mktemp("formats")
    suffixes = {s for entry in formats.CODECS.values() for s in entry.suffixes}
    return {s: make_clip(folder / f"clip{s}", frames=FRAMES, size=(64, 48), audio_tracks=0) for s in suffixes}


def _times(path: Path) -> tuple[str, list[Fraction]]:
    """The video's codec name and every decoded frame's time in seconds, in order. Where the
    container declares a frame count (MP4, AVI: empty frames included), it is checked too."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [Fraction(f.pts) * stream.time_base for f in container.decode(stream)]
        assert stream.frames in (0, len(times)), f"{path.name} declares {stream.frames} frames"
    return stream.codec_context.name, times


def _check_output(source: Path, output: Path, codec: str) -> None:
    name, times = _times(output)
    _, expected = _times(source)
    assert name == formats.CODECS[codec].decoder
    assert len(times) == len(expected) == FRAMES
    assert times == sorted(times)
    # Same frame times, up to a constant that some containers add (MPEG-TS starts its clock
    # later; AVI counts frames from 0); within a millisecond for Matroska and FLV.
    offset = times[0] - expected[0]
    assert max(abs(t - offset - e) for t, e in zip(times, expected)) <= Fraction(1, 1000)


def test_the_table_agrees_with_the_interfaces() -> None:
    from gpen_video.cli import build_parser
    from gpen_video.io.encode import ENCODERS
    from gpen_video.jobs.segments import SEGMENT_SUFFIX

    codec_flag = next(a for a in build_parser()._subparsers._group_actions[0].choices["restore"]._actions
                      if "--codec" in a.option_strings)
    assert list(codec_flag.choices) == list(formats.CODECS) == list(ENCODERS) == list(SEGMENT_SUFFIX)
    for codec, entry in formats.CODECS.items():
        assert entry.segment_suffix == SEGMENT_SUFFIX[codec] and ENCODERS[codec] == entry.encoder
        assert formats.output_suffix(".webm", codec) == entry.default_suffix


@pytest.mark.slow
@pytest.mark.parametrize(("codec", "suffix"), PAIRS, ids=[f"{c}{s}" for c, s in PAIRS])
def test_cli_restores_into_every_allowed_pair(codec, suffix, sources, detector, tmp_path, monkeypatch, capsys):
    from gpen_video.cli import main

    monkeypatch.setattr("gpen_video.jobs.api.FacePipeline", _identity_pipeline(detector))
    source, output = sources[".mp4"], tmp_path / f"out{suffix}"
    code = main(["restore", str(source), "-o", str(output), "--codec", codec, "--device", "cpu", "-q",
                 "--preset", "ultrafast"])
    assert code == 0, capsys.readouterr().err
    _check_output(source, output, codec)
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no work folder left


@pytest.mark.slow
@pytest.mark.parametrize(("codec", "suffix"), PAIRS, ids=[f"{c}{s}" for c, s in PAIRS])
def test_web_job_restores_into_every_allowed_pair(codec, suffix, sources, detector, tmp_path):
    from gpen_video.web.jobs import JobRunner, JobStore, Pipelines

    config = load_config(None, device="cpu", codec=codec, preset="ultrafast")
    store = JobStore(tmp_path / "jobs")
    runner = JobRunner(store, Pipelines(_identity_pipeline(detector)(config)), tmp_path / "served")
    (tmp_path / "served").mkdir()
    runner.start()
    try:
        job = store.create("me", sources[suffix], sources[suffix].name, config, link_input=True)
        assert job.output.suffix == suffix
        runner.submit(job)
        deadline = time.monotonic() + 120
        while store.get(job.id).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    ended = store.get(job.id)
    assert ended.state == "done", ended.error
    _check_output(sources[suffix], ended.served, codec)


@pytest.mark.parametrize(("codec", "suffix"), [("h264", ".avi"), ("h265", ".avi"), ("h265", ".m4v"),
                                               ("ffv1", ".mov"), ("ffv1", ".mp4"), ("prores", ".mp4"),
                                               ("h264", ".webm")])
def test_pairs_outside_the_table_are_refused_up_front(codec, suffix, sources, tmp_path, capsys):
    """Exit 2 with one line naming a container that works, before any model is loaded (no
    weights exist here) and without leaving a file."""
    from gpen_video.cli import main

    output = tmp_path / f"out{suffix}"
    code = main(["restore", str(sources[".mp4"]), "-o", str(output), "--codec", codec, "--offline",
                 "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and f"-o out{formats.CODECS[codec].default_suffix}" in lines[0]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        formats.check_container(codec, output)
