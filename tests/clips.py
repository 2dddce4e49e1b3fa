"""Synthesize small test clips with PyAV, and damage them on purpose.

Every helper writes real media files (no mocks), small enough for fast tests::

    from tests.clips import make_clip
    path = make_clip(tmp_path / "in.mp4", frames=12, audio_tracks=1, subtitle=True)

Conventions:
- ``size`` is (width, height) of the *stored* picture; with ``rotation`` a player shows it
  turned by that many degrees counterclockwise (FFmpeg's display-matrix convention).
- ``frame_fn(i)`` returns the stored picture of frame ``i`` as RGB, (H, W, 3) uint8, or uint16
  (full 16-bit scale) for high-bit-depth pixel formats. The default is a moving pattern with
  enough structure that dropped, duplicated or rotated frames are detected.
- Timestamps: constant rate ``rate`` in time base ``1/rate`` unless ``vfr_pts`` (strictly
  increasing ints in ``time_base`` units) is given.
- Audio is a sine tone per track (different pitch per track, AAC; FLAC with ``audio_codec``),
  as long as the video. Subtitles are one cue per second: SubRip in Matroska, mov_text in
  MP4/MOV (encoded by FFmpeg's text encoders through PyAV's ``SubtitleSet``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.subtitles.subtitle import SubtitleSet

__all__ = [
    "make_clip",
    "pattern",
    "truncate",
    "corrupt_middle",
    "read_frames",
    "read_packets",
    "psnr",
    "small_disk",
    "ffprobe_streams",
]

_ASS_HEADER = b"""[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, \
Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, \
Shadow, Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""


def pattern(i: int, width: int, height: int, *, high_bit: bool = False) -> np.ndarray:
    """A smooth moving gradient with a light block whose position encodes ``i``.

    Smooth content keeps lossy codecs near-transparent (so pixel tests can be strict) while
    the block makes each frame, and its orientation, distinguishable.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)  # [HW]
    r = 0.5 + 0.4 * np.sin(2 * math.pi * (x / max(width, 8) + i / 24))
    g = 0.5 + 0.4 * np.cos(2 * math.pi * (y / max(height, 8) + i / 36))
    b = 0.3 + 0.4 * (x + y) / max(width + height - 2, 1)
    rgb = np.stack([r, g, b], axis=-1)  # [HWC]
    bw, bh = max(width // 6, 2), max(height // 6, 2)
    bx = (i * 3) % max(width - bw, 1)
    # Moderate saturation: 4:2:0 chroma at the block edges stays inside the RGB gamut, so a
    # YUV -> RGB -> YUV round trip is exact and pixel tests measure the codec, not clipping.
    rgb[: bh, bx : bx + bw] = (0.8, 0.75, 0.35)
    rgb[height - bh :, : bw] = (0.3, 0.3, 0.7)  # fixed marker: bottom-left of the stored picture
    if high_bit:
        return np.round(rgb * 65535).astype(np.uint16)
    return np.round(rgb * 255).astype(np.uint8)


def _interlaced_pattern(i: int, width: int, height: int) -> np.ndarray:
    """Two fields half a frame apart, woven, bottom field first: moving content combs.

    Field ``k`` (counting fields from 0) shows ``pattern(k)``: the bottom (odd) rows of frame
    ``i`` are ``pattern(2i)``, the top rows ``pattern(2i + 1)``.
    """
    woven = pattern(2 * i + 1, width, height)
    woven[1::2] = pattern(2 * i, width, height)[1::2]
    return woven


def make_clip(
    path: str | Path,
    *,
    frames: int = 24,
    size: tuple[int, int] = (64, 48),
    rate: Fraction | int = Fraction(25),
    pix_fmt: str = "yuv420p",
    codec: str = "libx264",
    vfr_pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
    audio_tracks: int = 1,
    audio_codec: str = "aac",
    subtitle: bool = False,
    interlaced: bool = False,
    frame_fn: Callable[[int], np.ndarray] | None = None,
    metadata: Mapping[str, str] | None = None,
    stream_metadata: Mapping[str, str] | None = None,
    color: Mapping[str, int] | None = None,
    sample_aspect_ratio: Fraction | None = None,
    options: Mapping[str, str] | None = None,
) -> Path:
    """Write a small clip and return its path.

    Args:
        path: output file; its extension picks the container (mp4, mov, mkv, ...).
        frames: number of video frames.
        size: (width, height) of the stored picture.
        rate: frame rate of a constant-rate clip (also the encoder's nominal rate for VFR).
        pix_fmt: encoder pixel format (e.g. yuv420p, yuv422p10le, yuv444p).
        codec: video encoder name (libx264, libx265, prores_ks, ffv1, mpeg2video, ...).
        vfr_pts: per-frame pts in ``time_base`` units for variable frame rate.
        time_base: stream time base (default ``1/rate``; give e.g. 1/1000 with ``vfr_pts``).
        rotation: display rotation in degrees counterclockwise (0, 90, 180, 270).
        audio_tracks: how many sine-tone audio streams to add.
        audio_codec: "aac" (default) or "flac" or "pcm_s16le" (where the container allows).
        subtitle: add a text subtitle stream with one cue per second.
        interlaced: encode as bottom-field-first interlaced (libx264) with woven content:
            field k shows ``pattern(k)`` (see ``_interlaced_pattern``).
        frame_fn: ``i -> RGB array`` for the stored picture of frame i.
        metadata: container metadata (e.g. {"title": ..., "creation_time": ...}).
        stream_metadata: video stream metadata (e.g. {"language": "eng", "handler_name": ...}).
        color: colour tags on the video stream: keys ``range``, ``primaries``, ``trc``, ``space``
            with FFmpeg enum values (e.g. {"range": 1, "primaries": 1, "trc": 1, "space": 1}
            for BT.709 limited range); the RGB->YUV conversion uses ``space`` and ``range``.
        sample_aspect_ratio: pixel aspect ratio to tag (e.g. Fraction(16, 15)).
        options: extra encoder options.

    Returns:
        ``Path(path)``.
    """
    path = Path(path)
    rate = Fraction(rate)
    width, height = size
    if vfr_pts is not None and len(vfr_pts) != frames:
        raise ValueError(f"vfr_pts has {len(vfr_pts)} entries for {frames} frames")
    time_base = time_base or (Fraction(1, 1000) if vfr_pts is not None else 1 / rate)
    high_bit = av.video.format.VideoFormat(pix_fmt).components[0].bits > 8
    if frame_fn is None:
        if interlaced:
            frame_fn = lambda i: _interlaced_pattern(i, width, height)  # noqa: E731
        else:
            frame_fn = lambda i: pattern(i, width, height, high_bit=high_bit)  # noqa: E731
    color = dict(color or {})

    with av.open(str(path), "w") as out:
        out.metadata.update(metadata or {})
        video = out.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.time_base = time_base
        video.codec_context.time_base = time_base
        enc_options = dict(options or {})
        if interlaced:
            # libx264 takes the field order from each frame's flags, which PyAV cannot set on
            # new frames, so it writes bottom field first: the content is woven to match.
            enc_options["x264-params"] = "interlaced=1:bff=1"
            video.codec_context.field_order = 3  # AV_FIELD_BB
        if codec == "libx264":
            enc_options.setdefault("preset", "ultrafast")
            enc_options.setdefault("crf", "12")
        video.options = enc_options
        if "range" in color:
            video.codec_context.color_range = color["range"]
        if "primaries" in color:
            video.codec_context.color_primaries = color["primaries"]
        if "trc" in color:
            video.codec_context.color_trc = color["trc"]
        if "space" in color:
            video.codec_context.colorspace = color["space"]
        if sample_aspect_ratio is not None:
            video.codec_context.sample_aspect_ratio = sample_aspect_ratio
        if rotation:
            video.set_display_rotation(rotation)
        video.metadata.update(stream_metadata or {})

        audio_streams = []
        for t in range(audio_tracks):
            a = out.add_stream(audio_codec, rate=48000)
            a.layout = "mono" if t else "stereo"
            a.metadata["language"] = ["eng", "fra", "deu", "spa"][t % 4]
            audio_streams.append(a)

        sub = None
        if subtitle:
            sub_codec = "subrip" if path.suffix.lower() in (".mkv", ".mka", ".webm") else "mov_text"
            sub = out.add_stream(sub_codec)
            sub.codec_context.subtitle_header = _ASS_HEADER
            sub.codec_context.time_base = Fraction(1, 1000)
            sub.metadata["language"] = "eng"

        pts_list = list(vfr_pts) if vfr_pts is not None else [
            int(i / rate / time_base) for i in range(frames)
        ]
        cs_kwargs = {}
        if "space" in color:
            cs_kwargs["dst_colorspace"] = _SWS_CS.get(color["space"], 5)
        if "range" in color:
            cs_kwargs["dst_color_range"] = color["range"]
        for i in range(frames):
            rgb = np.ascontiguousarray(frame_fn(i))
            fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
            frame = av.VideoFrame.from_ndarray(rgb, format=fmt)
            frame = frame.reformat(format=pix_fmt, **cs_kwargs)
            frame.pts = pts_list[i]
            frame.time_base = time_base
            out.mux(video.encode(frame))
        out.mux(video.encode(None))

        seconds = float((pts_list[-1] + 1) * time_base) if vfr_pts is not None else frames / rate
        for t, a in enumerate(audio_streams):
            _write_tone(out, a, float(seconds), 330.0 * (t + 1))
        if sub is not None:
            for s in range(max(1, math.ceil(float(seconds)))):
                text = f"0,0,Default,,0,0,0,,Line {s}".encode()
                packet = sub.codec_context.encode_subtitle(
                    SubtitleSet.create(text, start=0, end=800, pts=s * 1000)
                )
                packet.stream = sub
                packet.pts = packet.dts = s * 1000
                packet.duration = 800
                packet.time_base = Fraction(1, 1000)
                out.mux(packet)
    return path


def _write_tone(out: av.container.OutputContainer, stream, seconds: float, freq: float) -> None:
    sample_rate = 48000
    total = int(round(seconds * sample_rate))
    channels = stream.layout.nb_channels
    fmt = stream.codec_context.codec.audio_formats[0].name
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n) / sample_rate)
        wave = 0.3 * np.sin(2 * math.pi * freq * t)  # [S]
        if fmt in ("s16", "s16p"):
            data = np.round(wave * 32767).astype(np.int16)
        elif fmt in ("s32", "s32p"):
            data = np.round(wave * 2**31 * 0.99).astype(np.int32)
        else:
            data = wave.astype(np.float32)
        planar = fmt.endswith("p")
        if planar:
            array = np.tile(data, (channels, 1))  # [CS]
        else:
            array = np.repeat(data, channels)[None, :]  # [1, S*C]
        frame = av.AudioFrame.from_ndarray(array, format=fmt, layout=stream.layout.name)
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


# AVColorSpace -> SwsColorspace (the matrices swscale knows).
_SWS_CS = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}


def truncate(path: str | Path, fraction: float = 0.6) -> Path:
    """Cut the file to ``fraction`` of its size in place (a download that stopped)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def corrupt_middle(path: str | Path, *, start: float = 0.4, length: float = 0.1, seed: int = 0) -> Path:
    """Overwrite bytes from ``start`` to ``start + length`` (fractions of the size) with noise."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    a = int(len(data) * start)
    b = int(len(data) * (start + length))
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def read_frames(path: str | Path) -> list[av.VideoFrame]:
    """Every decoded video frame of the first video stream (small clips only)."""
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def read_packets(path: str | Path) -> dict[int, list[tuple[int | None, int | None, bytes]]]:
    """Per stream index, every non-empty packet as (pts, dts, bytes), in file order."""
    result: dict[int, list[tuple[int | None, int | None, bytes]]] = {}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size == 0:
                continue
            result.setdefault(packet.stream.index, []).append(
                (packet.pts, packet.dts, bytes(packet))
            )
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images of the same dtype (inf when equal)."""
    peak = 65535.0 if a.dtype == np.uint16 else 255.0
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@contextlib.contextmanager
def small_disk(path: str | Path, size: str = "1m", *, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (created) for disk-full and read-only tests.

    Skips the test when not root or when mounting is not permitted.
    """
    path = Path(path)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def ffprobe_streams(path: str | Path) -> list[dict]:
    """Every stream of ``path`` as FFmpeg's own ffprobe reports it (a reader independent of
    PyAV's build); skips the test when ffprobe is not installed."""
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe is not installed (apt-get install ffmpeg)")
    done = subprocess.run(["ffprobe", "-v", "error", "-of", "json", "-show_streams", str(path)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["streams"]
