"""Registry of the model weights gpen-video uses, with a verified download cache.

Each entry is a frozen ``WeightSpec``. ``resolve_weights`` returns a local file that is known
to be good: a file given by the user is validated and never replaced; a cached file is checked
against the sha256 recorded when it was first validated; anything else is downloaded with
resume support to ``NAME.part``, loaded with ``torch.load(..., weights_only=True)``, checked
key by key and shape by shape against the preset's layout, then renamed into place.

Example::

    path = resolve_weights("GPEN-BFR-512", cache_dir="/tmp/gpen-cache")
    model = load_gpen("GPEN-BFR-512", device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from gpen_video.io.files import write_atomic
from gpen_video.errors import ConfigError, DownloadError, WeightsError
from gpen_video.restore.model import (
    GPEN,
    PRESET_CONFIGS,
    ModelConfig,
    build_model,
    expected_layout,
    identify_preset,
    layout_mismatch,
)
from gpen_video.upscale import networks as sr

log = logging.getLogger(__name__)

Kind = Literal["gpen", "detector", "parser", "upscaler"]

GPEN_LICENCE = "GPEN weights: released by the authors for non-commercial research use"
VIGEN_BASE = "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models"
MODELSCOPE_HIRES = "damo/cv_gpen_image-portrait-enhancement-hires"
REALESRGAN_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"
REALESRGAN_LICENCE = "Real-ESRGAN weights: BSD-3-Clause (xinntao/Real-ESRGAN)"
CHUNK = 1 << 20
TIMEOUT_S = 30.0


def modelscope_url(model_id: str, file_path: str, revision: str = "master") -> str:
    """Direct download address of one file of a ModelScope model."""
    return f"https://modelscope.cn/api/v1/models/{model_id}/repo?Revision={revision}&FilePath={file_path}"


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable weights file.

    Attributes:
        name: registry key, also what ``--model`` takes for GPEN presets.
        kind: "gpen" (restorer), "detector", "parser" or "upscaler" (Real-ESRGAN).
        filename: name of the file in the cache directory.
        urls: where to download it, tried in order.
        size_bytes: approximate size (4 bytes per value plus pickle overhead), None if unknown.
        sha256: full hex digest once known; None until the first good download is recorded.
        config: network architecture, for kinds "gpen" and "upscaler".
        licence: terms the weights were released under.
        origin: who published them and where.
    """

    name: str
    kind: Kind
    filename: str
    urls: tuple[str, ...]
    size_bytes: int | None = None
    sha256: str | None = None
    config: ModelConfig | sr.NetworkConfig | None = None
    licence: str = GPEN_LICENCE
    origin: str = ""

    def __post_init__(self) -> None:
        if self.kind in ("gpen", "upscaler") and self.config is None:
            raise ValueError(f"weight spec {self.name} of kind {self.kind} needs a model config")
        if not self.urls:
            raise ValueError(f"weight spec {self.name} needs at least one URL")


def _approx_bytes(num_values: int) -> int:
    return num_values * 4


def _upscaler(name: str, release: str, config: sr.NetworkConfig) -> WeightSpec:
    """An official Real-ESRGAN ``.pth`` release (fp32 state_dict under ``params_ema`` or ``params``)."""
    values = sum(math.prod(shape) for shape in config.layout().values())
    return WeightSpec(
        name=name, kind="upscaler", filename=f"{name}.pth", urls=(f"{REALESRGAN_RELEASES}/{release}/{name}.pth",),
        size_bytes=_approx_bytes(values), config=config, licence=REALESRGAN_LICENCE,
        origin=f"xinntao/Real-ESRGAN GitHub release {release}",
    )


REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="GPEN-BFR-256", kind="gpen", filename="GPEN-BFR-256.pth",
            urls=(f"{VIGEN_BASE}/GPEN-BFR-256.pth",), size_bytes=_approx_bytes(18_879_298),
            config=PRESET_CONFIGS["GPEN-BFR-256"],
            origin="yangxy/GPEN (Alibaba DAMO Academy), ViGen model bucket",
        ),
        WeightSpec(
            name="GPEN-BFR-512", kind="gpen", filename="GPEN-BFR-512.pth",
            urls=(f"{VIGEN_BASE}/GPEN-BFR-512.pth",), size_bytes=_approx_bytes(71_005_559),
            config=PRESET_CONFIGS["GPEN-BFR-512"],
            origin="yangxy/GPEN (Alibaba DAMO Academy), ViGen model bucket",
        ),
        WeightSpec(
            name="GPEN-BFR-1024", kind="gpen", filename="GPEN-BFR-1024.pt",
            urls=(modelscope_url(MODELSCOPE_HIRES, "pytorch_model.pt"),), size_bytes=_approx_bytes(71_210_924),
            config=PRESET_CONFIGS["GPEN-BFR-1024"],
            origin=f"Alibaba DAMO Academy, ModelScope model {MODELSCOPE_HIRES} (pytorch_model.pt)",
        ),
        WeightSpec(
            name="GPEN-BFR-2048", kind="gpen", filename="GPEN-BFR-2048.pt",
            urls=(modelscope_url(MODELSCOPE_HIRES, "pytorch_model-2048.pt"),), size_bytes=_approx_bytes(71_295_201),
            config=PRESET_CONFIGS["GPEN-BFR-2048"],
            origin=f"Alibaba DAMO Academy, ModelScope model {MODELSCOPE_HIRES} (pytorch_model-2048.pt)",
        ),
        WeightSpec(
            name="RetinaFace-R50", kind="detector", filename="RetinaFace-R50.pth",
            urls=(f"{VIGEN_BASE}/RetinaFace-R50.pth",),
            origin="yangxy/GPEN (RetinaFace, ResNet-50 backbone), ViGen model bucket",
        ),
        WeightSpec(
            name="ParseNet", kind="parser", filename="ParseNet-latest.pth",
            urls=(f"{VIGEN_BASE}/ParseNet-latest.pth",),
            origin="yangxy/GPEN (ParseNet face parsing), ViGen model bucket",
        ),
        _upscaler("RealESRGAN_x4plus", "v0.1.0", sr.RRDBConfig(scale=4, num_block=23)),
        _upscaler("RealESRGAN_x2plus", "v0.2.1", sr.RRDBConfig(scale=2, num_block=23)),
        _upscaler("realesr-animevideov3", "v0.2.5.0", sr.SRVGGConfig(scale=4, num_conv=16)),
        _upscaler("realesr-general-x4v3", "v0.2.5.0", sr.SRVGGConfig(scale=4, num_conv=32)),
    )
}


@dataclass(frozen=True)
class ModelStatus:
    """What ``gpen-video models`` shows for one registry entry.

    Attributes:
        name, kind: as in the spec.
        path: where the file is (or would be) cached.
        present: whether the file exists there.
        size_bytes: size on disk when present, else the spec's approximate size.
        verified: a sha256 has been recorded for the cached file.
    """

    name: str
    kind: Kind
    path: Path
    present: bool
    size_bytes: int | None
    verified: bool


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """$GPEN_VIDEO_HOME if set, else the platform's user cache dir for gpen-video.

    The one cache rule of the CLI and the library: a ``cache_dir`` of None means this folder.
    """
    home = env.get("GPEN_VIDEO_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpen-video"))


def get_spec(name: str | WeightSpec, kind: Kind | None = None) -> WeightSpec:
    """The registry entry ``name`` (a spec passes through), of ``kind`` when given.

    An unknown name is a bad option, not a weights problem: ConfigError lists the known names
    (of ``kind`` when given).
    """
    if isinstance(name, WeightSpec):
        return name
    spec = REGISTRY.get(name)
    if spec is None or (kind is not None and spec.kind != kind):
        known = ", ".join(s.name for s in REGISTRY.values() if kind is None or s.kind == kind)
        raise ConfigError(f"unknown model {name!r}; choose one of {known}")
    return spec


