"""The work folder and its manifest: a later run keeps finished segments only when nothing
that shapes them changed, and says why otherwise."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import pytest

import numpy as np

from gpen_video.errors import OutputError
from gpen_video.faces.scenes import cut_features
from gpen_video.io.decode import probe
from gpen_video.jobs.logs import read_log, write_log
from gpen_video.jobs.manifest import HEAD_BYTES, InputIdentity, Manifest, file_sha256, settings_hash
from gpen_video.jobs.workfolder import FinishedOutputs, WorkFolder, work_dir_for
from gpen_video.plan import Observation
from gpen_video.records import Detections, Frame
from tests.clips import make_clip

PLAN = ((0, 750), (750, 750), (1500, 320))
SETTINGS = {"model": "GPEN-BFR-512", "strength": 1.0, "codec": "h264", "crf": 18, "rate": Fraction(30000, 1001)}


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Manifest]:
    src = tmp_path / "tape.mp4"
    src.write_bytes(os.urandom(HEAD_BYTES + 4096))
    return src, Manifest.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 18.1.0", PLAN)


def _finish(work: WorkFolder, manifest: Manifest, index: int, payload: bytes) -> Manifest:
    path = work.segment_path(index, ".mp4")
    path.write_bytes(payload)
    return work.record(manifest, index, path, PLAN[index][1])


def test_work_dir_is_beside_the_output_or_under_work_root(tmp_path):
    assert work_dir_for(tmp_path / "tape.restored.mp4") == tmp_path / ".tape.restored.mp4.gpen-work"
    a = work_dir_for(tmp_path / "a" / "out.mp4", tmp_path / "work")
    b = work_dir_for(tmp_path / "b" / "out.mp4", tmp_path / "work")
    assert a.parent == b.parent == tmp_path / "work" and a != b
    assert a.name.startswith("out.mp4-") and a.name.endswith(".gpen-work")


def test_settings_hash_is_canonical():
    assert settings_hash(SETTINGS) == settings_hash(dict(reversed(list(SETTINGS.items()))))
    assert settings_hash(SETTINGS) != settings_hash({**SETTINGS, "crf": 17})
    assert settings_hash({"a": [1, 2]}) != settings_hash({"a": [2, 1]})
    with pytest.raises(TypeError, match="object cannot be hashed"):
        settings_hash({"x": object()})


def test_input_identity_sees_size_content_and_mtime(tmp_path):
    path = tmp_path / "in.bin"
    path.write_bytes(b"a" * 100)
    first = InputIdentity.of(path)
    assert first.size == 100 and first.change(InputIdentity.of(path)) is None
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(first.mtime_ns, first.mtime_ns))
    assert first.change(InputIdentity.of(path)) == "its content changed"
    path.write_bytes(b"a" * 101)
    assert first.change(InputIdentity.of(path)) == "its size changed (100 -> 101 bytes)"
    path.write_bytes(b"a" * 100)
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    assert "modification time" in first.change(InputIdentity.of(path))


def test_resume_keeps_finished_segments(tmp_path, job):
    src, expected = job
    work = WorkFolder(tmp_path / ".tape.restored.mp4.gpen-work")
    manifest, reason = work.resume(expected)
    assert reason is None and manifest.segments == () and work.manifest_path.is_file()
    manifest = _finish(work, manifest, 0, b"first segment")
    manifest = _finish(work, manifest, 2, b"third")
    assert sorted(manifest.finished) == [0, 2] and manifest.frames_done == 750 + 320
    assert not manifest.complete

    again, reason = WorkFolder(work.path).resume(Manifest.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 18.1.0", PLAN))
    assert reason is None
    assert again == manifest
    assert again.finished[2].sha256 == file_sha256(work.segment_path(2, ".mp4"))
    assert stat.S_IMODE(work.manifest_path.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in work.path.iterdir()) == ["manifest.json", "segment-00000.mp4", "segment-00002.mp4"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("change, reason", [
    (lambda src, m: m.for_job(InputIdentity.of(src), {**SETTINGS, "strength": 0.5}, "ab" * 32, "PyAV 18.1.0", PLAN),
     "starting afresh: the settings changed"),
    (lambda src, m: m.for_job(InputIdentity.of(src), SETTINGS, "cd" * 32, "PyAV 18.1.0", PLAN),
     "starting afresh: the model weights changed"),
    (lambda src, m: m.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 19.0.0", PLAN),
     "starting afresh: the encoder software changed (PyAV 18.1.0 -> PyAV 19.0.0)"),
    (lambda src, m: m.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 18.1.0", ((0, 1500), (1500, 320))),
     "starting afresh: the segment plan changed"),
    (lambda src, m: (src.write_bytes(src.read_bytes() + b"more"),
                     m.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 18.1.0", PLAN))[1],
     "starting afresh: the input changed: its size changed"),
])
def test_a_changed_job_starts_afresh_and_says_why(tmp_path, job, change, reason):
    src, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    _finish(work, manifest, 0, b"done")
    fresh, why = work.resume(change(src, Manifest))
    assert why.startswith(reason)
    assert fresh.segments == ()
    assert sorted(p.name for p in work.path.iterdir()) == ["manifest.json"]
    assert WorkFolder(work.path).load() == (fresh, None)


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.unlink(), "segment file segment-00001.mp4 is missing"),
    (lambda path: path.write_bytes(b"short"), "segment file segment-00001.mp4 has 5 bytes, 6 were written"),
])
def test_missing_or_truncated_segment_starts_afresh(tmp_path, job, damage, reason):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    manifest = _finish(work, manifest, 1, b"second")
    damage(work.segment_path(1, ".mp4"))
    fresh, why = work.resume(expected)
    assert why == f"starting afresh: {reason}" and fresh.segments == ()


def test_verify_finds_a_segment_changed_in_place(tmp_path, job):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    _finish(work, manifest, 1, b"second")
    work.segment_path(1, ".mp4").write_bytes(b"SECOND")
    assert work.resume(expected)[1] is None  # sizes only: kept
    _finish(work, work.resume(expected)[0].fresh(), 1, b"second")
    work.segment_path(1, ".mp4").write_bytes(b"SECOND")
    assert work.resume(expected, verify=True)[1] == "starting afresh: segment file segment-00001.mp4 is damaged (its SHA-256 changed)"


def test_unreadable_manifest_and_restart(tmp_path, job):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    work.path.mkdir()
    work.manifest_path.write_text("{not json")
    fresh, why = work.resume(expected)
    assert why.startswith(f"starting afresh: the manifest in {work.path} is unusable: malformed manifest (JSONDecodeError")
    manifest = _finish(work, fresh, 0, b"x")
    _, why = work.resume(expected, restart=True)
    assert why == "starting afresh: a restart was asked for"
    assert not work.segment_path(0, ".mp4").exists()
    assert manifest.finished and not work.load()[0].finished


def test_record_checks_the_plan(tmp_path, job):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    path = work.segment_path(0, ".mp4")
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="has -1 frames from frame 0; the plan says 750 from frame 0"):
        work.record(manifest, 0, path, -1)
    assert work.record(manifest, 0, path, 700).frames_done == 700  # damaged input: frames lost
    assert work.record(manifest, 0, path, 752).frames_done == 752  # a decoder may find more than the index
    empty = work.record(manifest, 1, None, 0)  # nothing of it could be decoded
    assert empty.finished[1].file == "" and empty.finished[1].files() == []
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError, match="not in the work folder"):
        work.record(manifest, 0, outside, 750)


def test_remove_deletes_only_its_own_files(tmp_path, job):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    _finish(work, manifest, 0, b"x")
    with work.lock():
        pass
    (work.path / "notes.txt").write_text("mine")
    work.remove()
    assert sorted(p.name for p in work.path.iterdir()) == ["notes.txt"]
    (work.path / "notes.txt").unlink()
    WorkFolder(work.path).remove()
    assert not work.path.exists()


def test_lock_refuses_a_second_run(tmp_path):
    work = WorkFolder(tmp_path / "work")
    with work.lock():
        with pytest.raises(OutputError, match="another gpen-video run is working in"):
            with WorkFolder(tmp_path / "work").lock():
                pass
    with WorkFolder(tmp_path / "work").lock():
        pass


def test_manifest_survives_kill_9_while_being_replaced(tmp_path, job):
    """A process killed outright while recording segment after segment leaves a manifest that
    loads: the old one or the new one, never a part."""
    src, _ = job
    work = WorkFolder(tmp_path / "work")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from gpen_video.jobs.manifest import InputIdentity, Manifest
        from gpen_video.jobs.workfolder import WorkFolder
        plan = tuple((i, 1) for i in range(2000))
        work = WorkFolder({str(work.path)!r})
        manifest, _ = work.resume(Manifest.for_job(InputIdentity.of({str(src)!r}), {{}}, "", "x", plan))
        for i in range(2000):
            path = work.segment_path(i, ".mp4")
            path.write_bytes(b"s")
            manifest = work.record(manifest, i, path, 1)
            if i == 0:
                print("ready", flush=True)
    """)
    for delay in (0.0, 0.1, 0.25, 0.4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parents[1])
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest, reason = WorkFolder(work.path).load()
        assert reason is None and manifest is not None
        assert len(manifest.segments) > 0
        assert [s.index for s in manifest.segments] == list(range(len(manifest.segments)))


