"""Read a video stream as upright RGB frames with exact timestamps, in bounded memory.

The decoder converts YUV to RGB with the stream's own colour matrix and range (and swscale
settings chosen so that ``encode.VideoWriter`` converting back with the same matrix returns
the decoded YUV samples unchanged), turns each picture upright according to the display
rotation, optionally deinterlaces with FFmpeg's bwdif, and keeps going over damaged data,
counting what it had to drop. It can also start mid-file: ``VideoReader.frames(start_pts)``
seeks to the keyframe before that frame (``VideoIndex``, read by demuxing only) and decodes
forward, so a resumed job does not decode what it already did.

For example, ``with VideoReader("tape.mp4") as reader:`` then ``for frame in reader.frames():``
gives each frame's ``index``, ``pts`` and ``rgb`` (H, W, 3) in order.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from gpen_video.errors import DecodeError, InputError
from gpen_video.io.colour import AVCOL_RANGE_JPEG, chroma_location, matrix_for, to_rgb
from gpen_video.io.files import check_input_file
from gpen_video.records import Frame, check_shape

log = logging.getLogger(__name__)

Deinterlace = Literal["auto", "off", "frame", "field"]

FIELD_ORDERS = {0: "unknown", 1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}

@dataclass(frozen=True)
class VideoInfo:
    """What a video stream is, as far as restoring it without changing it needs.

    Attributes:
        path: the input file.
        stream_index: index of the video stream in the container.
        codec_name: decoder name (h264, hevc, prores, ...).
        width, height: size as displayed (after rotation).
        coded_width, coded_height: size of the stored picture (before rotation).
        rotation: display rotation in degrees counterclockwise: 0, 90, 180 or 270.
        time_base: time base of ``Frame.pts``.
        average_rate: average frame rate (None if the container does not say).
        frame_count: number of frames if the container says, else None.
        duration: seconds, if known.
        pix_fmt: the decoder's pixel format (yuv420p, yuv422p10le, ...).
        bit_depth: bits per sample of the pixel format; > 8 gives uint16 frames.
        interlaced: True if the frames are interlaced (field order or frame flags).
        field_order: progressive, tt, bb, tb, bt or unknown.
        color_range, color_primaries, color_trc, colorspace: FFmpeg enum values as tagged
            (AVColorRange, AVColorPrimaries, AVColorTransferCharacteristic, AVColorSpace);
            copied verbatim to the output.
        sample_aspect_ratio: pixel aspect ratio (None if not tagged).
        matrix: AVColorSpace of the matrix used for YUV <-> RGB (the tag, or the usual guess
            for untagged video: BT.709 from 720 lines up, BT.601 below).
        full_range: whether YUV samples use the full range (JPEG) rather than limited (MPEG).
        chroma_location: FFmpeg's name of the chroma sample position (``left``, ``topleft``,
            ...), None if untagged; copied to the output.
    """

    path: Path
    stream_index: int
    codec_name: str
    width: int
    height: int
    coded_width: int
    coded_height: int
    rotation: int
    time_base: Fraction
    average_rate: Fraction | None
    frame_count: int | None
    duration: Fraction | None
    pix_fmt: str
    bit_depth: int
    interlaced: bool
    field_order: str
    color_range: int
    color_primaries: int
    color_trc: int
    colorspace: int
    sample_aspect_ratio: Fraction | None
    matrix: int
    full_range: bool
    chroma_location: str | None = None

    @property
    def rgb_format(self) -> str:
        """PyAV format of the RGB frames: rgb24 (uint8) or rgb48le (uint16)."""
        return "rgb48le" if self.bit_depth > 8 else "rgb24"

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.bit_depth > 8 else np.uint8

    @property
    def is_rgb(self) -> bool:
        """The stored pixels are RGB (no YUV matrix involved)."""
        return av.video.format.VideoFormat(self.pix_fmt).is_rgb


def _open(path: Path) -> av.container.InputContainer:
    """Open ``path`` for reading or raise InputError saying why and what to do."""
    return open_input(path, path)


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    """The main video stream: the first one that is not cover art."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise InputError(f"input file {path} has no video stream; give a file with video in it")


