"""Render a video as segments that join by stream copy, exactly.

A long video is restored as consecutive segments of about ``segment_seconds`` (frame-index
ranges cut by time, see ``plan_segments``). Each segment's frames are encoded by a fresh
encoder into its own video-only file (``SegmentWriter``); ``assemble`` then writes the output:
the video packets of all segments in order, copied, plus every audio, subtitle and data stream
copied once from the source. No picture is encoded twice, and a segment finished by an earlier
(interrupted) run, or by another machine, is used as it is.

What makes the joins exact:

- Every segment starts with an IDR picture and nothing references across segments: each is a
  separate encoder session, so the first picture is an IDR and the last one is flushed before
  the next segment starts (closed GOPs at every join).
- Identical encoder parameters in every segment, so the sequence headers (SPS/PPS, VPS,
  extradata) are the same and one header serves the whole output. x264 gets ``stitchable``
  (headers never tuned to the content of a part). ``assemble`` checks the headers match.
- Deterministic segments: a pinned encoder thread count (x264 and x265 pick a thread count from
  the CPU count, and the bitstream depends on it; x264 also writes its options, threads
  included, into the stream), x264's ``cpu-independent`` mode ("exact reproducibility across
  different cpus"), no x265 info SEI (it names the CPU's features, in the stream headers) and
  a bit-exact muxer. The same frames and settings give byte-identical files.
- Exact timestamps: each frame is encoded with its source pts, and segment files are MP4 (MOV
  for ProRes), which keeps every pts and dts exactly in a multiple of the source time base.
- Valid DTS across joins. With B-frames, x264 and x265 give the packet at decode position
  ``n`` the dts ``S[n - D]``, where ``S`` is the sorted pts of the frames and ``D`` the fixed
  B-frame delay (2 with B-pyramid), and the first ``D`` packets the dts
  ``S[n] - (S[D] - S[0])``. A segment encoded alone starts with such made-up dts, which in
  variable-frame-rate video can fall at or before the previous segment's last dts. ``assemble``
  gives those ``D`` leading packets the pts of the ``D`` last frames before the join: exactly
  the dts one uninterrupted encode of all frames has. The result is checked as written: dts
  strictly increasing, never after the pts.

The decode side: a segment needs context frames before and after it (tracking, smoothing);
``Segment.window`` gives the range to decode and the range to keep, and ``VideoIndex`` (the
source's frame pts and keyframes, read by demuxing only) says where to seek: decoding starts at
the keyframe at or before the first frame wanted (``decode_range``).

>>> index = VideoIndex.scan("tape.mp4")                               # doctest: +SKIP
>>> segments = plan_segments(index.pts, index.time_base, 30)           # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from gpen_video.errors import EncodeError, InputError, OutputError
from gpen_video.io import files
from gpen_video.io.colour import output_tags, to_frame
from gpen_video.io.decode import VideoInfo, probe
from gpen_video.io.encode import ENCODERS, choose_pix_fmt
from gpen_video.io.streams import StreamCopier, packet_time
from gpen_video.records import Frame, check_shape

log = logging.getLogger(__name__)

Codec = Literal["h264", "h265", "prores", "ffv1"]

SEGMENT_SECONDS = 30.0
"""Default segment length. Longer: fewer IDR pictures and files; shorter: less work lost when
a job is interrupted, and finer spreading over workers."""

MIN_SEGMENT_FRAMES = 16
"""No segment is shorter than this (unless the whole video is): a join needs a few frames
before it (the B-frame delay), and a tiny segment costs an IDR picture for nothing."""

ENCODER_THREADS = 4
"""Encoder threads of every segment, whatever the machine: x264 and x265 output depends on the
thread count, so it is fixed to keep segments byte-identical across runs and machines."""

SEGMENT_SUFFIX: dict[str, str] = {"h264": ".mp4", "h265": ".mp4", "prores": ".mov", "ffv1": ".mp4"}
"""Container of segment files per codec: ISO BMFF keeps every pts and dts exactly (Matroska
rounds to 1 ms; NUT shifts timestamps and drops dts). MP4 cannot hold ProRes, MOV not FFV1."""


def encoder_identity() -> str:
    """The software that makes segment bytes (PyAV wheels bundle their FFmpeg, x264 and x265):
    segments made by another build are not byte-identical, so a manifest records this."""
    libavcodec = ".".join(str(v) for v in av.library_versions["libavcodec"])
    return f"PyAV {av.__version__}, libavcodec {libavcodec}"


# --- planning ---


@dataclass(frozen=True)
class DecodeWindow:
    """Frames to decode for one segment, and the ones it keeps (inclusive frame indices).

    ``decode_first <= emit_first <= emit_last <= decode_last``: the frames outside the emit
    range are context (tracking and smoothing see them), and are not written.
    """

    decode_first: int
    decode_last: int
    emit_first: int
    emit_last: int


@dataclass(frozen=True)
class Segment:
    """A run of consecutive frames encoded into one file.

    Attributes:
        index: position in the output, from 0.
        first_frame, last_frame: inclusive frame indices (presentation order, from 0).
        start_pts: pts of ``first_frame``, in the time base the plan was made with.
    """

    index: int
    first_frame: int
    last_frame: int
    start_pts: int

    def __post_init__(self) -> None:
        if not 0 <= self.first_frame <= self.last_frame:
            raise ValueError(f"segment frames must satisfy 0 <= first <= last, got "
                             f"{self.first_frame}..{self.last_frame}")

    @property
    def frame_count(self) -> int:
        return self.last_frame - self.first_frame + 1

    def window(self, before: int, after: int, frame_count: int) -> DecodeWindow:
        """The frames to decode so that ``before`` frames of context precede this segment and
        ``after`` follow it (fewer at the ends of the video), and the frames to emit.

        >>> Segment(1, 750, 1499, 750).window(25, 25, 1600)
        DecodeWindow(decode_first=725, decode_last=1524, emit_first=750, emit_last=1499)
        """
        if before < 0 or after < 0:
            raise ValueError(f"context must be >= 0 frames, got before={before}, after={after}")
        return DecodeWindow(
            decode_first=max(0, self.first_frame - before),
            decode_last=min(frame_count - 1, self.last_frame + after),
            emit_first=self.first_frame,
            emit_last=self.last_frame,
        )


def plan_segments(
    pts: Sequence[int] | np.ndarray,
    time_base: Fraction,
    segment_seconds: float = SEGMENT_SECONDS,
    *,
    min_frames: int = MIN_SEGMENT_FRAMES,
) -> list[Segment]:
    """Cut frames into segments of about ``segment_seconds``, by presentation time.

    Args:
        pts: every frame's pts in presentation order, strictly increasing (variable frame
            rate is fine). Without timestamps, pass ``range(n)`` with ``time_base = 1/rate``.
        time_base: unit of ``pts``.
        segment_seconds: target length. Segment ``k`` starts at the first frame at or after
            ``k * segment_seconds`` from the first frame.
        min_frames: a boundary fewer frames after the previous one is dropped (the short
            piece joins the next segment); a short last segment joins the one before.

    A last segment shorter than half the target is merged into the one before it, so a clip
    shorter than 1.5 × ``segment_seconds`` is one segment.

    >>> [(s.first_frame, s.last_frame) for s in plan_segments(range(2000), Fraction(1, 25))]
    [(0, 749), (750, 1499), (1500, 1999)]
    """
    times = np.asarray(pts, dtype=np.int64)
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"pts must be a non-empty 1-d sequence, got shape {times.shape}")
    if np.any(np.diff(times) <= 0):
        bad = int(np.argmax(np.diff(times) <= 0))
        raise ValueError(f"pts must be strictly increasing; frame {bad + 1} has pts {times[bad + 1]} "
                         f"after {times[bad]}")
    if segment_seconds <= 0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
    length = Fraction(segment_seconds).limit_denominator(1_000_000) / Fraction(time_base)  # pts units
    span = int(times[-1] - times[0])
    count = int(span // length) + 1
    targets = [times[0] + -(-k * length.numerator // length.denominator) for k in range(1, count + 1)]
    starts = [0] + sorted({int(i) for i in np.searchsorted(times, targets, side="left") if 0 < i < times.size})
    tail = int(times[-1] - times[starts[-1]])
    if len(starts) > 1 and tail < length / 2:
        starts.pop()
    kept = [0]
    for start in starts[1:]:
        if start - kept[-1] >= min_frames:
            kept.append(start)
    if len(kept) > 1 and times.size - kept[-1] < min_frames:
        kept.pop()
    ends = kept[1:] + [times.size]
    return [Segment(k, first, end - 1, int(times[first])) for k, (first, end) in enumerate(zip(kept, ends))]


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
            InputError: the file cannot be read, or its video packets lack timestamps.
        """
        path = Path(path)
        if stream_index is None:
            stream_index = probe(path).stream_index
        times: list[int] = []
        keys: list[int] = []
        try:
            with av.open(str(path)) as container:
                stream = container.streams[stream_index]
                time_base = stream.time_base
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    if packet.pts is None:
                        raise InputError(f"{path} has video packets without timestamps; segments "
                                         "need them (remux the file, e.g. to .mkv, first)")
                    if packet.is_keyframe:
                        keys.append(packet.pts)
                    times.append(packet.pts)
        except av.FFmpegError as exc:
            raise InputError(f"cannot read {path} to index it ({exc.strerror})") from None
        pts = np.unique(np.asarray(times, dtype=np.int64))
        keyframes = np.searchsorted(pts, np.unique(np.asarray(keys, dtype=np.int64)))
        return cls(pts=pts, keyframes=keyframes.astype(np.int64), time_base=time_base,
                   stream_index=stream_index)

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


