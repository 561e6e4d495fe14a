"""Synthetic shapes data for `dgrun:default`, and a model-independent adherence evaluator.

Every training image holds one circle, square or upright triangle in one of six colours on a background of
another of the six, described by the prompt `a {colour} {shape} on a {background} background`. Because the
pictures are this simple, a few lines of image analysis tell whether a generated image matches its prompt,
so optimizations can be judged on prompt adherence as well as on pixel distance to a baseline.

    from dgrun.models.shapes import score
    score([(prompt, pil_image), ...])  # {"colour": 1.0, "shape": 0.97, "background": 1.0, ...}
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Well separated in RGB (every pair ≥ 150 apart), so the nearest palette entry is a reliable classifier.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")
PROMPT_WORDS: tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES)

_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*$", re.IGNORECASE)
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)
_SIZE_RANGE = (0.375, 0.72)  # shape size as a fraction of the image side (24–46 px at 64×64)
_MARGIN = 0.0625  # free border (4 px at 64×64) that the evaluator reads as background
_SUPERSAMPLE = 4  # drawn 4× larger and box-filtered down: anti-aliased edges, as a VAE would produce


@dataclass(frozen=True)
class ShapeSpec:
    """One picture: what is drawn, how large (fraction of the side) and where (top-left, fractions)."""

    colour: str
    shape: str
    background: str
    size: float = 0.55
    x: float = 0.225
    y: float = 0.225

    @property
    def prompt(self) -> str:
        return make_prompt(self.colour, self.shape, self.background)


def make_prompt(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_prompt(prompt: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) named by a prompt of the data grammar, or None for any other prompt."""
    match = _PROMPT.match(prompt)
    if match is None:
        return None
    colour, shape, background = (word.lower() for word in match.groups())
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        return None
    return colour, shape, background


def combinations() -> list[tuple[str, str, str]]:
    """All 90 (colour, shape, background) triples with different shape and background colours."""
    return [
        (colour, shape, background)
        for colour, shape, background in itertools.product(COLOURS, SHAPES, COLOURS)
        if colour != background
    ]


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    """A uniformly drawn picture: attributes, then a size and a position that keep the margin free."""
    colour_index, background_index = rng.choice(len(_NAMES), size=2, replace=False)
    size = float(rng.uniform(*_SIZE_RANGE))
    room = 1.0 - 2 * _MARGIN - size
    return ShapeSpec(
        colour=_NAMES[colour_index],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        background=_NAMES[background_index],
        size=size,
        x=_MARGIN + float(rng.uniform(0, room)),
        y=_MARGIN + float(rng.uniform(0, room)),
    )


def draw(spec: ShapeSpec, image_size: int = 64) -> Image.Image:
    """Render one picture as an RGB image of `image_size` × `image_size` pixels."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[spec.background])
    left, top, side = spec.x * big, spec.y * big, spec.size * big
    box = (left, top, left + side - 1, top + side - 1)
    fill = COLOURS[spec.colour]
    pen = ImageDraw.Draw(image)
    if spec.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif spec.shape == "square":
        pen.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        pen.polygon([(left + side / 2, top), (box[0], box[3]), (box[2], box[3])], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {', '.join(SHAPES)}")
    return image.reduce(_SUPERSAMPLE)


def make_batch(rng: np.random.Generator, count: int, image_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """`count` random pictures as uint8 (count, H, W, 3) and their prompts; same rng state → same batch."""
    specs = [random_spec(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw(spec, image_size)) for spec in specs])
    return pixels, [spec.prompt for spec in specs]


# ------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Analysis:
    """What the evaluator sees in one image; `shape` is None when no foreground was found."""

    colour: str | None
    shape: str | None
    background: str
    fill: float = 0.0  # foreground share of its bounding box: circle ≈ 0.79, square ≈ 1, triangle ≈ 0.5
    top_corners: float = 0.0  # foreground share of the bounding box's two top corner patches
    bottom_corners: float = 0.0


# Feature prototypes (fill, top corners, bottom corners), measured on the generator's own pictures.
_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (0.79, 0.31, 0.31),
    "square": (1.0, 1.0, 1.0),
    "triangle": (0.52, 0.0, 0.79),
}


def _to_array(image: Any) -> np.ndarray:
    """RGB float array (H, W, 3) in 0–255 from a PIL image or an array in 0–1 or 0–255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    raw = np.asarray(image)
    array = raw.astype(np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first → last
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    # Floats in 0–1 are what pipelines return with output_type="np"; integers are already 0–255.
    return array * 255.0 if raw.dtype.kind == "f" and array.max() <= 1.0 else array


def _labels(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel."""
    distances = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)
    return distances.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask, so stray pixels do not stretch the bounding box."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if seen[start_y, start_x]:
            continue
        seen[start_y, start_x] = True
        stack, region = [(int(start_y), int(start_x))], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, top-corner fill, bottom-corner fill) of the mask within its bounding box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    height, width = box.shape
    ch, cw = max(1, round(height / 4)), max(1, round(width / 4))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    return float(box.mean()), float(top), float(bottom)


def analyse(image: Any) -> Analysis:
    """Background (the border's dominant colour), shape colour (the dominant other colour) and shape.

    The shape is the prototype nearest to the foreground's fill ratio and corner fills; the foreground is
    the largest connected region of the shape colour, which ignores blurred edges and speckles.
    """
    labels = _labels(_to_array(image))
    # A ring 1–2 px inside the edge: the data keeps it free, and it skips the outermost row, where a
    # decoder's zero padding leaves coloured fringes that are not the background a person sees.
    ring = labels[1:-1, 1:-1]
    border = np.concatenate([ring[:2].ravel(), ring[-2:].ravel(), ring[:, :2].ravel(), ring[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[background] = 0
    if counts.max() < max(4, labels.size // 400):
        return Analysis(colour=None, shape=None, background=_NAMES[background])
    colour = int(counts.argmax())
    mask = _largest_component(labels == colour)
    fill, top, bottom = _shape_features(mask)
    features = np.array([fill, top, bottom])
    shape = min(_PROTOTYPES, key=lambda name: float(((features - np.array(_PROTOTYPES[name])) ** 2).sum()))
    return Analysis(_NAMES[colour], shape, _NAMES[background], fill, top, bottom)


def check(prompt: str, image: Any) -> dict[str, bool]:
    """Per-attribute correctness of one image against the prompt it was generated from."""
    expected = parse_prompt(prompt)
    if expected is None:
        raise ValueError(
            f"prompt {prompt!r} does not follow 'a {{colour}} {{shape}} on a {{colour}} background'"
        )
    seen = analyse(image)
    return {
        "colour": seen.colour == expected[0],
        "shape": seen.shape == expected[1],
        "background": seen.background == expected[2],
    }


def score(pairs: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """Accuracy per attribute (and `all`: every attribute right) over (prompt, image) pairs."""
    results = [check(prompt, image) for prompt, image in pairs]
    if not results:
        raise ValueError("nothing to score")
    out = {name: sum(r[name] for r in results) / len(results) for name in ATTRIBUTES}
    out["all"] = sum(all(r.values()) for r in results) / len(results)
    out["count"] = float(len(results))
    return out


def format_scores(scores: dict[str, float], keys: Sequence[str] = (*ATTRIBUTES, "all")) -> str:
    return " ".join(f"{key} {scores[key]:.3f}" for key in keys)
