"""Long jobs: a video rendered in segments resumes after any interruption, and gives the very
bytes (video and audio packets, pts, report) of an uninterrupted run, without doing a
finished segment again."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from gpen_video.cli import main
from gpen_video.config import load_config
from gpen_video.errors import Cancelled, GpenVideoError
from gpen_video.faces.detect import create_detector
from gpen_video.io import encode
from gpen_video.jobs.workfolder import work_dir_for
from gpen_video.jobs.api import FacePipeline
from gpen_video.plan import Planner
from gpen_video.records import Frame
from gpen_video.report import ReportWriter
from gpen_video.restore.restorer import Restorer
from samples.make_demo import render_clip
from tests.clips import read_packets
from tests.test_plan import CUT, N, three_faces

ROOT = Path(__file__).resolve().parents[1]
SEGMENT = 0.64
"""Segment length of the test clip: 16 frames at 25 fps, the shortest a segment may be."""


class Flaky(torch.nn.Module):
    """Identity that raises on chosen forward calls (counted from 1)."""

    def __init__(self, fail: set[int]):
        super().__init__()
        self.fail, self.calls = fail, 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.fail:
            raise RuntimeError(f"simulated failure in call {self.calls}")
        return x


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=320)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """2.4 s, 60 frames, one face, AAC audio: three segments of 16, 16 and 28 frames."""
    path = tmp_path_factory.mktemp("resume") / "tape.mp4"
    render_clip(path, seconds=2.4, size=(320, 180), faces=1)
    return path


def pipeline_for(detector, model: torch.nn.Module | None = None, **overrides) -> FacePipeline:
    config = load_config(None, **{"device": "cpu", "segment_seconds": SEGMENT, **overrides})
    return FacePipeline(config, restorer=Restorer(model or torch.nn.Identity(), 256), detector=detector)


@pytest.fixture(scope="module")
def reference(detector, clip, tmp_path_factory) -> tuple[Path, str]:
    """The uninterrupted run: its output and its report."""
    folder = tmp_path_factory.mktemp("reference")
    out, report = folder / "out.mp4", folder / "report.json"
    result = pipeline_for(detector).restore_video(clip, out, report=report)
    assert result.frames == 60 and result.resumed_frames == 0
    assert not work_dir_for(out).exists()
    return out, report.read_text()


def test_a_segment_keeps_its_detections_not_its_frames(detector, clip, tmp_path, monkeypatch):
    """Until a segment is finished its detection log is kept in memory: with its frames' pixels
    that would be a segment of decoded video (30 s of 4K is 18 GB). The log holds none."""
    from gpen_video.jobs import local as pipeline_module

    logged: list[list] = []
    original = pipeline_module.write_log

    def spy(path, observations):
        logged.append([o.frame.rgb for o in observations])
        return original(path, observations)

    monkeypatch.setattr(pipeline_module, "write_log", spy)
    pipeline_for(detector).restore_video(clip, tmp_path / "out.mp4")
    assert [len(pixels) for pixels in logged] == [16, 16, 28]
    assert all(rgb.shape == (180, 320, 3) and rgb.strides[:2] == (0, 0) for pixels in logged for rgb in pixels)


class Segments:
    """Which segment files a run opened, and how many faces its restorer saw."""

    def __init__(self, monkeypatch, pipeline: FacePipeline):
        self.opened: list[str] = []
        enter = encode.VideoWriter.__enter__

        def entered(writer):
            if not writer.copy_streams:
                self.opened.append(writer.output_path.name)
            return enter(writer)

        monkeypatch.setattr(encode.VideoWriter, "__enter__", entered)
        self.restorer = pipeline.restorer
        self.before = pipeline.restorer.stats.faces

    @property
    def faces(self) -> int:
        return self.restorer.stats.faces - self.before


def stop_at(frame: int):
    """A progress callback that cancels the job once ``frame`` frames are written."""

    def progress(done: int, total: int | None) -> None:
        if done >= frame:
            raise Cancelled("stopped by the test")

    return progress


def restored_from(report: str, first: int) -> int:
    """Faces the report says were restored in frames ``first`` and later."""
    return sum(f["restored"] and f["index"] >= first for t in json.loads(report)["tracks"] for f in t["frames"])


# --- the planner ---


def indexed_frames(n: int, start: int = 0) -> list[Frame]:
    """Frames whose first pixel encodes their index; the colour changes at ``CUT``."""
    frames = []
    for i in range(start, n):
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[...] = (200, 60, 40) if i < CUT else (40, 90, 200)
        rgb[0, 0] = (i & 255, i >> 8, 0)
        frames.append(Frame(i, 1000 + 2 * i, Fraction(1, 50), rgb))
    return frames


class ByIndex:
    """``three_faces`` of the frame's own index (read from its pixels), whatever the batch."""

    def detect(self, images):
        return [three_faces(int(im[0, 0, 0]) + 256 * int(im[0, 0, 1])) for im in images]


