"""``--ray``: segments rendered by Ray workers give the bytes of a local run, for a file and a
folder; a worker that dies is replaced and its segment retried; a job resumes across local and
Ray runs either way. One local Ray runtime (2 CPUs, ``ray_runtime``) serves the session."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from gpen_video.cli import main
from gpen_video.jobs.cluster import RayWorkers, SegmentWorker
from gpen_video.config import load_config
from gpen_video.errors import GpenVideoError
from gpen_video.io import decode, encode
from gpen_video.io.decode import VideoReader
from gpen_video.jobs.workfolder import work_dir_for
from gpen_video.jobs.api import FacePipeline
from gpen_video.pipeline import FramePipeline
from gpen_video.restore.restorer import Restorer
from samples.make_demo import render_clip
from tests.clips import make_clip, read_packets, truncate

ROOT = Path(__file__).resolve().parents[1]

SEGMENT = 0.64
"""Three segments of the test clip (16, 16 and 28 frames)."""


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "tape.mp4"
    render_clip(path, seconds=2.4, size=(320, 180), faces=1)
    return path


@pytest.fixture(scope="module")
def gpen_args(gpen256_file) -> list[str]:
    return ["--model", "GPEN-BFR-256", "--weights", str(gpen256_file), "--device", "cpu",
            "--segment-seconds", str(SEGMENT), "-q"]


@pytest.fixture(scope="module")
def local(clip, gpen_args, tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("local")
    out, report = folder / "out.mp4", folder / "r.json"
    assert main(["restore", str(clip), "-o", str(out), "--report", str(report), *gpen_args]) == 0
    return out, report.read_text()


def test_ray_gives_the_bytes_of_a_local_run(ray_runtime, clip, gpen_args, local, tmp_path, capsys):
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    assert main(["restore", str(clip), "-o", str(out), "--report", str(report), *gpen_args, "--ray"]) == 0, \
        capsys.readouterr().err
    assert out.read_bytes() == local[0].read_bytes()
    assert read_packets(out) == read_packets(local[0])
    assert report.read_text() == local[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "r.json"]


def test_ray_on_a_folder(ray_runtime, clip, gpen_args, local, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).write_bytes(clip.read_bytes())
    out = tmp_path / "out"
    assert main(["restore", str(folder), "-o", str(out), *gpen_args, "--cache-dir", str(tmp_path / "cache"),
                 "--ray"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.restored.mp4", "b.restored.mp4"]
    for name in ("a.restored.mp4", "b.restored.mp4"):
        assert (out / name).read_bytes() == local[0].read_bytes()


def test_ray_resumes_what_a_local_run_left(ray_runtime, clip, gpen_args, local, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.mp4"
    original = encode.VideoWriter.write

    def interrupted(writer, frame):
        if frame.index == 40:
            raise KeyboardInterrupt
        return original(writer, frame)

    monkeypatch.setattr(encode.VideoWriter, "write", interrupted)
    assert main(["restore", str(clip), "-o", str(out), *gpen_args]) == 130
    monkeypatch.setattr(encode.VideoWriter, "write", original)
    capsys.readouterr()
    assert main(["restore", str(clip), "-o", str(out), *gpen_args[:-1], "--ray"]) == 0
    err = capsys.readouterr().err
    assert "resuming tape.mp4 at segment 3 of 3 (32 of 60 frames done)" in err
    assert re.search(r"tape\.mp4:  53%\|[^|]*\| 32/60 ", err), err  # the bar starts at the frames done
    assert out.read_bytes() == local[0].read_bytes()


def _kill_workers_after_first_segment(workers: RayWorkers):
    """A progress callback that kills every worker when the first segment is recorded: the one
    still rendering dies mid-segment (unless it finishes first: a race Ray decides), the idle one
    dies before its next."""
    killed = []

    def progress(done: int, total: int | None) -> None:
        if not killed:
            killed.extend(workers.actors)
            for actor in killed:
                ray.kill(actor)

    return progress, killed


def test_a_worker_that_dies_is_replaced_and_its_segment_retried(ray_runtime, clip, gpen256_file, local, tmp_path,
                                                                 caplog):
    config = load_config(None, model="GPEN-BFR-256", weights=str(gpen256_file), device="cpu",
                         segment_seconds=SEGMENT)
    out = tmp_path / "out.mp4"
    with RayWorkers(config) as workers:
        progress, killed = _kill_workers_after_first_segment(workers)
        with caplog.at_level("WARNING", logger="gpen_video.jobs.run"):
            FacePipeline(config).restore_video(clip, out, progress=progress, workers=workers)
        assert len(killed) == 2 and set(killed) - set(workers.actors), "no dead worker was replaced"
    retried = [r.getMessage() for r in caplog.records if "trying it again" in r.getMessage()]
    assert retried and all("failed on a Ray worker" in line for line in retried), retried
    assert out.read_bytes() == local[0].read_bytes()


class NaNInHalf(torch.nn.Module):
    """Negation in fp32, NaN in half precision: the precision guard reruns every face."""

    def forward(self, x):
        return -x if x.dtype == torch.float32 else torch.full_like(x, float("nan"))


def _nan_in_half(config) -> FramePipeline:
    return FramePipeline(config, restorer=Restorer(NaNInHalf(), 256, dtype=torch.float16))


class NaNInHalfWorker(SegmentWorker):
    def __init__(self, config) -> None:
        self.pipeline = _nan_in_half(config)


def test_a_ray_job_counts_the_faces_its_workers_reran_in_fp32(ray_runtime, clip, gpen256_file, tmp_path):
    config = load_config(None, model="GPEN-BFR-256", weights=str(gpen256_file), device="cpu",
                         segment_seconds=SEGMENT)
    local = FacePipeline(config, restorer=_nan_in_half(config).restorer).restore_video(
        clip, tmp_path / "local.mp4", report=tmp_path / "local.json")
    assert local.faces_restored > 0 and local.fp32_reruns == local.faces_restored
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    with RayWorkers(config) as workers:
        for actor in workers.actors:
            ray.kill(actor)
        workers._actor = ray.remote(num_cpus=1)(NaNInHalfWorker)
        workers.actors = [workers._actor.remote(config) for _ in workers.actors]
        driver = FacePipeline(config, restorer=_nan_in_half(config).restorer)
        result = driver.restore_video(clip, tmp_path / "ray.mp4", report=tmp_path / "ray.json", workers=workers)
    assert driver.restorer.stats.fp32_reruns == 0  # the workers restored every face
    assert (result.faces_restored, result.fp32_reruns) == (local.faces_restored, local.fp32_reruns)
    assert json.loads((tmp_path / "ray.json").read_text())["precision"]["fp32_reruns"] == local.fp32_reruns
    assert (tmp_path / "ray.mp4").read_bytes() == (tmp_path / "local.mp4").read_bytes()


def test_a_persistent_failure_names_the_segment_and_a_local_run_resumes_it(ray_runtime, clip, gpen256_file, gpen_args,
                                                                           local, tmp_path, capsys):
    config = load_config(None, model="GPEN-BFR-256", weights=str(gpen256_file), device="cpu",
                         segment_seconds=SEGMENT, retries=0)
    out = tmp_path / "out.mp4"
    with RayWorkers(config) as workers:
        progress, _ = _kill_workers_after_first_segment(workers)
        with pytest.raises(GpenVideoError) as failure:
            FacePipeline(config).restore_video(clip, out, progress=progress, workers=workers)
    message = str(failure.value)
    assert re.match(r"tape\.mp4: segment [123] of 3 \(frames \d+-\d+\) failed once on the Ray workers: \w*Error",
                    message) and "\n" not in message, message
    assert "of 3 segments are kept in" in message and "run the same command again to resume" in message, message
    assert not out.exists() and work_dir_for(out).is_dir()
    capsys.readouterr()
    assert main(["restore", str(clip), "-o", str(out), *gpen_args[:-1]]) == 0
    assert "resuming tape.mp4 at segment" in capsys.readouterr().err
    assert out.read_bytes() == local[0].read_bytes()
    assert not work_dir_for(out).exists()


def test_a_ray_job_scans_the_index_once_and_counts_damaged_frames(ray_runtime, gpen256_file, tmp_path, monkeypatch):
    """The driver indexes the input once when it opens the job; workers read that index from the
    work folder (no worker demuxes the input for it, whatever the number of tasks). The frames a
    damaged input lost are counted as a whole decode counts them, as a local job does."""

    def count_index_scans(worker) -> None:
        """Run in a worker's process (``__ray_call__``; defined here so that Ray sends it by
        value): count every demux of an input for its index."""
        from gpen_video.io import decode

        read = decode.IndexBuilder.read
        decode.INDEX_SCANS = 0

        def counted(self, container):
            decode.INDEX_SCANS += 1
            return read(self, container)

        decode.IndexBuilder.read = counted

    def index_scans(worker) -> int:
        from gpen_video.io import decode

        return decode.INDEX_SCANS

    path = make_clip(tmp_path / "cut.mkv", frames=150, size=(96, 64), audio_tracks=0)
    truncate(path, 0.5)
    with VideoReader(path) as reader:
        decoded = sum(1 for _ in reader.frames())
        lost = reader.damaged_frames
    assert 48 < decoded < 150 and lost > 0
    config = load_config(None, model="GPEN-BFR-256", weights=str(gpen256_file), device="cpu",
                         segment_seconds=SEGMENT)
    scans = []
    read = decode.IndexBuilder.read
    monkeypatch.setattr(decode.IndexBuilder, "read", lambda self, container: scans.append(1) or read(self, container))
    with RayWorkers(config) as workers:
        ray.get([actor.__ray_call__.remote(count_index_scans) for actor in workers.actors])
        result = FacePipeline(config).restore_video(path, tmp_path / "ray.mkv", workers=workers)
        worker_scans = ray.get([actor.__ray_call__.remote(index_scans) for actor in workers.actors])
    local = FacePipeline(config).restore_video(path, tmp_path / "local.mkv")
    assert scans == [1, 1], "one index per job: the Ray job's and the local job's"
    assert worker_scans == [0] * len(worker_scans) and len(worker_scans) == 2
    assert result.frames == local.frames == decoded
    assert result.damaged_frames == local.damaged_frames == lost
    assert read_packets(tmp_path / "ray.mkv") == read_packets(tmp_path / "local.mkv")  # Matroska's UIDs are random


def test_without_ray_the_option_says_what_to_install(clip, gpen_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["restore", str(clip), "-o", str(tmp_path / "o.mp4"), *gpen_args, "--ray"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == 'error: the --ray option needs Ray: pip install "gpen-video[ray]"'
    assert list(tmp_path.iterdir()) == []


def test_sigterm_stops_a_ray_job_and_the_same_command_resumes_it(gpen_args, tmp_path):
    """A --ray job stopped by SIGTERM once a segment is recorded exits 143 with one line saying
    how to resume; the same command then finishes it, with the bytes of an uninterrupted run."""
    clip = tmp_path / "long.mp4"
    render_clip(clip, seconds=6, size=(320, 180), faces=1)
    outputs = {name: tmp_path / name / "out.mp4" for name in ("whole", "stopped")}
    commands = {name: [sys.executable, "-m", "gpen_video", "restore", str(clip), "-o", str(out), *gpen_args, "--ray"]
                for name, out in outputs.items()}
    for out in outputs.values():
        out.parent.mkdir()
    proc = subprocess.Popen(commands["stopped"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    manifest = work_dir_for(outputs["stopped"]) / "manifest.json"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(manifest.read_text())["segments"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: stopped by SIGTERM; nothing was written; \d of 9 segments are kept in .*: "
                        r"run the same command again to resume", last), err
    assert "Traceback" not in err and not outputs["stopped"].exists()
    for name in ("stopped", "whole"):
        run = subprocess.run(commands[name], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr
    assert outputs["stopped"].read_bytes() == outputs["whole"].read_bytes()


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", "error: no Ray cluster answers at 127.0.0.1:{port} (Connection refused); start one there "
                         "with `ray start --head --port=6379`, or check the address"),
    ("headnode", "error: --ray headnode: give the cluster's head as HOST:PORT (e.g. 10.0.0.5:6379), or no address "
                 "for a local Ray runtime"),
])
def test_a_cluster_that_does_not_answer_is_one_line(clip, gpen_args, tmp_path, capsys, address, message):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["restore", str(clip), "-o", str(tmp_path / "o.mp4"), *gpen_args, "--ray", address.format(port=port)])
    assert code == 2
    assert capsys.readouterr().err.strip() == message.format(port=port)
    assert list(tmp_path.iterdir()) == []
