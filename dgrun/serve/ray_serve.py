"""`dgrun serve --ray`: the same FastAPI app on Ray Serve, one warm engine per replica.

Ray Serve runs replicas on GPUs across a cluster's nodes, routes requests to them, restarts dead ones and
scales their number. Each replica is an ordinary dgrun worker: it loads, applies and warms the recipe once
(`Engine`) and answers with the routes of `dgrun.serve.api`, with a pool of one in-process worker for
dynamic batching within the replica. `/v1/recipe` says which replica and node answered.

Nothing here runs at import for `dgrun check` or `--help`: Ray is imported only by `dgrun serve --ray`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgrun.serve.api import Settings, create_app
from dgrun.serve.engine import BatchResult, Engine, ImageRequest
from dgrun.serve.metrics import Metrics
from dgrun.serve.pool import Pool

RAY_EXTRA = "pip install 'dgrun[ray]' (Ray Serve)"
APP_NAME = "dgrun"


@dataclass(frozen=True)
class RayOptions:
    """`dgrun serve --ray`'s choices."""

    address: str | None = None  # None: start a local Ray on 127.0.0.1; "auto" or "ray://HOST:PORT": join one
    replicas: int = 1
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int = 8
    autoscale: tuple[int, int] | None = None
    strategy: str = "least_busy"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    timeout: float | None = 300.0
    queue: int = 64
    max_batch: int = 1
    batch_window_ms: float = 0.0
    threads: int | None = None
    trust_remote_code: bool = False


class InProcessWorker:
    """The replica's own engine as the pool's one worker (generation runs in a thread, off the event loop)."""

    index = 0

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = True
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dgrun-engine")

    async def run(self, requests: list[ImageRequest]) -> BatchResult:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.generate, requests)


class ReplicaService:
    """The `Service` of one Ray replica: its engine, its pool, and where it runs."""

    def __init__(self, recipe: dict[str, Any], recipe_file: str, options: RayOptions):
        from dgrun.loading import LoadedRecipe, recipe_from_resolved
        from dgrun.plugins import build_registry
        from dgrun.yamlio import SourceMap

        loaded = LoadedRecipe(recipe_from_resolved(recipe, "<served recipe>"), SourceMap(), Path(recipe_file))
        self.recipe = loaded.recipe
        self.name = self.recipe.name
        self.default_seed = self.recipe.generate.seed
        self.metrics = Metrics()
        device = "cuda" if options.gpus_per_replica > 0 else "cpu"
        self.engine = Engine(loaded, build_registry(), device, options.threads, options.trust_remote_code)
        self.engine.start()
        self.worker = InProcessWorker(self.engine)
        self._pool = Pool(
            [self.worker],
            "least_busy",
            options.queue,
            options.max_batch,
            options.batch_window_ms / 1000,
            self.metrics.observe,
        )
        self._started = False
        self.metrics.ready.set(1)

    @property
    def pool(self) -> Pool:
        if not self._started:  # the pool's loop needs Ray's running event loop: start it at the first request
            self._pool.start()
            self._started = True
        return self._pool

    def where(self) -> dict[str, Any]:
        """This replica's id, node and pid."""
        import ray
        from ray import serve

        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = None
        return {"replica": replica, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def health(self) -> dict[str, Any]:
        status = "draining" if self._pool.draining else "ready"
        return {
            "status": status,
            "workers": [{"index": 0, "ready": True, "device": self.engine.device, **self.where()}],
        }

    def recipe_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": self.recipe.resolved(),
            "recipe_sha256": self.recipe.sha256(),
            "plan": self.engine.plan_record(),
            "warnings": self.engine.warnings,
            "runtime": self.engine.runtime,
            "served_by": self.where(),
        }


_SERVICE: ReplicaService | None = None


class _ReplicaProxy:
    """Stands for the replica's service in the app's routes; the app is built before any replica exists."""

    def __getattr__(self, name: str) -> Any:
        if _SERVICE is None:
            raise RuntimeError("this replica has not started its engine")
        return getattr(_SERVICE, name)


def _install(service: ReplicaService) -> None:
    global _SERVICE
    _SERVICE = service


def _check_health() -> None:
    """Ray's health check of a replica (a module function: the deployment class is pickled by value, with
    copies of the globals its own methods name)."""
    if _SERVICE is None or _SERVICE.engine.pipe is None:
        raise RuntimeError("the engine is not loaded")


def build_application(recipe: dict[str, Any], recipe_file: str, options: RayOptions) -> Any:
    """The Ray Serve application: the dgrun app as ingress of a deployment of warm replicas."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from dgrun.serve.ray_routing import ROUTERS

    app = create_app(_ReplicaProxy(), Settings(options.api_key, options.timeout))

    @serve.ingress(app)
    class DgrunReplica:
        def __init__(self, recipe: dict[str, Any], recipe_file: str, options: RayOptions):
            _install(ReplicaService(recipe, recipe_file, options))

        def check_health(self) -> None:
            _check_health()

    deployment_options: dict[str, Any] = {
        "name": "DgrunReplica",
        "max_ongoing_requests": options.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": options.threads or 1, "num_gpus": options.gpus_per_replica},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 600,
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        deployment_options["autoscaling_config"] = AutoscalingConfig(min_replicas=low, max_replicas=high)
    else:
        deployment_options["num_replicas"] = options.replicas
    if options.strategy in ROUTERS:
        deployment_options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTERS[options.strategy]
        )
    deployment = serve.deployment(**deployment_options)(DgrunReplica)
    return deployment.bind(recipe, recipe_file, options)


def local_ray_environment(address: str | None) -> None:
    """Before Ray is imported: usage stats off, and a local instance on loopback only.

    Ray resolves 127.0.0.1 to the machine's routable address unless it runs as a single-machine cluster
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read when Ray is imported and inherited by its processes).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray on loopback (no usage stats, no dashboard)."""
    local_ray_environment(address)
    import ray

    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def run_on_ray(
    recipe: dict[str, Any], recipe_file: str, options: RayOptions, report: Callable[[str], None]
) -> int:
    """Deploy, print the URL, and serve until SIGTERM/Ctrl-C, then shut the deployment down (exit 0)."""
    from ray import serve

    report("starting Ray" if options.address is None else f"joining Ray at {options.address}")
    start_ray(options.address)
    serve.start(http_options={"host": options.host, "port": options.port}, detached=False)
    count = f"{options.autoscale[0]}–{options.autoscale[1]}" if options.autoscale else str(options.replicas)
    report(f"deploying {count} replica(s); each loads, applies and warms the recipe")
    serve.run(build_application(recipe, recipe_file, options), name=APP_NAME, route_prefix="/")
    url = f"http://{options.host}:{options.port}"
    report(f"ready: {url} serves {recipe['name']!r} on Ray Serve (OpenAI-compatible: {url}/v1)")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    report("stopping: replicas finish the requests they hold")
    serve.shutdown()
    return 0