def test_replayed_observations_give_the_uninterrupted_plan(tmp_path):
    """Planning frames k.. after replaying the observations of frames ..k-1 gives every frame
    the faces, tracks, selection and report entries of one plan over all frames."""
    planner = Planner(ByIndex(), min_face=20, only_largest_face=True)
    with ReportWriter("x.mp4", fps=50.0) as report:
        plan = planner.plan(indexed_frames(N), report=report)
        whole = list(plan)
        report.write(tmp_path / "whole.json")
    assert plan.stats.scene_cuts == 1
    for k in (1, 37, CUT, CUT + 1, N - 1):
        replay = [p.observation for p in whole[:k]]
        with ReportWriter("x.mp4", fps=50.0) as report:
            plan = planner.plan(indexed_frames(N, start=k), report=report, replay=replay)
            again = list(plan)
            report.write(tmp_path / "again.json")
        assert (tmp_path / "again.json").read_text() == (tmp_path / "whole.json").read_text()
        assert [p.frame.index for p in again] == list(range(N))
        assert plan.stats.scene_cuts == 1
        for a, b in zip(whole, again):
            assert [f.track_id for f in a.faces] == [f.track_id for f in b.faces], (k, a.frame.index)
            for fa, fb in zip(a.tracked, b.tracked):
                assert fa.track_id == fb.track_id
                assert np.array_equal(fa.landmarks, fb.landmarks) and np.array_equal(fa.box, fb.box)


