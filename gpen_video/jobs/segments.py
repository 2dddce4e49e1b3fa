"""Render a video as segments that join by stream copy, exactly.

A long video is restored as consecutive segments of about ``segment_seconds`` (frame ranges cut
by time, see ``plan_segments``; ``SegmentPlan`` maps the frames a reader yields to them). Each
segment's frames are encoded by a fresh ``io.encode.VideoWriter`` (``copy_streams=False``)
into its own video-only file; ``assemble`` then writes the output: the video packets of all
segments in order, copied, plus every audio, subtitle and data stream copied once from the
source. No picture is encoded twice, and a segment finished by an earlier (interrupted) run is
used as it is.

What makes the joins exact:

- Every segment starts with an IDR picture and nothing references across segments: each is a
  separate encoder session, so the first picture is an IDR and the last one is flushed before
  the next segment starts (closed GOPs at every join).
- Identical encoder parameters in every segment, so the sequence headers (SPS/PPS, VPS,
  extradata) are the same and one header serves the whole output. x264 gets ``stitchable``
  (headers never tuned to the content of a part). ``assemble`` checks the headers match.
- Deterministic segments (``VideoWriter``: a pinned encoder thread count, x264's
  ``cpu-independent`` mode, no x265 info SEI, a bit-exact muxer): the same frames and settings
  give byte-identical files.
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

A job resumed at segment ``k`` decodes from the keyframe before its read range
(``SegmentPlan.read_range``: the segment and a halo of the temporal stabiliser's ``reach``
frames either side, restored but not written, so the frames at its edges are stabilised as in
an uninterrupted run); the planner's state at the join comes from replaying what earlier runs
logged (``plan.Planner.plan(..., replay=...)``), not from decoding earlier frames.

``SegmentPlan.of`` lays a video's segments out from its ``VideoIndex`` (``jobs.opening`` reads
it once per job); ``assemble`` takes the job's ``VideoInfo`` instead of probing the input again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from gpen_video.errors import EncodeError, OutputError
from gpen_video.formats import CODECS, FRAME_COUNTING_CONTAINERS
from gpen_video.io import files
from gpen_video.io.decode import VideoIndex, VideoInfo
from gpen_video.io.streams import StreamCopier, packet_time
from gpen_video.records import Frame

SEGMENT_SECONDS = 30.0
"""Default segment length. Longer: fewer IDR pictures and files; shorter: less work lost when
a job is interrupted, and finer spreading over workers."""

MIN_SEGMENT_FRAMES = 16
"""No segment is shorter than this (unless the whole video is): a join needs a few frames
before it (the B-frame delay), and a tiny segment costs an IDR picture for nothing."""

SEGMENT_SUFFIX: dict[str, str] = {name: entry.segment_suffix for name, entry in CODECS.items()}
"""Container of segment files per codec (``formats.CodecFormat.segment_suffix``)."""


def encoder_identity() -> str:
    """The software that makes segment bytes (PyAV wheels bundle their FFmpeg, x264 and x265):
    segments made by another build are not byte-identical, so a manifest records this."""
    libavcodec = ".".join(str(v) for v in av.library_versions["libavcodec"])
    return f"PyAV {av.__version__}, libavcodec {libavcodec}"


# --- planning ---


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
class SegmentPlan:
    """The segments of one video, in the frames a ``VideoReader`` yields.

    Attributes:
        first_frames: each segment's first frame index, as planned from the source's packets.
        frame_counts: each segment's planned number of frames (a damaged input can yield
            fewer; deinterlacing to fields yields two per source frame, counted here).
        starts: each segment's start pts in the reader's ``info.time_base``; a frame belongs
            to the last segment starting at or before its pts.
        seekable: a job can start decoding at any segment (the source has an index); False
            only for streams without timestamps, which are one segment.
    """

    first_frames: tuple[int, ...]
    frame_counts: tuple[int, ...]
    starts: tuple[int, ...]
    seekable: bool = True
    read_starts: tuple[int, ...] = ()
    read_stops: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.read_starts:
            object.__setattr__(self, "read_starts", self.starts)
        if not self.read_stops:
            object.__setattr__(self, "read_stops", self.starts[1:] + (None,))

    @classmethod
    def of(cls, index: VideoIndex | None, info: VideoInfo, source_info: VideoInfo,
           segment_seconds: float = SEGMENT_SECONDS, *, halo: int = 0) -> SegmentPlan:
        """Plan the segments of a video (``plan_segments`` on its ``index``).

        Args:
            index: the source stream's index; None for a stream without timestamps (a raw
                elementary stream), which cannot be seeked: it is one segment, so an
                interrupted job on it starts over.
            info: the frames as the reader yields them (``VideoReader.info``).
            source_info: the stream as stored (``VideoReader.source_info``); deinterlacing
                to fields gives two frames per source frame.
            segment_seconds: the target length.
            halo: frames beyond each edge of a segment that its rendering reads (the temporal
                stabiliser's ``reach``): see ``read_range``.
        """
        if index is None:
            return cls((0,), (info.frame_count or 0,), (0,), seekable=False)
        scale = 2 if info.time_base != source_info.time_base else 1  # fields: two frames each
        segments = plan_segments(index.pts, index.time_base, segment_seconds)

        def reader_pts(position: int) -> int:
            return int(Fraction(int(index.pts[position])) * index.time_base / info.time_base)

        starts = tuple(int(Fraction(s.start_pts) * index.time_base / info.time_base) for s in segments)
        last = int(index.pts.size) - 1
        read_starts = (starts[0],) + tuple(reader_pts(max(0, s.first_frame - halo)) for s in segments[1:])
        read_stops = tuple(None if s.last_frame + halo >= last else reader_pts(s.last_frame + 1 + halo)
                           for s in segments[:-1]) + (None,)
        return cls(tuple(scale * s.first_frame for s in segments), tuple(scale * s.frame_count for s in segments),
                   starts, read_starts=read_starts, read_stops=read_stops)

    def __len__(self) -> int:
        return len(self.frame_counts)

    @property
    def total_frames(self) -> int:
        return sum(self.frame_counts)

    def segment_of(self, frame: Frame) -> int:
        """The segment ``frame`` belongs to (by its pts; 0 without one)."""
        return self.segment_at(frame.pts)

    def segment_at(self, pts: int | None) -> int:
        """The segment a frame of this pts belongs to (0 for None)."""
        if pts is None:
            return 0
        return max(0, bisect.bisect_right(self.starts, pts) - 1)

    def read_range(self, k: int) -> tuple[int | None, int | None]:
        """The pts range ``[start, stop)`` (None: from the start, to the end) of the frames a
        rendering of segment ``k`` restores: its own, and ``halo`` frames either side (of the
        neighbouring segments), whose restored faces its frames near the edges are stabilised
        with. So a segment's frames depend on nothing but the frames in its range, and a
        resumed or ``--ray`` job, which renders a segment starting at its range, gives the
        bytes of an uninterrupted one (the frames of the halo are restored, not written)."""
        return (self.read_starts[k] if k > 0 else None), self.read_stops[k]

    def reading(self, frame: Frame) -> range:
        """The segments whose ``read_range`` holds ``frame`` (its own, and neighbours near an
        edge)."""
        k = self.segment_of(frame)
        if frame.pts is None:
            return range(k, k + 1)
        first = k
        while first > 0 and (self.read_stops[first - 1] is None or frame.pts < self.read_stops[first - 1]):
            first -= 1
        stop = k + 1
        while stop < len(self) and self.read_starts[stop] <= frame.pts:
            stop += 1
        return range(first, stop)

    def group_of(self, frame: Frame) -> int:
        """The batch group of ``frame``: consecutive frames between two of the pts where a
        segment or a read range starts or stops. Every batch (of the restorer, of the
        upscaler) stays within one group, and a rendering restores whole groups, so a frame
        is restored in the same company (the same bits) by every run that restores it."""
        if frame.pts is None:
            return 0
        return bisect.bisect_right(self._group_edges, frame.pts)

    @cached_property
    def _group_edges(self) -> tuple[int, ...]:
        edges = set(self.starts[1:]) | set(self.read_starts[1:]) | {s for s in self.read_stops if s is not None}
        return tuple(sorted(edges))

    def describe(self, k: int) -> str:
        """``segment 3 of 9 (frames 1500-2249)``: how messages name segment ``k``."""
        first, count = self.first_frames[k], self.frame_counts[k]
        frames = f"frames {first}-{first + count - 1}" if count else f"from frame {first}"
        return f"segment {k + 1} of {len(self)} ({frames})"


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


def assemble(info: VideoInfo, segment_files: Sequence[str | Path], output_path: str | Path, *,
             overwrite: bool = False, strict: bool = False) -> int:
    """Write ``output_path``: the video packets of ``segment_files`` in order, copied, and every
    other stream of the input ``info.path`` (``info`` as the job's opening described it)
    copied as ``io.encode.VideoWriter`` copies them.

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
    source_path, output_path = info.path, Path(output_path)
    segment_files = [Path(p) for p in segment_files]
    if not segment_files:
        raise ValueError("assemble needs at least one segment file")
    files.check_output(source_path, output_path, overwrite=overwrite)
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
    frame_counting = output_path.suffix.lower() in FRAME_COUNTING_CONTAINERS
    start: list[int] | None = [] if frame_counting else None  # AVI: the first frame is frame 0

    def add_video(source_stream: av.stream.Stream) -> None:
        try:
            stream = out.add_stream_from_template(template)
        except ValueError:
            raise OutputError(f"the {output_path.suffix} container cannot hold {template.codec_context.name} "
                              "video; use .mkv or .mov, or another codec") from None
        stream.time_base = time_base
        if frame_counting:  # AVI: one tick a frame (a variable rate is rounded to the average)
            stream.time_base = 1 / info.average_rate if info.average_rate else info.time_base
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
                    _mux(out, copier, video, ready, time_base, start)
            for ready in joiner.finish():
                _mux(out, copier, video, ready, time_base, start)
            if count == 0:
                raise EncodeError(f"segment {path.name} holds no video packets")
            frames += count
    copier.finish()
    return frames


def _mux(out: av.container.OutputContainer, copier: StreamCopier, video: av.stream.Stream,
         packet: av.Packet, time_base: Fraction, start: list[int] | None) -> None:
    """Mux one video packet, then the other streams' packets up to its time. ``start`` (a
    frame-counting container's) collects the first dts, which every packet is moved back by."""
    packet.stream = video
    packet.time_base = time_base
    until = packet_time(packet)
    if start is not None:
        start[:] = start or [packet.dts]
        packet.pts, packet.dts = packet.pts - start[0], packet.dts - start[0]
    out.mux(packet)
    copier.pump(until)
