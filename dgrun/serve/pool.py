"""Scheduling requests onto warm workers: strategies, dynamic batching, a bounded queue, timeouts.

Each request is given to a worker when it arrives (seed 003's strategies: `least_busy` counts queued plus
running images, `round_robin`, `random`) and waits in that worker's queue. A worker takes the oldest
request and, for up to `batch_window` seconds, gathers more with the same size and image count, up to
`max_batch`, into one pipeline call; each keeps its own seed. The queue is bounded over all workers; a
request that waits past its timeout, or whose client has gone, leaves the queue and frees its place. A
worker that dies fails only the requests it was running; its queue moves to the workers still serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dgrun.serve.engine import BatchResult, GeneratedImage, ImageRequest

STRATEGIES = ("least_busy", "round_robin", "random")


class QueueFull(Exception):
    """The bounded queue is full: the client should retry later (HTTP 429)."""


class WorkerDied(Exception):
    """The worker running a request died (HTTP 503); it is being restarted."""


class Draining(Exception):
    """The server is shutting down and takes no new work (HTTP 503)."""


class Worker(Protocol):
    """A warm pipeline the pool can hand a batch to (a local process, or the pipeline in a Ray replica)."""

    index: int
    ready: bool

    async def run(self, requests: list[ImageRequest]) -> BatchResult: ...


@dataclass
class Pending:
    request: ImageRequest
    future: asyncio.Future[tuple[list[GeneratedImage], dict[str, Any]]]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class Lane:
    """One worker's queue and what it is running now."""

    worker: Worker
    queue: list[Pending] = field(default_factory=list)
    running: int = 0  # images in the batch being made
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def load(self) -> int:
        return self.running + sum(p.request.n for p in self.queue)


class Pool:
    """The queue and batcher in front of the workers; `submit` returns a request's images and metadata."""

    def __init__(
        self,
        workers: list[Worker],
        strategy: str = "least_busy",
        max_queue: int = 64,
        max_batch: int = 1,
        batch_window: float = 0.0,
        observe: Callable[[str, Any], None] | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        self.lanes = [Lane(worker) for worker in workers]
        self.strategy = strategy
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.batch_window = max(0.0, batch_window)
        self.observe = observe or (lambda event, value: None)
        self.draining = False
        self.batch_numbers = itertools.count(1)
        self.turn = itertools.count()
        self.tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        return sum(len(lane.queue) for lane in self.lanes)

    @property
    def in_flight(self) -> int:
        return self.queued + sum(1 for lane in self.lanes if lane.running)

    @property
    def ready(self) -> bool:
        """Every worker warm (what /health reports)."""
        return bool(self.lanes) and all(lane.worker.ready for lane in self.lanes)

    @property
    def serving(self) -> bool:
        """Some worker warm: requests are taken (while a dead worker restarts, the others serve)."""
        return any(lane.worker.ready for lane in self.lanes)

    def busy_workers(self) -> int:
        return sum(1 for lane in self.lanes if lane.running)

    # -------------------------------------------------------------------------------------------- run
    def start(self) -> None:
        """Start one batching loop per worker (inside the running event loop)."""
        self.tasks = [asyncio.create_task(self._serve(lane)) for lane in self.lanes]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def submit(
        self,
        request: ImageRequest,
        timeout: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[list[GeneratedImage], dict[str, Any]]:
        """Queue a request and wait for its images; QueueFull, TimeoutError, WorkerDied or Draining."""
        if self.draining:
            raise Draining()
        if self.queued >= self.max_queue:
            raise QueueFull()
        pending = Pending(request, asyncio.get_running_loop().create_future())
        lane = self._choose()
        lane.queue.append(pending)
        lane.wakeup.set()
        self.observe("queue", self.queued)
        try:
            return await self._wait(pending, timeout, disconnected)
        finally:
            self._forget(pending)

    async def _wait(
        self, pending: Pending, timeout: float | None, disconnected: Callable[[], Awaitable[bool]] | None
    ) -> tuple[list[GeneratedImage], dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            step = 0.25 if disconnected is not None else remaining
            if remaining is not None and step is not None:
                step = min(step, remaining)
            try:
                return await asyncio.wait_for(asyncio.shield(pending.future), timeout=step)
            except asyncio.TimeoutError:
                if disconnected is not None and self._is_queued(pending) and await disconnected():
                    raise ConnectionAbortedError() from None

    def _is_queued(self, pending: Pending) -> bool:
        return any(pending in lane.queue for lane in self.lanes)

    def _forget(self, pending: Pending) -> None:
        """A request that ended while queued (timeout, gone client) leaves the queue."""
        for lane in self.lanes:
            if pending in lane.queue:
                lane.queue.remove(pending)
        self.observe("queue", self.queued)

    def _choose(self) -> Lane:
        candidates = [lane for lane in self.lanes if lane.worker.ready] or self.lanes
        if self.strategy == "round_robin":
            return candidates[next(self.turn) % len(candidates)]
        if self.strategy == "random":
            return random.choice(candidates)
        return min(candidates, key=lambda lane: (lane.load, lane.worker.index))

    async def _serve(self, lane: Lane) -> None:
        """One worker's loop: take a batch from its queue, run it, hand the results back."""
        while True:
            while not lane.queue or not lane.worker.ready:
                lane.wakeup.clear()
                await lane.wakeup.wait()
            batch = await self._gather(lane)
            if not batch:
                continue
            number = next(self.batch_numbers)
            lane.running = sum(p.request.n for p in batch)
            self.observe("busy", self.busy_workers())
            self.observe("batch", len(batch))
            try:
                result = await lane.worker.run([p.request for p in batch])
            except WorkerDied as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(WorkerDied(str(exc)))
                self._move_queue(lane)
            except (
                Exception
            ) as exc:  # the pipeline failed on this batch: its requests fail, the worker serves on
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                meta = {
                    "batch": number,
                    "batch_size": len(batch),
                    "worker": lane.worker.index,
                    "seconds": result.seconds,
                }
                for pending, images in zip(batch, result.images, strict=True):
                    if not pending.future.done():
                        pending.future.set_result((images, meta))
                self.observe("images", sum(len(images) for images in result.images))
            finally:
                lane.running = 0
                self.observe("busy", self.busy_workers())

    async def _gather(self, lane: Lane) -> list[Pending]:
        """The oldest request, and those that arrive within the window with the same batch key."""
        first = lane.queue.pop(0)
        batch = [first]
        deadline = time.monotonic() + self.batch_window
        while len(batch) < self.max_batch:
            fitting = [p for p in lane.queue if p.request.batch_key == first.request.batch_key]
            for pending in fitting[: self.max_batch - len(batch)]:
                lane.queue.remove(pending)
                batch.append(pending)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch or remaining <= 0:
                break
            lane.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lane.wakeup.wait(), timeout=remaining)
        self.observe("queue", self.queued)
        return [p for p in batch if not p.future.done()]

    def _move_queue(self, lane: Lane) -> None:
        """A dead worker's queued requests go to workers that still serve (they wait if none does)."""
        others = [other for other in self.lanes if other is not lane and other.worker.ready]
        if not others:
            return
        for pending in list(lane.queue):
            lane.queue.remove(pending)
            target = min(others, key=lambda other: other.load)
            target.queue.append(pending)
            target.wakeup.set()

    def worker_ready(self, index: int) -> None:
        """A worker (re)started and is warm: wake its loop."""
        for lane in self.lanes:
            if lane.worker.index == index:
                lane.wakeup.set()

    async def drain(self, timeout: float | None = None) -> None:
        """Take no new work; wait until every queued and running request is done."""
        self.draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.in_flight and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
