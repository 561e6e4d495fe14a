"""`dgrun serve`: the recipe's pipeline kept warm behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dgrun.cli.common import (
    EXIT_BAD_INPUT,
    DebugOption,
    OptimizeOption,
    SetOption,
    app,
    err,
    fail,
    guard,
    load_recipe_args,
    out,
    warn_broken_plugins,
)

SERVE_EXTRA = "pip install 'dgrun[serve]' (fastapi, uvicorn, prometheus-client)"
RAY_EXTRA = "pip install 'dgrun[ray]' (Ray Serve)"


def _workers(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        fail(EXIT_BAD_INPUT, f"error: --workers takes a number of workers or 'auto', not {value!r}")
    return int(value)


@app.command()
def serve(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    workers: Annotated[
        str,
        typer.Option("--workers", help="Worker processes, or 'auto': one per CUDA device, else one on CPU."),
    ] = "auto",
    strategy: Annotated[
        str,
        typer.Option("--strategy", help="How a request picks a worker: least_busy, round_robin or random."),
    ] = "least_busy",
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (loopback unless you say otherwise).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    queue: Annotated[int, typer.Option("--queue", min=1, help="Most requests waiting; beyond: 429.")] = 64,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds a request may take; then 504.")
    ] = 300.0,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Most requests in one pipeline call.")
    ] = 1,
    batch_window_ms: Annotated[
        float, typer.Option("--batch-window-ms", min=0, help="How long a batch waits for more requests.")
    ] = 0.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", help="Require `Authorization: Bearer KEY` (default: $DGRUN_API_KEY, if set)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads per worker (default: the cores split)."),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model.trust_remote_code: true to take effect.")
    ] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (needs dgrun[ray]).")] = False,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="--ray: 'auto' (the local cluster) or ray://HOST:PORT; default: start one."
        ),
    ] = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="--ray: replicas of the recipe.")] = 1,
    gpus_per_replica: Annotated[
        float, typer.Option("--gpus-per-replica", min=0, help="--ray: GPUs each replica takes.")
    ] = 0.0,
    max_ongoing_requests: Annotated[
        int, typer.Option("--max-ongoing-requests", min=1, help="--ray: requests a replica holds at once.")
    ] = 8,
    autoscale: Annotated[
        str | None,
        typer.Option("--autoscale", metavar="MIN:MAX", help="--ray: scale replicas between MIN and MAX."),
    ] = None,
    set_: SetOption = None,
    optimize: OptimizeOption = None,
    debug: DebugOption = False,
) -> None:
    """Serve the recipe: warm workers behind POST /v1/images/generations (OpenAI Images API), POST
    /v1/generate (a PNG that `dgrun reproduce` accepts), GET /v1/models, /v1/recipe, /health and /metrics.

    SIGTERM or Ctrl-C stops taking work, finishes what is queued and running, and exits 0."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        fail(EXIT_BAD_INPUT, f"error: dgrun serve needs {exc.name}: {SERVE_EXTRA}")
    from dgrun.plugins import build_registry
    from dgrun.serve.pool import STRATEGIES

    if strategy not in STRATEGIES:
        fail(EXIT_BAD_INPUT, f"error: --strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    count = _workers(workers)
    registry = guard(debug, build_registry)
    warn_broken_plugins(registry)
    loaded = guard(debug, lambda: load_recipe_args(recipe, set_, optimize, registry))
    if ray:
        _serve_on_ray(loaded, locals())
    from dgrun.serve.server import ServeOptions, run_server

    options = ServeOptions(
        workers=count,
        strategy=strategy,
        host=host,
        port=port,
        queue=queue,
        timeout=timeout,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
        api_key=api_key or os.environ.get("DGRUN_API_KEY") or None,
        threads=threads,
        trust_remote_code=trust_remote_code,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(
            f"[yellow]warning: binding {escape(host)}: the server is reachable from other machines[/yellow]"
        )

    def report(message: str) -> None:
        out.print(f"[dim]·[/dim] {escape(message)}")
        sys.stdout.flush()

    code = guard(debug, lambda: run_server(loaded, registry, options, report))
    raise typer.Exit(code)


def _autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    low, sep, high = value.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 0 < int(low) <= int(high):
        fail(EXIT_BAD_INPUT, f"error: --autoscale takes MIN:MAX with 0 < MIN <= MAX, not {value!r}")
    return int(low), int(high)


def _serve_on_ray(loaded: object, flags: dict) -> None:
    """`dgrun serve --ray`: the same app on Ray Serve; exits when the deployment stops."""
    from dgrun.serve.ray_serve import RayOptions, local_ray_environment, run_on_ray

    local_ray_environment(flags["address"])  # before Ray is imported
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        fail(EXIT_BAD_INPUT, f"error: --ray needs Ray Serve: {RAY_EXTRA}")

    if flags["workers"] != "auto":
        fail(EXIT_BAD_INPUT, "error: with --ray, say --replicas N (Ray places the replicas), not --workers")
    options = RayOptions(
        address=flags["address"],
        replicas=flags["replicas"],
        gpus_per_replica=flags["gpus_per_replica"],
        max_ongoing_requests=flags["max_ongoing_requests"],
        autoscale=_autoscale(flags["autoscale"]),
        strategy=flags["strategy"],
        host=flags["host"],
        port=flags["port"],
        api_key=flags["api_key"] or os.environ.get("DGRUN_API_KEY") or None,
        timeout=flags["timeout"],
        queue=flags["queue"],
        max_batch=flags["max_batch"],
        batch_window_ms=flags["batch_window_ms"],
        threads=flags["threads"],
        trust_remote_code=flags["trust_remote_code"],
    )
    if options.port == 0:
        fail(EXIT_BAD_INPUT, "error: Ray Serve's proxy needs a fixed --port")
    recipe = loaded.recipe  # type: ignore[attr-defined]
    path = str(loaded.path)  # type: ignore[attr-defined]

    def report(message: str) -> None:
        out.print(f"[dim]·[/dim] {escape(message)}")
        sys.stdout.flush()

    raise typer.Exit(run_on_ray(recipe.resolved(), path, options, report))
