"""Process-wide settings (`dgrun.steps.runtime`): tf32, cudnn_benchmark, cuda_memory.

They change torch flags and CUDA allocator settings, not the pipeline. CPU builds of torch have the flags
too, so each step is also run as it would run on a CUDA device and the flags are checked both ways; the
CUDA calls themselves are replaced by a recorder. Fixtures put the process-wide flags back after each test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from dgrun.optimizer import Environment  # noqa: E402
from dgrun.steps import runtime  # noqa: E402
from dgrun.steps.runtime import TF32, CudaMemory, CudnnBenchmark, merge_alloc_conf  # noqa: E402
from dgrun.testing import apply_context  # noqa: E402


# ------------------------------------------------------------------------------------------------- tf32
@pytest.fixture
def restore_tf32() -> Iterator[None]:
    """TF32 steps change process-wide torch flags; put them back after the test."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def test_tf32_is_a_recorded_noop_on_cpu(restore_tf32: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    detail = TF32(TF32.Params()).apply(None, apply_context())

    assert isinstance(detail, str) and "no-op" in detail and "cpu" in detail
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_on_cuda_sets_the_process_flags_both_ways(restore_tf32: None) -> None:
    # Only process-wide flags are touched, and CPU builds of torch have them too.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    turing = Environment(device="cuda", device_kind="cuda", cuda_capability=(7, 5))

    detail = TF32(TF32.Params()).apply(None, replace(apply_context(), env=turing))

    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert detail is not None and "7.5" in detail and "no TF32" in detail

    hopper = Environment(device="cuda", device_kind="cuda", cuda_capability=(9, 0))
    assert TF32(TF32.Params(enabled=False)).apply(None, replace(apply_context(), env=hopper)) is None
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"


# -------------------------------------------------------------------------------------- cudnn_benchmark
@pytest.fixture
def restore_cudnn() -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


def test_cudnn_benchmark_is_a_recorded_noop_on_cpu(restore_cudnn: None) -> None:
    torch.backends.cudnn.benchmark = False
    detail = CudnnBenchmark(CudnnBenchmark.Params()).apply(None, apply_context())
    assert detail is not None and "no-op on cpu" in detail
    assert torch.backends.cudnn.benchmark is False


def test_cudnn_benchmark_on_cuda_sets_the_flag_both_ways(restore_cudnn: None) -> None:
    # A process-wide flag that CPU builds of torch have too.
    CudnnBenchmark(CudnnBenchmark.Params()).apply(None, apply_context(device="cuda:1"))
    assert torch.backends.cudnn.benchmark is True
    CudnnBenchmark(CudnnBenchmark.Params(enabled=False)).apply(None, apply_context(device="cuda:1"))
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

    detail = CudaMemory(CudaMemory.Params(fraction=0.5)).apply(None, apply_context(device="cuda:1"))

    assert os.environ[runtime.ALLOC_CONF] == "max_split_size_mb:64,expandable_segments:True"
    assert ("settings", "expandable_segments:True") in fake.calls
    assert ("fraction", (0.5, 1)) in fake.calls  # the run's device is cuda:1
    assert ("empty_cache", None) not in fake.calls
    assert "before CUDA initialised" in detail and "0.5" in detail


def test_cuda_memory_after_cuda_initialised_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ALLOC_CONF, raising=False)
    fake = _FakeCuda(monkeypatch, initialised=True)

    detail = CudaMemory(CudaMemory.Params(expandable_segments=False)).apply(
        None, apply_context(device="cuda:1")
    )

    assert ("settings", "expandable_segments:False") in fake.calls
    assert ("empty_cache", None) in fake.calls
    assert not any(name == "fraction" for name, _ in fake.calls)
    assert "already initialised" in detail