def _bit_depth(pix_fmt: str) -> int:
    return max(c.bits for c in av.video.format.VideoFormat(pix_fmt).components)


def _normalise_rotation(degrees: float, path: Path) -> int:
    quarter = int(round(degrees / 90.0)) % 4
    if abs(degrees - round(degrees / 90.0) * 90) > 1:
        log.warning("%s: display rotation %.1f degrees is not a multiple of 90; using %d",
                    path, degrees, quarter * 90)
    return quarter * 90


_DURATION_TAG = re.compile(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$")


def _stream_duration(stream: av.video.stream.VideoStream) -> Fraction | None:
    """Video duration in seconds from the stream (Matroska keeps it in a DURATION tag)."""
    if stream.duration and stream.time_base:
        return stream.duration * stream.time_base
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    match = _DURATION_TAG.match(tag.strip()) if tag else None
    if match:
        h, m, s = match.groups()
        return Fraction(int(h) * 3600 + int(m) * 60) + Fraction(s)
    return None


TS_PACKET_SIZES = (188, 192, 204)
"""MPEG-TS packet sizes: plain, with a 4-byte timestamp (Blu-ray .m2ts/.mts), with Reed-Solomon
parity. A whole transport stream is a whole number of its packets."""


def frames_missing(declared: int, present: int, last_pts: int | None, time_base: Fraction,
                   rate: Fraction | None) -> int:
    """Frames a stream declares but does not hold: ``declared - present``, except where the pts
    count frames (time base 1/rate, as in AVI) only the frames after the last pts count. AVI
    declares its empty "show the previous picture again" chunks (FFmpeg writes them for gaps
    in the timeline) as frames, though they hold no picture and lose nothing."""
    short = declared - present
    if short > 0 and last_pts is not None and rate and time_base == 1 / rate:
        short = min(short, declared - (last_pts + 1))
    return max(0, short)


def _cut_transport_stream(container: av.container.InputContainer, path: Path) -> bool:
    """True when ``path`` is an MPEG-TS that ends inside a transport packet: a file cut short.
    MPEG-TS records no duration, so this is the one sign that frames are missing at its end."""
    if container.format.name != "mpegts":
        return False
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return all(size % packet for packet in TS_PACKET_SIZES)


def _first_frame(container: av.container.InputContainer, stream, path: Path,
                 seen: IndexBuilder | None = None) -> av.VideoFrame:
    for packet in container.demux(stream):
        if seen is not None:
            seen.add(packet)
        try:
            frames = stream.decode(packet)
        except av.FFmpegError:
            continue
        if frames:
            return frames[0]
    raise DecodeError(
        f"no frame of {path} could be decoded; the file is damaged beyond repair or uses an "
        "unsupported codec"
    )


def probe(path: str | Path) -> VideoInfo:
    """Describe the main video stream of ``path`` (decodes its first frame).

    Raises:
        InputError: missing, empty, not media, or no video stream.
        DecodeError: no frame can be decoded.
    """
    path = Path(path)
    with _open(path) as container:
        return describe(container, path)


def open_input(source: str | Path | BinaryIO, path: Path) -> av.container.InputContainer:
    """Open ``source`` (the file at ``path``, or a handle on it) for reading, or raise
    InputError saying why and what to do. A job that reads the input's first bytes itself
    passes its handle, so the file is opened once for both."""
    if isinstance(source, (str, Path)):
        check_input_file(path)
    try:
        return av.open(source if not isinstance(source, Path) else str(source), mode="r")
    except av.FFmpegError as exc:
        raise InputError(
            f"input file {path} is not a video FFmpeg can read ({exc.strerror}); "
            "check that it is a complete media file"
        ) from None


def describe(container: av.container.InputContainer, path: Path, seen: IndexBuilder | None = None) -> VideoInfo:
    """``probe`` on an open ``container`` of ``path``: decodes its first video frame, so the
    container is left after it (open it again to decode from the start). ``seen`` gets every
    video packet demuxed on the way (see ``probe_and_index``)."""
    stream = _video_stream(container, path)
    ctx = stream.codec_context
    first = _first_frame(container, stream, path, seen)
    rotation = _normalise_rotation(first.rotation, path)
    coded_w, coded_h = first.width, first.height
    width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    pix_fmt = first.format.name
    field_order = FIELD_ORDERS.get(ctx.field_order, "unknown")
    interlaced = field_order in ("tt", "bb", "tb", "bt") or first.interlaced_frame
    colorspace = ctx.colorspace if ctx.colorspace != 2 else first.colorspace
    color_range = ctx.color_range or first.color_range
    full_range = color_range == AVCOL_RANGE_JPEG or pix_fmt.startswith("yuvj")
    duration = _stream_duration(stream)
    if duration is None and container.duration:
        duration = Fraction(container.duration, 1_000_000)
    return VideoInfo(
        path=path,
        stream_index=stream.index,
        codec_name=ctx.name,
        width=width,
        height=height,
        coded_width=coded_w,
        coded_height=coded_h,
        rotation=rotation,
        time_base=stream.time_base or Fraction(1, 90000),
        average_rate=stream.average_rate or stream.guessed_rate,
        frame_count=stream.frames or None,
        duration=duration,
        pix_fmt=pix_fmt,
        bit_depth=_bit_depth(pix_fmt),
        interlaced=bool(interlaced),
        field_order=field_order,
        color_range=color_range,
        color_primaries=ctx.color_primaries if ctx.color_primaries != 2 else first.color_primaries,
        color_trc=ctx.color_trc if ctx.color_trc != 2 else first.color_trc,
        colorspace=colorspace,
        sample_aspect_ratio=stream.sample_aspect_ratio or None,
        matrix=matrix_for(colorspace, coded_h),
        full_range=full_range,
        chroma_location=chroma_location(container, stream.index),
    )


@dataclass(frozen=True)
class VideoIndex:
    """Every frame's pts and the keyframes of a video stream, read by demuxing only.

    Attributes:
        pts: (n,) int64 frame pts in presentation order (the order decoded frames come out).
        keyframes: (k,) int64 indices into ``pts`` of the frames a decoder can start at.
        time_base: unit of ``pts``.
        stream_index: the video stream the index describes.

    Packets that would not decode still count here; a damaged file can therefore yield fewer
    frames than ``pts`` holds. Frames are best matched by pts, not by position.
    """

    pts: np.ndarray
    keyframes: np.ndarray
    time_base: Fraction
    stream_index: int

    def __post_init__(self) -> None:
        check_shape("VideoIndex.pts", self.pts, (None,))
        check_shape("VideoIndex.keyframes", self.keyframes, (None,))

    @classmethod
    def scan(cls, path: str | Path, stream_index: int | None = None) -> VideoIndex:
        """Demux the video stream of ``path`` (no decoding) and index its frames.

        Raises:
            InputError: the file cannot be read, has no video packet, or its video packets
                lack timestamps.
        """
        path = Path(path)
        if stream_index is None:
            stream_index = probe(path).stream_index
        try:
            container = av.open(str(path))
        except av.FFmpegError as exc:
            raise InputError(f"cannot read {path} to index it ({exc.strerror})") from None
        with container:
            builder = IndexBuilder(path, container.streams[stream_index])
            builder.read(container)
            return builder.index()

    def frame_at(self, pts: int) -> int | None:
        """Index of the frame with this pts (None if there is none)."""
        i = int(np.searchsorted(self.pts, pts))
        return i if i < self.pts.size and self.pts[i] == pts else None

    def keyframe_at_or_before(self, frame: int) -> int:
        """The last keyframe at or before ``frame`` (0 if none is): where decoding starts."""
        i = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[i]) if i >= 0 else 0

    def seek_points(self, frame: int) -> list[int]:
        """Frames to start decoding at to reach ``frame``, best first: the keyframe at or
        before it, then ever earlier keyframes (1, 3, 7, ... back), then frame 0.

        >>> VideoIndex(np.arange(100), np.arange(0, 100, 10), Fraction(1, 25), 0).seek_points(75)
        [70, 60, 40, 0]
        """
        keys = self.keyframes[self.keyframes <= frame]
        points, i, step = [], len(keys) - 1, 1
        while i >= 0 and keys[i] > 0:
            points.append(int(keys[i]))
            i, step = i - step, step * 2
        return [*points, 0]


