"""Segments: planned by time, encoded alone, joined by stream copy into the same video a
one-segment render gives (frames, pts, valid dts, the other streams' packets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from gpen_video.errors import EncodeError, OutputError
from gpen_video.io.colour import plane_view
from gpen_video.io.decode import VideoIndex, VideoReader, probe
from gpen_video.io.encode import VideoWriter
from gpen_video.records import Frame
from gpen_video.jobs.segments import SEGMENT_SUFFIX, Segment, SegmentPlan, assemble, plan_segments
from tests.clips import ffprobe_streams, make_clip, read_packets

OUTPUT_SUFFIX = {"h264": ".mp4", "h265": ".mp4", "prores": ".mov", "ffv1": ".mkv"}


def _vfr_pts(n: int, seed: int = 3) -> list[int]:
    steps = np.random.default_rng(seed).choice([10, 33, 40, 80, 120], n - 1)
    return [0, *np.cumsum(steps).astype(int).tolist()]


def _read(path: Path) -> tuple[object, list[Frame]]:
    with VideoReader(path) as reader:
        return reader.info, list(reader.frames())


def _encode(folder: Path, info, frames: list[Frame], segments: list[Segment], codec: str, **kw) -> list[Path]:
    paths = []
    for segment in segments:
        path = folder / f"segment-{segment.index}{SEGMENT_SUFFIX[codec]}"
        with VideoWriter(path, info, codec=codec, copy_streams=False, overwrite=True, **kw) as writer:
            for frame in frames[segment.first_frame: segment.last_frame + 1]:
                writer.write(frame)
        paths.append(path)
    return paths


def _video_packets(path: Path) -> tuple[Fraction, list[av.Packet]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.time_base, [p for p in container.demux(stream) if p.size]


def _pictures(path: Path) -> list[tuple[int, bytes]]:
    """(pts in seconds × 10⁶, every sample) of each decoded picture, in presentation order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(round(f.pts * stream.time_base * 10**6),
                 b"".join(plane_view(f, i).tobytes() for i in range(len(f.planes))))
                for f in container.decode(stream)]


def _ffprobe_video_packets(path: Path) -> list[dict]:
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe is not installed (apt-get install ffmpeg)")
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,dts,flags",
         "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["packets"]


def _ffprobe_decodes(path: Path) -> int:
    """Frames ffmpeg's own decoder reads, failing on any decoding error message."""
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe is not installed (apt-get install ffmpeg)")
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
        capture_output=True, text=True, check=True)
    assert done.stderr == ""
    return int(json.loads(done.stdout)["streams"][0]["nb_read_frames"])


# --- planning ---


@pytest.mark.parametrize("pts, time_base, seconds, min_frames, expected", [
    (range(2000), Fraction(1, 25), 30, 16, [(0, 749), (750, 1499), (1500, 1999)]),
    (range(100), Fraction(1, 25), 30, 16, [(0, 99)]),                    # short clip: one
    (range(1000), Fraction(1, 25), 30, 16, [(0, 999)]),                  # 10 s tail merged
    (range(1126), Fraction(1, 25), 30, 16, [(0, 749), (750, 1125)]),     # 15 s tail kept
    (range(2500), Fraction(1001, 30000), 30, 16, [(0, 899), (900, 1798), (1799, 2499)]),
    ([0, 10, 20, 1000, 1010, 2500, 2510, 2520, 3100], Fraction(1, 1000), 1, 1,
     [(0, 2), (3, 4), (5, 8)]),                                          # VFR: by time
    ([0, 10, 20, 1000, 1010, 2500, 2510, 2520, 3100], Fraction(1, 1000), 1, 3,
     [(0, 2), (3, 8)]),                                                  # too short: joins next
    (range(50), Fraction(1, 25), 0.2, 16, [(0, 19), (20, 49)]),         # at least 16 frames
])
def test_plan_segments(pts, time_base, seconds, min_frames, expected):
    segments = plan_segments(pts, time_base, seconds, min_frames=min_frames)
    assert [(s.first_frame, s.last_frame) for s in segments] == expected
    assert [s.index for s in segments] == list(range(len(expected)))
    assert [s.start_pts for s in segments] == [list(pts)[a] for a, _ in expected]


