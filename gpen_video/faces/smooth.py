"""Landmark smoothing per track, zero-phase, in one decode.

Why: every frame is detected on its own, so five-point landmarks wobble by a pixel or two and
the aligned crop, hence the restored face, shakes and flickers. A smoother that sees both sides
of a frame removes the wobble without lag.

``smooth_track`` smooths one whole track: a local polynomial least-squares fit around every
frame. On a gap-free track with the defaults it is exactly a Savitzky–Golay filter (quadratic,
``window`` frames; ``mode="interp"`` at the ends), chosen because

- it is symmetric, hence zero-phase: no lag, and motion that is locally linear or quadratic
  (pans, zooms, a head turning) passes unchanged, while ~6x less frame-to-frame acceleration
  noise is left at ``window=9``;
- the window is the ``window`` *detected* frames nearest each output frame, so the same fit
  fills detector gaps (a smooth bridge, not a kink), needs no padding at track ends (the
  window slides inwards, so the ends get no overshoot or flattening artefacts), and works
  on tracks shorter than the window (degree drops to what the points support);
- outliers (a landmark set far from the fit of its neighbours) are removed from a second
  fit, so one bad detection does not drag its neighbours.

It smooths a similarity-invariant parametrisation by default: the 5 points' centre, log
scale and rotation (Procrustes angle against a canonical face), plus the residual shape in
the face's own frame, and the box relative to centre and scale. Smoothing x/y directly
shortens a rotating face (a chord is shorter than its arc) and couples pose noise into
shape; in this parametrisation a rotating or zooming face keeps its shape, and the box
follows the smoothed face exactly. ``space="points"`` smooths raw coordinates instead.

``LookaheadSmoother`` gives the same result while frames stream past: every fit only reaches
a bounded number of frames, so each frame is final once that many later frames are known.
``smooth_track`` on whole tracks stays as its reference.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from gpen_video.records import TrackedFace

log = logging.getLogger(__name__)

Space = Literal["similarity", "points"]

# ArcFace five-point template (112 px crop), centred and divided by the crop size.
_TEMPLATE = (
    np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
         [41.5493, 92.3655], [70.7299, 92.2041]],
        np.float64,
    )
    - 56.0
) / 112.0  # [5,2]
_TEMPLATE_C = _TEMPLATE - _TEMPLATE.mean(0)

_OUTLIER_FLOOR = 0.05  # face sizes: residuals below this are never outliers


# ------------------------------------------------------------------ parametrisations


def _encode(landmarks: np.ndarray, boxes: np.ndarray, space: Space) -> np.ndarray:
    """[M,5,2] landmarks and [M,4] boxes -> [M,P] parameters that are smoothed linearly."""
    m = len(landmarks)
    if space == "points":
        return np.concatenate([landmarks.reshape(m, 10), boxes], axis=1)  # [M,14]
    centre = landmarks.mean(1)  # [M,2]
    x = landmarks - centre[:, None, :]  # [M,5,2]
    scale = np.sqrt((x**2).sum(-1).mean(-1)).clip(1e-6)  # [M]
    tx, ty = _TEMPLATE_C[:, 0], _TEMPLATE_C[:, 1]
    num = (tx * x[..., 1] - ty * x[..., 0]).sum(-1)
    den = (tx * x[..., 0] + ty * x[..., 1]).sum(-1)
    angle = np.unwrap(np.arctan2(num, den))  # [M]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rx = (cos * x[..., 0] + sin * x[..., 1]) / scale[:, None]  # rotate by -angle
    ry = (-sin * x[..., 0] + cos * x[..., 1]) / scale[:, None]
    shape = np.stack([rx, ry], -1).reshape(m, 10)  # [M,10]
    rel_box = (boxes - np.tile(centre, 2)) / scale[:, None]  # [M,4]
    return np.concatenate(
        [centre, np.log(scale)[:, None], angle[:, None], shape, rel_box], axis=1
    )  # [M,18]


def _decode(params: np.ndarray, space: Space) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``_encode``: [N,P] -> ([N,5,2] landmarks, [N,4] boxes)."""
    n = len(params)
    if space == "points":
        return params[:, :10].reshape(n, 5, 2), params[:, 10:14]
    centre, scale, angle = params[:, 0:2], np.exp(params[:, 2]), params[:, 3]
    shape = params[:, 4:14].reshape(n, 5, 2)
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x = cos * shape[..., 0] - sin * shape[..., 1]
    y = sin * shape[..., 0] + cos * shape[..., 1]
    landmarks = centre[:, None, :] + scale[:, None, None] * np.stack([x, y], -1)
    boxes = np.tile(centre, 2) + scale[:, None] * params[:, 14:18]
    return landmarks, boxes


