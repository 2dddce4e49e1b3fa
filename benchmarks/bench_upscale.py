"""Upscaling quality on real pictures, and speed on this machine, per upscaler.

Quality: crops of real pictures (two frames of a 1080p clip, a 1927 group photo) are
downscaled 2× and 4× (OpenCV INTER_AREA, as a camera or a tape loses resolution), upscaled
back by each upscaler and compared with the original crop: PSNR and SSIM (scikit-image, RGB,
data range 255) and sharpness, the variance of the Laplacian of the grey image divided by the
original's (1.0 = as crisp as the original; bicubic and Lanczos stay well below it).

Speed: seconds per input megapixel at scale 2 on this machine. The filters and
realesr-animevideov3 run on a whole 720×576 frame (SD video) with the stage's default tiles;
realesrgan-x4plus runs on a 256×256 crop as one tile (a whole SD frame takes minutes), and the
tile overhead a whole SD frame would add is printed beside it.

    python benchmarks/bench_upscale.py --video crowd_1080p.mp4 --photo solvay_1927.png \\
        --picture docs/upscale_faces.png
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpen_video.upscale.networks import RRDBConfig, SRVGGConfig  # noqa: E402
from gpen_video.upscale.upscaler import (  # noqa: E402
    MAX_DEFAULT_PAD,
    UPSCALERS,
    UpscaleConfig,
    Upscaler,
    create_upscaler,
)

NETWORKS = ("realesr-animevideov3", "realesrgan-x4plus")
COLUMNS = ("bicubic", "lanczos") + NETWORKS
# (source, frame index or None for the photo, x, y, width, height, face box x, y, side within the crop):
# crops holding several faces, and the one face the side-by-side picture shows of each
CROPS = (
    ("video", 20, 640, 500, 512, 512, 30, 30, 160),
    ("video", 80, 768, 560, 512, 512, 20, 45, 160),
    ("photo", None, 400, 40, 512, 256, 272, 120, 96),
)
CELL = 160
SD = (576, 720)


class Bicubic(Upscaler):
    """OpenCV bicubic: the baseline every upscaler must beat."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        n, _, h, w = frames.shape
        hwc = frames.permute(0, 2, 3, 1).numpy()
        out = [cv2.resize(f, (w * self.scale, h * self.scale), interpolation=cv2.INTER_CUBIC) for f in hwc]
        return torch.from_numpy(np.clip(np.stack(out), 0, 1)).permute(0, 3, 1, 2)


def make(name: str, scale: int, tile: int = 256) -> Upscaler:
    return Bicubic(scale) if name == "bicubic" else create_upscaler(UpscaleConfig(name, scale=scale, tile=tile))