def _observations(n: int) -> list[Observation]:
    rng = np.random.default_rng(1)
    seen = []
    for i in range(n):
        rgb = rng.integers(0, 256, (36, 64, 3), dtype=np.uint8)
        faces = i % 3
        detections = Detections(rng.random((faces, 4), dtype=np.float32) * 60,
                                rng.random((faces, 5, 2), dtype=np.float32) * 60,
                                rng.random(faces, dtype=np.float32))
        seen.append(Observation(Frame(100 + i, 7 * i if i != 3 else None, Fraction(1, 25), rgb), detections,
                                cut_features(rgb)))
    return seen


def _info(tmp_path: Path, width: int, height: int, time_base: Fraction):
    """The ``VideoInfo`` of a real clip of this size, with ``time_base``."""
    clip = make_clip(tmp_path / f"{width}x{height}.mp4", frames=2, size=(width, height), audio_tracks=0)
    return dataclasses.replace(probe(clip), time_base=time_base)


def test_detection_log_round_trips_exactly_without_pixels(tmp_path):
    seen = _observations(12)
    write_log(tmp_path / "log.npz", seen)
    back = list(read_log(tmp_path / "log.npz", _info(tmp_path, 64, 36, Fraction(1, 25))))
    assert len(back) == 12
    for a, b in zip(seen, back):
        assert (b.frame.index, b.frame.pts, b.frame.time_base) == (a.frame.index, a.frame.pts, a.frame.time_base)
        assert b.frame.rgb.shape == (36, 64, 3) and b.frame.rgb.dtype == np.uint8
        assert b.frame.rgb.strides[:2] == (0, 0) and not b.frame.rgb.flags.writeable  # no pixels held
        for name in ("boxes", "landmarks", "scores"):
            assert np.array_equal(getattr(a.detections, name), getattr(b.detections, name))
            assert getattr(b.detections, name).dtype == np.float32
        assert np.array_equal(a.cut.chroma, b.cut.chroma) and np.array_equal(a.cut.luma, b.cut.luma)
        assert a.cut.mean_luma == b.cut.mean_luma
    write_log(tmp_path / "empty.npz", [])
    assert list(read_log(tmp_path / "empty.npz", _info(tmp_path, 2, 2, Fraction(1)))) == []


