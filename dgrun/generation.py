"""What one pipeline call gets: prompts grouped into batches, and the call's keyword arguments.

Shared by `dgrun run` and the server, so an image served for a prompt and seed is made by the same call
as in a run: one CPU generator per prompt, seeded with its seed and shared by that prompt's images, so the
draws depend neither on batching nor on the device.
"""

from __future__ import annotations

from typing import Any

from dgrun.outputs import ImageJob
from dgrun.recipe import GenerateSpec


def group_by_prompt(jobs: list[ImageJob]) -> list[list[ImageJob]]:
    """Jobs grouped by prompt, in order."""
    groups: dict[int, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.prompt_index, []).append(job)
    return list(groups.values())


def batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Pipeline calls of `batch_size` prompts, each with all its images."""
    groups = group_by_prompt(jobs)
    return [
        [job for group in groups[i : i + batch_size] for job in group]
        for i in range(0, len(groups), batch_size)
    ]


def call_kwargs(generate: GenerateSpec, batch: list[ImageJob]) -> dict[str, Any]:
    """Keyword arguments of the pipeline call that makes `batch` (every image of each of its prompts)."""
    import torch

    prompts = [jobs[0].prompt for jobs in group_by_prompt(batch)]
    kwargs: dict[str, Any] = {
        "prompt": [p.text for p in prompts],
        "num_inference_steps": generate.steps,
        "num_images_per_prompt": generate.images_per_prompt,
        "output_type": "pil",
    }
    negatives = [p.negative if p.negative is not None else generate.negative_prompt for p in prompts]
    if any(n is not None for n in negatives):
        kwargs["negative_prompt"] = [n or "" for n in negatives]
    for key in ("guidance_scale", "width", "height"):
        value = getattr(generate, key)
        if value is not None:
            kwargs[key] = value
    per_prompt: dict[int, Any] = {}
    for job in batch:
        if job.prompt_index not in per_prompt:
            per_prompt[job.prompt_index] = torch.Generator("cpu").manual_seed(job.seed)
    generators = [per_prompt[job.prompt_index] for job in batch]
    kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    kwargs.update(generate.extra)
    return kwargs
