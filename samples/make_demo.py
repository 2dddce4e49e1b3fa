"""Make a short demo clip: scikit-image's astronaut moving, degraded, with a sine tone.

    python samples/make_demo.py demo.mp4            # 4 s, 640x360, one face
    python samples/make_demo.py crowd.mp4 --faces 3 # three faces whose paths cross
    gpen-video restore demo.mp4 --model GPEN-BFR-256

The face moves, scales and turns along smooth known paths, then the frame is blurred,
noised and JPEG-compressed like an old tape. ``render_clip`` returns each frame's
similarity transforms so tests can compare tracked landmarks with the truth.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

HEAD_CENTRE = (236.0, 150.0)
"""Centre of the astronaut's face in ``skimage.data.astronaut()`` pixels."""
HEAD_RADIUS = 130.0


@dataclass(frozen=True)
class FacePath:
    """A face moving along smooth sinusoids: centre (px), scale, rotation (degrees)."""

    centre: tuple[float, float]
    amplitude: tuple[float, float] = (40.0, 20.0)
    period: float = 3.0
    phase: float = 0.0
    scale: float = 0.5
    scale_swing: float = 0.05
    degrees: float = 6.0

    def at(self, t: float) -> np.ndarray:
        """(2, 3) matrix mapping astronaut pixels to frame pixels at time ``t`` seconds."""
        w = 2 * math.pi * t / self.period + self.phase
        cx = self.centre[0] + self.amplitude[0] * math.sin(w)
        cy = self.centre[1] + self.amplitude[1] * math.sin(2 * w)
        s = self.scale * (1 + self.scale_swing * math.sin(w + 1.0))
        a = math.radians(self.degrees * math.sin(w + 0.5))
        m = s * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        offset = np.array([cx, cy]) - m @ np.array(HEAD_CENTRE)
        return np.hstack([m, offset[:, None]])


def default_paths(faces: int, size: tuple[int, int]) -> list[FacePath]:
    """``faces`` paths spread across the frame; neighbours swing past each other (their x cross)
    at different heights, so no face hides another."""
    w, h = size
    scale = (0.9 if faces == 1 else 0.5) * h / 360
    return [
        FacePath(
            centre=((i + 0.5) * w / faces, h / 2 + (0.0 if faces == 1 else (0.22 if i % 2 else -0.22) * h)),
            amplitude=(0.6 * w / faces if faces > 1 else 40.0 * w / 640, 20.0 * h / 360),
            phase=math.pi * i,
            scale=scale,
        )
        for i in range(faces)
    ]


def degrade(rgb: np.ndarray, rng: np.random.Generator, *, blur: float = 2.0, noise: float = 6.0, jpeg: int = 35) -> np.ndarray:
    """Blur, add noise and JPEG-compress like a worn tape."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, int(w / blur)), max(1, int(h / blur))), interpolation=cv2.INTER_AREA)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    out += rng.normal(0, noise, out.shape).astype(np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", out[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def compose(face: np.ndarray, transforms: Sequence[np.ndarray], size: tuple[int, int], shot: int = 0) -> np.ndarray:
    """Paste the face (with a soft round mask) at every transform on a gradient background.

    ``shot`` picks the background: even and odd shots look clearly different (a scene cut).
    """
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if shot % 2 == 0:
        canvas = np.dstack([60 + 80 * x / w, 90 + 40 * y / h, 120 - 50 * x / w]).astype(np.float32)
    else:
        stripes = 40 * (np.sin(x / 9.0) > 0)
        canvas = np.dstack([200 - 60 * y / h + stripes, 150 + stripes, 40 + 30 * x / w]).astype(np.float32)
    yy, xx = np.mgrid[0 : face.shape[0], 0 : face.shape[1]].astype(np.float32)
    dist = np.hypot(xx - HEAD_CENTRE[0], yy - HEAD_CENTRE[1])
    mask = np.clip((HEAD_RADIUS - dist) / 15.0, 0, 1)
    for m in transforms:
        warped = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
        alpha = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR)[:, :, None]
        canvas = canvas * (1 - alpha) + warped * alpha
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def render_clip(
    path: str | Path,
    *,
    seconds: float = 4.0,
    size: tuple[int, int] = (640, 360),
    rate: Fraction = Fraction(25),
    paths: Sequence[FacePath] | None = None,
    faces: int = 1,
    visible: Callable[[int, int], bool] | None = None,
    cut_at: int | None = None,
    degraded: bool = True,
    audio: bool = True,
    seed: int = 0,
) -> list[list[np.ndarray | None]]:
    """Write the clip; returns, per frame, each face's (2, 3) transform (None where hidden).

    ``visible(face, frame_index)`` hides a face on some frames (faces entering and leaving);
    from frame ``cut_at`` on, the background changes (a scene cut).
    """
    from skimage.data import astronaut

    face = astronaut()
    paths = list(paths) if paths is not None else default_paths(faces, size)
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * rate))
    truth: list[list[np.ndarray | None]] = []
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"crf": "20", "preset": "veryfast"})
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = out.add_stream("aac", rate=48000) if audio else None
        for i in range(frames):
            shown = [p.at(i / rate) if visible is None or visible(k, i) else None for k, p in enumerate(paths)]
            truth.append(shown)
            shot = int(cut_at is not None and i >= cut_at)
            rgb = compose(face, [m for m in shown if m is not None], size, shot)
            if degraded:
                rgb = degrade(rgb, rng)
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            samples = int(seconds * 48000)
            t = np.arange(samples) / 48000
            tone = (0.2 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = tone[start : start + 1024][None, :]
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate, frame.pts = 48000, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", default="demo.mp4")
    parser.add_argument("--faces", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", default="640x360", help="WxH")
    parser.add_argument("--clean", action="store_true", help="do not degrade the frames")
    args = parser.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    render_clip(args.output, seconds=args.seconds, size=(w, h), faces=args.faces, degraded=not args.clean)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
