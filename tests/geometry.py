"""Known similarity transforms for geometry tests."""

import numpy as np


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """(2, 3) matrix: rotate by ``angle_deg``, scale, then translate."""
    a = np.deg2rad(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]], np.float64)


def apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (n, 2) points through a (2, 3) affine matrix."""
    return pts @ affine[:, :2].T + affine[:, 2]
