"""Local worker processes: each holds one warm `Engine`, and is restarted when it dies.

The server talks to a worker over a pipe: it sends a batch of requests and gets the images back. A reader
thread per worker turns what arrives (progress while warming, results, death) into events on the server's
event loop. A worker that dies (kill -9, out of memory) fails only the batch it was running; it is
started and warmed again while the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgrun.serve.engine import BatchResult, ImageRequest
from dgrun.serve.pool import WorkerDied


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to build its engine (picklable: it crosses into a spawned process)."""

    recipe: dict[str, Any]  # the resolved recipe, already validated by the server
    recipe_file: str  # for relative local model paths
    device: str
    threads: int | None
    trust_remote_code: bool


@dataclass
class WorkerState:
    """What the server knows about a worker: for /health, /v1/recipe and /metrics."""

    index: int
    device: str
    pid: int | None = None
    ready: bool = False
    stage: str = "starting"
    restarts: int = 0
    error: str | None = None
    plan: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)


def worker_main(conn: Any, config: WorkerConfig) -> None:
    """The worker process: build and warm the engine, then make batches until told to stop."""
    # Signals to the server's process group (Ctrl-C, `timeout`, a shell's kill) are the server's to handle:
    # it drains, then stops its workers. A worker whose server is gone sees its pipe close and exits.
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from dgrun.loading import LoadedRecipe, recipe_from_resolved
    from dgrun.plugins import build_registry
    from dgrun.serve.engine import Engine
    from dgrun.yamlio import SourceMap

    try:
        recipe = recipe_from_resolved(config.recipe, "<served recipe>")
        loaded = LoadedRecipe(recipe, SourceMap(), Path(config.recipe_file))
        engine = Engine(loaded, build_registry(), config.device, config.threads, config.trust_remote_code)
        engine.start(lambda message: conn.send(("progress", message)))
        conn.send(("ready", engine.plan_record(), engine.warnings, engine.runtime))
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] == "generate":
            _, number, requests = message
            try:
                conn.send(("done", number, engine.generate(requests)))
            except Exception as exc:
                conn.send(("error", number, f"{type(exc).__name__}: {exc}"))
        elif message[0] == "plan":
            conn.send(("plan", engine.plan_record(), engine.warnings, engine.runtime))


class LocalWorker:
    """A worker process seen from the server's event loop."""

    def __init__(self, index: int, config: WorkerConfig, on_change: Callable[[WorkerState, str], None]):
        self.index = index
        self.config = config
        self.state = WorkerState(index, config.device)
        self.on_change = on_change
        self.process: Any = None
        self.conn: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[int, asyncio.Future[BatchResult]] = {}
        self.numbers = itertools.count(1)
        self.stopping = False

    @property
    def ready(self) -> bool:
        return self.state.ready

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Spawn the process (a fresh interpreter: no state shared with the server) and its reader thread."""
        self.loop = loop
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        if self.config.threads:
            os.environ["OMP_NUM_THREADS"] = str(self.config.threads)  # read once, when the child loads torch
        self.process = context.Process(
            target=worker_main, args=(child, self.config), name=f"dgrun-worker-{self.index}", daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.state.pid, self.state.ready, self.state.stage, self.state.error = (
            self.process.pid,
            False,
            "starting",
            None,
        )
        self.on_change(self.state, "starting")
        threading.Thread(
            target=self._read, args=(parent,), name=f"dgrun-worker-{self.index}-reader", daemon=True
        ).start()

    def _read(self, conn: Any) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._post(self._received, conn, message)
        self._post(self._died, conn)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(callback, *args)

    def _received(self, conn: Any, message: tuple[Any, ...]) -> None:
        if conn is not self.conn:
            return  # a message from a process already replaced
        kind = message[0]
        if kind == "progress":
            self.state.stage = message[1]
            self.on_change(self.state, "progress")
        elif kind in ("ready", "plan"):
            self.state.plan, self.state.warnings, self.state.runtime = message[1], message[2], message[3]
            if kind == "ready":
                self.state.ready, self.state.stage = True, "ready"
                self.on_change(self.state, "ready")
        elif kind == "failed":
            self.state.error, self.state.stage = message[1], "failed"
            self.on_change(self.state, "failed")
        elif kind in ("done", "error"):
            future = self.waiting.pop(message[1], None)
            if future is not None and not future.done():
                if kind == "done":
                    future.set_result(message[2])
                else:
                    future.set_exception(RuntimeError(message[2]))

    def _died(self, conn: Any) -> None:
        if conn is not self.conn:
            return
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(WorkerDied(f"worker {self.index} died while making this request"))
        self.waiting.clear()
        self.state.ready = False
        if self.stopping or self.state.error is not None:
            self.state.stage = "stopped" if self.stopping else "failed"
            self.on_change(self.state, "stopped")
            return
        self.state.restarts += 1
        self.on_change(self.state, "died")
        with contextlib.suppress(Exception):
            self.process.join(timeout=5)
        assert self.loop is not None
        self.start(self.loop)

    async def run(self, requests: list[ImageRequest]) -> BatchResult:
        if not self.state.ready or self.conn is None:
            raise WorkerDied(f"worker {self.index} is not ready")
        assert self.loop is not None
        number = next(self.numbers)
        future: asyncio.Future[BatchResult] = self.loop.create_future()
        self.waiting[number] = future
        try:
            self.conn.send(("generate", number, requests))
        except (OSError, ValueError) as exc:
            self.waiting.pop(number, None)
            raise WorkerDied(f"worker {self.index} is gone ({exc})") from exc
        return await future

    def refresh_plan(self) -> None:
        """Ask for the plan with the effects counted so far (answered asynchronously)."""
        if self.state.ready and self.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(("plan",))

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("stop",))
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
