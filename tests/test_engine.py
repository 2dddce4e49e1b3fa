import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from gpen_video.device import limit_cpu_threads
from gpen_video.engine import Stages, StageTimer
from gpen_video.restore.restorer import Restorer


def alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gpen-video-")]


def test_stages_keep_order_and_run_concurrently():
    def slow(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    start = time.perf_counter()
    with Stages() as stages:
        out = list(stages.map(lambda x: (time.sleep(0.01), x)[1], stages.prefetch(slow(30), 4, name="a"), name="b", depth=4))
    assert out == list(range(30))
    # two stages of 0.3 s each overlap: well under their 0.6 s sum
    assert time.perf_counter() - start < 0.55
    assert alive() == []


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_light_stages_run_torch_on_few_threads_and_network_stages_keep_every_thread():
    def seen():
        x = torch.rand(256, 256)
        yield torch.get_num_threads(), float((x @ x).sum())  # an operation on the stage's own threads

    before = torch.get_num_threads()
    torch.set_num_threads(16)  # the process default every new thread starts from
    try:
        with Stages() as stages:
            (light, _), = stages.map(lambda item: item, stages.prefetch(seen(), 1, name="decode"), name="crop", depth=1)
            (network, _), = stages.prefetch(seen(), 1, name="restore", network=True)
            (parse, _), = stages.map(lambda item: item, seen(), name="paste", depth=1, network=True)
        assert (light, network, parse) == (2, 16, 16)  # light_stage_threads(): one for every eight
        assert torch.get_num_threads() == 16  # the consumer's, and the process default, untouched
        late = []
        thread = threading.Thread(target=lambda: late.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert late == [16]
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch built without OpenMP")
def test_limit_cpu_threads_limits_the_calling_thread_only():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = {}

        def limited():
            seen["limited"] = limit_cpu_threads(1)
            x = torch.rand(512, 512)
            seen["sum"] = float((x @ x).sum())
            seen["in thread"] = torch.get_num_threads()

        for target in (limited, lambda: seen.setdefault("after", torch.get_num_threads())):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        assert seen["limited"] and seen["in thread"] == 1
        assert seen["after"] == 3 and torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="count must be >= 1"):
            limit_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_a_producer_error_reaches_the_consumer_and_stops_the_others():
    def broken():
        yield 1
        raise ValueError("decoder broke")

    def endless():
        while True:
            yield 0

    with pytest.raises(ValueError, match="decoder broke"), Stages() as stages:
        other = stages.prefetch(endless(), 2, name="other")
        next(other)
        it = stages.prefetch(broken(), 2, name="broken")
        assert next(it) == 1
        next(it)
    assert alive() == []


@pytest.mark.parametrize("where", ["consumer error", "consumer leaves", "KeyboardInterrupt"])
def test_leaving_the_block_stops_and_joins_every_stage(where):
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield np.zeros((64, 64, 3), np.uint8)
            i += 1

    error = {"consumer error": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}.get(where)
    try:
        with Stages() as stages:
            chain = stages.map(lambda f: f + 1, stages.prefetch(endless(), 3, name="src"), name="add", depth=3)
            next(chain)
            if error is not None:
                raise error("stop")
    except (RuntimeError, KeyboardInterrupt):
        pass
    assert alive() == []
    count = len(produced)
    time.sleep(0.1)
    assert len(produced) == count <= 12


def test_stage_memory_is_bounded_by_depth():
    def frames(n):
        for _ in range(n):
            yield np.ones((256, 256, 3), np.uint8)

    def peak(n):
        tracemalloc.start()
        with Stages() as stages:
            for frame in stages.prefetch(frames(n), 4, name="src"):
                time.sleep(0.0005)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(50), peak(500)
    assert long < 1.5 * short
    assert long < 12 * 256 * 256 * 3


def test_timer_counts_busy_time():
    timer = StageTimer()
    with Stages(timer) as stages:
        list(stages.map(lambda x: time.sleep(0.02), range(5), name="work", depth=2))
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
    crops = torch.rand(40, 3, 16, 16)
    out = restorer.restore_tensor(crops)
    torch.testing.assert_close(out, crops, atol=1e-6, rtol=0)
    assert restorer.batch_size == 4
    assert restorer.stats.oom_stepdowns == 3
    assert max(model.calls[-10:]) <= 4


def test_other_errors_are_not_swallowed():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Restorer(Broken(), 8, batch_size=4).restore_tensor(torch.zeros(2, 3, 8, 8))


def test_out_of_memory_step_down_on_the_tensor_path():
    model = _Flaky(limit=3)
    restorer = Restorer(model, 8, batch_size=16)
    x = torch.rand(10, 3, 8, 8)
    y = restorer.restore_tensor(x)
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    assert restorer.batch_size == 2 and restorer.stats.oom_stepdowns == 3
    assert restorer.stats.faces == 10
