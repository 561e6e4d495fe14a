"""Tiny offline pipelines: deterministic, quiet about global state, and producing real 32×32 images."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dgrun.models.tiny import build_tiny_flux, build_tiny_sd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILDERS = {"sd": build_tiny_sd, "flux": build_tiny_flux}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(kind: str):
    return BUILDERS[kind]()


def _generate(pipe, prompt: str = "a red cat", steps: int = 2) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np").images[0]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


def test_import_does_not_load_torch() -> None:
    code = "import sys, dgrun.models.tiny; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_builds_are_bit_identical_and_leave_global_rng_alone(kind: str, pipe) -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    again = BUILDERS[kind]()
    assert torch.equal(torch.random.get_rng_state(), state)
    first, second = _weights(pipe), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_default_call_gives_nonconstant_32px_image(pipe) -> None:
    image = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 1.0


def test_prompt_changes_image(pipe) -> None:
    cat, dog = _generate(pipe, "a red cat"), _generate(pipe, "a blue dog")
    assert np.isfinite(cat).all()
    assert np.abs(cat - dog).max() > 1e-3


def test_same_seed_same_image(pipe) -> None:
    np.testing.assert_array_equal(_generate(pipe), _generate(pipe))


@pytest.mark.parametrize("builder", [build_tiny_sd, build_tiny_flux], ids=["sd", "flux"])
def test_bfloat16(builder: Callable) -> None:
    pipe = builder(dtype=torch.bfloat16)
    dtypes = {m.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)}
    assert dtypes == {torch.bfloat16}
    image = _generate(pipe, steps=1)
    assert image.shape == (32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 1e-3