def test_a_damaged_log_starts_afresh(tmp_path, job):
    _, expected = job
    work = WorkFolder(tmp_path / "work")
    manifest, _ = work.resume(expected)
    path = work.segment_path(0, ".mp4")
    path.write_bytes(b"segment")
    write_log(work.log_path(0), _observations(3))
    manifest = work.record(manifest, 0, path, 3, work.log_path(0))
    assert manifest.finished[0].log == work.log_path(0).name and manifest.finished[0].log_size > 0
    assert work.resume(expected)[1] is None
    with open(work.log_path(0), "ab") as handle:
        handle.write(b"x")
    _, why = work.resume(expected)
    assert why == (f"starting afresh: segment file {work.log_path(0).name} has "
                   f"{manifest.finished[0].log_size + 1} bytes, {manifest.finished[0].log_size} were written")
    assert not work.log_path(0).exists()


def test_finished_outputs_match_only_the_same_job_and_file(tmp_path, job):
    src, expected = job
    out = tmp_path / "tape.restored.mp4"
    out.write_bytes(b"restored")
    finished = FinishedOutputs(tmp_path / "cache" / "finished")
    assert not finished.matches(expected, out)
    finished.add(expected, out)
    assert finished.matches(expected, out)
    assert finished.matches(Manifest.for_job(InputIdentity.of(src), SETTINGS, "ab" * 32, "PyAV 18.1.0"), out)  # plan left out
    assert not finished.matches(Manifest.for_job(InputIdentity.of(src), {**SETTINGS, "crf": 17}, "ab" * 32, "PyAV 18.1.0"), out)
    assert not finished.matches(expected, tmp_path / "other.mp4")
    out.write_bytes(b"replaced by someone")
    assert not finished.matches(expected, out)
