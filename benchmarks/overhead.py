"""How much does dgrun add on top of a hand-written diffusers loop, and how fast is `dgrun --help`?

Measured in one run, on the same tiny pipeline, prompts, seeds and steps: dgrun's whole in-process run
(registry, plan, load, generate, atomic PNG + run.json writes) against a loop that builds the same
pipeline, calls it per prompt with the same generators and saves PNGs. Rounds alternate between the two
so machine noise hits both alike; medians are compared. Target: ratio ≤ 1.02, `--help` ≤ 0.3 s.

    python benchmarks/overhead.py [--prompts 8] [--steps 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def hand_written(directory: Path, prompts: list[str], steps: int) -> None:
    import torch

    from dgrun.models.tiny import build_tiny_sd

    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(index)
            image = pipe(prompt, num_inference_steps=steps, generator=generator).images[0]
            image.save(directory / f"{index:03d}.png")


def with_dgrun(directory: Path, prompts: list[str], steps: int) -> None:
    from dgrun.testing import run_recipe_data

    run_recipe_data(directory, {"prompts": prompts, "generate": {"steps": steps}})


def help_seconds(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dgrun", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    prompts = [f"a shape number {i}" for i in range(args.prompts)]
    import torch  # noqa: F401 - imported once up front so neither side pays for it

    hand_written(Path(tempfile.mkdtemp()), prompts[:1], 2)  # warm caches
    timings: dict[str, list[float]] = {"hand-written": [], "dgrun": []}
    for _ in range(args.rounds):
        for label, function in (("hand-written", hand_written), ("dgrun", with_dgrun)):
            with tempfile.TemporaryDirectory() as directory:
                started = time.perf_counter()
                function(Path(directory), prompts, args.steps)
                timings[label].append(time.perf_counter() - started)
    hand, ours = statistics.median(timings["hand-written"]), statistics.median(timings["dgrun"])
    print(
        f"tiny-sd, {args.prompts} prompts x {args.steps} steps, {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    for label, median in (("hand-written", hand), ("dgrun", ours)):
        every = ", ".join(f"{t:.3f}" for t in timings[label])
        print(f"{label:<14} median {median:.3f} s  (all: {every})")
    print(f"ratio dgrun / hand-written: {ours / hand:.3f}  (target <= 1.02)")
    print(f"dgrun --help wall time: {help_seconds(7):.3f} s median of 7  (target <= 0.3 s)")


if __name__ == "__main__":
    main()
