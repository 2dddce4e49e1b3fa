"""Upscaling: whole frames made 2-4× larger by Real-ESRGAN networks (our own torch code) or Lanczos.

>>> import torch
>>> from gpen_video.upscale import UpscaleConfig, create_upscaler
>>> up = create_upscaler(UpscaleConfig("lanczos", scale=2))
>>> up(torch.rand(1, 3, 8, 8)).shape  # [N3HW] RGB in [0, 1] → [N3(2H)(2W)], same device and dtype
torch.Size([1, 3, 16, 16])

Modules: ``networks`` (RRDBNet, SRVGGNetCompact), ``ncnn`` (reads the shipped ncnn files),
``upscaler`` (the upscalers), ``stage`` (the frame stream's stage: batches of frames, faces
mapped to the new size, the output's description). Names load on first use: the weights registry imports ``networks``,
and the stage imports the registry.
"""

_EXPORTS = {
    "LanczosUpscaler": "upscaler", "NetworkUpscaler": "upscaler", "UPSCALERS": "upscaler",
    "UpscaleConfig": "upscaler", "Upscaler": "upscaler", "UpscalerSpec": "upscaler",
    "create_upscaler": "upscaler", "load_network": "upscaler",
    "RRDBConfig": "networks", "RRDBNet": "networks", "SRVGGConfig": "networks", "SRVGGNetCompact": "networks",
    "read_ncnn": "ncnn", "read_shipped": "ncnn",
    "UpscaleStage": "stage", "build_upscale_stage": "stage", "scale_points": "stage", "scaled_info": "stage",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpen_video.upscale' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"gpen_video.upscale.{_EXPORTS[name]}"), name)


__all__ = sorted(_EXPORTS)
