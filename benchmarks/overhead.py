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


def hand_written(directory: Path, prompts: list[str], steps: int) -> float:
    """Build, generate and save; return the seconds of the generate-and-save loop alone."""
    import torch

    from dgrun.models.tiny import build_tiny_sd

    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(index)
            image = pipe(prompt, num_inference_steps=steps, generator=generator).images[0]
            image.save(directory / f"{index:03d}.png")
    return time.perf_counter() - started


def with_dgrun(directory: Path, prompts: list[str], steps: int) -> float:
    """A whole dgrun run; return the seconds of its generation phase (calls, PNG + run.json writes)."""
    from dgrun.testing import run_recipe_data

    record = run_recipe_data(directory, {"prompts": prompts, "generate": {"steps": steps}})
    timings = record["timings"]
    fixed = timings["load_seconds"] + timings["apply_seconds"] + timings["warmup_seconds"]
    return timings["total_seconds"] - fixed


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
    generation: dict[str, list[float]] = {"hand-written": [], "dgrun": []}
    for _ in range(args.rounds):
        for label, function in (("hand-written", hand_written), ("dgrun", with_dgrun)):
            with tempfile.TemporaryDirectory() as directory:
                started = time.perf_counter()
                generation[label].append(function(Path(directory), prompts, args.steps))
                timings[label].append(time.perf_counter() - started)
    hand, ours = statistics.median(timings["hand-written"]), statistics.median(timings["dgrun"])
    hand_gen, ours_gen = statistics.median(generation["hand-written"]), statistics.median(generation["dgrun"])
    print(
        f"tiny-sd, {args.prompts} prompts x {args.steps} steps, {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    for label, median in (("hand-written", hand), ("dgrun", ours)):
        every = ", ".join(f"{t:.3f}" for t in timings[label])
        print(f"{label:<14} median {median:.3f} s  (all: {every})")
    print(f"generation phase: hand-written {hand_gen:.3f} s, dgrun {ours_gen:.3f} s")
    print(f"ratio dgrun / hand-written, generation phase: {ours_gen / hand_gen:.3f}  (target <= 1.02)")
    print(f"ratio dgrun / hand-written, whole run incl. plugins, plan, load: {ours / hand:.3f}")
    print(f"dgrun --help wall time: {help_seconds(7):.3f} s median of 7  (target <= 0.3 s)")


if __name__ == "__main__":
    main()