class IndexBuilder:
    """Collects the pts and keyframes of a video stream's packets as they are demuxed, for a
    ``VideoIndex``: probing and indexing share one pass over the file."""

    def __init__(self, path: Path, stream: av.video.stream.VideoStream):
        self.path, self.stream = path, stream
        self.times: list[int] = []
        self.keys: list[int] = []
        self.problem: str | None = None

    def add(self, packet: av.Packet) -> None:
        """Count one demuxed packet of the stream (flush packets are skipped)."""
        if packet.size == 0 or self.problem is not None:
            return
        if packet.pts is None:
            self.problem = (f"{self.path} has video packets without timestamps; a seek needs them "
                            "(remux the file, e.g. to .mkv, first)")
            return
        if packet.is_keyframe:
            self.keys.append(packet.pts)
        self.times.append(packet.pts)

    def read(self, container: av.container.InputContainer) -> None:
        """Demux the rest of the stream from ``container`` (no decoding) into the index."""
        try:
            for packet in container.demux(self.stream):
                self.add(packet)
                if self.problem is not None:
                    return
        except av.FFmpegError as exc:
            if not self.times:
                self.problem = f"cannot read {self.path} to index it ({exc.strerror})"
            log.debug("%s: indexing stopped early: %s", self.path, exc)

    def index(self) -> VideoIndex:
        """The index of the packets seen.

        Raises:
            InputError: the stream has packets without timestamps, or none at all.
        """
        if self.problem is not None:
            raise InputError(self.problem)
        if not self.times:
            raise InputError(f"{self.path} has no video packets to index")
        pts = np.unique(np.asarray(self.times, dtype=np.int64))
        keyframes = np.searchsorted(pts, np.unique(np.asarray(self.keys, dtype=np.int64)))
        return VideoIndex(pts=pts, keyframes=keyframes.astype(np.int64), time_base=self.stream.time_base,
                          stream_index=self.stream.index)


