"""The planner: one decode gives the whole-track result, selection is per track, memory is flat.

Most tests drive ``Planner`` with a ``ScriptedDetector`` (detections computed from the frame
index along known paths) over tiny frames whose colour changes at scene cuts; one runs the real
detector on generated footage. The reference is always ``smooth_track`` on whole tracks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from fractions import Fraction

import numpy as np
import pytest
import torch

from gpen_video.faces import retinaface
from gpen_video.faces.detect import RetinaFaceDetector, TorchRetinaFace, create_detector, runs_torch_network
from gpen_video.faces.scenes import SceneCutDetector, cut_signature
from gpen_video.faces.smooth import smooth_tracks
from gpen_video.faces.track import Tracker
from gpen_video.plan import PlannedFrame, Planner
from gpen_video.records import Detections, Frame, TrackedFace
from gpen_video.report import ReportWriter
from tests.test_smooth import faces_at, truth_path

Script = Callable[[int], Detections]
TIME_BASE = Fraction(1, 50)
COLOURS = [(200, 60, 40), (40, 70, 210), (60, 190, 70), (210, 200, 50)]
_NOISE = np.random.default_rng(99).normal(0, 0.8, (997, 5, 2)).astype(np.float32)


def detections(faces: list[tuple[np.ndarray, np.ndarray]]) -> Detections:
    """Detections of (landmarks (5, 2), box (4,)) pairs, score 0.99."""
    if not faces:
        return Detections.empty()
    return Detections(
        np.stack([b for _, b in faces]).astype(np.float32),
        np.stack([lm for lm, _ in faces]).astype(np.float32),
        np.full(len(faces), 0.99, np.float32),
    )


class ScriptedDetector:
    """A ``FaceDetector`` that returns ``script(i)`` for the i-th image it is given; counts
    its calls by batch size (bounded memory, for the long runs)."""

    def __init__(self, script: Script, *, fail_at: int | None = None) -> None:
        self.script = script
        self.fail_at = fail_at
        self.seen = 0
        self.batches: Counter[int] = Counter()
        self.threads: set[str] = set()

    def detect(self, images):
        if self.fail_at is not None and self.seen + len(images) > self.fail_at:
            raise RuntimeError("detector failed")
        self.batches[len(images)] += 1
        self.threads.add(threading.current_thread().name)
        out = [self.script(self.seen + k) for k in range(len(images))]
        self.seen += len(images)
        return out


def tiny_frames(n: int, *, cuts: tuple[int, ...] = (), start: int = 0, counter: list[int] | None = None) -> Iterator[Frame]:
    """n 8×8 frames, pts 1000 + 2i; the colour changes at each cut (a new shot)."""
    shots = [np.full((8, 8, 3), c, np.uint8) for c in COLOURS]
    for i in range(n):
        if counter is not None:
            counter[0] += 1
        shot = sum(1 for c in cuts if c <= i) % len(shots)
        yield Frame(start + i, 1000 + 2 * i, TIME_BASE, shots[shot])


def whole_track_reference(script: Script, n: int, *, cuts=(), window=9, max_gap=8) -> dict[int, list[TrackedFace]]:
    """Two passes: track every frame (reset at the cuts), then smooth each whole track."""
    tracker = Tracker(max_gap=max_gap)
    raw: dict[int, list[TrackedFace]] = defaultdict(list)
    for i in range(n):
        if i in cuts:
            tracker.reset()
        for face in tracker.update(i, script(i)):
            raw[face.track_id].append(face)
    return smooth_tracks(raw, window=window)


def run(planner: Planner, frames, report: ReportWriter | None = None) -> tuple[list[PlannedFrame], object]:
    plan = planner.plan(frames, report=report)
    return list(plan), plan.stats


def by_key(planned: list[PlannedFrame], attr: str = "tracked") -> dict[tuple[int, int], TrackedFace]:
    return {(f.track_id, f.frame_index): f for p in planned for f in getattr(p, attr)}


# ------------------------------------------------------------------ a three-face scene with a cut

N, CUT = 160, 100


def three_faces(i: int) -> Detections:
    """Face 0 throughout (misses, an outlier); face 1 enters at 20 and leaves at 90; face 2
    from 95 with misses. At the cut (100) the background changes, the faces go on."""
    lm, box = truth_path(N)
    rng = np.random.default_rng(i)
    faces = []
    if i not in {10, 11, 12, 60, 130, 131}:
        jump = np.array([22.0, -14.0]) if i == 30 else 0.0
        faces.append((lm[i] + rng.normal(0, 1.5, (5, 2)) + jump, box[i] + rng.normal(0, 1.5, 4)))
    if 20 <= i < 90:
        faces.append((lm[i] + 200 + rng.normal(0, 1.5, (5, 2)), box[i] + 200 + rng.normal(0, 1.5, 4)))
    if i >= 95 and i not in {101, 102, 140}:
        faces.append((lm[i] - 100 + rng.normal(0, 1.5, (5, 2)), box[i] - 100 + rng.normal(0, 1.5, 4)))
    return detections(faces)


@pytest.mark.parametrize("chunk, detect_batch", [(16, 8), (1, 3), (7, 1)])
def test_plan_equals_whole_track_smoothing(chunk, detect_batch):
    planner = Planner(ScriptedDetector(three_faces), min_face=0, chunk=chunk, detect_batch=detect_batch)
    planned, stats = run(planner, tiny_frames(N, cuts=(CUT,)))
    want = {(f.track_id, f.frame_index): f for faces in whole_track_reference(three_faces, N, cuts=(CUT,)).values() for f in faces}
    got = by_key(planned)
    assert [p.frame.index for p in planned] == list(range(N))
    assert got.keys() == want.keys()
    for key, face in want.items():
        np.testing.assert_allclose(got[key].landmarks, face.landmarks, atol=0.01)
        np.testing.assert_allclose(got[key].box, face.box, atol=0.01)
        assert got[key].interpolated == face.interpolated
    assert {(k, i) for k, i in got if got[k, i].interpolated} >= {(0, 10), (0, 11), (0, 12), (0, 60)}
    assert by_key(planned, "faces") == got  # min_face 0: every face is restored
    assert stats.frames == N and stats.scene_cuts == 1
    assert stats.tracks == len({k for k, _ in want}) == stats.restored_tracks == 5  # the cut splits 0 and 2


def test_plan_on_real_footage_equals_two_passes(tmp_path):
    """The planner with the real detector on generated footage (two faces, one hidden for 3
    frames, one for 20; a scene cut at 50) gives the two-pass landmarks within 0.01 px."""
    from gpen_video.faces.detect import create_detector
    from gpen_video.io.decode import VideoReader
    from samples.make_demo import FacePath, render_clip

    clip = tmp_path / "clip.mp4"
    paths = [
        FacePath(centre=(140, 136), amplitude=(30, 10), scale=0.45),
        FacePath(centre=(340, 136), amplitude=(30, 10), phase=1.0, scale=0.45),
    ]
    hidden = {0: range(20, 23), 1: range(20, 40)}
    render_clip(clip, seconds=2.4, size=(480, 272), paths=paths, visible=lambda k, i: i not in hidden[k], cut_at=50, audio=False)
    detector = create_detector("retinaface-mobile", detect_size=1024)

    with VideoReader(clip) as reader:
        frames = list(reader.frames())
    cut_finder, cuts = SceneCutDetector(), set()
    for frame in frames:
        if cut_finder.update(cut_signature(frame.rgb)) and frame.index > 0:
            cuts.add(frame.index)
    found = detector.detect([f.rgb for f in frames])
    want = whole_track_reference(lambda i: found[i], len(frames), cuts=cuts)

    with VideoReader(clip) as reader:
        planned, stats = run(Planner(detector, min_face=0), reader.frames())
    assert cuts == {50} and stats.scene_cuts == 1 and stats.frames == len(frames) == 60
    got = by_key(planned)
    assert got.keys() == {(f.track_id, f.frame_index) for faces in want.values() for f in faces}
    for faces in want.values():
        for face in faces:
            mine = got[face.track_id, face.frame_index]
            np.testing.assert_allclose(mine.landmarks, face.landmarks, atol=0.01)
            assert mine.interpolated == face.interpolated
    assert {i for (_, i), f in got.items() if f.interpolated} == {20, 21, 22}


# ------------------------------------------------------------------ selection per track


def sized_faces(sizes: dict[int, Callable[[int], float | None]], *, y_step: float = 150.0) -> Script:
    """Still faces, one row each, whose box size is ``sizes[k](i)`` (None: absent)."""

    def script(i: int) -> Detections:
        faces = []
        for k, size_of in sizes.items():
            size = size_of(i)
            if size is None:
                continue
            lm, box = faces_at(np.array([300.0]), np.array([100 + y_step * k]), np.array([size]), np.array([0.0]))
            faces.append((lm[0] + _NOISE[(7 * i + k) % len(_NOISE)], box[0]))
        return detections(faces)

    return script


def restored_frames(planned: list[PlannedFrame]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for p in planned:
        for f in p.faces:
            out[f.track_id].append(p.frame.index)
    return out


def test_min_face_turns_a_track_on_once_and_keeps_it_on():
    """Track 0 grows from 10 px to 60 and shrinks back; track 1 hovers around min_face (a
    per-frame rule would flicker); track 2 is always small; track 3 always large."""
    n = 300

    def grow(i):
        return 10 + 50 * min(i, n - i) / 150

    sizes = {0: grow, 1: lambda i: 30 + (-1.5 if i % 2 else 1.5), 2: lambda i: 15.0, 3: lambda i: 80.0}
    planner = Planner(ScriptedDetector(sized_faces(sizes)), min_face=30)
    planned, stats = run(planner, tiny_frames(n))
    restored = restored_frames(planned)
    assert sorted(restored) == [0, 1, 3]
    # one contiguous run up to the end of the track: no flicker
    assert restored[0] == list(range(restored[0][0], n))
    # on where the median within `context` frames reaches 30 (size 30 at frame 60)
    assert abs(restored[0][0] - 60) <= planner.context
    assert restored[1] == list(range(n)) and restored[3] == list(range(n))
    assert stats.tracks == 4 and stats.restored_tracks == 3


def crossing_twins(i: int) -> Detections:
    """Two faces of the same size crossing each other horizontally; which one is larger
    alternates every frame. Face A lives for frames 0-199, face B for 20-299."""
    faces = []
    wobble = 2.0 if i % 2 else -2.0
    if i < 200:
        lm, box = faces_at(np.array([50 + 2.0 * i]), np.array([100.0]), np.array([100 + wobble]), np.array([0.0]))
        faces.append((lm[0] + _NOISE[i % 997], box[0]))
    if 20 <= i < 300:
        lm, box = faces_at(np.array([600 - 2.0 * i]), np.array([240.0]), np.array([100 - wobble]), np.array([0.0]))
        faces.append((lm[0] + _NOISE[(i + 500) % 997], box[0]))
    return detections(faces)


def test_only_largest_face_keeps_one_person_until_they_leave():
    planner = Planner(ScriptedDetector(crossing_twins), only_largest_face=True, min_face=20)
    planned, stats = run(planner, tiny_frames(300))
    chosen = [[f.track_id for f in p.faces] for p in planned]
    assert all(len(c) == 1 for c in chosen), "exactly one face restored in every frame"
    ids = [c[0] for c in chosen]
    assert ids == [0] * 200 + [1] * 100, "A until it ends, then B: no frame-to-frame switching"
    # a per-frame rule would have switched: the larger box alternates while both are there
    larger = [max(p.tracked, key=lambda f: f.size).track_id for p in planned[20:200]]
    assert sum(a != b for a, b in zip(larger, larger[1:])) > 100
    assert stats.tracks == 2 and stats.restored_tracks == 2


def test_a_scene_cut_ends_the_chosen_track():
    planner = Planner(ScriptedDetector(crossing_twins), only_largest_face=True, min_face=20)
    planned, stats = run(planner, tiny_frames(300, cuts=(100,)))
    ids = [[f.track_id for f in p.faces] for p in planned]
    assert stats.scene_cuts == 1
    assert all(len(c) == 1 for c in ids)
    first = [c[0] for c in ids]
    assert len(set(first[:100])) == 1 and len(set(first[100:200])) == 1
    assert first[99] != first[100], "the cut ends every track: a new one is chosen"


def test_skip_tracks_are_never_restored():
    planner = Planner(ScriptedDetector(crossing_twins), only_largest_face=True, min_face=20, skip_tracks={0})
    planned, stats = run(planner, tiny_frames(300))
    restored = restored_frames(planned)
    assert sorted(restored) == [1]
    assert restored[1] == list(range(20, 300)), "with 0 skipped, 1 is chosen as soon as it appears"
    assert all(len(p.tracked) == (2 if 20 <= p.frame.index < 200 else 1) for p in planned)
    assert stats.restored_tracks == 1

    both, _ = run(Planner(ScriptedDetector(crossing_twins), min_face=20, skip_tracks={1}), tiny_frames(300))
    assert sorted(restored_frames(both)) == [0]


# ------------------------------------------------------------------ the report


def test_report_says_what_was_done(tmp_path):
    planner = Planner(ScriptedDetector(crossing_twins), only_largest_face=True, min_face=20)
    out = tmp_path / "report.json"
    frames = list(tiny_frames(300, cuts=(150,)))
    frames[5] = Frame(5, None, TIME_BASE, frames[5].rgb)  # a frame without a timestamp
    with ReportWriter("tape.mp4", fps=25.0) as report:
        planned, stats = run(planner, iter(frames), report)
        report.write(out)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    doc = json.loads(out.read_text())
    assert list(doc) == ["input", "frames", "fps", "scene_cuts", "tracks"]
    assert doc["input"] == "tape.mp4" and doc["frames"] == 300 and doc["fps"] == 25.0
    assert doc["scene_cuts"] == [150]
    assert [t["id"] for t in doc["tracks"]] == sorted(t["id"] for t in doc["tracks"]) == [0, 1, 2, 3]
    restored = {(f.track_id, f.frame_index) for p in planned for f in p.faces}
    tracked = by_key(planned)
    seen = set()
    for track in doc["tracks"]:
        indices = [f["index"] for f in track["frames"]]
        assert indices == sorted(indices)
        assert track["restored"] == any(f["restored"] for f in track["frames"])
        for entry in track["frames"]:
            key = (track["id"], entry["index"])
            seen.add(key)
            assert entry["restored"] == (key in restored)
            face = tracked[key]
            np.testing.assert_allclose(entry["landmarks"], face.landmarks, atol=1e-3)
            np.testing.assert_allclose(entry["box"], face.box, atol=1e-3)
            assert entry["interpolated"] == face.interpolated
            assert (entry["landmarks_raw"] is None) == face.interpolated == (entry["score"] is None)
            pts = None if entry["index"] == 5 else 1000 + 2 * entry["index"]
            assert entry["pts"] == pts
            assert entry["time"] == (None if pts is None else pytest.approx(pts / 50))
    assert seen == set(tracked)
    # before the cut A (0) is chosen, alone at first; after it one of the two new tracks
    assert [t["restored"] for t in doc["tracks"][:2]] == [True, False]
    assert sum(t["restored"] for t in doc["tracks"][2:]) == 1
    assert stats.restored_tracks == 2


def test_report_into_a_missing_folder_is_an_output_error(tmp_path):
    from gpen_video.errors import OutputError

    with ReportWriter("tape.mp4", fps=25.0) as report:
        run(Planner(ScriptedDetector(three_faces)), tiny_frames(40), report)
        with pytest.raises(OutputError, match="missing"):
            report.write(tmp_path / "missing" / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_report_of_a_video_without_faces(tmp_path):
    out = tmp_path / "r.json"
    with ReportWriter("empty.mp4", fps=0.0) as report:
        run(Planner(ScriptedDetector(lambda i: Detections.empty())), tiny_frames(30), report)
        report.write(out)
    assert json.loads(out.read_text()) == {"input": "empty.mp4", "frames": 30, "fps": 0.0, "scene_cuts": [], "tracks": []}


# ------------------------------------------------------------------ streaming behaviour


def test_frames_come_out_once_in_order_and_detection_runs_batched_in_a_thread():
    detector = ScriptedDetector(three_faces)
    planner = Planner(detector, min_face=0, detect_batch=8)
    read = [0]
    frames = tiny_frames(N - 3, start=0, counter=read)
    held = []
    planned = []
    for p in planner.plan(frames):
        planned.append(p)
        held.append(read[0] - len(planned))
    assert [p.frame.index for p in planned] == list(range(N - 3))
    assert detector.batches == {8: (N - 3) // 8, (N - 3) % 8: 1}
    assert threading.current_thread().name not in detector.threads
    assert max(held) <= planner.delay
    assert max(held) >= planner.context, "frames wait for the look-ahead"


def test_frames_may_start_at_any_index_and_must_be_consecutive():
    def one_face(i):
        lm, box = faces_at(np.array([200.0]), np.array([200.0]), np.array([90.0]), np.array([0.0]))
        return detections([(lm[0] + _NOISE[i % 997], box[0])])

    planned, stats = run(Planner(ScriptedDetector(one_face)), tiny_frames(50, start=7000))
    assert [p.frame.index for p in planned] == list(range(7000, 7050))
    assert all(p.faces[0].frame_index == p.frame.index for p in planned)
    assert stats.tracks == 1

    gappy = (f for f in tiny_frames(20) if f.index != 9)
    with pytest.raises(ValueError, match="in order"):
        run(Planner(ScriptedDetector(one_face)), gappy)
    assert run(Planner(ScriptedDetector(one_face)), iter([]))[0] == []


def detect_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "gpen-video-detect"]


def test_errors_and_early_stops_leave_no_thread():
    with pytest.raises(RuntimeError, match="detector failed"):
        run(Planner(ScriptedDetector(three_faces, fail_at=40)), tiny_frames(N))
    assert detect_threads() == []
    plan = Planner(ScriptedDetector(three_faces)).plan(tiny_frames(N))
    assert next(plan).frame.index == 0
    plan.close()
    assert detect_threads() == []


# ------------------------------------------------------------------ memory


LONG_PERIOD = 300


def _long_scene_period(i: int) -> Detections:
    faces = []
    lm, box = faces_at(np.array([160 + 40 * np.sin(2 * np.pi * i / LONG_PERIOD)]), np.array([120.0]), np.array([80.0]), np.array([0.0]))
    if i % 53 != 52:
        faces.append((lm[0] + _NOISE[i % 997], box[0]))
    for k in (1, 2, 3):
        if (i + 70 * k) % LONG_PERIOD < 200 and (7 * i + k) % 61:
            cx, size = 100.0 + 150 * k, 30.0 + 10 * k
            y = 320 + 20 * np.sin(2 * np.pi * i / LONG_PERIOD)
            lm, box = faces_at(np.array([cx]), np.array([y]), np.array([size]), np.array([0.0]))
            faces.append((lm[0] + _NOISE[(5 * i + k) % 997], box[0]))
    return detections(faces)


_LONG_SCENE = [_long_scene_period(i) for i in range(LONG_PERIOD)]


def long_scene(i: int) -> Detections:
    """A long track present in every frame (single-frame misses), and three tracks that come
    and go (200 frames in, 100 out, staggered, with misses). Repeats every 300 frames, so it
    costs the detector nothing."""
    return _LONG_SCENE[i % LONG_PERIOD]


def plan_long_scene(n: int, tmp_path, checkpoints=()) -> list[int]:
    """Plan ``n`` frames of ``long_scene`` with the report on, then write it; returns the peak
    traced memory at each checkpoint (frames released) and after the report was written."""
    planner = Planner(ScriptedDetector(long_scene), only_largest_face=True)
    peaks = []
    with ReportWriter("long.mp4", fps=25.0) as report:
        for planned in planner.plan(tiny_frames(n), report=report):
            if planned.frame.index + 1 in checkpoints:
                peaks.append(tracemalloc.get_traced_memory()[1])
        report.write(tmp_path / "report.json")
    peaks.append(tracemalloc.get_traced_memory()[1])
    return peaks


def test_memory_does_not_grow_with_length(tmp_path):
    """Peak traced memory after 5N frames (report written) stays within 64 KiB of the peak after
    N frames. Anything kept per frame (a pts list: 40 B a frame, 96 KB here) or per face (a
    size history: 32 B a face, 300 KB) would exceed it. N is a multiple of the scene's period,
    so both checkpoints see the same faces."""
    n = 2 * LONG_PERIOD
    plan_long_scene(5 * n, tmp_path)  # warm-up: imports; NumPy, SQLite and interpreter caches fill up
    tracemalloc.start()
    try:
        at_n, at_5n, written = plan_long_scene(5 * n, tmp_path, checkpoints=(n, 5 * n))
    finally:
        tracemalloc.stop()
    assert written - at_n < 64 * 1024, (at_n, at_5n, written)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["frames"] == 5 * n and len(doc["tracks"][0]["frames"]) == 5 * n


def test_a_face_free_job_imports_no_scipy_nor_torchvision() -> None:
    """Their imports (0.36 s and 1.4 s of start-up) wait for a first face: a face-free video never pays them."""
    program = ("import sys, gpen_video.jobs.api; "
               "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'torchvision'}))")
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_a_torch_detector_keeps_every_torch_thread_in_the_detect_thread():
    class Counting(torch.nn.Module):
        """The real network, noting the torch CPU threads of the thread that calls it."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net, self.threads = net, []

        def forward(self, x: torch.Tensor):
            self.threads.append(torch.get_num_threads())
            return self.net(x)

    counting = Counting(retinaface.load_mobile_from_onnx())
    detector = RetinaFaceDetector(TorchRetinaFace(counting), detect_size=64)
    frames = (Frame(i, 1000 + 2 * i, TIME_BASE, np.full((64, 64, 3), 90, np.uint8)) for i in range(4))
    before = torch.get_num_threads()
    torch.set_num_threads(16)  # the count a network keeps; the other stages get one for every eight
    try:
        planned, _ = run(Planner(detector, min_face=0), frames)
    finally:
        torch.set_num_threads(before)
    assert len(planned) == 4 and counting.threads and set(counting.threads) == {16}
    assert runs_torch_network(detector)
    assert not runs_torch_network(create_detector("retinaface-mobile", engine="onnxruntime"))
    assert not runs_torch_network(ScriptedDetector(lambda i: Detections.empty()))
