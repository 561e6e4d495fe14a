"""Images per second for 1 and N data-parallel processes (1 thread each), measured in one run.

Each configuration is a real `torchrun --nproc_per_node P -m dgrun RECIPE` on CPU (gloo). Two figures:
`generate` counts only image generation (the slowest rank's summed image seconds from run.json — what
scales), `wall` counts the whole command (imports, rendezvous, model load — what a user waits for).
Rounds alternate between the configurations so machine noise hits them alike; medians are reported.
The images of every configuration are checked to be byte-identical to the 1-process ones.

    python benchmarks/scaling.py [--processes 1,2] [--prompts 16] [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_once(root: Path, processes: int, out: str) -> dict[str, float]:
    """One launch; returns wall seconds, generation seconds and the images' hashes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "dgrun",
        "r.yaml",
        "--out",
        out,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    record = json.loads((root / out / "run.json").read_text())
    per_rank: dict[int, float] = {}
    for image in record["images"]:
        per_rank[image.get("rank", 0)] = per_rank.get(image.get("rank", 0), 0.0) + image["seconds"]
    hashes = {i["file"]: i["sha256"] for i in record["images"]}
    return {"wall": wall, "generate": max(per_rank.values()), "images": len(hashes), "hashes": hashes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="dgrun:tiny-sd")
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = ", ".join(f"prompt number {i}" for i in range(args.prompts))
        (root / "r.yaml").write_text(
            f'dgrun: 1\nname: scaling\nmodel: {{id: "{args.model}"}}\n'
            f"generate: {{steps: {args.steps}}}\nprompts: [{prompts}]\n"
        )
        results: dict[int, list[dict]] = {p: [] for p in counts}
        for round_index in range(args.rounds):
            for processes in counts:
                results[processes].append(run_once(root, processes, f"out-{processes}-{round_index}"))

    reference = results[counts[0]][0]["hashes"]
    print(f"{args.model}, {args.prompts} prompts x {args.steps} steps, 1 thread per process, CPU/gloo")
    header = f"{'processes':>9} {'generate img/s':>15} {'speedup':>8} {'wall img/s':>11} {'wall s':>7}"
    print(f"{header} identical")
    base = None
    for processes in counts:
        runs = results[processes]
        generate = statistics.median(args.prompts / r["generate"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        base = base or generate
        same = all(r["hashes"] == reference for r in runs)
        print(
            f"{processes:>9} {generate:>15.2f} {generate / base:>7.2f}x "
            f"{args.prompts / wall:>11.2f} {wall:>7.1f} {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
