"""Open a video job: read what it needs of the input once, and freeze it in a ``JobPlan``.

One handle on the input serves three things: its identity (size, modification time, the
SHA-256 of its first MiB: ``jobs.manifest.InputIdentity``), its description
(``io.decode.describe``, which decodes the first frame) and its frame index (the pts and
keyframes of every video packet, ``io.decode.VideoIndex``), read in the same demux. The output
is checked against the same open container (``io.encode.VideoWriter.check``). A resumed job
finds the index in its work folder and demuxes only up to the first frame.

After this, the input is opened again only to decode it and, at the end, to copy its other
streams into the output (``jobs.segments.assemble``, which takes ``JobPlan.source_info``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from gpen_video.errors import InputError
from gpen_video.io.decode import (
    Deinterlace, VideoIndex, VideoInfo, VideoReader, deinterlaced_info, describe, frames_missing, open_input,
    probe_and_index,
)
from gpen_video.io.files import check_input_file
from gpen_video.jobs.manifest import InputIdentity
from gpen_video.jobs.segments import SegmentPlan
from gpen_video.jobs.workfolder import load_index

log = logging.getLogger(__name__)

OutputCheck = Callable[[av.container.InputContainer, VideoInfo], None]
"""``check(input_container, info)``: raise if the job's output cannot be written."""


@dataclass(frozen=True)
class JobPlan:
    """What a job knows of its input, read once (``open_job``) and handed down.

    Attributes:
        src: the input file.
        identity: its identity (``InputIdentity``), part of the job's manifest.
        source_info: the video stream as stored (``io.decode.probe``).
        info: the frames as decoded (after deinterlacing, ``VideoReader.info``).
        deinterlace: ``Config.deinterlace`` of the job.
        index: the stream's frame index; None for a stream without timestamps.
        layout: the segments (``SegmentPlan``).
        expected_frames: frames the input should give: as many as its container declares or
            its index holds, and those a stream ending before its stated duration lost.
            ``damaged_frames`` of a job is this minus the frames written.
    """

    src: Path
    identity: InputIdentity
    source_info: VideoInfo
    info: VideoInfo
    deinterlace: Deinterlace
    index: VideoIndex | None
    layout: SegmentPlan
    expected_frames: int

    def reader(self) -> VideoReader:
        """A reader of the input that neither probes nor indexes it again."""
        return VideoReader(self.src, deinterlace=self.deinterlace, source_info=self.source_info, index=self.index)


def open_job(src: str | Path, *, deinterlace: Deinterlace, segment_seconds: float, halo: int = 0,
             index_file: Path | None = None, check: OutputCheck | None = None) -> JobPlan:
    """Read the input ``src`` once and plan its job.

    Args:
        src: the input video.
        deinterlace: as ``VideoReader`` takes it.
        segment_seconds: the segments' target length (``SegmentPlan.of``).
        halo: frames beyond a segment's edges its rendering restores too (``SegmentPlan.of``).
        index_file: where an earlier run of the job kept the index (``workfolder.save_index``);
            it is used when it was made of this very input.
        check: called with the open input and the frames' description, to fail on an
            unusable output before any work is done.

    Raises:
        InputError, DecodeError: the input is unusable (missing, not media, nothing decodes).
    """
    src = Path(src)
    check_input_file(src)
    try:
        handle = open(src, "rb")
    except OSError as exc:
        raise InputError(f"cannot read input {src} ({exc.strerror}); check its permissions") from None
    with handle:
        identity = InputIdentity.read(handle)
        kept = load_index(index_file, identity) if index_file is not None else None
        with open_input(handle, src) as container:
            index: VideoIndex | None = kept
            if kept is None:
                source_info, found = probe_and_index(container, src)
                if isinstance(found, str):
                    log.info("%s is rendered as one segment: %s", src, found)
                else:
                    index = found
            else:
                source_info = describe(container, src)
            info = deinterlaced_info(source_info, deinterlace)
            if check is not None:
                check(container, info)
    layout = SegmentPlan.of(index, info, source_info, segment_seconds, halo=halo)
    return JobPlan(src, identity, source_info, info, deinterlace, index, layout,
                   _expected_frames(source_info, info, index))


def _expected_frames(source_info: VideoInfo, info: VideoInfo, index: VideoIndex | None) -> int:
    """Frames the input should yield (see ``JobPlan.expected_frames``), counted from evidence
    only: the container's frame count, the packets indexed, and a stream that ends more than
    half a frame before its stated duration (a truncated file)."""
    scale = 2 if info.time_base != source_info.time_base else 1
    packets = 0 if index is None else int(index.pts.size)
    if source_info.frame_count:
        last_pts = int(index.pts[-1]) if index is not None else None
        return scale * (packets + frames_missing(source_info.frame_count, packets, last_pts, source_info.time_base,
                                                 source_info.average_rate))
    if index is None or packets < 2 or not source_info.duration:
        return scale * packets
    tb = index.time_base
    step = Fraction(int(index.pts[-1] - index.pts[0])) * tb / (packets - 1)
    missing = source_info.duration - (int(index.pts[-1]) * tb + step)
    lost = int(missing / step + Fraction(1, 2)) if step and missing > step / 2 else 0
    return scale * (packets + lost)
