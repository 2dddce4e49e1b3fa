"""Stored pictures <-> RGB with the stream's own matrix and range, exact both ways.

The reader converts each decoded picture to upright RGB (``to_rgb``); the writer converts
RGB back to the encoder's pixel format with the same matrix (``to_frame``). With
``EXACT_SWS_FLAGS`` the round trip returns the decoded samples unchanged, and where only part
of a frame was restored the writer keeps the decoder's own samples around it
(``splice_planes``), so untouched pixels reach the encoder exactly as they were decoded.

Colour enums are FFmpeg's: AVColorSpace for matrices, AVColorRange for ranges. The chroma
location, which PyAV does not expose as a number, is carried by name (``chroma_location``).
"""

from __future__ import annotations

import re
import threading
from typing import Protocol

import av
import av.logging
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

AVCOL_SPC_RGB, AVCOL_SPC_BT709, AVCOL_SPC_SMPTE170M = 0, 1, 6
AVCOL_RANGE_MPEG, AVCOL_RANGE_JPEG = 1, 2

SWS_MATRIX: dict[int, int] = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
"""AVColorSpace -> the swscale matrix (SWS_CS_*) that implements it. Matrices swscale lacks
are replaced by the usual guess (see ``matrix_for``)."""

EXACT_SWS_FLAGS = (
    Interpolation.POINT
    | Interpolation.ACCURATE_RND
    | Interpolation.FULL_CHR_H_INT
    | Interpolation.FULL_CHR_H_INP
)
"""Nearest-sample chroma with accurate rounding: YUV -> RGB -> YUV with the same matrix gives
back the original samples exactly (bilinear chroma would blur chroma a little on each pass)."""

CHROMA_LOCATIONS = frozenset({"left", "center", "topleft", "top", "bottomleft", "bottom"})
"""FFmpeg's names of the chroma locations (AVChromaLocation 1-6): where each subsampled chroma
sample sits among the luma samples it covers, which players need to upsample chroma in place."""

_DUMP_LOCK = threading.Lock()

_KR_KB = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593), 7: (0.212, 0.087),
          4: (0.30, 0.11)}


class PictureLayout(Protocol):
    """How a stream's stored pictures map to upright RGB (``decode.VideoInfo`` is one)."""

    @property
    def matrix(self) -> int:
        """AVColorSpace of the YUV <-> RGB matrix."""

    @property
    def full_range(self) -> bool:
        """YUV samples use the full (JPEG) range rather than the limited (MPEG) one."""

    @property
    def is_rgb(self) -> bool:
        """The stored pixels are RGB already."""

    @property
    def rgb_format(self) -> str:
        """PyAV format of the RGB frames: rgb24 (uint8) or rgb48le (uint16)."""

    @property
    def rotation(self) -> int:
        """Display rotation, degrees counterclockwise: 0, 90, 180 or 270."""


def matrix_for(colorspace: int, coded_height: int) -> int:
    """The matrix to convert with: the tag if swscale has it, else BT.709 from 720 lines up and
    BT.601 below (what players assume for untagged video)."""
    if colorspace in SWS_MATRIX:
        return colorspace
    return AVCOL_SPC_BT709 if coded_height >= 720 else AVCOL_SPC_SMPTE170M


def chroma_location(container: av.container.InputContainer, stream_index: int) -> str | None:
    """FFmpeg's name of the chroma location stream ``stream_index`` of the open ``container``
    is tagged with (``left``, ``topleft``, ...; see CHROMA_LOCATIONS), None if it has none.

    PyAV 18 reads and sets no chroma location, on codec contexts or frames. FFmpeg names it in
    its summary of a stream (``av_dump_format``) after the pixel format, ``yuv420p(progressive,
    topleft)``, when its log level is verbose; that line is read here, the log levels being
    raised for the call and put back (libav's to INFO, FFmpeg's default). The value is the
    stream's parameters, as ``ffprobe -show_streams`` reports them: the container's tag, or the
    bitstream's, where the H.264 and HEVC decoders report ``left``, those standards' default,
    for a stream that does not say.
    """
    stream = container.streams[stream_index]
    pix_fmt = stream.codec_context.pix_fmt if stream.type == "video" else None
    if pix_fmt is None:
        return None
    with _DUMP_LOCK:
        level = av.logging.get_level()
        av.logging.set_level(av.logging.INFO)
        av.logging.set_libav_level(av.logging.VERBOSE)
        try:
            summary = container.dumps_format()
        finally:
            av.logging.set_libav_level(av.logging.INFO)
            av.logging.set_level(level)
    line = re.search(rf"^\s*Stream #\d+:{stream_index}\b.*$", summary, re.MULTILINE)
    details = re.search(rf"\b{re.escape(pix_fmt)}\(([^)]*)\)", line.group(0)) if line else None
    names = details.group(1).split(", ") if details else ()
    return next((name for name in names if name in CHROMA_LOCATIONS), None)


