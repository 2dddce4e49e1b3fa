"""Head yaw from five landmarks, and how much of each frame of a track to restore.

GPEN was trained on FFHQ: aligned, mostly frontal faces. A face turned far to the side is
squeezed by the frontal five-point template, its far eye is hidden (the detector guesses that
landmark), and GPEN invents a frontal-looking face onto a profile. ``fade_weights`` fades such
frames out, smoothly along the track, and fades a face in and out where it starts or stops
being restored inside a shot, so that no restored face pops on or off. Everything here is
numpy over one track's landmark sequence, so a streaming job can compute it within its
look-ahead (``fade_reach``).

Yaw model: a scaled orthographic view of a rigid face whose eyes and mouth corners lie in
one plane and whose nose tip stands ``NOSE_DEPTH`` in front of it. Turning the head by θ
narrows the eyes and mouth by cos θ and moves the nose tip off the eyes–mouth midline by
``NOSE_DEPTH``·sin θ, so θ = atan(offset · w / (NOSE_DEPTH · half-width)). Roll and pitch do
not enter: the midline is measured from the landmarks themselves.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gpen_video.faces.align import template
from gpen_video.records import check_shape

_T = template(512)
MEAN_HALF_WIDTH = float(((_T[1, 0] - _T[0, 0]) + (_T[4, 0] - _T[3, 0])) / 4)
"""Mean of half the eye distance and half the mouth width of GPEN's template (512 crop pixels)."""

NOSE_DEPTH = 34.0
"""How far the nose tip stands in front of the eyes' and mouth corners' plane, in the same
512-template pixels (about 20 mm against a 63 mm eye distance, from anthropometric head
models; the five-point detectors' eye points are the pupils)."""


def yaw_degrees(landmarks: np.ndarray) -> np.ndarray:
    """Head yaw of each face in degrees: 0 frontal, positive when the nose points to the image's right.

    Args:
        landmarks: (N, 5, 2) five points per face (``records`` order: eyes, nose, mouth corners).

    Returns:
        (N,) float64 in (−90, 90).

    >>> from gpen_video.faces.align import template
    >>> bool(abs(yaw_degrees(template(512)[None])[0]) < 0.5)  # GPEN's template is frontal
    True
    """
    lm = np.asarray(landmarks, np.float64)
    check_shape("landmarks", lm, (None, 5, 2))
    eye_mid = (lm[:, 0] + lm[:, 1]) / 2  # [N,2]
    mouth_mid = (lm[:, 3] + lm[:, 4]) / 2
    down = mouth_mid - eye_mid
    down /= np.linalg.norm(down, axis=1, keepdims=True).clip(1e-9)
    right = np.stack([down[:, 1], -down[:, 0]], 1)  # down turned by −90°: image x for an upright face
    offset = ((lm[:, 2] - eye_mid) * right).sum(1)  # [N]
    half_width = (((lm[:, 1] - lm[:, 0]) * right).sum(1) + ((lm[:, 4] - lm[:, 3]) * right).sum(1)) / 4
    return np.degrees(np.arctan2(offset * MEAN_HALF_WIDTH, NOSE_DEPTH * np.abs(half_width).clip(1e-9)))


def fade_reach(fade_frames: int) -> int:
    """Frames either side of a frame that its fade weight depends on."""
    return 2 * (fade_frames // 2)


def fade_weights(
    landmarks: np.ndarray,
    wanted: np.ndarray | None = None,
    *,
    max_yaw: float = 55.0,
    yaw_band: float = 15.0,
    fade_frames: int = 9,
    min_track_frames: int = 3,
    fade_start: bool = False,
    fade_end: bool = False,
) -> np.ndarray:
    """How much of each frame of one track to restore, in [0, 1] (multiply the paste mask by it).

    A frame's target is 1 up to ``max_yaw − yaw_band`` degrees of yaw, falling linearly to 0 at
    ``max_yaw``, and 0 where ``wanted`` is false. The weights follow the target with ramps of
    ``fade_frames`` frames, zero-phase: a min filter then a mean filter of that width, so a
    weight never exceeds its frame's target (a frame not to be restored gets 0) and changes by at
    most 1/``fade_frames`` per frame. A frame's weight depends on the track's frames within
    ``fade_reach(fade_frames)`` of it only.

    Args:
        landmarks: (N, 5, 2) the track's (smoothed) landmarks, one per consecutive frame.
        wanted: (N,) bool, whether the planner restores the face in each frame (None: all).
        max_yaw: yaw (degrees) at and beyond which nothing is restored.
        yaw_band: degrees below ``max_yaw`` over which restoration fades out.
        fade_frames: length of a fade. Longer: gentler, less noticeable transitions, but a
            face turned away briefly is faded for longer around it.
        min_track_frames: tracks shorter than this are not restored at all (a face seen for
            one or two frames is more likely a false detection, and would only flash).
        fade_start, fade_end: fade in at the first frame / out at the last frame of the
            sequence (a face that appears or leaves within a shot). False: the weight at the
            edge holds (a track cut by a scene cut: the cut itself is the change).

    Returns:
        (N,) float64 weights in [0, 1].

    >>> lm = np.repeat(template(512)[None], 12, 0)
    >>> np.round(fade_weights(lm, np.arange(12) >= 4, fade_frames=5), 2).tolist()
    [0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0]
    """
    lm = np.asarray(landmarks, np.float64)
    check_shape("landmarks", lm, (None, 5, 2))
    n = len(lm)
    if wanted is None:
        wanted = np.ones(n, bool)
    wanted = np.asarray(wanted, bool)
    check_shape("wanted", wanted, (n,))
    if not 0.0 < max_yaw <= 90.0 or not 0.0 <= yaw_band < max_yaw:
        raise ValueError(f"need 0 < max_yaw <= 90 and 0 <= yaw_band < max_yaw, got {max_yaw}, {yaw_band}")
    if fade_frames < 1 or min_track_frames < 1:
        raise ValueError(f"fade_frames and min_track_frames must be >= 1, got {fade_frames}, {min_track_frames}")
    if n < min_track_frames:
        return np.zeros(n)
    yaw = np.abs(yaw_degrees(lm))
    target = np.clip((max_yaw - yaw) / max(yaw_band, 1e-9), 0.0, 1.0) * wanted  # [N]
    width = fade_frames // 2 * 2 + 1  # odd, so the filters are centred
    pad = width  # beyond both reaches (width // 2 each)
    padded = np.pad(target, pad, mode="edge")
    if fade_start:
        padded[:pad] = 0.0
    if fade_end:
        padded[-pad:] = 0.0
    # each window summed on its own, in one order: a frame's weight is bit-identical whatever
    # stretch of the track it is computed from (a running sum would carry rounding along)
    eroded = sliding_window_view(padded, width).min(1)  # [n + 2·pad − width + 1]
    smooth = sliding_window_view(eroded, width).mean(1)[pad - width + 1 : pad - width + 1 + n]
    return np.clip(np.minimum(smooth, target), 0.0, 1.0)


__all__ = ["MEAN_HALF_WIDTH", "NOSE_DEPTH", "fade_reach", "fade_weights", "yaw_degrees"]
