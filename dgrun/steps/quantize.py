"""Weight quantization of pipeline components: torchao, optimum-quanto, bitsandbytes, GGUF checkpoints.

A load-stage step, because that is where diffusers quantizes: `load_kwargs` hands `from_pretrained` a
`quantization_config` for the named diffusers components, so a hub or local model is quantized while its
weights stream in (no full-precision copy on the device). torchao and quanto also work on a module that is
already loaded, so `apply` (right after load) quantizes in place whatever is not quantized yet: built-in
`dgrun:` models, which are built in code, and text encoders. bitsandbytes quantizes only while loading, on
CUDA/XPU. A GGUF file is already quantized: `apply` swaps the loaded component for the one in the file
(diffusers dequantizes GGUF weights with plain torch ops, so this works on a CPU too; the full-precision
component is loaded first, so peak memory is not lower than without the step).

Being load-stage, quantize runs before every pipeline step whatever the recipe order, hence its conflicts:
- `fuse_qkv` concatenates the q/k/v weights of each attention: torchao's Int8Tensor has no `aten.cat`
  (NotImplementedError), and with quanto the fused projection comes out as a plain float Linear, silently
  unquantized (both measured on the tiny pipelines);
- `layerwise_casting` also decides how weights are stored: it cannot re-cast quanto's weight tensors, and
  torchao cannot quantize fp8-stored weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from dgrun.hookspecs import hookimpl
from dgrun.optimizer import (
    TAG_CHANGES_WEIGHTS,
    TAG_REWRITES_MODULES,
    ApplyContext,
    ComponentNames,
    Environment,
    ModelKind,
    Optimizer,
    PlanView,
    Stage,
    StepEffect,
    StepParams,
)
from dgrun.steps.denoiser import components, denoiser_name

Backend = Literal["torchao", "quanto", "bitsandbytes", "gguf"]

# torchao method name -> (config class in torchao.quantization, device kinds it runs on; empty = any).
TORCHAO_METHODS: dict[str, tuple[str, frozenset[str]]] = {
    "int8_weight_only": ("Int8WeightOnlyConfig", frozenset()),
    "int8_dynamic_activation_int8_weight": ("Int8DynamicActivationInt8WeightConfig", frozenset()),
    "float8_weight_only": ("Float8WeightOnlyConfig", frozenset()),
    "float8_dynamic_activation_float8_weight": (
        "Float8DynamicActivationFloat8WeightConfig",
        frozenset({"cuda", "xpu"}),
    ),
    "int4_weight_only": ("Int4WeightOnlyConfig", frozenset({"cuda"})),
}
# quanto method name -> diffusers' QuantoConfig `weights_dtype`.
QUANTO_METHODS = {"qint8": "int8", "qfloat8": "float8", "qint4": "int4", "qint2": "int2"}
BNB_METHODS = ("int8", "nf4", "fp4")
METHODS: dict[str, tuple[str, ...]] = {
    "torchao": tuple(TORCHAO_METHODS),
    "quanto": tuple(QUANTO_METHODS),
    "bitsandbytes": BNB_METHODS,
    "gguf": (),
}
DEFAULT_METHOD = {"torchao": "int8_weight_only", "quanto": "qint8", "bitsandbytes": "nf4"}
# Import names, for the availability check (`Environment.has_package` handles dotted names).
PACKAGES = {"torchao": "torchao", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes", "gguf": "gguf"}
# Components that are transformers models, not diffusers ones: diffusers' quantization configs do not
# apply to them at load time.
TRANSFORMERS_PREFIXES = ("text_encoder", "image_encoder")


class QuantizeParams(StepParams):
    backend: Backend = "torchao"
    method: str | None = Field(
        None,
        description="torchao: int8_weight_only (default), int8_dynamic_activation_int8_weight, "
        "float8_weight_only, ...; quanto: qint8 (default), qfloat8, qint4, qint2; "
        "bitsandbytes: nf4 (default), fp4, int8; gguf: none (the file says)",
    )
    components: ComponentNames | None = Field(None, description="default: the denoiser (unet or transformer)")
    checkpoint: str | None = Field(
        None, min_length=1, description="gguf only: path or URL of the .gguf file of the component"
    )

    @model_validator(mode="after")
    def _method_fits_backend(self) -> QuantizeParams:
        if self.backend == "gguf":
            if self.method is not None:
                raise ValueError("gguf takes no method: the quantization type is stored in the file")
            if self.checkpoint is None:
                raise ValueError("gguf needs `checkpoint`: the .gguf file of the component")
            if not self.checkpoint.lower().endswith(".gguf") or any(ord(c) < 32 for c in self.checkpoint):
                raise ValueError("`checkpoint` must name a .gguf file (a local path or an https URL)")
            if "://" in self.checkpoint and not self.checkpoint.startswith("https://"):
                raise ValueError("`checkpoint` URLs must be https://")
            if self.components is not None and len(self.components) != 1:
                raise ValueError("gguf loads one component from its checkpoint: give one name in components")
            return self
        if self.checkpoint is not None:
            raise ValueError(f"`checkpoint` is for the gguf backend only, not {self.backend}")
        if self.method is None:
            self.method = DEFAULT_METHOD[self.backend]
        elif self.method not in METHODS[self.backend]:
            raise ValueError(
                f"{self.backend} has no method {self.method!r}; known: {', '.join(METHODS[self.backend])}"
            )
        return self


def quantized_layers(module: Any) -> tuple[int, int]:
    """(quantized, all) Linear layers of `module`.

    Every backend leaves a weight that is no plain Parameter: a torchao tensor subclass, quanto's
    WeightQBytesTensor (in a QLinear), bitsandbytes' Int8Params/Params4bit, a GGUFParameter.
    """
    import torch

    plain = (torch.nn.Parameter, torch.Tensor)
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return sum(1 for m in linears if type(m.weight) not in plain), len(linears)


class Quantize(Optimizer[QuantizeParams]):
    """Store the weights of the chosen components in 8 (or fewer) bits: less memory, often faster matmuls.

    Tagged `rewrites_modules` (quanto replaces Linear layers, torchao swaps their weights): compile comes
    after it.
    """

    name = "quantize"
    summary = "weight quantization per component (torchao, quanto; bitsandbytes, gguf)"
    Params = QuantizeParams
    stage = Stage.LOAD
    tags = frozenset({TAG_REWRITES_MODULES, TAG_CHANGES_WEIGHTS})
    conflicts = frozenset({"fuse_qkv", "layerwise_casting"})

    @classmethod
    def unavailable_reason(cls, env: Environment, params: StepParams | None = None) -> str | None:
        backend = params.backend if isinstance(params, QuantizeParams) else "torchao"
        package = PACKAGES[backend]
        if not env.has_package(package):
            return f"the {backend} backend needs the package {package} (not installed)"
        if backend == "bitsandbytes" and env.device_kind not in ("cuda", "xpu"):
            return (
                "bitsandbytes quantizes while loading onto a CUDA (or XPU) device; this run uses "
                f"{env.device_kind} (torchao or quanto work here)"
            )
        if backend == "torchao" and isinstance(params, QuantizeParams):
            devices = TORCHAO_METHODS[params.method][1]
            if devices and env.device_kind not in devices:
                kinds = " or ".join(d.upper() for d in sorted(devices))
                return f"torchao {params.method} needs a {kinds} device; this run uses {env.device_kind}"
            capability = env.cuda_capability
            if params.method.startswith("float8_dynamic") and capability is not None and capability < (8, 9):
                have = ".".join(map(str, capability))
                return f"torchao {params.method} needs compute capability 8.9+; this GPU has {have}"
            if params.method == "int4_weight_only" and not env.has_package("mslk"):
                return "torchao int4_weight_only packs weights with the package mslk (not installed)"
        return None

    @classmethod
    def combination_problem(cls, params: StepParams, plan: PlanView) -> str | None:
        if not isinstance(params, QuantizeParams):
            return None
        if params.backend == "quanto" and plan.named("group_offloading"):
            return (
                "diffusers' group offloading moves plain tensors between devices and cannot move quanto's "
                "quantized weights; use the torchao backend with group_offloading"
            )
        dtype = plan.recipe.model.dtype if plan.recipe is not None else "auto"
        if (
            params.backend == "torchao"
            and params.method == "int4_weight_only"
            and dtype not in ("bfloat16", "auto")
        ):
            return (
                f"torchao int4_weight_only computes with bfloat16 activations; model.dtype is {dtype}: "
                "set model.dtype: bfloat16"
            )
        return None

    def effect(self, pipe: Any) -> StepEffect | None:
        names = self.params.components or [denoiser_name(pipe)]
        counts = {name: quantized_layers(module) for name, module in components(pipe, names)}
        quantized = sum(q for q, _ in counts.values())
        total = sum(t for _, t in counts.values())
        counters = {"quantized_linear_layers": quantized, "linear_layers": total}
        summary = ", ".join(f"{name} {q}/{t} Linear layers" for name, (q, t) in counts.items())
        if quantized == 0:
            return StepEffect(counters, summary, no_effect="no Linear layer holds quantized weights")
        return StepEffect(counters, summary)

    # ---------------------------------------------------------------------------------------- load time
    def _targets(self, model_kind: ModelKind | None) -> list[str]:
        """Components to quantize before the pipeline exists (kind unknown for hub ids: both names)."""
        if self.params.components:
            return list(self.params.components)
        if model_kind is ModelKind.UNET:
            return ["unet"]
        if model_kind is ModelKind.TRANSFORMER:
            return ["transformer"]
        return ["transformer", "unet"]  # diffusers skips (and logs) the one the pipeline lacks

    def load_kwargs(self, ctx: ApplyContext) -> dict[str, Any]:
        if self.params.backend == "gguf":
            return {}
        mapping = {}
        for name in self._targets(ctx.model_kind):
            config = self._load_config(name, ctx)
            if config is not None:
                mapping[name] = config
        if not mapping:
            return {}
        from diffusers.quantizers import PipelineQuantizationConfig

        # quant_mapping, not quant_backend: diffusers 0.42 rejects the short form next to transformers 5
        # ("signatures of the __init__ methods ... don't match").
        return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}

    def _load_config(self, name: str, ctx: ApplyContext) -> Any:
        """diffusers' (or, for text encoders, transformers') quantization config for one component."""
        backend, method = self.params.backend, self.params.method
        is_transformers = name.startswith(TRANSFORMERS_PREFIXES)
        if backend == "bitsandbytes":
            if is_transformers:
                from transformers import BitsAndBytesConfig
            else:
                from diffusers import BitsAndBytesConfig
            if method == "int8":
                return BitsAndBytesConfig(load_in_8bit=True)
            return BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=ctx.dtype
            )
        if is_transformers:
            return None  # torchao / quanto: quantized in place by `apply`
        if backend == "torchao":
            from diffusers import TorchAoConfig

            return TorchAoConfig(_torchao_config(method))
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=QUANTO_METHODS[method])

    # ---------------------------------------------------------------------------------------- after load
    def apply(self, pipe: Any, ctx: ApplyContext) -> str | None:
        if self.params.backend == "gguf":
            return self._swap_in_gguf(pipe, ctx)
        names = self.params.components or [denoiser_name(pipe)]
        done = []
        for name, module in components(pipe, names):
            when = "at load"
            quantized, total = quantized_layers(module)
            if quantized == 0:
                self._quantize_in_place(name, module)
                when = "in place"
                quantized, total = quantized_layers(module)
            if quantized == 0:
                raise RuntimeError(
                    f"{self.params.backend} quantized none of the {total} Linear layers of {name}"
                )
            done.append(f"{name} {quantized}/{total} Linear layers ({when})")
        return f"{self.params.backend} {self.params.method}: {', '.join(done)}"

    def _quantize_in_place(self, name: str, module: Any) -> None:
        backend, method = self.params.backend, self.params.method
        if backend == "torchao":
            from torchao.quantization import quantize_

            quantize_(module, _torchao_config(method))
        elif backend == "quanto":
            from optimum import quanto

            quanto.quantize(module, weights=getattr(quanto, method))
            quanto.freeze(module)  # replace the float weights by the quantized ones (else both are kept)
        else:
            raise RuntimeError(
                f"bitsandbytes quantizes while from_pretrained loads the weights, and {name} was not loaded "
                "that way (a built-in dgrun: model is built in code); use torchao or quanto for it"
            )

    def _swap_in_gguf(self, pipe: Any, ctx: ApplyContext) -> str:
        """Replace the component by the same class loaded from the GGUF file, with the loaded one's config.

        The file holds the weights (already quantized, diffusers or original key names); the config comes
        from the component in hand, so no hub access is needed.
        """
        from diffusers import GGUFQuantizationConfig

        name, module = components(pipe, self.params.components)[0]
        if not hasattr(type(module), "from_single_file"):
            raise RuntimeError(f"{type(module).__name__} ({name}) cannot load a single-file GGUF checkpoint")
        device = next(module.parameters()).device
        with tempfile.TemporaryDirectory() as config_dir:
            module.save_config(config_dir)
            replacement = type(module).from_single_file(
                self.params.checkpoint,
                config=config_dir,
                quantization_config=GGUFQuantizationConfig(compute_dtype=ctx.dtype),
                dtype=ctx.dtype,
            )
        pipe.register_modules(**{name: replacement.to(device)})
        quantized, total = quantized_layers(replacement)
        return (
            f"gguf: {name} loaded from {self.params.checkpoint} ({quantized}/{total} Linear layers quantized)"
        )


def _torchao_config(method: str) -> Any:
    import torchao.quantization

    return getattr(torchao.quantization, TORCHAO_METHODS[method][0])()


@hookimpl
def dgrun_register_optimizers(register: Callable[[type], None]) -> None:
    register(Quantize)
