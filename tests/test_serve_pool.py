"""The server's scheduling, on fake workers: strategies, dynamic batching, the bounded queue, timeouts,
gone clients and dying workers. Fast and deterministic; the real server is tested in test_serve.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dgrun.serve.engine import BatchResult, GeneratedImage, ImageRequest
from dgrun.serve.pool import Pool, QueueFull, WorkerDied


class FakeWorker:
    def __init__(self, index: int, delay: float = 0.0):
        self.index = index
        self.ready = True
        self.delay = delay
        self.batches: list[list[ImageRequest]] = []
        self.die_next = False

    async def run(self, requests: list[ImageRequest]) -> BatchResult:
        self.batches.append(requests)
        await asyncio.sleep(self.delay)
        if self.die_next:
            self.die_next = False
            raise WorkerDied(f"worker {self.index} died")
        images = [[GeneratedImage(b"png", r.seed, 8, 8) for _ in range(r.n)] for r in requests]
        return BatchResult(images, self.delay, len(requests))


def _run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


def _request(seed: int = 0, **kwargs: Any) -> ImageRequest:
    return ImageRequest("a red circle", seed, **kwargs)


async def _with_pool(workers: list[FakeWorker], body: Any, **options: Any) -> Any:
    pool = Pool(workers, **options)
    pool.start()
    try:
        return await body(pool)
    finally:
        await pool.stop()


@pytest.mark.parametrize("strategy", ["least_busy", "round_robin", "random"])
def test_every_strategy_spreads_concurrent_requests_over_the_workers(strategy):
    workers = [FakeWorker(0, 0.05), FakeWorker(1, 0.05)]

    async def body(pool: Pool) -> list[Any]:
        return await asyncio.gather(*(pool.submit(_request(seed)) for seed in range(12)))

    results = _run(_with_pool(workers, body, strategy=strategy))
    assert [images[0].seed for images, _ in results] == list(range(12))  # each keeps its own seed
    served = [len(w.batches) for w in workers]
    assert sum(served) == 12 and all(count > 0 for count in served), served
    if strategy != "random":
        assert served == [6, 6]


def test_least_busy_prefers_the_idle_worker():
    busy, idle = FakeWorker(0, 0.3), FakeWorker(1, 0.01)

    async def body(pool: Pool) -> Any:
        first = asyncio.create_task(pool.submit(_request(0, n=4)))
        await asyncio.sleep(0.05)  # worker 0 is running 4 images
        _, meta = await pool.submit(_request(1))
        await first
        return meta

    assert _run(_with_pool([busy, idle], body, strategy="least_busy"))["worker"] == 1


def test_requests_within_the_window_share_one_call_each_with_its_own_seed():
    worker = FakeWorker(0, 0.01)

    async def body(pool: Pool) -> list[Any]:
        return await asyncio.gather(*(pool.submit(_request(seed)) for seed in range(6)))

    results = _run(_with_pool([worker], body, max_batch=4, batch_window=0.2))
    assert [len(batch) for batch in worker.batches] == [4, 2]
    assert [r.seed for batch in worker.batches for r in batch] == list(range(6))
    metas = [meta for _, meta in results]
    assert metas[0]["batch"] == metas[3]["batch"] != metas[4]["batch"] and metas[0]["batch_size"] == 4


def test_only_requests_of_the_same_size_and_count_are_batched():
    worker = FakeWorker(0, 0.01)

    async def body(pool: Pool) -> None:
        await asyncio.gather(
            pool.submit(_request(0)), pool.submit(_request(1, width=32, height=32)), pool.submit(_request(2))
        )

    _run(_with_pool([worker], body, max_batch=8, batch_window=0.2))
    assert sorted(len(batch) for batch in worker.batches) == [1, 2]


def test_a_full_queue_refuses_and_a_timed_out_request_frees_its_place():
    worker = FakeWorker(0, 0.5)

    async def body(pool: Pool) -> None:
        running = asyncio.create_task(pool.submit(_request(0)))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(pool.submit(_request(1), timeout=0.1))
        await asyncio.sleep(0.02)
        with pytest.raises(QueueFull):
            await pool.submit(_request(2))
        with pytest.raises(TimeoutError):
            await queued
        assert pool.queued == 0  # the timed-out request left the queue
        assert (await pool.submit(_request(3)))[0][0].seed == 3
        await running

    _run(_with_pool([worker], body, max_queue=1))


def test_a_client_that_goes_away_while_queued_frees_its_place():
    worker = FakeWorker(0, 0.6)
    gone = asyncio.Event()

    async def disconnected() -> bool:
        return gone.is_set()

    async def body(pool: Pool) -> None:
        running = asyncio.create_task(pool.submit(_request(0)))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(pool.submit(_request(1), disconnected=disconnected))
        await asyncio.sleep(0.05)
        assert pool.queued == 1
        gone.set()
        with pytest.raises(ConnectionAbortedError):
            await waiting
        assert pool.queued == 0
        await running
        assert [r.seed for batch in worker.batches for r in batch] == [0]  # never ran

    _run(_with_pool([worker], body, max_queue=4))


def test_a_dying_worker_fails_only_what_it_was_running():
    dying, healthy = FakeWorker(0, 0.1), FakeWorker(1, 0.01)
    dying.die_next = True

    async def body(pool: Pool) -> list[Any]:
        return await asyncio.gather(
            *(pool.submit(_request(seed)) for seed in range(4)), return_exceptions=True
        )

    results = _run(_with_pool([dying, healthy], body, strategy="round_robin"))
    failed = [r for r in results if isinstance(r, WorkerDied)]
    assert len(failed) == 1 and all(isinstance(r, tuple) for r in results if r not in failed)


def test_draining_refuses_new_work_and_waits_for_the_rest():
    worker = FakeWorker(0, 0.2)

    async def body(pool: Pool) -> None:
        running = asyncio.create_task(pool.submit(_request(0)))
        await asyncio.sleep(0.02)
        drained = asyncio.create_task(pool.drain(timeout=5))
        await asyncio.sleep(0.01)
        from dgrun.serve.pool import Draining

        with pytest.raises(Draining):
            await pool.submit(_request(1))
        await drained
        assert running.done() and (await running)[0][0].seed == 0

    _run(_with_pool([worker], body))
