"""VideoReader / probe on synthesized clips: timing, orientation, colour, depth, damage."""

from __future__ import annotations

import logging
from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
import pytest

from gpen_video.io.colour import to_rgb, to_rgb_reference
from gpen_video.io.decode import SourcePicture, VideoReader, probe
from gpen_video.errors import DecodeError, InputError
from tests.clips import corrupt_middle, make_clip, pattern, read_frames, truncate


@pytest.mark.parametrize("ext", ["mp4", "mov", "mkv"])
def test_probe_and_frames_match_raw_decode(tmp_path, ext):
    path = make_clip(tmp_path / f"in.{ext}", frames=10, size=(64, 48), rate=Fraction(30000, 1001),
                     color={"range": 1, "primaries": 1, "trc": 1, "space": 1},
                     sample_aspect_ratio=Fraction(4, 3))
    info = probe(path)
    raw = read_frames(path)
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert info.average_rate == Fraction(30000, 1001)
    assert info.pix_fmt == "yuv420p" and info.bit_depth == 8 and not info.interlaced
    assert (info.color_range, info.color_primaries, info.color_trc, info.colorspace) == (1, 1, 1, 1)
    assert info.sample_aspect_ratio == Fraction(4, 3)
    if ext != "mkv":
        assert info.frame_count == 10
    with VideoReader(path) as reader:
        frames = list(reader.frames())
    assert [f.index for f in frames] == list(range(10))
    assert [f.pts for f in frames] == [f.pts for f in raw]
    assert all(f.time_base == raw[0].time_base == info.time_base for f in frames)
    assert frames[0].rgb.dtype == np.uint8 and frames[0].rgb.shape == (48, 64, 3)
    assert reader.damaged_frames == 0


