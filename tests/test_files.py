"""Atomic files: normal permissions, no leftovers on errors, signals or kill -9, full disks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpen_video.errors import InputError, OutputError
from gpen_video.io import files
from gpen_video.io.files import atomic_file, check_input_file, create_temp, install, write_atomic
from gpen_video.io.images import write_image
from tests.clips import small_disk

ROOT = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(old)


def test_written_files_get_the_users_normal_permissions(tmp_path, umask):
    umask(0o022)
    write_atomic(tmp_path / "report.json", b"{}")
    assert _mode(tmp_path / "report.json") == 0o644
    umask(0o027)
    write_atomic(tmp_path / "private.json", b"{}")
    assert _mode(tmp_path / "private.json") == 0o640
    umask(0o022)
    write_image(tmp_path / "still.png", np.zeros((4, 4, 3), np.uint8))
    assert _mode(tmp_path / "still.png") == 0o644


def test_downloaded_weights_and_their_sidecar_get_normal_permissions(
        tmp_path, umask, http_server, tiny_gpen_checkpoint, tiny_config):
    from gpen_video.restore.weights import WeightSpec, resolve_weights

    umask(0o022)
    (http_server.root / "GPEN-tiny.pth").write_bytes(tiny_gpen_checkpoint("GPEN-tiny.pth").read_bytes())
    spec = WeightSpec(name="GPEN-tiny", kind="gpen", filename="GPEN-tiny.pth",
                      urls=(http_server.url("GPEN-tiny.pth"),), size_bytes=1_300_000,
                      config=tiny_config, origin="tests")
    path = resolve_weights(spec, cache_dir=tmp_path / "cache", progress=False)
    sidecars = [p for p in path.parent.iterdir() if p != path]
    assert sidecars and _mode(path) == 0o644 and all(_mode(p) == 0o644 for p in sidecars)


def test_write_atomic_on_a_full_disk_fails_cleanly(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        old = disk / "report.json"
        old.write_bytes(b"earlier report")
        with pytest.raises(OutputError, match="disk is full") as err:
            write_atomic(old, b"x" * (3 << 20))
        assert err.value.exit_code == 4 and str(old) in str(err.value)
        assert "\n" not in str(err.value)
        assert old.read_bytes() == b"earlier report"
        with pytest.raises(OutputError, match="disk is full"):
            noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
            write_image(disk / "big.png", noise)
        assert sorted(p.name for p in disk.iterdir()) == ["report.json"]


class SignalAbort(BaseException):
    """What a CLI's SIGTERM handler might raise."""


@pytest.mark.parametrize("how", ["keyboard", "signal"])
def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch, how):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")

    def handler(signum, frame):
        raise SignalAbort(signum)

    def interrupted_fsync(fd):
        if how == "keyboard":
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGUSR1)  # the handler raises at the next bytecode

    previous = signal.signal(signal.SIGUSR1, handler)
    monkeypatch.setattr(files.os, "fsync", interrupted_fsync)
    try:
        with pytest.raises(KeyboardInterrupt if how == "keyboard" else SignalAbort):
            write_atomic(target, b"new")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert target.read_bytes() == b"old"


def test_atomic_file_appears_only_when_its_block_completes(tmp_path):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as out:
            out.write(b'{"tracks": [')
            assert target.read_bytes() == b"old"
            raise RuntimeError("planner failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"] and target.read_bytes() == b"old"
    with atomic_file(target) as out:
        out.write(b'{"tracks": []}')
    assert target.read_bytes() == b'{"tracks": []}' and _mode(target) == 0o644


_MAKE_TEMP = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from gpen_video.io.files import create_temp
    tmp = create_temp(Path(sys.argv[1]))
    print(tmp, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
""")


def _temp_in_subprocess(target: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _MAKE_TEMP, str(target), mode],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return proc, Path(proc.stdout.readline().strip())


def test_temporary_files_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    target = tmp_path / "clip.restored.mp4"
    live, live_tmp = _temp_in_subprocess(target, "live")
    dead, dead_tmp = _temp_in_subprocess(target, "die")
    assert dead.wait() == -signal.SIGKILL
    other = tmp_path / ".other.mp4.tmp-1-deadbeef.mp4"  # another target's: not ours to judge
    other.touch()
    try:
        assert dead_tmp.exists() and live_tmp.exists()
        assert dead_tmp.name.startswith(".clip.restored.mp4.tmp-") and dead_tmp.suffix == ".mp4"
        write_atomic(target, b"done")
        assert not dead_tmp.exists()
        assert live_tmp.exists() and other.exists()  # a running job's file is left alone
    finally:
        live.kill()
        live.wait()
        live.stdout.close()
        dead.stdout.close()


@pytest.mark.parametrize("where", ["read-only", "special"])
def test_folder_where_no_file_can_be_created_is_an_output_error(tmp_path, where):
    if where == "special":
        folder = Path("/proc/self")
        _expect_output_error(folder)
    else:
        with small_disk(tmp_path / "ro", "1m", read_only=True) as folder:
            _expect_output_error(folder)


def _expect_output_error(folder: Path) -> None:
    with pytest.raises(OutputError) as err:
        write_atomic(folder / "out.json", b"{}")
    message = str(err.value)
    assert err.value.exit_code == 4 and f"output folder {folder}" in message and "\n" not in message


def test_install_without_overwrite_keeps_a_file_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out.png"
    tmp = create_temp(target)
    tmp.write_bytes(b"new")
    target.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="already exists"):
        install(tmp, target, overwrite=False)
    assert target.read_bytes() == b"someone else's"
    install(tmp, target, overwrite=True)
    assert target.read_bytes() == b"new" and not tmp.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: os.mkfifo(d / "in.mp4") or d / "in.mp4", "is a pipe"),
        (lambda d: Path("/dev/null"), "is a character device"),
        (lambda d: os.symlink(d / "gone.mp4", d / "in.mp4") or d / "in.mp4", "broken symbolic link"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "in.mp4").touch() or d / "in.mp4", "empty (0 bytes)"),
        (lambda d: d / "missing.mp4", "does not exist"),
    ],
    ids=["fifo", "dev-null", "dangling-symlink", "directory", "empty", "missing"],
)
def test_inputs_that_are_not_regular_files_say_what_they_are(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        check_input_file(path)
    assert message in str(err.value) and str(path) in str(err.value) and err.value.exit_code == 3