# ------------------------------------------------------------------ local polynomial fit


def _nearest_windows(t_obs: np.ndarray, t_out: np.ndarray, k: int) -> np.ndarray:
    """Start index into sorted ``t_obs`` [M] of the k nearest observations of each ``t_out``.

    In 1-D the k nearest points are contiguous; among the candidate runs pick the one with
    the smallest farthest distance (earliest on ties).
    """
    m = len(t_obs)
    p = np.searchsorted(t_obs, t_out)  # [N]
    starts = np.clip(p[:, None] + np.arange(-k, 1)[None, :], 0, m - k)  # [N,k+1]
    reach = np.maximum(t_out[:, None] - t_obs[starts], t_obs[starts + k - 1] - t_out[:, None])
    return starts[np.arange(len(t_out)), reach.argmin(1)]  # [N]


def _local_poly(
    t_obs: np.ndarray, y_obs: np.ndarray, t_out: np.ndarray, window: int, degree: int
) -> np.ndarray:
    """Least-squares polynomial of ``degree`` through the ``window`` nearest observations.

    ``t_obs`` [M] sorted, ``y_obs`` [M,P], ``t_out`` [N] -> [N,P]. Batched: each output is a
    weighted sum of its window (the fit's equivalent kernel), all frames solved at once.
    """
    m = len(t_obs)
    k = min(window, m)
    deg = min(degree, k - 1)
    start = _nearest_windows(t_obs, t_out, k)  # [N]
    idx = start[:, None] + np.arange(k)[None, :]  # [N,k]
    dt = t_obs[idx] - t_out[:, None]  # [N,k]
    span = np.abs(dt).max(1, keepdims=True) + 1.0
    design = (dt / span)[..., None] ** np.arange(deg + 1)  # [N,k,D]
    gram = design.transpose(0, 2, 1) @ design  # [N,D,D]
    e0 = np.zeros((len(t_out), deg + 1, 1))
    e0[:, 0, 0] = 1.0
    # kernel = e0^T (X^T X)^-1 X^T: solve for the first row of the inverse only
    row = np.linalg.solve(gram, e0)  # [N,D,1]
    kernel = (design @ row)[..., 0]  # [N,k]
    return np.einsum("nk,nkp->np", kernel, y_obs[idx])  # [N,P]


def _local_poly_reference(
    t_obs: np.ndarray, y_obs: np.ndarray, t_out: np.ndarray, window: int, degree: int
) -> np.ndarray:
    """Slow per-frame twin of ``_local_poly`` (``numpy.polynomial`` fit); for tests."""
    k = min(window, len(t_obs))
    deg = min(degree, k - 1)
    start = _nearest_windows(t_obs, t_out, k)
    out = np.empty((len(t_out), y_obs.shape[1]))
    for i, (t, s) in enumerate(zip(t_out, start)):
        ts, ys = t_obs[s : s + k] - t, y_obs[s : s + k]
        for p in range(y_obs.shape[1]):
            out[i, p] = np.polynomial.polynomial.polyfit(ts, ys[:, p], deg)[0]
    return out


# ------------------------------------------------------------------ zero-phase smoother