def test_detection_batches_stay_inside_segments():
    batches = []

    class Recording(ByIndex):
        def detect(self, images):
            batches.append([int(im[0, 0, 0]) for im in images])
            return super().detect(images)

    list(Planner(Recording(), detect_batch=8).plan(indexed_frames(30), segment_of=lambda f: f.index // 13))
    assert batches == [list(range(0, 8)), list(range(8, 13)), list(range(13, 21)), list(range(21, 26)),
                       list(range(26, 30))]


# --- the library: interrupted, changed, failed ---


@pytest.mark.parametrize("stop", [5, 17, 20, 33, 60])
def test_an_interrupted_job_resumes_to_the_same_bytes(detector, clip, reference, tmp_path, monkeypatch, stop, caplog):
    """Stopped inside the first segment, just after a join, inside later ones, and at the last
    frame: the output and report equal the uninterrupted run's, and only the unfinished
    segments are encoded, and only they and the halo before them restored again. (A segment
    is finished once the first frame of the next one, or the end, is reached.)"""
    out, report = tmp_path / "out.mp4", tmp_path / "report.json"
    pipeline = pipeline_for(detector)
    with pytest.raises(Cancelled):
        pipeline.restore_video(clip, out, report=report, progress=stop_at(stop))
    assert not out.exists() and not report.exists()
    finished = (stop >= 17) + (stop >= 33)
    work = work_dir_for(out)
    if finished:
        assert sorted(p.name for p in work.glob("segment-*.mp4")) == [f"segment-{k:05d}.mp4" for k in range(finished)]
    else:
        assert not work.exists(), "nothing finished: nothing kept"

    seen = Segments(monkeypatch, pipeline)
    progress: list[int] = []
    caplog.set_level(logging.INFO, logger="gpen_video")
    result = pipeline.restore_video(clip, out, report=report, progress=lambda done, total: progress.append(done))
    first = (0, 16, 32)[finished]
    assert out.read_bytes() == reference[0].read_bytes()
    assert read_packets(out) == read_packets(reference[0])
    assert report.read_text() == reference[1]
    assert seen.opened == [f"segment-{k:05d}.mp4" for k in range(finished, 3)]
    assert seen.faces == restored_from(reference[1], max(0, first - pipeline.halo))
    assert result.frames == 60 and result.resumed_frames == first
    assert progress == list(range(first or 1, 61))
    if finished:
        assert f"resuming tape.mp4 at segment {finished + 1} of 3 ({first} of 60 frames done)" in caplog.text
    assert not work.exists()


class BatchMixing(torch.nn.Module):
    """Identity plus a trace of the batch's mean: a face's output depends on its batch's
    company, as the last bits of a real network's can."""

    def forward(self, x):
        return x + 0.1 * (x.mean(0, keepdim=True) - x.mean())


def test_a_resumed_job_restores_its_halo_in_the_batches_of_an_uninterrupted_one(detector, clip, tmp_path):
    """Batches of 5 faces, segments of 16 frames, a halo of 4: unaligned, the 4 halo frames
    before segment 2 would be one batch where the uninterrupted run had them in two, and the
    stabilised frames after the edge would differ. Batches stop where a segment or a halo
    starts or ends (``SegmentPlan.group_of``), so the bytes are the same."""

    def run(out: Path, **options) -> None:
        config = load_config(None, device="cpu", segment_seconds=SEGMENT)
        pipeline = FacePipeline(config, restorer=Restorer(BatchMixing(), 256, batch_size=5), detector=detector)
        pipeline.restore_video(clip, out, **options)

    run(whole := tmp_path / "whole.mp4")
    with pytest.raises(Cancelled):
        run(tmp_path / "out.mp4", progress=stop_at(20))
    run(tmp_path / "out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == whole.read_bytes()


def _stopped_after_one_segment(pipeline: FacePipeline, clip: Path, out: Path) -> None:
    with pytest.raises(Cancelled, match="1 of 3 segments are kept in .*run the same command again to resume"):
        pipeline.restore_video(clip, out, progress=stop_at(20))


@pytest.mark.parametrize("change, reason", [
    ("crf", "the settings changed"),
    ("input", "the input changed: it was modified since"),
    ("restart", "a restart was asked for"),
    ("weights", "the model weights changed"),
])
def test_a_changed_job_starts_afresh_and_says_why(detector, clip, tmp_path, monkeypatch, caplog, change, reason):
    src = tmp_path / "tape.mp4"
    src.write_bytes(clip.read_bytes())
    out = tmp_path / "out.mp4"
    _stopped_after_one_segment(pipeline_for(detector), src, out)
    again = pipeline_for(detector, crf=20 if change == "crf" else 18)
    if change == "input":
        os.utime(src, ns=(time.time_ns(), time.time_ns()))
    if change == "weights":
        again = FacePipeline(again.config, restorer=Restorer(torch.nn.Conv2d(3, 3, 1), 256), detector=detector)
    seen = Segments(monkeypatch, again)
    caplog.set_level(logging.INFO, logger="gpen_video")
    again.restore_video(src, out, overwrite=True, restart=change == "restart")
    assert f"tape.mp4: starting afresh: {reason}" in caplog.text
    assert seen.opened == [f"segment-{k:05d}.mp4" for k in range(3)]


def test_a_failed_segment_is_tried_again(detector, clip, reference, tmp_path, caplog):
    """GPEN fails on the 24th face (frame 23, in segment 2; segment 1 is finished once frame 19,
    the end of its halo, is restored): segment 2 is done again from its read range (its halo
    from frame 12) and the output is the uninterrupted one."""
    model = Flaky({24})
    out = tmp_path / "out.mp4"
    result = pipeline_for(detector, model).restore_video(clip, out)
    assert out.read_bytes() == reference[0].read_bytes()
    assert "segment 2 of 3 (frames 16-31) failed (RuntimeError: simulated failure in call 24); trying it " \
           "again (1 of 2)" in caplog.text
    assert result.faces_restored == restored_from(reference[1], 0)
    assert model.calls == 60 + 12  # frames 12..23 again, then on


def test_a_segment_failing_every_time_fails_the_file_and_keeps_the_rest(detector, clip, reference, tmp_path):
    out = tmp_path / "out.mp4"
    model = Flaky(set(range(24, 1000)))
    with pytest.raises(GpenVideoError) as failed:
        pipeline_for(detector, model, retries=1).restore_video(clip, out)
    message = str(failed.value)
    assert message.startswith("tape.mp4: segment 2 of 3 (frames 16-31) failed 2 times: RuntimeError: simulated")
    assert message.endswith(f"1 of 3 segments are kept in {work_dir_for(out)}: run the same command again to resume")
    assert failed.value.exit_code == 1 and not out.exists()
    pipeline_for(detector).restore_video(clip, out)  # resumes at segment 2
    assert out.read_bytes() == reference[0].read_bytes()


def test_work_dir_elsewhere_and_removed_after_success(detector, clip, reference, tmp_path):
    out, work_root = tmp_path / "out" / "o.mp4", tmp_path / "work"
    out.parent.mkdir()
    pipeline = pipeline_for(detector, work_dir=str(work_root))
    _stopped_after_one_segment(pipeline, clip, out)
    assert list(out.parent.iterdir()) == []
    (work,) = work_root.iterdir()
    assert work == work_dir_for(out, work_root) and (work / "segment-00000.mp4").exists()
    pipeline.restore_video(clip, out)
    assert out.read_bytes() == reference[0].read_bytes()
    assert list(work_root.iterdir()) == []


@pytest.mark.parametrize("temporal", [True, False])
def test_segments_give_the_pictures_and_pts_of_one_segment(detector, clip, tmp_path, temporal):
    """Lossless output: three segments and one give the same pictures with the same pts; with
    temporal stabilisation too, whose windows reach across the segment edges (each segment
    restores a halo of frames beyond its edges). (Every frame detected whole: detection that
    follows the faces restarts at each segment edge, with a full detection, so its landmarks
    there can differ in the last digits.)"""
    outputs = {}
    for seconds in (SEGMENT, 30):
        out = tmp_path / f"out-{seconds}.mkv"
        pipeline_for(detector, codec="ffv1", segment_seconds=seconds, temporal=temporal,
                     detect_every=1).restore_video(clip, out)
        with av.open(str(out)) as container:
            outputs[seconds] = [(f.pts, f.to_ndarray(format="rgb24").tobytes()) for f in container.decode(video=0)]
        audio = [(data for _, _, data in read_packets(path)[1]) for path in (out, clip)]
        assert list(audio[0]) == list(audio[1])  # the audio, packet for packet (mkv shifts its pts)
    assert len(outputs[30]) == 60 and outputs[SEGMENT] == outputs[30]


# --- the command line, killed outright ---


_RUN = textwrap.dedent("""
    import atexit, json, sys, time
    from pathlib import Path
    from gpen_video.io import encode
    from gpen_video.io.streams import StreamCopier
    from gpen_video.jobs.workfolder import WorkFolder
    from gpen_video.restore.restorer import Restorer

    record, pause, *argv = sys.argv[1:]
    seen = {"segments": [], "faces": 0}
    atexit.register(lambda: Path(record).write_text(json.dumps(seen)))

    def paused(where):  # tell the test, then wait for SIGKILL
        Path(record + ".paused").write_text(where)
        time.sleep(600)

    def wrap(cls, name, after):
        original = getattr(cls, name)
        def wrapped(self, *args):
            result = original(self, *args)
            after(self, *args)
            return result
        setattr(cls, name, wrapped)

    def entered(writer):
        if not writer.copy_streams:
            seen["segments"].append(writer.output_path.name)
    def written(writer, frame):
        if pause == "inside" and writer.output_path.name == "segment-00001.mp4" and writer.frames_written == 5:
            paused(pause)
    def recorded(work, manifest, index, *args):
        if pause == "between" and index == 0:
            paused(pause)
    pumps = [0]
    def pumped(copier, until):
        pumps[0] += 1
        if pause == "assembly" and pumps[0] == 10 and copier.out.format.name == "mov":
            paused(pause)
    def restored(restorer, crops):
        seen["faces"] += len(crops)

    wrap(encode.VideoWriter, "__enter__", lambda w: entered(w))
    wrap(encode.VideoWriter, "write", written)
    wrap(WorkFolder, "record", recorded)
    wrap(StreamCopier, "pump", pumped)
    wrap(Restorer, "restore_tensor", restored)
    from gpen_video.cli import main
    sys.exit(main(argv))
""")


def run_cli(args: list, record: Path, pause: str = "none", *, kill: bool = False) -> tuple[int, str, dict]:
    """Run the CLI in a child process; with ``kill``, SIGKILL it where it pauses."""
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(record), pause, *map(str, args)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    marker = Path(f"{record}.paused")
    if kill:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.read_text() == pause, "the run never reached the point to kill it at"
        proc.send_signal(signal.SIGKILL)
        marker.unlink()
    _, err = proc.communicate(timeout=600)
    seen = json.loads(record.read_text()) if record.exists() and not kill else {}
    return proc.returncode, err, seen


@pytest.fixture(scope="module")
def gpen_args(gpen256_file) -> list:
    return ["--model", "GPEN-BFR-256", "--weights", gpen256_file, "--device", "cpu", "--segment-seconds", SEGMENT]


@pytest.fixture(scope="module")
def cli_reference(clip, gpen_args, tmp_path_factory) -> tuple[Path, str, dict]:
    folder = tmp_path_factory.mktemp("cli-reference")
    out = folder / "out.mov"
    code, err, seen = run_cli(["restore", clip, "-o", out, "--report", folder / "r.json", *gpen_args],
                              folder / "seen.json")
    assert code == 0, err
    assert seen["segments"] == ["segment-00000.mp4", "segment-00001.mp4", "segment-00002.mp4"]
    return out, (folder / "r.json").read_text(), seen


@pytest.mark.parametrize("pause, finished", [("inside", 1), ("between", 1), ("assembly", 3)])
def test_kill_9_then_the_same_command_resumes_to_the_same_bytes(clip, gpen_args, cli_reference, tmp_path, pause,
                                                                finished):
    """SIGKILL inside segment 2, between segments 1 and 2, and while the output is being
    assembled; the same command then gives the uninterrupted run's bytes, restoring only the
    faces of the segments not finished before."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, report = out_dir / "out.mov", out_dir / "r.json"
    args = ["restore", clip, "-o", out, "--report", report, *gpen_args]
    code, _, _ = run_cli(args, tmp_path / "killed.json", pause, kill=True)
    assert code == -signal.SIGKILL and not out.exists()
    work = work_dir_for(out)
    manifest = json.loads((work / "manifest.json").read_text())
    assert [s["index"] for s in manifest["segments"]] == list(range(finished))
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("segment-*")}

    code, err, seen = run_cli(args, tmp_path / "resumed.json")
    assert code == 0, err
    first = manifest["plan"][finished][0] if finished < 3 else 60
    assert (f"resuming tape.mp4 at segment {finished + 1} of 3 ({first} of 60 frames done)" in err
            or finished == 3 and "resuming tape.mp4: all 3 segments are done (60 frames)" in err)
    assert out.read_bytes() == cli_reference[0].read_bytes()
    assert read_packets(out) == read_packets(cli_reference[0])
    assert report.read_text() == cli_reference[1]
    assert seen["segments"] == [f"segment-{k:05d}.mp4" for k in range(finished, 3)]
    halo = 4 if finished < 3 else 0  # the frames before the first unfinished segment (temporal reach 4)
    assert seen["faces"] == restored_from(cli_reference[1], max(0, first - halo))
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.mov", "r.json"]
    assert len(kept) == 2 * finished  # each finished segment's file and detection log


def test_a_segment_failing_every_time_is_one_error_line_with_exit_1(clip, gpen256_file, tmp_path, monkeypatch,
                                                                   capsys):
    original = Restorer.restore_tensor
    calls = {"n": 0}  # faces restored: from the 21st on (in segment 2), every batch fails

    def failing(self, crops):
        calls["n"] += len(crops)
        if calls["n"] > 20:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, crops)

    monkeypatch.setattr(Restorer, "restore_tensor", failing)
    out = tmp_path / "o.mp4"
    code = main(["restore", str(clip), "-o", str(out), "--model", "GPEN-BFR-256", "--weights", str(gpen256_file),
                 "--device", "cpu", "--segment-seconds", str(SEGMENT), "--retries", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [e for e in err.splitlines() if e.startswith("error:")]
    assert line.startswith("error: tape.mp4: segment 2 of 3 (frames 16-31) failed 2 times: RuntimeError: CUDA out")
    assert "run the same command again to resume" in line and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.mp4.gpen-work"]


def test_a_folder_job_skips_finished_files_and_resumes_the_interrupted_one(clip, gpen256_file, tmp_path,
                                                                          monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).write_bytes(clip.read_bytes())
    Image.fromarray(astronaut()).resize((256, 256)).save(folder / "0.png")
    args = ["restore", str(folder), "-o", str(out), "--model", "GPEN-BFR-256", "--weights", str(gpen256_file),
            "--device", "cpu", "--segment-seconds", str(SEGMENT), "--cache-dir", str(tmp_path / "cache")]
    original = encode.VideoWriter.write

    def interrupted(writer, frame):
        if writer.output_path.parent.name == ".b.restored.mp4.gpen-work" and frame.index == 40:
            raise KeyboardInterrupt
        return original(writer, frame)

    monkeypatch.setattr(encode.VideoWriter, "write", interrupted)
    assert main(args) == 130
    assert sorted(p.name for p in out.iterdir()) == [".b.restored.mp4.gpen-work", "0.restored.png", "a.restored.mp4"]
    capsys.readouterr()
    monkeypatch.setattr(encode.VideoWriter, "write", original)
    before = {name: (out / name).stat().st_mtime_ns for name in ("0.restored.png", "a.restored.mp4")}
    assert main(args) == 0
    err = capsys.readouterr().err
    for name in ("0.png", "a.mp4"):
        assert f"{name} -> {out / name.replace('.', '.restored.')}: restored before with the same settings; skipped" \
            in err, err
    assert "resuming b.mp4 at segment 3 of 3 (32 of 60 frames done)" in err
    assert "1 restored, 2 skipped, 0 failed" in err
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert (out / "a.restored.mp4").read_bytes() == (out / "b.restored.mp4").read_bytes()
    assert main([*args, "--restart", "-y"]) == 0
    assert "3 restored, 0 failed" in capsys.readouterr().err
