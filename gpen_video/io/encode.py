"""Write restored frames back as the same video: timing, colour, orientation and every
other stream kept, only the picture re-encoded.

``VideoWriter`` takes the upright RGB frames ``decode.VideoReader`` yields (possibly with
restored faces), turns them back to the stored orientation, converts RGB to YUV with the
source's own matrix and range, and encodes them with the source's pts. Audio, subtitle,
data and attachment streams are copied packet for packet from a second demuxer over the
input, interleaved as the video advances. The file appears under its name only when it is
complete.

>>> with VideoReader("tape.mp4") as reader, VideoWriter("out.mp4", reader) as writer:  # doctest: +SKIP
...     for frame in reader.frames():
...         writer.write(frame)
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from gpen_video.errors import EncodeError, OutputError, StreamCopyError
from gpen_video.io.decode import (
    _SWS_MATRIX,
    AVCOL_RANGE_JPEG,
    AVCOL_RANGE_MPEG,
    EXACT_SWS_FLAGS,
    SourceStash,
    VideoInfo,
    VideoReader,
    probe,
)
from gpen_video.records import Frame, check_shape

log = logging.getLogger(__name__)

Codec = Literal["h264", "h265", "prores", "ffv1"]

ENCODERS: dict[str, str] = {"h264": "libx264", "h265": "libx265", "prores": "prores_ks", "ffv1": "ffv1"}

# Tags the muxer writes itself; copying them would describe the input's muxer, not ours.
_MUXER_KEYS = {"major_brand", "minor_version", "compatible_brands", "encoder", "vendor_id",
               "duration", "number_of_frames", "number_of_bytes", "bps"}


def default_output_path(input_path: str | Path) -> Path:
    """``dir/NAME.restored.EXT`` beside ``dir/NAME.EXT``.

    >>> default_output_path("/videos/tape.mp4").as_posix()
    '/videos/tape.restored.mp4'
    """
    path = Path(input_path)
    return path.with_name(f"{path.stem}.restored{path.suffix}")


def _describe(pix_fmt: str) -> tuple[int, float, float, bool, bool, bool]:
    fmt = av.video.format.VideoFormat(pix_fmt)
    bits = max(c.bits for c in fmt.components)
    gray = len([c for c in fmt.components if not c.is_alpha]) == 1
    alpha = any(c.is_alpha for c in fmt.components)
    cw = fmt.chroma_width(1024) / 1024 if not (fmt.is_rgb or gray) else 1.0
    ch = fmt.chroma_height(1024) / 1024 if not (fmt.is_rgb or gray) else 1.0
    return bits, cw, ch, fmt.is_rgb, gray, alpha


def choose_pix_fmt(source_pix_fmt: str, encoder: str) -> str:
    """The encoder's pixel format closest to the source: same if supported, else the one that
    loses least (no fewer bits, no coarser chroma, then the smallest change).

    >>> choose_pix_fmt("yuv422p10le", "libx264"), choose_pix_fmt("yuv420p", "prores_ks")
    ('yuv422p10le', 'yuv422p10le')
    """
    source = source_pix_fmt.replace("yuvj", "yuv")
    supported = [f.name for f in av.codec.Codec(encoder, "w").video_formats or ()]
    if source in supported:
        return source
    bits, cw, ch, rgb, gray, alpha = _describe(source)
    candidates = []
    for name in supported:
        if name.startswith(("yuvj", "nv", "p0", "p2", "p4")) or name.endswith("be"):
            continue
        c_bits, c_cw, c_ch, c_rgb, c_gray, c_alpha = _describe(name)
        if c_gray and not gray or c_alpha and not alpha:
            continue
        key = (
            c_bits < bits,
            c_cw < cw or c_ch < ch,
            abs(c_bits - bits),
            abs(c_cw - cw) + abs(c_ch - ch),
            c_rgb != rgb,
            not av.video.format.VideoFormat(name).is_planar,
        )
        candidates.append((key, name))
    if not candidates:
        raise OutputError(f"encoder {encoder} supports no pixel format usable for {source_pix_fmt}")
    return min(candidates)[1]


def _copy_metadata(source: dict[str, str], target: dict[str, str]) -> None:
    for key, value in source.items():
        low = key.lower()
        if low in _MUXER_KEYS or low.startswith("_statistics") or low.startswith("duration"):
            continue
        target[key] = value


def _time(packet: av.Packet) -> float:
    ts = packet.dts if packet.dts is not None else packet.pts
    return float(ts * packet.time_base) if ts is not None and packet.time_base else float("-inf")


def _plane_view(frame: av.VideoFrame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    dtype = np.uint16 if max(c.bits for c in frame.format.components) > 8 else np.uint8
    width = plane.line_size // np.dtype(dtype).itemsize
    return np.frombuffer(plane, dtype).reshape(-1, width)[: plane.height, : plane.width]


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whole-array equality, compared 8 bytes at a time where the layout allows."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.flags.c_contiguous and b.flags.c_contiguous and a.nbytes % 8 == 0:
        return bool(np.array_equal(a.reshape(-1).view(np.uint64), b.reshape(-1).view(np.uint64)))
    return bool(np.array_equal(a, b))


def splice_planes(target: av.VideoFrame, source: av.VideoFrame, changed: np.ndarray) -> None:
    """Copy ``source``'s samples into ``target`` (same planar format and size) wherever a
    pixel the sample covers is marked in ``changed`` (H, W) bool, stored orientation."""
    height, width = changed.shape
    for i in range(len(target.planes)):
        out, src = _plane_view(target, i), _plane_view(source, i)
        ph, pw = out.shape
        sy, sx = -(-height // ph), -(-width // pw)
        mask = changed
        if (sy, sx) != (1, 1):
            padded = np.zeros((ph * sy, pw * sx), bool)
            padded[:height, :width] = changed
            mask = padded.reshape(ph, sy, pw, sx).any(axis=(1, 3))  # [hw] per sample
        np.copyto(out, src, where=mask)


class VideoWriter:
    """Encode frames into ``output_path`` as a faithful copy of ``source``.

    Args:
        output_path: the file to write; its extension picks the container.
        source: the input as a VideoReader (its ``info`` describes the frames given, e.g.
            after deinterlacing), a VideoInfo, or the input path.
        codec: h264 (libx264), h265 (libx265), prores (prores_ks) or ffv1.
        crf: quality of h264/h265; lower is closer to the input and larger.
        preset: x264/x265 speed preset; slower presets give smaller files at the same crf.
        strict: raise StreamCopyError instead of warning when a stream cannot be copied.
        overwrite: replace an existing output file.
        splice: with a VideoReader source, keep the decoder's own samples wherever a frame's
            RGB is unchanged (exact path); False converts every pixel from RGB (reference
            path). Converting is exact too except where codec ringing put 4:2:0 samples
            outside the RGB gamut, which RGB clips; splicing keeps those as well.

    Untouched pixels: with ``splice`` the encoder receives, for every pixel whose RGB equals
    what the reader yielded, the very YUV samples the decoder produced (a chroma sample is
    replaced only if one of the pixels it covers changed). A frame whose RGB is unchanged
    is passed on as decoded. Memory: the decoded pictures of frames between reader and
    writer are kept, up to 1 GiB (older ones are then converted instead).

    Raises:
        OutputError: the output is the input, exists without ``overwrite``, or its folder or
            container is unusable.
        StreamCopyError: with ``strict``, a stream cannot be copied into the container.
        EncodeError: the encoder or muxer failed (the partial file is removed).
    """

    def __init__(
        self,
        output_path: str | Path,
        source: VideoReader | VideoInfo | str | Path,
        *,
        codec: Codec = "h264",
        crf: int = 18,
        preset: str = "medium",
        strict: bool = False,
        overwrite: bool = False,
        splice: bool = True,
    ):
        if codec not in ENCODERS:
            raise ValueError(f"codec must be one of {', '.join(ENCODERS)}, got {codec!r}")
        self._stash: SourceStash | None = None
        if isinstance(source, VideoReader):
            info = source.info
            if splice:
                self._stash = source.keep_source_pictures()
        elif isinstance(source, VideoInfo):
            info = source
        else:
            info = probe(source)
        self.info = info
        self.output_path = Path(output_path)
        self.codec = codec
        self.encoder = ENCODERS[codec]
        self.crf, self.preset, self.strict, self.overwrite = crf, preset, strict, overwrite
        self.pix_fmt = choose_pix_fmt(info.pix_fmt, self.encoder)
        self.frames_written = 0
        self._check_paths()
        self._out: av.container.OutputContainer | None = None
        self._copy_in: av.container.InputContainer | None = None
        self._tmp: Path | None = None

    def _check_paths(self) -> None:
        out, src = self.output_path, self.info.path
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise OutputError(f"output {out} is the input file; choose another output name")
        if out.exists() and not self.overwrite:
            raise OutputError(f"output {out} already exists; remove it or pass overwrite (-y)")
        if out.exists() and out.is_dir():
            raise OutputError(f"output {out} is a directory; give a file name with an extension")
        if not out.parent.is_dir():
            raise OutputError(f"output folder {out.parent} does not exist; create it first")
        if not out.suffix:
            raise OutputError(f"output {out} has no extension; add one such as .mp4 or .mkv")

    # --- setup ---

    def __enter__(self) -> "VideoWriter":
        try:
            self._open()
        except BaseException:
            self._abort()
            raise
        return self

    def _open(self) -> None:
        out_path = self.output_path
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.tmp-", suffix=out_path.suffix,
                                   dir=out_path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._out = av.open(str(self._tmp), mode="w")
        except (ValueError, av.FFmpegError):
            raise OutputError(
                f"output {out_path} has an extension FFmpeg cannot write ({out_path.suffix}); "
                "use .mp4, .mov or .mkv"
            ) from None
        self._copy_in = av.open(str(self.info.path), mode="r")
        _copy_metadata(self._copy_in.metadata, self._out.metadata)
        self._copy_map: dict[int, av.stream.Stream] = {}
        for stream in self._copy_in.streams:
            if stream.index == self.info.stream_index:
                self._video = self._add_video(stream)
            else:
                self._add_copy(stream)
        self._reformatter = VideoReformatter()
        copied = [self._copy_in.streams[i] for i in self._copy_map]
        self._copy_packets = self._copy_in.demux(*copied) if copied else iter(())
        self._pending: av.Packet | None = None

    def _add_video(self, template: av.video.stream.VideoStream) -> av.video.stream.VideoStream:
        info = self.info
        try:
            stream = self._out.add_stream(self.encoder, rate=info.average_rate or Fraction(25))
        except ValueError:
            raise OutputError(
                f"the {self.output_path.suffix} container cannot hold {self.codec} video; "
                "use .mkv or .mov, or another codec"
            ) from None
        stream.width, stream.height = info.coded_width, info.coded_height
        stream.pix_fmt = self.pix_fmt
        stream.time_base = info.time_base
        ctx = stream.codec_context
        ctx.time_base = info.time_base
        if info.average_rate:
            ctx.framerate = info.average_rate
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        out_fmt = av.video.format.VideoFormat(self.pix_fmt)
        if out_fmt.is_rgb == info.is_rgb:
            ctx.color_range, ctx.colorspace = info.color_range, info.colorspace
        elif not out_fmt.is_rgb:  # RGB source stored as YUV: tag the matrix we convert with
            ctx.color_range, ctx.colorspace = AVCOL_RANGE_MPEG, info.matrix
        ctx.color_primaries, ctx.color_trc = info.color_primaries, info.color_trc
        self._yuv_args = {}
        if not out_fmt.is_rgb:
            full = info.full_range if not info.is_rgb else False
            self._yuv_args = dict(
                dst_colorspace=_SWS_MATRIX[info.matrix],
                dst_color_range=AVCOL_RANGE_JPEG if full else AVCOL_RANGE_MPEG,
            )
        options: dict[str, str] = {}
        if self.codec in ("h264", "h265"):
            options.update(crf=str(self.crf), preset=self.preset)
        if self.codec == "h265":
            options["x265-params"] = "log-level=error"
            if self.output_path.suffix.lower() in (".mp4", ".mov", ".m4v"):
                stream.codec_tag = "hvc1"
        if self.codec == "prores":
            options["profile"] = "4444" if out_fmt.chroma_width(1024) == 1024 else "hq"
        if info.interlaced and info.field_order in ("tt", "bb", "tb", "bt"):
            ctx.field_order = {"tt": 2, "bb": 3, "tb": 4, "bt": 5}[info.field_order]
            if self.codec == "h264":
                tff = info.field_order in ("tt", "tb")
                options["x264-params"] = f"interlaced=1:{'tff' if tff else 'bff'}=1"
        stream.options = options
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        _copy_metadata(template.metadata, stream.metadata)
        stream.disposition = template.disposition
        return stream

    def _add_copy(self, template: av.stream.Stream) -> None:
        """Add a packet-copy of ``template`` if the container can hold it, else warn/raise."""
        reason = self._cannot_copy(template)
        if reason is not None:
            what = f"{template.type} stream #{template.index} ({self._codec_name(template)})"
            message = (f"{what} of {self.info.path} cannot be copied into "
                       f"{self.output_path.name}: {reason}; use .mkv or .mov to keep it")
            if self.strict:
                raise StreamCopyError(message)
            log.warning("%s; it is left out", message)
            return
        stream = self._out.add_stream_from_template(template)
        _copy_metadata(template.metadata, stream.metadata)
        stream.disposition = template.disposition
        self._copy_map[template.index] = stream

    @staticmethod
    def _codec_name(stream: av.stream.Stream) -> str:
        ctx = stream.codec_context
        return ctx.name if ctx is not None else stream.type

    def _cannot_copy(self, template: av.stream.Stream) -> str | None:
        """Why the output container cannot hold a copy of ``template`` (None if it can).

        Tried on a throwaway in-memory muxer, so a refusal is found before the real file
        is started rather than at its header.
        """
        probe_out = av.open(io.BytesIO(), mode="w", format=self._out.format.name)
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

    # --- writing ---

    def write(self, frame: Frame) -> None:
        """Encode one upright RGB frame with its pts (same dtype and size as decoded)."""
        if self._out is None:
            raise RuntimeError("use VideoWriter as a context manager: with VideoWriter(...) as w")
        info = self.info
        check_shape("Frame.rgb", frame.rgb, (info.height, info.width, 3))
        if frame.rgb.dtype != info.dtype:
            raise ValueError(f"Frame.rgb must be {np.dtype(info.dtype).name} for this source, "
                             f"got {frame.rgb.dtype}")
        av_frame = self._spliced(frame) if self._stash is not None else None
        if av_frame is None:
            av_frame = self.to_av_frame(frame.rgb)
        pts = frame.pts
        if frame.time_base != info.time_base and pts is not None:
            pts = round(pts * frame.time_base / info.time_base)
        av_frame.pts = pts
        av_frame.time_base = info.time_base
        try:
            self._out.mux(self._video.encode(av_frame))
        except av.FFmpegError as exc:
            raise EncodeError(f"encoding frame {frame.index} into {self.output_path} failed "
                              f"({exc.strerror}); check free disk space and the codec settings") from None
        self.frames_written += 1
        if pts is not None:
            self._pump(float(pts * info.time_base))

    def to_av_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        """Upright RGB (H, W, 3) -> stored-orientation frame in the encoder's pixel format."""
        if self.info.rotation:
            rgb = np.rot90(rgb, k=-self.info.rotation // 90)
        rgb = np.ascontiguousarray(rgb)  # [HWC] stored orientation
        av_frame = av.VideoFrame.from_ndarray(rgb, format=self.info.rgb_format)
        return self._reformatter.reformat(
            av_frame, format=self.pix_fmt, interpolation=EXACT_SWS_FLAGS, **self._yuv_args
        )

    def _spliced(self, frame: Frame) -> av.VideoFrame | None:
        """The decoded picture with only the changed pixels replaced, or None if unknown.

        The picture itself is reused (made writable first: the decoder may still reference
        it), so its field order, interlacing and other per-frame properties survive.
        """
        entry = self._stash.pop(frame.index)
        if entry is None:
            return None
        picture, original = entry
        if picture.format.name != self.pix_fmt or not picture.format.is_planar:
            return None
        picture.pict_type = 0  # encoders honour decoded I/P/B types: let ours choose
        if _same_pixels(frame.rgb, original):
            return picture
        changed = np.any(frame.rgb != original, axis=2)  # [HW] upright
        converted = self.to_av_frame(frame.rgb)
        if self.info.rotation:
            changed = np.rot90(changed, k=-self.info.rotation // 90)  # [HW] stored
        picture.make_writable()
        splice_planes(picture, converted, changed)
        return picture

    def _regenerated_by_muxer(self, packet: av.Packet) -> bool:
        """MP4/MOV text tracks mark each cue's end with an empty sample that the muxer writes
        itself; copying the input's would double them."""
        return (
            packet.size == 2
            and self._out.format.name in ("mp4", "mov")
            and self._codec_name(packet.stream) == "mov_text"
            and bytes(packet) == b"\x00\x00"
        )

    def _pump(self, until: float) -> None:
        """Mux copied packets up to ``until`` seconds so the streams stay interleaved."""
        while True:
            if self._pending is None:
                try:
                    packet = next(self._copy_packets)
                except StopIteration:
                    return
                except av.FFmpegError as exc:
                    log.warning("%s: copying the other streams stopped early: %s",
                                self.info.path, exc)
                    self._copy_packets = iter(())
                    return
                if packet.size == 0 or self._regenerated_by_muxer(packet):
                    continue
                self._pending = packet
            if _time(self._pending) > until:
                return
            packet, self._pending = self._pending, None
            packet.stream = self._copy_map[packet.stream.index]
            self._out.mux(packet)

    # --- finishing ---

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise

    def _finish(self) -> None:
        try:
            self._out.mux(self._video.encode(None))
            self._pump(float("inf"))
            self._out.close()
        except av.FFmpegError as exc:
            raise EncodeError(f"finishing {self.output_path} failed ({exc.strerror}); check free "
                              "disk space and the codec settings") from None
        self._out = None
        self._copy_in.close()
        self._copy_in = None
        os.replace(self._tmp, self.output_path)
        self._tmp = None
        if self.info.frame_count and self.frames_written != self.info.frame_count:
            log.debug("%s: wrote %d frames, the input has %d", self.output_path,
                      self.frames_written, self.info.frame_count)

    def _abort(self) -> None:
        """Close everything and delete the temporary file; never masks the first error."""
        for closable in (self._out, self._copy_in):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # noqa: BLE001 - already failing, keep the original error
                    pass
        self._out = self._copy_in = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
