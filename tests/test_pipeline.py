"""End to end on generated footage: the astronaut moving along known paths.

Truth: the astronaut's landmarks, detected once on the clean still, carried through each
frame's known similarity transform.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from gpen_video.config import load_config
from gpen_video.faces.detect import create_detector
from gpen_video.jobs.api import FacePipeline
from gpen_video.restore.restorer import Restorer
from samples.make_demo import FacePath, render_clip
from tests.clips import psnr, read_packets
from tests.geometry import apply

SIZE = (480, 272)


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=1024)


@pytest.fixture(scope="module")
def astronaut_landmarks(detector) -> np.ndarray:
    det = detector.detect([astronaut()])[0]
    assert len(det) == 1
    return det.landmarks[0].astype(np.float64)


def make_pipeline(detector, **overrides) -> FacePipeline:
    config = load_config(None, device="cpu", **overrides)
    return FacePipeline(config, restorer=Restorer(torch.nn.Identity(), 256), detector=detector)


def decoded_rgb(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def run(pipeline: FacePipeline, clip: Path, tmp_path: Path, suffix: str = ".mkv"):
    out, report = tmp_path / f"out{suffix}", tmp_path / "report.json"
    result = pipeline.restore_video(clip, out, overwrite=True, report=report)
    return result, out, json.loads(report.read_text())


@pytest.fixture(scope="module")
def one_face(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "one.mp4"
    truth = render_clip(path, seconds=3, size=SIZE, faces=1, seed=1)
    return path, truth


def test_report_has_the_documented_shape(one_face, detector, tmp_path):
    clip, truth = one_face
    result, out, report = run(make_pipeline(detector), clip, tmp_path)
    assert {"input", "frames", "fps", "tracks"} <= set(report)
    assert report["frames"] == len(truth) == result.frames
    assert report["fps"] == pytest.approx(25.0)
    assert [t["id"] for t in report["tracks"]] == [0]  # one face, one track, numbered from 0
    track = report["tracks"][0]
    assert [e["index"] for e in track["frames"]] == list(range(len(truth)))
    entry = track["frames"][0]
    assert set(entry) == {"index", "pts", "time", "score", "box", "landmarks_raw", "landmarks", "interpolated", "restored"}
    assert len(entry["box"]) == 4 and np.array(entry["landmarks"]).shape == (5, 2)
    with av.open(str(clip)) as c:
        pts = [f.pts for f in c.decode(video=0)]
        tb = c.streams.video[0].time_base
    for e in track["frames"]:
        assert e["pts"] == pts[e["index"]]
        assert e["time"] == pytest.approx(float(pts[e["index"]] * tb), abs=1e-6)


def test_single_face_one_track_smooth_and_accurate(one_face, detector, astronaut_landmarks, tmp_path):
    clip, truth = one_face
    _, _, report = run(make_pipeline(detector), clip, tmp_path)
    assert len(report["tracks"]) == 1
    frames = report["tracks"][0]["frames"]
    assert [f["index"] for f in frames] == list(range(len(truth)))
    smooth = np.array([f["landmarks"] for f in frames])
    raw = np.array([f["landmarks_raw"] for f in frames if f["landmarks_raw"] is not None])
    real = np.array([apply(truth[f["index"]][0], astronaut_landmarks) for f in frames])
    assert len(raw) == len(frames)
    error_smooth = np.linalg.norm(smooth - real, axis=-1).mean()
    error_raw = np.linalg.norm(raw - real, axis=-1).mean()
    assert error_smooth < 3.0, f"smoothed landmarks {error_smooth:.2f} px from the truth"
    assert error_smooth <= error_raw + 0.05

    def jitter(points):  # frame-to-frame acceleration, relative to the truth's own
        return np.linalg.norm(np.diff(points - real, n=2, axis=0), axis=-1).mean()

    assert jitter(smooth) < 0.5 * jitter(raw), (jitter(smooth), jitter(raw))


def test_timing_audio_and_frames_intact(one_face, detector, tmp_path):
    clip, truth = one_face
    _, out, _ = run(make_pipeline(detector, codec="h264"), clip, tmp_path, suffix=".mp4")
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        pts_in = [f.pts for f in a.decode(video=0)]
        pts_out = [f.pts for f in b.decode(video=0)]
        assert b.streams.video[0].time_base == a.streams.video[0].time_base
    assert pts_out == pts_in and len(pts_in) == len(truth)
    packets_in, packets_out = read_packets(clip), read_packets(out)
    assert packets_out[1] == packets_in[1]  # the audio, byte for byte, same timestamps


def test_identity_network_round_trips_the_faces(one_face, detector, tmp_path):
    """Alignment, inverse warp and mask: with a network that returns its input the output
    equals the input up to interpolation error, and is exact away from the faces. (Temporal
    stabilisation off: it averages the aligned crops over time, which is not the identity.)"""
    clip, _ = one_face
    _, out, report = run(make_pipeline(detector, codec="ffv1", temporal=False), clip, tmp_path)
    before, after = decoded_rgb(clip), decoded_rgb(out)
    assert len(before) == len(after)
    boxes = {f["index"]: f["box"] for f in report["tracks"][0]["frames"]}
    face_psnr, outside_diff = [], 0
    for i, (a, b) in enumerate(zip(before, after)):
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        face_psnr.append(psnr(a[y1:y2, x1:x2], b[y1:y2, x1:x2]))
        w, h = x2 - x1, y2 - y1
        keep = np.ones(a.shape[:2], bool)
        keep[max(0, y1 - h) : y2 + h, max(0, x1 - w) : x2 + w] = False
        outside_diff = max(outside_diff, int(np.abs(a.astype(int) - b.astype(int))[keep].max()))
    assert min(face_psnr) >= 38.0, min(face_psnr)
    assert outside_diff == 0


def test_strength_zero_changes_nothing(one_face, detector, tmp_path):
    clip, _ = one_face

    class Grey(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    config = load_config(None, device="cpu", codec="ffv1", strength=0.0)
    pipeline = FacePipeline(config, restorer=Restorer(Grey(), 256), detector=detector)
    out = tmp_path / "out.mkv"
    pipeline.restore_video(clip, out)
    for a, b in zip(decoded_rgb(clip), decoded_rgb(out)):
        np.testing.assert_array_equal(a, b)


def test_crossing_faces_keep_their_ids(detector, astronaut_landmarks, tmp_path):
    paths = [
        FacePath(centre=(170, 80), amplitude=(110, 8), period=2.0, scale=0.4, degrees=4),
        FacePath(centre=(310, 190), amplitude=(110, 8), period=2.0, phase=np.pi, scale=0.4, degrees=4),
    ]
    clip = tmp_path / "two.mp4"
    truth = render_clip(clip, seconds=2, size=SIZE, paths=paths, audio=False, seed=2)
    _, _, report = run(make_pipeline(detector), clip, tmp_path)
    assert len(report["tracks"]) == 2
    for track in report["tracks"]:
        assert len(track["frames"]) == len(truth)
        owners = set()
        for f in track["frames"]:
            points = np.array(f["landmarks"])
            errors = [np.linalg.norm(points - apply(m, astronaut_landmarks), axis=-1).mean() for m in truth[f["index"]]]
            owners.add(int(np.argmin(errors)))
            assert min(errors) < 4.0
        assert len(owners) == 1, f"track {track['id']} jumped between faces {owners}"


def two_faces_that_hide(path: Path, **kwargs) -> Path:
    """60 frames, two faces side by side: the left one is gone for 3 frames (a miss: same
    track, filled in), the right one for 20 (it leaves and comes back)."""
    paths = [
        FacePath(centre=(140, 136), amplitude=(30, 10), scale=0.45),
        FacePath(centre=(340, 136), amplitude=(30, 10), phase=1.0, scale=0.45),
    ]
    hidden = {0: range(20, 23), 1: range(20, 40)}
    render_clip(path, seconds=2.4, size=SIZE, paths=paths, visible=lambda k, i: i not in hidden[k], **kwargs)
    return path


@pytest.mark.parametrize("every", [1, 12])
def test_faces_entering_leaving_and_short_misses(detector, tmp_path, every):
    """Every frame detected whole (1), and followed in crops with a full detection at least
    every 12 frames: the face coming back is found within 12 frames."""
    clip = two_faces_that_hide(tmp_path / "enter.mp4", audio=False)
    _, _, report = run(make_pipeline(detector, max_gap=8, detect_every=every), clip, tmp_path)
    by_side = {0: [], 1: []}
    for track in report["tracks"]:
        x = np.mean([f["box"][0] for f in track["frames"]])
        by_side[int(x > 240)].append(track)
    assert len(by_side[0]) == 1, "a 3-frame miss must not split the track"
    filled = [f for f in by_side[0][0]["frames"] if f["interpolated"]]
    assert [f["index"] for f in filled] == [20, 21, 22]
    assert all(f["landmarks_raw"] is None and f["score"] is None for f in filled)
    assert len(by_side[1]) == 2, "a face gone for 20 frames comes back as a new track"
    first, second = sorted(by_side[1], key=lambda t: t["frames"][0]["index"])
    assert first["frames"][-1]["index"] == 19
    assert 40 <= second["frames"][0]["index"] < 40 + every
    assert first["id"] != second["id"]


def test_scene_cut_splits_tracks(detector, tmp_path):
    # before the cut the face is at A; after it a face appears close by: only the cut separates them
    paths = [FacePath(centre=(240, 136), amplitude=(20, 5), scale=0.45)] * 2
    clip = tmp_path / "cut.mp4"
    render_clip(clip, seconds=2, size=SIZE, paths=paths, visible=lambda k, i: (i < 25) == (k == 0), cut_at=25, audio=False)
    _, _, report = run(make_pipeline(detector), clip, tmp_path)
    assert report["scene_cuts"] == [25]
    spans = sorted((t["frames"][0]["index"], t["frames"][-1]["index"]) for t in report["tracks"])
    assert spans == [(0, 24), (25, 49)]


def test_min_face_and_only_largest(detector, tmp_path):
    paths = [
        FacePath(centre=(140, 136), amplitude=(10, 5), scale=0.55),
        FacePath(centre=(360, 136), amplitude=(10, 5), scale=0.38),
    ]
    clip = tmp_path / "sizes.mp4"
    render_clip(clip, seconds=0.8, size=SIZE, paths=paths, audio=False, degraded=False)
    largest = make_pipeline(detector, only_largest_face=True).restore_video(clip, tmp_path / "a.mkv")
    assert largest.faces_restored == 20
    both = make_pipeline(detector).restore_video(clip, tmp_path / "b.mkv")
    assert both.faces_restored == 40
    _, _, report = run(make_pipeline(detector, min_face=45), clip, tmp_path)
    restored = [t for t in report["tracks"] if t["restored"]]
    assert len(report["tracks"]) == 2 and len(restored) == 1
    assert np.mean([f["box"][0] for f in restored[0]["frames"]]) < 240


def test_only_largest_face_never_jumps_between_similar_faces(detector, astronaut_landmarks, tmp_path):
    """Two faces of the same size side by side: per-frame choice would flip between them; the
    chosen person stays chosen until their track ends."""
    paths = [
        FacePath(centre=(150, 136), amplitude=(30, 6), period=1.6, scale=0.42, degrees=3),
        FacePath(centre=(330, 136), amplitude=(30, 6), period=1.6, phase=np.pi, scale=0.42, degrees=3),
    ]
    clip = tmp_path / "twins.mp4"
    render_clip(clip, seconds=1.6, size=SIZE, paths=paths, audio=False, seed=5)
    result, _, report = run(make_pipeline(detector, only_largest_face=True), clip, tmp_path)
    assert len(report["tracks"]) == 2
    restored = [t for t in report["tracks"] if t["restored"]]
    assert len(restored) == 1, [t["id"] for t in restored]
    assert all(f["restored"] for f in restored[0]["frames"])
    other = next(t for t in report["tracks"] if not t["restored"])
    assert not any(f["restored"] for f in other["frames"])
    assert result.faces_restored == len(restored[0]["frames"]) == report["frames"]


def test_render_keeps_order_with_full_batches(one_face, detector, tmp_path):
    clip, truth = one_face
    pipeline = make_pipeline(detector)
    pipeline.restorer.batch_size = 8
    calls = []
    original = pipeline.restorer.restore_tensor

    def spy(crops):
        calls.append(len(crops))
        return original(crops)

    pipeline.restorer.restore_tensor = spy
    _, out, _ = run(pipeline, clip, tmp_path, suffix=".mp4")
    assert sum(calls) == len(truth)
    assert all(n == 8 for n in calls[:-1]), calls
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        assert [f.pts for f in b.decode(video=0)] == [f.pts for f in a.decode(video=0)]


@pytest.mark.parametrize("dtype_restore", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_warp_path_matches_opencv_path(one_face, detector, tmp_path, dtype_restore):
    """The GPU engine (crop and paste with grid_sample, GPEN in fp16 as on CUDA) run on CPU
    tensors agrees with the OpenCV reference path, and leaves pixels away from faces exact."""
    clip, _ = one_face
    outputs = {}
    for warp in ("opencv", "torch"):
        config = load_config(None, device="cpu", codec="ffv1", warp=warp)
        restorer = Restorer(torch.nn.Identity(), 256, dtype=dtype_restore)
        pipeline = FacePipeline(config, restorer=restorer, detector=detector)
        out = tmp_path / f"{warp}.mkv"
        pipeline.restore_video(clip, out)
        outputs[warp] = decoded_rgb(out)
    source = decoded_rgb(clip)
    for ref, fast, orig in zip(outputs["opencv"], outputs["torch"], source):
        assert psnr(ref, fast) > 40.0
        untouched = (ref == orig).all(axis=-1)
        # where the reference left the frame alone, the fast path may differ only on the
        # mask's faint outer rim (bilinear vs OpenCV's fixed-point mask warp)
        assert ((fast != orig).any(axis=-1) & untouched).mean() < 0.01


def test_parse_mask_from_the_weights_cache(detector, tmp_path):
    """--mask parse end to end: the parser's weights come from the cache (offline, hash
    recorded), and a parser that calls everything skin pastes over the plain mask's support.
    (A one-frame clip: temporal off, which would leave a one-frame track alone.)"""
    from gpen_video.restore.parsing import parse_net

    cache = tmp_path / "cache"
    cache.mkdir()
    state = parse_net().state_dict()
    # a parser that calls every pixel skin (label 1): the parse mask must then cover the crop
    state["out_mask_conv.conv2d.weight"].zero_()
    state["out_mask_conv.conv2d.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(1), 19).float())
    torch.save(state, cache / "ParseNet-latest.pth")
    clip = tmp_path / "still.mp4"
    render_clip(clip, seconds=0.04, size=SIZE, faces=1, audio=False, degraded=False)

    class Grey(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    outputs = {}
    for mask in ("plain", "parse"):
        config = load_config(None, device="cpu", codec="ffv1", mask=mask, cache_dir=str(cache), offline=True,
                             temporal=False)
        pipeline = FacePipeline(config, restorer=Restorer(Grey(), 256), detector=detector)
        out = tmp_path / f"{mask}.mkv"
        pipeline.restore_video(clip, out)
        outputs[mask] = decoded_rgb(out)[0].astype(int)
    source = decoded_rgb(clip)[0].astype(int)
    assert (cache / "ParseNet-latest.pth.sha256").exists()
    changed = {m: (np.abs(o - source).sum(axis=-1) > 0) for m, o in outputs.items()}
    assert changed["parse"].sum() > 0.8 * changed["plain"].sum()
    outside = (changed["parse"] & ~changed["plain"]).sum()
    assert outside < 0.02 * changed["plain"].sum(), "the parse mask lies inside the plain one"


def test_interrupted_run_leaves_no_output_and_no_temporary_file(one_face, detector, tmp_path):
    clip, _ = one_face

    class Interrupt(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Interrupt.calls += 1
            if Interrupt.calls == 5:
                raise KeyboardInterrupt
            return x

    pipeline = FacePipeline(load_config(None, device="cpu"), restorer=Restorer(Interrupt(), 256), detector=detector)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        pipeline.restore_video(clip, out_dir / "out.mp4", report=out_dir / "report.json")
    assert list(out_dir.iterdir()) == []


def test_frames_without_faces_reach_the_encoder_unconverted(detector, tmp_path, monkeypatch):
    """A face enters at frame 30 of 60: the frames before it are passed to the encoder as the
    decoder's pictures (no full-size RGB made, nothing compared); only
    the frames with a face are converted to RGB, and the face is found within K = 12 frames."""
    import gpen_video.io.colour as colour
    import gpen_video.io.decode as decode

    path = FacePath(centre=(240, 136), amplitude=(20, 6), scale=0.45)
    clip = tmp_path / "enters.mp4"
    render_clip(clip, seconds=2.4, size=SIZE, paths=[path], visible=lambda k, i: i >= 30, audio=False)
    made, compared = [], []
    to_rgb, changed_window = decode.to_rgb, colour.changed_window
    monkeypatch.setattr(decode, "to_rgb", lambda frame, *a, size=None: (size is None and made.append(frame.pts))
                        or to_rgb(frame, *a, size=size))  # full-size conversions only
    monkeypatch.setattr(colour, "changed_window", lambda a, b: compared.append(1) or changed_window(a, b))
    # detected on a smaller copy, as 720p and up are at the default detect_size (a frame no larger
    # than detect_size is detected in its own RGB)
    result, out, report = run(make_pipeline(detector, temporal=False, detect_size=400), clip, tmp_path)
    assert result.frames == 60
    restored = sorted({f["index"] for t in report["tracks"] for f in t["frames"] if f["restored"]})
    assert 30 <= restored[0] < 30 + 12 and len(made) == len(restored) == len(compared)
