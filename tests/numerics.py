"""Tolerances stated relative to the values compared.

Two float32 implementations of one network (onnxruntime and torch, or two memory layouts)
round differently, and how much depends on the kernels the machine's libraries pick: an
absolute tolerance that fits outputs of magnitude 1 fails on outputs of magnitude 4 with
another onnxruntime. ``assert_close_to_scale`` states the tolerance as a fraction of the
largest magnitude compared, so it says "agree to N significant digits" on any machine.
"""

from __future__ import annotations

import numpy as np


def assert_close_to_scale(actual, expected, rel: float, what: str = "values") -> None:
    """``max |actual - expected| <= rel * max |expected|`` (elementwise shapes must match).

    >>> assert_close_to_scale([4.00001, -2.0], [4.0, -2.0], rel=1e-5)
    >>> assert_close_to_scale([4.1, -2.0], [4.0, -2.0], rel=1e-5)
    Traceback (most recent call last):
    ...
    AssertionError: values differ by 0.1 (2.5e-02 of their scale 4), allowed 1e-05 of it
    """
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes {a.shape} and {b.shape}")
    scale = float(np.abs(b).max()) if b.size else 0.0
    error = float(np.abs(a - b).max()) if b.size else 0.0
    if not error <= rel * scale:
        raise AssertionError(f"{what} differ by {error:.3g} ({error / scale if scale else np.inf:.1e} of "
                             f"their scale {scale:.3g}), allowed {rel:g} of it")
