"""Run pipeline stages concurrently with bounded queues between them.

Each stage is a generator; ``prefetch`` runs one in a background thread and hands its items
over through a queue of fixed depth, so memory stays flat however long the video is and
the slowest stage sets the pace. PyAV, OpenCV, onnxruntime and torch release the GIL, so
threads are enough. Exceptions in a stage surface in the consumer; a consumer that stops
early stops the producer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()


@dataclass
class StageTimer:
    """Busy seconds per stage (time spent producing items, not waiting on queues)."""

    busy: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.busy[name] = self.busy.get(name, 0.0) + seconds


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(
    items: Iterable[T], depth: int, *, name: str = "stage", timer: StageTimer | None = None
) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    Raising ``depth`` hides more jitter between stages at the cost of memory (each item may
    hold a frame). ``timer`` counts the time spent in ``next(items)``, so give it only to a
    source stage (one that does not itself wait on another queue); use ``timed_map`` elsewhere.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        iterator = iter(items)
        try:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                if timer is not None:
                    timer.add(name, time.perf_counter() - start)
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
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=10)


def timed_map(fn: Callable[[T], U], items: Iterable[T], *, name: str, timer: StageTimer | None) -> Iterator[U]:
    """``map`` that adds the time spent in ``fn`` to ``timer[name]``."""
    for item in items:
        start = time.perf_counter()
        result = fn(item)
        if timer is not None:
            timer.add(name, time.perf_counter() - start)
        yield result
