"""GPU harness: every GPU-relevant dgrun step, and combinations, on random-weight models of real width.

    python benchmarks/gpu/harness.py                      # on a CUDA machine (see run.sh and README.md)
    python benchmarks/gpu/harness.py --cpu-dry --out /tmp/dry
    python benchmarks/gpu/harness.py --only 'compile*' --out /tmp/compile

Two models are built from configs with fixed seeds and saved with `save_pretrained`, so recipes name them
as local model directories: a FLUX pipeline (FluxTransformer2DModel at FLUX.1's width — 24 heads × 128,
T5 width 4096, CLIP pooled 768, 64 input channels — with 2 double and 2 single blocks) and a Stable
Diffusion 1.5-width UNet pipeline (320/640/1280/1280 channels, one layer per block, cross-attention 768).
Each model is then benchmarked by dgrun's own `Bench`: an automatic baseline and one variant per case, each
on a freshly loaded pipeline, with speedup and PSNR against the baseline. A 2-rank data-parallel run
(`torch.distributed.run`, loopback rendezvous) of the UNet model follows. One pass/fail table is printed
and written to OUT/gpu-table.md, beside results.json and the raw bench reports.

`--cpu-dry` runs the same cases on tiny versions of the same configs on the CPU, so every code path of the
harness runs in a test; CUDA-only cases come out as skipped rows. Nothing is installed or downloaded:
the hub is switched off, and the only sockets are the rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
try:
    import dgrun  # noqa: F401  (the installed package, with its plugins' entry points)
except ImportError:  # a checkout without an install: the package from the repository itself
    sys.path.insert(0, str(REPO))

FLUX, SD = "flux", "sd"
MODELS = (FLUX, SD)
DP_CASE = "data-parallel-2"
PROMPTS = [
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, photograph",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon",
]


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One row of the table: a variant's `optimize` list, for the models it applies to."""

    name: str
    steps: tuple[Any, ...]
    models: tuple[str, ...] = MODELS
    what: str = ""
    dry_skip: str | None = None  # why --cpu-dry leaves out a case that only means something on a GPU

    def optimize(self, dry: bool) -> list[Any]:
        """The recipe steps; in --cpu-dry every compile only traces (backend eager: inductor's C++ build of
        each graph would take minutes on two cores)."""
        steps = [json.loads(json.dumps(s)) for s in self.steps]
        if not dry:
            return steps
        for index, step in enumerate(steps):
            if step == "compile":
                steps[index] = step = {"compile": {}}
            if isinstance(step, dict) and "compile" in step:
                params = step["compile"]
                params["backend"] = "eager"
                params.pop("mode", None)  # modes are inductor's
        return steps


def _case(
    name: str, *steps: Any, models: tuple[str, ...] = MODELS, what: str = "", dry_skip: str | None = None
) -> Case:
    return Case(name, tuple(steps), models, what, dry_skip)


AUTOTUNE = "max-autotune benchmarks Triton kernels: a GPU compile"


