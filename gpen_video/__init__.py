"""gpen-video: restore faces in videos with GPEN, keeping everything else intact.

Example::

    from gpen_video import FacePipeline, load_config
    pipeline = FacePipeline(load_config("fast", device="cpu"))
    pipeline.restore_video("tape.mp4", "tape.restored.mp4")
    restored = list(pipeline.restore_frames(rgb_frames))
"""

__version__ = "0.1.0"

from gpen_video.config import Config, load_config  # noqa: E402
from gpen_video.errors import Cancelled, GpenVideoError  # noqa: E402
from gpen_video.records import Detections, Frame, TrackedFace  # noqa: E402


def __getattr__(name: str):
    """Heavy entry points (torch, PyAV) load on first use, so ``import gpen_video`` stays quick."""
    lazy = {
        "FacePipeline": ("gpen_video.jobs.api", "FacePipeline"),
        "JobResult": ("gpen_video.jobs.run", "JobResult"),
        "GPEN": ("gpen_video.restore.model", "GPEN"),
        "load_gpen": ("gpen_video.restore.weights", "load_gpen"),
        "resolve_weights": ("gpen_video.restore.weights", "resolve_weights"),
        "list_models": ("gpen_video.restore.weights", "list_models"),
        "create_detector": ("gpen_video.faces.detect", "create_detector"),
    }
    if name not in lazy:
        raise AttributeError(f"module 'gpen_video' has no attribute {name!r}")
    import importlib

    module, attr = lazy[name]
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "Cancelled", "Config", "Detections", "FacePipeline", "Frame", "GPEN", "GpenVideoError",
    "JobResult", "TrackedFace", "__version__", "create_detector", "list_models", "load_config", "load_gpen",
    "resolve_weights",
]