spec_for = get_spec  # the name the pipeline uses


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def file_sha256(path: Path) -> str:
    """Full sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _recorded_sha256(path: Path) -> str | None:
    try:
        return _sidecar(path).read_text(encoding="ascii").split()[0].lower()
    except (FileNotFoundError, IndexError):
        return None


# --------------------------------------------------------------------------- validation


def extract_state_dict(obj: Any) -> Any:
    """The generator weights of a loaded checkpoint: a plain state_dict, a training ``g_ema``,
    or BasicSR's ``params_ema`` (preferred, as Real-ESRGAN does) / ``params``."""
    if isinstance(obj, Mapping):
        for key in ("g_ema", "params_ema", "params"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    return obj


TRUNCATION_SIGNS = ("failed finding central directory", "unexpected eof", "ran out of input", "truncated")
"""How torch's readers say a file ends too early: the zip reader (central directory missing),
the legacy reader (unexpected EOF) and pickle (ran out of input, data truncated)."""

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*$", re.MULTILINE)


def _load_error(exc: Exception, what: str, size: int, spec: WeightSpec, retry: str) -> WeightsError:
    """Why ``torch.load(weights_only=True)`` refused a file, as one sentence with the remedy.

    A file that names a Python class (a pickled model, an argparse.Namespace of training
    options) is complete but unsafe to load; only an early end of data means truncation.
    """
    text = str(exc)
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return WeightsError(
            f"{what} holds Python objects that cannot be loaded safely ({unsafe.group(1)}), "
            f"not only tensors; if you trust it, save its weights again as a plain state_dict "
            f"(torch.save(model.state_dict(), path)), or pass the official {spec.name} file"
        )
    if isinstance(exc, EOFError) or any(sign in text.lower() for sign in TRUNCATION_SIGNS):
        expected = f", expected about {spec.size_bytes:,}" if spec.size_bytes else ""
        return WeightsError(
            f"{what} is truncated ({size:,} bytes{expected}); {retry}, or pass a complete file with --weights"
        )
    detail = _UNPICKLER_DETAIL.search(text)
    reason = detail.group(1) if detail else text.splitlines()[0] if text else "no detail"
    return WeightsError(
        f"{what} is not a PyTorch weights file that loads safely ({type(exc).__name__}: {reason}); "
        f"pass a file of {spec.name}"
    )


def load_checkpoint(path: Path, spec: WeightSpec, source: str | None = None) -> dict[str, torch.Tensor]:
    """Load ``path`` safely and check it holds ``spec``'s weights; WeightsError otherwise.

    ``source`` (a URL) is named in messages about freshly downloaded files.
    """
    what = f"{path} (downloaded from {source})" if source else str(path)
    retry = f"delete it and download {spec.name} again" if source is None else "run again to download it afresh"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise _load_error(exc, what, path.stat().st_size, spec, retry) from exc
    state = extract_state_dict(obj)
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{what} holds no state_dict (found {type(state).__name__}); pass a file of {spec.name}")
    if spec.kind == "upscaler":
        return _check_upscaler(state, spec, what)
    if spec.kind != "gpen":
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"{what} is not a {spec.name} state_dict (entry {bad[0]!r} is not a tensor)")
        return dict(state)
    assert spec.config is not None
    problem = layout_mismatch(state, spec.config)
    if problem is None:
        return dict(state)
    other = identify_preset(state)
    if other is not None and other != spec.name:
        raise WeightsError(f"{what} holds {other} weights, not {spec.name}; pass --model {other} or another file")
    raise WeightsError(
        f"{what} does not match the {spec.name} layout ({problem}); it is corrupt, truncated or "
        f"another network's file: delete it or pass a file of {spec.name}"
    )


def _check_upscaler(state: Mapping[str, Any], spec: WeightSpec, what: str) -> dict[str, torch.Tensor]:
    """``state`` if it has the layout of ``spec``'s Real-ESRGAN network, else WeightsError naming it."""
    assert isinstance(spec.config, (sr.RRDBConfig, sr.SRVGGConfig))
    problem = sr.layout_mismatch(state, spec.config)
    if problem is None:
        return dict(state)
    other = next((s.name for s in REGISTRY.values() if s.kind == "upscaler" and s.name != spec.name
                  and sr.layout_mismatch(state, s.config) is None), None)  # type: ignore[arg-type]
    if other is not None:
        raise WeightsError(f"{what} holds {other} weights (or another network of its shape), not {spec.name}; "
                           f"pass a file of {spec.name}")
    raise WeightsError(
        f"{what} does not match the {spec.name} layout ({problem}); it is corrupt, truncated or "
        f"another network's file: delete it or pass a file of {spec.name}"
    )


# --------------------------------------------------------------------------- download


