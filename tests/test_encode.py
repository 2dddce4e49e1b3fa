"""VideoWriter: a pass-through must give back the input, only the video re-encoded."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from gpen_video.io import colour
from gpen_video.io.decode import VideoReader, probe
from gpen_video.io.encode import VideoWriter, choose_pix_fmt, default_output_path
from gpen_video.errors import EncodeError, InputError, OutputError, StreamCopyError
from tests.clips import (
    corrupt_middle,
    ffprobe_streams,
    make_clip,
    psnr,
    read_frames,
    read_packets,
    small_disk,
    truncate,
)

FAST = dict(preset="ultrafast")


def _yuv(frame: av.VideoFrame) -> np.ndarray:
    """All samples of a planar frame, concatenated (padding excluded)."""
    parts = []
    for plane in frame.planes:
        dtype = np.uint16 if frame.format.components[0].bits > 8 else np.uint8
        width = plane.line_size // np.dtype(dtype).itemsize
        parts.append(np.frombuffer(plane, dtype).reshape(-1, width)[: plane.height, : plane.width]
                     .ravel())
    return np.concatenate(parts).astype(np.int64)


def _yuv_psnr(a: av.VideoFrame, b: av.VideoFrame) -> float:
    peak = (1 << a.format.components[0].bits) - 1
    mse = float(np.mean((_yuv(a) - _yuv(b)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _pass_through(src, dst, *, deinterlace="auto", edit=None, **kwargs):
    with VideoReader(src, deinterlace=deinterlace) as reader, \
            VideoWriter(dst, reader.info, **kwargs) as writer:
        for frame in reader.frames():
            writer.write(edit(frame) if edit else frame)
    return reader, writer


@pytest.mark.parametrize("ext", ["mp4", "mov", "mkv"])
def test_pass_through_keeps_everything_but_the_picture_bits(tmp_path, ext):
    src = make_clip(
        tmp_path / f"in.{ext}", frames=30, size=(64, 48), rate=Fraction(30000, 1001),
        rotation=90, audio_tracks=2, subtitle=True,
        metadata={"title": "Holiday 1998", "creation_time": "1998-07-01T10:00:00.000000Z"},
        stream_metadata={"language": "fra", "handler_name": "Camcorder"} if ext != "mkv"
        else {"language": "fra", "title": "Camcorder"},
        color={"range": 1, "primaries": 1, "trc": 1, "space": 1},
        sample_aspect_ratio=Fraction(16, 15),
    )
    dst = tmp_path / f"out.{ext}"
    _pass_through(src, dst, **FAST)

    a, b = probe(src), probe(dst)
    same = ["width", "height", "coded_width", "coded_height", "rotation", "time_base",
            "average_rate", "pix_fmt", "bit_depth", "color_range", "color_primaries",
            "color_trc", "colorspace", "sample_aspect_ratio", "interlaced"]
    assert {k: getattr(b, k) for k in same} == {k: getattr(a, k) for k in same}
    fa, fb = read_frames(src), read_frames(dst)
    assert len(fb) == len(fa) == 30
    assert [f.pts for f in fb] == [f.pts for f in fa]

    with av.open(str(src)) as ca, av.open(str(dst)) as cb:
        assert [s.type for s in cb.streams] == [s.type for s in ca.streams]
        assert [s.codec_context.name for s in cb.streams][1:] == \
            [s.codec_context.name for s in ca.streams][1:]
        assert cb.metadata["title"] == "Holiday 1998"
        if ext != "mkv":
            assert cb.metadata["creation_time"] == ca.metadata["creation_time"]
        for sa, sb in zip(ca.streams, cb.streams):
            assert sb.metadata.get("language") == sa.metadata.get("language")
            for key in ("handler_name", "title"):
                assert sb.metadata.get(key) == sa.metadata.get(key)
    pa, pb = read_packets(src), read_packets(dst)
    for index in (1, 2, 3):  # two audio tracks and the subtitles: identical bytes and times
        assert pb[index] == pa[index]
    assert min(_yuv_psnr(x, y) for x, y in zip(fa, fb)) > 40


def test_unchanged_frames_reach_the_encoder_exactly(tmp_path):
    """Lossless output: decoded output samples equal decoded input samples bit for bit."""
    src = make_clip(tmp_path / "in.mp4", frames=8, size=(96, 64), audio_tracks=0)
    dst = tmp_path / "out.mkv"
    _pass_through(src, dst, codec="ffv1")
    for x, y in zip(read_frames(src), read_frames(dst), strict=True):
        assert np.array_equal(_yuv(x), _yuv(y))


@pytest.mark.parametrize("splice", [True, False])
def test_edited_region_changes_and_the_rest_stays(tmp_path, splice):
    src = make_clip(tmp_path / "in.mkv", frames=4, size=(96, 64), codec="ffv1", audio_tracks=0)
    dst = tmp_path / "out.mkv"
    patch = (slice(16, 32), slice(32, 64))  # rows, columns; even so 4:2:0 chroma aligns

    def edit(frame):
        rgb = frame.rgb.copy()
        rgb[patch] = (200, 60, 40)
        return replace(frame, rgb=rgb)

    _pass_through(src, dst, codec="ffv1", edit=edit, splice=splice)
    for x, y in zip(read_frames(src), read_frames(dst), strict=True):
        ox, oy = x.to_ndarray(format="rgb24"), y.to_ndarray(format="rgb24")
        assert np.abs(oy[patch].astype(int) - (200, 60, 40)).max() <= 3
        outside = np.ones(ox.shape[:2], bool)
        outside[patch] = False
        luma_x, luma_y = _plane(x, 0), _plane(y, 0)
        # ffv1 input is ringing-free, so even the RGB reference path is exact outside
        assert np.array_equal(luma_x[outside], luma_y[outside])
        assert np.array_equal(_plane(x, 1)[:8], _plane(y, 1)[:8])  # chroma rows above the patch


def _whole_picture_splice(target: av.VideoFrame, source: av.VideoFrame, changed: np.ndarray) -> None:
    """The reference: every sample any of whose pixels is marked, over the whole picture."""
    for i in range(len(target.planes)):
        out, src = colour.plane_view(target, i), colour.plane_view(source, i)
        sy, sx = -(-changed.shape[0] // out.shape[0]), -(-changed.shape[1] // out.shape[1])
        for y, x in zip(*np.nonzero(changed)):
            out[y // sy, x // sx] = src[y // sy, x // sx]


def _random_picture(rng, pix_fmt: str, width: int, height: int) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, pix_fmt)
    for i in range(len(frame.planes)):
        view = colour.plane_view(frame, i)
        view[...] = rng.integers(0, 1 << (8 * view.itemsize - 6 * (view.itemsize - 1)), view.shape)
    return frame


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv422p", "yuv444p", "yuv420p10le"])
@pytest.mark.parametrize("width,height", [(64, 48), (37, 23)])
def test_the_changed_window_splices_what_the_whole_picture_would(pix_fmt, width, height):
    """``changed_window`` finds every differing pixel (rows of 8-byte multiples and not, 8 and
    16 bits), and splicing only its window gives the bytes of splicing the whole picture."""
    rng = np.random.default_rng(width + len(pix_fmt))
    dtype = np.uint16 if "10" in pix_fmt else np.uint8
    for trial in range(12):
        before = rng.integers(0, 256, (height, width, 3)).astype(dtype)
        after = before.copy()
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1, x1 = rng.integers(y0, height + 1), rng.integers(x0, width + 1)
        spots = rng.random((y1 - y0, x1 - x0, 3)) < 0.3
        after[y0:y1, x0:x1][spots] ^= 1  # some pixels differ in one channel only
        changed = np.any(after != before, axis=2)
        found = colour.changed_window(after, before)
        if not changed.any():
            assert found is None
            continue
        (top, left), mask = found
        rows, cols = np.nonzero(changed)
        assert (top, left, *mask.shape) == (rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert np.array_equal(mask, changed[top : top + mask.shape[0], left : left + mask.shape[1]])
        target, source = _random_picture(rng, pix_fmt, width, height), _random_picture(rng, pix_fmt, width, height)
        expected = _random_picture(rng, pix_fmt, width, height)
        for i in range(len(target.planes)):
            colour.plane_view(expected, i)[...] = colour.plane_view(target, i)
        _whole_picture_splice(expected, source, changed)
        colour.splice_planes(target, source, mask, (top, left))
        for i in range(len(target.planes)):
            assert np.array_equal(colour.plane_view(target, i), colour.plane_view(expected, i)), (trial, i)


@dataclass(frozen=True)
class _Layout:
    """A ``colour.PictureLayout``: limited-range BT.709 YUV, upright."""

    rgb_format: str
    matrix: int = 1
    full_range: bool = False
    is_rgb: bool = False
    rotation: int = 0


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv422p", "yuv444p", "yuv420p10le"])
@pytest.mark.parametrize("width,height", [(64, 48), (50, 36), (37, 23), (40, 23)])
def test_a_converted_window_splices_the_bytes_of_the_whole_converted_picture(pix_fmt, width, height):
    """Converting only the changed window (widened to the chroma grid) and splicing it gives
    the bytes that converting the whole picture and splicing it does; a picture of odd size
    is converted whole."""
    rng = np.random.default_rng(width * height + len(pix_fmt))
    deep = "10" in pix_fmt
    layout = _Layout("rgb48le" if deep else "rgb24")
    for trial in range(10):
        rgb = rng.integers(0, 1 << (16 if deep else 8), (height, width, 3)).astype(np.uint16 if deep else np.uint8)
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        shape = int(rng.integers(1, height - y0 + 1)), int(rng.integers(1, width - x0 + 1))
        changed = rng.random(shape) < 0.5
        changed[0, 0] = True
        expected, target = _random_picture(rng, pix_fmt, width, height), _random_picture(rng, pix_fmt, width, height)
        for i in range(len(target.planes)):
            colour.plane_view(expected, i)[...] = colour.plane_view(target, i)
        colour.splice_planes(expected, colour.stored_to_frame(rgb, layout, pix_fmt), changed, (y0, x0))
        window, at = colour.converted_window(rgb, (y0, x0), shape, layout, pix_fmt)
        colour.splice_planes(target, window, changed, (y0, x0), at)
        for i in range(len(target.planes)):
            assert np.array_equal(colour.plane_view(target, i), colour.plane_view(expected, i)), (trial, i)
        if width % 2 or height % 2:
            assert (at, window.height, window.width) == ((0, 0), height, width)
        else:  # the window on even rows and columns, not the picture
            y1, x1 = y0 + shape[0], x0 + shape[1]
            assert (at, window.height, window.width) == ((y0 - y0 % 2, x0 - x0 % 2), y1 + y1 % 2 - at[0], x1 + x1 % 2 - at[1])


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_a_window_lies_in_the_stored_picture_where_its_pixels_do(rotation):
    """``stored_window`` gives the window of the whole upright mask rotated into storage."""
    rng = np.random.default_rng(rotation)
    for _ in range(20):
        height, width = (int(v) for v in rng.integers(1, 30, 2))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        mask = rng.random((int(rng.integers(1, height - y0 + 1)), int(rng.integers(1, width - x0 + 1)))) < 0.5
        whole = np.zeros((height, width), bool)
        whole[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
        stored = np.rot90(whole, k=-rotation // 90)
        (top, left), window = colour.stored_window((y0, x0), mask, (height, width), rotation)
        expected = np.zeros_like(stored)
        expected[top : top + window.shape[0], left : left + window.shape[1]] = window
        assert np.array_equal(expected, stored)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_video_keeps_every_sample_outside_its_edit(tmp_path, rotation):
    """The window found in the upright picture is spliced where it lies in the stored one."""
    src = make_clip(tmp_path / "in.mkv", frames=3, size=(96, 64), codec="ffv1", rotation=rotation, audio_tracks=0)
    dst = tmp_path / "out.mkv"
    patch = (slice(10, 30), slice(20, 44))  # upright rows, columns

    def edit(frame):
        rgb = frame.rgb.copy()
        rgb[patch] = (200, 60, 40)
        return replace(frame, rgb=rgb)

    reader, _ = _pass_through(src, dst, codec="ffv1", edit=edit)
    assert reader.info.rotation == rotation
    for x, y in zip(read_frames(src), read_frames(dst), strict=True):
        upright = np.zeros((reader.info.height, reader.info.width), bool)
        upright[patch] = True
        stored = np.rot90(upright, k=-rotation // 90)
        assert stored.shape == (x.height, x.width)
        luma_x, luma_y = _plane(x, 0), _plane(y, 0)
        assert np.array_equal(luma_x[~stored], luma_y[~stored])
        assert (luma_x[stored] != luma_y[stored]).mean() > 0.9


def _plane(frame: av.VideoFrame, i: int) -> np.ndarray:
    plane = frame.planes[i]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: plane.height, : plane.width]


def test_splice_keeps_out_of_gamut_samples_that_rgb_would_clip(tmp_path):
    """Lossy sources ring near edges; RGB clips those samples, splicing keeps them."""
    src = make_clip(tmp_path / "in.mp4", frames=4, size=(96, 64), audio_tracks=0,
                    options={"crf": "35"})
    results = {}
    for splice in (True, False):
        dst = tmp_path / f"out-{splice}.mkv"
        _pass_through(src, dst, codec="ffv1", splice=splice)
        results[splice] = [
            int(np.abs(_yuv(x) - _yuv(y)).max()) for x, y in zip(read_frames(src), read_frames(dst))
        ]
    assert results[True] == [0, 0, 0, 0]
    assert max(results[False]) > 0  # the reference path really does lose those samples


@pytest.mark.parametrize(
    "codec,ext", [("h264", "mov"), ("h265", "mkv"), ("prores", "mov"), ("ffv1", "mkv")]
)
def test_ten_bit_422_stays_ten_bit_422(tmp_path, codec, ext):
    src = make_clip(tmp_path / f"in.{ext}", frames=4, size=(64, 48), pix_fmt="yuv422p10le",
                    audio_tracks=0)
    dst = tmp_path / f"out.{ext}"
    _pass_through(src, dst, codec=codec, **({} if codec in ("prores", "ffv1") else FAST))
    info = probe(dst)
    assert (info.pix_fmt, info.bit_depth) == ("yuv422p10le", 10)
    fa, fb = read_frames(src), read_frames(dst)
    assert [f.pts for f in fb] == [f.pts for f in fa]
    worst = min(_yuv_psnr(x, y) for x, y in zip(fa, fb))
    assert worst == math.inf if codec == "ffv1" else worst > 40


def test_variable_frame_rate_is_kept(tmp_path):
    pts = [0, 33, 66, 100, 180, 200, 290, 300]
    src = make_clip(tmp_path / "in.mkv", frames=8, vfr_pts=pts, time_base=Fraction(1, 1000))
    for ext in ("mkv", "mp4"):
        dst = tmp_path / f"out.{ext}"
        _pass_through(src, dst, **FAST)
        out = read_frames(dst)
        assert [f.pts * f.time_base for f in out] == [Fraction(p, 1000) for p in pts]


def test_deinterlaced_field_output_doubles_rate(tmp_path):
    src = make_clip(tmp_path / "in.mkv", frames=6, size=(64, 48), interlaced=True)
    dst = tmp_path / "out.mkv"
    reader, _ = _pass_through(src, dst, deinterlace="field", **FAST)
    out = read_frames(dst)
    assert len(out) == 12
    times = [f.pts * f.time_base for f in out]
    assert {b - a for a, b in zip(times, times[1:])} == {Fraction(1, 50)}
    assert not probe(dst).interlaced
    assert read_packets(dst)[1] == read_packets(src)[1]  # audio untouched


def test_damaged_input_gives_complete_output(tmp_path, caplog):
    src = make_clip(tmp_path / "in.mkv", frames=50, size=(96, 64))
    truncate(src, 0.6)
    dst = tmp_path / "out.mkv"
    with caplog.at_level(logging.WARNING):
        reader, writer = _pass_through(src, dst, **FAST)
    assert reader.damaged_frames > 0
    assert writer.frames_written == len(read_frames(dst)) == 50 - reader.damaged_frames
    assert read_packets(dst)[1] == read_packets(src)[1]

    src2 = make_clip(tmp_path / "in2.mp4", frames=50, size=(96, 64))
    corrupt_middle(src2, start=0.4, length=0.05)
    dst2 = tmp_path / "out2.mp4"
    reader, writer = _pass_through(src2, dst2, **FAST)
    assert len(read_frames(dst2)) == writer.frames_written == 50 - reader.damaged_frames


def test_stream_the_container_cannot_hold_warns_or_fails_strict(tmp_path, caplog):
    src = make_clip(tmp_path / "in.mkv", frames=5, subtitle=True)  # SubRip: not in MP4
    dst = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="gpen_video.io.encode"):
        _pass_through(src, dst, **FAST)
    assert any("subtitle stream #2 (srt)" in r.message for r in caplog.records)
    assert [s.type for s in av.open(str(dst)).streams] == ["video", "audio"]

    dst2 = tmp_path / "strict.mp4"
    with pytest.raises(StreamCopyError, match="srt"):
        VideoWriter(dst2, probe(src), strict=True).__enter__()
    assert not dst2.exists() and not list(tmp_path.glob(".strict.mp4.tmp-*"))


def test_existing_output_and_input_as_output_are_refused(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=3)
    existing = tmp_path / "out.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        VideoWriter(existing, probe(src))
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="is the input"):
        VideoWriter(src, probe(src), overwrite=True)
    link = tmp_path / "link.mp4"
    os.symlink(src, link)
    with pytest.raises(OutputError, match="is the input"):
        VideoWriter(link, probe(src), overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        VideoWriter(tmp_path / "nowhere" / "out.mp4", probe(src))
    _pass_through(src, existing, overwrite=True, **FAST)
    assert len(read_frames(existing)) == 3


def test_failure_removes_the_temporary_file(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=6)
    dst = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoReader(src) as reader, VideoWriter(dst, reader.info, **FAST) as writer:
            for frame in reader.frames():
                writer.write(frame)
                assert list(tmp_path.glob(".out.mp4.tmp-*"))  # writing goes to a temp file
                raise RuntimeError("boom")
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_wrong_frame_is_rejected(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=2)
    with VideoReader(src) as reader, VideoWriter(tmp_path / "o.mp4", reader.info, **FAST) as writer:
        frame = next(reader.frames())
        with pytest.raises(ValueError, match="must have shape"):
            writer.write(replace(frame, rgb=frame.rgb[:10]))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(replace(frame, rgb=frame.rgb.astype(np.uint16)))
        writer.write(frame)


@pytest.mark.parametrize(
    "source,encoder,expected",
    [
        ("yuv420p", "libx264", "yuv420p"),
        ("yuv422p10le", "libx264", "yuv422p10le"),
        ("yuv420p", "prores_ks", "yuv422p10le"),
        ("yuv444p", "prores_ks", "yuv444p10le"),
        ("gbrp", "libx264", "yuv444p"),
        ("yuv420p12le", "libx264", "yuv420p10le"),
        ("yuvj420p", "libx264", "yuv420p"),
        ("yuv411p", "libx265", "yuv422p"),
    ],
)
def test_choose_pix_fmt(source, encoder, expected):
    assert choose_pix_fmt(source, encoder) == expected


def test_default_output_path(tmp_path):
    assert default_output_path(tmp_path / "tape.final.mkv") == tmp_path / "tape.final.restored.mkv"


# --------------------------------------------------------------------------- odd sizes


@pytest.fixture(scope="module")
def odd_sources(tmp_path_factory):
    """641x361 4:2:0 clips that decode fine: FFV1 in Matroska and VP9 in WebM."""
    folder = tmp_path_factory.mktemp("odd")
    return {
        "ffv1": make_clip(folder / "odd.mkv", frames=4, size=(641, 361), codec="ffv1", audio_tracks=1),
        "vp9": make_clip(folder / "odd.webm", frames=4, size=(641, 361), codec="libvpx-vp9",
                         audio_tracks=1, audio_codec="libopus", options={"lossless": "1"}),
    }


@pytest.mark.parametrize(
    "source,codec,ext",
    [("ffv1", "h264", "mkv"), ("vp9", "h264", "mp4"), ("ffv1", "h265", "mp4"),
     ("vp9", "h265", "mkv"), ("ffv1", "prores", "mov"), ("ffv1", "ffv1", "mkv")],
)
def test_odd_size_keeps_the_exact_size_and_pixels(tmp_path, odd_sources, source, codec, ext):
    src = odd_sources[source]
    dst = tmp_path / f"out.{ext}"
    _pass_through(src, dst, codec=codec, **({} if codec in ("prores", "ffv1") else FAST))
    (video,) = [s for s in ffprobe_streams(dst) if s["codec_type"] == "video"]
    assert (video["width"], video["height"]) == (641, 361)
    assert video.get("sample_aspect_ratio", "1:1") in ("1:1", "0:1")
    with VideoReader(src) as a, VideoReader(dst) as b:
        pairs = list(zip(a.frames(), b.frames(), strict=True))
    assert len(pairs) == 4 and all(y.rgb.shape == (361, 641, 3) for _, y in pairs)
    assert all(x.pts * x.time_base == y.pts * y.time_base for x, y in pairs)
    if codec == "ffv1":
        for x, y in zip(read_frames(src), read_frames(dst), strict=True):
            assert np.array_equal(_yuv(x), _yuv(y))
    else:
        def rgb8(a):  # prores gives 10-bit, i.e. uint16 RGB
            return a if a.dtype == np.uint8 else np.round(a / 257).astype(np.uint8)

        assert min(psnr(rgb8(x.rgb), rgb8(y.rgb)) for x, y in pairs) > 40
    assert [p[2] for p in read_packets(dst)[1]] == [p[2] for p in read_packets(src)[1]]  # audio bytes


# --------------------------------------------------------------------------- colour tags

COLOUR_FIELDS = ("color_range", "color_space", "color_transfer", "color_primaries", "chroma_location")
BT709 = {"range": 1, "primaries": 1, "trc": 1, "space": 1}


def _colour_tags(path) -> dict[str, str | None]:
    (video,) = [s for s in ffprobe_streams(path) if s["codec_type"] == "video"]
    return {field: video.get(field) for field in COLOUR_FIELDS}


@pytest.mark.parametrize(
    "source,ext,codec,location",
    [("libx264", "mp4", "h264", "topleft"),  # in the H.264 VUI
     ("libx264", "mp4", "h264", "left"),
     ("libx264", "mkv", "h265", "center"),  # in the HEVC VUI
     ("ffv1", "mkv", "ffv1", "left"),  # in the Matroska track only: no decoder default to hide a loss
     ("ffv1", "mkv", "prores", "topleft")],
)
def test_every_colour_tag_is_kept_chroma_location_included(tmp_path, source, ext, codec, location):
    src = make_clip(tmp_path / f"in.{ext}", frames=4, codec=source, audio_tracks=0, color=BT709,
                    options={"chroma_sample_location": location})
    dst = tmp_path / f"out.{ext}"
    _pass_through(src, dst, codec=codec, **(FAST if codec in ("h264", "h265") else {}))
    want = _colour_tags(src)
    assert want == {"color_range": "tv", "color_space": "bt709", "color_transfer": "bt709",
                    "color_primaries": "bt709", "chroma_location": location}
    assert _colour_tags(dst) == want


@pytest.mark.parametrize("codec", ["ffv1", "prores"])
def test_untagged_chroma_location_stays_untagged(tmp_path, codec):
    src = make_clip(tmp_path / "in.mkv", frames=4, codec="ffv1", audio_tracks=0)
    dst = tmp_path / "out.mkv"
    _pass_through(src, dst, codec=codec)
    assert _colour_tags(src)["chroma_location"] is None
    assert _colour_tags(dst)["chroma_location"] is None


def test_chroma_location_reader_restores_the_log_levels(tmp_path):
    tagged = make_clip(tmp_path / "tagged.mkv", frames=2, codec="ffv1", audio_tracks=1,
                       options={"chroma_sample_location": "top"})
    plain = make_clip(tmp_path / "plain.mkv", frames=2, codec="ffv1", audio_tracks=1)
    before = av.logging.get_level()
    with av.open(str(tagged)) as container:
        assert colour.chroma_location(container, 0) == "top"
        assert colour.chroma_location(container, 1) is None  # the audio stream
    with av.open(str(plain)) as container:
        assert colour.chroma_location(container, 0) is None
    assert av.logging.get_level() == before
    assert probe(tagged).chroma_location == "top" and probe(plain).chroma_location is None  # read once, here


def test_prores_in_mov_says_that_centred_chroma_is_lost(tmp_path, caplog):
    src = make_clip(tmp_path / "in.mp4", frames=4, audio_tracks=0, color=BT709,
                    options={"chroma_sample_location": "center"})
    dst = tmp_path / "out.mov"
    with caplog.at_level(logging.WARNING, logger="gpen_video"):
        _pass_through(src, dst, codec="prores")
    assert _colour_tags(dst) == {**_colour_tags(src), "chroma_location": None}
    assert [r.getMessage() for r in caplog.records] == [
        (f"{dst}: ProRes in .mov has no place for the source's chroma location (center), so players "
         "will take chroma as co-sited with the left pixel; use .mkv to keep it")]


# --------------------------------------------------------------------------- timecode


def test_camera_timecode_and_reel_name_are_kept(tmp_path):
    src = make_clip(tmp_path / "A001C003.mov", frames=10, rate=Fraction(25),
                    stream_metadata={"timecode": "10:20:30:12", "reel_name": "A001"})
    streams = ffprobe_streams(src)
    tmcd = [s for s in streams if s.get("codec_tag_string") == "tmcd"]
    assert tmcd and tmcd[0]["tags"]["timecode"] == "10:20:30:12"  # a real tmcd track
    for ext in ("mov", "mp4", "mkv"):
        dst = tmp_path / f"out.{ext}"
        _pass_through(src, dst, **FAST)
        out = ffprobe_streams(dst)
        video = next(s for s in out if s["codec_type"] == "video")
        tags = {k.lower(): v for k, v in video.get("tags", {}).items()}
        assert tags["timecode"] == "10:20:30:12"
        if ext in ("mov", "mp4"):
            (track,) = [s for s in out if s.get("codec_tag_string") == "tmcd"]
            assert track["tags"]["timecode"] == "10:20:30:12"
            if ext == "mov":
                assert track["tags"]["reel_name"] == "A001"
        else:
            assert tags["reel_name"] == "A001"
        assert [p[2] for p in read_packets(dst)[1]] == [p[2] for p in read_packets(src)[1]]
        assert len(read_frames(dst)) == 10


# --------------------------------------------------------------------------- files and failures


def _noise_clip(path, frames=12, size=(320, 240)):
    rng = np.random.default_rng(0)
    return make_clip(path, frames=frames, size=size, codec="ffv1",
                     frame_fn=lambda i: rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_disk_full_mid_write_is_one_output_error_and_leaves_nothing(tmp_path):
    src = _noise_clip(tmp_path / "in.mkv")  # about 2.5 MB of incompressible FFV1
    before = _sha(src)
    with small_disk(tmp_path / "disk", "1m") as disk:
        earlier = disk / "out.mkv"
        earlier.write_bytes(b"an earlier restore")
        with pytest.raises(OutputError) as err:
            _pass_through(src, earlier, codec="ffv1", overwrite=True)
        message = str(err.value)
        assert "disk is full" in message and str(earlier) in message and "\n" not in message
        assert err.value.exit_code == 4
        assert sorted(p.name for p in disk.iterdir()) == ["out.mkv"]
        assert earlier.read_bytes() == b"an earlier restore"
    assert _sha(src) == before


@pytest.mark.parametrize("where", ["read-only", "special"])
def test_output_folder_that_takes_no_file_is_an_output_error(tmp_path, where):
    src = make_clip(tmp_path / "in.mp4", frames=2)
    if where == "special":
        _expect_folder_error(src, Path("/proc/self"))
    else:
        with small_disk(tmp_path / "ro", "1m", read_only=True) as folder:
            _expect_folder_error(src, folder)


def _expect_folder_error(src, folder):
    with pytest.raises(OutputError) as err:
        _pass_through(src, folder / "out.mp4", **FAST)
    assert f"output folder {folder}" in str(err.value) and err.value.exit_code == 4


def test_encoder_failure_names_its_cause_not_the_disk(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=2)
    with pytest.raises(EncodeError) as err:
        _pass_through(src, tmp_path / "out.mp4", preset="no-such-preset")
    message = str(err.value)
    assert "libx264" in message and "disk" not in message and "frame 0" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


class SignalAbort(BaseException):
    """What a CLI's SIGTERM handler might raise."""


