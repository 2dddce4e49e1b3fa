"""Paste weights of a stream's faces: each track's pose fade and fades where it starts or stops.

``faces.pose.fade_weights`` weighs one whole track; ``TrackFader`` gives the same weights while
planned frames stream past, holding ``reach`` frames: a frame's weight depends on its track's
frames within ``fade_reach`` of it only, so frame t is final once frame t + ``reach`` is seen.
A track fades in where it starts and out where it ends inside a shot; at a scene cut, and at the
ends of the stream, its weight holds (the cut is the change).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from gpen_video.records import TrackedFace

Item = TypeVar("Item")

Fade = Callable[..., np.ndarray]
"""``fade(landmarks (N,5,2), wanted (N,), *, fade_start, fade_end) -> (N,) weights`` of one track
(``restore.temporal.TemporalSettings.fade``)."""


@dataclass(frozen=True)
class _Seen(Generic[Item]):
    """One frame as the fader holds it."""

    item: Item
    index: int
    landmarks: dict[int, np.ndarray]  # every tracked face's, by track id
    wanted: frozenset[int]
    shot_start: bool


class TrackFader(Generic[Item]):
    """Weights of the wanted faces of each frame, in order, ``reach`` frames after it is pushed.

    Args:
        fade: one track's weights (see ``Fade``).
        reach: frames either side a weight depends on: at least ``pose.fade_reach(fade_frames)``
            and ``min_track_frames − 1`` (so a window holds the whole track or enough of it).

    Example:
        >>> from gpen_video.faces.align import template
        >>> from gpen_video.faces.pose import fade_weights
        >>> face = lambda i: [TrackedFace(1, i, np.zeros(4, np.float32), None, template(512), 0.9)]
        >>> fader = TrackFader(lambda lm, w, **k: fade_weights(lm, w, fade_frames=3, **k), reach=2)
        >>> seen = [face(i) if 2 <= i < 9 else [] for i in range(10)]  # a face enters and leaves
        >>> out = [r for i in range(10) for r in fader.push(i, i, seen[i], {1}, i == 0)] + fader.finish()
        >>> [round(w[1], 2) for _, w in out if w]
        [0.33, 0.67, 1.0, 1.0, 1.0, 0.67, 0.33]
    """

    def __init__(self, fade: Fade, reach: int) -> None:
        if reach < 0:
            raise ValueError(f"reach must be >= 0, got {reach}")
        self.fade, self.reach = fade, reach
        self._window: deque[_Seen[Item]] = deque()  # released frames within reach, then held ones
        self._held = 0

    def push(self, item: Item, index: int, tracked: Sequence[TrackedFace], wanted: Collection[int],
             shot_start: bool) -> list[tuple[Item, dict[int, float]]]:
        """Add frame ``index`` (consecutive): its tracked faces, the track ids the planner
        restores in it, and whether it starts a shot. Returns each frame now final, with
        ``{track id: weight}`` of its wanted faces."""
        landmarks = {f.track_id: f.landmarks for f in tracked}
        self._window.append(_Seen(item, index, landmarks, frozenset(wanted) & landmarks.keys(), shot_start))
        self._held += 1
        released = []
        while self._held > self.reach:
            released.append(self._release(len(self._window) - self._held))
        return released

    def finish(self) -> list[tuple[Item, dict[int, float]]]:
        """Release every frame still held (the end of the stream); ready for another stream."""
        released = [self._release(len(self._window) - self._held) for _ in range(self._held)]
        self._window.clear()
        return released

    def _release(self, at: int) -> tuple[Item, dict[int, float]]:
        """Frame ``window[at]`` with its weights. The window ends ``reach`` frames after it, or
        at the stream's end, which holds like a cut: past it nothing is padded with zeros."""
        window, seen = self._window, self._window[at]
        weights = {}
        for track_id in sorted(seen.wanted):
            lo = hi = at
            while lo > 0 and track_id in window[lo - 1].landmarks:
                lo -= 1
            while hi + 1 < len(window) and track_id in window[hi + 1].landmarks:
                hi += 1
            # the track starts inside the window (a frame before it lacks it) and not at a cut;
            # it ends inside it, not before a cut nor at the stream's end
            fade_start = lo > 0 and not window[lo].shot_start
            fade_end = hi + 1 < len(window) and not window[hi + 1].shot_start
            run = [window[i] for i in range(lo, hi + 1)]
            lm = np.stack([s.landmarks[track_id] for s in run])
            wanted = np.array([track_id in s.wanted for s in run])
            weights[track_id] = float(self.fade(lm, wanted, fade_start=fade_start, fade_end=fade_end)[at - lo])
        self._held -= 1
        while len(window) - self._held > self.reach:  # keep ``reach`` released frames as context
            window.popleft()
        return seen.item, weights


__all__ = ["Fade", "TrackFader"]
