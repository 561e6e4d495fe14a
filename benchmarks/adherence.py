"""Prompt adherence and speed of the shipped models on all 90 colour × shape × background prompts.

Each prompt is generated one at a time (recipe default batch size 1) with seed = its index, as a recipe
with `seed: 0` would; the evaluator in `dgrun.models.shapes` then checks colour, shape and background.
Targets for `dgrun:default`: colour ≥ 0.95, background ≥ 0.95, shape ≥ 0.85.

    python benchmarks/adherence.py [--models default default-dit] [--steps 20] [--guidance G]
    python benchmarks/adherence.py --grid docs/quickstart-grid.png   # the README's picture
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(name: str, steps: int, guidance: float | None, batch: int) -> dict[str, Any]:
    import torch

    from dgrun.models import load_builtin, shapes

    pipe = load_builtin(f"dgrun:{name}", "cpu", torch.float32)
    prompts = [shapes.make_prompt(*combo) for combo in shapes.combinations()]
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    images, seconds = [], []
    with torch.inference_mode():
        pipe(prompts[0], **kwargs)  # warm-up: first-call allocations are not the model's speed
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(chunk))]
            began = time.perf_counter()
            images += pipe(chunk, generator=generators, **kwargs).images
            seconds.append((time.perf_counter() - began) / len(chunk))
    scores = shapes.score(zip(prompts, images, strict=True))
    return {"model": name, **scores, "s_per_image": statistics.median(seconds)}


def quickstart_grid(path: Path, model: str, scale: int = 3) -> None:
    """Run recipes/quickstart.yaml on `model` and tile its images, each captioned with its prompt."""
    from PIL import Image, ImageDraw

    from dgrun.loading import load_recipe
    from dgrun.plugins import build_registry
    from dgrun.runner import RunOptions, run_recipe

    loaded = load_recipe(REPO / "recipes" / "quickstart.yaml", sets=[f"model.id=dgrun:{model}"])
    with tempfile.TemporaryDirectory() as tmp:
        record = run_recipe(loaded, build_registry(), RunOptions(out=tmp))
        tiles = [(i["prompt"], Image.open(Path(tmp) / i["file"]).convert("RGB")) for i in record["images"]]
        side, caption, pad, columns = 64 * scale, 30, 8, 4
        rows = -(-len(tiles) // columns)
        width, height = side + pad, side + caption + pad
        grid = Image.new("RGB", (min(len(tiles), columns) * width + pad, rows * height + pad), "white")
        pen = ImageDraw.Draw(grid)
        for index, (prompt, image) in enumerate(tiles):
            left, top = pad + (index % columns) * width, pad + (index // columns) * height
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (left, top))
            words = prompt.split(" on ")
            for line, text in enumerate([words[0], "on " + words[1]] if len(words) == 2 else [prompt]):
                pen.text((left, top + side + 3 + 12 * line), text, fill="black")
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path, optimize=True)
    print(f"wrote {path} ({len(tiles)} images from recipes/quickstart.yaml on dgrun:{model})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["default", "default-dit"], help="built-in model names"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's own")
    parser.add_argument("--batch", type=int, default=1, help="prompts per pipeline call")
    parser.add_argument("--grid", type=Path, help="instead: write the quickstart grid PNG here")
    parser.add_argument("--grid-model", default="default")
    args = parser.parse_args()
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    for library in (diffusers, transformers):  # loading progress bars and notices are noise here
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    if args.grid:
        quickstart_grid(args.grid, args.grid_model)
        return 0
    guidance = "pipeline default" if args.guidance is None else args.guidance
    print(f"90 prompts, {args.steps} steps, guidance {guidance}, batch {args.batch}, CPU float32")
    print(f"{'model':<12} {'colour':>7} {'shape':>7} {'backgr.':>7} {'all':>7} {'s/image':>8}")
    for name in args.models:
        r = measure(name, args.steps, args.guidance, args.batch)
        print(
            f"{name:<12} {r['colour']:7.3f} {r['shape']:7.3f} {r['background']:7.3f} {r['all']:7.3f}"
            f" {r['s_per_image']:8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
