import numpy as np
import pytest
import torch

from gpen_video.device import resolve_device, resolve_dtype
from gpen_video.errors import DeviceError
from gpen_video.restore.restorer import Restorer


class Negate(torch.nn.Module):
    def forward(self, x):
        return -x


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_value_mapping_round_trips_both_bit_depths(dtype):
    top = np.iinfo(dtype).max
    crops = np.random.default_rng(1).integers(0, top + 1, (3, 8, 8, 3), dtype=dtype)
    out = Restorer(Negate(), 8, batch_size=2).restore(crops)
    assert out.dtype == dtype
    # -x in [-1, 1] is top - v in pixel values, up to float rounding of one level
    assert np.abs(out.astype(np.int64) - (top - crops.astype(np.int64))).max() <= 1


def test_output_is_clipped_to_range():
    class Loud(torch.nn.Module):
        def forward(self, x):
            return x * 5

    out = Restorer(Loud(), 4).restore(np.array([[[[0, 128, 255]] * 4] * 4], np.uint8))
    assert out.min() == 0 and out.max() == 255


def test_wrong_crop_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\(n, 8, 8, 3\)"):
        Restorer(Negate(), 8).restore(np.zeros((1, 4, 4, 3), np.uint8))


def test_devices_and_precisions():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DeviceError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
