"""The cost of segmenting: 30 s segments against one segment, encode-only, side by side.

The same synthetic 720p frames go through ``SegmentWriter`` once as one segment and once as
30-second segments; each result is assembled with the source's audio. Segmenting adds an IDR
picture and an encoder start per segment, the segment files' hashes (for the manifest) and
nothing else: assembly copies packets in both cases. Also measured: starting to decode at a
segment (seek to the keyframe before it, decode forward) against decoding from the start.

    python benchmarks/bench_segments.py [--seconds 90] [--size 1280x720] [--preset medium] [--repeat 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.io.decode import probe  # noqa: E402
from gpen_video.manifest import file_sha256  # noqa: E402
from gpen_video.records import Frame  # noqa: E402
from gpen_video.segments import (  # noqa: E402
    SEGMENT_SUFFIX,
    Segment,
    SegmentWriter,
    VideoIndex,
    assemble,
    decode_range,
    plan_segments,
)
from tests.clips import make_clip, pattern  # noqa: E402

DISTINCT = 48
"""Distinct pictures generated once; frames are these, shifted a little more each cycle."""


class Pictures:
    """Cheap moving 720p content: a cycle of pattern frames, panned one step per cycle."""

    def __init__(self, width: int, height: int):
        self.base = [pattern(i, width, height) for i in range(DISTINCT)]

    def __call__(self, i: int) -> np.ndarray:
        return np.roll(self.base[i % DISTINCT], 7 * (i // DISTINCT), axis=1)


class Clock:
    """Wall and CPU seconds (all threads of this process: the encoder's too) spent inside
    ``with clock:`` blocks. CPU time stays meaningful on a machine shared with other jobs."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def encode(work: Path, info, pts: np.ndarray, pictures: Pictures, segments: list[Segment],
           preset: str) -> tuple[Clock, Clock, list[Path]]:
    """Encode ``segments``; returns (encoding clock, hashing clock, files). Making the frames
    is not timed."""
    encoding, hashing = Clock(), Clock()
    paths = []
    for segment in segments:
        path = work / f"segment-{segment.index:05d}{SEGMENT_SUFFIX['h264']}"
        with encoding:
            writer = SegmentWriter(path, info, preset=preset).__enter__()
        try:
            for i in range(segment.first_frame, segment.last_frame + 1):
                frame = Frame(index=i, pts=int(pts[i]), time_base=info.time_base, rgb=pictures(i))
                with encoding:
                    writer.write(frame)
        except BaseException as exc:
            writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        with encoding:
            writer.__exit__(None, None, None)
        with hashing:
            file_sha256(path)
        paths.append(path)
    return encoding, hashing, paths


def decoded_frames(frames: Iterator) -> int:
    return sum(1 for _ in frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--segment-seconds", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, in alternating order")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    rate = Fraction(25)
    count = int(args.seconds * rate)
    pictures = Pictures(width, height)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_clip(tmp / "source.mp4", frames=count, size=(width, height), rate=rate,
                        audio_tracks=1, frame_fn=pictures, options={"preset": "ultrafast", "crf": "18"})
        info = probe(src)
        index = VideoIndex.scan(src)
        plan = plan_segments(index.pts, index.time_base, args.segment_seconds)
        print(f"clip: {width}x{height}, {count} frames at {rate} fps, AAC audio; x264 {args.preset}, "
              f"crf 18, {len(plan)} segments of {args.segment_seconds:g} s")

        variants = [("one segment", [Segment(0, 0, count - 1, int(index.pts[0]))]),
                    (f"{args.segment_seconds:g} s segments", plan)]
        clocks = {name: (Clock(), Clock(), Clock()) for name, _ in variants}
        sizes = {}
        for run in range(args.repeat):  # alternate the order: load from other jobs evens out
            for name, segments in variants[:: -1 if run % 2 else 1]:
                work = tmp / f"{name.replace(' ', '-')}-{run}"
                work.mkdir()
                encoding, hashing, paths = encode(work, info, index.pts, pictures, segments, args.preset)
                with Clock() as assembling:
                    assemble(src, paths, work / "out.mp4")
                for total, part in zip(clocks[name], (encoding, hashing, assembling)):
                    total.wall += part.wall / args.repeat
                    total.cpu += part.cpu / args.repeat
                sizes[name] = (work / "out.mp4").stat().st_size
        rows = [(name, *clocks[name], sizes[name]) for name, _ in variants]
        print(f"seconds per run, wall/CPU (CPU: every thread of this process), mean of {args.repeat}")
        print(f"{'':20} {'encode':>13} {'hash':>11} {'assemble':>11} {'total':>13} {'MB':>7}")
        for name, encoding, hashing, assembling, size in rows:
            cells = [f"{c.wall:6.2f}/{c.cpu:6.2f}" for c in (encoding, hashing, assembling)]
            wall = encoding.wall + hashing.wall + assembling.wall
            cpu = encoding.cpu + hashing.cpu + assembling.cpu
            print(f"{name:20} {cells[0]:>13} {cells[1]:>11} {cells[2]:>11} {wall:6.2f}/{cpu:6.2f} {size / 1e6:7.2f}")
        (_, *one, one_size), (_, *seg, seg_size) = rows
        wall_cost = sum(c.wall for c in seg) / sum(c.wall for c in one) - 1
        cpu_cost = sum(c.cpu for c in seg) / sum(c.cpu for c in one) - 1
        print(f"segmenting cost: {100 * wall_cost:+.1f} % wall time, {100 * cpu_cost:+.1f} % CPU time, "
              f"{100 * (seg_size / one_size - 1):+.1f} % bytes")

        middle = plan[len(plan) // 2]
        window = middle.window(40, 40, count)
        start = time.perf_counter()
        with av.open(str(src)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            to_window = 0
            for frame in container.decode(stream):
                if index.frame_at(frame.pts) >= window.decode_last:
                    break
                to_window += 1
        from_start = time.perf_counter() - start
        start = time.perf_counter()
        decoded = decoded_frames(decode_range(src, index, window.decode_first, window.decode_last))
        seeking = time.perf_counter() - start
        keyframe = index.keyframe_at_or_before(window.decode_first)
        print(f"decoding segment {middle.index}'s window (frames {window.decode_first}..{window.decode_last}): "
              f"from the start {from_start:.2f} s ({to_window} frames), after a seek {seeking:.2f} s "
              f"({decoded} frames kept, {window.decode_first - keyframe} decoded before them from "
              f"keyframe {keyframe})")


if __name__ == "__main__":
    main()
