"""The web page (``gpen-video web``), in a real browser: Playwright driving Debian's Chromium.

The server runs as its own process with a random-weight GPEN-BFR-256 checkpoint on the CPU;
the clips are the demo's moving astronaut faces (two per frame), 480x270. Screenshots of
every state go to the folder printed at the start (``web-screens`` in pytest's temp folder).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from gpen_video.errors import ConfigError, InputError
from gpen_video.web.access import check_binding, parse_size, read_auth
from gpen_video.formats import output_suffix
from gpen_video.web.jobs import JobStore, owner_of
from gpen_video.web.media import MediaDir
from tests.clips import read_frames, read_packets
from tests.web_browser import (
    CHROMIUM, WebServer, choose, download, job, launch_chromium, set_frame, upload,
    wait_faces, wait_job, wait_preview_change, wait_ready, Screens,
)

SIZE = (480, 270)


# ---------------------------------------------------------------------- options (no browser)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8_000_000_000), ("500mb", 500_000_000), ("2MiB", 2 * 1024**2), ("1.5G", 1_500_000_000),
     ("123", 123), ("8XB", ConfigError), ("", ConfigError), ("0", ConfigError), ("-1GB", ConfigError)],
)
def test_parse_size(text: str, expected: int | type) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_size(text)
    else:
        assert parse_size(text) == expected


def test_auth_and_binding(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts"
    accounts.write_text("# people who digitise tapes\nann:s3cret:with:colons\n\nbob:pw\n")
    assert read_auth("me:pw", accounts) == [("me", "pw"), ("ann", "s3cret:with:colons"), ("bob", "pw")]
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(ConfigError, match="USER:PASSWORD"):
            read_auth(bad, None)
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(ConfigError, match="no USER:PASSWORD"):
        read_auth(None, tmp_path / "empty")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_binding(host, [])
    for host in ("0.0.0.0", "192.0.2.10", "::", "example.org"):
        with pytest.raises(ConfigError, match="--auth"):
            check_binding(host, [])
        check_binding(host, [("a", "b")])


def test_media_dir_reads_only_inside(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("a.mp4", "sub/b.MOV", "notes.txt", ".secret.mp4", ".hidden/c.mp4", "photo.jpg"):
        (root / name).write_bytes(b"x")
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"private")
    (root / "escape.mp4").symlink_to(outside)
    (root / "inside.mkv").symlink_to(root / "a.mp4")
    (root / "broken.mp4").symlink_to(tmp_path / "missing.mp4")
    (root / "sub" / "up").symlink_to(tmp_path)  # a folder link out: not followed
    media = MediaDir(root)
    assert media.names() == ["a.mp4", "inside.mkv", "photo.jpg", "sub/b.MOV"]
    assert media.resolve("sub/b.MOV") == (root / "sub" / "b.MOV").resolve()
    assert media.resolve("inside.mkv") == (root / "a.mp4").resolve()
    for name in ("escape.mp4", "broken.mp4", "../outside.mp4", str(outside), "sub/up/outside.mp4", "sub", "nope.mp4"):
        with pytest.raises(InputError, match="not a file in the media folder"):
            media.resolve(name)
    with pytest.raises(ConfigError, match="not a folder"):
        MediaDir(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--host", "0.0.0.0"], "--auth USER:PASSWORD"),
        (["--host", "192.0.2.1", "--auth", "nopassword"], "USER:PASSWORD"),
        (["--max-upload", "lots"], "is not a size"),
        (["--media-dir", "missing"], "is not a folder"),
        (["--model", "GPEN-BFR-3"], "unknown model"),
    ],
)
def test_cli_refuses_unsafe_or_impossible_setups(args, words, tmp_path, monkeypatch, capsys) -> None:
    from gpen_video.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["web", *args, "--jobs-dir", str(tmp_path / "jobs")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize(
    ("suffix", "codec", "image", "expected"),
    [(".mp4", "h264", False, ".mp4"), (".mkv", "h264", False, ".mkv"), (".webm", "h264", False, ".mp4"),
     (".mp4", "ffv1", False, ".mkv"), (".mov", "ffv1", False, ".mkv"), (".avi", "ffv1", False, ".avi"),
     (".avi", "h264", False, ".mp4"), (".mp4", "prores", False, ".mov"),
     (".webm", "h265", False, ".mp4"), (".jpg", "ffv1", True, ".jpg")],
)
def test_output_suffix(suffix: str, codec: str, image: bool, expected: str, tmp_path: Path) -> None:
    """A job's output keeps the input's container unless the codec cannot go in it."""
    from gpen_video import load_config

    source = tmp_path / f"in{suffix}"
    source.write_bytes(b"x")
    job = JobStore(tmp_path / "jobs").create("me", source, source.name, load_config(None, codec=codec), link_input=False)
    assert (job.output.suffix, job.image) == (expected, image)
    assert image or job.output.suffix == output_suffix(suffix, codec)


def test_job_record_round_trip(tmp_path: Path) -> None:
    from gpen_video import load_config

    source = tmp_path / "tape 3.mov"
    source.write_bytes(b"video")
    store = JobStore(tmp_path / "jobs")
    config = load_config("archival", skip_tracks=(3, 7), weights=str(tmp_path / "w.pth"))
    job = store.create(owner_of("token"), source, "tape 3.mov", config, link_input=True)
    assert job.input == tmp_path / "jobs" / job.id / "input" / "tape 3.mov" and job.input.read_bytes() == b"video"
    assert job.output.name == "tape 3.restored.mkv" and job.state == "queued"
    again = JobStore(tmp_path / "jobs")  # a restarted server reads the same jobs
    assert again.get(job.id) == job and again.unfinished() == [job]
    assert again.get(job.id, owner_of("another browser")) is None and again.latest(owner_of("token")) == job


def test_ended_jobs_and_stale_uploads_expire(tmp_path: Path) -> None:
    """With keep_seconds, ended jobs older than that go with their folders and served files;
    newer ones, waiting ones and uploads still young stay; a restarted store agrees."""
    from gpen_video import load_config
    from gpen_video.web.jobs import JobRunner

    source, served = tmp_path / "tape.mp4", tmp_path / "served"
    source.write_bytes(b"video")
    store = JobStore(tmp_path / "jobs")
    now, day = time.time(), 86400.0
    jobs = {}
    for name, state, age in [("old done", "done", 9), ("old failed", "failed", 8), ("old waiting", "queued", 9),
                             ("new done", "done", 1)]:
        job = store.create(owner_of("token"), source, f"{name}.mp4", load_config(None), link_input=True)
        jobs[name] = store.set(job.id, persist=True, state=state, created=now - age * day)
        (served / job.id).mkdir(parents=True)
        (served / job.id / job.output.name).write_bytes(b"result")
    stale, young = served / "0f3a-upload", served / "9c2e-upload"
    for folder, age in ((stale, 8), (young, 0)):
        folder.mkdir()
        (folder / "clip.mp4").write_bytes(b"upload")
        os.utime(folder, (now - age * day, now - age * day))

    JobRunner(store, pipelines=None, served=served, keep_seconds=7 * day).expire()

    gone, kept = ("old done", "old failed"), ("old waiting", "new done")
    for name in gone:
        assert store.get(jobs[name].id) is None
        assert not (tmp_path / "jobs" / jobs[name].id).exists() and not (served / jobs[name].id).exists()
    for name in kept:
        assert store.get(jobs[name].id) == jobs[name] and (served / jobs[name].id).is_dir()
    assert not stale.exists() and young.is_dir()
    assert {j.id for j in JobStore(tmp_path / "jobs").unfinished()} == {jobs["old waiting"].id}
    assert JobStore(tmp_path / "jobs").get(jobs["old done"].id) is None


@pytest.mark.parametrize("days, words", [("-1", "days are a number >= 0"), ("week", "expected a number of days")])
def test_keep_days_must_be_a_number(days, words, tmp_path, capsys) -> None:
    from gpen_video.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["web", "--keep-days", days, "--jobs-dir", str(tmp_path / "jobs")])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_cli_without_gradio_says_what_to_install(tmp_path: Path) -> None:
    program = ("import sys; sys.modules['gradio'] = None; from gpen_video.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", program, "web", "--jobs-dir", str(tmp_path / "jobs")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ['error: the web page needs Gradio: pip install "gpen-video[web]"']


# ---------------------------------------------------------------------- the page in Chromium


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from samples.make_demo import render_clip

    folder = tmp_path_factory.mktemp("web-clips")
    media = folder / "media"
    media.mkdir()
    made = {
        "mkv": folder / "demo.mkv",  # same container family in and out with FFV1: timestamps compare exactly
        "long": folder / "long.mp4",
        "short": folder / "short.mp4",
        "media": media / "demo.mp4",
    }
    for key, path in made.items():
        render_clip(path, seconds=6.0 if key == "long" else 2.0, size=SIZE, faces=2, seed=len(key))
    made["text"] = folder / "notes.txt"
    made["text"].write_text("Tape 3: christmas 1994, grandma's house\n")
    return made


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Screens:
    folder = tmp_path_factory.mktemp("web-screens")
    print(f"\nweb page screenshots: {folder}")
    return Screens(folder)


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is missing ({CHROMIUM}); .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gpen256_file: Path, clips: dict[str, Path]):
    pytest.importorskip("gradio")
    web = WebServer.start(tmp_path_factory.mktemp("web") / "jobs", gpen256_file, media_dir=clips["media"].parent)
    yield web
    assert web.stop() == 0, web.log.read_text()


@pytest.fixture
def page(chromium, server: WebServer):
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    outside: list[str] = []
    local = ("http://127.0.0.1", "data:", "blob:")
    tab.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    tab.goto(server.url)
    yield tab
    context.close()
    assert not outside, f"the page reached outside this machine: {outside}"


def _audio(path: Path) -> list[tuple[int | None, int | None, bytes]]:
    with av.open(str(path)) as container:
        index = container.streams.audio[0].index
    return read_packets(path)[index]


def _planes(path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every frame's stored Y, U and V samples (yuv420p), exactly as the file holds them."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            assert frame.format.name == "yuv420p"
            planes = []
            for i, plane in enumerate(frame.planes):
                h, w = (frame.height, frame.width) if i == 0 else ((frame.height + 1) // 2, (frame.width + 1) // 2)
                planes.append(np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w].copy())
            frames.append(tuple(planes))
    return frames


def _plan(clip: Path, weights: Path) -> list[tuple]:
    """Every frame's tracked faces, as the server's job plans them (same settings)."""
    from gpen_video.io.decode import VideoReader
    from gpen_video import FacePipeline, load_config

    pipeline = FacePipeline(load_config(None, model="GPEN-BFR-256", weights=str(weights), device="cpu"))
    with VideoReader(clip) as reader:
        return [(p.frame.index, p.tracked, p.faces) for p in pipeline.planner.plan(reader.frames())]


def _same_stream(source: Path, result: Path) -> None:
    """The result has the source's frames (count and pts) and its audio packets, byte for byte."""
    assert [f.pts for f in read_frames(result)] == [f.pts for f in read_frames(source)]
    assert _audio(result) == _audio(source)


