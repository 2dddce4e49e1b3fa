"""A corpus of bad, damaged and unusual inputs for ``gpen-video restore``, made on the fly.

Every case is a real run of the command line in a subprocess, in a folder of its own, with
what must come of it declared beside it: the documented exit code, the one ``error:`` line
(and what it must name), or, for a success, the files that must appear and decode. Nothing
binary is committed: the media, images, weights and folders are generated in a temporary
directory by ``corpus(root, weights)``::

    with corpus(tmp_path / "cases", gpen256_file) as generated:
        outcomes = run_corpus(generated.cases, corpus_env(tmp_path))
        problems = {o.case.name: check(o) for o in outcomes}

Checked for every case (``check``):
- the exit code is the documented one;
- a failure prints exactly one line holding ``error:`` (a folder: one per failed file), a
  success none, and there is never a traceback;
- the run ends within the case's time limit;
- no file is left behind: the case's folder gains exactly the declared outputs on success
  and nothing on failure; no file already there changes (the input's bytes are hashed before
  and after);
- outputs decode (videos with PyAV, images with OpenCV), at the input's size, with the mode a
  new file gets from the umask;
- a success prints no warning, except the one a case allows (a damaged video may succeed
  with one warning that counts the lost frames: the count is checked against the output);
- "check free disk space" appears only when the disk is full.

Exit codes (README): 0 done, 1 some files of a folder failed, 2 bad option or config,
3 unusable input, 4 output cannot be written, 5 weights problem, 6 device unavailable.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from PIL import Image
from skimage.data import astronaut

from tests.clips import corrupt_middle, make_clip, truncate

REPO = Path(__file__).resolve().parent.parent
CASE_TIMEOUT_S = 120.0
ERROR_LINE = re.compile(r"\berror:")
WARNING_LINE = re.compile(r"^warning:")
DISK_SPACE = re.compile(r"disk space", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    """One run of ``gpen-video restore ARGS`` in ``folder`` and what must come of it.

    Attributes:
        name: unique id, also the name of the case's folder.
        kind: the group of the README's exit-code table it belongs to.
        folder: where the command runs (its working directory) and where its files live.
        args: the arguments after ``restore``; relative paths are relative to ``folder``.
        code: the documented exit code.
        message: regex the ``error:`` line must match (failures), e.g. the file it names.
        outputs: files a run that exits 0 or 1 must create, relative to ``folder``.
        size: (width, height) every output must have; None: not checked.
        warning: regex of the one ``warning:`` line a success may print; None: none allowed.
        errors: number of ``error:`` lines when ``code`` is not 0 (a folder: one per file).
        frames: frames of the undamaged source: an output with fewer must come with a warning
            "N of about M frames could not be decoded" counting them (within one frame).
        warned: the ``warning`` must be printed (not only allowed).
        also: another acceptable exit code (a FIFO may be restored or refused as a pipe).
        disk_full: the run fills a disk; only then may a message blame the disk space.
        feed: bytes written into the input FIFO while the command runs.
    """

    name: str
    kind: str
    folder: Path
    args: tuple[str, ...]
    code: int
    message: str | None = None
    outputs: tuple[str, ...] = ()
    size: tuple[int, int] | None = None
    warning: str | None = None
    errors: int = 1
    frames: int | None = None
    warned: bool = False
    also: int | None = None
    disk_full: bool = False
    feed: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    """What one case did: exit code (None on timeout), stderr, wall and CPU seconds, and the
    ``snapshot`` of its folder before and after."""

    case: Case
    code: int | None
    stderr: str
    seconds: float
    cpu_seconds: float
    before: dict[str, tuple]
    after: dict[str, tuple]


# --------------------------------------------------------------------------- generation


class _Builder:
    """Collects cases; owns the mounts and permission changes it must undo."""

    def __init__(self, root: Path, weights: Path) -> None:
        self.root = root
        self.weights = weights
        self.cases: list[Case] = []
        self.cleanups: list[Callable[[], None]] = []
        self.skipped: list[str] = []
        self.std = ("--device", "cpu", "--model", "GPEN-BFR-256", "--weights", str(weights))

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def add(self, name: str, kind: str, args: Sequence[str | Path], code: int, *,
            folder: Path | None = None, std: bool = True, **fields) -> None:
        folder = folder or self.root / name
        argv = tuple(str(a) for a in args) + (self.std if std else ())
        self.cases.append(Case(name, kind, folder, argv, code, **fields))

    def mount_tmpfs(self, where: Path, size: str, *, read_only: bool = False) -> bool:
        """Mount a small tmpfs at ``where`` (root only); False when this machine cannot."""
        if os.geteuid() != 0 or not shutil.which("mount"):
            return False
        options = f"size={size},mode=0755" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode != 0:
            return False
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(where)], capture_output=True))
        return True


def _clip(path: Path, **kwargs) -> Path:
    """A tiny clip: 6 frames of 64x48 h264 with AAC audio unless told otherwise."""
    kwargs.setdefault("frames", 6)
    kwargs.setdefault("size", (64, 48))
    return make_clip(path, **kwargs)


def _remux(src: Path, dst: Path, *, keep: Callable[[av.stream.Stream], bool] = lambda s: True,
           packets: bool = True, options: dict[str, str] | None = None) -> Path:
    """Copy the streams ``keep`` accepts from ``src`` into ``dst`` (their packets too unless
    ``packets`` is False: a container that declares streams but holds no frame)."""
    with av.open(str(src)) as source, av.open(str(dst), "w", options=options or {}) as out:
        mapping = {s.index: out.add_stream_from_template(s) for s in source.streams if keep(s)}
        out.start_encoding()  # the header, even when no packet follows
        for packet in source.demux():
            if packets and packet.size and packet.stream.index in mapping:
                packet.stream = mapping[packet.stream.index]
                out.mux(packet)
    return dst


def _portrait(size: int = 160) -> np.ndarray:
    """RGB (size, size, 3) uint8: a real face (scikit-image's astronaut)."""
    return cv2.resize(astronaut()[:300, 100:400], (size, size), interpolation=cv2.INTER_AREA)


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def _noise_clip(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """Random pixels: nearly incompressible, so the output is large (for a full disk)."""
    rng = np.random.default_rng(7)
    w, h = size
    return make_clip(path, frames=frames, size=size, audio_tracks=0, options={"crf": "0"},
                     frame_fn=lambda i: rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _inputs(b: _Builder) -> None:
    kind = "unusable input"
    for name, data in [("empty.mp4", b""), ("text.mp4", b"this is not a video\n" * 20),
                       ("random.mkv", np.random.default_rng(1).bytes(40_000)),
                       ("random.jpg", np.random.default_rng(3).bytes(5_000)),
                       ("empty.png", b""), ("text.png", b"not an image\n")]:
        case = name.replace(".", "-")
        (b.folder(case) / name).write_bytes(data)
        b.add(case, kind, [name], 3, message=re.escape(name))

    b.folder("missing")
    b.add("missing", kind, ["nothing-here.mp4"], 3, message="nothing-here.mp4.*(not exist|no such)")

    f = b.folder("dangling-symlink")
    (f / "gone.mp4").symlink_to(f / "deleted.mp4")
    b.add("dangling-symlink", kind, ["gone.mp4"], 3, message="gone.mp4")

    b.folder("dev-null")
    b.add("dev-null", kind, ["/dev/null"], 3, message="/dev/null")

    f = b.folder("fifo")
    os.mkfifo(f / "pipe.ts")
    streamable = _clip(b.root / "fifo-source.ts", audio_tracks=0)
    b.add("fifo", kind, ["pipe.ts"], 3, also=0, message="pipe.ts.*(pipe|FIFO)",
          feed=streamable.read_bytes(), outputs=("pipe.restored.ts",), size=(64, 48))

    f = b.folder("empty-folder")
    (f / "in").mkdir()
    b.add("empty-folder", kind, ["in"], 3, message="in")

    f = b.folder("folder-without-media")
    (f / "in").mkdir()
    (f / "in" / "notes.txt").write_text("nothing to restore")
    b.add("folder-without-media", kind, ["in"], 3, message="in")

    f = b.folder("folder-named-like-video")
    (f / "clip.mp4").mkdir()
    b.add("folder-named-like-video", kind, ["clip.mp4"], 3, message="clip.mp4")

    src = _clip(b.root / "av-source.mkv", subtitle=True)
    b.add("audio-only-mp4", kind, [_remux(src, b.folder("audio-only-mp4") / "sound.mp4",
                                          keep=lambda s: s.type == "audio").name],
          3, message="sound.mp4.*video")
    b.add("audio-only-m4a", kind, [_remux(src, b.folder("audio-only-m4a") / "sound.m4a",
                                          keep=lambda s: s.type == "audio").name],
          3, message="sound.m4a.*video")
    b.add("subtitle-only-mkv", kind, [_remux(src, b.folder("subtitle-only-mkv") / "subs.mkv",
                                             keep=lambda s: s.type == "subtitle").name],
          3, message="subs.mkv.*video")
    for ext in ("mp4", "mkv"):
        name = f"zero-frames-{ext}"
        path = _remux(src, b.folder(name) / f"zero.{ext}", packets=False,
                      keep=lambda s: s.type != "subtitle" or ext == "mkv")
        b.add(name, kind, [path.name], 3, message=f"zero.{ext}")

    f = b.folder("video-named-jpg")
    shutil.copy(_clip(b.root / "jpg-source.mp4"), f / "frame.jpg")
    b.add("video-named-jpg", kind, ["frame.jpg"], 3, message="frame.jpg")

    f = b.folder("float-tiff")
    cv2.imwrite(str(f / "float.tiff"), _portrait(32).astype(np.float32) / 255)
    b.add("float-tiff", kind, ["float.tiff"], 3, message="float.tiff")


def _damaged(b: _Builder) -> None:
    """Truncated and corrupted files: unusable (3) when nothing decodes, else a success with
    one warning counting the lost frames."""
    kind = "damaged video"
    lost = r"damaged.*\d+ of about \d+ frames"
    plain = _clip(b.root / "damage-source.mp4", frames=12, size=(96, 64))
    fast = _remux(plain, b.root / "damage-source-faststart.mp4", options={"movflags": "+faststart"})
    mkv = _clip(b.root / "damage-source.mkv", frames=12, size=(96, 64))
    ts = _clip(b.root / "damage-source.ts", frames=12, size=(96, 64))

    def damaged(name: str, source: Path, damage: Callable[[Path], object], code: int, **fields) -> None:
        path = b.folder(name) / f"broken{source.suffix}"
        shutil.copy(source, path)
        damage(path)
        if code == 0:
            fields = dict(outputs=(f"broken.restored{source.suffix}",), size=(96, 64), warning=lost,
                          frames=12) | fields
        else:
            fields = dict(message=re.escape(path.name)) | fields
        b.add(name, kind, [path.name], code, **fields)

    # The index (moov) of a plain mp4 is written last: any cut loses it.
    for fraction in (0.1, 0.9):
        damaged(f"mp4-cut-{int(fraction * 100)}", plain, lambda p, f=fraction: truncate(p, f), 3)
    damaged("mp4-faststart-cut-60", fast, lambda p: truncate(p, 0.6), 0)
    damaged("mp4-faststart-cut-90", fast, lambda p: truncate(p, 0.9), 0)
    damaged("mp4-header-noise", plain, lambda p: corrupt_middle(p, start=0.0, length=0.02), 3)
    damaged("mp4-corrupt-middle", fast, lambda p: corrupt_middle(p, start=0.5, length=0.1), 0)
    damaged("mkv-cut-3", mkv, lambda p: truncate(p, 0.03), 3)
    damaged("mkv-cut-50", mkv, lambda p: truncate(p, 0.5), 0)
    damaged("mkv-cut-90", mkv, lambda p: truncate(p, 0.9), 0)
    damaged("mkv-corrupt-middle", mkv, lambda p: corrupt_middle(p, start=0.5, length=0.1), 0)
    damaged("ts-cut-2-packets", ts, lambda p: Path(p).write_bytes(Path(p).read_bytes()[:376]), 3)
    # MPEG-TS records no duration or frame count: what a cut removed cannot be counted. Cut
    # inside a transport packet, the one warning says the file was cut short; cut exactly at a
    # packet boundary (half of this file is one), it cannot be told from a shorter stream.
    damaged("ts-cut-50", ts, lambda p: truncate(p, 0.5), 0, frames=None)
    damaged("ts-cut-mid-packet", ts, lambda p: Path(p).write_bytes(Path(p).read_bytes()[: 188 * 40 + 100]), 0,
            frames=None, warning="cut short", warned=True)
    # Nor what the decoder silently drops from a corrupted stretch of it (a known limit).
    damaged("ts-corrupt-middle", ts, lambda p: corrupt_middle(p, start=0.5, length=0.1), 0, frames=None)

    kind = "damaged image"
    ok, jpeg = cv2.imencode(".jpg", _portrait()[..., ::-1])
    ok, png = cv2.imencode(".png", _portrait()[..., ::-1])
    for name, data in [("jpeg-cut-50", jpeg.tobytes()[: jpeg.size // 2]),
                       ("jpeg-cut-20-bytes", jpeg.tobytes()[:20]),
                       ("png-cut-50", png.tobytes()[: png.size // 2])]:
        ext = name.split("-")[0].replace("jpeg", "jpg")
        (b.folder(name) / f"broken.{ext}").write_bytes(data)
        b.add(name, kind, [f"broken.{ext}"], 3, message=f"broken.{ext}")


def _sizes(b: _Builder) -> None:
    """Sizes 4:2:0 h264 cannot hold as they are are kept exactly, saying how (one warning)."""
    kind = "unusual size"
    odd = r"\d+x\d+"
    for name, size, codec, ext, pix_fmt, out, warning in [
        ("video-1x1", (1, 1), "ffv1", "mkv", "yuv444p", "clip.restored.mkv", odd),
        ("video-2x2", (2, 2), "libx264", "mp4", "yuv420p", "clip.restored.mp4", None),
        ("video-641x361-ffv1", (641, 361), "ffv1", "mkv", "yuv420p", "clip.restored.mkv", odd),
        ("video-641x361-vp9", (641, 361), "libvpx-vp9", "webm", "yuv420p", "out.mkv", odd),
        ("video-2000x64", (2000, 64), "libx264", "mp4", "yuv420p", "clip.restored.mp4", None),
    ]:
        _clip(b.folder(name) / f"clip.{ext}", frames=3, size=size, codec=codec, pix_fmt=pix_fmt,
              audio_tracks=0 if ext == "webm" else 1)
        args = [f"clip.{ext}"] + (["-o", out] if not out.startswith("clip.restored") else [])
        b.add(name, kind, args, 0, outputs=(out,), size=size, warning=warning)

    # WebM holds only VP8/VP9/AV1, so the default NAME.restored.webm with the default h264 is
    # refused before any work (a codec the container cannot hold: a bad option), naming a
    # container that can hold it.
    _clip(b.folder("webm-default-output") / "clip.webm", frames=3, codec="libvpx-vp9", audio_tracks=0)
    b.add("webm-default-output", "output container", ["clip.webm"], 2, message=r"webm.*-o clip\.restored\.mp4")

    # AVI counts frames and keeps no timestamps: FFV1 goes in it (every frame a keyframe);
    # H.264's reordered frames would lose their times, so h264 into .avi is refused up front.
    _clip(b.folder("avi-h264-default-output") / "clip.avi", frames=6, audio_tracks=0)
    b.add("avi-h264-default-output", "output container", ["clip.avi"], 2,
          message=r"clip\.restored\.avi.*-o clip\.restored\.mp4.*--codec ffv1")
    # (without audio: FFmpeg's AVI of H.264 with B-frames and AAC declares one frame more
    # than it holds, which the reader counts as a damaged frame; see the report of issue 21)
    _clip(b.folder("avi-ffv1") / "clip.avi", frames=6, audio_tracks=0)
    b.add("avi-ffv1", "output container", ["clip.avi", "--codec", "ffv1"], 0, outputs=("clip.restored.avi",),
          size=(64, 48), frames=6)
    _clip(b.folder("mp4-to-avi-ffv1") / "clip.mp4", frames=6)
    b.add("mp4-to-avi-ffv1", "output container", ["clip.mp4", "-o", "out.avi", "--codec", "ffv1"], 0,
          outputs=("out.avi",), size=(64, 48), frames=6)
    _clip(b.folder("ffv1-into-mov") / "clip.mp4", frames=3)
    b.add("ffv1-into-mov", "output container", ["clip.mp4", "-o", "out.mov", "--codec", "ffv1"], 2,
          message=r"ffv1.*out\.mov.*-o out\.mkv")


def _images(b: _Builder) -> None:
    kind = "unusual image"
    face = _portrait()
    pil = Image.fromarray(face)
    makers: list[tuple[str, str, Callable[[Path], object], tuple[int, int]]] = [
        ("image-16bit-png", "png", lambda p: cv2.imwrite(str(p), face[..., ::-1].astype(np.uint16) * 257), (160, 160)),
        ("image-16bit-gray-png", "png", lambda p: cv2.imwrite(str(p), face[..., 0].astype(np.uint16) * 257), (160, 160)),
        ("image-16bit-tiff", "tiff", lambda p: cv2.imwrite(str(p), face[..., ::-1].astype(np.uint16) * 257), (160, 160)),
        ("image-cmyk-jpeg", "jpg", lambda p: pil.convert("CMYK").save(p, "JPEG"), (160, 160)),
        ("image-palette-png", "png", lambda p: pil.convert("P", palette=Image.Palette.ADAPTIVE).save(p), (160, 160)),
        ("image-gray-jpeg", "jpg", lambda p: pil.convert("L").save(p, "JPEG"), (160, 160)),
        ("image-gray-png", "png", lambda p: pil.convert("L").save(p), (160, 160)),
        ("image-rgba-png", "png", lambda p: pil.convert("RGBA").save(p), (160, 160)),
        ("image-1x1-png", "png", lambda p: Image.new("RGB", (1, 1), (200, 120, 90)).save(p), (1, 1)),
        ("image-2x2-bmp", "bmp", lambda p: Image.new("RGB", (2, 2), (20, 220, 90)).save(p), (2, 2)),
    ]
    for name, ext, make, size in makers:
        make(b.folder(name) / f"photo.{ext}")
        b.add(name, kind, [f"photo.{ext}"], 0, outputs=(f"photo.restored.{ext}",), size=size)


def _names(b: _Builder) -> None:
    kind = "unusual name"
    for name, file in [("name-with-spaces", "my holiday clip.mp4"),
                       ("name-unicode", "vidéo 日本 ✓.mp4"),
                       ("name-upper-case-suffix", "CLIP.MP4")]:
        _clip(b.folder(name) / file, frames=3)
        stem, ext = file.rsplit(".", 1)
        b.add(name, kind, [file], 0, outputs=(f"{stem}.restored.{ext}",), size=(64, 48))

    _write_rgb(b.folder("name-image-spaces") / "photo of me.JPG", _portrait())
    b.add("name-image-spaces", kind, ["photo of me.JPG"], 0, outputs=("photo of me.restored.JPG",),
          size=(160, 160))

    _clip(b.folder("name-leading-dash") / "-clip.mp4", frames=3)
    b.add("name-leading-dash", kind, ["./-clip.mp4"], 0, outputs=("-clip.restored.mp4",), size=(64, 48))
    _clip(b.folder("name-leading-dash-after-double-dash") / "-clip.mp4", frames=3)
    b.add("name-leading-dash-after-double-dash", kind, [*b.std, "--", "-clip.mp4"], 0, std=False,
          outputs=("-clip.restored.mp4",), size=(64, 48))
    _clip(b.folder("name-leading-dash-bare") / "-clip.mp4", frames=3)
    b.add("name-leading-dash-bare", "bad option", ["-clip.mp4"], 2, message="clip|input|argument")

    f = b.folder("input-through-symlink")
    _clip(b.root / "linked-source.mp4", frames=3)
    (f / "link.mp4").symlink_to(b.root / "linked-source.mp4")
    b.add("input-through-symlink", kind, ["link.mp4"], 0, outputs=("link.restored.mp4",), size=(64, 48))

    f = b.folder("control-video")
    _clip(f / "tape.mp4", frames=4)
    b.add("control-video", "control", ["tape.mp4", "-o", "out.mkv"], 0, outputs=("out.mkv",), size=(64, 48))
    f = b.folder("control-image")
    _write_rgb(f / "photo.png", _portrait())
    b.add("control-image", "control", ["photo.png"], 0, outputs=("photo.restored.png",), size=(160, 160))


def _outputs(b: _Builder) -> None:
    kind = "output cannot be written"

    def with_clip(name: str) -> Path:
        folder = b.folder(name)
        _clip(folder / "in.mp4", frames=3)
        return folder

    with_clip("output-folder-missing")
    b.add("output-folder-missing", kind, ["in.mp4", "-o", "nowhere/out.mp4"], 4, message="nowhere")
    with_clip("output-trailing-slash")
    b.add("output-trailing-slash", kind, ["in.mp4", "-o", "newdir/"], 4, message="newdir")
    with_clip("output-under-a-file")
    b.add("output-under-a-file", kind, ["in.mp4", "-o", "in.mp4/out.mp4"], 4, message="in.mp4")
    b.add("output-in-proc", kind, ["in.mp4", "-o", "/proc/gpen-corpus.mp4"], 4, message="/proc",
          folder=with_clip("output-in-proc"))
    f = b.folder("image-output-in-proc")
    _write_rgb(f / "photo.jpg", _portrait())
    b.add("image-output-in-proc", kind, ["photo.jpg", "-o", "/proc/gpen-corpus.jpg"], 4, message="/proc")

    f = with_clip("output-read-only-folder")
    (f / "locked").mkdir()
    if b.mount_tmpfs(f / "locked", "64k", read_only=True):
        b.add("output-read-only-folder", kind, ["in.mp4", "-o", "locked/out.mp4"], 4, message="locked")
    elif os.geteuid() != 0:
        (f / "locked").chmod(0o555)
        b.cleanups.append(lambda: (f / "locked").chmod(0o755))
        b.add("output-read-only-folder", kind, ["in.mp4", "-o", "locked/out.mp4"], 4, message="locked")
    else:
        b.skipped.append("output-read-only-folder: cannot mount a read-only tmpfs here")

    f = with_clip("output-exists")
    (f / "out.mp4").write_bytes(b"an earlier output, kept")
    b.add("output-exists", kind, ["in.mp4", "-o", "out.mp4"], 4, message="out.mp4.*-y")
    f = with_clip("output-is-a-folder")
    (f / "out.mp4").mkdir()
    b.add("output-is-a-folder", kind, ["in.mp4", "-o", "out.mp4", "-y"], 4, message="out.mp4")
    with_clip("output-dev-null")  # a device is no output, even with -y: no advice to pass -y
    b.add("output-dev-null", kind, ["in.mp4", "-o", "/dev/null"], 4, message=r"^(?!.*pass -y).*/dev/null")
    f = with_clip("output-is-a-fifo")  # stands in for /dev/null with -y, which must not be tried
    os.mkfifo(f / "out.mp4")
    b.add("output-is-a-fifo", kind, ["in.mp4", "-o", "out.mp4", "-y"], 4, message="out.mp4")
    with_clip("output-no-suffix")
    b.add("output-no-suffix", kind, ["in.mp4", "-o", "out"], 4, message="out")
    with_clip("output-unknown-suffix")
    b.add("output-unknown-suffix", kind, ["in.mp4", "-o", "out.xyz"], 4, message="out.xyz")
    f = b.folder("image-output-as-video")
    _write_rgb(f / "photo.png", _portrait())
    b.add("image-output-as-video", kind, ["photo.png", "-o", "photo.mp4"], 4, message="photo.mp4")

    same = "output-is-input"
    for name, output in [("exact", "in.mp4"), ("dot-dot", "sub/../in.mp4")]:
        f = with_clip(f"{same}-{name}")
        (f / "sub").mkdir()
        b.add(f"{same}-{name}", kind, ["in.mp4", "-o", output, "-y"], 4, message="input")
    f = with_clip(f"{same}-symlink")
    (f / "out.mp4").symlink_to(f / "in.mp4")
    b.add(f"{same}-symlink", kind, ["in.mp4", "-o", "out.mp4", "-y"], 4, message="input")
    f = with_clip(f"{same}-hardlink")
    os.link(f / "in.mp4", f / "out.mp4")
    b.add(f"{same}-hardlink", kind, ["in.mp4", "-o", "out.mp4", "-y"], 4, message="input")
    f = b.folder(f"{same}-image")
    _write_rgb(f / "photo.png", _portrait())
    b.add(f"{same}-image", kind, ["photo.png", "-o", "./photo.png", "-y"], 4, message="input")

    with_clip("report-folder-missing")
    b.add("report-folder-missing", kind, ["in.mp4", "--report", "nowhere/r.json"], 4, message="nowhere")
    with_clip("report-is-input")
    b.add("report-is-input", kind, ["in.mp4", "--report", "in.mp4", "-y"], 4, message="in.mp4")

    _disk_full(b)


def _disk_full(b: _Builder) -> None:
    """Outputs larger than a small tmpfs: exit 4 saying the disk is full, nothing left, and an
    earlier output replaced with -y stays as it was."""
    kind = "disk full"
    f = b.folder("disk-full-video")
    _noise_clip(f / "noise.mkv", frames=6, size=(256, 192))
    (f / "full").mkdir()
    if not b.mount_tmpfs(f / "full", "96k"):
        b.skipped.append("disk-full-*: cannot mount a small tmpfs here (needs root)")
        return
    (f / "full" / "out.mkv").write_bytes(b"an earlier output that must survive")
    b.add("disk-full-video", kind, ["noise.mkv", "-o", "full/out.mkv", "-y", "--codec", "ffv1"], 4,
          message=r"full/out.mkv.*(disk|space)", disk_full=True)

    f = b.folder("disk-full-image")
    noise = np.random.default_rng(8).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    _write_rgb(f / "noise.png", noise)
    (f / "full").mkdir()
    if b.mount_tmpfs(f / "full", "64k"):
        b.add("disk-full-image", kind, ["noise.png", "-o", "full/out.png"], 4,
              message=r"full/out.png.*(disk|space)", disk_full=True)


def _weights(b: _Builder) -> None:
    from tests.conftest import random_state_dict  # the shared generator of official layouts
    from gpen_video.restore.model import ModelConfig

    kind = "weights problem"
    made: list[tuple[str, Callable[[Path], object]]] = [
        ("weights-empty", lambda p: p.write_bytes(b"")),
        ("weights-text", lambda p: p.write_text("not a checkpoint\n")),
        ("weights-truncated", lambda p: p.write_bytes(b.weights.read_bytes()[:3_000_000])),
        ("weights-other-layout", lambda p: torch.save(random_state_dict(ModelConfig(64, 64, 2, 1, 1)), p)),
        ("weights-a-list", lambda p: torch.save([torch.zeros(3)], p)),
        ("weights-unsafe-pickle", lambda p: torch.save({"made": datetime.date(2024, 1, 1)}, p)),
    ]
    for name, make in made:
        f = b.folder(name)
        _clip(f / "in.mp4", frames=3)
        make(f / "bad.pth")
        b.add(name, kind, ["in.mp4", "--device", "cpu", "--model", "GPEN-BFR-256", "--weights", "bad.pth"],
              5, std=False, message="bad.pth")

    f = b.folder("weights-missing-file")
    _clip(f / "in.mp4", frames=3)
    b.add("weights-missing-file", kind, ["in.mp4", "--device", "cpu", "--model", "GPEN-BFR-256",
                                         "--weights", "absent.pth"], 5, std=False, message="absent.pth")
    f = b.folder("weights-a-folder")
    _clip(f / "in.mp4", frames=3)
    (f / "ckpt.pth").mkdir()
    b.add("weights-a-folder", kind, ["in.mp4", "--device", "cpu", "--model", "GPEN-BFR-256",
                                     "--weights", "ckpt.pth"], 5, std=False, message="ckpt.pth")
    f = b.folder("weights-of-another-preset")
    _clip(f / "in.mp4", frames=3)
    b.add("weights-of-another-preset", kind, ["in.mp4", "--device", "cpu", "--model", "GPEN-BFR-512",
                                              "--weights", b.weights], 5, std=False,
          message=f"{re.escape(b.weights.name)}.*512|512.*{re.escape(b.weights.name)}")
    f = b.folder("weights-offline-not-cached")
    _clip(f / "in.mp4", frames=3)
    b.add("weights-offline-not-cached", kind, ["in.mp4", "--device", "cpu", "--model", "GPEN-BFR-256",
                                               "--offline", "--cache-dir", "cache"], 5, std=False,
          message="GPEN-BFR-256")


def _options(b: _Builder) -> None:
    kind = "bad option"
    flags = [
        ("strength-above-1", ["--strength", "1.5"], "strength"),
        ("strength-nan", ["--strength", "nan"], "strength"),
        ("crf-99", ["--crf", "99"], "crf"),
        ("crf-word", ["--crf", "high"], "crf"),
        ("batch-size-0", ["--batch-size", "0"], "batch"),
        ("detect-size-8", ["--detect-size", "8"], "detect"),
        ("score-threshold-0", ["--score-threshold", "0"], "score"),
        ("smooth-window-0", ["--smooth-window", "0"], "smooth"),
        ("max-gap-negative", ["--max-gap", "-1"], "gap"),
        ("min-face-negative", ["--min-face", "-5"], "min"),
        ("codec-unknown", ["--codec", "vp9"], "codec"),
        ("x264-preset-unknown", ["--preset", "turbo"], "preset|turbo"),
        ("flag-unknown", ["--sharpen"], "sharpen"),
        ("two-flags-unknown", ["--sharpen", "--denoise", "3"], "sharpen --denoise 3"),
        ("model-unknown", ["--model", "GPEN-BFR-999"], r"GPEN-BFR-999.*GPEN-BFR-256.*GPEN-BFR-512"),
        ("model-is-a-detector", ["--model", "RetinaFace-R50"], r"RetinaFace-R50.*GPEN-BFR-256"),
        ("config-missing", ["--config", "absent.toml"], "absent.toml"),
        ("config-not-toml", ["--config", "broken.toml"], "broken.toml"),
        ("config-unknown-key", ["--config", "unknown.toml"], "sharpness"),
        ("config-wrong-type", ["--config", "type.toml"], "crf"),
        ("config-out-of-range", ["--config", "range.toml"], "strength"),
    ]
    for name, extra, message in flags:
        f = b.folder(name)
        _clip(f / "in.mp4", frames=3)
        (f / "broken.toml").write_text("crf = = 3\n")
        (f / "unknown.toml").write_text("sharpness = 3\n")
        (f / "type.toml").write_text('crf = "high"\n')
        (f / "range.toml").write_text("strength = 3.0\n")
        # The flags go after the standard ones so that a repeated --model wins.
        b.add(name, kind, ["in.mp4", *b.std, *extra], 2, std=False, message=message)

    kind = "device unavailable"
    devices = [("device-unknown", "tpu")]
    if not torch.cuda.is_available():
        devices.append(("device-cuda", "cuda"))
    for name, device in devices:
        _clip(b.folder(name) / "in.mp4", frames=3)
        b.add(name, kind, ["in.mp4", *b.std, "--device", device], 6, std=False, message=device)


def _folders(b: _Builder) -> None:
    f = b.folder("folder-mixed")
    (f / "in").mkdir()
    _clip(f / "in" / "good.mp4", frames=3)
    _write_rgb(f / "in" / "good.jpg", _portrait())
    (f / "in" / "bad.mp4").write_text("not a video")
    (f / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (f / "in" / "notes.txt").write_text("not media, ignored")
    b.add("folder-mixed", "folder", ["in", "-o", "out"], 1, errors=2, message="bad",
          outputs=("out/good.restored.mp4", "out/good.restored.jpg", "out"))

    f = b.folder("folder-all-good")
    (f / "in").mkdir()
    _clip(f / "in" / "a.mp4", frames=3)
    _write_rgb(f / "in" / "b.png", _portrait())
    b.add("folder-all-good", "folder", ["in"], 0,
          outputs=("in/a.restored.mp4", "in/b.restored.png"))

    f = b.folder("folder-output-is-a-file")
    (f / "in").mkdir()
    _clip(f / "in" / "a.mp4", frames=3)
    (f / "out.mp4").write_bytes(b"an existing file")
    b.add("folder-output-is-a-file", "output cannot be written", ["in", "-o", "out.mp4"], 4,
          message="out.mp4")

    f = b.folder("folder-output-in-proc")
    (f / "in").mkdir()
    _clip(f / "in" / "a.mp4", frames=3)
    b.add("folder-output-in-proc", "output cannot be written", ["in", "-o", "/proc/gpen-corpus"], 4,
          message="/proc")

    f = b.folder("folder-model-unknown")
    (f / "in").mkdir()
    _clip(f / "in" / "a.mp4", frames=3)
    b.add("folder-model-unknown", "bad option", ["in", "-o", "out", *b.std, "--model", "GPEN-BFR-9"], 2,
          std=False, message="GPEN-BFR-9.*GPEN-BFR-256")

    # --report with a folder or an image: refused as for an unusable input (the CLI's choice).
    f = b.folder("folder-with-report")
    (f / "in").mkdir()
    _clip(f / "in" / "a.mp4", frames=3)
    b.add("folder-with-report", "unusable input", ["in", "--report", "r.json"], 3, message="report")
    _write_rgb(b.folder("image-with-report") / "photo.png", _portrait())
    b.add("image-with-report", "unusable input", ["photo.png", "--report", "r.json"], 3, message="photo.png")


@dataclass(frozen=True)
class Corpus:
    """The generated cases, and those this machine cannot stage (name: reason)."""

    cases: tuple[Case, ...]
    skipped: tuple[str, ...]


@contextlib.contextmanager
def corpus(root: Path, weights: Path) -> Iterator[Corpus]:
    """Generate every case under ``root``; ``weights`` is a good GPEN-BFR-256 checkpoint.

    Mounts made for the cases (a small and a read-only tmpfs, root only) are undone on exit.
    """
    builder = _Builder(root, weights)
    try:
        for make in (_inputs, _damaged, _sizes, _images, _names, _outputs, _weights, _options, _folders):
            make(builder)
        names = [c.name for c in builder.cases]
        if len(names) != len(set(names)):
            raise ValueError(f"case names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
        yield Corpus(tuple(builder.cases), tuple(builder.skipped))
    finally:
        for undo in reversed(builder.cleanups):
            undo()


# --------------------------------------------------------------------------- running


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (not following links): file sha256, link target, or type."""
    entries: dict[str, tuple] = {}
    if not folder.is_dir():
        return entries
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            rel = str(path.relative_to(folder))
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir",)
            else:
                entries[rel] = ("special", stat.S_IFMT(info.st_mode))
    return entries


def _feed_fifo(fifo: Path, data: bytes) -> threading.Thread:
    def write() -> None:
        with contextlib.suppress(OSError):
            with open(fifo, "wb") as pipe:
                pipe.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _release_fifo(fifo: Path, writer: threading.Thread) -> None:
    """Unblock a writer still waiting for a reader: open the read end, drain, close."""
    while writer.is_alive():
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                while os.read(fd, 1 << 16):
                    pass
            os.close(fd)
        writer.join(0.05)


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stderr, CPU seconds of the child)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while True:  # wait4 rather than Popen.wait: it also gives the child's CPU time
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            code, proc.returncode = None, -9
            break
        time.sleep(0.02)
    reader.join(10)
    proc.stderr.close()
    return code, b"".join(chunks).decode("utf-8", "replace"), usage.ru_utime + usage.ru_stime


def run_case(case: Case, env: dict[str, str]) -> Outcome:
    """Run one case as ``python -m gpen_video restore ...`` and snapshot its folder."""
    before = snapshot(case.folder)
    writer = None
    if case.feed is not None:
        writer = _feed_fifo(case.folder / case.args[0], case.feed)
    start = time.monotonic()
    code, stderr, cpu = _run([sys.executable, "-m", "gpen_video", "restore", *case.args], case.folder, env)
    seconds = time.monotonic() - start
    if writer is not None:
        _release_fifo(case.folder / case.args[0], writer)
    after = snapshot(case.folder)
    return Outcome(case, code, stderr, seconds, cpu, before, after)


def corpus_env(root: Path) -> dict[str, str]:
    """The environment of every run: one torch thread each (cases run side by side), an empty
    weights cache, and a private temporary folder (checked to stay empty)."""
    env = dict(os.environ)
    tmp = root / "TMPDIR"
    tmp.mkdir(exist_ok=True)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GPEN_VIDEO_HOME=str(root / "cache"),
               TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               COLUMNS="100")
    return env


def run_corpus(cases: Sequence[Case], env: dict[str, str], workers: int | None = None) -> list[Outcome]:
    """Run every case, ``workers`` at a time (default: one per core), slowest kinds first."""
    order = sorted(cases, key=lambda c: c.code != 0)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        outcomes = list(pool.map(lambda c: run_case(c, env), order))
    by_name = {o.case.name: o for o in outcomes}
    return [by_name[c.name] for c in cases]


# --------------------------------------------------------------------------- checking


def _lines(stderr: str) -> list[str]:
    """stderr split into lines; progress bars redraw with carriage returns."""
    return [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]


def _output_problems(path: Path, case: Case, warnings: list[str]) -> list[str]:
    """Why ``path`` is not the output ``case`` declares: undecodable, wrong size, private
    mode, or fewer frames than the source without a warning that counts them."""
    if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            return [f"{path.name} does not decode as an image"]
        count, size = 1, (image.shape[1], image.shape[0])
    else:
        try:
            with av.open(str(path)) as container:
                sizes = [(f.width, f.height) for f in container.decode(video=0)]
        except (av.FFmpegError, IndexError) as exc:
            return [f"{path.name} does not decode: {exc}"]
        if not sizes:
            return [f"{path.name} has no frames"]
        count, size = len(sizes), sizes[0]
    problems = []
    if case.size is not None and size != case.size:
        problems.append(f"{path.name} is {size[0]}x{size[1]}, the input {case.size[0]}x{case.size[1]}")
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o666 & ~umask:
        problems.append(f"{path.name} has mode {mode:o}, a new file gets {0o666 & ~umask:o}")
    if case.frames is not None and count < case.frames:
        counted = [re.search(r"(\d+) of about (\d+) frames", w) for w in warnings]
        lost = [int(m.group(1)) for m in counted if m]
        if not lost:
            problems.append(f"{case.frames - count} of {case.frames} frames lost without a warning")
        elif abs(lost[0] - (case.frames - count)) > 1:
            problems.append(f"warning counts {lost[0]} lost frames, {case.frames - count} were")
    return problems


def check(outcome: Outcome) -> list[str]:
    """Every way ``outcome`` differs from what its case declares (empty: as documented)."""
    case, problems = outcome.case, []
    lines = _lines(outcome.stderr)
    errors = [line for line in lines if ERROR_LINE.search(line)]
    warnings = [line for line in lines if WARNING_LINE.search(line)]
    if outcome.code is None:
        return [f"no exit within {CASE_TIMEOUT_S:.0f} s (hang)"]
    if "Traceback" in outcome.stderr:
        problems.append("traceback on stderr")
    if outcome.code not in (case.code, case.also):
        problems.append(f"exit {outcome.code}, documented {case.code}")
    success = outcome.code == 0
    if success:
        if errors:
            problems.append(f"{len(errors)} error line(s) on success")
        allowed = 1 if case.warning else 0
        if len(warnings) > allowed or (warnings and not re.search(case.warning or "$^", warnings[0])):
            problems.append(f"{len(warnings)} warning(s), allowed {allowed} matching {case.warning!r}")
        if case.warned and not warnings:
            problems.append(f"no warning, one matching {case.warning!r} is required")
    else:
        wanted = case.errors if outcome.code == case.code else 1
        if len(errors) != wanted:
            problems.append(f"{len(errors)} error lines, expected {wanted}")
        if case.message and errors and not any(re.search(case.message, e) for e in errors):
            problems.append(f"error line does not match {case.message!r}")
        if any(line.startswith("usage:") for line in lines):
            problems.append("usage printed with the error")
        if not case.disk_full and any(DISK_SPACE.search(e) for e in errors):
            problems.append("blames disk space, but the disk is not full")

    expected_new = set(case.outputs) if outcome.code in (0, 1) else set()
    before, after = outcome.before, outcome.after
    new = set(after) - set(before) - expected_new
    if new:
        problems.append(f"left behind: {', '.join(sorted(new))}")
    changed = [k for k in before if after.get(k) != before[k]]
    if changed:
        problems.append(f"changed or removed: {', '.join(sorted(changed))}")
    for name in sorted(expected_new):
        path = case.folder / name
        if not path.exists() and not path.is_symlink():
            problems.append(f"missing output {name}")
        elif path.is_file():
            problems += _output_problems(path, case, warnings)
    return problems


def summary_line(outcome: Outcome) -> str:
    """The line a reader needs from stderr: the error, else the warning, else the last line."""
    lines = _lines(outcome.stderr)
    pick = ([l for l in lines if ERROR_LINE.search(l)] or [l for l in lines if WARNING_LINE.search(l)]
            or lines[-1:] or [""])
    return pick[0]


def table(outcomes: Sequence[tuple[Outcome, list[str]]]) -> str:
    """A fixed-width table: case, kind, documented and actual exit, seconds, problems, stderr."""
    rows = [("case", "kind", "want", "got", "wall s", "cpu s", "problems", "stderr")]
    for outcome, problems in outcomes:
        c = outcome.case
        want = f"{c.code}" + (f"/{c.also}" if c.also is not None else "")
        rows.append((c.name, c.kind, want, str(outcome.code), f"{outcome.seconds:.1f}",
                     f"{outcome.cpu_seconds:.1f}", "; ".join(problems) or "ok", summary_line(outcome)[:160]))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(7)) + "  " + r[7] for r in rows)