def smooth_track(
    faces: Sequence[TrackedFace],
    *,
    window: int = 9,
    degree: int = 2,
    space: Space = "similarity",
    outlier_factor: float | None = 4.0,
    fill_gaps: bool = True,
    output: tuple[int, int] | None = None,
    reference: bool = False,
) -> list[TrackedFace]:
    """Zero-phase smoothing of one track, with its detector gaps filled.

    Args:
        faces: one track's records, frame indices strictly increasing (gaps allowed).
            ``landmarks`` (not ``landmarks_raw``) and ``box`` are what gets smoothed.
        window: detected frames in each local fit (even values are rounded up to odd so the
            window is centred). Longer: steadier faces, but quick motion and expression
            changes are rounded off; 1 turns smoothing off (gaps are still filled).
        degree: polynomial degree of the local fit. Higher keeps fast curved motion (a
            nod, a whip pan) closer to the detections but removes less noise; 2 keeps
            constant acceleration exactly, 1 is a moving average inside the track.
        space: ``"similarity"`` (centre, scale, rotation, residual shape; keeps the face's
            shape under rotation and zoom) or ``"points"`` (raw x/y).
        outlier_factor: a detection whose landmarks are farther from a first fit than this
            many times the median distance of the detections within a window either side
            (and more than 5 % of the face size) is
            left out of the final fit. Lower rejects more detections, including real quick
            moves; higher keeps more bad ones; None keeps every detection.
        fill_gaps: add interpolated records for the frames missing between detections.
        output: ``(first, last)``: return only the records of these frames (inclusive); every
            face given still takes part in the fits. None: all frames.
        reference: use the slow per-frame least-squares loop instead of the batched solve
            (same result; for tests).

    Returns:
        One record per frame from the first to the last frame of the track (within
        ``output``). Detected frames
        keep ``landmarks_raw``, ``score`` and ``interpolated=False`` and get smoothed
        ``landmarks`` and ``box``; filled frames have ``landmarks_raw=None``, ``score=None``,
        ``interpolated=True``.

    Example:
        >>> import numpy as np
        >>> from gpen_video.records import TrackedFace
        >>> lm = np.array([[40, 50], [70, 50], [55, 65], [43, 80], [67, 80]], np.float32)
        >>> box = np.array([25, 25, 85, 95], np.float32)
        >>> faces = [TrackedFace(3, i, box + i, lm + i, lm + i, 0.99) for i in (0, 1, 4)]
        >>> [f.interpolated for f in smooth_track(faces)]
        [False, False, True, True, False]
    """
    if not faces:
        return []
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if space not in ("similarity", "points"):
        raise ValueError(f"space must be 'similarity' or 'points', got {space!r}")
    window += 1 - window % 2
    track_id = faces[0].track_id
    frames = np.array([f.frame_index for f in faces], np.int64)
    if any(f.track_id != track_id for f in faces):
        ids = sorted({f.track_id for f in faces})
        raise ValueError(f"smooth_track needs the faces of one track, got ids {ids}")
    if np.any(np.diff(frames) <= 0):
        raise ValueError("smooth_track needs strictly increasing frame indices")

    landmarks = np.stack([f.landmarks for f in faces]).astype(np.float64)  # [M,5,2]
    boxes = np.stack([f.box for f in faces]).astype(np.float64)  # [M,4]
    params = _encode(landmarks, boxes, space)  # [M,P]
    t_obs = frames.astype(np.float64)
    t_out = np.arange(frames[0], frames[-1] + 1) if fill_gaps else frames
    if output is not None:
        t_out = t_out[(t_out >= output[0]) & (t_out <= output[1])]
        if not len(t_out):
            return []
    fit = _local_poly_reference if reference else _local_poly

    keep = np.ones(len(faces), bool)
    if outlier_factor is not None and len(faces) > degree + 2 and window > 1:
        first = _decode(fit(t_obs, params, t_obs, window, degree), space)[0]  # [M,5,2]
        sizes = np.array([max(f.size, 1e-6) for f in faces])
        residual = np.linalg.norm(first - landmarks, axis=-1).mean(-1) / sizes  # [M]
        # the typical residual around each detection, not the whole track's: noise changes
        # along a track (a face shrinking, blurring), and a local scale lets one decode with
        # a look-ahead decide exactly as two passes do
        from scipy.ndimage import median_filter  # here: its import (0.15 s) waits for a first face

        typical = median_filter(residual, size=2 * window + 1, mode="nearest")
        keep = residual <= np.maximum(outlier_factor * typical, _OUTLIER_FLOOR)
        if not keep.all():
            log.debug("track %d: %d outlier detection(s) left out", track_id, int((~keep).sum()))

    smoothed = fit(t_obs[keep], params[keep], t_out.astype(np.float64), window, degree)
    out_lm, out_box = _decode(smoothed, space)  # [N,5,2], [N,4]
    out_lm, out_box = out_lm.astype(np.float32), out_box.astype(np.float32)

    by_frame = {f.frame_index: f for f in faces}
    out = []
    for i, frame in enumerate(t_out.tolist()):
        face = by_frame.get(frame)
        if face is not None:
            out.append(replace(face, landmarks=out_lm[i], box=out_box[i]))
        else:
            out.append(
                TrackedFace(
                    track_id=track_id,
                    frame_index=frame,
                    box=out_box[i],
                    landmarks_raw=None,
                    landmarks=out_lm[i],
                    score=None,
                    interpolated=True,
                )
            )
    return out