def test_reader_can_run_twice(tmp_path):
    path = make_clip(tmp_path / "in.mkv", frames=6)
    reader = VideoReader(path)
    first = [f.rgb for f in reader.frames()]
    second = [f.rgb for f in reader.frames()]
    with VideoReader(path) as other:
        third = [f.rgb for f in other.frames()]
    assert len(first) == 6
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(first, second, third))


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_gives_upright_frames(tmp_path, rotation):
    path = make_clip(tmp_path / "in.mp4", frames=3, size=(64, 48), rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    assert (info.coded_width, info.coded_height) == (64, 48)
    assert (info.width, info.height) == ((48, 64) if rotation in (90, 270) else (64, 48))
    stored = to_rgb(read_frames(path)[0], replace(info, rotation=0))
    with VideoReader(path) as reader:
        upright = next(reader.frames()).rgb
    assert upright.shape == (info.height, info.width, 3)
    # FFmpeg's rotation is counterclockwise: a stored corner moves a quarter turn per 90 degrees.
    marker = np.abs(upright.astype(int) - (77, 77, 179)).max(axis=2) < 16  # stored bottom-left
    ys, xs = np.nonzero(marker)
    corner = (ys.mean() > info.height / 2, xs.mean() > info.width / 2)  # (bottom?, right?)
    assert corner == {90: (True, True), 180: (False, True), 270: (False, False)}[rotation]
    assert np.array_equal(np.rot90(stored, k=rotation // 90), upright)


@pytest.mark.parametrize("rotation,pix_fmt", [(0, "yuv420p"), (90, "yuv420p"), (270, "yuv420p10le")])
def test_small_pictures_come_upright_from_the_samples_without_full_rgb(tmp_path, rotation, pix_fmt):
    """``SourcePicture.scaled`` (what detection and scene cuts see) is the upright frame
    area-downscaled, uint8 whatever the depth, and makes no full-size RGB."""
    import cv2

    from gpen_video.faces.pictures import to_uint8

    path = make_clip(tmp_path / "in.mp4", frames=2, size=(128, 96), rotation=rotation, pix_fmt=pix_fmt)
    with VideoReader(path) as reader:
        frame = next(reader.frames())
    height, width = frame.shape[:2]
    small = frame.source.scaled(width // 4, height // 4)
    assert not frame.rgb_made and small.shape == (height // 4, width // 4, 3) and small.dtype == np.uint8
    expected = cv2.resize(to_uint8(frame.rgb), (width // 4, height // 4), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - expected).mean() < 5  # chroma is upsampled differently


def test_ten_bit_422_is_uint16_full_scale(tmp_path):
    path = make_clip(tmp_path / "in.mov", frames=3, pix_fmt="yuv422p10le", audio_tracks=0)
    info = probe(path)
    assert (info.pix_fmt, info.bit_depth) == ("yuv422p10le", 10)
    with VideoReader(path) as reader:
        rgb = next(reader.frames()).rgb
    assert rgb.dtype == np.uint16 and rgb.max() > 40000
    assert len(np.unique(rgb[..., 1])) > 256  # more than 8 bits of precision survive
    expected = pattern(0, 64, 48, high_bit=True).astype(np.float64)
    assert np.abs(rgb - expected).mean() < 0.02 * 65535


@pytest.mark.parametrize(
    "color", [{"space": 1, "range": 1}, {"space": 6, "range": 1}, {"space": 5, "range": 2}]
)
def test_colour_matrix_and_range_agree_with_reference(tmp_path, color):
    path = make_clip(tmp_path / "in.mkv", frames=2, pix_fmt="yuv444p", color=color, audio_tracks=0)
    info = probe(path)
    assert info.full_range == (color["range"] == 2)
    frame = read_frames(path)[1]
    fast, ref = to_rgb(frame, info), to_rgb_reference(frame, info)
    assert np.abs(fast.astype(int) - ref).max() <= 2
    # the right matrix brings back the synthesized RGB closely; a wrong one would not
    assert np.abs(fast.astype(int) - pattern(1, 64, 48)).mean() < 1.5


def test_interlaced_auto_frame_and_field(tmp_path):
    path = make_clip(tmp_path / "in.mkv", frames=8, size=(128, 96), interlaced=True, audio_tracks=0)
    info = probe(path)
    assert info.interlaced and info.field_order == "bb"
    raw = read_frames(path)
    with VideoReader(path, deinterlace="off") as reader:
        woven = list(reader.frames())
    with VideoReader(path) as reader:
        auto = list(reader.frames())
        assert not reader.info.interlaced
    with VideoReader(path, deinterlace="field") as reader:
        fields = list(reader.frames())
        field_info = reader.info
    assert [f.pts for f in woven] == [f.pts for f in auto] == [f.pts for f in raw]
    # make_clip's field k shows pattern(k); bwdif keeps each frame's first field and
    # interpolates the other, so frame i moves towards pattern(2i) and field k to pattern(k).
    def error(frames, field_of):
        return np.mean([np.abs(f.rgb.astype(int) - pattern(field_of(f.index), 128, 96)).mean()
                        for f in frames])

    assert error(auto, lambda i: 2 * i) < 0.85 * error(woven, lambda i: 2 * i)
    assert error(auto, lambda i: 2 * i) < 0.85 * error(auto, lambda i: 2 * i + 1)
    assert error(fields, lambda k: k) < 0.6 * min(error(fields, lambda k: k + 1),
                                                  error(fields, lambda k: k - 1))
    assert len(fields) == 2 * len(raw)
    assert field_info.time_base == info.time_base / 2
    assert field_info.average_rate == 2 * info.average_rate
    times = np.array([f.pts * f.time_base for f in fields], dtype=object)
    steps = set(times[1:] - times[:-1])
    assert steps == {Fraction(1, 50)} and times[0] == 0


def test_progressive_input_is_left_alone_in_auto(tmp_path):
    path = make_clip(tmp_path / "in.mkv", frames=4, audio_tracks=0)
    with VideoReader(path) as reader, VideoReader(path, deinterlace="off") as off:
        auto, plain = list(reader.frames()), list(off.frames())
    assert len(auto) == len(plain) == 4
    for a, b in zip(auto, plain):
        assert np.array_equal(a.rgb, b.rgb) and a.pts == b.pts


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_odd_frame_size(tmp_path, pix_fmt):
    codec = "ffv1" if pix_fmt == "yuv420p" else "libx264"  # x264 wants even 4:2:0 sizes
    path = make_clip(tmp_path / "in.mkv", frames=3, size=(321, 239), pix_fmt=pix_fmt,
                     codec=codec, audio_tracks=0)
    with VideoReader(path) as reader:
        frames = list(reader.frames())
    assert [f.rgb.shape for f in frames] == [(239, 321, 3)] * 3
    assert np.abs(frames[2].rgb.astype(int) - pattern(2, 321, 239)).mean() < 3


def test_variable_frame_rate_pts_kept(tmp_path):
    pts = [0, 40, 80, 100, 180, 200, 290]
    path = make_clip(tmp_path / "in.mkv", frames=7, vfr_pts=pts, time_base=Fraction(1, 1000))
    with VideoReader(path) as reader:
        assert [f.pts for f in reader.frames()] == pts


@pytest.mark.parametrize("case", ["missing", "empty", "not_media", "no_video", "directory"])
def test_bad_inputs_raise_input_error(tmp_path, case):
    path = tmp_path / "in.mp4"
    if case == "empty":
        path.touch()
    elif case == "not_media":
        path.write_text("this is a shopping list, not a video\n" * 50)
    elif case == "no_video":
        path = tmp_path / "in.m4a"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("aac", rate=48000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 48000, 0
            out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    elif case == "directory":
        path = tmp_path
    with pytest.raises(InputError) as err:
        probe(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError):
        VideoReader(path)


def test_truncated_file_keeps_going_and_counts(tmp_path, caplog):
    path = make_clip(tmp_path / "in.mkv", frames=50, size=(96, 64))
    truncate(path, 0.6)
    with caplog.at_level(logging.WARNING, logger="gpen_video.io.decode"):
        with VideoReader(path) as reader:
            frames = list(reader.frames())
    assert 0 < len(frames) < 50
    assert reader.damaged_frames == 50 - len(frames)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{reader.damaged_frames} of about 50" in warnings[0].message


def avi_with_gaps(path, pts: list[int], size: tuple[int, int] = (64, 48)):
    """An MPEG-4 AVI whose pictures are at ``pts`` (frames at 25 fps): the muxer fills each
    gap with an empty chunk, which the file declares as a frame."""
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in pts:
            frame = av.VideoFrame.from_ndarray(pattern(i, w, h), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_avi_gaps_are_repeated_pictures_not_lost_frames(tmp_path, caplog):
    path = avi_with_gaps(tmp_path / "gaps.avi", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert probe(path).frame_count == 10  # the empty chunk at 1 is declared as a frame
    with caplog.at_level(logging.WARNING, logger="gpen_video.io.decode"):
        with VideoReader(path) as reader:
            frames = list(reader.frames())
    assert [f.pts for f in frames] == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert reader.damaged_frames == 0 and not caplog.records


def test_a_truncated_avi_still_counts_its_lost_frames(tmp_path):
    path = avi_with_gaps(tmp_path / "cut.avi", [0, *range(2, 50)], size=(96, 64))
    truncate(path, 0.6)
    with VideoReader(path) as reader:
        frames = list(reader.frames())
    assert 0 < len(frames) < 49
    assert reader.damaged_frames == 50 - (frames[-1].pts + 1) > 0  # the frames after the last one read


@pytest.mark.parametrize(("suffix", "packet"), [(".ts", 188), (".m2ts", 192)])
def test_cut_transport_stream_says_it_ends_early(tmp_path, caplog, suffix, packet):
    """MPEG-TS records no length: a file that ends inside a transport packet (188 bytes; 192
    in Blu-ray's .m2ts) was cut, and one warning says so; the same bytes cut at a packet
    boundary look like a shorter stream."""
    whole = make_clip(tmp_path / f"whole{suffix}", frames=24, size=(96, 64))
    data = whole.read_bytes()
    assert len(data) % packet == 0
    boundary = (len(data) // 2) // packet * packet
    seen = {}
    for name, size in [("mid-packet", boundary + 100), ("boundary", boundary), ("whole", len(data))]:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data[:size])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpen_video.io.decode"):
            with VideoReader(path) as reader:
                count = len(list(reader.frames()))
        seen[name] = (count, [r.message for r in caplog.records if r.levelno == logging.WARNING])
    count, warnings = seen["mid-packet"]
    assert 0 < count < 24 and len(warnings) == 1
    assert "cut short" in warnings[0] and f"mid-packet{suffix}" in warnings[0]
    assert seen["boundary"][0] == count  # the same frames; a partial last frame may be concealed
    assert not any("cut short" in w for w in seen["boundary"][1])
    assert seen["whole"] == (24, [])


def test_corrupt_middle_keeps_going_and_counts(tmp_path, caplog):
    path = make_clip(tmp_path / "in.mp4", frames=50, size=(96, 64))
    corrupt_middle(path, start=0.4, length=0.05)
    with caplog.at_level(logging.WARNING, logger="gpen_video.io.decode"):
        with VideoReader(path) as reader:
            frames = list(reader.frames())
    assert reader.damaged_frames + reader.concealed_frames > 0
    assert len(frames) == 50 - reader.damaged_frames
    pts = [f.pts for f in frames]
    assert pts == sorted(set(pts)) and set(pts) <= {i * 512 for i in range(50)}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0].message


def test_nothing_decodable_raises_decode_error(tmp_path):
    path = make_clip(tmp_path / "in.mp4", frames=30, size=(96, 64), audio_tracks=0)
    data = bytearray(path.read_bytes())
    start, end = data.find(b"mdat") + 4, data.find(b"moov") - 4  # every sample, not the index
    data[start:end] = np.random.default_rng(1).integers(0, 256, end - start, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises((DecodeError, InputError)) as err:
        with VideoReader(path) as reader:
            list(reader.frames())
    assert str(path) in str(err.value)


@pytest.mark.parametrize("ext", ["mkv", "webm"])
def test_variable_frame_rate_without_frame_count_is_not_called_damaged(tmp_path, ext, caplog):
    """A pause makes duration x average rate far larger than the frame count."""
    pts = [0, 40, 80, 2000, 2040, 2080, 3000]
    codec = dict(codec="libvpx-vp9", audio_codec="libopus") if ext == "webm" else {}
    path = make_clip(tmp_path / f"in.{ext}", frames=7, vfr_pts=pts, time_base=Fraction(1, 1000), **codec)
    info = probe(path)
    assert info.frame_count is None and info.duration * info.average_rate > 3 * 7
    with caplog.at_level(logging.WARNING, logger="gpen_video.io.decode"):
        with VideoReader(path) as reader:
            frames = list(reader.frames())
    assert [f.pts for f in frames] == pts
    assert reader.damaged_frames == 0 and not caplog.records


@pytest.mark.parametrize("mode,count", [("frame", 8), ("field", 16), ("off", 8)])
def test_frames_without_timestamps_get_a_steady_timeline(tmp_path, mode, count):
    """A raw H.264 stream carries no timestamps: bwdif output then has no pts either."""
    path = make_clip(tmp_path / "in.h264", frames=8, interlaced=True, audio_tracks=0)
    assert all(f.pts is None for f in read_frames(path))
    with VideoReader(path, deinterlace=mode) as reader:
        frames = list(reader.frames())
        info = reader.info
    assert len(frames) == count
    times = [f.pts * f.time_base for f in frames]
    assert times[0] == 0 and set(np.diff(np.array(times, dtype=object))) == {1 / info.average_rate}


def test_frames_carry_their_decoded_picture(tmp_path):
    """Each frame brings the decoder's own picture with it (``Frame.source``), which the writer
    passes through where the RGB is unchanged; derived frames keep it."""
    path = make_clip(tmp_path / "in.mp4", frames=5, size=(64, 48), audio_tracks=0)
    with VideoReader(path) as reader:
        frames = list(reader.frames())
    assert len(frames) == 5
    for frame in frames:
        assert isinstance(frame.source, SourcePicture) and frame.source.rgb is frame.rgb
        assert (frame.source.picture.width, frame.source.picture.height) == (64, 48)
        assert frame.source.picture.format.name == "yuv420p"
    derived = replace(frames[0], rgb=frames[0].rgb.copy())
    assert derived.source is frames[0].source
