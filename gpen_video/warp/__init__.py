"""Cut faces out of a frame for GPEN and paste the restored faces back: one interface, two engines.

``create_warp`` chooses once, where a pipeline is built, between:
- ``OpenCVWarp`` (reference): OpenCV warps on the host over each face's region only;
- ``TorchWarp`` (fast on GPUs): ``F.affine_grid``/``F.grid_sample`` on the restorer's device,
  the frame kept there as integers between crop and paste.
Both give the same crops and the same pasted frames within the tolerances the tests state.

Crop: a bilinear warp of the face onto GPEN's five-point template (``faces.align``). Crop
pixels that fall outside the frame mirror the frame at its edge: a black band is something
GPEN never saw in training (FFHQ crops are reflect-padded), and it bleeds dark smears into
faces at frame edges. Mirrored pixels land outside the frame again when pasted.

Paste: per face, the restored crop (smoothed for faces under ``SMALL_FACE`` px) and its mask
are warped back into the face's region of the frame (bicubic image, bilinear mask), then
combined with a normalised weighted average:

    w_i = strength · m_i,   W = Σ w_i
    out = Σ w_i·f_i / max(1, W) + (1 − min(1, W)) · orig

For one face this is the original demo's ``m·f + (1 − m)·orig``. Where faces overlap it is a
mask-weighted average, continuous in every mask, so no seam appears where one mask overtakes
another (the demo keeps the face with the larger mask per pixel, which steps where masks
cross). ``strength`` scales the mask, so the faded-out part is the untouched frame: strength 0
returns the input frame itself, and pixels no mask touches are copied bit for bit.
"""

from __future__ import annotations

import torch

from gpen_video.warp.protocol import (  # noqa: F401 - the package's interface
    WarpKind, SMALL_FACE, SMOOTH_KERNEL, FaceCrops, Warp, check_paste,
)


def create_warp(kind: WarpKind, *, size: int, device: torch.device | str) -> Warp:
    """The warp for a job: ``opencv``, ``torch``, or ``auto`` (torch on CUDA, else OpenCV).

    Example:
        >>> warp = create_warp("auto", size=512, device=torch.device("cpu"))
        >>> type(warp).__name__
        'OpenCVWarp'
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    device = torch.device(device)
    if kind == "auto":
        kind = "torch" if device.type == "cuda" else "opencv"
    if kind == "opencv":
        from gpen_video.warp.opencv_warp import OpenCVWarp

        return OpenCVWarp(size, device=device)
    if kind == "torch":
        from gpen_video.warp.torch_warp import TorchWarp

        return TorchWarp(size, device=device)
    raise ValueError(f"unknown warp {kind!r}; use auto, opencv or torch")