MAC = {"mode": "max-autotune-no-cudagraphs"}
# Random weights change the first block's residual by 0.3-0.55 (relative) from step to step, far more
# than a trained FLUX (the usual 0.05-0.2): 0.6 lets the cache really skip blocks here.
FBC = {"first_block_cache": {"threshold": 0.6}}
INT8 = {"quantize": {"backend": "torchao", "method": "int8_weight_only"}}
# Cheap cases first, compiles last: a time budget that runs out drops the slowest ones.
CASES: tuple[Case, ...] = (
    _case("tf32", "tf32"),
    _case("cuda-memory", {"cuda_memory": {"expandable_segments": True}}),
    _case("channels-last", "channels_last", models=(SD,)),
    _case(
        "attn-fallback",
        {"attention_backend": {"backend": ["flash_3", "flash", "_native_flash", "native"]}},
        models=(FLUX,),
        what="first usable of flash_3, flash, _native_flash, native",
    ),
    _case("attn-cudnn", {"attention_backend": {"backend": "_native_cudnn"}}, models=(FLUX,)),
    _case("attn-efficient", {"attention_backend": {"backend": "_native_efficient"}}, models=(FLUX,)),
    _case("attn-sage", {"attention_backend": {"backend": "sage"}}, models=(FLUX,)),
    _case("xformers", "xformers", models=(SD,)),
    _case("fuse-qkv", "fuse_qkv"),
    _case("layerwise-fp8", {"layerwise_casting": {"storage_dtype": "float8_e4m3fn"}}),
    _case("quant-int8", INT8),
    _case(
        "quant-fp8",
        {"quantize": {"backend": "torchao", "method": "float8_dynamic_activation_float8_weight"}},
    ),
    _case("quanto-int8", {"quantize": {"backend": "quanto", "method": "qint8"}}),
    _case("quant-nf4", {"quantize": {"backend": "bitsandbytes", "method": "nf4"}}),
    _case("cpu-offload", "cpu_offload"),
    _case("group-offload", {"group_offloading": {"offload_type": "block_level", "num_blocks_per_group": 1}}),
    _case("group-offload-stream", {"group_offloading": {"offload_type": "block_level", "use_stream": True}}),
    _case("first-block-cache", FBC, models=(FLUX,)),
    _case(
        "taylor-seer",
        {"taylor_seer": {"cache_interval": 3, "disable_cache_before_step": 2}},
        models=(FLUX,),
    ),
    _case("mag-cache", {"mag_cache": {"mag_ratios": "flux"}}, models=(FLUX,)),
    _case("pab", "pab", models=(FLUX,)),
    _case("faster-cache", "faster_cache", models=(FLUX,)),
    _case(
        "cache-dit",
        {
            "cache_dit": {
                "fn_compute_blocks": 1,
                "bn_compute_blocks": 0,
                "residual_diff_threshold": 0.6,  # random weights: see FBC
                "max_warmup_steps": 2,
            }
        },
        models=(FLUX,),
    ),
    _case("deepcache", {"deepcache": {"interval": 3, "branch_id": 0}}, models=(SD,)),
    _case("compile-default", "compile"),
    _case("compile-regional", {"compile": {"regional": True}}),
    _case(
        "compile-cudagraphs",
        {"compile": {"mode": "reduce-overhead"}},
        dry_skip="CUDA graphs are a GPU feature",
    ),
    _case("compile-max-autotune-nocg", {"compile": dict(MAC)}, dry_skip=AUTOTUNE),
    _case(
        "flex-compile",
        {"attention_backend": {"backend": "flex"}},
        "compile",
        models=(FLUX,),
        what="flex attention, compiled",
        dry_skip="flex attention is fast only through inductor's GPU kernels; traced on a CPU it is slow",
    ),
    _case("fuse-qkv-compile", "fuse_qkv", "compile"),
    _case("fbc-compile-mac", FBC, {"compile": dict(MAC)}, models=(FLUX,), dry_skip=AUTOTUNE),
    _case("quant-int8-compile", INT8, "compile"),
)


def cases_for(model: str, only: str | None = None) -> list[Case]:
    """The cases run on `model`, filtered by --only (a glob on the case name or on MODEL/CASE)."""
    return [c for c in CASES if model in c.models and _selected(model, c.name, only)]


def _selected(model: str, name: str, only: str | None) -> bool:
    if not only:
        return True
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f"{model}/{name}", p) for p in only.split(","))


# ----------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Settings:
    """Sizes of the models and of the runs: the GPU ones, or tiny ones for --cpu-dry."""

    dry: bool
    device: str
    size: int  # image width = height, px
    steps: int
    prompts: int
    repeats: int
    warmup: int
    clip: dict[str, int]
    t5: dict[str, int]
    flux: dict[str, Any]
    vae: dict[str, Any]
    unet: dict[str, Any]


