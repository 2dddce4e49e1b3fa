"""The command line as users meet it: exit codes, one-line errors, images, folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from gpen_video.cli import main
from samples.make_demo import render_clip
from tests.clips import read_packets


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tape.mp4"
    render_clip(path, seconds=0.4, size=(320, 180), faces=1)
    return path


@pytest.fixture
def portrait(tmp_path) -> Path:
    canvas = np.full((400, 640, 3), 90, np.uint8)
    canvas[:, 64:576] = cv2.resize(astronaut(), (512, 400))
    path = tmp_path / "portrait.jpg"
    cv2.imwrite(str(path), canvas[:, :, ::-1])
    return path


def cli(*args, capsys=None) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def test_restore_with_generated_gpen256_weights(clip, gpen256_file, tmp_path, capsys):
    """The issue's acceptance run: a real GPEN-BFR-256 (random weights) on the CPU."""
    out, report = tmp_path / "tape.out.mp4", tmp_path / "r.json"
    code, err = cli(
        "restore", clip, "-o", out, "--model", "GPEN-BFR-256", "--weights", gpen256_file,
        "--device", "cpu", "--report", report, "-q", capsys=capsys,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["frames"] == 10 and len(data["tracks"]) == 1
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        frames_in = [f.to_ndarray(format="rgb24") for f in a.decode(video=0)]
        frames_out = [f.to_ndarray(format="rgb24") for f in b.decode(video=0)]
    assert len(frames_out) == len(frames_in)
    x1, y1, x2, y2 = (int(v) for v in data["tracks"][0]["frames"][5]["box"])
    changed = np.abs(frames_out[5][y1:y2, x1:x2].astype(int) - frames_in[5][y1:y2, x1:x2]).mean()
    assert changed > 5, "random GPEN weights must visibly change the face"
    assert read_packets(out)[1] == read_packets(clip)[1]


def test_image_input(portrait, detector_pipeline_args, tmp_path, capsys):
    code, err = cli("restore", portrait, *detector_pipeline_args, capsys=capsys)
    assert code == 0, err
    out = portrait.with_name("portrait.restored.jpg")
    restored = cv2.imread(str(out))
    assert restored.shape == (400, 640, 3)
    assert "1 face restored in" in err


def test_folder_goes_on_after_a_failure(portrait, clip, detector_pipeline_args, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(portrait.read_bytes())
    (folder / "b.mp4").write_bytes(clip.read_bytes())
    (folder / "c.mp4").write_bytes(b"this is not a video")
    (folder / "notes.txt").write_text("ignored")
    code, err = cli("restore", folder, "-o", tmp_path / "out", *detector_pipeline_args, capsys=capsys)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.restored.jpg", "b.restored.mp4"]
    assert "2 restored, 1 failed" in err and "c.mp4" in err
    assert "Traceback" not in err


@pytest.fixture
def detector_pipeline_args(gpen256_file) -> list:
    """The smallest real preset, with the session's generated checkpoint."""
    return ["--model", "GPEN-BFR-256", "--weights", gpen256_file, "--device", "cpu"]


@pytest.mark.parametrize(
    "make, expected_code, message",
    [
        (lambda d: d / "missing.mp4", 3, "does not exist"),
        (lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4", 3, "empty"),
        (lambda d: (d / "text.mp4").write_text("hello") or d / "text.mp4", 3, "not"),
    ],
    ids=["missing", "empty", "not-media"],
)
def test_bad_input_is_one_line_with_exit_code(tmp_path, gpen256_file, make, expected_code, message, capsys):
    path = make(tmp_path)
    code, err = cli("restore", path, "--weights", gpen256_file, "--model", "GPEN-BFR-256", capsys=capsys)
    assert code == expected_code
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0].lower(), err
    assert not list(tmp_path.glob("*.restored.*"))


def test_existing_output_refused_without_y(clip, gpen256_file, tmp_path, capsys):
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    code, err = cli("restore", clip, "-o", out, "--weights", gpen256_file, "--model", "GPEN-BFR-256", capsys=capsys)
    assert code == 4 and "-y" in err
    assert out.read_bytes() == b"keep me"


def test_output_equal_to_input_refused(clip, tmp_path, gpen256_file, capsys):
    copy = tmp_path / "same.mp4"
    copy.write_bytes(clip.read_bytes())
    before = copy.read_bytes()
    code, err = cli("restore", copy, "-o", copy, "-y", "--weights", gpen256_file, "--model", "GPEN-BFR-256", capsys=capsys)
    assert code == 4 and "input" in err
    assert copy.read_bytes() == before


def test_offline_without_weights_says_where_to_put_them(clip, tmp_path, capsys):
    code, err = cli("restore", clip, "--offline", "--cache-dir", tmp_path / "cache", capsys=capsys)
    assert code == 5
    assert str(tmp_path / "cache") in err and "http" in err and "--weights" in err


def test_bad_config_names_the_key(clip, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[output]\ncodek = 'h264'\n")
    code, err = cli("restore", clip, "--config", bad, capsys=capsys)
    assert code == 2 and "codek" in err


def test_models_lists_presets(tmp_path, capsys):
    code = main(["models", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024", "GPEN-BFR-2048"):
        assert name in out
    assert "not downloaded" in out


def test_console_script_runs_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpen_video", "restore", str(tmp_path / "nope.mp4")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_phone_clip_with_vfr_rotation_two_audio_tracks_and_subtitles(gpen256_file, tmp_path, capsys):
    """Issue 3's acceptance run through `gpen-video restore`: everything but the faces survives."""
    from fractions import Fraction

    from gpen_video.io.decode import probe
    from tests.clips import make_clip

    face = cv2.resize(astronaut(), (192, 192))

    def stored(i: int) -> np.ndarray:
        display = np.full((256, 192, 3), 70, np.uint8)  # portrait, as the phone shows it
        display[32 + i % 3 : 224 + i % 3] = face
        return np.ascontiguousarray(np.rot90(display, k=-1))  # stored sideways, shown rotated 90°

    durations = [40, 40, 33, 50, 40, 33, 33, 67, 40, 40]
    pts = [sum(durations[:i]) for i in range(len(durations))]
    clip = make_clip(
        tmp_path / "phone.mp4", frames=len(pts), size=(256, 192), vfr_pts=pts, time_base=Fraction(1, 1000),
        frame_fn=stored, rotation=90, audio_tracks=2, subtitle=True, metadata={"title": "beach"},
    )
    out = tmp_path / "phone.out.mp4"
    code, err = cli(
        "restore", clip, "-o", out, "--model", "GPEN-BFR-256", "--weights", gpen256_file, "--device", "cpu",
        capsys=capsys,
    )
    assert code == 0, err
    assert f"{len(pts)} faces restored" in err, "faces must be found upright in a rotated clip"
    before, after = probe(clip), probe(out)
    assert after.rotation == before.rotation == 90
    assert (after.width, after.height) == (before.width, before.height) == (192, 256)
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        assert [s.type for s in b.streams] == [s.type for s in a.streams]
        assert b.metadata.get("title") == "beach"
        assert [f.pts for f in b.decode(video=0)] == [f.pts for f in a.decode(video=0)]
    packets_in, packets_out = read_packets(clip), read_packets(out)
    for index in (1, 2, 3):  # two audio tracks and the subtitles, byte for byte
        assert packets_out[index] == packets_in[index]


def test_bad_input_fails_before_any_weights_are_fetched(tmp_path, capsys):
    """A wrong file must not cost a model download first: no weights are given or cached."""
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    code, err = cli("restore", bad, "--cache-dir", tmp_path / "empty-cache", capsys=capsys)
    assert code == 3 and "notes.mp4" in err
    assert "download" not in err


def test_models_download_from_a_mirror_then_listed_as_cached(gpen256_file, http_server, tmp_path, capsys):
    import shutil

    shutil.copy(gpen256_file, http_server.root / "GPEN-BFR-256.pth")
    cache = tmp_path / "cache"
    mirror = f"http://127.0.0.1:{http_server.port}/"
    code = main(["models", "download", "GPEN-BFR-256", "--mirror", mirror, "--cache-dir", str(cache), "-q"])
    assert code == 0, capsys.readouterr().err
    cached = cache / "GPEN-BFR-256.pth"
    assert cached.read_bytes() == gpen256_file.read_bytes()
    assert http_server.requests and http_server.requests[0][0] == "/GPEN-BFR-256.pth"
    capsys.readouterr()
    assert main(["models", "--cache-dir", str(cache)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("GPEN-BFR-256"))
    assert "cached, verified" in line


def test_unknown_model_name_lists_the_presets(tmp_path, capsys):
    code = main(["models", "download", "GPEN-BFR-9000", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "GPEN-BFR-512" in err  # an unknown name is a bad option, not a weights problem


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpen_video", "restore", str(tmp_path / "nope.mp4"), "--debug"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "InputError" in result.stderr


@pytest.mark.parametrize("flag, expected", [("auto", None), ("6", 6)])
def test_batch_size_auto_overrides_a_preset(tmp_path, flag, expected):
    from gpen_video.cli import build_parser
    from gpen_video.config import config_from_options

    preset = tmp_path / "p.toml"
    preset.write_text("batch_size = 8\n")
    args = build_parser().parse_args(["restore", "x.mp4", "--config", str(preset), "--batch-size", flag])
    assert config_from_options(args.config, vars(args)).batch_size == expected


def test_report_on_an_image_is_refused(portrait, tmp_path, capsys):
    code, err = cli("restore", portrait, "--report", tmp_path / "r.json", capsys=capsys)
    assert code == 3 and "image" in err
    assert not (tmp_path / "r.json").exists()


def test_folder_counts_unexpected_errors_and_goes_on(portrait, clip, detector_pipeline_args, tmp_path, capsys, monkeypatch):
    """A per-file failure that is not a GpenVideoError (an FFmpeg error while encoding) is
    reported, skipped and counted like any other."""
    from gpen_video.jobs.api import FacePipeline

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(clip.read_bytes())
    (folder / "b.jpg").write_bytes(portrait.read_bytes())
    original = FacePipeline.restore_video

    def broken(self, src, *args, **kwargs):
        if Path(src).name == "a.mp4":
            raise av.FFmpegError(5, "Input/output error")
        return original(self, src, *args, **kwargs)

    monkeypatch.setattr(FacePipeline, "restore_video", broken)
    code, err = cli("restore", folder, *detector_pipeline_args, capsys=capsys)
    assert code == 1
    assert "1 restored, 1 failed" in err and "a.mp4" in err and "FFmpegError" in err
    assert (folder / "b.restored.jpg").exists()
    assert "Traceback" not in err


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signals_stop_cleanly_and_leave_nothing(tmp_path, gpen256_file, sig, code):
    """SIGTERM and SIGHUP are treated like Ctrl-C: the temporary output is removed and the
    exit code is 128 + the signal."""
    import signal
    import time

    clip = tmp_path / "long.mp4"
    render_clip(clip, seconds=8, size=(320, 180), faces=1, audio=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpen_video", "restore", str(clip), "-o", str(out_dir / "o.mp4"),
         "--model", "GPEN-BFR-256", "--weights", str(gpen256_file), "--device", "cpu", "-q",
         "--report", str(out_dir / "r.json")],
        stderr=subprocess.PIPE, text=True,
        # a shell without job control starts background commands with SIGINT ignored, and a
        # child inherits that: give the child the default a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(out_dir.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and list(out_dir.iterdir()), "the run never started writing"
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert list(out_dir.iterdir()) == []
    assert "Traceback" not in err and "interrupted" in err


def test_skip_tracks_flag(tmp_path):
    from gpen_video.cli import build_parser
    from gpen_video.config import config_from_options

    args = build_parser().parse_args(["restore", "x.mp4", "--skip-tracks", "3,7"])
    assert config_from_options(args.config, vars(args)).skip_tracks == (3, 7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["restore", "x.mp4", "--skip-tracks", "a"])


def test_unknown_model_is_a_bad_option_before_the_input_is_read(clip, tmp_path, capsys):
    code, err = cli("restore", clip, "-o", tmp_path / "o.mp4", "--model", "GPEN-BFR-9000", capsys=capsys)
    assert code == 2 and "GPEN-BFR-256" in err and err.count("error:") == 1


@pytest.mark.parametrize("bad", [["--sharpen", "--denoise", "3"], ["--crf", "high", "--sharpen"], []])
def test_bad_options_are_one_error_line_without_usage(bad, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["restore", "in.mp4", *bad] if bad else [])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], lines
