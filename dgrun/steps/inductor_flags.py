"""The inductor flags a recipe may set: an allowlist of performance knobs, each with its type.

torch._inductor.config also holds flags that name programs and places: `cpp.cxx` is the C++ compiler
inductor runs (a recipe naming a script there made inductor execute it), `trace.debug_dir` and the other
`*_dir` / `*_path` flags choose where it writes. A recipe is untrusted input, so only knobs that change
how fast the generated code runs are accepted: booleans, bounded numbers and enumerated strings. Anything
else (unknown, misspelt, or a path, command or directory) is a `dgrun check` error at the flag's line.
Each name was checked against torch 2.13's `torch._inductor.config`; `compile` checks again at apply time
that the installed torch still knows it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_serializer

from dgrun.optimizer import StepParams

Radius = Annotated[int, Field(ge=1, le=16)]

# max_autotune_gemm_backends / max_autotune_conv_backends: a comma-separated subset of these, in any order.
GemmBackends = Literal[
    "ATEN",
    "TRITON",
    "CPP",
    "ATEN,TRITON",
    "ATEN,CPP",
    "TRITON,CPP",
    "ATEN,TRITON,CPP",
]
ConvBackends = Literal["ATEN", "TRITON", "ATEN,TRITON"]

UNKNOWN_FLAG_HINT = (
    "dgrun allows inductor's performance knobs only (no compilers, paths or directories); "
    "`dgrun steps compile` lists them"
)


def _flag(description: str, alias: str | None = None) -> Any:
    return Field(None, alias=alias, description=description)


class InductorFlags(StepParams):
    """`compile.inductor`: torch._inductor.config flags for one compile (names as torch spells them)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, serialize_by_alias=True)
    unknown_key_hint: ClassVar[str] = UNKNOWN_FLAG_HINT  # for the planner's "unknown parameter" message

    # Autotuning
    max_autotune: bool | None = _flag("benchmark several kernels per op and keep the fastest")
    max_autotune_pointwise: bool | None = _flag("autotune pointwise kernels")
    max_autotune_gemm: bool | None = _flag("autotune matmul kernels")
    max_autotune_gemm_backends: GemmBackends | None = _flag("matmul kernel families to autotune over")
    max_autotune_gemm_search_space: Literal["DEFAULT", "EXHAUSTIVE"] | None = _flag("matmul configs tried")
    max_autotune_conv_backends: ConvBackends | None = _flag("convolution kernel families to autotune over")
    coordinate_descent_tuning: bool | None = _flag("tune kernel block sizes by coordinate descent")
    coordinate_descent_check_all_directions: bool | None = _flag("coordinate descent tries every direction")
    coordinate_descent_search_radius: Radius | None = _flag("coordinate descent step radius")
    benchmark_fusion: bool | None = _flag("benchmark before fusing kernels")
    benchmark_epilogue_fusion: bool | None = _flag("benchmark before fusing matmul epilogues")
    # Fusion and graph passes
    epilogue_fusion: bool | None = _flag("fuse pointwise ops into matmul epilogues")
    epilogue_fusion_first: bool | None = _flag("fuse epilogues before other fusions")
    aggressive_fusion: bool | None = _flag("fuse even without shared memory reads")
    group_fusion: bool | None = _flag("batch independent same-shape ops")
    permute_fusion: bool | None = _flag("fuse permutes into matmuls")
    pattern_matcher: bool | None = _flag("run inductor's pattern-rewrite passes")
    max_fusion_size: Annotated[int, Field(ge=1, le=4096)] | None = _flag("most nodes in one fused kernel")
    unroll_reductions_threshold: Annotated[int, Field(ge=0, le=1024)] | None = _flag(
        "unroll reductions up to this size"
    )
    realize_opcount_threshold: Annotated[int, Field(ge=1, le=100_000)] | None = _flag(
        "ops before a buffer is materialised"
    )
    split_reductions: bool | None = _flag("split large reductions across blocks")
    reorder_for_locality: bool | None = _flag("reorder nodes for cache locality")
    joint_graph_constant_folding: bool | None = _flag("fold constants in the joint graph")
    optimize_scatter_upon_const_tensor: bool | None = _flag("rewrite scatters into constant tensors")
    decompose_mem_bound_mm: bool | None = _flag("decompose memory-bound matmuls into pointwise ops")
    b2b_gemm_pass: bool | None = _flag("fuse back-to-back matmuls")
    conv_1x1_as_mm: bool | None = _flag("run 1x1 convolutions as matmuls")
    force_fuse_int_mm_with_mul: bool | None = _flag("fuse int8 matmul with the following multiply")
    use_mixed_mm: bool | None = _flag("mixed-dtype matmul kernels")
    freezing: bool | None = _flag("treat parameters as constants (inference only)")
    # Layout and precision
    layout_optimization: bool | None = _flag("choose channels-last layouts for convolutions")
    keep_output_stride: bool | None = _flag("keep eager output strides")
    shape_padding: bool | None = _flag("pad matmul shapes to aligned sizes")
    comprehensive_padding: bool | None = _flag("pad strides of all tensors")
    emulate_precision_casts: bool | None = _flag("round intermediates like eager low precision")
    size_asserts: bool | None = _flag("check tensor sizes at kernel boundaries")
    # Triton (GPU)
    triton_cudagraphs: bool | None = _flag("CUDA graphs around compiled code", "triton.cudagraphs")
    triton_cudagraph_trees: bool | None = _flag("CUDA graph trees", "triton.cudagraph_trees")
    triton_cudagraph_skip_dynamic_graphs: bool | None = _flag(
        "no CUDA graphs for graphs with dynamic shapes", "triton.cudagraph_skip_dynamic_graphs"
    )
    triton_autotune_pointwise: bool | None = _flag(
        "autotune pointwise Triton kernels", "triton.autotune_pointwise"
    )
    triton_autotune_cublasLt: bool | None = _flag("autotune cuBLASLt epilogues", "triton.autotune_cublasLt")
    triton_max_tiles: Annotated[int, Field(ge=1, le=3)] | None = _flag(
        "most tiling dimensions", "triton.max_tiles"
    )
    triton_persistent_reductions: bool | None = _flag("persistent reductions", "triton.persistent_reductions")
    triton_divisible_by_16: bool | None = _flag("assume 16-divisible sizes", "triton.divisible_by_16")
    triton_use_block_ptr: bool | None = _flag("Triton block pointers", "triton.use_block_ptr")
    triton_enable_persistent_tma_matmul: bool | None = _flag(
        "persistent TMA matmul kernels (Hopper+)", "triton.enable_persistent_tma_matmul"
    )
    # C++ (CPU)
    cpp_threads: Annotated[int, Field(ge=-1, le=4096)] | None = _flag(
        "threads of CPU kernels (-1: torch's)", "cpp.threads"
    )
    cpp_dynamic_threads: bool | None = _flag("choose CPU kernel threads at run time", "cpp.dynamic_threads")
    cpp_simdlen: Literal[0, 128, 256, 512] | None = _flag("SIMD width of CPU kernels in bits", "cpp.simdlen")
    cpp_min_chunk_size: Annotated[int, Field(ge=1, le=1 << 20)] | None = _flag(
        "smallest chunk a CPU thread takes", "cpp.min_chunk_size"
    )
    cpp_weight_prepack: bool | None = _flag("prepack weights for CPU matmuls", "cpp.weight_prepack")
    cpp_enable_tiling_heuristics: bool | None = _flag(
        "tiling heuristics for CPU kernels", "cpp.enable_tiling_heuristics"
    )
    cpp_enable_floating_point_contract_flag: Literal["off", "on", "fast"] | None = _flag(
        "fused multiply-add contraction in CPU kernels", "cpp.enable_floating_point_contract_flag"
    )

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        """Records and `options` carry the flags the recipe set, under torch's names."""
        return {key: value for key, value in handler(self).items() if value is not None}

    def options(self) -> dict[str, Any]:
        """The flags as torch.compile's `options` (torch's dotted names)."""
        return self.model_dump(by_alias=True)

    @classmethod
    def names(cls) -> list[str]:
        """Every allowed flag, as recipes spell it."""
        return [field.alias or name for name, field in cls.model_fields.items()]
