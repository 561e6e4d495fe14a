"""Memory steps on the tiny offline pipelines: offloads, layerwise casting, channels-last, CUDA settings.

Each test shows what a step changed (hooks installed, weights stored in fp8, weight layout) and that the
images stay within a stated tolerance of an untouched pipeline's; CUDA-only steps are checked for the
reason they give on a CPU and for the "skipped" record a run makes of them. Rule tests plan recipes the
way `dgrun check` does and assert the message names both steps and an order that satisfies every rule.
Images are float arrays on a 0–1 scale from a fixed seed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun.errors import RecipeError  # noqa: E402
from dgrun.loading import load_recipe  # noqa: E402
from dgrun.optimizer import ApplyContext, Environment, matches  # noqa: E402
from dgrun.planner import Plan, plan_recipe  # noqa: E402
from dgrun.plugins import Registry, build_registry  # noqa: E402
from dgrun.steps import runtime  # noqa: E402
from dgrun.steps.offload import CpuOffload, GroupOffloading, SequentialCpuOffload  # noqa: E402
from dgrun.steps.precision import ChannelsLast, LayerwiseCasting  # noqa: E402
from dgrun.steps.runtime import CudaMemory, CudnnBenchmark, merge_alloc_conf  # noqa: E402
from dgrun.testing import generate_array, run_recipe_data, tiny_pipeline  # noqa: E402

CPU = Environment(device="cpu", device_kind="cpu")
CUDA = Environment(device="cuda:1", device_kind="cuda", cuda_capability=(9, 0))
PROMPT = "a red circle on a blue background"
GROUP_HOOK = "group_offloading"  # diffusers/hooks/group_offloading.py _GROUP_OFFLOADING
CASTING_HOOK = "layerwise_casting"  # diffusers/hooks/layerwise_casting.py _LAYERWISE_CASTING_HOOK
# fp8 weights on random-weight models: measured max 0.048 (UNet) / 0.0095 (Flux), mean well below 0.01.
FP8_MAX, FP8_MEAN = 0.1, 0.02


# ---------------------------------------------------------------------------------------------- helpers
def _ctx(env: Environment = CPU) -> ApplyContext:
    return ApplyContext(env=env, model_kind=None, dtype=torch.float32, width=32, height=32)


def _generate(pipe: Any) -> np.ndarray:
    return generate_array(pipe, PROMPT, 2)


@pytest.fixture(scope="module")
def baseline() -> Callable[[str], np.ndarray]:
    """Images of an untouched pipeline, once per kind (steps mutate pipelines, so tests build their own)."""
    cache: dict[str, np.ndarray] = {}

    def get(kind: str) -> np.ndarray:
        if kind not in cache:
            cache[kind] = _generate(tiny_pipeline(kind))
        return cache[kind]

    return get


def _hooks(module: Any) -> dict[str, list[str]]:
    """Submodule name -> names of the diffusers hooks registered on it."""
    return {
        name: list(sub._diffusers_hook.hooks)
        for name, sub in module.named_modules()
        if getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook.hooks
    }


@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry()


def _plan(registry: Registry, tmp_path: Path, steps: str, model: str = "dgrun:tiny-flux") -> Plan:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"dgrun: 1\nname: plan\nmodel:\n  id: {model}\nprompts: [a cat]\noptimize:\n{steps}")
    return plan_recipe(load_recipe(path), registry, CPU)


def _rule_message(registry: Registry, tmp_path: Path, steps: str) -> str:
    with pytest.raises(RecipeError) as info:
        _plan(registry, tmp_path, steps)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0].message


def assert_valid_order(registry: Registry, message: str, expected: set[str]) -> None:
    """The message's suggested order holds every step and breaks no `after` rule."""
    found = re.search(r"a valid order: ([a-z0-9_, ]+)", message)
    assert found, message
    order = found.group(1).split(", ")
    assert set(order) == expected
    for position, name in enumerate(order):
        cls = registry.get(name).cls
        later = [registry.get(other).cls for other in order[position + 1 :]]
        assert not any(matches(rule, other) for rule in cls.after for other in later), order


# -------------------------------------------------------------------------------------- cudnn_benchmark
@pytest.fixture
def restore_cudnn() -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