def _weights_flag(spec: WeightSpec) -> str:
    """The ``--weights`` remedy, for the networks that flag gives (not an upscaler's)."""
    return "" if spec.kind == "upscaler" else ", or pass --weights PATH"


def _download(url: str, part: Path, spec: WeightSpec, final: Path, progress: bool) -> None:
    """Fetch ``url`` into ``part``, resuming from its current length with an HTTP Range request."""
    from tqdm import tqdm

    def fail(reason: str) -> DownloadError:
        return DownloadError(
            f"could not download {spec.name} from {url}: {reason}; download it by hand and put it at "
            f"{final}{_weights_flag(spec)}"
        )

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "gpen-video"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            log.info("%s: server reports %s already complete", spec.name, part)
            return
        raise fail(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise fail(str(reason)) from exc
    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None and length.isdigit() else None
        if offset and response.status != 206:
            log.info("%s: server ignored the Range request; downloading from the start", spec.name)
            offset = 0
        total = None if remaining is None else offset + remaining
        if total and spec.size_bytes and abs(total - spec.size_bytes) > 0.1 * spec.size_bytes:
            log.warning("%s: %s announces %d bytes, expected about %d", spec.name, url, total, spec.size_bytes)
        received = 0
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=spec.filename, file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            try:
                while block := response.read(CHUNK):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as exc:  # includes http.client.IncompleteRead
                raise fail(
                    f"the transfer broke off after {offset + received:,} bytes ({exc}); run again to resume "
                    f"from {part}"
                ) from exc
    if remaining is not None and received < remaining:
        raise fail(
            f"the transfer broke off after {offset + received:,} of {total:,} bytes; run again to resume "
            f"from {part}"
        )


def _validate_and_install(part: Path, final: Path, spec: WeightSpec, url: str) -> dict[str, torch.Tensor]:
    try:
        state = load_checkpoint(part, spec, source=url)
    except WeightsError:
        part.unlink(missing_ok=True)
        raise
    digest = file_sha256(part)
    if spec.sha256 and digest != spec.sha256.lower():
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"the {spec.name} file downloaded from {url} has sha256 {digest}, not the published "
            f"{spec.sha256}; it was deleted: try again later or use another mirror"
        )
    write_atomic(_sidecar(final), f"{digest}  {final.name}\n".encode("ascii"))
    os.replace(part, final)
    log.info("%s: saved %s (sha256 %s)", spec.name, final, digest)
    return state


def _check_recorded(path: Path, spec: WeightSpec) -> bool:
    """True when a recorded (or published) sha256 matches; WeightsError when one does not."""
    recorded = _recorded_sha256(path) or (spec.sha256.lower() if spec.sha256 else None)
    if recorded is None:
        return False
    digest = file_sha256(path)
    if digest != recorded:
        raise WeightsError(
            f"{path} does not match its recorded sha256 (recorded {recorded[:12]}…, now {digest[:12]}…); "
            f"delete it (and {_sidecar(path).name}) to download {spec.name} again"
        )
    return True


def _mirror_url(mirror: str, spec: WeightSpec) -> str:
    return mirror.rstrip("/") + "/" + spec.filename


def _resolve(
    name: str | WeightSpec,
    *,
    path: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    offline: bool,
    progress: bool,
    url: str | None,
    mirror: str | None,
) -> tuple[Path, dict[str, torch.Tensor] | None]:
    spec = get_spec(name)
    if path is not None:
        given = Path(path).expanduser()
        if given.is_dir():
            raise WeightsError(f"weights path {given} is a folder; --weights takes a .pth file, e.g. "
                               f"{given / spec.filename}")
        if not given.is_file():
            raise WeightsError(f"weights file {given} does not exist; check the path given to --weights")
        return given, load_checkpoint(given, spec)

    root = _cache_root(cache_dir)
    final = root / spec.filename
    if final.is_file():
        if _check_recorded(final, spec):
            return final, None
        state = load_checkpoint(final, spec)
        write_atomic(_sidecar(final), f"{file_sha256(final)}  {final.name}\n".encode("ascii"))
        return final, state

    urls = (url,) if url else (_mirror_url(mirror, spec),) if mirror else spec.urls
    if offline:
        raise WeightsError(
            f"{spec.name} is not cached at {final} and downloads are off (--offline); download {urls[0]} "
            f"by hand and put it there{_weights_flag(spec)}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the weights cache {root} ({exc}); pass --cache-dir DIR") from exc
    part = _part(final)
    error: DownloadError | None = None
    for candidate in urls:
        try:
            log.info("%s: downloading %s to %s", spec.name, candidate, final)
            _download(candidate, part, spec, final, progress)
        except DownloadError as exc:
            error = exc
            continue
        return final, _validate_and_install(part, final, spec, candidate)
    assert error is not None
    raise error


