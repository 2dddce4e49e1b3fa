"""What the stages beside GPEN and the encoder cost, each on one thread, per frame or face.

    python benchmarks/bench_stages.py                       # run.py's 720p one-face clip, 10 s
    python benchmarks/bench_stages.py --against 1942fb8     # and the code of a revision, interleaved
    python benchmarks/bench_stages.py --clip CLIP.mp4 --rounds 5

On the CPU every stage shares the cores with GPEN and x264, so what ``run.py``'s one-face ratio
has left beside them is these stages' CPU time. Each is timed alone here, on one torch and one
OpenCV thread, over the decoded frames of the clip (decoder pictures, as in a job), on its
second pass over them, when it reuses the memory of its first as a job's stages reuse that of
earlier frames:

- ``detect``: the planner's detection (``Planner.observe``: whole frames every K, crops around
  the faces between, the scene-cut thumbnail), per frame;
- ``crop``: the aligned crops (``warp.crop``, the frame's RGB made on the way), per face;
- ``stabilise``: the temporal stage (``TrackStabiliser``, streamed), per face, given the
  restored faces in the restorer's memory layout (channels-last on the CPU);
- ``paste``: paste-back into the frame (``warp.paste``), per face;
- ``splice``: the writer's work before the encoder: the changed window compared with the
  decoded picture, converted to its pixel format and spliced in, per frame with a face;
- ``all``: their sum over the clip, per frame.

The crops have the side of ``--model`` (GPEN-BFR-256, as ``run.py`` on a CPU); the restored
faces are the crops mirrored (GPEN is not run: its cost is ``run.py``'s model row).
``--against REV`` runs the same measurements on the package as it was at git revision REV
(``git archive``), in child processes alternating with this tree's, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = (("detect", "frame"), ("crop", "face"), ("stabilise", "face"), ("paste", "face"), ("splice", "frame"),
          ("all", "frame"))


class _Unfinished(Exception):
    """Leaves a ``VideoWriter`` without finishing its file (it then removes what it wrote)."""


def measure(clip: Path, preset: str) -> dict[str, float]:
    """Milliseconds per unit of every stage, with the ``gpen_video`` first on ``sys.path``."""
    import cv2
    import torch

    from gpen_video.config import load_config
    from gpen_video.io.decode import VideoReader
    from gpen_video.io.encode import VideoWriter
    from gpen_video.pipeline import FramePipeline
    from gpen_video.restore.model import build_model, preset_config
    from gpen_video.restore.restorer import Restorer
    from gpen_video.restore.temporal import TrackStabiliser

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    config = load_config(None, device="cpu")
    model = preset_config(preset)
    pipeline = FramePipeline(config, restorer=Restorer(build_model(model), model.size))
    reader = VideoReader(clip)
    ms: dict[str, float] = {}

    def decoded():
        return list(reader.frames())

    def second_pass(run):
        """``run()``'s result and the seconds of its second call: the first call's memory is
        freed by then and reused, as in a job, where each frame's buffers recycle the last
        ones'. A first call also pays for touching fresh pages, which on a VM can cost as much
        as the stage itself."""
        run()
        start = time.perf_counter()
        result = run()
        return result, time.perf_counter() - start

    frames = decoded()
    _, seconds = second_pass(lambda: list(pipeline.planner.observe(frames)))
    ms["detect"] = seconds * 1e3 / len(frames)
    # a crop makes its frame's RGB, which the frame then keeps: each pass crops frames of its own
    # (popped: the first pass's frames, RGB and crops are freed before the second)
    plans = [[p for p in pipeline.planner.plan(decoded()) if p.faces] for _ in range(2)]
    crops, seconds = second_pass(lambda: [pipeline.warp.crop(p.frame, p.faces) for p in plans.pop(0)])
    faces = sum(len(c.faces) for c in crops)
    ms["crop"] = seconds * 1e3 / faces

    # the restored faces in the layout the restorer returns them in (channels-last on the CPU)
    layout = torch.channels_last if pipeline.restorer.channels_last else torch.contiguous_format
    restored = [c.pixels.flip(-1).contiguous(memory_format=layout) for c in crops]

    def stabilised():
        stabiliser = TrackStabiliser(pipeline.temporal)
        stable = {}
        for index, (c, r) in enumerate(zip(crops, restored)):
            stable.update(stabiliser.push(index, {f.track_id: (c.pixels[j:j + 1], r[j:j + 1])
                                                  for j, f in enumerate(c.faces)}))
        stable.update(stabiliser.finish())
        return stable

    stable, seconds = second_pass(stabilised)
    ms["stabilise"] = seconds * 1e3 / faces

    pasted, seconds = second_pass(lambda: [
        pipeline.warp.paste(c, torch.stack([stable[i][f.track_id] for f in c.faces]), strength=config.strength)
        for i, c in enumerate(crops)])
    ms["paste"] = seconds * 1e3 / faces

    with tempfile.TemporaryDirectory() as tmp:
        try:
            with VideoWriter(Path(tmp) / "out.mp4", reader.info, codec=config.codec, crf=config.crf,
                             preset=config.preset, overwrite=True, copy_streams=False) as writer:
                _, seconds = second_pass(lambda: [writer._spliced(frame, frame.source) for frame in pasted])
                ms["splice"] = seconds * 1e3 / len(pasted)
                raise _Unfinished  # nothing was encoded: the writer leaves no file
        except _Unfinished:
            pass
    per_face = ms["crop"] + ms["stabilise"] + ms["paste"]
    ms["all"] = (ms["detect"] * len(frames) + per_face * faces + ms["splice"] * len(pasted)) / len(frames)
    return ms


def child(tree: Path | None, clip: Path, preset: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--measure", str(clip), "--model", preset] + (["--tree", str(tree)] if tree else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def package_at(rev: str, folder: Path) -> Path:
    """``gpen_video`` as it was at git revision ``rev``, unpacked into ``folder``."""
    archive = subprocess.run(["git", "archive", rev, "gpen_video"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=None, help="default: run.py's 720p one-face clip, 10 s")
    parser.add_argument("--model", default="GPEN-BFR-256", help="the preset whose crop size is used")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="REV", default=None)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        sys.path.insert(0, str(args.tree or ROOT))
        print(json.dumps(measure(args.measure, args.model)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip
        if clip is None:
            sys.path.insert(0, str(ROOT))
            from samples.make_demo import render_clip

            clip = Path(tmp) / "1f-10s.mp4"
            render_clip(clip, seconds=10.0, size=(1280, 720), faces=1)
        trees: dict[str, Path | None] = {"this tree": None}
        if args.against:
            trees[args.against] = package_at(args.against, Path(tmp) / "against")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for n in range(args.rounds):
            for name in (list(trees) if n % 2 == 0 else list(trees)[::-1]):
                runs[name].append(child(trees[name], clip, args.model))

    print(f"{clip.name}: ms per unit, one torch and one OpenCV thread, median of {args.rounds} rounds"
          + (f" alternating with {args.against}" if args.against else ""))
    print(f"{'stage':<10} {'unit':<6}" + "".join(f"{name:>12}" for name in trees)
          + (f"{'ratio':>8}" if args.against else ""))
    medians = {name: {s: statistics.median(r[s] for r in rs) for s, _ in STAGES} for name, rs in runs.items()}
    for stage, unit in STAGES:
        cells = [medians[name][stage] for name in trees]
        print(f"{stage:<10} {unit:<6}" + "".join(f"{v:>12.2f}" for v in cells)
              + (f"{cells[0] / cells[1]:>8.2f}" if args.against else ""))


if __name__ == "__main__":
    main()