def smooth_tracks(
    tracks: Mapping[int, Sequence[TrackedFace]],
    *,
    window: int = 9,
    degree: int = 2,
    space: Space = "similarity",
    outlier_factor: float | None = 4.0,
    fill_gaps: bool = True,
) -> dict[int, list[TrackedFace]]:
    """``smooth_track`` applied to each track of ``{track_id: faces}`` (see there)."""
    return {
        tid: smooth_track(
            faces, window=window, degree=degree, space=space,
            outlier_factor=outlier_factor, fill_gaps=fill_gaps,
        )
        for tid, faces in tracks.items()
    }


# ------------------------------------------------------------------ streaming, zero phase


class LookaheadSmoother:
    """Zero-phase smoothing while frames stream past: a frame is released once enough later ones are known.

    ``push`` takes every frame's tracked faces in order and returns the frames that are now
    final, in chunks; each chunk is smoothed with ``smooth_track`` over the detections within
    ``context`` frames of it. That equals whole-track smoothing wherever a track has ``window``
    detections within reach, which holds unless a track misses most of ``context`` frames in a
    row. Gaps are filled as by whole-track smoothing: any detection that could continue a track
    within ``max_gap`` frames has been pushed before the frames before it are released. Only
    the faces of the last ``delay + context`` frames are kept, however long the video.

    Args:
        window: smoother length in frames (as ``smooth_track``).
        max_gap: the tracker's ``max_gap``.
        chunk: frames released per smoothing call. Higher: less smoothing work per frame,
            more frames held in memory.
        **kwargs: passed to ``smooth_track``.

    Example:
        >>> smoother = LookaheadSmoother(window=3, max_gap=0, chunk=1)
        >>> released = [r for i in range(100, 110) for r in smoother.push(i, [])]
        >>> [i for i, _ in released + smoother.finish()] == list(range(100, 110))
        True
    """

    def __init__(self, *, window: int = 9, max_gap: int = 8, chunk: int = 16, **kwargs: Any) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.window = window
        self.context = 2 * window + max_gap + 2
        """Frames on either side of a released frame whose detections it depends on."""
        self.chunk = chunk
        self.kwargs = kwargs
        self._raw: dict[int, list[TrackedFace]] = {}
        self._next = 0
        self._last: int | None = None

    @property
    def delay(self) -> int:
        """Most frames held back before release (a frame is released at the latest when the
        frame ``delay - 1`` after it is pushed)."""
        return self.context + self.chunk

    def push(self, frame_index: int, faces: Sequence[TrackedFace]) -> list[tuple[int, list[TrackedFace]]]:
        """Add one frame's tracked faces; returns ``(frame_index, smoothed faces)`` now final.

        The first frame pushed may have any index; each later one must be the next index.
        """
        if self._last is None:
            self._next = frame_index
        elif frame_index != self._last + 1:
            raise ValueError(f"frames must be pushed in order without gaps: got {frame_index} after {self._last}")
        for face in faces:
            self._raw.setdefault(face.track_id, []).append(face)
        self._last = frame_index
        if self._last - self._next + 1 >= self.delay:
            return self._release(self._next + self.chunk - 1)
        return []

    def finish(self) -> list[tuple[int, list[TrackedFace]]]:
        """Release every frame still held (end of the video)."""
        if self._last is None or self._next > self._last:
            return []
        return self._release(self._last)

    def _release(self, last: int) -> list[tuple[int, list[TrackedFace]]]:
        first = self._next
        ready: dict[int, list[TrackedFace]] = {i: [] for i in range(first, last + 1)}
        keep_from = last + 1 - self.context
        for track_id in list(self._raw):
            faces = [f for f in self._raw[track_id] if f.frame_index >= first - self.context]
            if faces and faces[-1].frame_index >= first and faces[0].frame_index <= last:
                window = [f for f in faces if f.frame_index <= last + self.context]
                for face in smooth_track(window, window=self.window, output=(first, last), **self.kwargs):
                    ready[face.frame_index].append(face)
            kept = [f for f in faces if f.frame_index >= keep_from]
            if kept:
                self._raw[track_id] = kept
            else:
                del self._raw[track_id]
        self._next = last + 1
        return sorted(ready.items())
