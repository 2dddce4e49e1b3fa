"""The web page's preview with temporal stabilisation: one frame alone against the frame
averaged with its neighbours (the job's frame), on a real clip.

    python benchmarks/bench_preview.py [CLIP] [--model GPEN-BFR-256] [--frames 3]

The clip (default ``../shared/data/crowd_1080p.mp4``) is analysed as the page does
(``web.analysis.analyse``); for the kept frames with the most faces the preview is timed both
ways, side by side: ``alone`` restores the frame's faces (colour fix and fade weights only);
``neighbours`` also decodes the frames within ``temporal_reach`` again (from the keyframe
before) and restores the same people there. GPEN with random weights in the preset's
architecture (speed does not depend on the values), at the precision ``auto`` picks and the
default batch size, as ``benchmarks/run.py`` builds it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import _restorer  # noqa: E402
from gpen_video.config import load_config  # noqa: E402
from gpen_video.jobs.api import FacePipeline  # noqa: E402
from gpen_video.web.analysis import analyse  # noqa: E402

VIDEO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "crowd_1080p.mp4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="?", type=Path, default=VIDEO)
    parser.add_argument("--model", default="GPEN-BFR-256")
    parser.add_argument("--frames", type=int, default=3, help="kept frames timed (those with the most faces)")
    args = parser.parse_args()
    config = load_config(None, device="cpu", model=args.model)
    restorer = _restorer(argparse.Namespace(device="cpu", model=args.model, precision="auto", batch_size=None))
    dtype = restorer.dtype
    pipeline = FacePipeline(config, restorer=restorer)
    reach = pipeline.temporal.reach
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        found = analyse(pipeline, args.clip, Path(tmp))
        analysed = time.perf_counter() - start
        print(f"# bench_preview {date.today()}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, {args.model} {str(dtype).removeprefix('torch.')} batch {restorer.batch_size}, "
              f"temporal_reach {reach}, motion_search {pipeline.temporal.motion_search}; {args.clip.name}: {found.frames} frames analysed in {analysed:.1f} s, "
              f"{len(found.samples)} kept")
        print(f"{'frame':>6} {'faces':>6} {'alone s':>8} {'neighbours s':>13} {'of which decode s':>18} {'ratio':>6}")
        busiest = sorted(found.samples, key=lambda s: (-len(s.faces), s.index))[: args.frames]
        for sample in sorted(busiest, key=lambda s: s.index):
            rgb = sample.rgb()
            pipeline.restore_faces(rgb, sample.faces)  # warm-up
            start = time.perf_counter()
            pipeline.restore_faces(rgb, sample.faces)
            alone = time.perf_counter() - start
            start = time.perf_counter()
            neighbours = found.neighbours(sample, reach)
            decode = time.perf_counter() - start
            pipeline.restore_faces(rgb, sample.faces, neighbours=neighbours)
            both = time.perf_counter() - start
            print(f"{sample.index:>6} {len(sample.faces):>6} {alone:>8.2f} {both:>13.2f} {decode:>18.2f} "
                  f"{both / alone:>6.1f}")


if __name__ == "__main__":
    main()
