"""The search's result as a plain recipe: `NAME.tuned.yaml`, written into the tune's output directory.

It is the recipe with the best feasible trial's steps and generate choices, without `tune:` or variants,
so `dgrun check` passes on it and `dgrun bench` on it measures what the trial measured. A comment says
how it was found.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgrun.loading import LoadedRecipe
from dgrun.records import write_text
from dgrun.tune.spec import TuneSpec
from dgrun.variants import apply_variant


def tuned_recipe_data(loaded: LoadedRecipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe data the winning choices make (null values left out: they are the defaults)."""
    data = apply_variant(loaded.recipe.resolved(), overrides)
    data.pop("tune", None)
    data["name"] = f"{loaded.recipe.name}-tuned"[:80]
    return _without_nulls(data)


def write_tuned_recipe(
    loaded: LoadedRecipe, best: dict[str, Any], out_dir: Path, trials: int, spec: TuneSpec
) -> Path:
    from ruamel.yaml import YAML

    data = tuned_recipe_data(loaded, best["overrides"])
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # keep the recipe's key order
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    figures = [f"{spec.objective} {best['objective']:.4g}"]
    if best.get("psnr_min_db") is not None:
        figures.append(f"worst PSNR {best['psnr_min_db']:.2f} dB")
    if best.get("ssim_mean") is not None:
        figures.append(f"mean SSIM {best['ssim_mean']:.4f}")
    if best.get("adherence") is not None:
        figures.append(f"adherence {best['adherence']:.3f}")
    if best.get("speedup"):
        figures.append(f"{best['speedup']:.2f}x the baseline")
    header = [
        f"# Found by `dgrun tune {loaded.path.name}`: trial {best['number']} of {trials} proposals, "
        f"sampler {spec.sampler}, seed {spec.seed}, {datetime.now(timezone.utc):%Y-%m-%d}.",
        f"# Measured: {', '.join(figures)}.",
        "# `dgrun bench` on this file measures it again against the same automatic baseline.",
    ]
    path = out_dir / f"{Path(loaded.path).stem}.tuned.yaml"
    write_text(path, "\n".join(header) + "\n" + buffer.getvalue())
    return path


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
