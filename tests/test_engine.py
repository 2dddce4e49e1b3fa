import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from gpen_video.engine import StageTimer, prefetch, timed_map
from gpen_video.restore.restorer import Restorer


def test_prefetch_keeps_order_and_runs_concurrently():
    def slow(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    start = time.perf_counter()
    stage2 = prefetch(timed_map(lambda x: (time.sleep(0.01), x)[1], prefetch(slow(30), 4), name="b", timer=None), 4)
    assert list(stage2) == list(range(30))
    # two stages of 0.3 s each overlap: well under their 0.6 s sum
    assert time.perf_counter() - start < 0.55


def test_prefetch_raises_producer_error_in_consumer():
    def broken():
        yield 1
        raise ValueError("decoder broke")

    it = prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="decoder broke"):
        next(it)


def test_prefetch_stops_producer_when_consumer_leaves():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 3)
    assert next(it) == 0
    it.close()
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count <= 6
    assert not [t for t in threading.enumerate() if t.name == "gpen-video-stage"]


def test_prefetch_memory_is_bounded_by_depth():
    def frames(n):
        for _ in range(n):
            yield np.ones((256, 256, 3), np.uint8)

    def peak(n):
        tracemalloc.start()
        for frame in prefetch(frames(n), 4):
            time.sleep(0.0005)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(50), peak(500)
    assert long < 1.5 * short
    assert long < 12 * 256 * 256 * 3


def test_timer_counts_busy_time():
    timer = StageTimer()
    list(timed_map(lambda x: time.sleep(0.02), range(5), name="work", timer=timer))
    assert 0.09 < timer.busy["work"] < 0.5


class _Flaky(torch.nn.Module):
    """Identity that runs out of memory above ``limit`` faces per call."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x


def test_out_of_memory_steps_batch_down_and_finishes():
    model = _Flaky(limit=5)
    restorer = Restorer(model, 16, batch_size=32)
    crops = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    out = restorer.restore(crops)
    np.testing.assert_array_equal(out, crops)
    assert restorer.batch_size == 4
    assert restorer.stats.oom_stepdowns == 3
    assert max(model.calls[-10:]) <= 4


def test_other_errors_are_not_swallowed():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Restorer(Broken(), 8, batch_size=4).restore(np.zeros((2, 8, 8, 3), np.uint8))


def test_out_of_memory_step_down_on_the_tensor_path():
    model = _Flaky(limit=3)
    restorer = Restorer(model, 8, batch_size=16)
    x = torch.rand(10, 3, 8, 8)
    y = restorer.restore_tensor(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert restorer.batch_size == 2 and restorer.stats.oom_stepdowns == 3
    assert restorer.stats.faces == 10
