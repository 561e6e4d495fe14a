"""What does each cache step (and compile) buy on a model: speedup and PSNR against the uncached pipeline.

Measured in one run: every variant is a copy of the same loaded pipeline with dgrun's own step applied
(through the plugin registry, so plugin steps such as deepcache and cache_dit count too), run over the same
prompts, seeds and steps. Rounds interleave the variants so machine noise hits them alike; each variant's
time is the median over rounds of its mean seconds per image, after one untimed warm-up call (for compile,
that call is the compilation and is reported apart). PSNR and SSIM compare uint8 images with the uncached
ones (mean over prompts, and the worst PSNR); on the shapes models (`dgrun:default`, `dgrun:default-dit`)
"adh" is the share of images whose colour, shape and background the evaluator finds all right. By
default the clock is this process's CPU time with one torch thread: on the project's shared 2-core
machines, wall time with two threads swings by 3x with other processes' load, while single-thread CPU
time moves far less (`--clock wall --threads 0` for elapsed time). "attn runs"
counts how often one deep attention projection really ran per image (the last transformer block's, or the
UNet mid block's): the cache hits, made visible.

    python benchmarks/caches.py                     # tiny-sd and tiny-flux, the issue's variants
    python benchmarks/caches.py --model dgrun:default --prompts 8
    python benchmarks/caches.py --model dgrun:default-dit --prompts 8
    python benchmarks/caches.py --only first_block_cache --set first_block_cache.threshold=0.4

Random-weight models say little about image quality: their PSNR only shows how far a cache strays; the
trained shapes models say whether the picture still shows what was asked.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# In the shapes grammar, so the trained models can be scored for adherence (the first 8 are quickstart's).
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
    "a blue circle on a yellow background",
    "a white square on a red background",
    "a black triangle on a green background",
    "a green circle on a black background",
    "a yellow square on a blue background",
]


@dataclass
class Variant:
    """One row: a recipe step with its params, and what was measured for it."""

    step: str
    params: dict[str, Any] = field(default_factory=dict)
    pipe: Any = None
    status: str = "ok"
    note: str = ""
    warmup_seconds: float = 0.0
    seconds: list[float] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    attention_runs: list[int] = field(default_factory=list)


def unet_variants(steps: int) -> list[Variant]:
    return [Variant("deepcache", {"interval": 3, "branch_id": 0}), Variant("compile", {})]


def transformer_variants(steps: int) -> list[Variant]:
    """Defaults where they skip anything; thresholds raised where random weights make them skip nothing.

    On random weights the first block's output changes by 20-40 % per step, so FirstBlockCache's default
    0.2 computes every step (shown as such), and MagCache's calibrated ratios are noisy (threshold raised).
    TaylorSeer keeps its factors in float32 because the model runs in float32.
    """
    return [
        Variant("first_block_cache", {"threshold": 0.2}),
        Variant("first_block_cache", {"threshold": 0.35}),
        Variant("pab", {}),
        Variant("faster_cache", {}),
        Variant("taylor_seer", {"taylor_factors_dtype": "float32"}),
        Variant("taylor_seer", {"taylor_factors_dtype": "float32", "use_lite_mode": True}),
        Variant("mag_cache", {"calibrate": True, "num_inference_steps": steps, "threshold": 0.24}),
        Variant(
            "cache_dit", {"fn_compute_blocks": 1, "max_warmup_steps": 4, "residual_diff_threshold": 0.35}
        ),
        Variant("compile", {}),
    ]


# --------------------------------------------------------------------------------------------- loading
def load(model_id: str, registry: Any) -> Any:
    """The model as dgrun's runner loads it (built-in, plugin-owned, local directory or hub id), on CPU."""
    import torch

    from dgrun.models.hub import load_diffusers_pipeline
    from dgrun.recipe import ModelSpec

    spec = ModelSpec(id=model_id)
    pipe = registry.load_pipeline(spec, "cpu", torch.float32)
    if pipe is None:
        pipe = load_diffusers_pipeline(spec, "cpu", torch.float32, False, {}, Path.cwd())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def probe_module(denoiser: Any) -> Any:
    """A deep attention projection: the UNet mid block's, else the last one in the transformer."""
    root = getattr(denoiser, "mid_block", None) or denoiser
    names = [n for n, _ in root.named_modules() if n.endswith((".to_q", ".to_qkv"))]
    if not names:
        return None
    return root.get_submodule(names[0] if root is not denoiser else names[-1])