@pytest.mark.parametrize("how", ["keyboard", "signal"])
def test_interrupt_while_writing_removes_the_temporary_file(tmp_path, how):
    src = make_clip(tmp_path / "in.mp4", frames=6)
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"earlier output")

    def handler(signum, frame):
        raise SignalAbort(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt if how == "keyboard" else SignalAbort):
            with VideoReader(src) as reader, VideoWriter(dst, reader.info, overwrite=True, **FAST) as writer:
                for frame in reader.frames():
                    writer.write(frame)
                    if frame.index == 2:
                        if how == "keyboard":
                            raise KeyboardInterrupt
                        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]
    assert dst.read_bytes() == b"earlier output"


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from gpen_video.io.decode import VideoReader
    from gpen_video.io.encode import VideoWriter
    with VideoReader(sys.argv[1]) as reader, VideoWriter(sys.argv[2], reader.info, preset="ultrafast") as writer:
        for frame in reader.frames():
            writer.write(frame)
            print("wrote", frame.index, flush=True)
            time.sleep(30)
""")


def test_temporary_file_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=4)
    dst = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(src), str(dst)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout.readline().startswith("wrote 0")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.stdout.close()
    (left,) = tmp_path.glob(".out.mp4.tmp-*")
    assert str(proc.pid) in left.name
    _pass_through(src, dst, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]
    assert len(read_frames(dst)) == 4


def test_output_gets_the_users_normal_permissions(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=2)
    old = os.umask(0o022)
    try:
        _pass_through(src, tmp_path / "out.mp4", **FAST)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.mp4").stat().st_mode) == 0o644


@pytest.mark.parametrize("kind", ["fifo", "dev-null"])
def test_pipes_and_devices_are_named_as_such(tmp_path, kind):
    path = Path("/dev/null")
    if kind == "fifo":
        path = tmp_path / "in.mp4"
        os.mkfifo(path)
    with pytest.raises(InputError) as err:
        VideoReader(path)
    assert ("is a pipe" if kind == "fifo" else "character device") in str(err.value)
    assert "empty" not in str(err.value)