def test_plan_covers_every_frame_once_and_cuts_by_time():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 3000))
        tb = Fraction(1, int(rng.choice([25, 1000, 90000])))
        pts = np.cumsum(rng.integers(1, 5000, n)) - int(rng.integers(0, 10**6))
        seconds = float(rng.uniform(0.05, 40))
        length = Fraction(seconds).limit_denominator(1_000_000) / tb
        segments = plan_segments(pts, tb, seconds, min_frames=8)
        covered = [i for s in segments for i in range(s.first_frame, s.last_frame + 1)]
        assert covered == list(range(n))
        if len(segments) > 1:
            assert min(s.frame_count for s in segments) >= 8
        for s in segments[1:]:  # each starts at the first frame at or after some k × length
            k = (pts[s.first_frame] - pts[0]) // length
            assert k >= 1 and pts[s.first_frame - 1] - pts[0] < k * length


@pytest.mark.parametrize("pts, seconds, error", [
    ([], 30, "non-empty"),
    ([0, 5, 5], 30, "strictly increasing; frame 2"),
    ([0, 5, 3], 30, "strictly increasing"),
    ([0, 1], 0, "segment_seconds must be > 0"),
])
def test_plan_segments_rejects(pts, seconds, error):
    with pytest.raises(ValueError, match=error):
        plan_segments(pts, Fraction(1, 25), seconds)


def test_segment_plan_maps_frames_by_time(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=60, vfr_pts=_vfr_pts(60), audio_tracks=0)
    info, frames = _read(src)
    with VideoReader(src) as reader:
        layout = SegmentPlan.of(reader.index(), reader.info, reader.source_info, 0.8)
    expected = plan_segments([f.pts for f in frames], info.time_base, 0.8)
    assert layout.first_frames == tuple(s.first_frame for s in expected)
    assert layout.frame_counts == tuple(s.frame_count for s in expected) and layout.total_frames == 60
    assert [layout.segment_of(f) for f in frames] == [s.index for s in expected for _ in range(s.frame_count)]
    last = expected[-1]
    assert layout.describe(len(expected) - 1) == (f"segment {len(expected)} of {len(expected)} "
                                                  f"(frames {last.first_frame}-{last.last_frame})")
    with VideoReader(src) as reader:
        assert len(SegmentPlan.of(reader.index(), reader.info, reader.source_info, 30)) == 1
    with pytest.raises(ValueError, match="first <= last"):
        Segment(0, 5, 4, 0)


def test_segment_plan_of_fields_counts_two_frames_each(tmp_path):
    src = make_clip(tmp_path / "in.mkv", frames=40, interlaced=True, audio_tracks=0)
    with VideoReader(src, deinterlace="field") as reader:
        layout = SegmentPlan.of(reader.index(), reader.info, reader.source_info, 0.8)
        frames = list(reader.frames())
    assert len(frames) == 80 and layout.total_frames == 80 and len(layout) > 1
    counts = np.bincount([layout.segment_of(f) for f in frames])
    assert tuple(counts) == layout.frame_counts


# --- the decode side ---


def _rgb_tail(reader: VideoReader, start: Frame, index: int) -> list[tuple[int, int, bytes]]:
    return [(f.index, f.pts, f.rgb.tobytes()) for f in reader.frames(start.pts, start_index=index)]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".ts"])
def test_frames_from_a_pts_start_at_the_keyframe_before(tmp_path, suffix):
    """Seeking to the keyframe at or before a frame and decoding forward gives exactly the
    frames (pixels and pts) a decode from the start gives, B-frames and VFR included."""
    src = make_clip(tmp_path / f"in{suffix}", frames=60, vfr_pts=_vfr_pts(60), audio_tracks=0,
                    options={"preset": "medium", "x264-params": "keyint=10:min-keyint=10:scenecut=0"})
    index = VideoIndex.scan(src)
    with VideoReader(src) as reader:
        full = [(f.index, f.pts, f.rgb.tobytes()) for f in reader.frames()]
        assert index.pts.tolist() == [p for _, p, _ in full]
        assert index.keyframes.tolist() == list(range(0, 60, 10))
        assert index.keyframe_at_or_before(25) == 20 and index.keyframe_at_or_before(9) == 0
        frames = list(reader.frames())
        for first in (25, 0, 40, 10, 59):
            assert _rgb_tail(reader, frames[first], first) == full[first:]
        stop = [f.index for f in reader.frames(frames[25].pts, start_index=25, stop_pts=frames[35].pts)]
        assert stop == list(range(25, 35))
        assert reader.damaged_frames == 0


