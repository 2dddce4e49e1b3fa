"""The server folder the page may pick inputs from (``--media-dir``), for files too big to upload.

Every name is resolved (symbolic links included) and must land inside the folder: a link that
points outside, ``..`` and absolute names are refused, so nothing else on the server can be
read through the page.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpen_video.errors import ConfigError, InputError
from gpen_video.formats import media_kind

MAX_LISTED = 5000
"""Most files listed in the page; a bigger folder is cut with a note in the log."""


class MediaDir:
    """Media files under ``root`` (recursively), by their names relative to it.

    Example::

        media = MediaDir("/srv/tapes")
        media.names()
        # -> ['1994/christmas.mp4', 'wedding.mov']
        media.resolve("wedding.mov")
        # -> PosixPath('/srv/tapes/wedding.mov')
    """

    def __init__(self, root: str | Path) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--media-dir {path} is not a folder; give an existing folder")
        self.root = path.resolve()

    def _inside(self, path: Path) -> Path | None:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # broken or looping link
            return None
        return real if real.is_relative_to(self.root) and real.is_file() else None

    def names(self) -> list[str]:
        """Video and image files under the folder, sorted; hidden files and folders skipped."""
        found: list[str] = []
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder, name)
                if name.startswith(".") or media_kind(path) is None:
                    continue
                if self._inside(path) is not None:
                    found.append(path.relative_to(self.root).as_posix())
                if len(found) >= MAX_LISTED:
                    return found
        return found

    def resolve(self, name: str) -> Path:
        """The real path of ``name`` (relative to the folder); InputError unless it is a file
        inside the folder."""
        relative = Path(name)
        real = None if relative.is_absolute() or ".." in relative.parts else self._inside(self.root / relative)
        if real is None:
            raise InputError(f"{name} is not a file in the media folder; pick one from the list")
        return real