def settings(dry: bool) -> Settings:
    if dry:
        return Settings(
            dry=True,
            device="cpu",
            size=32,
            steps=4,
            prompts=1,
            repeats=1,
            warmup=0,
            clip={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            },
            t5={"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4},
            flux={"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)},
            vae={"block_out_channels": (16, 32), "norm_num_groups": 8},
            unet={  # two levels instead of four: the same block classes, a quarter of the modules to trace
                "block_out_channels": (16, 32),
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                "norm_num_groups": 8,
                "attention_head_dim": 2,
                "sample_size": 16,
            },
        )
    return Settings(
        dry=False,
        device="cuda",
        size=512,
        steps=8,
        prompts=2,
        repeats=2,
        warmup=1,
        clip={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 2,
            "num_attention_heads": 12,
        },
        t5={"d_model": 4096, "d_kv": 64, "d_ff": 2048, "num_layers": 2, "num_heads": 16},
        # FLUX.1's widths; only the block counts are cut (2 double + 2 single instead of 19 + 38).
        flux={"num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56)},
        vae={"block_out_channels": (64, 128, 256, 256), "norm_num_groups": 32},
        unet={
            "block_out_channels": (320, 640, 1280, 1280),
            "norm_num_groups": 32,
            "attention_head_dim": 8,
            "sample_size": 64,
        },
    )


# ------------------------------------------------------------------------------------------------ models
def _component(seed: int, device: str, dtype: Any, build: Any) -> Any:
    """Build one module directly on the device from its own seed, then cast it."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        module = build()
    return module.to(dtype=dtype).eval()


def _clip(s: Settings, tokenizer: Any, seed: int, device: str, dtype: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        projection_dim=s.clip["hidden_size"],
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **s.clip,
    )
    return _component(seed, device, dtype, lambda: CLIPTextModel(config))


def _t5(s: Settings, tokenizer: Any, seed: int, device: str, dtype: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **s.t5,
    )
    return _component(seed, device, dtype, lambda: T5EncoderModel(config))


def _vae(s: Settings, seed: int, device: str, dtype: Any, **config: Any) -> Any:
    from diffusers import AutoencoderKL

    levels = len(s.vae["block_out_channels"])
    return _component(
        seed,
        device,
        dtype,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=1,
            sample_size=s.size,
            **s.vae,
            **config,
        ),
    )


def build_flux(s: Settings, directory: Path, device: str, dtype: Any) -> None:
    """A FluxPipeline (dev-style, guidance embedding), FLUX.1's width with 2 + 2 blocks, into `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from dgrun.models.tiny import _clip_tokenizer, _t5_tokenizer

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    latent_channels = 16
    transformer = _component(
        21,
        device,
        dtype,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=latent_channels * 4,  # 2×2 latent patches packed into each token
            num_layers=2,
            num_single_layers=2,
            joint_attention_dim=s.t5["d_model"],
            pooled_projection_dim=s.clip["hidden_size"],
            guidance_embeds=True,
            **s.flux,
        ),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(
            s,
            22,
            device,
            dtype,
            latent_channels=latent_channels,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip(s, tokenizer, 23, device, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_t5(s, tokenizer_2, 24, device, dtype),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)


def build_sd(s: Settings, directory: Path, device: str, dtype: Any) -> None:
    """A StableDiffusionPipeline with SD 1.5's UNet widths and one layer per block, saved to `directory`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from dgrun.models.tiny import _clip_tokenizer

    tokenizer = _clip_tokenizer()
    unet = _component(
        31,
        device,
        dtype,
        lambda: UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            cross_attention_dim=s.clip["hidden_size"],
            **s.unet,
        ),
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(s, 32, device, dtype, latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip(s, tokenizer, 33, device, dtype),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)


BUILDERS = {FLUX: build_flux, SD: build_sd}


def build_model(model: str, s: Settings, directory: Path) -> float:
    """Build and save one model; returns its parameter count in millions."""
    import torch

    dtype = torch.float32 if s.dry else torch.bfloat16
    BUILDERS[model](s, directory, s.device, dtype)
    total = 0
    for weights in directory.glob("*/*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += math.prod(handle.get_slice(key).get_shape())
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return total / 1e6


# ----------------------------------------------------------------------------------------------- recipes
def recipe_data(model: str, model_dir: Path, s: Settings, cases: list[Case], prompts: int) -> dict[str, Any]:
    return {
        "dgrun": 1,
        "name": f"gpu-{model}",
        "description": f"benchmarks/gpu/harness.py: every case on the {model} model",
        "model": {"id": str(model_dir), "device": s.device},
        "generate": generate(model, s),
        "on_unavailable": "skip",
        "prompts": PROMPTS[:prompts],
        "variants": [
            {"name": c.name, "description": c.what or None, "optimize": c.optimize(s.dry)} for c in cases
        ],
    }


def generate(model: str, s: Settings) -> dict[str, Any]:
    data: dict[str, Any] = {"steps": s.steps, "width": s.size, "height": s.size, "seed": 0}
    if model == FLUX and s.dry:
        data["extra"] = {"max_sequence_length": 64}  # T5 over 512 padded tokens dominates a tiny model
    return data


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")  # JSON is YAML
    return path


# ------------------------------------------------------------------------------------------------ bench
class BudgetExhausted(KeyboardInterrupt):
    """Raised at the start of a variant past the soft deadline, or by SIGALRM inside one still running at
    the hard deadline: the bench keeps what finished (it handles KeyboardInterrupt that way)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. run.sh's `timeout`): stop like Ctrl-C, so the table of what finished is written."""


# run.sh allows 480 s: this, plus the grace of both models, the venv and the data-parallel run fit in it.
DEFAULT_BUDGET_S = 360.0
GRACE_S = 30.0  # how long a case that started before the soft deadline may run past it


@contextlib.contextmanager
def hard_deadline(deadline: float | None) -> Iterator[None]:
    """Interrupt whatever runs at `deadline` (monotonic seconds): a compile that autotunes for minutes."""
    if deadline is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_: Any) -> None:
        raise BudgetExhausted("time budget spent while a case was running")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _observer(model: str, deadline: float | None) -> Any:
    from dgrun.bench import BenchObserver

    class Progress(BenchObserver):
        def __init__(self) -> None:
            self.started = time.monotonic()
            self.stopped: dict[str, Any] | None = None

        def variant_started(self, result: dict[str, Any]) -> None:
            if deadline is not None and time.monotonic() > deadline and result["role"] != "baseline":
                result["status"] = "not run"  # the bench marks the entry it was starting `interrupted`
                self.stopped = result
                raise BudgetExhausted(f"time budget spent before {result['name']}")
            self.started = time.monotonic()
            print(f"[{model}] {result['name']} ...", flush=True)

        def variant_done(self, result: dict[str, Any]) -> None:
            status, _ = row_status(result)
            took = time.monotonic() - self.started if result["status"] != "unavailable" else 0.0
            print(
                f"[{model}] {result['name']}: {status} · {fmt_speedup(result)} · PSNR {fmt_psnr(result)}"
                f" · {took:.1f} s",
                flush=True,
            )

        def warning(self, message: str) -> None:
            print(f"[{model}]   warning: {message.splitlines()[0][:300]}", flush=True)

    return Progress()


def invalid_cases(
    model: str, model_dir: Path, s: Settings, cases: list[Case], prompts: int, work: Path
) -> dict[str, str]:
    """Cases whose recipe dgrun refuses (a rule, a parameter): found one case at a time."""
    from dgrun.bench import Bench, BenchObserver, BenchOptions
    from dgrun.errors import RecipeError
    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry

    refused = {}
    for case in cases:
        path = write_recipe(
            work / f"check-{model}-{case.name}.yaml", recipe_data(model, model_dir, s, [case], 1)
        )
        options = BenchOptions(repeats=1, warmup=0, out=str(work / "check-out"), overwrite=True)
        try:
            Bench(load_recipe(path), build_registry(), options, BenchObserver()).prepare()
        except RecipeError as error:
            refused[case.name] = "; ".join(p.message for p in error.problems)
    return refused


def run_bench(
    model: str,
    model_dir: Path,
    s: Settings,
    cases: list[Case],
    work: Path,
    deadline: float | None,
    running: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, str]]:
    """One `dgrun bench` of every case on `model`; returns the report and the cases dgrun refused.

    `running` holds the bench while it runs, so an interrupted harness can still tabulate what finished.
    """
    from dgrun.bench import Bench, BenchOptions
    from dgrun.errors import RecipeError
    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry

    refused: dict[str, str] = {}
    registry = build_registry()
    for attempt in range(2):
        kept = [c for c in cases if c.name not in refused]
        path = write_recipe(work / f"{model}.yaml", recipe_data(model, model_dir, s, kept, s.prompts))
        options = BenchOptions(
            repeats=s.repeats,
            warmup=s.warmup,
            out=str(work / f"{model}-bench"),
            overwrite=True,
            argv=["harness.py", model],
        )
        observer = _observer(model, deadline)
        bench = Bench(load_recipe(path), registry, options, observer)
        try:
            bench.prepare()
        except RecipeError as error:
            if attempt:
                raise
            print(f"[{model}] dgrun refuses some cases ({len(error.problems)} problems); finding them")
            refused = invalid_cases(model, model_dir, s, cases, s.prompts, work)
            if not refused:
                raise
            continue
        skip_unrunnable(bench, registry)
        running.update(bench=bench, refused=refused)
        try:
            with hard_deadline(None if deadline is None else deadline + GRACE_S):
                return bench.execute(), refused
        except BudgetExhausted as stop:
            print(f"[{model}] {stop}: the remaining cases are not run", flush=True)
            if observer.stopped is not None:
                observer.stopped["status"] = "not run"
            return bench.report, refused
    raise AssertionError("unreachable")


def skip_unrunnable(bench: Any, registry: Any) -> None:
    """Variants none of whose steps can run here (dgrun's planner says why) are not run: they would only
    repeat the baseline. The bench records them `unavailable`, with the planner's reasons."""
    from dgrun.planner import plan_recipe

    for entry in bench.entries:
        if entry.role != "variant" or entry.result["status"] != "pending":
            continue
        plan = plan_recipe(entry.loaded, registry, bench.environments[entry.loaded.recipe.model.device])
        if plan.steps and not any(step.runnable for step in plan.steps):
            entry.result["status"] = "unavailable"
            entry.result["error"] = "; ".join(f"{step.name}: {step.reason}" for step in plan.steps)


# ------------------------------------------------------------------------------------------------- table
def _first_line(text: Any, limit: int = 160) -> str:
    line = (str(text or "").strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def row_status(result: dict[str, Any]) -> tuple[str, str]:
    """(status, kind) of one bench entry: ok / skipped: why / failed: error / no effect / fell back."""
    status = result.get("status")
    plan = result.get("plan") or []
    if status == "failed":
        return f"failed: {_first_line(result.get('error'))}", "failed"
    if status in ("unavailable",):
        return f"skipped: {_first_line(result.get('error'))}", "skipped"
    if status == "not run":
        return "skipped: not started: the bench stopped first (time budget or interruption)", "skipped"
    if status in ("interrupted", "running", "pending"):
        return "skipped: interrupted while it ran (time budget or termination)", "skipped"

    def listed(entries: list[dict[str, Any]], limit: int = 160) -> str:
        return "; ".join(f"{p['step']}: {_first_line(p.get('detail'), limit)}" for p in entries)

    by_status: dict[str, list[dict[str, Any]]] = {}
    for entry in plan:
        by_status.setdefault(str(entry.get("status")), []).append(entry)
    if "skipped" in by_status:
        return "skipped: " + listed(by_status["skipped"], 200), "skipped"
    if "failed" in by_status:
        return "failed: " + listed(by_status["failed"]), "failed"
    # Falling back along a list of attention backends is the point of the list; any other step that fell
    # back (compile to eager, a cache disabled after its first call) did not do its work.
    fell = by_status.get("fell back", [])
    broken = [p for p in fell if p.get("step") != "attention_backend"]
    if broken:
        return "failed: " + listed(broken), "failed"
    if "no effect" in by_status:
        return "no effect: " + listed(by_status["no effect"]), "no effect"
    if fell:
        return "ok: " + "; ".join(f"{p['step']} {_fell_back(p.get('detail'))}" for p in fell), "ok"
    return "ok", "ok"


def _fell_back(detail: Any) -> str:
    """`fell back to native (flash: not installed; ...)` -> `fell back to native` (the effect says more)."""
    text = _first_line(detail)
    return text.split(" (", 1)[0] if text.startswith("fell back to") else text


def fmt_speedup(result: dict[str, Any]) -> str:
    if result.get("role") == "baseline" and result.get("latency"):
        return "1.00x"
    value = result.get("speedup")
    return f"{value:.2f}x" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def fmt_psnr(result: dict[str, Any]) -> str:
    fidelity = result.get("fidelity")
    if not fidelity:
        return "—"
    if fidelity.get("identical"):
        return "identical"
    value = fidelity.get("psnr_min_db")
    return f"{value:.1f}" if isinstance(value, (int, float)) else "—"


def fmt_latency(result: dict[str, Any]) -> str:
    latency = result.get("latency") or {}
    value = latency.get("median_seconds")
    return f"{value * 1000:.0f}" if isinstance(value, (int, float)) else "—"


def fmt_memory(result: dict[str, Any]) -> str:
    peak = (result.get("peak_memory") or {}).get("bytes")
    return f"{peak / 2**30:.2f}" if isinstance(peak, (int, float)) else "—"


def effects(result: dict[str, Any]) -> str:
    """Each step's effect summary, where the plan entries carry one."""
    parts = []
    for entry in result.get("plan") or []:
        effect = entry.get("effect")
        if isinstance(effect, dict) and effect.get("summary"):
            parts.append(f"{entry.get('step')}: {_first_line(effect['summary'], 120)}")
    return "; ".join(parts) or "—"


def rows_from_report(
    model: str, report: dict[str, Any], refused: dict[str, str], cases: list[Case], dry: bool
) -> list[dict[str, Any]]:
    by_name = {v["name"]: v for v in report.get("variants") or []}
    rows = []
    for name in ["baseline", *(c.name for c in cases)]:
        case = next((c for c in cases if c.name == name), None)
        if dry and case is not None and case.dry_skip:
            rows.append(_row(model, name, f"skipped: --cpu-dry: {case.dry_skip}", "skipped"))
            continue
        if name in refused:
            rows.append(
                _row(model, name, f"failed: dgrun refused the case: {_first_line(refused[name])}", "failed")
            )
            continue
        result = by_name.get(name)
        if result is None:
            rows.append(_row(model, name, "failed: no bench entry (the bench stopped)", "failed"))
            continue
        status, kind = row_status(result)
        rows.append(
            _row(
                model,
                name,
                status,
                kind,
                speedup=fmt_speedup(result),
                psnr=fmt_psnr(result),
                ms=fmt_latency(result),
                memory=fmt_memory(result),
                effect=effects(result),
                raw_speedup=result.get("speedup") if result.get("role") != "baseline" else 1.0,
            )
        )
    return rows


def _row(model: str, case: str, status: str, kind: str, **values: Any) -> dict[str, Any]:
    row = {"model": model, "case": case, "status": status, "kind": kind}
    row.update({"speedup": "—", "psnr": "—", "ms": "—", "memory": "—", "effect": "—", "raw_speedup": None})
    row.update(values)
    return row


COLUMNS = (
    ("model", "model"),
    ("case", "case"),
    ("status", "status"),
    ("speedup", "speedup"),
    ("psnr", "PSNR dB (worst)"),
    ("ms", "ms/image"),
    ("memory", "peak GiB"),
    ("effect", "effect"),
)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header_lines(s: Settings, models: dict[str, dict[str, Any]], started: float) -> list[str]:
    import torch

    device = "cpu (--cpu-dry)"
    if not s.dry and torch.cuda.is_available():
        device = (
            f"{torch.cuda.get_device_name(0)} (cc {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
        )
    versions = []
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "torchao",
        "optimum-quanto",
        "bitsandbytes",
        "DeepCache",
    ):
        try:
            from importlib import metadata

            versions.append(f"{name} {metadata.version(name)}")
        except Exception:
            versions.append(f"{name} —")
    lines = [
        "# dgrun GPU harness" + (" (--cpu-dry)" if s.dry else ""),
        "",
        f"- device: {device}; python {platform.python_version()}",
        f"- {', '.join(versions)}",
        f"- {s.prompts} prompt(s), {s.steps} steps, {s.size}x{s.size} px, repeats {s.repeats}, warmup "
        f"{s.warmup}; speedup = baseline median latency / case median latency; PSNR = worst image vs "
        "the baseline's",
    ]
    if s.dry:
        lines.append("- --cpu-dry: tiny models; `compile` traces with backend eager (no inductor build)")
    for model, info in models.items():
        lines.append(
            f"- {model}: {info.get('params_m', 0):.1f} M parameters, built in "
            f"{info.get('build_s', 0):.1f} s, bench {info.get('bench_s', 0):.1f} s"
        )
    lines.append(f"- total {time.monotonic() - started:.1f} s")
    return [*lines, ""]


def write_outputs(out: Path, s: Settings, rows: list[dict], models: dict, started: float, extra: dict) -> str:
    text = "\n".join(header_lines(s, models, started)) + "\n" + table_markdown(rows)
    (out / "gpu-table.md").write_text(text, encoding="utf-8")
    results = {"dry": s.dry, "models": models, "rows": rows, **extra}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DataParallel:
    """`torch.distributed.run` with 2 ranks on one device (rendezvous on 127.0.0.1) of a plain SD run."""

    def __init__(self, model_dir: Path, s: Settings, work: Path, out: Path):
        self.prompts = 2 if s.dry else 4
        data = {
            "dgrun": 1,
            "name": "gpu-sd-dp",
            "model": {"id": str(model_dir), "device": s.device},
            "generate": generate(SD, s),
            "on_unavailable": "skip",
            "prompts": PROMPTS[: self.prompts],
        }
        self.recipe = write_recipe(work / "sd-dp.yaml", data)
        self.run_dir = work / "sd-dp"
        self.out = out
        self.work = work
        # Loopback only: gloo and NCCL would otherwise pick the interface the host name resolves to.
        loopback = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
        self.env = {**os.environ, **loopback, "COLUMNS": "160"}
        if s.dry:
            self.env["OMP_NUM_THREADS"] = "1"
        self.process: subprocess.Popen[str] | None = None
        self.started = 0.0
        self.log = work / "sd-dp.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            "--local-addr",
            "127.0.0.1",
            "-m",
            "dgrun",
            str(self.recipe),
            "--out",
            str(self.run_dir),
            "--overwrite",
        ]

    def start(self) -> None:
        command = self.command()
        print(f"[dp] {' '.join(command[2:])}", flush=True)
        self.started = time.monotonic()
        with self.log.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=self.work
            )

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the launch (killing it past `timeout`); the table row and what the run left."""
        assert self.process is not None
        try:
            rc: int | None = self.process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            rc = None
        seconds = time.monotonic() - self.started
        output = self.log.read_text(encoding="utf-8", errors="replace")
        record: dict[str, Any] = {}
        record_file = self.run_dir / "run.json"
        if record_file.is_file():
            record = json.loads(record_file.read_text(encoding="utf-8"))
            shutil.copyfile(record_file, self.out / "dp-run.json")
        images = [i for i in record.get("images") or [] if (self.run_dir / str(i.get("file", ""))).is_file()]
        ranks = sorted({i["rank"] for i in images if i.get("rank") is not None})
        world = record.get("world_size")
        wanted = self.prompts
        if rc == 0 and len(images) == wanted and world == 2 and ranks == [0, 1]:
            status, kind = "ok", "ok"
        elif rc is None:
            status, kind = f"failed: timed out after {seconds:.0f} s", "failed"
        else:
            lines = [line for line in output.strip().splitlines() if line.strip()]
            error = record.get("error") or (lines[-1] if lines else "")
            status = (
                f"failed: exit {rc}, {len(images)}/{wanted} images, world_size {world}: {_first_line(error)}"
            )
            kind = "failed"
        summary = (
            f"{len(images)}/{wanted} images by ranks {ranks or '—'}, world_size {world}, {seconds:.1f} s"
        )
        print(f"[dp] {status} · {summary}", flush=True)
        return {
            "row": _row(SD, DP_CASE, status, kind, effect=summary),
            "rc": rc,
            "seconds": round(seconds, 2),
            "output_tail": output[-4000:],
        }


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-dry", action="store_true", help="tiny models on the CPU: every code path, fast"
    )
    parser.add_argument("--out", default="outputs/gpu-harness", help="table, results.json and raw reports")
    parser.add_argument("--only", default=None, help="comma-separated globs on CASE or MODEL/CASE")
    parser.add_argument("--work", default=None, help="keep models and bench runs here (default: a temp dir)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for everything; past its share of it no case starts, and a running one is stopped "
        f"{GRACE_S:.0f} s later (default: {DEFAULT_BUDGET_S:.0f} on the GPU, none in --cpu-dry)",
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the 2-rank data-parallel run")
    return parser.parse_args(argv)


def offline() -> None:
    """Before anything imports huggingface_hub: the models are local directories built here, and the
    data-parallel ranks inherit the setting."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class Harness:
    """One run: the models in turn (build, bench, and the data-parallel launch for sd), then the table."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.s = settings(args.cpu_dry)
        self.budget = args.budget if args.budget is not None else (None if self.s.dry else DEFAULT_BUDGET_S)
        self.out = Path(args.out).expanduser().resolve()
        self.work = Path(args.work).expanduser().resolve() if args.work else None
        self.want_dp = not args.no_dp and _selected(SD, DP_CASE, args.only)
        self.selected = {m: cases_for(m, args.only) for m in MODELS}
        self.needed = [m for m in MODELS if self.selected[m] or (m == SD and self.want_dp)]
        self.runnable = {m: [c for c in self.selected[m] if not (self.s.dry and c.dry_skip)] for m in MODELS}
        self.dp_reserve = 0.0 if (self.budget is None or not self.want_dp) else 60.0
        self.rows: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.dp: DataParallel | None = None
        self.running: dict[str, Any] = {}  # the bench in progress, for the rows of an interrupted run

    def run(self) -> int:
        keep = self.work is not None
        work = self.work or Path(tempfile.mkdtemp(prefix="dgrun-gpu-"))
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        print(
            f"harness: {'cpu dry run' if self.s.dry else 'GPU'}; work dir {work}; out {self.out}", flush=True
        )
        interrupted: KeyboardInterrupt | None = None
        try:
            for position, model in enumerate(self.needed):
                self.run_model(model, position)
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the table of what finished is still written
            interrupted = stop
            print(f"harness: {type(stop).__name__}: {stop}; writing what finished", flush=True)
            if "bench" in self.running:
                model, bench = self.running["model"], self.running["bench"]
                refused = self.running.get("refused", {})
                self.rows += rows_from_report(model, bench.report, refused, self.selected[model], self.s.dry)
        finally:
            if self.dp is not None and self.dp.process is not None and self.dp.process.poll() is None:
                self.dp.process.kill()
                self.dp.process.wait()
            text = self.write()
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        kinds = dict.fromkeys(r["kind"] for r in self.rows)
        print()
        print(text, flush=True)
        print(
            f"{len(self.rows)} rows: "
            + ", ".join(f"{k} {sum(r['kind'] == k for r in self.rows)}" for k in kinds)
        )
        print(f"table: {self.out / 'gpu-table.md'}")
        if interrupted is not None:
            return 143 if isinstance(interrupted, Terminated) else 130
        return 0

    def write(self) -> str:
        return write_outputs(self.out, self.s, self.rows, self.models, self.started, self.extra)

    def run_model(self, model: str, position: int) -> None:
        """One model's rows; a harness or model error becomes failed rows, and the next model runs."""
        started = time.monotonic()
        self.models[model] = {}
        try:
            rows = self.bench_model(model, position)
        except Exception as exc:
            traceback.print_exc()
            message = f"failed: harness: {type(exc).__name__}: {_first_line(exc)}"
            names = ["baseline", *(c.name for c in self.selected[model])]
            if model == SD and self.want_dp:
                names.append(DP_CASE)
            rows = [_row(model, name, message, "failed") for name in names]
            self.running.clear()
        self.rows += rows
        self.models[model]["seconds"] = round(time.monotonic() - started, 1)
        print(f"[{model}] done in {self.models[model]['seconds']:.1f} s", flush=True)
        self.write()
        assert self.work is not None
        shutil.rmtree(self.work / "models" / model, ignore_errors=True)

    def bench_model(self, model: str, position: int) -> list[dict[str, Any]]:
        """Build the model, bench its cases, and (sd) launch the data-parallel run of it."""
        s, work = self.s, self.work
        assert work is not None
        started = time.monotonic()
        model_dir = work / "models" / model
        shutil.rmtree(model_dir, ignore_errors=True)
        info = self.models[model]
        info["params_m"] = round(build_model(model, s, model_dir), 1)
        info["build_s"] = round(time.monotonic() - started, 1)
        print(f"[{model}] built {info['params_m']:.1f} M parameters in {info['build_s']:.1f} s", flush=True)
        gc.collect()  # the built pipeline first (on the GPU, a cycle kept alive would pin its memory)
        gc.freeze()  # the bench collects garbage after every case: spare it the long-lived objects
        if model == SD and self.want_dp:
            self.dp = DataParallel(model_dir, s, work, self.out)
            if s.dry:  # beside the bench on the CPU's other core; on a GPU after it, not to skew timings
                self.dp.start()
        rows: list[dict[str, Any]] = []
        report: dict[str, Any] = {}
        refused: dict[str, str] = {}
        if self.runnable[model]:
            report, refused = self.bench(model, model_dir, position)
        if self.selected[model]:
            rows += rows_from_report(model, report, refused, self.selected[model], s.dry)
        if self.dp is not None:
            if self.dp.process is None:
                self.dp.start()
            elapsed = time.monotonic() - self.started
            left = 180.0 if self.budget is None else max(30.0, self.budget + 40 - elapsed)
            result = self.dp.finish(timeout=left)
            rows.append(result.pop("row"))
            self.extra["data_parallel"] = result
            self.dp = None
        return rows

    def bench(self, model: str, model_dir: Path, position: int) -> tuple[dict[str, Any], dict[str, str]]:
        assert self.work is not None
        deadline = None
        if self.budget is not None:  # the time left, shared by the models still to run, by their cases
            left = self.budget - self.dp_reserve - (time.monotonic() - self.started)
            cases_left = sum(len(self.runnable[m]) for m in self.needed[position:])
            deadline = time.monotonic() + left * len(self.runnable[model]) / max(1, cases_left)
        self.running["model"] = model
        started = time.monotonic()
        report, refused = run_bench(
            model, model_dir, self.s, self.runnable[model], self.work, deadline, self.running
        )
        self.running.clear()
        self.models[model]["bench_s"] = round(time.monotonic() - started, 1)
        report_file = self.work / f"{model}-bench" / "report.json"
        if report_file.is_file():
            shutil.copyfile(report_file, self.out / f"report-{model}.json")
        return report, refused


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline()
    import torch

    if not args.cpu_dry and not torch.cuda.is_available():
        print("harness.py: no CUDA device here; run with --cpu-dry for the CPU dry run", file=sys.stderr)
        return 2
    harness = Harness(args)
    if not harness.needed:
        print(f"harness.py: --only {args.only!r} selects no case", file=sys.stderr)
        return 2

    def terminate(*_: Any) -> None:
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, terminate)
    return harness.run()


if __name__ == "__main__":
    sys.exit(main())