SCALE_SWS_FLAGS = Interpolation.AREA
"""Area averaging when downscaling for detection and scene cuts: every source sample counts,
as with OpenCV's INTER_AREA, and it costs less than the exact full-size conversion."""


def to_rgb(frame: av.VideoFrame, layout: PictureLayout, reformatter: VideoReformatter | None = None, *,
           size: tuple[int, int] | None = None) -> np.ndarray:
    """Stored YUV/RGB picture -> upright (H, W, 3) RGB with ``layout``'s matrix and range.

    Args:
        size: None: full size, exact (``EXACT_SWS_FLAGS``), uint8 or uint16 (``layout``'s
            ``rgb_format``). (width, height): an upright uint8 copy of that size, area-scaled by
            swscale straight from the stored samples (no full-size RGB is made): what detection
            and scene cuts look at.
    """
    reformatter = reformatter or VideoReformatter()
    kwargs: dict = dict(format=layout.rgb_format, interpolation=EXACT_SWS_FLAGS)
    if size is not None:
        width, height = size[::-1] if layout.rotation in (90, 270) else size  # stored orientation
        kwargs = dict(width=width, height=height, format="rgb24", interpolation=SCALE_SWS_FLAGS, threads=1)
    if not frame.format.is_rgb:
        kwargs.update(
            src_colorspace=SWS_MATRIX[layout.matrix],
            src_color_range=AVCOL_RANGE_JPEG if layout.full_range else AVCOL_RANGE_MPEG,
        )
    rgb = reformatter.reformat(frame, **kwargs).to_ndarray()  # [HWC] stored orientation
    if layout.rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=layout.rotation // 90))
    return rgb


