"""Parametrisation over the devices a torch test can run on (CUDA ones skipped without a GPU)."""

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]