def test_cudnn_benchmark_is_a_recorded_noop_on_cpu(restore_cudnn: None) -> None:
    torch.backends.cudnn.benchmark = False
    detail = CudnnBenchmark(CudnnBenchmark.Params()).apply(None, _ctx())
    assert detail is not None and "no-op on cpu" in detail
    assert torch.backends.cudnn.benchmark is False


def test_cudnn_benchmark_on_cuda_sets_the_flag_both_ways(restore_cudnn: None) -> None:
    # A process-wide flag that CPU builds of torch have too.
    CudnnBenchmark(CudnnBenchmark.Params()).apply(None, _ctx(CUDA))
    assert torch.backends.cudnn.benchmark is True
    CudnnBenchmark(CudnnBenchmark.Params(enabled=False)).apply(None, _ctx(CUDA))
    assert torch.backends.cudnn.benchmark is False


# ------------------------------------------------------------------------------------------ cuda_memory
def test_alloc_conf_merging_keeps_other_settings() -> None:
    assert merge_alloc_conf(None, "expandable_segments", "True") == "expandable_segments:True"
    merged = merge_alloc_conf(
        "max_split_size_mb:64, expandable_segments:False", "expandable_segments", "True"
    )
    assert merged == "max_split_size_mb:64,expandable_segments:True"


def test_cuda_memory_params_are_checked() -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            CudaMemory.Params(fraction=bad)
    assert CudaMemory.Params(fraction=1.0).fraction == 1.0


class _FakeCuda:
    """Stands in for torch's CUDA calls, recording them (this machine has no GPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, initialised: bool) -> None:
        self.calls: list[tuple[str, Any]] = []
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append(("empty_cache", None)))
        monkeypatch.setattr(
            torch.cuda,
            "set_per_process_memory_fraction",
            lambda fraction, device: self.calls.append(("fraction", (fraction, device))),
        )
        monkeypatch.setattr(
            torch._C,
            "_accelerator_setAllocatorSettings",
            lambda text: self.calls.append(("settings", text)),
            raising=False,
        )


def test_cuda_memory_before_cuda_initialises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.ALLOC_CONF, "max_split_size_mb:64")
    fake = _FakeCuda(monkeypatch, initialised=False)

    detail = CudaMemory(CudaMemory.Params(fraction=0.5)).apply(None, _ctx(CUDA))

    import os

    assert os.environ[runtime.ALLOC_CONF] == "max_split_size_mb:64,expandable_segments:True"
    assert ("settings", "expandable_segments:True") in fake.calls
    assert ("fraction", (0.5, 1)) in fake.calls  # the run's device is cuda:1
    assert ("empty_cache", None) not in fake.calls
    assert "before CUDA initialised" in detail and "0.5" in detail


def test_cuda_memory_after_cuda_initialised_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ALLOC_CONF, raising=False)
    fake = _FakeCuda(monkeypatch, initialised=True)

    detail = CudaMemory(CudaMemory.Params(expandable_segments=False)).apply(None, _ctx(CUDA))

    assert ("settings", "expandable_segments:False") in fake.calls
    assert ("empty_cache", None) in fake.calls
    assert not any(name == "fraction" for name, _ in fake.calls)
    assert "already initialised" in detail


# ---------------------------------------------------------------------------- gates of CUDA-only steps
ACCELERATOR_REASON = "needs an accelerator (CUDA, XPU or MPS) to offload to; this run uses cpu"
STREAM_REASON = "use_stream: true needs a CUDA (or XPU) device"


def test_cuda_only_steps_give_their_reason_on_a_cpu() -> None:
    assert CpuOffload.unavailable_reason(CPU, CpuOffload.Params()) == ACCELERATOR_REASON
    assert SequentialCpuOffload.unavailable_reason(CPU, SequentialCpuOffload.Params()) == ACCELERATOR_REASON
    assert CudaMemory.unavailable_reason(CPU, CudaMemory.Params()) == "needs a CUDA device; this run uses cpu"
    streamed = GroupOffloading.Params(use_stream=True)
    assert STREAM_REASON in GroupOffloading.unavailable_reason(CPU, streamed)
    # ... and none of them on a GPU; group offloading without streams works on a CPU too
    for cls in (CpuOffload, SequentialCpuOffload, CudaMemory):
        assert cls.unavailable_reason(CUDA, cls.Params()) is None
    assert GroupOffloading.unavailable_reason(CUDA, streamed) is None
    assert GroupOffloading.unavailable_reason(CPU, GroupOffloading.Params()) is None


@pytest.mark.parametrize(
    ("steps", "reasons"),
    [
        (["cuda_memory", "cpu_offload"], ["needs a CUDA device", ACCELERATOR_REASON]),
        (["sequential_cpu_offload"], [ACCELERATOR_REASON]),
        ([{"group_offloading": {"use_stream": True}}], [STREAM_REASON]),
    ],
)
def test_a_run_skips_cuda_only_steps_and_records_why(tmp_path: Path, steps: list, reasons: list[str]) -> None:
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:tiny-flux"},
            "generate": {"steps": 1, "extra": {"max_sequence_length": 16}},
            "prompts": [PROMPT],
            "on_unavailable": "skip",
            "optimize": steps,
        },
    )
    assert record["status"] == "complete"
    assert [entry["status"] for entry in record["plan"]] == ["skipped"] * len(steps)
    for entry, reason in zip(record["plan"], reasons, strict=True):
        assert reason in entry["detail"]


class _OffloadablePipe:
    """Records how the offload steps call diffusers (real offloading needs an accelerator)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def enable_model_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("model", kwargs))

    def enable_sequential_cpu_offload(self, **kwargs: Any) -> None:
        self.calls.append(("sequential", kwargs))


