"""`dgrun serve` on one machine: warm local workers behind the FastAPI app, run by uvicorn.

Workers are processes (one per GPU, or CPU workers splitting the cores), started and warmed while the
server already answers `/health` with 503; the URL is printed once every worker is warm. SIGTERM (or
Ctrl-C) drains: new work gets 503, queued and running requests finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dgrun.loading import LoadedRecipe
from dgrun.plugins import Registry
from dgrun.serve.api import Settings, create_app
from dgrun.serve.metrics import Metrics
from dgrun.serve.pool import Pool
from dgrun.serve.worker import LocalWorker, WorkerConfig, WorkerState

DRAIN_TIMEOUT_S = 600.0


@dataclass
class ServeOptions:
    """`dgrun serve`'s command-line choices."""

    workers: int | None = None  # None: auto (one per CUDA device, else one on CPU)
    strategy: str = "least_busy"
    host: str = "127.0.0.1"
    port: int = 8000
    queue: int = 64
    timeout: float | None = 300.0
    max_batch: int = 1
    batch_window_ms: float = 0.0
    api_key: str | None = None
    threads: int | None = None  # per CPU worker; default: the cores split between the workers
    trust_remote_code: bool = False


def plan_workers(recipe_device: str, count: int | None, threads: int | None) -> list[tuple[str, int | None]]:
    """(device, CPU threads) per worker: `auto` is one per CUDA device, else one on the CPU."""
    devices: list[str]
    cuda = recipe_device in ("auto", "cuda") and os.path.exists("/dev/nvidiactl")
    gpus = 0
    if cuda:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        devices = [f"cuda:{i % gpus}" for i in range(count or gpus)]
    else:
        device = "cpu" if recipe_device in ("auto", "cuda") else recipe_device
        devices = [device] * (count or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_worker = threads or max(1, cores // len(devices))
    return [(device, per_worker if device == "cpu" else threads) for device in devices]


class LocalService:
    """The recipe served by local worker processes (the `Service` the app needs)."""

    def __init__(
        self, loaded: LoadedRecipe, registry: Registry, options: ServeOptions, report: Callable[[str], None]
    ):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.name = self.recipe.name
        self.default_seed = self.recipe.generate.seed
        self.options = options
        self.report = report
        self.metrics = Metrics()
        resolved = self.recipe.resolved()
        self.workers = [
            LocalWorker(
                index,
                WorkerConfig(resolved, str(loaded.path), device, threads, options.trust_remote_code),
                self._changed,
            )
            for index, (device, threads) in enumerate(
                plan_workers(self.recipe.model.device, options.workers, options.threads)
            )
        ]
        self.pool = Pool(
            self.workers,
            options.strategy,
            options.queue,
            options.max_batch,
            options.batch_window_ms / 1000,
            self.metrics.observe,
        )
        self.all_ready = asyncio.Event()
        self.failed: str | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            worker.start(loop)
        self.pool.start()

    def _changed(self, state: WorkerState, event: str) -> None:
        label = f"worker {state.index} ({state.device})"
        if event == "progress":
            self.report(f"{label}: {state.stage}")
        elif event == "ready":
            self.report(f"{label}: warm")
            self.pool.worker_ready(state.index)
        elif event == "died":
            self.metrics.restarts.inc()
            self.report(f"{label}: died; restarting (restart {state.restarts})")
        elif event == "failed":
            self.failed = f"{label} could not start: {state.error}"
            self.all_ready.set()
        self.metrics.ready.set(sum(1 for w in self.workers if w.ready))
        if self.pool.ready:
            self.all_ready.set()

    def health(self) -> dict[str, Any]:
        if self.pool.draining:
            status = "draining"
        elif self.pool.ready:
            status = "ready"
        elif self.failed:
            status = "failed"
        else:
            status = "warming"
        return {"status": status, "workers": [self._worker(w.state) for w in self.workers]}

    @staticmethod
    def _worker(state: WorkerState) -> dict[str, Any]:
        return {
            "index": state.index,
            "device": state.device,
            "pid": state.pid,
            "ready": state.ready,
            "stage": state.stage,
            "restarts": state.restarts,
            "error": state.error,
        }

    def recipe_record(self) -> dict[str, Any]:
        """The resolved recipe and the plan as the workers applied it, with the effects counted so far."""
        for worker in self.workers:
            worker.refresh_plan()
        warm = [w.state for w in self.workers if w.state.runtime]
        return {
            "name": self.name,
            "recipe": self.recipe.resolved(),
            "recipe_sha256": self.recipe.sha256(),
            "plan": warm[0].plan if warm else [],
            "warnings": sorted({w for state in warm for w in state.warnings}),
            "runtime": warm[0].runtime if warm else None,
            "workers": [{**self._worker(w.state), "plan": w.state.plan} for w in self.workers],
        }

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def run_server(
    loaded: LoadedRecipe, registry: Registry, options: ServeOptions, report: Callable[[str], None]
) -> int:
    """Serve until SIGTERM/Ctrl-C (drained: exit 0) or until the workers cannot start (exit 1)."""
    import uvicorn

    service = LocalService(loaded, registry, options, report)
    app = create_app(service, Settings(options.api_key, options.timeout))
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    server = DrainingServer(config, service.pool)

    async def main() -> int:
        await service.start()
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():  # could not bind the port
            await serving
            return 2
        report(f"listening on {server.url}; warming {len(service.workers)} worker(s)")
        waiting = asyncio.create_task(service.all_ready.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if service.failed:
            report(f"error: {service.failed}")
            server.should_exit = True
            await serving
            return 1
        if not serving.done():
            report(f"ready: {server.url} serves {service.name!r} (OpenAI-compatible: {server.url}/v1)")
        await serving
        return 0

    try:
        return asyncio.run(main())
    finally:
        service.stop()


class DrainingServer:
    """uvicorn's server, with SIGTERM/SIGINT draining the pool before it stops."""

    def __init__(self, config: Any, pool: Pool):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                outer.stop_requested(sig)

        self.server = _Server(config)
        self.pool = pool
        self.draining: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    @property
    def should_exit(self) -> bool:
        return bool(self.server.should_exit)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.server.should_exit = value

    @property
    def url(self) -> str:
        sockets = [s for server in getattr(self.server, "servers", []) for s in server.sockets]
        host, port = (
            sockets[0].getsockname()[:2] if sockets else (self.server.config.host, self.server.config.port)
        )
        return f"http://{host}:{port}"

    async def serve(self) -> None:
        await self.server.serve()

    def stop_requested(self, sig: int) -> None:
        """First signal: stop taking work, finish what is queued and running, then stop. Second: now."""
        if self.draining is not None:
            self.server.force_exit = True
            self.server.should_exit = True
            return

        async def drain() -> None:
            await self.pool.drain(DRAIN_TIMEOUT_S)
            self.server.should_exit = True

        def begin() -> None:
            self.draining = asyncio.get_running_loop().create_task(drain())

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.server.should_exit = True
            return
        self.pool.draining = True  # at once: new requests get 503 from now on
        loop.call_soon_threadsafe(begin)
