"""Helpers for the web page's browser tests: the server as a real process, Chromium, the page.

``WebServer.start`` runs ``python -m gpen_video web`` on a free port of 127.0.0.1 and waits
for the address it prints. Playwright drives Debian's Chromium (``/usr/bin/chromium``); no
browser is downloaded. The page is found only through its stable ``elem_id`` handles.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = os.environ.get("GPEN_VIDEO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
WAIT_MS = 120_000
"""Longest wait for one state of the page (a job on two shared cores)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebServer:
    """A ``gpen-video web`` process and where it keeps its jobs."""

    process: subprocess.Popen
    port: int
    url: str
    jobs_dir: Path
    log: Path

    @staticmethod
    def start(jobs_dir: Path, weights: Path, *, media_dir: Path | None = None, extra: tuple[str, ...] = (),
              port: int | None = None, timeout: float = 120.0) -> "WebServer":
        port = port or free_port()
        log = jobs_dir.parent / f"{jobs_dir.name}-server-{port}.log"
        command = [
            sys.executable, "-m", "gpen_video", "web", "--port", str(port), "--jobs-dir", str(jobs_dir),
            "--model", "GPEN-BFR-256", "--weights", str(weights), "--device", "cpu", *extra,
        ]
        if media_dir is not None:
            command += ["--media-dir", str(media_dir)]
        out = open(log, "w")
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text()
            if "gpen-video web: open http://" in text:
                url = text.split("gpen-video web: open ", 1)[1].split()[0]
                return WebServer(process, port, url, jobs_dir, log)
            if process.poll() is not None:
                raise RuntimeError(f"the web server exited with {process.returncode}:\n{text}")
            time.sleep(0.2)
        process.kill()
        raise RuntimeError(f"the web server did not start in {timeout} s:\n{log.read_text()}")

    def stop(self) -> int:
        """SIGTERM (the server's clean stop), then SIGKILL if it hangs; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash or power loss, nothing cleaned up."""
        self.process.kill()
        self.process.wait()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class Screens:
    """Saves a full-page screenshot of each state as ``NN-name.png`` in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self, page, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


# ---------------------------------------------------------------------- the page, by elem_id


def upload(page, path: Path) -> None:
    page.locator("#input-file input[type=file]").set_input_files(str(path))


def wait_faces(page, count: int) -> list[str]:
    """Wait for the faces found; returns the labels of their switches."""
    page.wait_for_function(
        "n => document.querySelectorAll('#faces input[type=checkbox]').length == n", arg=count, timeout=WAIT_MS
    )
    return page.locator("#faces label").all_inner_texts()


def wait_ready(page) -> None:
    """Wait until the faces are found and the restore button is enabled."""
    page.wait_for_function("document.querySelector('#restore-button')?.disabled === false", timeout=WAIT_MS)


def choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` (its visible text) in the dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.locator("li[role=option]", has_text=option).first.click()


def before_after(page) -> list[str]:
    """Addresses of the images the before/after slider shows (two once a preview is there)."""
    return page.locator("#before-after img").evaluate_all("els => els.map(e => e.src)")


def wait_preview_change(page, old: list[str]) -> list[str]:
    page.wait_for_function(
        """old => {
            const s = [...document.querySelectorAll('#before-after img')].map(e => e.src);
            return s.length == 2 && s[0] != s[1] && (s[0] != old[0] || s[1] != old[1]);
        }""",
        arg=old, timeout=WAIT_MS,
    )
    return before_after(page)


def set_frame(page, index: int) -> None:
    box = page.locator("#preview-frame input[type=number]")
    box.fill(str(index))
    box.press("Enter")


def job(page) -> dict[str, str]:
    """The data attributes of the job shown in ``#progress`` (job, state, done, total), or {}."""
    element = page.locator("#progress .gv-job")
    if element.count() == 0:
        return {}
    return element.evaluate("e => ({...e.dataset})")


def wait_job(page, *states: str, done_at_least: int = 0) -> dict[str, str]:
    page.wait_for_function(
        """([states, least]) => {
            const e = document.querySelector('#progress .gv-job');
            return e && states.includes(e.dataset.state) && Number(e.dataset.done) >= least;
        }""",
        arg=[list(states), done_at_least], timeout=WAIT_MS,
    )
    return job(page)


def download(page, folder: Path) -> Path:
    """Click the result's download link; returns where the downloaded file was saved."""
    with page.expect_download(timeout=WAIT_MS) as info:
        page.locator("#output-file a[download]").click()
    got = info.value
    path = folder / got.suggested_filename
    got.save_as(str(path))
    return path