def test_cpu_offloads_target_the_runs_device() -> None:
    pipe = _OffloadablePipe()
    assert "cuda:1" in CpuOffload(CpuOffload.Params()).apply(pipe, _ctx(CUDA))
    SequentialCpuOffload(SequentialCpuOffload.Params()).apply(pipe, _ctx(CUDA))
    assert pipe.calls == [("model", {"device": "cuda:1"}), ("sequential", {"device": "cuda:1"})]
    assert (
        CpuOffload.places_modules and SequentialCpuOffload.places_modules and GroupOffloading.places_modules
    )


# ------------------------------------------------------------------------------------- group_offloading
def test_group_offloading_block_level_hooks_each_block_and_keeps_the_output(baseline) -> None:
    pipe = tiny_pipeline("unet")
    detail = GroupOffloading(GroupOffloading.Params()).apply(pipe, _ctx())

    hooks = _hooks(pipe.unet)
    # one group per top-level block, plus the module itself for the layers outside any block list
    for block in ("down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"):
        assert hooks.get(block) == [GROUP_HOOK]
    assert GROUP_HOOK in hooks[""]
    assert not any(name.startswith("down_blocks.0.") for name in hooks)  # blocks move as a whole
    for component in ("vae", "text_encoder"):  # every torch-module component by default
        assert any(GROUP_HOOK in names for names in _hooks(getattr(pipe, component)).values())
    assert "block_level" in detail and "nothing moves" in detail
    np.testing.assert_allclose(_generate(pipe), baseline("unet"), atol=1e-6)


def test_group_offloading_leaf_level_on_chosen_components(baseline) -> None:
    pipe = tiny_pipeline("transformer")
    params = GroupOffloading.Params(offload_type="leaf_level", components=["transformer"])
    GroupOffloading(params).apply(pipe, _ctx())

    hooks = _hooks(pipe.transformer)
    leaves = [
        name
        for name, m in pipe.transformer.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.LayerNorm)
        and next(m.parameters(), None) is not None
    ]
    assert leaves and all(hooks.get(name, []).count(GROUP_HOOK) == 1 for name in leaves)
    assert _hooks(pipe.text_encoder) == {}  # not among the chosen components
    np.testing.assert_allclose(_generate(pipe), baseline("transformer"), atol=1e-6)


def test_group_offloading_params_and_unknown_component() -> None:
    with pytest.raises(ValueError):
        GroupOffloading.Params(num_blocks_per_group=0)
    with pytest.raises(ValueError):
        GroupOffloading.Params(offload_type="model_level")
    step = GroupOffloading(GroupOffloading.Params(components=["unet"]))
    with pytest.raises(RuntimeError, match="no torch-module component 'unet'"):
        step.apply(tiny_pipeline("transformer"), _ctx())