@contextlib.contextmanager
def counting(module: Any) -> Iterator[list[int]]:
    counter = [0]
    if module is None:
        yield counter
        return
    handle = module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def prepare(variant: Variant, template: Any, registry: Any, ctx: Any) -> None:
    """Copy the pipeline and apply the variant's step, or say why it cannot run here."""
    if variant.step == "baseline":
        variant.pipe = copy.deepcopy(template)
        return
    info = registry.get(variant.step)
    if info is None:
        variant.status, variant.note = "n/a", "step not installed"
        return
    params = info.cls.Params.model_validate(variant.params)
    reason = info.cls.unavailable_reason(ctx.env, params)
    if reason:
        variant.status, variant.note = "n/a", reason
        return
    if ctx.model_kind not in info.cls.applies_to:
        variant.status, variant.note = "n/a", f"not for {ctx.model_kind.value} models"
        return
    pipe = copy.deepcopy(template)
    try:
        detail = info.cls(params).apply(pipe, ctx)
    except Exception as exc:
        variant.status, variant.note = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return
    variant.pipe = pipe
    if isinstance(detail, str) and variant.step != "mag_cache":
        variant.note = detail
    elif variant.step == "mag_cache":
        variant.note = "ratios calibrated by one uncached call"


def generate(pipe: Any, prompt: str, seed: int, steps: int, size: tuple[int, int]) -> Any:
    import numpy as np
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    width, height = size
    image = pipe(prompt, num_inference_steps=steps, generator=generator, width=width, height=height).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- run
