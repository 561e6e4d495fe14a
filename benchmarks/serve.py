"""Load on `dgrun serve`: throughput, latency percentiles and the server's overhead, batching off and on.

    python benchmarks/serve.py [--recipe R] [--requests 24] [--workers 1] [--threads 2]

Starts the server twice on a free loopback port (--max-batch 1, then --max-batch 8 with a 20 ms window),
sends `--requests` requests at concurrency 1, 2, 4 and 8 to each, and prints one table measured in one
run. Overhead is the time the server adds per image: at concurrency 1, the mean request latency minus the
worker's own pipeline seconds per image (the `X-Dgrun-Seconds` of the call divided by its batch). Run it
on a quiet machine: other busy processes slow the pipeline and blur the figures. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

RECIPE = """\
dgrun: 1
name: serve-bench
model: {id: "dgrun:default"}
generate: {steps: 20}
prompts: [a red circle on a blue background]
"""
PROMPTS = [
    f"a {colour} {shape} on a {background} background"
    for colour, shape, background in [
        ("red", "circle", "blue"),
        ("green", "square", "white"),
        ("blue", "triangle", "yellow"),
        ("yellow", "circle", "black"),
    ]
]


def start(directory: Path, recipe: Path, flags: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "dgrun", "serve", str(recipe), "--port", "0", *flags]
    process = subprocess.Popen(
        command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            match = re.search(r"ready: (http://127\.0\.0\.1:\d+)", line)
            if match:
                found.append(match.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300):
        process.kill()
        raise SystemExit("the server did not start")
    return process, found[0]


def load(url: str, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    pipeline: list[float] = []

    def one(index: int) -> None:
        started = time.perf_counter()
        body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index}
        response = httpx.post(url + "/v1/generate", json=body, timeout=300)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        pipeline.append(
            float(response.headers["x-dgrun-seconds"]) / int(response.headers["x-dgrun-batch-size"])
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "throughput": requests / wall,
        "p50": percentile(0.50),
        "p95": percentile(0.95),
        "p99": percentile(0.99),
        "latency_mean": statistics.fmean(latencies),
        "pipeline_per_image": statistics.fmean(pipeline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=None, help="default: dgrun:default, 20 steps")
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="dgrun-serve-bench-"))
    recipe = args.recipe or directory / "r.yaml"
    if args.recipe is None:
        recipe.write_text(RECIPE)
    common = ["--workers", str(args.workers), "--threads", str(args.threads), "--queue", "256"]
    setups = {"unbatched": ["--max-batch", "1"], "batched": ["--max-batch", "8", "--batch-window-ms", "20"]}
    shape = f"{args.workers} worker(s) x {args.threads} thread(s), {args.requests} requests per level"
    print(f"dgrun serve on 127.0.0.1: {shape}")
    print("| batching | concurrency | img/s | p50 s | p95 s | p99 s | pipeline s/img | overhead s/img |")
    print("|---|---|---|---|---|---|---|---|")
    for label, flags in setups.items():
        process, url = start(directory, recipe, common + flags, args.threads)
        try:
            load(url, 4, 1)  # warm the HTTP path too
            for concurrency in (1, 2, 4, 8):
                figures = load(url, args.requests, concurrency)
                overhead = ""
                if concurrency == 1:
                    extra = figures["latency_mean"] - figures["pipeline_per_image"]
                    overhead = f"{extra:.4f} ({100 * extra / figures['pipeline_per_image']:.1f}%)"
                cells = [f"{figures[k]:.3f}" for k in ("p50", "p95", "p99", "pipeline_per_image")]
                row = [label, str(concurrency), f"{figures['throughput']:.2f}", *cells, overhead]
                print("| " + " | ".join(row) + " |", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(120)


if __name__ == "__main__":
    main()
