"""The `deepcache` plugin step on the tiny Stable Diffusion pipeline, applied directly and through a run.

Images are float arrays on a 0–1 scale from a fixed seed; every test builds its own pipeline because the
step rewires the UNet it is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("DeepCache")

from dgrun_deepcache import DeepCache, DeepCacheParams  # noqa: E402

from dgrun.optimizer import Environment  # noqa: E402
from dgrun.testing import apply_context, count_calls, generate_array, tiny_pipeline  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS = 6


def _probes(pipe) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A deep module and a shallow one, each INSIDE a block DeepCache wraps.

    DeepCache replaces the wrapped blocks' `forward`, so a hook on a wrapped block fires even when its output
    comes from the cache; a module inside it only runs when the block really runs.
    """
    deep = pipe.unet.mid_block.resnets[0].conv1
    # The last up block's last resnet is the skip branch 0 keeps: it runs on every step.
    shallow = pipe.unet.up_blocks[-1].resnets[-1].conv1
    return deep, shallow


@pytest.fixture(scope="module")
def baseline() -> tuple[np.ndarray, list[int]]:
    """The untouched pipeline's image, and how often the deep and the shallow probe ran for it."""
    pipe = tiny_pipeline("unet")
    with count_calls(*_probes(pipe)) as counts:
        image = generate_array(pipe, PROMPT, STEPS)
    return image, counts


def test_deepcache_reuses_deep_features_between_full_steps(baseline: tuple[np.ndarray, list[int]]) -> None:
    baseline_image, baseline_counts = baseline
    assert baseline_counts == [STEPS, STEPS]
    pipe = tiny_pipeline("unet")
    unet = pipe.unet

    detail = DeepCache(DeepCacheParams(interval=3)).apply(pipe, apply_context("unet"))

    assert detail == "interval 3, branch 0"
    assert pipe.unet is unet
    with count_calls(*_probes(pipe)) as counts:
        image = generate_array(pipe, PROMPT, STEPS)
    deep, shallow = counts
    assert deep == 2, f"mid block ran {deep} of {STEPS} steps; interval 3 should run it on steps 0 and 3"
    assert shallow == STEPS
    diff = np.abs(image - baseline_image)
    assert diff.max() > 1e-4, "cached deep features did not change the image at all"
    assert diff.mean() < 0.05

    # The runner calls the pipeline several times (warm-up, then batches): each call starts with a full step.
    with count_calls(*_probes(pipe)) as counts_again:
        again = generate_array(pipe, PROMPT, STEPS)
    assert counts_again == counts
    np.testing.assert_allclose(again, image, atol=1e-6, rtol=0)


def test_deepcache_interval_one_runs_every_step(baseline: tuple[np.ndarray, list[int]]) -> None:
    pipe = tiny_pipeline("unet")
    DeepCache(DeepCacheParams(interval=1)).apply(pipe, apply_context("unet"))

    with count_calls(*_probes(pipe)) as counts:
        image = generate_array(pipe, PROMPT, STEPS)

    assert counts == baseline[1]
    np.testing.assert_allclose(image, baseline[0], atol=1e-5, rtol=0)


def test_deeper_branch_keeps_more_of_the_unet_running() -> None:
    # branch 5 = down block 1, layer 2: the first down/up block always runs, only the deepest part is cached.
    pipe = tiny_pipeline("unet")
    DeepCache(DeepCacheParams(interval=3, branch_id=5)).apply(pipe, apply_context("unet"))
    first_down = pipe.unet.down_blocks[0].resnets[0].conv1

    with count_calls(*_probes(pipe), first_down) as counts:
        generate_array(pipe, PROMPT, STEPS)

    assert counts == [2, STEPS, STEPS]


def test_branch_id_out_of_range_is_rejected_before_touching_the_unet() -> None:
    pipe = tiny_pipeline("unet")

    with pytest.raises(ValueError, match=r"branch_id 6 is out of range.*2 down blocks"):
        DeepCache(DeepCacheParams(branch_id=6)).apply(pipe, apply_context("unet"))

    assert "forward" not in vars(pipe.unet)  # DeepCache wraps by setting instance `forward` attributes
    assert "forward" not in vars(pipe.unet.mid_block)


@pytest.mark.parametrize("params", [{"interval": 0}, {"branch_id": -1}, {"interval": "3"}, {"depth": 2}])
def test_params_are_checked(params: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DeepCacheParams(**params)


def test_plugin_is_found_through_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from dgrun.plugins import build_registry

    monkeypatch.delenv("DGRUN_LOAD_PLUGINS", raising=False)
    registry = build_registry()

    info = registry.get("deepcache")
    assert info is not None
    assert info.cls is DeepCache
    assert info.distribution == "dgrun-deepcache"
    assert not [p.name for p in registry.failed() if p.distribution == "dgrun-deepcache"]
    assert DeepCache.unavailable_reason(Environment(device="cpu", device_kind="cpu")) is None


def test_recipe_run_applies_deepcache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dgrun.testing import run_recipe_data

    monkeypatch.delenv("DGRUN_LOAD_PLUGINS", raising=False)

    record = run_recipe_data(
        tmp_path, {"optimize": [{"deepcache": {"interval": 3}}], "generate": {"steps": 6}}
    )

    assert record["status"] == "complete"
    [entry] = record["plan"]
    assert entry["step"] == "deepcache"
    assert entry["status"] == "applied"
    assert entry["detail"] == "interval 3, branch 0"
    assert entry["plugin"].startswith("dgrun-deepcache")
    assert len(record["images"]) == 2
    files = [image["file"] for image in record["images"]]
    assert all(any(tmp_path.rglob(name)) for name in files)