def to_rgb_reference(frame: av.VideoFrame, layout: PictureLayout) -> np.ndarray:
    """Slow numpy reference of ``to_rgb`` for 8-bit planar YUV (tests compare the two).

    Nearest-sample chroma, the standard Kr/Kb matrices, float maths, round to nearest.
    """
    kr, kb = _KR_KB.get(layout.matrix, (0.299, 0.114))
    fmt = frame.format
    planes = []
    for i in range(3):
        plane = frame.planes[i]
        h = frame.height if i == 0 else fmt.chroma_height(frame.height)
        w = frame.width if i == 0 else fmt.chroma_width(frame.width)
        planes.append(
            np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w].astype(np.float64)
        )
    y, u, v = planes
    sy = 2 if u.shape[0] < frame.height else 1
    sx = 2 if u.shape[1] < frame.width else 1
    u = np.repeat(np.repeat(u, sy, axis=0), sx, axis=1)[: frame.height, : frame.width]
    v = np.repeat(np.repeat(v, sy, axis=0), sx, axis=1)[: frame.height, : frame.width]
    if layout.full_range:
        yn, un, vn = y / 255.0, (u - 128) / 255.0, (v - 128) / 255.0
    else:
        yn, un, vn = (y - 16) / 219.0, (u - 128) / 224.0, (v - 128) / 224.0
    kg = 1 - kr - kb
    r = yn + 2 * (1 - kr) * vn
    b = yn + 2 * (1 - kb) * un
    g = (yn - kr * r - kb * b) / kg
    rgb = np.clip(np.round(np.stack([r, g, b], axis=-1) * 255), 0, 255).astype(np.uint8)  # [HWC]
    return np.rot90(rgb, k=layout.rotation // 90) if layout.rotation else rgb


def output_tags(layout: PictureLayout, pix_fmt: str) -> tuple[int, int] | None:
    """(AVColorRange, AVColorSpace) to tag on an encoder writing ``pix_fmt``, matching what
    ``to_frame`` converts with; None keeps the source's tags (same family, RGB or YUV)."""
    if av.video.format.VideoFormat(pix_fmt).is_rgb == layout.is_rgb:
        return None
    if av.video.format.VideoFormat(pix_fmt).is_rgb:
        return AVCOL_RANGE_JPEG, AVCOL_SPC_RGB
    return AVCOL_RANGE_MPEG, layout.matrix  # RGB source stored as YUV


def to_frame(rgb: np.ndarray, layout: PictureLayout, pix_fmt: str,
             reformatter: VideoReformatter | None = None) -> av.VideoFrame:
    """Upright RGB (H, W, 3) -> stored-orientation picture in ``pix_fmt``, with ``layout``'s
    matrix and range (the inverse of ``to_rgb``)."""
    return stored_to_frame(stored_view(rgb, layout.rotation), layout, pix_fmt, reformatter)


def stored_view(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Upright RGB (H, W, 3) as the stored picture holds it, which a display rotation of
    ``rotation`` degrees counterclockwise shows upright (a view, not a copy)."""
    return np.rot90(rgb, k=-rotation // 90) if rotation else rgb


def stored_to_frame(rgb: np.ndarray, layout: PictureLayout, pix_fmt: str,
                    reformatter: VideoReformatter | None = None) -> av.VideoFrame:
    """``to_frame`` of RGB (H, W, 3) already in the stored orientation (``layout.rotation``
    is not applied): a whole picture, or a window of one (``converted_window``)."""
    rgb = np.ascontiguousarray(rgb)  # [HWC] stored orientation
    frame = av.VideoFrame.from_ndarray(rgb, format=layout.rgb_format)
    kwargs = {}
    if not av.video.format.VideoFormat(pix_fmt).is_rgb:
        full = layout.full_range and not layout.is_rgb
        kwargs = dict(
            dst_colorspace=SWS_MATRIX[layout.matrix],
            dst_color_range=AVCOL_RANGE_JPEG if full else AVCOL_RANGE_MPEG,
        )
    reformatter = reformatter or VideoReformatter()
    return reformatter.reformat(frame, format=pix_fmt, interpolation=EXACT_SWS_FLAGS, **kwargs)


def plane_view(frame: av.VideoFrame, i: int) -> np.ndarray:
    """Plane ``i`` of a planar picture as an (h, w) array without its line padding (a view)."""
    plane = frame.planes[i]
    dtype = np.uint16 if max(c.bits for c in frame.format.components) > 8 else np.uint8
    width = plane.line_size // np.dtype(dtype).itemsize
    return np.frombuffer(plane, dtype).reshape(-1, width)[: plane.height, : plane.width]


def changed_window(a: np.ndarray, b: np.ndarray) -> tuple[tuple[int, int], np.ndarray] | None:
    """Where two pictures (H, W, C) of one shape and dtype differ: the top-left corner (y, x) of
    the smallest window holding every differing pixel and its mask (h, w) bool, True where any
    channel differs; None where they are equal.

    A restored frame differs from its decoded picture only around its faces, so the rows are
    compared 8 bytes at a time and only the window is compared per pixel (per-pixel work over
    the whole picture cost 10 ms a frame at 720p)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"pictures differ in layout: {a.shape} {a.dtype} against {b.shape} {b.dtype}")
    rows_a, rows_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.flags.c_contiguous and b.flags.c_contiguous and rows_a.shape[1] * a.itemsize % 8 == 0:
        rows_a, rows_b = rows_a.view(np.uint64), rows_b.view(np.uint64)
    rows = np.flatnonzero((rows_a != rows_b).any(axis=1))
    if not len(rows):
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    band = a[y0:y1] != b[y0:y1]  # [h,W,C]
    cols = np.flatnonzero(band.any(axis=0).any(axis=1))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    window = band[:, x0:x1]
    mask = window[..., 0].copy()
    for c in range(1, window.shape[2]):
        mask |= window[..., c]
    return (y0, x0), mask


def stored_window(origin: tuple[int, int], mask: np.ndarray, upright: tuple[int, int],
                  rotation: int) -> tuple[tuple[int, int], np.ndarray]:
    """A window of an upright picture of shape ``upright`` (H, W) (its top-left ``origin``
    (y, x) and ``mask`` (h, w)) in the stored picture that a display rotation of ``rotation``
    degrees counterclockwise shows upright: the stored window's top-left and mask."""
    (y0, x0), (h, w), (height, width) = origin, mask.shape, upright
    turns = (-rotation // 90) % 4  # the stored picture is np.rot90(upright, turns)
    corner = {0: (y0, x0), 1: (width - x0 - w, y0), 2: (height - y0 - h, width - x0 - w),
              3: (x0, height - y0 - h)}[turns]
    return corner, np.rot90(mask, turns)


def converted_window(rgb: np.ndarray, origin: tuple[int, int], shape: tuple[int, int], layout: PictureLayout,
                     pix_fmt: str, reformatter: VideoReformatter | None = None
                     ) -> tuple[av.VideoFrame, tuple[int, int]]:
    """The stored picture's window at ``origin`` (y, x) of ``shape`` (h, w) in ``pix_fmt``,
    converted from the stored-orientation RGB ``rgb`` (H, W, 3), and the top-left pixel of what
    was converted: the window widened to even rows and columns, so that its subsampled chroma
    is the whole picture's. Its samples are the whole picture's converted (``stored_to_frame``),
    since the exact conversion samples chroma at a point and the picture's chroma grid is twice
    its luma's; a picture of odd height or width (whose chroma grid is not) is converted whole,
    at (0, 0). A 720p frame takes about 5 ms to convert, a face's window of 358² under 1 ms."""
    height, width = rgb.shape[:2]
    if height % 2 or width % 2:
        return stored_to_frame(rgb, layout, pix_fmt, reformatter), (0, 0)
    (y0, x0), (h, w) = origin, shape
    top, left = y0 - y0 % 2, x0 - x0 % 2
    bottom, right = y0 + h + (y0 + h) % 2, x0 + w + (x0 + w) % 2
    return stored_to_frame(rgb[top:bottom, left:right], layout, pix_fmt, reformatter), (top, left)


def splice_planes(target: av.VideoFrame, source: av.VideoFrame, changed: np.ndarray,
                  origin: tuple[int, int] = (0, 0), source_origin: tuple[int, int] = (0, 0)) -> None:
    """Copy ``source``'s samples into ``target`` (same planar format) wherever a pixel the
    sample covers is marked in ``changed`` (h, w) bool, the window of the stored picture whose
    top-left pixel is ``origin`` (y, x). ``source`` is the whole picture, or a window of it
    whose top-left pixel is ``source_origin`` (on the chroma grid: ``converted_window``) and
    that holds ``changed``'s."""
    y0, x0 = origin
    height, width = changed.shape
    for i in range(len(target.planes)):
        out, src = plane_view(target, i), plane_view(source, i)
        sy, sx = -(-target.height // out.shape[0]), -(-target.width // out.shape[1])
        top, left = y0 // sy, x0 // sx  # the samples covering the window
        bottom, right = -(-(y0 + height) // sy), -(-(x0 + width) // sx)
        mask = changed
        if (sy, sx) != (1, 1):
            padded = np.zeros(((bottom - top) * sy, (right - left) * sx), bool)
            padded[y0 - top * sy : y0 - top * sy + height, x0 - left * sx : x0 - left * sx + width] = changed
            grid = padded.reshape(bottom - top, sy, right - left, sx)
            mask = grid[:, 0, :, 0].copy()
            for dy in range(sy):
                for dx in range(sx):
                    mask |= grid[:, dy, :, dx]  # a sample is replaced where any pixel it covers is
        at_y, at_x = top - source_origin[0] // sy, left - source_origin[1] // sx
        np.copyto(out[top:bottom, left:right], src[at_y : at_y + bottom - top, at_x : at_x + right - left], where=mask)