def test_frames_from_a_pts_are_the_same_when_deinterlacing(tmp_path):
    """bwdif looks one frame back: starting one frame earlier gives the same pixels."""
    src = make_clip(tmp_path / "in.mkv", frames=40, interlaced=True, audio_tracks=0,
                    options={"x264-params": "keyint=8:min-keyint=8:scenecut=0"})
    for mode in ("auto", "field"):
        with VideoReader(src, deinterlace=mode) as reader:
            assert reader.info.interlaced is False
            frames = list(reader.frames())
            full = [(f.index, f.pts, f.rgb.tobytes()) for f in frames]
            for first in (16, 17, 33) if mode == "auto" else (32, 33, 50):
                assert _rgb_tail(reader, frames[first], first) == full[first:], (mode, first)


def test_seek_points_step_back_through_keyframes():
    index = VideoIndex(np.arange(200), np.arange(0, 200, 10), Fraction(1, 25), 0)
    assert index.seek_points(75) == [70, 60, 40, 0]
    assert index.seek_points(199) == [190, 180, 160, 120, 40, 0]
    assert index.seek_points(9) == [0]
    assert VideoIndex(np.arange(5), np.zeros(0, np.int64), Fraction(1, 25), 0).seek_points(4) == [0]


# --- encoding and assembly ---


@pytest.mark.parametrize("codec", ["h264", "h265", "prores", "ffv1"])
def test_segments_assemble_to_the_one_segment_render(tmp_path, codec):
    """A VFR clip with audio and subtitles in three or more segments: every frame once with
    its pts, valid dts (the dts one encode of all frames has), the other streams' packets as
    the source's, and pictures as decoded from the segment files."""
    container = ".mov" if codec == "prores" else ".mkv" if codec == "ffv1" else ".mp4"
    src = make_clip(tmp_path / f"in{container}", frames=60, vfr_pts=_vfr_pts(60), subtitle=True,
                    options={"preset": "medium"})
    info, frames = _read(src)
    segments = plan_segments([f.pts for f in frames], info.time_base, 0.8, min_frames=8)
    assert len(segments) >= 3
    parts = _encode(tmp_path, info, frames, segments, codec)
    (tmp_path / "one").mkdir()
    (one,) = _encode(tmp_path / "one", info, frames, [Segment(0, 0, 59, frames[0].pts)], codec)
    out, whole = tmp_path / f"out{container}", tmp_path / f"whole{container}"
    assert assemble(probe(src), parts, out) == 60
    assert assemble(probe(src), [one], whole) == 60

    tb, packets = _video_packets(out)
    _, reference = _video_packets(whole)
    assert sorted(Fraction(p.pts) * tb / info.time_base for p in packets) == [f.pts for f in frames]
    if container != ".mkv":  # Matroska stores no dts
        dts = [p.dts for p in packets]
        assert all(a < b for a, b in pairwise(dts))
        assert all(p.dts <= p.pts for p in packets)
        assert dts == [p.dts for p in reference]
    starts = {round(frames[s.first_frame].pts * info.time_base, 6) for s in segments}
    keyframes = {round(p.pts * tb, 6) for p in packets if p.is_keyframe}
    assert starts <= keyframes

    source, segmented, single = read_packets(src), read_packets(out), read_packets(whole)
    video = info.stream_index
    assert set(segmented) == set(single) == set(source)
    for index in source:
        if index != video:
            assert segmented[index] == single[index]
            if container != ".mkv":
                assert segmented[index] == source[index]

    pictures = _pictures(out)
    assert pictures == [p for part in parts for p in _pictures(part)]
    if codec == "ffv1":
        assert pictures == _pictures(whole)
    assert _ffprobe_decodes(out) == 60


