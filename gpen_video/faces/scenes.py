"""Scene-cut detection, so that no face track spans a cut.

``SceneCutDetector`` compares colour and contrast histograms of consecutive thumbnails made by
``cut_signature`` (cheap enough for the decode thread); the planner resets the tracker
(``gpen_video.faces.track.Tracker.reset``) where it fires.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from gpen_video.faces.pictures import scaled_picture
from gpen_video.records import Frame, check_shape

log = logging.getLogger(__name__)

SIGNATURE_SIZE = 64


def cut_signature(rgb: np.ndarray, size: int = SIGNATURE_SIZE) -> np.ndarray:
    """The small frame ``SceneCutDetector.update`` wants: (h, w, 3) uint8, long side ``size``.

    Cheap enough for the decode thread. Accepts uint8 or uint16 (H, W, 3) RGB.
    """
    check_shape("rgb", rgb, (None, None, 3))
    if rgb.dtype == np.uint16:
        rgb = (rgb >> 8).astype(np.uint8)
    elif rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 or uint16, got {rgb.dtype}")
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    if scale >= 1.0:
        return np.ascontiguousarray(rgb)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(rgb, (out_w, out_h), interpolation=cv2.INTER_AREA)


_HUE_BINS, _SAT_BINS, _LUMA_BINS = 12, 3, 16
_MIN_CHROMA = 40  # saturation (of 255) below this: hue is noise, pixel counts as grey
_MIN_VALUE = 12  # so does a pixel this dark, or darker than 35 % of the frame's mean


def _features(small: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Chroma (hue x saturation + grey) and mean-normalised luma histograms, and mean luma."""
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.int32)  # [P,3]
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    mean_v = float(v.mean())
    coloured = (s >= _MIN_CHROMA) & (v >= max(_MIN_VALUE, 0.35 * mean_v))
    hue_bin = np.minimum(h * _HUE_BINS // 180, _HUE_BINS - 1)
    sat_bin = np.minimum((s - _MIN_CHROMA) * _SAT_BINS // (256 - _MIN_CHROMA), _SAT_BINS - 1)
    chroma_bin = np.where(coloured, hue_bin * _SAT_BINS + sat_bin, _HUE_BINS * _SAT_BINS)
    chroma = np.bincount(chroma_bin, minlength=_HUE_BINS * _SAT_BINS + 1).astype(np.float64)
    rel = v / max(mean_v, 1.0)  # invariant to fades to and from black
    luma = np.histogram(rel, bins=_LUMA_BINS, range=(0.0, 3.0))[0].astype(np.float64)
    luma[-1] += np.count_nonzero(rel >= 3.0)
    return chroma / chroma.sum(), luma / max(luma.sum(), 1.0), mean_v / 255.0


@dataclass(frozen=True)
class CutFeatures:
    """What ``SceneCutDetector`` compares of one frame, small enough to log per frame (a resumed
    job replays them instead of decoding the frame again).

    Attributes:
        chroma: (37,) float64 hue x saturation histogram plus a grey bin, summing to 1.
        luma: (16,) float64 histogram of luma divided by its mean, summing to 1 (or all 0).
        mean_luma: mean luma in [0, 1].
    """

    chroma: np.ndarray
    luma: np.ndarray
    mean_luma: float

    def __post_init__(self) -> None:
        check_shape("CutFeatures.chroma", self.chroma, (_HUE_BINS * _SAT_BINS + 1,))
        check_shape("CutFeatures.luma", self.luma, (_LUMA_BINS,))


def cut_features(rgb: np.ndarray) -> CutFeatures:
    """The features ``SceneCutDetector.update_features`` takes, of an (H, W, 3) uint8 or uint16
    RGB frame (reduced with ``cut_signature`` first, so any size is cheap)."""
    return CutFeatures(*_features(cut_signature(rgb)))


def frame_cut_features(frame: Frame) -> CutFeatures:
    """``cut_features`` of a frame, from its small picture (``faces.pictures.scaled_picture``):
    a decoded frame's full-size RGB is not made for it."""
    small, _, _ = scaled_picture(frame, SIGNATURE_SIZE)
    return CutFeatures(*_features(small))


def _hellinger(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sqrt(max(0.0, 1.0 - np.sum(np.sqrt(p * q)))))


class SceneCutDetector:
    """Says whether a frame starts a new shot, from the frame's ``cut_signature``.

    The distance between consecutive frames is the mean Hellinger distance of two global
    histograms: hue x saturation (grey pixels pooled) and luma divided by its mean. Global
    histograms barely change under pans, zooms and moving people; hue, saturation and
    mean-normalised luma do not change under fades to or from black, and frames darker than
    ``dark_level`` are skipped, so a fade-out/fade-in to another shot is reported once, at the
    first frame bright enough to see. A cut must also stand out from the recent distances
    (``contrast``), which keeps busy hand-held footage from firing. Cross-dissolves spread
    over many frames are not detected.

    Args:
        threshold: smallest histogram distance (0..1) that can be a cut. Higher misses cuts
            between similar-looking shots; lower fires on fast motion and lighting changes.
        contrast: a cut's distance must also exceed this many times the median distance of
            the last ``history`` frames. Higher ignores cuts inside very busy footage; lower
            fires more often there.
        min_scene_len: frames after a cut during which no other cut is reported. Higher
            ignores flashes and strobes; lower allows very short shots.
        dark_level: mean luma (0..1) below which a frame is too dark to compare and is
            skipped. Higher skips more of a fade; lower compares noisy near-black frames.
        history: number of recent distances kept for the ``contrast`` test.

    Example:
        >>> import numpy as np
        >>> det = SceneCutDetector()
        >>> grey = np.full((48, 64, 3), 128, np.uint8)
        >>> det.update(grey), det.update(grey)
        (False, False)
    """

    def __init__(
        self,
        threshold: float = 0.2,
        contrast: float = 3.0,
        min_scene_len: int = 6,
        dark_level: float = 0.1,
        history: int = 15,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if contrast < 0:
            raise ValueError(f"contrast must be >= 0, got {contrast}")
        if min_scene_len < 1:
            raise ValueError(f"min_scene_len must be >= 1, got {min_scene_len}")
        self.threshold = threshold
        self.contrast = contrast
        self.min_scene_len = min_scene_len
        self.dark_level = dark_level
        self._recent: deque[float] = deque(maxlen=max(1, history))
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._since_cut = min_scene_len
        self.last_distance: float | None = None
        """Histogram distance computed by the last ``update`` (None when it compared nothing)."""

    def reset(self) -> None:
        """Forget the previous frames (e.g. when seeking)."""
        self._recent.clear()
        self._reference = None
        self._since_cut = self.min_scene_len
        self.last_distance = None

    def update(self, rgb_small: np.ndarray) -> bool:
        """Feed the next frame's signature; True if this frame starts a new shot.

        The first frame fed (after construction or ``reset``) returns False: there is
        nothing before it to cut from. Any (h, w, 3) uint8/uint16 image works, but large
        ones are slow: pass ``cut_signature(frame.rgb)``.
        """
        check_shape("rgb_small", rgb_small, (None, None, 3))
        if rgb_small.dtype != np.uint8 or max(rgb_small.shape[:2]) > 2 * SIGNATURE_SIZE:
            rgb_small = cut_signature(rgb_small)
        return self.update_features(CutFeatures(*_features(rgb_small)))

    def update_features(self, features: CutFeatures) -> bool:
        """``update`` for a frame's ``cut_features``: the same answer, without its pixels."""
        chroma, luma, mean_luma = features.chroma, features.luma, features.mean_luma
        self._since_cut += 1
        self.last_distance = None
        if mean_luma < self.dark_level:
            return False
        previous, self._reference = self._reference, (chroma, luma)
        if previous is None:
            return False
        distance = 0.5 * (_hellinger(chroma, previous[0]) + _hellinger(luma, previous[1]))
        self.last_distance = distance
        baseline = float(np.median(self._recent)) if self._recent else 0.0
        is_cut = (
            distance > self.threshold
            and distance > self.contrast * baseline
            and self._since_cut >= self.min_scene_len
        )
        if is_cut:
            log.debug("scene cut: histogram distance %.3f (baseline %.3f)", distance, baseline)
            self._since_cut = 0
            self._recent.clear()
        else:
            self._recent.append(distance)
        return is_cut