def bench_model(model_id: str, wanted: list[Variant], args: argparse.Namespace, registry: Any) -> list[dict]:
    import torch

    from dgrun import metrics
    from dgrun.models import kind_from_components, native_size
    from dgrun.optimizer import ApplyContext, Environment

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    template = load(model_id, registry)
    kind = kind_from_components(template.components)
    size = native_size(template, model_id)
    ctx = ApplyContext(Environment("cpu", "cpu", probed=True), kind, torch.float32, size[0], size[1])
    prompts = PROMPTS[: args.prompts]
    variants = [Variant("baseline"), *wanted]
    for variant in variants:
        prepare(variant, template, registry, ctx)
    live = [v for v in variants if v.pipe is not None]
    with torch.inference_mode():
        for variant in live:  # untimed warm-up: compilation, lazy imports, allocator
            started = time.perf_counter()  # wall clock: compilation also runs in worker processes
            try:
                generate(variant.pipe, prompts[0], 0, args.steps, size)
            except Exception as exc:  # a step that applies but fails in the call: a row, not a crash
                variant.status = "failed"
                variant.note = f"first call: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                variant.pipe = None
                continue
            variant.warmup_seconds = time.perf_counter() - started
        live = [v for v in live if v.pipe is not None]
        for round_index in range(args.rounds):
            # rotate the order each round so no variant always runs right after another
            shift = round_index % len(live)
            for variant in live[shift:] + live[:shift]:
                denoiser = getattr(variant.pipe, "transformer", None) or variant.pipe.unet
                probe = None if variant.step == "compile" else probe_module(denoiser)
                started = clock()
                for index, prompt in enumerate(prompts):
                    with counting(probe) as runs:
                        image = generate(variant.pipe, prompt, index, args.steps, size)
                    if round_index == 0:
                        variant.images.append(image)
                        variant.attention_runs.append(runs[0] if probe is not None else -1)
                variant.seconds.append((clock() - started) / len(prompts))
    base = variants[0]
    base_time = statistics.median(base.seconds)
    rows = []
    for variant in variants:
        row: dict[str, Any] = {
            "model": model_id,
            "step": variant.step,
            "params": variant.params,
            "status": variant.status,
            "note": variant.note,
        }
        if variant.pipe is not None:
            seconds = statistics.median(variant.seconds)
            pairs = [
                (metrics.as_pixels(b), metrics.as_pixels(a))
                for a, b in zip(variant.images, base.images, strict=True)
            ]
            scores = [metrics.psnr(b, a) for b, a in pairs]
            runs = [r for r in variant.attention_runs if r >= 0]
            adherence = metrics.adherence(model_id, list(zip(prompts, variant.images, strict=True)))
            row.update(
                ms=1000 * seconds,
                speedup=base_time / seconds,
                psnr=statistics.mean(scores) if variant is not base else None,
                psnr_min=min(scores) if variant is not base else None,
                ssim=statistics.mean(metrics.ssim(b, a) for b, a in pairs) if variant is not base else None,
                adherence=adherence["all"] if adherence and adherence.get("available") else None,
                attn_runs=statistics.mean(runs) if runs else None,
                warmup_s=variant.warmup_seconds,
            )
            if variant.step == "compile":
                row["note"] = f"first call (compilation) {variant.warmup_seconds:.1f} s wall; " + variant.note
        rows.append(row)
        variant.pipe = None  # free the copy
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.steps} steps, {args.prompts} prompts (seeds 0..{args.prompts - 1}), {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, {args.threads or 'default'} torch threads, torch {_version('torch')}, "
        f"diffusers {_version('diffusers')}; ms/image = median over rounds of {args.clock} time"
    )
    columns = (
        ("ms/img", 7),
        ("speedup", 7),
        ("PSNR dB", 8),
        ("min", 6),
        ("SSIM", 6),
        ("adh", 5),
        ("attn runs", 9),
    )
    header = f"{'model':<16} {'step':<18} " + " ".join(f"{name:>{width}}" for name, width in columns)
    header += "  params / note"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "ms" not in row:
            dashes = " ".join(f"{'—':>{width}}" for _, width in columns)
            print(f"{row['model']:<16} {row['step']:<18} {dashes}  {row['status']}: {row['note']}")
            continue
        psnr_text = "—" if row["psnr"] is None else _db(row["psnr"])
        min_text = "—" if row["psnr_min"] is None else _db(row["psnr_min"])
        ssim_text = "—" if row["ssim"] is None else f"{row['ssim']:.3f}"
        adherence_text = "—" if row["adherence"] is None else f"{row['adherence']:.2f}"
        runs = "—" if row["attn_runs"] is None else f"{row['attn_runs']:.1f}/{args.steps}"
        params = json.dumps(row["params"], separators=(",", ":")) if row["params"] else ""
        print(
            f"{row['model']:<16} {row['step']:<18} {row['ms']:>7.1f} {row['speedup']:>6.2f}x {psnr_text:>8} "
            f"{min_text:>6} {ssim_text:>6} {adherence_text:>5} {runs:>9}  {params} {row['note']}".rstrip()
        )


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _apply_overrides(variants: list[Variant], overrides: list[str]) -> None:
    """`--set step.key=JSON` changes one param of one variant (e.g. first_block_cache.threshold=0.3)."""
    for item in overrides:
        target, _, raw = item.partition("=")
        step, _, key = target.partition(".")
        value = json.loads(raw)
        matched = [v for v in variants if v.step == step]
        if not matched or not key:
            raise SystemExit(f"--set {item}: expected STEP.KEY=JSON for one of the listed steps")
        for variant in matched:
            variant.params[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one model id (default: dgrun:tiny-sd and dgrun:tiny-flux)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated steps to measure (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP.KEY=JSON")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 0: torch's choice (default: 1)"
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu (default): this process's CPU time, steady on a shared machine; wall: elapsed time",
    )
    args = parser.parse_args()

    import torch  # imported once up front, outside any timing

    if args.threads:
        torch.set_num_threads(args.threads)

    from dgrun.optimizer import ModelKind
    from dgrun.plugins import build_registry
    from dgrun.quiet import quiet_libraries

    quiet_libraries()
    registry = build_registry()
    if args.model:
        plans: list[tuple[str, list[Variant] | None]] = [(args.model, None)]
    else:
        plans = [
            ("dgrun:tiny-sd", unet_variants(args.steps)),
            ("dgrun:tiny-flux", [v for v in transformer_variants(args.steps) if v.step != "compile"]),
        ]
    rows: list[dict] = []
    for model_id, wanted in plans:
        if wanted is None:  # a single model: every variant of its kind, compile included
            template_kind = _kind_of(model_id, registry)
            wanted = (
                unet_variants(args.steps)
                if template_kind == ModelKind.UNET
                else transformer_variants(args.steps)
            )
        if args.only:
            names = {n.strip() for n in args.only.split(",")}
            wanted = [v for v in wanted if v.step in names]
        _apply_overrides(wanted, args.overrides)
        rows.extend(bench_model(model_id, wanted, args, registry))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


def _kind_of(model_id: str, registry: Any) -> Any:
    from dgrun.models import kind_from_components, static_model_info

    kind, _ = static_model_info(model_id)
    if kind is None:
        kind = kind_from_components(load(model_id, registry).components)
    return kind


if __name__ == "__main__":
    main()