# ------------------------------------------------------------------------------------ layerwise_casting
@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_layerwise_casting_stores_weights_in_fp8(kind: str, baseline) -> None:
    pipe = tiny_pipeline(kind)
    denoiser = pipe.unet if kind == "unet" else pipe.transformer
    detail = LayerwiseCasting(LayerwiseCasting.Params()).apply(pipe, _ctx())

    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    fp8 = [m for m in linears if m.weight.dtype == torch.float8_e4m3fn]
    assert len(fp8) >= 0.8 * len(linears)  # diffusers keeps norms, embeddings, proj_in/out in fp32
    assert CASTING_HOOK in _hooks(fp8[0])[""]
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float32  # only the denoiser by default
    assert "float8_e4m3fn storage, float32 compute" in detail

    difference = np.abs(_generate(pipe) - baseline(kind))
    assert difference.max() <= FP8_MAX and difference.mean() <= FP8_MEAN


def test_layerwise_casting_e5m2_on_a_named_component_and_the_compute_dtype_check() -> None:
    pipe = tiny_pipeline("transformer")
    LayerwiseCasting(LayerwiseCasting.Params(storage_dtype="float8_e5m2", components=["vae"])).apply(
        pipe, _ctx()
    )
    assert any(p.dtype == torch.float8_e5m2 for p in pipe.vae.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())

    # Activations arrive in float32: a bfloat16 compute dtype would fail inside the first layer.
    mismatched = LayerwiseCasting(LayerwiseCasting.Params(compute_dtype="bfloat16"))
    with pytest.raises(RuntimeError, match="compute_dtype bfloat16 differs from the dtype of transformer"):
        mismatched.apply(tiny_pipeline("transformer"), _ctx())


# ---------------------------------------------------------------------------------------- channels_last
def test_channels_last_lays_out_conv_weights_nhwc(baseline) -> None:
    pipe = tiny_pipeline("unet")
    detail = ChannelsLast(ChannelsLast.Params()).apply(pipe, _ctx())

    for component in (pipe.unet, pipe.vae):  # default: denoiser + VAE
        convs = [p for p in component.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)
    assert "unet (" in detail and "vae (" in detail
    np.testing.assert_allclose(_generate(pipe), baseline("unet"), atol=1e-5)


# ------------------------------------------------------------------------------------------------ rules
OFFLOADS = ["cpu_offload", "sequential_cpu_offload", "group_offloading"]


@pytest.mark.parametrize(
    ("first", "second"), [(a, b) for a in OFFLOADS for b in OFFLOADS if a != b], ids=lambda s: s
)
def test_offloads_conflict_with_each_other(
    registry: Registry, tmp_path: Path, first: str, second: str
) -> None:
    message = _rule_message(registry, tmp_path, f"  - {first}\n  - {second}\n")
    assert f"step '{second}' conflicts with '{first}'" in message


@pytest.mark.parametrize("weights_step", ["channels_last", "layerwise_casting", "fuse_qkv", "quantize"])
@pytest.mark.parametrize("offload", OFFLOADS)
def test_offloads_come_after_steps_that_change_weights(
    registry: Registry, tmp_path: Path, offload: str, weights_step: str
) -> None:
    message = _rule_message(registry, tmp_path, f"  - {offload}\n  - {weights_step}\n")
    assert f"step '{weights_step}' must come before '{offload}'" in message
    assert_valid_order(registry, message, {offload, weights_step})
    # the suggested order plans cleanly
    _plan(registry, tmp_path, f"  - {weights_step}\n  - {offload}\n")


@pytest.mark.parametrize("step", [*OFFLOADS, "layerwise_casting"])
def test_compile_comes_after_module_rewriting_memory_steps(
    registry: Registry, tmp_path: Path, step: str
) -> None:
    message = _rule_message(registry, tmp_path, f"  - compile\n  - {step}\n")
    assert f"step '{step}' must come before 'compile'" in message
    assert_valid_order(registry, message, {step, "compile"})


def test_channels_last_has_no_order_rule_with_compile(registry: Registry, tmp_path: Path) -> None:
    # compile traces at the first pipeline call, after every step: the layout it sees is the same.
    plan = _plan(registry, tmp_path, "  - compile\n  - channels_last\n")
    assert [s.name for s in plan.steps] == ["compile", "channels_last"]


def test_a_full_memory_recipe_in_a_valid_order_plans(registry: Registry, tmp_path: Path) -> None:
    steps = "  - channels_last\n  - layerwise_casting\n  - group_offloading\n  - compile\n"
    plan = _plan(registry, tmp_path, steps, model="dgrun:tiny-sd")
    assert all(s.outlook() == "will apply" for s in plan.steps)