def resolve_weights(
    name: str | WeightSpec,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: bool = True,
    url: str | None = None,
    mirror: str | None = None,
) -> Path:
    """A validated local file of ``name``'s weights, downloading it when needed.

    Args:
        name: registry name (``GPEN-BFR-512``, ``RetinaFace-R50`` …) or a ``WeightSpec``.
        path: a file the user supplied: validated and returned, never downloaded or replaced.
        cache_dir: where downloads live (None: ``default_cache_dir()``, which honours
            $GPEN_VIDEO_HOME).
        offline: never touch the network; WeightsError if the file is not cached.
        progress: show a tqdm bar on stderr while downloading.
        url: download from this address instead of the spec's.
        mirror: base address holding files under their registry filenames.
    Returns:
        The path of a file whose layout (or recorded sha256) has been checked.
    Raises:
        WeightsError / DownloadError with one sentence naming the file and the remedy.
    """
    return _resolve(name, path=path, cache_dir=cache_dir, offline=offline, progress=progress, url=url,
                    mirror=mirror)[0]


def load_state(
    name: str | WeightSpec,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: bool = True,
    url: str | None = None,
    mirror: str | None = None,
) -> dict[str, torch.Tensor]:
    """The checked state_dict of ``name``'s weights (arguments as in ``resolve_weights``).

    A file validated on this call (downloaded, or given by ``path``) is loaded once, not twice.
    """
    spec = get_spec(name)
    file, state = _resolve(spec, path=path, cache_dir=cache_dir, offline=offline, progress=progress, url=url,
                           mirror=mirror)
    return state if state is not None else load_checkpoint(file, spec)


def load_gpen(
    name: str | WeightSpec,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    url: str | None = None,
    mirror: str | None = None,
    **model_kwargs: Any,
) -> GPEN:
    """A GPEN network of preset ``name`` with its weights loaded strictly, in eval mode.

    Arguments as in ``resolve_weights``; ``device``/``dtype`` place the network,
    ``model_kwargs`` go to ``GPEN`` (e.g. ``modconv="grouped"``).

    Example::

        model = load_gpen("GPEN-BFR-256", offline=True)
    """
    spec = get_spec(name)
    if spec.kind != "gpen" or spec.config is None:
        raise WeightsError(f"{spec.name} is a {spec.kind} file, not a GPEN preset; choose one of "
                           f"{', '.join(n for n, s in REGISTRY.items() if s.kind == 'gpen')}")
    file, state = _resolve(spec, path=path, cache_dir=cache_dir, offline=offline, progress=progress, url=url,
                           mirror=mirror)
    if state is None:
        state = load_checkpoint(file, spec)
    with torch.device("meta"):
        model = build_model(spec.config, **model_kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def list_models(cache_dir: str | os.PathLike[str] | None = None) -> list[ModelStatus]:
    """Every registry entry with where it is cached and whether it is there."""
    root = _cache_root(cache_dir)
    rows = []
    for spec in REGISTRY.values():
        file = root / spec.filename
        present = file.is_file()
        rows.append(ModelStatus(
            name=spec.name, kind=spec.kind, path=file, present=present,
            size_bytes=file.stat().st_size if present else spec.size_bytes,
            verified=present and _sidecar(file).is_file(),
        ))
    return rows


def with_url(spec: WeightSpec, url: str) -> WeightSpec:
    """A copy of ``spec`` that downloads from ``url``."""
    return replace(spec, urls=(url,))


__all__ = [
    "REGISTRY", "ModelStatus", "WeightSpec", "default_cache_dir", "expected_layout", "file_sha256", "get_spec",
    "list_models", "load_checkpoint", "load_gpen", "load_state", "modelscope_url", "resolve_weights", "spec_for",
    "with_url",
]

