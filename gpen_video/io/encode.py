"""Write restored frames back as the same video: timing, colour, orientation and every
other stream kept, only the picture re-encoded.

``VideoWriter`` sets up the encoder like the source (pixel format, colour tags, rotation,
field order, pixel aspect), takes the upright RGB frames ``decode.VideoReader`` yields
(possibly with restored faces), converts them back with the source's own matrix
(``colour``) and encodes them with the source's pts. The other streams are copied packet
for packet alongside (``streams``). The file is written to a temporary file beside the
target and appears under its name only when complete (``files``).

The encoder is set up to be deterministic: the same frames and settings give the same bytes on
every run and machine (a fixed encoder thread count, x264's ``cpu-independent`` mode, no x265
info SEI naming the CPU). With ``copy_streams=False`` the writer makes one video-only part of a
longer output (``segments``): a bit-exact muxer, and x264's ``stitchable`` headers so the parts
join by stream copy.

A typical copy: open a ``VideoReader`` on the input, then a ``VideoWriter(output, reader.info)``,
and ``write`` every frame of ``reader.frames()`` inside a ``with`` block on the writer.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from gpen_video.errors import EncodeError, GpenVideoError, InputError, OutputError, StreamCopyError
from gpen_video.formats import CODECS, check_container, codec_format
from gpen_video.io import colour
from gpen_video.io.decode import SourcePicture, VideoInfo
from gpen_video.io.files import check_output, create_temp, disk_full, install, write_error
from gpen_video.io.streams import StreamCopier
from gpen_video.records import Frame

log = logging.getLogger(__name__)

ENCODERS: dict[str, str] = {name: entry.encoder for name, entry in CODECS.items()}
"""Encoder of each output codec (``formats.CODECS``)."""

ENCODER_THREADS = 4
"""Encoder threads, whatever the machine: x264 and x265 output depends on the thread count
(x264 also writes it into the stream), so it is fixed to make the same bytes everywhere. Four
keep x264 ahead of GPEN on CPUs; a job spread over workers encodes several parts at once."""
X264_PARAMS = (f"threads={ENCODER_THREADS}", "deterministic=1", "cpu-independent=1", "stitchable=1")
"""x264's settings besides crf and preset: the same bytes on every run and machine, and
segments that join (``jobs.segments``)."""

WHOLE_CHROMA_ENCODERS = frozenset({"libx264", "libx265", "prores_ks"})
"""Encoders whose picture size must be a whole number of chroma samples. H.264 and HEVC
cannot code, nor crop down to, an odd width in 4:2:0 or 4:2:2, nor an odd height in 4:2:0
(their cropping unit is one chroma sample); prores_ks silently loses the last chroma column
of an odd-width 4:2:2 picture. Such sizes get a finer chroma layout (4:4:4, or 4:2:2 when
only the height is odd). FFV1 codes any size in any layout."""

HORIZONTALLY_CENTRED = frozenset({"center", "top", "bottom"})
"""Chroma locations between two luma columns. ProRes (4:2:2 or 4:4:4) has no chroma location
and players take its chroma as co-sited with the left column, so only these are lost when
ProRes goes into MP4/MOV, which have no field for it either."""


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


def _holds_size(pix_fmt: str, encoder: str, size: tuple[int, int] | None) -> bool:
    if size is None or encoder not in WHOLE_CHROMA_ENCODERS:
        return True
    _, cw, ch, *_ = _describe(pix_fmt)
    width, height = size
    return width % round(1 / cw) == 0 and height % round(1 / ch) == 0


def choose_pix_fmt(source_pix_fmt: str, encoder: str, size: tuple[int, int] | None = None) -> str:
    """The encoder's pixel format closest to the source: same if supported, else the one that
    loses least (no fewer bits, no coarser chroma, then the smallest change).

    ``size`` (stored width, height) rules out layouts the encoder cannot code at that size:
    a 641x361 4:2:0 source gets 4:4:4 from libx264, libx265 and prores_ks (see
    WHOLE_CHROMA_ENCODERS).

    >>> choose_pix_fmt("yuv422p10le", "libx264"), choose_pix_fmt("yuv420p", "prores_ks")
    ('yuv422p10le', 'yuv422p10le')
    >>> choose_pix_fmt("yuv420p", "libx264", (641, 361)), choose_pix_fmt("yuv420p", "libx264", (640, 361))
    ('yuv444p', 'yuv422p')
    """
    source = source_pix_fmt.replace("yuvj", "yuv")
    supported = [f.name for f in av.codec.Codec(encoder, "w").video_formats or ()]
    if source in supported and _holds_size(source, encoder, size):
        return source
    bits, cw, ch, rgb, gray, alpha = _describe(source)
    candidates = []
    for name in supported:
        if name.startswith(("yuvj", "nv", "p0", "p2", "p4")) or name.endswith("be"):
            continue
        if not _holds_size(name, encoder, size):
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


class VideoWriter:
    """Encode frames into ``output_path`` as a faithful copy of ``source``.

    Args:
        output_path: the file to write; its extension picks the container.
        info: the frames given, as their reader describes them (``VideoReader.info``, i.e.
            after deinterlacing); ``info.path`` is the input whose other streams are copied.
        codec: h264 (libx264), h265 (libx265), prores (prores_ks) or ffv1.
        crf: quality of h264/h265; lower is closer to the input and larger.
        preset: x264/x265 speed preset; slower presets give smaller files at the same crf.
        strict: raise StreamCopyError instead of warning when a stream cannot be copied.
        overwrite: replace an existing output file.
        copy_streams: copy the source's other streams (audio, subtitles, data) and video tags
            into the output; False writes the video alone, as one part of an output that
            ``segments.assemble`` puts together (no tags, a bit-exact muxer).
        splice: keep the decoder's own samples (``Frame.source``, which ``VideoReader`` frames
            carry) wherever a frame's RGB is unchanged (exact path); False converts every pixel
            from RGB (reference path). Converting is exact too except where codec ringing put 4:2:0 samples
            outside the RGB gamut, which RGB clips; splicing keeps those as well.

    Untouched pixels: with ``splice`` the encoder receives, for every pixel whose RGB equals
    what the reader yielded, the very YUV samples the decoder produced (a chroma sample is
    replaced only if one of the pixels it covers changed). A frame whose RGB is unchanged
    is passed on as decoded. A frame without a source picture (made elsewhere, or replayed)
    is converted.

    Odd sizes: the output has the source's exact size. Where h264/h265 cannot code it in the
    source's chroma layout (641x361 in 4:2:0), a finer one is used (see ``choose_pix_fmt``).

    Raises:
        OutputError: the output is the input, exists without ``overwrite``, its folder or
            container is unusable, or the disk is full (the partial file is removed).
        StreamCopyError: with ``strict``, a stream cannot be copied into the container.
        EncodeError: the encoder or muxer failed (the partial file is removed).
    """

    def __init__(
        self,
        output_path: str | Path,
        info: VideoInfo,
        *,
        codec: str = "h264",
        crf: int = 18,
        preset: str = "medium",
        strict: bool = False,
        overwrite: bool = False,
        splice: bool = True,
        copy_streams: bool = True,
    ):
        codec_format(codec)
        self.splice = splice
        self.info = info
        self.output_path = Path(output_path)
        self.codec = codec
        self.encoder = ENCODERS[codec]
        self.crf, self.preset, self.strict, self.overwrite = crf, preset, strict, overwrite
        self.copy_streams = copy_streams
        check_output(info.path, self.output_path, overwrite=overwrite)
        if not self.output_path.suffix:
            raise OutputError(f"output {self.output_path} has no extension; add one such as .mp4 or .mkv")
        if copy_streams:  # an output, not a segment: its container must hold the codec
            check_container(codec, self.output_path)
        if (codec == "prores" and info.chroma_location in HORIZONTALLY_CENTRED and copy_streams
                and self.output_path.suffix.lower() not in (".mkv", ".webm")):
            log.warning("%s: ProRes in %s has no place for the source's chroma location (%s), so "
                        "players will take chroma as co-sited with the left pixel; use .mkv to "
                        "keep it", self.output_path, self.output_path.suffix, info.chroma_location)
        size = (info.coded_width, info.coded_height)
        self.pix_fmt = choose_pix_fmt(info.pix_fmt, self.encoder, size)
        usual = choose_pix_fmt(info.pix_fmt, self.encoder)
        if usual != self.pix_fmt and copy_streams:  # said once per output, not per part
            log.warning("%s: %s cannot store a %dx%d picture as %s, so it is written as %s (same "
                        "size and pixels; some hardware players do not play that layout)",
                        self.output_path, codec, *size, usual, self.pix_fmt)
        self.frames_written = 0
        self._out: av.container.OutputContainer | None = None
        self._copier: StreamCopier | None = None
        self._tmp: Path | None = None

    # --- setup ---

    def __enter__(self) -> "VideoWriter":
        try:
            self._open()
        except BaseException:
            self._abort()
            raise
        return self

    def check(self, source: av.container.InputContainer | None = None) -> None:
        """Open the output as writing would, then remove it: a problem with the output (its
        folder, container, codec, and with ``strict`` a stream that cannot be copied) shows
        before any work is done. Streams that would be left out are not reported here.

        Args:
            source: the input, already open (a job checks its output while it reads the
                input's description); None opens ``info.path``.
        """
        strict = self.strict
        self.strict = True
        try:
            self._open(source)
        except StreamCopyError:
            if strict:
                raise
        finally:
            self.strict = strict
            self._abort()

    def _open(self, source: av.container.InputContainer | None = None) -> None:
        out_path = self.output_path
        self._tmp = create_temp(out_path)
        options = {} if self.copy_streams else {"fflags": "+bitexact"}
        try:
            self._out = av.open(str(self._tmp), mode="w", container_options=options)
        except ValueError:
            raise OutputError(
                f"output {out_path} has an extension FFmpeg cannot write ({out_path.suffix}); "
                "use .mp4, .mov or .mkv"
            ) from None
        except av.FFmpegError as exc:
            raise write_error(out_path, exc) from None
        self._reformatter = VideoReformatter()
        self._window_reformatter = VideoReformatter()  # its windows change size: another swscale context
        if not self.copy_streams:
            self._add_video(None)
            return
        try:
            self._copier = StreamCopier(self.info.path, self._out, out_path, self.info.stream_index,
                                        strict=self.strict, container=source)
        except av.FFmpegError as exc:
            raise InputError(f"cannot open {self.info.path} again to copy its other streams "
                             f"({exc.strerror}); was it moved or changed?") from None
        self._copier.add_streams(self._add_video)

    def encoder_options(self) -> dict[str, str]:
        """The encoder's options: quality, what makes the bytes deterministic and the parts of
        a segmented output joinable, and the source's chroma location.

        The chroma location is FFmpeg's generic ``chroma_sample_location`` codec option (PyAV
        has no attribute for it): libx264 and libx265 write it into the stream's VUI (H.264
        only for 4:2:0), and Matroska into the track for any codec. MP4/MOV have no field for
        it and ProRes and FFV1 pictures do not hold it, so ProRes in .mov loses it.
        """
        info = self.info
        options: dict[str, str] = {}
        if self.info.chroma_location:
            options["chroma_sample_location"] = self.info.chroma_location
        interlaced = info.interlaced and info.field_order in ("tt", "bb", "tb", "bt")
        if self.codec == "h264":
            params = list(X264_PARAMS)
            if interlaced:
                params += ["interlaced=1", "tff=1" if info.field_order in ("tt", "tb") else "bff=1"]
            options.update(crf=str(self.crf), preset=self.preset, **{"x264-params": ":".join(params)})
        elif self.codec == "h265":
            params = ["log-level=error", f"frame-threads={max(1, ENCODER_THREADS // 2)}",
                      f"pools={ENCODER_THREADS}", "open-gop=0", "info=0"]
            options.update(crf=str(self.crf), preset=self.preset, **{"x265-params": ":".join(params)})
        elif self.codec == "prores":
            full_chroma = av.video.format.VideoFormat(self.pix_fmt).chroma_width(1024) == 1024
            options["profile"] = "4444" if full_chroma else "hq"
        return options

    def _add_video(self, template: av.video.stream.VideoStream | None) -> None:
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
        ctx.thread_count = ENCODER_THREADS
        if info.average_rate:
            ctx.framerate = info.average_rate
        if info.sample_aspect_ratio:
            ctx.sample_aspect_ratio = info.sample_aspect_ratio
        color_range, colorspace = colour.output_tags(info, self.pix_fmt) or (info.color_range, info.colorspace)
        self._colour_tags = (color_range, colorspace, info.color_primaries, info.color_trc)
        ctx.color_range, ctx.colorspace, ctx.color_primaries, ctx.color_trc = self._colour_tags
        if self.codec == "h265" and self.output_path.suffix.lower() in (".mp4", ".mov", ".m4v"):
            stream.codec_tag = "hvc1"
        if info.interlaced and info.field_order in ("tt", "bb", "tb", "bt"):
            ctx.field_order = {"tt": 2, "bb": 3, "tb": 4, "bt": 5}[info.field_order]
        stream.options = self.encoder_options()
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if template is not None:
            stream.metadata.update(self._copier.video_metadata())
            stream.disposition = template.disposition
        self._video = stream

    # --- writing ---

    def write(self, frame: Frame) -> None:
        """Encode one upright RGB frame with its pts (same dtype and size as decoded)."""
        if self._out is None:
            raise RuntimeError("use VideoWriter as a context manager: with VideoWriter(...) as w")
        info = self.info
        if frame.shape != (info.height, info.width, 3):
            raise ValueError(f"Frame.rgb must have shape ({info.height}, {info.width}, 3), got {frame.shape}")
        if frame.dtype != info.dtype:
            raise ValueError(f"Frame.rgb must be {np.dtype(info.dtype).name} for this source, "
                             f"got {frame.dtype}")
        source = frame.source if self.splice else None
        av_frame = self._spliced(frame, source) if isinstance(source, SourcePicture) else None
        if av_frame is None:
            av_frame = self.to_av_frame(frame.rgb)
        # prores_ks writes each frame's own tags into its picture header, not the encoder's
        av_frame.color_range, av_frame.colorspace, av_frame.color_primaries, av_frame.color_trc = (
            self._colour_tags)
        pts = frame.pts
        if frame.time_base != info.time_base and pts is not None:
            pts = round(pts * frame.time_base / info.time_base)
        av_frame.pts = pts
        av_frame.time_base = info.time_base
        try:
            packets = self._video.encode(av_frame)
        except av.FFmpegError as exc:
            raise self._failure(exc, f"the {self.encoder} encoder failed on frame {frame.index}"
                                + self._first_frame_hint()) from None
        try:
            self._out.mux(packets)
            if pts is not None and self._copier is not None:
                self._copier.pump(float(pts * info.time_base))
        except av.FFmpegError as exc:
            raise self._failure(exc, f"the {self._out.format.name} muxer failed at frame {frame.index}") from None
        self.frames_written += 1

    def _first_frame_hint(self) -> str:
        if self.frames_written:
            return ""
        return (f" (it did not start with {self.pix_fmt} at {self.info.coded_width}x"
                f"{self.info.coded_height}; try another --codec)")

    def _failure(self, exc: av.FFmpegError, what: str) -> GpenVideoError:
        """OutputError for a full disk, else EncodeError naming the component and FFmpeg's cause."""
        if disk_full(exc):
            return write_error(self.output_path, exc)
        return EncodeError(f"writing {self.output_path} failed: {what} ({exc.strerror})")

    def to_av_frame(self, rgb: np.ndarray) -> av.VideoFrame:
        """Upright RGB (H, W, 3) -> stored-orientation frame in the encoder's pixel format."""
        return colour.to_frame(rgb, self.info, self.pix_fmt, self._reformatter)

    def _spliced(self, frame: Frame, source: SourcePicture) -> av.VideoFrame | None:
        """The decoded picture with only the changed pixels replaced, or None where it cannot
        serve (another pixel format).

        The picture itself is reused (made writable first: the decoder may still reference
        it), so its field order, interlacing and other per-frame properties survive. A frame
        whose RGB was never made (no stage read its pixels), or is the decoded RGB itself,
        passes the picture with nothing converted or compared.
        """
        picture = source.picture
        if picture.format.name != self.pix_fmt or not picture.format.is_planar:
            return None
        picture.pict_type = 0  # encoders honour decoded I/P/B types: let ours choose
        if not frame.rgb_made or (source.rgb_made and frame.rgb is source.rgb):
            return picture
        found = colour.changed_window(frame.rgb, source.rgb)
        if found is None:
            return picture
        origin, changed = found
        if self.info.rotation:
            origin, changed = colour.stored_window(origin, changed, frame.rgb.shape[:2], self.info.rotation)
        converted, converted_at = colour.converted_window(colour.stored_view(frame.rgb, self.info.rotation), origin,
                                                          changed.shape, self.info, self.pix_fmt,
                                                          self._window_reformatter)
        picture.make_writable()
        colour.splice_planes(picture, converted, changed, origin, converted_at)
        return picture

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
            packets = self._video.encode(None)
        except av.FFmpegError as exc:
            raise self._failure(exc, f"the {self.encoder} encoder failed on its last frames") from None
        name = self._out.format.name
        try:
            self._out.mux(packets)
            if self._copier is not None:
                self._copier.finish()
        except av.FFmpegError as exc:
            raise self._failure(exc, f"the {name} muxer failed after the last frame") from None
        try:
            self._out.close()
        except av.FFmpegError as exc:
            raise self._failure(exc, f"the {name} muxer could not finish the file") from None
        self._out = None
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        try:
            install(self._tmp, self.output_path, overwrite=self.overwrite)
        except OSError as exc:
            if isinstance(exc, GpenVideoError):
                raise
            raise write_error(self.output_path, exc) from None
        self._tmp = None
        if self.info.frame_count and self.frames_written != self.info.frame_count:
            log.debug("%s: wrote %d frames, the input has %d", self.output_path,
                      self.frames_written, self.info.frame_count)

    def _abort(self) -> None:
        """Close everything and delete the temporary file; never masks the first error.

        Runs on any exception, KeyboardInterrupt and exceptions raised by signal handlers
        included; the file is removed even if closing fails or is interrupted.
        """
        out, copier, tmp = self._out, self._copier, self._tmp
        self._out = self._copier = self._tmp = None
        try:
            for close in (out.close if out else None, copier.close if copier else None):
                if close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - already failing, keep the original error
                        pass
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