def test_vfr_join_gets_the_dts_of_one_encode(tmp_path):
    """Dense frames before a join, sparse after: the second segment's own leading dts fall
    before the first segment's last dts; assembled, they are what one encode gives."""
    pts = [i * 10 for i in range(40)] + [400 + i * 300 for i in range(40)]
    src = make_clip(tmp_path / "in.mp4", frames=80, vfr_pts=pts, audio_tracks=0)
    info, frames = _read(src)
    segments = plan_segments([f.pts for f in frames], info.time_base, 0.4, min_frames=8)
    assert [s.first_frame for s in segments][:2] == [0, 40]
    parts = _encode(tmp_path, info, frames, segments, "h264")
    naive = [p.dts for part in parts for p in _video_packets(part)[1]]
    assert any(a >= b for a, b in pairwise(naive)), "a plain concatenation would be invalid"

    (tmp_path / "one").mkdir()
    (one,) = _encode(tmp_path / "one", info, frames, [Segment(0, 0, 79, frames[0].pts)], "h264")
    assemble(probe(src), parts, tmp_path / "out.mp4")
    assemble(probe(src), [one], tmp_path / "whole.mp4")
    probed = _ffprobe_video_packets(tmp_path / "out.mp4")
    dts = [int(p["dts"]) for p in probed]
    assert all(a < b for a, b in pairwise(dts))
    assert all(int(p["dts"]) <= int(p["pts"]) for p in probed)
    assert dts == [int(p["dts"]) for p in _ffprobe_video_packets(tmp_path / "whole.mp4")]
    tb = _video_packets(tmp_path / "out.mp4")[0]
    assert sorted(Fraction(int(p["pts"])) * tb / info.time_base for p in probed) == [f.pts for f in frames]


@pytest.mark.parametrize("codec", ["h264", "h265", "prores"])
def test_ten_bit_422_stays_ten_bit(tmp_path, codec):
    src = make_clip(tmp_path / "in.mov", frames=40, pix_fmt="yuv422p10le", audio_tracks=0)
    info, frames = _read(src)
    segments = plan_segments([f.pts for f in frames], info.time_base, 0.5, min_frames=8)
    assert len(segments) == 3
    out = tmp_path / "out.mov"
    assemble(probe(src), _encode(tmp_path, info, frames, segments, codec), out)
    (video,) = [s for s in ffprobe_streams(out) if s["codec_type"] == "video"]
    assert video["pix_fmt"] == "yuv422p10le"
    assert _ffprobe_decodes(out) == 40
    tb, packets = _video_packets(out)
    assert sorted(Fraction(p.pts) * tb / info.time_base for p in packets) == [f.pts for f in frames]


def test_rotation_aspect_colour_and_tags_are_kept(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=40, rotation=90, sample_aspect_ratio=Fraction(16, 15),
                    color={"range": 1, "primaries": 1, "trc": 1, "space": 1},
                    stream_metadata={"language": "fra", "handler_name": "Camera"})
    info, frames = _read(src)
    segments = plan_segments([f.pts for f in frames], info.time_base, 0.5, min_frames=8)
    out = tmp_path / "out.mp4"
    assemble(probe(src), _encode(tmp_path, info, frames, segments, "h264"), out)
    (before,) = [s for s in ffprobe_streams(src) if s["codec_type"] == "video"]
    (after,) = [s for s in ffprobe_streams(out) if s["codec_type"] == "video"]
    for key in ("width", "height", "sample_aspect_ratio", "color_range", "color_space",
                "color_primaries", "color_transfer"):
        assert after[key] == before[key], key
    assert after["side_data_list"][0]["rotation"] == before["side_data_list"][0]["rotation"]
    assert after["tags"]["language"] == "fra" and after["tags"]["handler_name"] == "Camera"


def test_timecode_is_kept(tmp_path):
    src = make_clip(tmp_path / "in.mov", frames=30, stream_metadata={"timecode": "01:02:03:04"})
    info, frames = _read(src)
    out = tmp_path / "out.mov"
    segments = plan_segments([f.pts for f in frames], info.time_base, 0.4, min_frames=8)
    assemble(probe(src), _encode(tmp_path, info, frames, segments, "h264"), out)
    timecodes = {s.get("tags", {}).get("timecode") for s in ffprobe_streams(out)}
    assert "01:02:03:04" in timecodes


@pytest.mark.parametrize("codec", ["h264", "h265", "prores", "ffv1"])
def test_segments_are_byte_identical_across_runs(tmp_path, codec):
    src = make_clip(tmp_path / "in.mp4", frames=30, vfr_pts=_vfr_pts(30), audio_tracks=0)
    info, frames = _read(src)
    segment = [Segment(0, 5, 29, frames[5].pts)]
    (a,) = _encode(tmp_path, info, frames, segment, codec)
    (tmp_path / "again").mkdir()
    (b,) = _encode(tmp_path / "again", info, frames, segment, codec)
    assert a.read_bytes() == b.read_bytes()
    assert b"cpuid" not in a.read_bytes()  # x265 names the CPU's features in its info SEI


