"""Which files are videos or images, and which codec may be written to which container: the
one table every interface (command line, web page), the encoder and the segment writer read.

Each output codec has an encoder, the container its segment files are written to (see
``segments``) and the output extensions it can be assembled into. An output whose extension
is not listed for its codec is refused before any work is done, with a container that works.

>>> CODECS["ffv1"].encoder, CODECS["ffv1"].suffixes
('ffv1', ('.mkv', '.avi'))
>>> output_suffix(".webm", "h264")
'.mp4'
>>> media_kind(Path("tape.MOV")), media_kind(Path("photo.jpg")), media_kind(Path("notes.txt"))
('video', 'image', None)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpen_video.errors import ConfigError


@dataclass(frozen=True)
class CodecFormat:
    """One output codec.

    Attributes:
        name: the name users give (``--codec``, the ``codec`` config key).
        label: how the web page offers it.
        encoder: the FFmpeg encoder that writes it.
        decoder: FFmpeg's name of the codec in a stream (``codec_context.name``).
        segment_suffix: container of the segment files (never an output's): ISO BMFF, which
            keeps every pts and dts of the source time base exactly (Matroska rounds to 1 ms,
            NUT shifts timestamps); MP4 for all but ProRes, which only MOV holds.
        suffixes: output extensions it can be written to, the preferred one first (used when
            the input's container cannot hold the codec).
    """

    name: str
    label: str
    encoder: str
    decoder: str
    segment_suffix: str
    suffixes: tuple[str, ...]

    @property
    def default_suffix(self) -> str:
        return self.suffixes[0]


CODECS: dict[str, CodecFormat] = {
    c.name: c
    for c in (
        CodecFormat("h264", "H.264 (plays everywhere)", "libx264", "h264", ".mp4",
                    (".mp4", ".m4v", ".mov", ".mkv", ".ts", ".m2ts", ".mts", ".flv", ".3gp")),
        CodecFormat("h265", "H.265 (smaller files)", "libx265", "hevc", ".mp4",
                    (".mp4", ".mov", ".mkv", ".ts", ".m2ts", ".mts")),
        CodecFormat("prores", "ProRes (for editing)", "prores_ks", "prores", ".mov", (".mov", ".mkv")),
        CodecFormat("ffv1", "FFV1 (lossless archive)", "ffv1", "ffv1", ".mp4", (".mkv", ".avi")),
    )
}
"""Every output codec, in the order interfaces offer them."""

FRAME_COUNTING_CONTAINERS = frozenset({".avi"})
"""Containers that store no timestamps but count frames from 0 at a fixed rate (AVI: the
stream's time base is one frame, and a gap is an empty frame). Video is written to them at
the source's average frame rate, moved to start at 0: a variable frame rate is not kept. They hold no B-frames faithfully (the reader
cannot recover the presentation order's timestamps), so only FFV1, whose pictures are all
keyframes, goes in AVI."""

VIDEO_SUFFIXES = frozenset({
    ".mp4", ".mov", ".mkv", ".avi", ".webm", ".mts", ".m2ts", ".ts", ".mpg", ".mpeg", ".vob", ".dv",
    ".3gp", ".m4v", ".wmv", ".flv",
})
"""Extensions a folder's videos are recognised by. A single file is probed whatever its name."""

KNOWN_CONTAINERS = VIDEO_SUFFIXES | {s for c in CODECS.values() for s in c.suffixes}
"""Extensions of the video containers ``check_container`` judges."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
"""Extensions of the photos restored as images (by name: a still is never probed as video)."""


def codec_format(codec: str) -> CodecFormat:
    """The table's entry for ``codec``.

    Raises:
        ConfigError: no such codec; the message lists the known ones.
    """
    try:
        return CODECS[codec]
    except KeyError:
        raise ConfigError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}") from None


def check_container(codec: str, output: Path) -> None:
    """Refuse an output whose container cannot hold ``codec``, naming one that can. (An
    extension that names no video container, or none, is the writer's to refuse: exit 4.)

    >>> check_container("prores", Path("out.mp4"))
    Traceback (most recent call last):
    ...
    gpen_video.errors.ConfigError: prores cannot be written to out.mp4 (.mp4); prores goes in .mov or .mkv: use -o out.mov, or --codec h264 or h265

    Raises:
        ConfigError: the container cannot hold the codec (a bad combination of options).
    """
    entry = codec_format(codec)
    if output.suffix.lower() not in KNOWN_CONTAINERS or output.suffix.lower() in entry.suffixes:
        return
    suffix = output.suffix.lower()
    fix = f"use -o {output.with_suffix(entry.default_suffix).name}"
    others = [name for name, other in CODECS.items() if suffix in other.suffixes]
    if others:
        fix += f", or --codec {_either(tuple(others))}"
    raise ConfigError(f"{codec} cannot be written to {output.name} ({output.suffix}); "
                      f"{codec} goes in {_either(entry.suffixes)}: {fix}")


def output_suffix(suffix: str, codec: str) -> str:
    """A video output's extension: the input's, unless ``codec`` cannot go in that container,
    then the codec's preferred one."""
    entry = codec_format(codec)
    return suffix if suffix.lower() in entry.suffixes else entry.default_suffix


def media_kind(path: Path) -> Literal["video", "image"] | None:
    """``"image"`` or ``"video"`` by the file's extension; None for anything else. The one rule
    that sends a file to ``restore_image`` or ``restore_video``."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return "video" if suffix in VIDEO_SUFFIXES else None


def is_image(path: Path) -> bool:
    """True for a photo (restored by ``restore_image``); any other file is treated as a video."""
    return media_kind(path) == "image"


def _either(suffixes: tuple[str, ...]) -> str:
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
