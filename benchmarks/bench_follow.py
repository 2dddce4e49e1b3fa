"""Detection that follows the faces against detecting every frame whole, on real footage.

    python benchmarks/bench_follow.py CLIP [--every 6,12] [--detect-size 1024]

(the README's figures: CLIP = the crowd clip of ../shared/data/crowd_1080p.mp4)

For each K, side by side with K = 1 (every frame whole, the reference) on the same decoded
frames: detector time per frame, the share of the reference's faces (IoU >= 0.5) that K misses,
how many frames after the reference K first finds each reference track, how far the landmarks
K finds lie from the reference's (in face sizes), and the jitter of the planner's smoothed
landmarks (mean size of the second difference along each track, in face sizes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gpen_video.faces.detect import create_detector
from gpen_video.faces.track import Tracker, group_by_track
from gpen_video.io.decode import VideoReader
from gpen_video.plan import Planner

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def jitter(planned) -> float:
    """Mean |second difference| of each track's smoothed landmarks, in face sizes."""
    faces = [f for p in planned for f in p.tracked]
    values = []
    for track in group_by_track(faces).values():
        if len(track) < 3:
            continue
        points = np.stack([f.landmarks for f in track]).astype(np.float64)  # [T,5,2]
        sizes = np.array([f.size for f in track])[1:-1]
        second = np.linalg.norm(points[2:] - 2 * points[1:-1] + points[:-2], axis=-1).mean(-1)  # [T-2]
        values.extend(second / sizes)
    return float(np.mean(values)) if values else float("nan")


def run(frames, detector, every: int, detect_size: int):
    planner = Planner(detector, detect_every=every, detect_size=detect_size)
    start = time.perf_counter()
    observed = list(planner.observe(frames))
    seconds = time.perf_counter() - start
    planned = list(Planner(detector, detect_every=1).plan([], replay=observed))
    return observed, seconds, planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip")
    parser.add_argument("--every", default="6,12")
    parser.add_argument("--detect-size", type=int, default=1024)
    args = parser.parse_args()
    with VideoReader(args.clip) as reader:
        frames = list(reader.frames())
    detector = create_detector("retinaface-mobile", detect_size=args.detect_size)
    reference, ref_seconds, ref_planned = run(frames, detector, 1, args.detect_size)
    tracker = Tracker()
    ref_tracks: dict[int, list[int]] = {}
    for o in reference:
        for face in tracker.update(o.frame.index, o.detections):
            ref_tracks.setdefault(face.track_id, []).append(face.frame_index)
    total = sum(len(o.detections) for o in reference)
    h, w = frames[0].shape[:2]
    print(f"{Path(args.clip).name}: {w}x{h}, {len(frames)} frames, detect_size {args.detect_size}; "
          f"reference K=1: {total} faces, {len(ref_tracks)} tracks")
    print(f"{'K':>3} {'ms/frame':>9} {'missed':>8} {'tracks found late (frames)':>28} {'landmark dist':>14} "
          f"{'jitter':>8}")
    print(f"{1:>3} {1000 * ref_seconds / len(frames):9.1f} {'-':>8} {'-':>28} {'-':>14} {jitter(ref_planned):8.4f}")
    for every in (int(k) for k in args.every.split(",")):
        observed, seconds, planned = run(frames, detector, every, args.detect_size)
        missed, distances, found_at = 0, [], {}
        tracker = Tracker()
        for ref, got in zip(reference, observed):
            a, b = ref.detections, got.detections
            overlap = iou(a.boxes, b.boxes) if len(a) and len(b) else np.zeros((len(a), len(b)))
            ref_ids = [f.track_id for f in tracker.update(ref.frame.index, a)]
            for i in range(len(a)):
                j = int(np.argmax(overlap[i])) if len(b) else -1
                if j < 0 or overlap[i, j] < 0.5:
                    missed += 1
                    continue
                size = min(a.boxes[i, 2] - a.boxes[i, 0], a.boxes[i, 3] - a.boxes[i, 1])
                distances.append(np.linalg.norm(a.landmarks[i] - b.landmarks[j], axis=-1).mean() / size)
                found_at.setdefault(ref_ids[i], ref.frame.index)
        late = [found_at[t] - idx[0] if t in found_at else None for t, idx in ref_tracks.items()]
        never = sum(d is None for d in late)
        late_found = [d for d in late if d is not None]
        late_text = f"max {max(late_found)}, mean {np.mean(late_found):.1f}, never {never}"
        print(f"{every:>3} {1000 * seconds / len(frames):9.1f} {100 * missed / total:7.1f}% {late_text:>28} "
              f"{np.mean(distances):14.4f} {jitter(planned):8.4f}")


if __name__ == "__main__":
    main()
