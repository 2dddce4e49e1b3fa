"""Make the README's screenshot of the web page (docs/web.png) after a finished restore.

    python -m tests.web_screenshot docs/web.png

Runs the real server on a free port of 127.0.0.1 with a generated random-weight GPEN-BFR-256
checkpoint (no real weights can be shipped), restores the demo clip with one face left alone,
and saves the page, scaled to ``WIDTH`` and reduced to a palette so the PNG stays small. With
random weights the restored face is noise: the README's caption says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from gpen_video.restore.model import preset_config
from samples.make_demo import render_clip
from tests.conftest import random_state_dict
from tests.web_browser import WebServer, launch_chromium, upload, wait_faces, wait_job, wait_preview_change

WIDTH = 1000
"""Width of the saved picture in pixels."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the PNG, e.g. docs/web.png")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = folder / "GPEN-BFR-256.pth"
        torch.save(random_state_dict(preset_config("GPEN-BFR-256"), seed=1), weights)
        clip = folder / "family-tape.mp4"
        render_clip(clip, seconds=2.0, size=(640, 360), faces=2)
        server = WebServer.start(folder / "jobs", weights)
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(server.url)
                upload(page, clip)
                wait_faces(page, 2)
                shown = wait_preview_change(page, ["", ""])
                page.locator("#faces label", has_text="Face 1").click()
                wait_preview_change(page, shown)
                page.locator("#restore-button").click()
                wait_job(page, "done")
                page.locator("#output-video video").wait_for()
                page.wait_for_timeout(1000)
                raw = folder / "page.png"
                page.screenshot(path=str(raw), full_page=True)
                browser.close()
        finally:
            server.stop()
        picture = Image.open(raw).convert("RGB")
        height = round(picture.height * WIDTH / picture.width)
        small = picture.resize((WIDTH, height), Image.Resampling.LANCZOS).quantize(colors=256, dither=Image.Dither.NONE)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        small.save(args.output, optimize=True)
    print(f"{args.output}: {WIDTH}x{height}, {args.output.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