def _decode_from(path: Path, index: VideoIndex, start: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(frame index, picture)`` for every picture decoded after seeking to frame ``start``."""
    with av.open(str(path)) as container:
        stream = container.streams[index.stream_index]
        stream.thread_type = "AUTO"
        if start > 0:
            container.seek(int(index.pts[start]), stream=stream, backward=True, any_frame=False)
        for picture in container.decode(stream):
            at = index.frame_at(picture.pts) if picture.pts is not None else None
            if at is not None:
                yield at, picture


def decode_range(path: str | Path, index: VideoIndex, first: int, last: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decode frames ``first..last`` (inclusive) as ``(frame index, picture)``, starting at
    the keyframe at or before ``first`` instead of at the start of the file.

    The frames from that keyframe up to ``first`` are decoded and dropped: that is the whole
    cost of starting mid-file. Where a container's seek lands after ``first`` (MPEG-TS seeks
    by timestamps, not by an index), earlier keyframes are tried, then the start of the file.
    """
    if not 0 <= first <= last < index.pts.size:
        raise ValueError(f"frames {first}..{last} are outside 0..{index.pts.size - 1}")
    for seek_to in index.seek_points(first):
        with closing(_decode_from(Path(path), index, seek_to)) as pictures:
            emitted = False
            for at, picture in pictures:
                if at < first:
                    continue
                if at > first and not emitted and seek_to > 0:
                    log.debug("%s: seeking to frame %d for frame %d landed after it", path, seek_to, first)
                    break
                if at > last:
                    return
                emitted = True
                yield at, picture
            else:
                return


# --- encoding ---


class SegmentWriter:
    """Encode one segment's upright RGB frames into a video-only file, deterministically.

    Args:
        path: the segment file (``SEGMENT_SUFFIX[codec]`` extension); written to a temporary
            name beside it and renamed when complete, so a file under this name is finished.
        info: the source stream the frames come from (size, pixel format, time base, colour,
            rotation, aspect ratio).
        codec, crf, preset: as for ``io.encode.VideoWriter``.
        threads: encoder threads; fixed so that every run and machine makes the same bytes.

    Every frame is encoded with its own pts; the first becomes an IDR picture.

    Raises:
        OutputError: the folder cannot be written (or is full).
        EncodeError: the encoder failed.
    """

    def __init__(self, path: str | Path, info: VideoInfo, *, codec: Codec = "h264", crf: int = 18,
                 preset: str = "medium", threads: int = ENCODER_THREADS):
        if codec not in ENCODERS:
            raise ValueError(f"codec must be one of {', '.join(ENCODERS)}, got {codec!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        self.info = info
        self.codec, self.crf, self.preset, self.threads = codec, crf, preset, threads
        self.encoder = ENCODERS[codec]
        self.pix_fmt = choose_pix_fmt(info.pix_fmt, self.encoder)
        self.frames_written = 0
        self._out: av.container.OutputContainer | None = None
        self._tmp: Path | None = None
        self._reformatter = VideoReformatter()

    def encoder_options(self) -> dict[str, str]:
        """The encoder's private options: the crf/preset of ``VideoWriter`` plus what makes
        segments deterministic and joinable."""
        info = self.info
        options: dict[str, str] = {}
        interlaced = info.interlaced and info.field_order in ("tt", "bb", "tb", "bt")
        if self.codec == "h264":
            params = [f"threads={self.threads}", "deterministic=1", "cpu-independent=1", "stitchable=1"]
            if interlaced:
                params += ["interlaced=1", "tff=1" if info.field_order in ("tt", "tb") else "bff=1"]
            options.update(crf=str(self.crf), preset=self.preset, **{"x264-params": ":".join(params)})
        elif self.codec == "h265":
            params = ["log-level=error", f"frame-threads={max(1, self.threads // 2)}", f"pools={self.threads}",
                      "open-gop=0", "info=0"]
            options.update(crf=str(self.crf), preset=self.preset, **{"x265-params": ":".join(params)})
        elif self.codec == "prores":
            full_chroma = av.video.format.VideoFormat(self.pix_fmt).chroma_width(1024) == 1024
            options["profile"] = "4444" if full_chroma else "hq"
        return options

    def __enter__(self) -> SegmentWriter:
        self._tmp = files.create_temp(self.path)
        try:
            self._out = av.open(str(self._tmp), mode="w", container_options={"fflags": "+bitexact"})
            self._video = self._add_video()
        except BaseException:
            self._abort()
            raise
        return self

    def _add_video(self) -> av.video.stream.VideoStream:
        info = self.info
        try:
            stream = self._out.add_stream(self.encoder, rate=info.average_rate or Fraction(25))
        except ValueError:
            raise OutputError(f"segment file {self.path.name} cannot hold {self.codec} video") from None
        stream.width, stream.height = info.coded_width, info.coded_height
        stream.pix_fmt = self.pix_fmt
        stream.time_base = info.time_base
        ctx = stream.codec_context
        ctx.time_base = info.time_base
        ctx.thread_count = self.threads
        if info.average_rate:
            ctx.framerate = info.average_rate
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        tags = output_tags(info, self.pix_fmt)
        ctx.color_range, ctx.colorspace = tags if tags is not None else (info.color_range, info.colorspace)
        ctx.color_primaries, ctx.color_trc = info.color_primaries, info.color_trc
        if info.interlaced and info.field_order in ("tt", "bb", "tb", "bt"):
            ctx.field_order = {"tt": 2, "bb": 3, "tb": 4, "bt": 5}[info.field_order]
        if self.codec == "h265":
            stream.codec_tag = "hvc1"
        stream.options = self.encoder_options()
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        return stream

    def write(self, frame: Frame) -> None:
        """Encode one upright RGB frame (the source's size and dtype) with its pts."""
        if self._out is None:
            raise RuntimeError("use SegmentWriter as a context manager: with SegmentWriter(...) as w")
        info = self.info
        check_shape("Frame.rgb", frame.rgb, (info.height, info.width, 3))
        if frame.rgb.dtype != info.dtype:
            raise ValueError(f"Frame.rgb must be {np.dtype(info.dtype).name} for this source, got {frame.rgb.dtype}")
        if frame.pts is None:
            raise ValueError(f"frame {frame.index} has no pts; segments keep every frame's own pts")
        pts = frame.pts
        if frame.time_base != info.time_base:
            exact = Fraction(pts) * frame.time_base / info.time_base
            if exact.denominator != 1:
                raise ValueError(f"frame {frame.index}: pts {frame.pts} in {frame.time_base} is not a "
                                 f"whole number of {info.time_base}")
            pts = int(exact)
        picture = to_frame(frame.rgb, info, self.pix_fmt, self._reformatter)
        picture.pts = pts
        picture.time_base = info.time_base
        try:
            self._out.mux(self._video.encode(picture))
        except av.FFmpegError as exc:
            raise self._error(f"encoding frame {frame.index}", exc) from None
        self.frames_written += 1

    def _error(self, what: str, exc: av.FFmpegError) -> OutputError | EncodeError:
        if files.disk_full(exc):
            return files.write_error(self.path, exc)
        return EncodeError(f"{what} into segment {self.path} failed ({exc.strerror}); the "
                           f"{self.codec} encoder rejected the frames or settings")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            if self.frames_written == 0:
                raise ValueError(f"segment {self.path.name} got no frames; a segment has at least one")
            try:
                self._out.mux(self._video.encode(None))
                self._out.close()
            except av.FFmpegError as exc:
                raise self._error("finishing", exc) from None
            self._out = None
            files.install(self._tmp, self.path, overwrite=True)
            self._tmp = None
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # noqa: BLE001 - already failing, keep the original error
                pass
            self._out = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


# --- assembly ---


class _DtsJoiner:
    """Gives the leading packets of each segment after the first the dts one uninterrupted
    encode has: the pts of the last frames before the join (see the module docstring). Holds
    back only those few packets; checks every dts as it goes."""

    KEEP = 16
    """Largest pts remembered: x264/x265 B-frame delays are 1 or 2 frames."""

    def __init__(self) -> None:
        self.latest: list[int] = []  # the largest pts so far, ascending
        self.last_dts: int | None = None
        self.segment = -1

    def start(self, segment: int) -> None:
        self.segment = segment
        self.first_pts: int | None = None
        self.held: list[av.Packet] = []
        self.leading = segment > 0

    def push(self, packet: av.Packet) -> list[av.Packet]:
        """The packets ready to mux (in order) once ``packet`` (next in decode order) is in."""
        if self.first_pts is None:
            self.first_pts = packet.pts
            if self.latest and packet.pts <= self.latest[-1]:
                raise EncodeError(f"segment {self.segment} starts at pts {packet.pts}, not after the "
                                  f"previous segments (they reach pts {self.latest[-1]}); segments must "
                                  "hold consecutive frames, in order")
        if self.leading and packet.dts is not None and packet.dts < self.first_pts:
            self.held.append(packet)
            return []
        ready = self._release() + [packet]
        for p in ready:
            self._check(p)
        return ready

    def finish(self) -> list[av.Packet]:
        ready = self._release()
        for p in ready:
            self._check(p)
        return ready

    def _release(self) -> list[av.Packet]:
        held, self.held, self.leading = self.held, [], False
        if len(held) > len(self.latest):
            raise EncodeError(f"segment {self.segment} cannot follow the segments before it: its first "
                              f"{len(held)} packets need as many earlier frames, only {len(self.latest)} exist")
        for packet, dts in zip(held, self.latest[len(self.latest) - len(held):]):
            packet.dts = dts
        return held

    def _check(self, packet: av.Packet) -> None:
        dts, pts = packet.dts, packet.pts
        if dts is None or pts is None or dts > pts or (self.last_dts is not None and dts <= self.last_dts):
            raise EncodeError(f"segment {self.segment}: a packet with pts {pts} gets dts {dts} after dts "
                              f"{self.last_dts}; the segments were not encoded alike")
        self.last_dts = dts
        bisect.insort(self.latest, pts)
        del self.latest[: -self.KEEP]


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if len(container.streams.video) != 1:
        raise EncodeError(f"segment {path} has {len(container.streams.video)} video streams; expected 1")
    return container.streams.video[0]


def assemble(source_path: str | Path, segment_files: Sequence[str | Path], output_path: str | Path, *,
             overwrite: bool = False, strict: bool = False) -> int:
    """Write ``output_path``: the video packets of ``segment_files`` in order, copied, and every
    other stream of ``source_path`` copied as ``io.encode.VideoWriter`` copies them.

    The output appears only when complete. The video stream gets the source's tags (language,
    handler, timecode), disposition and rotation; codec parameters (colour, aspect ratio,
    field order) come from the segments, which must all share them.

    Returns:
        The number of video frames written.

    Raises:
        OutputError: the output exists (without ``overwrite``), is the input, or cannot be
            written; StreamCopyError with ``strict`` when a stream does not fit the container.
        EncodeError: the segments do not join (different encoder settings, bad timestamps).
    """
    source_path, output_path = Path(source_path), Path(output_path)
    segment_files = [Path(p) for p in segment_files]
    if not segment_files:
        raise ValueError("assemble needs at least one segment file")
    files.check_output(source_path, output_path, overwrite=overwrite)
    info = probe(source_path)
    tmp = files.create_temp(output_path)
    out = copier = None
    try:
        try:
            out = av.open(str(tmp), mode="w")
        except (ValueError, av.FFmpegError):
            raise OutputError(f"output {output_path} has an extension FFmpeg cannot write "
                              f"({output_path.suffix}); use .mp4, .mov or .mkv") from None
        copier = StreamCopier(source_path, out, output_path, info.stream_index, strict=strict)
        frames = _write_segments(out, copier, info, segment_files, output_path)
        out.close()
        out = None
        files.install(tmp, output_path, overwrite=overwrite)
        return frames
    except av.FFmpegError as exc:
        if files.disk_full(exc):
            raise files.write_error(output_path, exc) from None
        raise EncodeError(f"writing {output_path} from {len(segment_files)} segments failed "
                          f"({exc.strerror})") from None
    finally:
        if out is not None:
            try:
                out.close()
            except Exception:  # noqa: BLE001 - already failing, keep the original error
                pass
        if copier is not None:
            copier.close()
        tmp.unlink(missing_ok=True)


def _write_segments(out: av.container.OutputContainer, copier: StreamCopier, info: VideoInfo,
                    segment_files: list[Path], output_path: Path) -> int:
    first = av.open(str(segment_files[0]))
    template = _video_stream(first, segment_files[0])
    extradata = bytes(template.codec_context.extradata or b"")
    time_base = template.time_base
    holder: list[av.video.stream.VideoStream] = []

    def add_video(source_stream: av.stream.Stream) -> None:
        try:
            stream = out.add_stream_from_template(template)
        except ValueError:
            raise OutputError(f"the {output_path.suffix} container cannot hold {template.codec_context.name} "
                              "video; use .mkv or .mov, or another codec") from None
        stream.time_base = time_base
        if info.average_rate:  # the muxer's frame rate (a timecode track needs one)
            stream.codec_context.framerate = info.average_rate
        if out.format.name in ("mp4", "mov") and template.codec_context.codec_tag == "hvc1":
            stream.codec_tag = "hvc1"  # parameter sets out of band, as VideoWriter writes HEVC
        for key, value in copier.video_metadata().items():
            stream.metadata[key] = value
        stream.disposition = source_stream.disposition
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        holder.append(stream)

    try:
        copier.add_streams(add_video)
    finally:
        first.close()
    video = holder[0]
    joiner = _DtsJoiner()
    frames = 0
    for k, path in enumerate(segment_files):
        with av.open(str(path)) as segment:
            stream = _video_stream(segment, path)
            if bytes(stream.codec_context.extradata or b"") != extradata or stream.time_base != time_base:
                raise EncodeError(f"segment {path.name} was encoded with other settings than "
                                  f"{segment_files[0].name} (different stream headers); encode it again")
            joiner.start(k)
            count = 0
            for packet in segment.demux(stream):
                if packet.size == 0:
                    continue
                if count == 0 and not packet.is_keyframe:
                    raise EncodeError(f"segment {path.name} does not start with a keyframe")
                count += 1
                for ready in joiner.push(packet):
                    _mux(out, copier, video, ready, time_base)
            for ready in joiner.finish():
                _mux(out, copier, video, ready, time_base)
            if count == 0:
                raise EncodeError(f"segment {path.name} holds no video packets")
            frames += count
    copier.finish()
    return frames


def _mux(out: av.container.OutputContainer, copier: StreamCopier, video: av.stream.Stream,
         packet: av.Packet, time_base: Fraction) -> None:
    packet.stream = video
    packet.time_base = time_base
    until = packet_time(packet)
    out.mux(packet)
    copier.pump(until)
