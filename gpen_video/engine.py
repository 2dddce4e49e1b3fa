"""Run pipeline stages concurrently with bounded queues between them.

Each stage is a generator; ``Stages.prefetch`` runs one in a background thread and hands its
items over through a queue of fixed depth, so memory stays flat however long the video is and
the slowest stage sets the pace. PyAV, OpenCV, onnxruntime and torch release the GIL, so
threads are enough. An exception in a stage surfaces in its consumer. Leaving a ``Stages``
block by any path (the end, an error, ``Cancelled``, Ctrl-C) stops every stage of the job and
joins its thread, so no thread outlives the job or keeps its frames and tensors alive.

For example, inside ``with Stages() as stages:``, iterating
``stages.map(work, stages.prefetch(source, 8, name="decode"), name="work", depth=8)`` runs the
source and ``work`` in two threads, eight items ahead of the consumer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from gpen_video.device import light_stage_threads, limit_cpu_threads

T = TypeVar("T")
U = TypeVar("U")

_END = object()
POLL_SECONDS = 0.05
"""How often a waiting stage checks whether the job was stopped."""
JOIN_SECONDS = 60.0
"""Longest wait for a stage to finish its current item (one GPEN batch) when a job stops."""


@dataclass
class StageTimer:
    """Busy seconds per stage (time spent producing items, not waiting on queues)."""

    busy: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.busy[name] = self.busy.get(name, 0.0) + seconds


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


class Stages:
    """The stage threads of one job.

    Args:
        timer: where busy seconds per stage are added (None: not measured).
    """

    def __init__(self, timer: StageTimer | None = None) -> None:
        self.timer = timer
        self.stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every stage and wait for its thread (each finishes at most its current item)."""
        self.stopped.set()
        for thread in self._threads:
            thread.join(timeout=JOIN_SECONDS)
        self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def running(self) -> list[str]:
        """Names of the stage threads still alive."""
        return [t.name for t in self._threads if t.is_alive()]

    def time(self, name: str, seconds: float) -> None:
        if self.timer is not None:
            self.timer.add(name, seconds)

    def prefetch(self, items: Iterable[T], depth: int, *, name: str, timed: bool = False,
                 network: bool = False) -> Iterator[T]:
        """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

        Raising ``depth`` hides more jitter between stages at the cost of memory (each item may
        hold a frame). ``timed`` adds the time spent in ``next(items)`` to the timer: use it
        only for a source stage (one that does not itself wait on another queue), and
        ``map`` elsewhere. ``network``: the stage runs a torch network (the restorer, the
        upscaler, the face parser, a torch detector) and keeps torch's CPU thread count; any
        other stage's torch CPU operations use ``device.light_stage_threads()`` threads (one for
        every eight, at least one): small operations gain little from more and take CPU time
        from the network's.
        """
        q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        stopped = self.stopped

        def put(item: object) -> bool:
            while not stopped.is_set():
                try:
                    q.put(item, timeout=POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            if not network:
                limit_cpu_threads(light_stage_threads())
            iterator = iter(items)
            try:
                while not stopped.is_set():
                    start = time.perf_counter()
                    try:
                        item = next(iterator)
                    except StopIteration:
                        break
                    if timed:
                        self.time(name, time.perf_counter() - start)
                    if not put(item):
                        break
                put(_END)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(_Failure(exc))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()

        thread = threading.Thread(target=run, name=f"gpen-video-{name}", daemon=True)
        self._threads.append(thread)

        def consume() -> Iterator[T]:
            thread.start()
            while True:
                try:
                    item = q.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if stopped.is_set():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item  # type: ignore[misc]

        return consume()

    def map(self, fn: Callable[[T], U], items: Iterable[T], *, name: str, depth: int,
            network: bool = False) -> Iterator[U]:
        """``fn`` over ``items`` in its own thread, timed under ``name``, ``depth`` results ahead
        (``network`` as for ``prefetch``)."""
        return self.prefetch(self.timed_map(fn, items, name=name), depth, name=name, network=network)

    def timed_map(self, fn: Callable[[T], U], items: Iterable[T], *, name: str) -> Iterator[U]:
        """``map`` in the caller's thread that adds the time spent in ``fn`` to the timer."""
        for item in items:
            start = time.perf_counter()
            result = fn(item)
            self.time(name, time.perf_counter() - start)
            yield result