def test_x265_info_sei_would_name_the_cpu(tmp_path):
    """The control for the check above: x265 left to its defaults writes the CPU's features
    into the stream headers, so segments from different machines would not join."""
    with av.open(str(tmp_path / "plain.mp4"), "w") as out:
        stream = out.add_stream("libx265", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"x265-params": "log-level=error"}
        picture = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
        picture.pts = 0
        out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
    assert b"cpuid" in (tmp_path / "plain.mp4").read_bytes()


_ENCODE_ON_CPUS = textwrap.dedent("""
    import os, sys
    import av
    from gpen_video.io.decode import VideoReader
    from gpen_video.io.encode import ENCODERS, VideoWriter
    cpus, src, dst, control, codec = sys.argv[1:]
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(cpus)])
    with VideoReader(src) as reader:
        frames = list(reader.frames())
        with VideoWriter(dst, reader.info, codec=codec, copy_streams=False) as writer:
            for frame in frames:
                writer.write(frame)
    with av.open(control, "w") as out:  # the encoder left to choose its threads
        stream = out.add_stream(ENCODERS[codec], rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame.rgb, format="rgb24").reformat(format="yuv420p")
            picture.pts = i
            out.mux(stream.encode(picture))
        out.mux(stream.encode(None))
""")


def test_segment_bytes_do_not_depend_on_the_cpu_count(tmp_path):
    """x264 chooses its threads from the CPUs it may use, and its output depends on it;
    segments pin the count, so a run on one CPU and on all give the same bytes."""
    codec = "h264"
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("needs at least 2 CPUs")
    src = make_clip(tmp_path / "in.mp4", frames=12, size=(320, 240), audio_tracks=0)
    for n in (1, cpus):
        subprocess.run([sys.executable, "-c", _ENCODE_ON_CPUS, str(n), str(src), str(tmp_path / f"seg{n}.mp4"),
                        str(tmp_path / f"control{n}.mp4"), codec], check=True, cwd=Path(__file__).parents[1])
    if (tmp_path / "control1.mp4").read_bytes() == (tmp_path / f"control{cpus}.mp4").read_bytes():
        pytest.skip(f"{codec} chose the same threads on 1 and {cpus} CPUs here")
    assert (tmp_path / "seg1.mp4").read_bytes() == (tmp_path / f"seg{cpus}.mp4").read_bytes()


def test_assemble_refuses_segments_encoded_differently(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=32, audio_tracks=0)
    info, frames = _read(src)
    first = _encode(tmp_path, info, frames, [Segment(0, 0, 15, frames[0].pts)], "h264")
    (tmp_path / "b").mkdir()
    second = _encode(tmp_path / "b", info, frames, [Segment(1, 16, 31, frames[16].pts)], "h264",
                     preset="ultrafast")
    with pytest.raises(EncodeError, match="other settings"):
        assemble(probe(src), first + second, tmp_path / "out.mp4")
    with pytest.raises(EncodeError, match="segment 1 starts at pts 0, not after the previous"):
        assemble(probe(src), first + first, tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "in.mp4", "segment-0.mp4"]


def test_assemble_output_checks(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=20, audio_tracks=0)
    info, frames = _read(src)
    parts = _encode(tmp_path, info, frames, [Segment(0, 0, 19, frames[0].pts)], "prores")
    with pytest.raises(OutputError, match="cannot hold prores"):
        assemble(probe(src), parts, tmp_path / "out.mp4")
    (tmp_path / "taken.mov").write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        assemble(probe(src), parts, tmp_path / "taken.mov")
    assert (tmp_path / "taken.mov").read_bytes() == b"x"
    assert assemble(probe(src), parts, tmp_path / "taken.mov", overwrite=True) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "segment-0.mov", "taken.mov"]


def test_a_segment_writer_leaves_nothing_when_interrupted(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=10, audio_tracks=0)
    info, frames = _read(src)
    path = tmp_path / "work" / "segment-0.mp4"
    path.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, info, copy_streams=False) as writer:
            writer.write(frames[0])
            raise KeyboardInterrupt
    assert list(path.parent.iterdir()) == []


def test_a_segment_file_is_video_only_and_bit_exact(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=10, subtitle=True)
    info, frames = _read(src)
    path = tmp_path / "segment.mp4"
    with VideoWriter(path, info, copy_streams=False) as writer:
        for frame in frames:
            writer.write(frame)
    streams = ffprobe_streams(path)
    assert [s["codec_type"] for s in streams] == ["video"]
    assert b"Lavf" not in path.read_bytes()  # a bit-exact muxer names no version