def probe_and_index(container: av.container.InputContainer, path: Path) -> tuple[VideoInfo, VideoIndex | str]:
    """``probe`` and ``VideoIndex.scan`` in one demux of an open ``container`` of ``path``: the
    stream's description, and its index or why it has none (a stream without timestamps
    cannot be seeked)."""
    video = _video_stream(container, path)
    builder = IndexBuilder(path, video)
    info = describe(container, path, builder)
    builder.read(container)
    try:
        return info, builder.index()
    except InputError as exc:
        return info, str(exc)


class _Deinterlacer:
    """bwdif through a filter graph; returns frames with pts in ``time_base``."""

    def __init__(self, first: av.VideoFrame, time_base: Fraction, mode: str, only_interlaced: bool):
        self.graph = av.filter.Graph()
        src = self.graph.add_buffer(
            width=first.width, height=first.height, format=first.format, time_base=time_base
        )
        deint = "interlaced" if only_interlaced else "all"
        bwdif = self.graph.add("bwdif", f"mode={mode}:parity=auto:deint={deint}")
        sink = self.graph.add("buffersink")
        src.link_to(bwdif)
        bwdif.link_to(sink)
        self.graph.configure()
        self.src, self.sink = src, sink

    def push(self, frame: av.VideoFrame | None) -> list[av.VideoFrame]:
        self.src.push(frame)
        out = []
        while True:
            try:
                out.append(self.sink.pull())
            except (av.BlockingIOError, av.EOFError):
                return out


