"""Files that appear whole or not at all, and the checks on input and output paths.

Every file gpen-video writes (videos, images, reports, weights sidecars) is first written to a
temporary file beside its target, named ``.NAME.tmp-PID-XXXXXXXX.EXT``, and renamed into place
only when complete. The temporary file is created like any other new file of the user's, so
the result gets the usual permissions (0644 under umask 022). Whatever stops a write (an
error, Ctrl-C, an exception raised from a signal handler) removes its temporary file; a run
killed outright (``kill -9``, power loss) leaves one behind, and the next write of the same
target removes it once the process named in it is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gpen_video.errors import GpenVideoError, InputError, OutputError

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
"""What every temporary file's name has after ``.NAME``: ``.NAME.tmp-PID-XXXXXXXX.EXT``."""

_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}


def disk_full(error: BaseException) -> bool:
    """True when ``error`` (an OSError or a PyAV error) means no space is left to write."""
    return getattr(error, "errno", None) in _FULL


def write_error(path: Path, error: BaseException) -> OutputError:
    """The OutputError for an OS-level failure writing ``path``: one line naming the cause."""
    code = getattr(error, "errno", None)
    reason = getattr(error, "strerror", None) or str(error)
    if code in _FULL:
        return OutputError(
            f"cannot write {path}: {_FULL[code]} ({reason}); free some space in {path.parent} "
            "or write elsewhere with -o (nothing was left behind)"
        )
    return OutputError(f"cannot write {path} ({reason}); check that {path.parent} is a folder you can write to")


def temp_owner(path: Path, name: str) -> int | None:
    """The PID in the temporary file ``name`` made for ``path``, or None if it is not one."""
    match = re.fullmatch(rf"\.{re.escape(path.name)}{re.escape(TEMP_MARK)}(\d+)-[0-9a-f]{{8}}.*", name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` whose writing process no longer runs (on this
    machine: the PID in the name is checked); returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    prefix = f".{path.name}{TEMP_MARK}"
    for entry in entries:
        pid = temp_owner(path, entry.name) if entry.name.startswith(prefix) else None
        if pid is None or _alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
        log.info("removed %s, left by an earlier run that was killed (process %d)", entry.path, pid)
    return removed


def create_temp(path: Path) -> Path:
    """Create an empty temporary file beside ``path`` and return its name.

    Its extension is ``path``'s (muxers choose the container by it). Created with mode 0666
    before the umask, as any program's new files are; stale temporary files of ``path`` are
    removed first.

    Raises:
        OutputError: the folder does not allow it (missing, read-only, special or full).
    """
    remove_stale_temps(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            if disk_full(exc):
                raise write_error(path, exc) from None
            raise OutputError(
                f"cannot create a file in the output folder {path.parent} ({exc.strerror}); "
                "choose a folder you can write to with -o"
            ) from None
        os.close(fd)
        return tmp


def install(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path``. Without ``overwrite``, a ``path`` that appeared
    meanwhile is not replaced (OutputError) and ``tmp`` is left for the caller to remove."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no window where another file is clobbered
    except FileExistsError:
        raise OutputError(f"output {path} already exists; remove it or pass -y to replace it") from None
    except OSError:  # the filesystem has no hard links (FAT, some network shares)
        if path.exists():
            raise OutputError(f"output {path} already exists; remove it or pass -y to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing (content written in pieces,
    such as a long video's report); when the block ends it is flushed to the disk and renamed
    to ``path``.

    A crash leaves the old file or the new one, never a part. Any exception in the block or
    on the way (KeyboardInterrupt and exceptions raised by signal handlers included) removes
    the temporary file and leaves ``path`` as it was.

    Raises:
        OutputError: the folder is unusable or full (one line saying which), or ``path``
            exists and ``overwrite`` is False.

    Example::

        with atomic_file(folder / "report.json") as out:
            out.write(b"{}")
    """
    path = Path(path)
    tmp = create_temp(path)
    try:
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except GpenVideoError:
            raise
        except OSError as exc:
            raise write_error(path, exc) from None
        install(tmp, path, overwrite=overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through ``atomic_file``: whole or not at all."""
    with atomic_file(path, overwrite=overwrite) as handle:
        handle.write(data)


def copy_atomic(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> None:
    """Copy ``src`` byte for byte to ``dst`` through ``atomic_file`` (the copy gets the
    user's normal permissions, not the source's)."""
    src = Path(src)
    try:
        reader = open(src, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {src} ({exc.strerror})") from None
    with reader, atomic_file(dst, overwrite=overwrite) as handle:
        shutil.copyfileobj(reader, handle, 1 << 20)


_SPECIAL = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def check_input_file(path: Path) -> None:
    """Raise InputError unless ``path`` is a regular, non-empty file.

    gpen-video reads its input more than once (to probe it, to decode it, to copy its other
    streams), so a pipe cannot be an input.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        kind = "a broken symbolic link" if path.is_symlink() else None
        if kind:
            raise InputError(f"input {path} is {kind}; point it at an existing file") from None
        raise InputError(f"input file {path} does not exist; check the path and try again") from None
    except OSError as exc:
        raise InputError(f"cannot read input {path} ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"input {path} is a directory; give a video or image file instead")
    if stat.S_ISFIFO(mode):
        raise InputError(
            f"input {path} is a pipe; gpen-video reads its input more than once, so save it to a "
            "file first and give that file"
        )
    if not stat.S_ISREG(mode):
        kind = _SPECIAL.get(stat.S_IFMT(mode), "not a regular file")
        raise InputError(f"input {path} is {kind}, not a media file; give a video or image file")
    if path.stat().st_size == 0:
        raise InputError(f"input file {path} is empty (0 bytes); copy or download it again")


def check_output(input_path: Path, output_path: Path, *, overwrite: bool) -> None:
    """Refuse to write over the input, over an existing file without ``overwrite``, over a
    folder, a pipe or a device (even with ``overwrite``), or into a folder that does not exist."""
    same = output_path.resolve() == input_path.resolve()
    if not same and output_path.exists() and input_path.exists():
        same = os.path.samefile(input_path, output_path)
    if same:
        raise OutputError(f"output {output_path} is the input; choose another name with -o")
    if output_path.is_dir():
        raise OutputError(f"output {output_path} is a directory; give a file name with an extension")
    if output_path.exists() and not output_path.is_file():
        raise OutputError(f"output {output_path} is not a regular file (a pipe or a device); give a file name")
    if output_path.exists() and not overwrite:
        raise OutputError(f"output {output_path} already exists; remove it or pass -y to replace it")
    if not output_path.parent.is_dir():
        raise OutputError(f"output folder {output_path.parent} does not exist; create it first")


class FileLock:
    """An exclusive lock on one file, held by this process until released (``with`` or
    ``release()``): the one way gpen-video keeps two processes out of the same folder (a job's
    work folder, a web server's jobs folder). The lock goes with the process, so one killed
    outright never leaves it held.

    Args:
        path: the lock file; made (empty) when missing, never deleted.
        busy: the error raised at once when another process holds it.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with FileLock(folder / "lock", OutputError("busy")):
    ...     FileLock(folder / "lock", OutputError("another run is working here")).acquire()
    Traceback (most recent call last):
    ...
    gpen_video.errors.OutputError: another run is working here
    """

    def __init__(self, path: str | Path, busy: GpenVideoError) -> None:
        self.path = Path(path)
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self.busy from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