def test_restore_leaves_an_unticked_face_alone(page, server, clips, screens, gpen256_file, tmp_path) -> None:
    clip = clips["mkv"]
    upload(page, clip)
    labels = wait_faces(page, 2)
    assert [label.split(" · ")[0] for label in labels] == ["Face 0", "Face 1"]
    first = wait_preview_change(page, ["", ""])  # found faces are previewed at once
    screens(page, "faces-found")

    choose(page, "codec", "FFV1")
    page.locator("#faces label", has_text="Face 1").click()
    assert page.locator("#faces input[type=checkbox]").nth(1).is_checked() is False
    set_frame(page, 10)
    second = wait_preview_change(page, first)
    assert len(second) == 2 and second[0] != second[1]
    screens(page, "preview")

    page.locator("#restore-button").click()
    shown = wait_job(page, "done")
    assert shown["done"] == shown["total"] == "50"
    screens(page, "restored")
    record = json.loads((server.jobs_dir / "jobs" / shown["job"] / "job.json").read_bytes())
    assert record["config"]["skip_tracks"] == [1] and record["config"]["codec"] == "ffv1"
    assert page.locator("#output-video video").count() == 0  # FFV1 does not play in browsers
    assert "download it below" in page.locator("#progress").inner_text()

    result = download(page, tmp_path)
    assert result.name == "demo.restored.mkv"
    _same_stream(clip, result)
    before, after = _planes(clip), _planes(result)
    assert len(after) == len(before) == 50
    _check_skipped_face_untouched(_plan(clip, gpen256_file), before, after, skipped=1)


