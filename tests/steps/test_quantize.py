"""The `quantize` step on the tiny offline pipelines: torchao and quanto (in place and at load), GGUF
checkpoints, the bitsandbytes gate, params, and its rules.

"Quantized" is shown on the weights themselves: their tensor subclass and the dtype of the stored data
(int8 / fp8 instead of float32). Images (0–1 floats, fixed seed) stay within QUANT_MAX of an untouched
pipeline's: measured 0.002–0.006 for int8 on these random-weight models, 0.017 for fp8 weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun.optimizer import Environment, ModelKind  # noqa: E402
from dgrun.steps.quantize import Quantize, quantized_layers  # noqa: E402
from dgrun.testing import (  # noqa: E402
    apply_context,
    generate_array,
    plan_problem,
    plan_steps,
    run_recipe_data,
    tiny_pipeline,
)

CPU = Environment(device="cpu", device_kind="cpu")
CUDA = Environment(device="cuda", device_kind="cuda", cuda_capability=(9, 0))
PROMPT = "a red circle on a blue background"
STEPS = 2
QUANT_MAX = 0.05


def _close(pipe: Any, reference: np.ndarray) -> None:
    assert np.abs(generate_array(pipe, PROMPT, STEPS) - reference).max() <= QUANT_MAX


# ---------------------------------------------------------------------------------------------- torchao
def test_torchao_int8_weight_only_quantizes_the_denoisers_linears(baseline) -> None:
    pytest.importorskip("torchao")
    pipe = tiny_pipeline("unet")  # the default components (the denoiser) suit UNet pipelines as well
    step = Quantize(Quantize.Params())  # defaults: torchao int8_weight_only
    assert step.params.method == "int8_weight_only"

    detail = step.apply(pipe, apply_context("unet"))

    linear = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    weight = linear.weight
    assert type(weight).__module__.startswith("torchao")  # a torchao tensor subclass
    assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == weight.shape
    quantized, total = quantized_layers(pipe.unet)
    assert quantized == total > 0
    assert quantized_layers(pipe.text_encoder)[0] == 0  # other components untouched by default
    assert detail == f"torchao int8_weight_only: unet {total}/{total} Linear layers (in place)"
    _close(pipe, baseline("unet", PROMPT, STEPS))


def test_torchao_quantizes_a_text_encoder_too(baseline) -> None:
    pytest.importorskip("torchao")
    pipe = tiny_pipeline("transformer")
    Quantize(Quantize.Params(components=["transformer", "text_encoder"])).apply(
        pipe, apply_context("transformer")
    )
    assert quantized_layers(pipe.text_encoder)[0] > 0
    _close(pipe, baseline("transformer", PROMPT, STEPS))


# ----------------------------------------------------------------------------------------------- quanto
def test_quanto_replaces_linears_and_freezes_their_weights(baseline) -> None:
    pytest.importorskip("optimum.quanto")
    pipe = tiny_pipeline("transformer")
    Quantize(Quantize.Params(backend="quanto")).apply(pipe, apply_context("transformer"))

    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(linear).__name__ == "QLinear"
    assert linear.weight._data.dtype == torch.int8  # frozen: the int8 data, no float copy kept
    assert quantized_layers(pipe.transformer)[0] == quantized_layers(pipe.transformer)[1]
    _close(pipe, baseline("transformer", PROMPT, STEPS))


def test_quanto_qfloat8_stores_fp8_weights() -> None:
    pytest.importorskip("optimum.quanto")
    pipe = tiny_pipeline("transformer")
    Quantize(Quantize.Params(backend="quanto", method="qfloat8")).apply(pipe, apply_context("transformer"))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight._data.dtype == torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------- load time
def test_a_local_model_is_quantized_while_it_loads(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    tiny_pipeline("transformer").save_pretrained(tmp_path / "model")
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": str(tmp_path / "model")},
            "generate": {"steps": 1, "extra": {"max_sequence_length": 16}},
            "prompts": [PROMPT],
            "optimize": ["quantize"],
        },
    )
    assert record["status"] == "complete"
    entry = record["plan"][0]
    assert (entry["stage"], entry["status"]) == ("load", "applied")
    assert "transformer" in entry["detail"] and "(at load)" in entry["detail"]


def test_load_kwargs_map_the_denoiser_and_leave_text_encoders_to_apply() -> None:
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig

    def mapping(params: Any, kind: ModelKind | None) -> dict[str, Any]:
        kwargs = Quantize(params).load_kwargs(replace(apply_context(), model_kind=kind))
        return kwargs["quantization_config"].quant_mapping if kwargs else {}

    assert set(mapping(Quantize.Params(), ModelKind.UNET)) == {"unet"}
    assert set(mapping(Quantize.Params(), ModelKind.TRANSFORMER)) == {"transformer"}
    assert set(mapping(Quantize.Params(), None)) == {"transformer", "unet"}  # hub id: kind not known yet
    chosen = mapping(Quantize.Params(components=["transformer", "text_encoder_2"]), None)
    assert set(chosen) == {"transformer"} and isinstance(chosen["transformer"], TorchAoConfig)
    assert mapping(Quantize.Params(components=["text_encoder"]), None) == {}


# ------------------------------------------------------------------------------------------------- gguf
def _write_gguf(module: Any, path: Path) -> None:
    """A GGUF file of `module`'s state dict (diffusers key names), Q8_0 where the row length allows."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="dgrun-test")
    for key, tensor in module.state_dict().items():
        array = tensor.float().numpy()
        if key.endswith(".weight") and array.ndim == 2 and array.shape[1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_swaps_in_the_quantized_component(tmp_path: Path, baseline) -> None:
    pytest.importorskip("gguf")
    pipe = tiny_pipeline("transformer")
    _write_gguf(pipe.transformer, tmp_path / "transformer.gguf")
    step = Quantize(Quantize.Params(backend="gguf", checkpoint=str(tmp_path / "transformer.gguf")))

    detail = step.apply(pipe, apply_context("transformer"))

    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(linear).__name__ == "GGUFLinear"
    assert type(linear.weight).__name__ == "GGUFParameter" and linear.weight.dtype == torch.uint8
    assert "transformer loaded from" in detail
    _close(pipe, baseline("transformer", PROMPT, STEPS))


# --------------------------------------------------------------------------------- params, availability
def test_params_default_and_check_the_method_per_backend() -> None:
    assert Quantize.Params(backend="quanto").method == "qint8"
    assert Quantize.Params(backend="bitsandbytes").method == "nf4"
    for bad in (
        {"backend": "quanto", "method": "int8_weight_only"},
        {"backend": "torchao", "method": "qint8"},
        {"backend": "gguf"},  # no checkpoint
        {"backend": "gguf", "checkpoint": "x.gguf", "method": "q8_0"},
        {"backend": "torchao", "checkpoint": "x.gguf"},
        {"backend": "awq"},
    ):
        with pytest.raises(ValueError):
            Quantize.Params(**bad)


def test_availability_names_the_missing_package_or_device(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = {"optimum.quanto", "bitsandbytes"}
    monkeypatch.setattr(Environment, "has_package", staticmethod(lambda name: name not in missing))

    quanto = Quantize.Params(backend="quanto")
    assert Quantize.unavailable_reason(CPU, quanto) == (
        "the quanto backend needs the package optimum.quanto (not installed)"
    )
    assert "needs the package bitsandbytes" in Quantize.unavailable_reason(
        CUDA, Quantize.Params(backend="bitsandbytes")
    )
    missing.clear()
    assert Quantize.unavailable_reason(CPU, quanto) is None
    bnb_reason = Quantize.unavailable_reason(CPU, Quantize.Params(backend="bitsandbytes"))
    assert "CUDA" in bnb_reason and "this run uses cpu" in bnb_reason
    assert Quantize.unavailable_reason(CUDA, Quantize.Params(backend="bitsandbytes")) is None
    fp8_dynamic = Quantize.Params(method="float8_dynamic_activation_float8_weight")
    assert "needs a CUDA or XPU device" in Quantize.unavailable_reason(CPU, fp8_dynamic)
    assert Quantize.unavailable_reason(CUDA, fp8_dynamic) is None
    ampere = Environment(device="cuda", device_kind="cuda", cuda_capability=(8, 0))
    assert "8.9+" in Quantize.unavailable_reason(ampere, fp8_dynamic)
    assert Quantize.unavailable_reason(CPU, Quantize.Params(method="float8_weight_only")) is None


def test_the_planner_gates_a_missing_backend_by_package_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(Environment, "has_package", staticmethod(lambda name: name != "optimum.quanto"))
    step = plan_steps(tmp_path, "  - quantize: {backend: quanto}\n", CPU, model="dgrun:tiny-sd").steps[0]
    assert (
        step.outlook()
        == "will fail here: the quanto backend needs the package optimum.quanto (not installed)"
    )


def test_find_spec_handles_dotted_import_names() -> None:
    assert Environment.has_package("dgrun.steps") is True
    assert Environment.has_package("no_such_package.quanto") is False


def test_a_run_skips_bitsandbytes_on_a_cpu_and_records_why(tmp_path: Path) -> None:
    record = run_recipe_data(
        tmp_path,
        {
            "model": {"id": "dgrun:tiny-flux"},
            "generate": {"steps": 1, "extra": {"max_sequence_length": 16}},
            "prompts": [PROMPT],
            "optimize": [{"quantize": {"backend": "bitsandbytes", "on_unavailable": "skip"}}],
        },
    )
    entry = record["plan"][0]
    assert record["status"] == "complete" and entry["status"] == "skipped"
    assert "bitsandbytes" in entry["detail"]


def test_bitsandbytes_on_a_model_built_in_code_is_a_clear_error() -> None:
    step = Quantize(Quantize.Params(backend="bitsandbytes"))
    with pytest.raises(RuntimeError, match="bitsandbytes quantizes while from_pretrained loads"):
        step.apply(tiny_pipeline("transformer"), apply_context("transformer"))


# ------------------------------------------------------------------------------------------------ rules
def _rule_message(tmp_path: Path, steps: list[str]) -> str:
    """The one problem of planning these steps on tiny-flux."""
    return plan_problem(tmp_path, "".join(f"  - {s}\n" for s in steps), CPU).message


@pytest.mark.parametrize("other", ["fuse_qkv", "layerwise_casting"])
@pytest.mark.parametrize("quantize_first", [True, False])
def test_quantize_conflicts_with_steps_that_rework_its_weights(
    tmp_path: Path, other: str, quantize_first: bool
) -> None:
    steps = ["quantize", other] if quantize_first else [other, "quantize"]
    message = _rule_message(tmp_path, steps)
    assert f"step '{steps[1]}' conflicts with '{steps[0]}'" in message


def test_compile_comes_after_quantize(tmp_path: Path) -> None:
    message = _rule_message(tmp_path, ["compile", "quantize"])
    assert "step 'quantize' must come before 'compile'" in message
    assert message.endswith("a valid order: quantize, compile")
