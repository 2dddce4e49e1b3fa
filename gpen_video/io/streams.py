"""Stream copy: every stream but the restored video goes to the output packet for packet.

A second demuxer over the input feeds audio, subtitle, data and attachment packets to the
output muxer, interleaved as the encoded video advances (``StreamCopier.pump``). Metadata
that describes the content (title, language, creation time, handler, timecode) is copied;
what describes the input's muxer is not. Two kinds of packets are left to the muxer, which
writes its own:

- the empty end-of-cue samples of MP4/MOV text subtitles;
- a QuickTime timecode track (tmcd). The muxer makes it from the video stream's ``timecode``
  tag (and ``reel_name``), which FFmpeg sets from that track when reading; Matroska keeps the
  same tags on the video stream.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import av

from gpen_video.errors import StreamCopyError

log = logging.getLogger(__name__)

MUXER_KEYS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder", "vendor_id",
                        "duration", "number_of_frames", "number_of_bytes", "bps"})
"""Tags the muxer writes itself; copying them would describe the input's muxer, not ours."""

TIMECODE_KEYS = ("timecode", "reel_name")
"""Tags of a timecode track that the muxer needs on the video stream to write it again."""


def copy_metadata(source: dict[str, str], target: dict[str, str]) -> None:
    """Copy content tags from ``source`` to ``target``, leaving out the muxer's own."""
    for key, value in source.items():
        low = key.lower()
        if low in MUXER_KEYS or low.startswith("_statistics") or low.startswith("duration"):
            continue
        target[key] = value


def packet_time(packet: av.Packet) -> float:
    """Decoding time of ``packet`` in seconds (-inf when it has no timestamp)."""
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else float("-inf")


def codec_name(stream: av.stream.Stream) -> str:
    ctx = stream.codec_context
    return ctx.name if ctx is not None else stream.type


def is_timecode_track(stream: av.stream.Stream) -> bool:
    """A QuickTime timecode track: a data stream FFmpeg tagged with its start ``timecode``."""
    return stream.type == "data" and any(k.lower() == "timecode" for k in stream.metadata)


def cannot_copy(template: av.stream.Stream, format_name: str) -> str | None:
    """Why a ``format_name`` container cannot hold a copy of ``template`` (None if it can).

    Tried on a throwaway in-memory muxer, so a refusal is found before the real file is
    started rather than at its header.
    """
    probe_out = av.open(io.BytesIO(), mode="w", format=format_name)
    try:
        probe_out.add_stream_from_template(template)
        probe_out.start_encoding()
    except (ValueError, av.FFmpegError) as exc:
        return str(exc).split(":")[0] if isinstance(exc, av.FFmpegError) else str(exc)
    finally:
        try:
            probe_out.close()
        except (ValueError, av.FFmpegError):
            pass
    return None


def regenerated_by_muxer(packet: av.Packet, format_name: str) -> bool:
    """MP4/MOV text tracks mark each cue's end with an empty sample that the muxer writes
    itself; copying the input's would double them."""
    return (
        packet.size == 2
        and format_name in ("mp4", "mov")
        and codec_name(packet.stream) == "mov_text"
        and bytes(packet) == b"\x00\x00"
    )


class StreamCopier:
    """Copy every stream of ``source`` except its video into ``out``.

    Args:
        source: the input file (opened again here, so the reader's decoding is not disturbed).
        out: the output container, before any packet is muxed.
        output_path: the file ``out`` will become (for messages; ``out`` writes a temporary file).
        video_index: the input's video stream, which the caller encodes itself.
        strict: raise StreamCopyError when a stream cannot be copied, instead of a warning.
        container: ``source`` already open, to add the output's streams from (an output check
            while a job reads its input's description); it is not closed here, and its packets
            are not copied. None: ``source`` is opened here.

    Call ``add_streams`` once, ``pump`` after each encoded video frame, ``finish`` at the
    end and ``close`` in every case.
    """

    def __init__(self, source: Path, out: av.container.OutputContainer, output_path: Path,
                 video_index: int, *, strict: bool = False,
                 container: av.container.InputContainer | None = None):
        self.source_path = source
        self.out = out
        self.output_path = output_path
        self.video_index = video_index
        self.strict = strict
        self._owned = container is None
        self.input = av.open(str(source), mode="r") if container is None else container
        self._map: dict[int, av.stream.Stream] = {}
        self._packets: Iterator[av.Packet] = iter(())
        self._pending: av.Packet | None = None
        copy_metadata(self.input.metadata, out.metadata)

    def video_metadata(self) -> dict[str, str]:
        """The video stream's tags for the output, with the start timecode (and reel name) of a
        timecode track moved onto it, where the muxer looks for them."""
        tags: dict[str, str] = {}
        copy_metadata(self.input.streams[self.video_index].metadata, tags)
        present = {k.lower() for k in tags}
        for stream in self.input.streams:
            if is_timecode_track(stream):
                for key, value in stream.metadata.items():
                    if key.lower() in TIMECODE_KEYS and key.lower() not in present:
                        tags[key.lower()] = value
                break
        return tags

    def add_streams(self, add_video: Callable[[av.stream.Stream], None]) -> None:
        """Add the output streams in the input's order: ``add_video(template)`` for the video,
        a packet copy for every other stream the container can hold."""
        for stream in self.input.streams:
            if stream.index == self.video_index:
                add_video(stream)
            elif is_timecode_track(stream):
                log.debug("%s: timecode track #%d is written again by the muxer from the video's "
                          "timecode tag", self.source_path, stream.index)
            else:
                self._add_copy(stream)
        copied = [self.input.streams[i] for i in self._map]
        self._packets = self.input.demux(*copied) if copied and self._owned else iter(())

    def _add_copy(self, template: av.stream.Stream) -> None:
        reason = cannot_copy(template, self.out.format.name)
        if reason is not None:
            what = f"{template.type} stream #{template.index} ({codec_name(template)})"
            message = (f"{what} of {self.source_path} cannot be copied into "
                       f"{self.output_path.name}: {reason}; use .mkv or .mov to keep it")
            if self.strict:
                raise StreamCopyError(message)
            log.warning("%s; it is left out", message)
            return
        stream = self.out.add_stream_from_template(template)
        copy_metadata(template.metadata, stream.metadata)
        stream.disposition = template.disposition
        self._map[template.index] = stream

    def pump(self, until: float) -> None:
        """Mux copied packets up to ``until`` seconds so the streams stay interleaved."""
        while True:
            if self._pending is None:
                try:
                    packet = next(self._packets)
                except StopIteration:
                    return
                except av.FFmpegError as exc:
                    log.warning("%s: copying the other streams stopped early: %s", self.source_path, exc)
                    self._packets = iter(())
                    return
                if packet.size == 0 or regenerated_by_muxer(packet, self.out.format.name):
                    continue
                self._pending = packet
            if packet_time(self._pending) > until:
                return
            packet, self._pending = self._pending, None
            packet.stream = self._map[packet.stream.index]
            self.out.mux(packet)

    def finish(self) -> None:
        """Mux every packet that is left."""
        self.pump(math.inf)

    def close(self) -> None:
        if self._owned:
            self.input.close()
