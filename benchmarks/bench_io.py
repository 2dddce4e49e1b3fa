"""Pass-through speed: bare PyAV decode -> encode vs VideoReader -> VideoWriter.

Both paths use the same encoder settings and copy the audio; the project's path adds the
RGB round trip, rotation handling, splice bookkeeping and checks. Run:

    python benchmarks/bench_io.py [--seconds 5] [--size 1280x720] [--preset medium] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.io.decode import VideoReader  # noqa: E402
from gpen_video.io.encode import ENCODER_THREADS, X264_PARAMS, VideoWriter  # noqa: E402
from tests.clips import make_clip  # noqa: E402


def bare(src: Path, dst: Path, crf: int, preset: str, *, writer_settings: bool = True) -> int:
    """The reference loop: decode, re-encode the same frames, copy audio packets; with the
    writer's x264 settings (``X264_PARAMS``: a fixed thread count and deterministic,
    CPU-independent, stitchable output), or x264's own defaults (``writer_settings=False``)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        vout = out.add_stream("libx264", rate=vin.average_rate)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, vin.codec_context.pix_fmt
        vout.time_base = vout.codec_context.time_base = vin.time_base
        vout.options = {"crf": str(crf), "preset": preset}
        if writer_settings:
            vout.options["x264-params"] = ":".join(X264_PARAMS)
            vout.codec_context.thread_count = ENCODER_THREADS
        audio = {s.index: out.add_stream_from_template(s) for s in inp.streams.audio}
        n = 0
        for packet in inp.demux():
            if packet.stream.index in audio:
                if packet.size:
                    packet.stream = audio[packet.stream.index]
                    out.mux(packet)
                continue
            for frame in vin.decode(packet):
                frame.pict_type = 0
                out.mux(vout.encode(frame))
                n += 1
        out.mux(vout.encode(None))
    return n


def project(src: Path, dst: Path, crf: int, preset: str) -> int:
    n = 0
    with VideoReader(src) as reader, \
            VideoWriter(dst, reader.info, crf=crf, preset=preset, overwrite=True) as writer:
        for frame in reader.frames():
            writer.write(frame)
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--repeat", type=int, default=1, help="alternate runs of each path")
    parser.add_argument("--profile", action="store_true", help="cProfile the project's path")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    rate = Fraction(25)
    frames = int(args.seconds * rate)

    with tempfile.TemporaryDirectory() as tmp:
        src = make_clip(Path(tmp) / "bench.mp4", frames=frames, size=(width, height), rate=rate,
                        audio_tracks=1, options={"preset": "ultrafast", "crf": "18"})
        print(f"clip: {width}x{height}, {frames} frames at {rate} fps, AAC audio; "
              f"libx264 crf {args.crf} preset {args.preset}")
        times: dict[str, list[float]] = {"bare PyAV": [], "VideoReader->VideoWriter": []}
        for _ in range(args.repeat):
            for name, fn in (("bare PyAV", bare), ("VideoReader->VideoWriter", project)):
                dst = Path(tmp) / f"{name[:4]}.mp4"
                start = time.perf_counter()
                n = fn(src, dst, args.crf, args.preset)
                times[name].append(time.perf_counter() - start)
                assert n == frames, f"{name} wrote {n} of {frames} frames"
        fps = {name: frames / min(t) for name, t in times.items()}
        for name, value in fps.items():
            print(f"{name:26s} {value:7.1f} fps  (best of {args.repeat})")
        ratio = fps["VideoReader->VideoWriter"] / fps["bare PyAV"]
        print(f"ratio project/bare: {ratio:.3f} (target >= 0.9)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(project, src, Path(tmp) / "prof.mp4", args.crf, args.preset)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
