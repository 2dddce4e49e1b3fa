"""Files that appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gpen_video.errors import OutputError


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A crash or an interrupt leaves either the old file or the new one, never a part, and the
    temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}; check the folder exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(input_path: Path, output_path: Path, *, overwrite: bool) -> None:
    """Refuse to write over the input, or over an existing file without ``overwrite``."""
    if output_path.exists():
        if input_path.exists() and os.path.samefile(input_path, output_path):
            raise OutputError(f"output {output_path} is the input; choose another name with -o")
        if not overwrite:
            raise OutputError(f"output {output_path} already exists; pass -y to replace it")