def video_frame(path: Path, index: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise SystemExit(f"error: {path} has fewer than {index + 1} frames")


def sharpness(rgb: np.ndarray) -> float:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def timed(up: Upscaler, rgb: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = up.upscale_rgb(rgb)
    return out, time.perf_counter() - start


def tile_overhead(shape: tuple[int, int], tile: int, pad: int) -> float:
    """Pixels the network computes over pixels of the frame, for the stage's tiling."""
    def spans(n: int) -> list[int]:
        return [min(s + tile, n) - s + min(pad, s) + min(pad, n - min(s + tile, n)) for s in range(0, n, tile)]

    h, w = shape
    return sum(spans(h)) * sum(spans(w)) / (h * w)


def network_flops(config: RRDBConfig | SRVGGConfig) -> float:
    """Floating-point operations (2 per multiply-add) of the 3×3 convolutions per input pixel."""
    total = 0.0
    for key, shape in config.layout().items():
        if len(shape) != 4:
            continue
        if isinstance(config, RRDBConfig):  # pixels the layer runs on, per input pixel
            pixels = {"conv_up1": 4, "conv_up2": 16, "conv_hr": 16, "conv_last": 16}.get(key.rsplit(".", 1)[0], 1)
            pixels /= config.input_multiple**2
        else:
            pixels = 1
        total += 2 * math.prod(shape) * pixels
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, required=True, help="a real 1080p clip (e.g. crowd_1080p.mp4)")
    parser.add_argument("--photo", type=Path, required=True, help="a real photo (e.g. solvay_1927.png)")
    parser.add_argument("--picture", type=Path, help="write a side-by-side PNG of face crops here")
    args = parser.parse_args(argv)

    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    photo = cv2.cvtColor(cv2.imread(str(args.photo), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    frames = {i: video_frame(args.video, i) for _, i, *_ in CROPS if i is not None}
    crops = []
    for source, index, x, y, w, h, *face in CROPS:
        image = photo if source == "photo" else frames[index]
        crops.append((f"{args.photo.name if source == 'photo' else f'{args.video.name}#{index}'}",
                      np.ascontiguousarray(image[y:y + h, x:x + w]), face))

    # ---------------------------------------------------------------- quality
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    picture_rows = []
    for scale in (2, 4):
        ups = {name: make(name, scale) for name in COLUMNS}
        for label, original, face in crops:
            h, w = original.shape[:2]
            small = cv2.resize(original, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
            base = sharpness(original)
            row = {"original": original}
            for name, up in ups.items():
                out, seconds = timed(up, small)
                psnr = peak_signal_noise_ratio(original, out, data_range=255)
                ssim = structural_similarity(original, out, channel_axis=2, data_range=255)
                results.setdefault((scale, name), []).append((psnr, ssim, sharpness(out) / base))
                print(f"{label:<24} x{scale} {name:<22} PSNR {psnr:6.2f} dB  SSIM {ssim:.4f}  "
                      f"sharpness {sharpness(out) / base:.2f}  ({seconds:.1f} s)", flush=True)
                row[name] = out
            if scale == 4:
                picture_rows.append((face, row))
    print("\n| scale | upscaler | PSNR dB | SSIM | sharpness (original = 1) |\n| --- | --- | --- | --- | --- |")
    for (scale, name), values in results.items():
        psnr, ssim, sharp = np.mean(values, axis=0)
        print(f"| {scale}× | {name} | {psnr:.2f} | {ssim:.3f} | {sharp:.2f} |")

    # ---------------------------------------------------------------- speed
    sd = cv2.resize(frames[80], SD[::-1], interpolation=cv2.INTER_AREA)
    print("\n| upscaler (×2) | input | seconds | s per input MP | SD minute (720×576, 25 fps) |\n"
          "| --- | --- | --- | --- | --- |")
    for name in COLUMNS:
        rgb = sd if name != "realesrgan-x4plus" else np.ascontiguousarray(sd[160:416, 232:488])
        up = make(name, 2)
        up.upscale_rgb(rgb[:32, :32])  # warm up
        _, seconds = timed(up, rgb)
        per_mp = seconds / (rgb.shape[0] * rgb.shape[1] / 1e6)
        overhead = 1.0
        if name in NETWORKS and rgb.shape[:2] != SD:
            overhead = tile_overhead(SD, 256, min(UPSCALERS[name].network.receptive_radius, MAX_DEFAULT_PAD) + 1)
        minute = per_mp * SD[0] * SD[1] / 1e6 * 1500 * overhead
        note = f" (× {overhead:.2f} tile overhead)" if overhead != 1.0 else ""
        print(f"| {name} | {rgb.shape[1]}×{rgb.shape[0]} | {seconds:.2f} | {per_mp:.2f} | "
              f"{minute / 3600:.2f} h{note} |", flush=True)

    print("\n| network | GFLOP per input megapixel (any output scale) |\n| --- | --- |")
    for name in NETWORKS:
        print(f"| {name} | {network_flops(UPSCALERS[name].network) / 1e3:,.0f} |")

    if args.picture:
        tiles = []
        for (fx, fy, side), row in picture_rows:
            cells = []
            for name in ("original",) + COLUMNS:
                cell = cv2.resize(row[name][fy:fy + side, fx:fx + side], (CELL, CELL), interpolation=cv2.INTER_NEAREST)
                cell = cv2.copyMakeBorder(cell, 22, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255))
                cv2.putText(cell, name if name == "original" else f"{name} x4", (4, 16), cv2.FONT_HERSHEY_SIMPLEX,
                            0.38, (0, 0, 0), 1, cv2.LINE_AA)
                cells.append(cell)
            tiles.append(np.hstack(cells))
        width = max(t.shape[1] for t in tiles)
        tiles = [cv2.copyMakeBorder(t, 0, 0, 0, width - t.shape[1], cv2.BORDER_CONSTANT, value=(255,) * 3)
                 for t in tiles]
        args.picture.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.picture), cv2.cvtColor(np.vstack(tiles), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_PNG_COMPRESSION, 9])
        print(f"\nwrote {args.picture} ({args.picture.stat().st_size / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
