"""The one configuration object: defaults, TOML presets from ``configs/``, flag overrides.

Precedence: built-in defaults < ``--config FILE`` < command-line flags. Unknown keys and
wrong types are reported by name. Library entry points take a ``Config`` keyword argument;
no module reads flags or environment variables on its own.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from gpen_video.errors import ConfigError
from gpen_video.formats import codec_format

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

def _preset_dir() -> Path:
    """``configs/``: shipped inside the package as ``gpen_video.configs`` (see pyproject), or
    beside the package in a source tree that was not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gpen_video.configs")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _preset_dir()

Codec = str
"""An output codec: a name of ``formats.CODECS`` (h264, h265, prores, ffv1)."""
Deinterlace = Literal["auto", "off", "frame", "field"]
Precision = Literal["auto", "fp16", "bf16", "fp32"]
Detector = Literal["retinaface-mobile", "retinaface-r50"]
Mask = Literal["plain", "parse"]
Warp = Literal["auto", "opencv", "torch"]
UpscalerName = Literal["auto", "lanczos", "realesr-animevideov3", "realesrgan-x4plus"]
EncoderPreset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo"
]


@dataclass(frozen=True)
class Config:
    """Every setting of a restore job. Field docs say what raising or lowering trades."""

    # --- model ---
    model: str = "GPEN-BFR-512"
    """Preset name (``gpen-video models`` lists them). Larger presets: sharper, slower."""
    weights: str | None = None
    """Local checkpoint path; when set nothing is downloaded."""
    offline: bool = False
    """Never download; fail with instructions when weights are missing."""
    cache_dir: str | None = None
    """Where weights are cached; None: $GPEN_VIDEO_HOME, else the platform's cache folder."""
    mirror: str | None = None
    """Base URL holding weight files under their registry names, used instead of the official ones."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    precision: Precision = "auto"
    """auto = bf16 on GPUs and CPUs that compute it natively, fp16 on older GPUs, else fp32. Half
    precision is checked against fp32 at load and falls back to bf16/fp32 (README, Precision)."""
    batch_size: int | None = None
    """Faces per restorer call; None picks by device. Higher: more throughput, more memory."""
    warp: Warp = "auto"
    """Crop and paste-back engine: torch (on the model's device) or opencv; auto = torch on CUDA."""

    # --- detection and tracking ---
    detector: Detector = "retinaface-mobile"
    detect_size: int = 1024
    """Long side of the copy the detector sees. Higher: finds smaller faces, slower."""
    detect_every: int = 12
    """K: the whole frame is detected at least every K frames (and at scene cuts, and when a
    followed face is lost); between, only crops around the faces being followed. Higher:
    cheaper, but a face entering is found up to K frames late. 0 or 1: every frame whole."""
    score_threshold: float = 0.9
    """Detections below this confidence are ignored. Lower: more faces, more false ones."""
    min_face: int = 24
    """Faces whose box's shorter side is under this many pixels are left alone."""
    only_largest_face: bool = False
    """Restore one person at a time: the largest track, kept until it ends."""
    skip_tracks: tuple[int, ...] = ()
    """Track ids (as in ``--report``) to leave alone."""
    smooth_window: int = 9
    """Zero-phase smoother length in frames. Longer: steadier faces, slower reaction to motion,
    and more frames held in memory (each frame waits for about 2 x smooth_window + max_gap
    later ones)."""
    max_gap: int = 8
    """A track survives this many frames without detection; the gap is interpolated."""

    # --- blending ---
    strength: float = 1.0
    """0 keeps the original face, 1 uses the restored one fully."""
    mask: Mask = "plain"
    """plain: the original demo's feathered square; parse: face-parsing mask (downloads weights)."""

    # --- upscaling ---
    upscale: int = 1
    """Output side / input side: 1 (as the input), 2, 3 or 4. Faces are restored into the
    upscaled frame, so they keep more of GPEN's detail; the rest of the frame is only as good
    as the upscaler. Higher: larger files, slower."""
    upscaler: UpscalerName = "auto"
    """How the frame is made larger: lanczos (fast, faithful, soft), realesr-animevideov3 (a
    small network: sharp, smooth skin), realesrgan-x4plus (sharpest, slowest); auto = lanczos
    on the CPU, realesr-animevideov3 on CUDA. Unused with upscale = 1."""
    # --- temporal ---
    temporal: bool = True
    """Steady restored faces: each track's restored crops averaged over time where its face holds
    still, colour kept from the source, profiles and short tracks faded out (README, Temporal
    stabilisation). False: every frame restored on its own, as the original demo does."""
    temporal_reach: int = 4
    """Frames either side a restored face is averaged with. Higher: steadier (flicker falls
    about as 1/(reach + 1)), flatter invented texture, more frames held."""
    motion_search: int = 2
    """How far (pixels of a 64² picture of the face; 2 ≈ 8 px of a 256 crop) a neighbouring
    frame's face is searched for the motion that moves it onto the frame before averaging, so
    faces that talk or turn a little are steadied too. 0: neighbours averaged where they are
    (a third of the stage's cost; moving parts then follow the current frame alone)."""
    motion_threshold: float = 0.03
    """Source change (0–1 scale) at which a neighbour stops counting. Higher: averages through
    small movements too (steadier, may smear); lower: follows smaller changes (more flicker)."""
    colour_grid: int = 16
    """Grid below which colour and shading come from the source face. Higher: more of the
    source's mid frequencies (its blur) kept; lower: more of GPEN's own colour; 0: no colour fix."""
    max_yaw: float = 55.0
    """Head turn (degrees) at which restoration has faded out: GPEN paints frontal features onto
    profiles. Higher: more turned faces restored; lower: more left as they are."""
    fade_frames: int = 9
    """Frames a face takes to fade in or out (turning away, starting or ending mid-shot).
    Longer: gentler, but faces near max_yaw stay faded longer."""
    min_track_frames: int = 3
    """Tracks seen for fewer frames are not restored (likely false detections, would only flash)."""

    # --- output ---
    codec: Codec = "h264"
    crf: int = 18
    """Quality for h264/h265. Lower: larger, closer to the input."""
    preset: EncoderPreset = "medium"
    """x264/x265 speed preset. Slower presets: smaller files at the same quality."""
    deinterlace: Deinterlace = "auto"
    strict: bool = False
    """Fail instead of warning when a stream cannot be copied into the output container."""

    # --- long jobs ---
    segment_seconds: float = 30.0
    """A video is rendered as segments of about this length, each kept as soon as it is done,
    so an interrupted job resumes at the first unfinished one. Shorter: less work lost, more
    keyframes. A clip shorter than 1.5 segments is one segment."""
    retries: int = 2
    """Times a failed segment is tried again from its start before the file fails."""
    work_dir: str | None = None
    """Where a job keeps its segments until the output is written; None: a hidden folder
    beside the output (``.NAME.gpen-work``)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(Config)
        for f in fields(self):
            allowed = get_args(hints[f.name])
            if allowed and all(isinstance(a, str) for a in allowed):
                if getattr(self, f.name) not in allowed:
                    raise ConfigError(
                        f"{f.name} must be one of {', '.join(allowed)}, got {getattr(self, f.name)!r}"
                    )
        codec_format(self.codec)  # one of formats.CODECS
        checks = {
            "strength": 0.0 <= self.strength <= 1.0,
            "score_threshold": 0.0 < self.score_threshold <= 1.0,
            "detect_size": self.detect_size >= 64,
            "detect_every": self.detect_every >= 0,
            "min_face": self.min_face >= 0,
            "crf": 0 <= self.crf <= 51,
            "smooth_window": self.smooth_window >= 1,
            "max_gap": self.max_gap >= 0,
            "batch_size": self.batch_size is None or self.batch_size >= 1,
            "segment_seconds": self.segment_seconds > 0,
            "retries": self.retries >= 0,
            "upscale": self.upscale in (1, 2, 3, 4),
            "temporal_reach": 0 <= self.temporal_reach <= 32,
            "motion_threshold": self.motion_threshold > 0,
            "motion_search": 0 <= self.motion_search <= 16,
            "colour_grid": self.colour_grid >= 0,
            "max_yaw": 15.0 < self.max_yaw <= 90.0,
            "fade_frames": 1 <= self.fade_frames <= 61,
            "min_track_frames": self.min_track_frames >= 1,
        }
        if any(not isinstance(t, int) or t < 0 for t in self.skip_tracks):
            raise ConfigError(f"skip_tracks must be track ids (whole numbers >= 0), got {self.skip_tracks!r}")
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name} is out of range: {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (None values are ignored: flag not given)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    base = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}
    if get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
            return tuple(value)
        raise ConfigError(f"config key {name!r} must be a list of whole numbers, got {value!r}")
    options = [a for a in get_args(hint)] or [hint]
    for option in options:
        if option is type(None) and value is None:
            return value
        if isinstance(option, str) and isinstance(value, str):
            return value
        if option in base and isinstance(value, base[option]) and not (
            option is not bool and isinstance(value, bool)
        ):
            return option(value)
    raise ConfigError(f"config key {name!r} has the wrong type: {value!r}")


def config_from_options(preset: str | Path | None, options: Mapping[str, Any]) -> Config:
    """The one way an interface (command line, web page) turns what a person chose into a
    ``Config``: the preset (a file or a name from ``configs/``; None: the defaults), then every
    option that names a ``Config`` field. Options that are None were not given; others (the
    command, paths) are ignored. ``batch_size="auto"`` picks by device, whatever the preset says.

    >>> config_from_options("fast", {"crf": 20, "batch_size": "auto", "input": "tape.mp4"}).batch_size is None
    True
    """
    overrides = {k: v for k, v in options.items() if k in Config.__dataclass_fields__}
    auto_batch = overrides.get("batch_size") == "auto"
    if auto_batch:
        del overrides["batch_size"]
    config = load_config(preset, **overrides)
    return dataclasses.replace(config, batch_size=None) if auto_batch else config


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Build a Config from an optional TOML preset and overrides.

    ``path`` may be a file path or a preset name from ``configs/`` (``home-video``).
    Overrides whose value is None are ignored, so parsed flags can be passed as they are.

    >>> load_config(None, crf=20).crf
    20
    """
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (CONFIG_DIR / f"{path}.toml").exists():
            file = CONFIG_DIR / f"{path}.toml"
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
            raise ConfigError(f"config file {file} does not exist (shipped presets: {presets})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        hints = get_type_hints(Config)
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        for key, value in flat.items():
            key = key.replace("-", "_")
            if key not in hints:
                raise ConfigError(f"config file {file} has an unknown key {key!r}")
            values[key] = _coerce(key, value, hints[key])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)