class SourcePicture:
    """The decoder's own picture behind a frame, carried with it (``Frame.source``): a
    ``records.PixelSource``.

    ``encode.VideoWriter`` passes its samples to the encoder wherever the frame's RGB still
    equals ``rgb`` (the RGB as decoded), so untouched pixels are never converted back, and
    passes the picture itself, unexamined, for a frame whose RGB was never made.

    Attributes:
        picture: the decoded picture, in the stored orientation and pixel format.
        layout: how its samples map to upright RGB (the reader's ``info``).
        shape, dtype: those of ``rgb``, known without converting.
    """

    _local = threading.local()  # each thread's swscale contexts, by output size

    def __init__(self, picture: av.VideoFrame, layout: VideoInfo) -> None:
        self.picture = picture
        self.layout = layout
        turned = layout.rotation in (90, 270)
        self.shape = (picture.width, picture.height, 3) if turned else (picture.height, picture.width, 3)
        self.dtype = np.dtype(layout.dtype)
        self._rgb: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) the upright RGB (``colour.to_rgb``), converted once, on first read (the
        same array every time: stages never write into a frame's pixels, they make new ones)."""
        with self._lock:
            if self._rgb is None:
                self._rgb = to_rgb(self.picture, self.layout, self._reformatter(None))
            return self._rgb

    @property
    def rgb_made(self) -> bool:
        return self._rgb is not None

    def scaled(self, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 upright RGB, area-downscaled from the stored samples
        (``colour.to_rgb`` with a ``size``): what detection and scene cuts look at."""
        return to_rgb(self.picture, self.layout, self._reformatter((width, height)), size=(width, height))

    @classmethod
    def _reformatter(cls, size: tuple[int, int] | None) -> VideoReformatter:
        """This thread's reformatter for one output size (a swscale context is not shared
        between threads, and switching sizes would rebuild it)."""
        cache = cls._local.__dict__.setdefault("reformatters", {})
        if size not in cache:
            cache[size] = VideoReformatter()
        return cache[size]


def deinterlaced_info(source: VideoInfo, deinterlace: Deinterlace) -> VideoInfo:
    """What the frames of a ``VideoReader(deinterlace=...)`` on a stream ``source`` are:
    progressive after deinterlacing, and at twice the rate (time base halved) with "field"."""
    if deinterlace == "off" or (deinterlace == "auto" and not source.interlaced):
        return source
    info = replace(source, interlaced=False, field_order="progressive")
    if deinterlace != "field":
        return info
    return replace(info, time_base=source.time_base / 2,
                   average_rate=source.average_rate * 2 if source.average_rate else None,
                   frame_count=source.frame_count * 2 if source.frame_count else None)


class _LandedLate(Exception):
    """A seek landed after the frame it was for (raised before any frame is yielded)."""


class _Stopped(Exception):
    """The decode reached ``stop_pts``."""


class VideoReader:
    """Stream the main video of a file as upright RGB ``Frame`` records.

    Args:
        path: input file.
        deinterlace: "auto" deinterlaces interlaced input only, one frame per frame with
            the same pts; "frame" always does that; "field" gives one frame per field (twice
            the rate, time base halved so the new pts are exact); "off" never deinterlaces.

        source_info: the stream as ``probe`` described it, when the caller has it already (a
            job probes its input once); None probes ``path``.
        index: the stream's ``VideoIndex``, when the caller has it already (a job keeps it in
            its work folder); None scans the file on the first seek.

    ``info`` describes the frames ``frames()`` yields (after deinterlacing); ``source_info``
    the stream as stored. Each frame carries its decoded picture (``Frame.source``), which
    ``encode.VideoWriter`` uses to pass untouched pixels through. After ``frames()`` is exhausted, ``damaged_frames`` counts frames
    that could not be decoded (dropped) and ``concealed_frames`` those decoded with errors
    that the decoder concealed (kept). Each ``frames()`` call decodes the file afresh, from
    its start or from the keyframe before ``start_pts``.
    """

    def __init__(self, path: str | Path, *, deinterlace: Deinterlace = "auto", source_info: VideoInfo | None = None,
                 index: VideoIndex | None = None):
        if deinterlace not in ("auto", "off", "frame", "field"):
            raise ValueError(f"deinterlace must be auto, off, frame or field, got {deinterlace!r}")
        self.path = Path(path)
        self.source_info = source_info if source_info is not None else probe(self.path)
        src = self.source_info
        self._deinterlace_mode: str | None = {
            "auto": "send_frame" if src.interlaced else None,
            "off": None,
            "frame": "send_frame",
            "field": "send_field",
        }[deinterlace]
        self._only_interlaced = deinterlace == "auto"
        self.info = deinterlaced_info(src, deinterlace)
        self.damaged_frames = 0
        self.concealed_frames = 0
        self._warned = False
        self._index = index

    def index(self) -> VideoIndex:
        """The source stream's frame pts and keyframes (demuxed once, on first use).

        Raises:
            InputError: the stream has packets without timestamps (it cannot be seeked).
        """
        if self._index is None:
            self._index = VideoIndex.scan(self.path, self.source_info.stream_index)
        return self._index

    def source_pts(self, pts: int) -> int:
        """The source stream's pts at or before the yielded frames' ``pts`` (which differ in
        time base when deinterlacing to fields)."""
        exact = Fraction(pts) * self.info.time_base / self.source_info.time_base
        return exact.numerator // exact.denominator

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between ``frames()`` calls; kept for the context-manager API."""

    def _lost_frames(self, stream, decoded: int, error_packets: int, first_pts: int | None,
                     last_pts: int | None, last_duration: int) -> int:
        """Frames lost, counted only from evidence, never from duration x average rate (which
        is wrong for variable frame rate): packets that failed to decode, fewer frames than
        the container declares (``frames_missing``), or frames that end well before the
        stream's declared length (a truncated file)."""
        lost = error_packets
        if stream.frames:
            return max(lost, frames_missing(int(stream.frames), decoded, last_pts, stream.time_base,
                                            stream.average_rate))
        duration = _stream_duration(stream)
        if not duration or first_pts is None or last_pts is None:
            return lost
        tb = stream.time_base
        step = (last_pts - first_pts) * tb / (decoded - 1) if decoded > 1 else None
        shown = last_duration * tb if last_duration else step
        if not shown:
            return lost
        missing = duration - (last_pts * tb + shown)  # lenient: absolute end against length
        typical = step or shown
        if missing > typical / 2:
            lost = max(lost, int(missing / typical + Fraction(1, 2)))
        return lost

    def _decoded(self, container, stream, *, partial: bool = False, seeked: bool = False) -> Iterator[av.VideoFrame]:
        """Decoder output in order; counts undecodable packets instead of stopping. ``partial``:
        decoding does not cover the whole stream, so only packets that failed count as lost;
        ``seeked``: it started after a seek (which nothing came after: _LandedLate)."""
        error_packets = 0
        decoded = 0
        first_pts: int | None = None
        last_pts: int | None = None
        last_duration = 0
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as exc:
                log.debug("%s: demuxing stopped early: %s", self.path, exc)
                packet = None
            try:
                frames = stream.decode(packet)
            except av.FFmpegError as exc:
                log.debug("%s: packet at pts %s could not be decoded: %s",
                          self.path, getattr(packet, "pts", None), exc)
                error_packets += 1
                frames = []
            for frame in frames:
                decoded += 1
                if frame.pts is not None:
                    first_pts = frame.pts if first_pts is None else first_pts
                    last_pts, last_duration = frame.pts, frame.duration or 0
                self.concealed_frames += bool(frame.is_corrupt)
                yield frame
            if packet is None:
                break
        lost = error_packets if partial else self._lost_frames(
            stream, decoded, error_packets, first_pts, last_pts, last_duration)
        self.damaged_frames = lost
        if decoded == 0 and seeked:
            raise _LandedLate
        if decoded == 0:
            raise DecodeError(
                f"no frame of {self.path} could be decoded; the file is damaged beyond repair "
                "or uses an unsupported codec"
            )
        cut = _cut_transport_stream(container, self.path)
        if (lost or self.concealed_frames or cut) and not self._warned:
            self._warned = True
            parts = []
            if lost:
                parts.append(f"{lost} of about {decoded + lost} frames could not be decoded "
                             "and were dropped (the rest keep their original timestamps)")
            if self.concealed_frames:
                n = self.concealed_frames
                parts.append(f"{n} frame{'s were' if n > 1 else ' was'} damaged and kept as the "
                             "decoder concealed the errors")
            if cut:
                parts.append("the file ends inside a transport packet, so it was cut short: the "
                             "frames after the last one that decodes are lost (MPEG-TS records no "
                             "length to count them by)")
            log.warning("%s is damaged: %s", self.path, "; ".join(parts))

    def frames(self, start_pts: int | None = None, *, start_index: int = 0,
               stop_pts: int | None = None) -> Iterator[Frame]:
        """Yield the frames as upright RGB ``Frame`` records; memory stays bounded.

        Args:
            start_pts: yield only the frames from this pts on (in ``info.time_base``).
                Decoding starts at the keyframe before it (``index``), one frame earlier when
                deinterlacing (the filter looks one frame back), so the frames are the very
                ones a decode from the start gives. Where a container's seek lands late
                (MPEG-TS seeks by time), earlier keyframes are tried, then the start.
            start_index: ``Frame.index`` of the first frame yielded.
            stop_pts: stop before the first frame at or after this pts.

        Raises:
            DecodeError: not a single frame could be decoded.
            InputError: ``start_pts`` is given and the stream cannot be seeked (``index``).
        """
        if start_pts is None:
            with _open(self.path) as container:
                yield from self._frames(container, None, start_index, stop_pts, 0)
            return
        index = self.index()
        first = int(np.searchsorted(index.pts, self.source_pts(start_pts)))
        warm_up = max(0, min(first - (self._deinterlace_mode is not None), index.pts.size - 1))
        for seek_to in index.seek_points(warm_up):
            with _open(self.path) as container:
                frames = self._frames(container, start_pts, start_index, stop_pts, int(index.pts[seek_to]) if seek_to else 0,
                                      reach=int(index.pts[warm_up]))
                try:
                    yield from frames
                    return
                except _LandedLate:
                    log.debug("%s: seeking to frame %d for frame %d landed after it", self.path, seek_to, warm_up)

    def _frames(self, container: av.container.InputContainer, start_pts: int | None, start_index: int,
                stop_pts: int | None, seek_pts: int, *, reach: int | None = None) -> Iterator[Frame]:
        """Decode (after seeking to ``seek_pts`` when > 0) and yield the frames from
        ``start_pts`` to before ``stop_pts``; raise _LandedLate if the first picture decoded
        comes after ``reach`` (source pts), before anything was yielded."""
        stream = container.streams[self.source_info.stream_index]
        stream.thread_type = "AUTO"
        if seek_pts > 0:
            container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
        self.damaged_frames = self.concealed_frames = 0
        info, src_tb = self.info, self.source_info.time_base
        deinterlacer: _Deinterlacer | None = None
        index = start_index

        # Frames without a timestamp (raw streams) get a steady timeline at the nominal rate.
        step = max(1, round(1 / (info.average_rate * info.time_base))) if info.average_rate else 1
        previous: int | None = None

        def emit(av_frame: av.VideoFrame, pts: int | None) -> Frame | None:
            """The frame to yield, None for one before ``start_pts``; _Stopped at ``stop_pts``."""
            nonlocal index, previous
            if pts is None:
                pts = 0 if previous is None else previous + step
            previous = pts
            if start_pts is not None and pts < start_pts:
                return None
            if stop_pts is not None and pts >= stop_pts:
                raise _Stopped
            frame = Frame(index=index, pts=pts, time_base=info.time_base, rgb=None,
                          source=SourcePicture(av_frame, info))
            index += 1
            return frame

        def filtered(av_frames: list[av.VideoFrame]) -> Iterator[Frame | None]:
            for out in av_frames:
                if self._deinterlace_mode == "send_field" or out.pts is None:
                    pts = out.pts
                else:  # bwdif halves the time base even when it keeps the rate
                    exact = Fraction(out.pts) * out.time_base / src_tb
                    pts = int(exact) if exact.denominator == 1 else round(exact)
                yield emit(out, pts)

        def pictures() -> Iterator[Frame | None]:
            nonlocal deinterlacer
            decoded = self._decoded(container, stream, partial=start_pts is not None or stop_pts is not None,
                                    seeked=seek_pts > 0)
            for n, av_frame in enumerate(decoded):
                if n == 0 and reach is not None and seek_pts > 0 and av_frame.pts is not None and av_frame.pts > reach:
                    decoded.close()
                    raise _LandedLate
                if self._deinterlace_mode is None:
                    yield emit(av_frame, av_frame.pts)
                    continue
                if deinterlacer is None:
                    deinterlacer = _Deinterlacer(av_frame, src_tb, self._deinterlace_mode,
                                                 self._only_interlaced)
                yield from filtered(deinterlacer.push(av_frame))
            if deinterlacer is not None:
                yield from filtered(deinterlacer.push(None))

        frames = pictures()
        try:
            for frame in frames:
                if frame is not None:
                    yield frame
        except _Stopped:
            frames.close()
