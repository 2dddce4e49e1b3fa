"""Scene-cut detector on pans, cuts and fades made from real test images."""

from __future__ import annotations

import numpy as np
from skimage import data as skdata

from gpen_video.faces.scenes import SceneCutDetector, cut_signature


def pan(image: np.ndarray, n: int, step: int, size: int = 256) -> list[np.ndarray]:
    return [image[40 : 40 + size, step * i : step * i + size] for i in range(n)]


def test_cut_fires_on_hard_cut_not_on_pan():
    astronaut, coffee, chelsea = skdata.astronaut(), skdata.coffee(), skdata.chelsea()
    shot_a = pan(astronaut, 40, 6)  # 6 px per frame pan over a real face
    shot_b = pan(coffee, 20, 5)
    shot_c = pan(chelsea, 20, 4)
    frames = shot_a + shot_b + shot_c
    detector = SceneCutDetector()
    cuts = [i for i, f in enumerate(frames) if detector.update(cut_signature(f))]
    assert cuts == [40, 60]


def test_fade_does_not_fire_but_fade_to_another_shot_does():
    astronaut, coffee = skdata.astronaut(), skdata.coffee()
    base = astronaut[100:356, 100:356].astype(np.float64)
    fade_out = [(base * (1 - i / 12)).astype(np.uint8) for i in range(13)]
    fade_in = [(base * (i / 12)).astype(np.uint8) for i in range(13)]
    detector = SceneCutDetector()
    assert not any(detector.update(cut_signature(f)) for f in fade_out + fade_in)
    other = coffee[50:306, 100:356].astype(np.float64)
    fade_other = [(other * (i / 12)).astype(np.uint8) for i in range(1, 13)]
    fired = [i for i, f in enumerate(fade_out + fade_other) if detector.update(cut_signature(f))]
    assert len(fired) == 1 and fired[0] >= 13


def test_cut_signature_is_small_and_accepts_uint16():
    rgb8 = skdata.astronaut()[:300]  # 300 x 512
    small = cut_signature(rgb8)
    assert small.dtype == np.uint8 and small.shape == (38, 64, 3)
    small16 = cut_signature(rgb8.astype(np.uint16) * 257)
    assert np.abs(small16.astype(int) - small.astype(int)).max() <= 1
    detector = SceneCutDetector()
    detector.update(small)
    assert detector.update(rgb8.astype(np.uint16) * 257) is False  # same picture, 16-bit
    assert detector.last_distance is not None and detector.last_distance < 0.05