def _check_skipped_face_untouched(plan, before, after, *, skipped: int) -> None:
    """The stored samples in the skipped track's boxes are exactly the input's (FFV1 is
    lossless), except where the restored face's paste-back region overlaps them; the restored
    face changed."""
    from gpen_video.faces.align import face_affine, paste_region

    height, width = before[0][0].shape
    compared = changed = restored = 0
    for index, tracked, faces in plan:
        keep = np.zeros((height, width), bool)
        for face in tracked:
            if face.track_id == skipped:
                x1, y1, x2, y2 = face.box
                keep[max(0, int(y1)) : int(np.ceil(y2)) + 1, max(0, int(x1)) : int(np.ceil(x2)) + 1] = True
        for face in (f for f in faces if f.track_id != skipped):
            region = paste_region(face_affine(face.landmarks, 256), 256, height, width)
            if region is not None:
                x0, y0, x1, y1 = region
                keep[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = False
            x0, y0, x1, y1 = np.clip(face.box, 0, [width, height, width, height]).astype(int)
            luma = np.abs(after[index][0][y0:y1, x0:x1].astype(int) - before[index][0][y0:y1, x0:x1].astype(int))
            restored += luma.size > 0 and luma.mean() > 10
        chroma_keep = keep[0::2, 0::2] & keep[1::2, 0::2] & keep[0::2, 1::2] & keep[1::2, 1::2]  # [H/2, W/2]
        for plane, mask in enumerate((keep, chroma_keep, chroma_keep)):
            compared += int(mask.sum())
            changed += int((after[index][plane][mask] != before[index][plane][mask]).sum())
    assert compared > 50 * 30 * 30, "the skipped face was hardly ever apart from the restored one"
    assert changed == 0, f"{changed} of {compared} samples of the skipped face changed"
    assert restored >= 40, f"the restored face changed visibly in only {restored} frames"


def test_cancel_a_running_job_and_a_waiting_one(page, chromium, server, clips, screens) -> None:
    upload(page, clips["long"])
    wait_ready(page)
    page.locator("#restore-button").click()
    running = wait_job(page, "running", done_at_least=1)

    other_context = chromium.new_context(viewport={"width": 1280, "height": 900})
    other = other_context.new_page()
    other.goto(server.url)
    upload(other, clips["short"])
    wait_ready(other)
    other.locator("#restore-button").click()
    waiting = wait_job(other, "queued")
    assert "1 job ahead of yours" in other.locator("#progress").inner_text()
    screens(other, "waiting-in-queue")
    other.locator("#cancel-button").click()
    assert wait_job(other, "cancelled")["job"] == waiting["job"]
    other_context.close()

    page.locator("#cancel-button").click()
    shown = wait_job(page, "cancelled")
    assert shown["job"] == running["job"] and int(shown["done"]) < 150
    screens(page, "cancelled")
    assert "cancelled; nothing was written" in page.locator("#progress").inner_text()
    assert page.locator("#output-file a[download]").count() == 0
    for job_id in (running["job"], waiting["job"]):
        folder = server.jobs_dir / "jobs" / job_id
        assert sorted(p.name for p in folder.iterdir()) == ["job.json"]  # no output, no temporary file
        assert json.loads((folder / "job.json").read_bytes())["state"] == "cancelled"
        assert not (server.jobs_dir / "served" / job_id).exists()


def _http_status(server: WebServer, path: Path) -> int:
    url = server.url + "gradio_api/file=" + urllib.parse.quote(str(path))
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_reload_shows_the_running_job_until_it_is_done(page, chromium, server, clips, screens, tmp_path) -> None:
    choose(page, "media-file", "demo.mp4")  # picked from --media-dir, not uploaded
    wait_faces(page, 2)
    page.locator("#restore-button").click()
    started = wait_job(page, "running")
    page.reload()
    again = wait_job(page, "running", "done")
    assert again["job"] == started["job"]
    screens(page, "reloaded-mid-job")
    done = wait_job(page, "done")
    assert done["job"] == started["job"]
    page.locator("#output-video video").wait_for()
    screens(page, "restored-after-reload")
    result = download(page, tmp_path)
    assert result.name == "demo.restored.mp4"
    _same_stream(clips["media"], result)
    served = server.jobs_dir / "served" / done["job"] / result.name
    assert _http_status(server, served) == 200
    for private in (clips["media"], server.jobs_dir / "jobs" / done["job"] / "job.json", Path("/etc/hostname")):
        assert _http_status(server, private) == 403, private  # only the app's served folder

    stranger_context = chromium.new_context()
    stranger = stranger_context.new_page()
    stranger.goto(server.url)
    stranger.locator("#restore-button").wait_for()
    stranger.wait_for_timeout(2 * 1000)
    assert job(stranger) == {}  # another browser does not see this job
    stranger_context.close()


def test_a_text_file_gets_one_readable_error(page, clips, screens) -> None:
    upload(page, clips["text"])
    error = page.locator("#error .gv-error")
    error.wait_for(timeout=60_000)
    text = error.inner_text().strip()
    screens(page, "error")
    assert text.count("\n") == 0
    assert text.startswith("input file notes.txt is not a video FFmpeg can read"), text
    assert "Traceback" not in page.content()
    assert page.locator("#restore-button").is_disabled()


def test_a_job_continues_after_the_server_is_killed(chromium, gpen256_file, clips, screens, tmp_path) -> None:
    """Killed mid-job (kill -9), the next server on the same folder continues the job from its
    finished segments, and the page shows it again."""
    pytest.importorskip("gradio")
    jobs = tmp_path / "jobs"
    preset = tmp_path / "short-segments.toml"
    preset.write_text("segment_seconds = 0.4\n")  # 2 s clip: 5 segments of 10 frames
    first = WebServer.start(jobs, gpen256_file, extra=("--config", str(preset)))
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    try:
        page.goto(first.url)
        upload(page, clips["short"])
        wait_faces(page, 2)
        page.locator("#restore-button").click()
        started = wait_job(page, "running", done_at_least=25)
        first.kill()  # as a crash or a power cut would
        record = jobs / "jobs" / started["job"] / "job.json"
        assert json.loads(record.read_bytes())["state"] == "running"

        second = WebServer.start(jobs, gpen256_file, port=first.port, extra=("--config", str(preset)))
        try:
            page.goto(second.url)
            done = wait_job(page, "done")
            assert done["job"] == started["job"]
            screens(page, "done-after-server-restart")
            ended = json.loads(record.read_bytes())
            assert ended["runs"] == 2 and ended["config"]["segment_seconds"] == 0.4
            assert 10 <= ended["resumed_at"] <= int(started["done"]), ended  # finished segments were kept
            result = download(page, tmp_path)
            _same_stream(clips["short"], result)
            assert sorted(p.name for p in record.parent.iterdir()) == ["job.json", result.name]
        finally:
            assert second.stop() == 0
    finally:
        context.close()
        first.kill()
