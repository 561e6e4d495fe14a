"""Fuzzing the loader and planner: any input ends in a valid recipe or a RecipeError, never a crash."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgrun.errors import DgrunError
from dgrun.loading import load_recipe
from dgrun.optimizer import Environment
from dgrun.planner import plan_recipe
from dgrun.plugins import build_registry

REGISTRY = build_registry()
ENV = Environment(device="cpu", device_kind="cpu")
VALID = {
    "dgrun": 1,
    "name": "fuzz",
    "model": {"id": "dgrun:tiny-flux", "dtype": "auto"},
    "generate": {"steps": 4, "seed": 0, "width": 64, "extra": {}},
    "optimize": ["fuse_qkv", {"first_block_cache": {"threshold": 0.2}}, {"compile": {"mode": "default"}}],
    "prompts": ["a red circle", {"text": "a square", "id": "sq", "seed": 3}],
    "variants": [{"name": "v", "optimize": ["vae_slicing"]}],
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(path: Path) -> None:
    """What `dgrun check` does; only dgrun's own errors may come out."""
    try:
        plan_recipe(load_recipe(path), REGISTRY, ENV)
    except DgrunError as error:
        assert str(error), "an error must say something"


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(text=st.text(max_size=300))
def test_random_text_never_crashes(text, tmp_path):
    path = tmp_path / "r.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:
        return
    _check(path)


@FUZZ
@given(
    text=st.lists(
        st.sampled_from(
            [
                "a:",
                " b:",
                "- c",
                "  - d: 1",
                "&x",
                "*x",
                "!!str",
                "[",
                "]",
                "{",
                "}",
                ":",
                "'",
                '"',
                "\t",
                "\n",
                "#",
            ]
        ),
        max_size=40,
    ).map(" ".join)
)
def test_yaml_punctuation_soup_never_crashes(text, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _check(path)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*prefix, index))


ALL_PATHS = [p for p in _paths(VALID) if p]


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["delete", "replace", "add"]), values),
        max_size=4,
    )
)
def test_mutated_valid_recipes_never_crash(mutations, tmp_path):
    data = copy.deepcopy(VALID)
    for path, action, value in mutations:
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            key = path[-1]
            if action == "delete":
                del parent[key]
            elif action == "replace":
                parent[key] = value
            elif isinstance(parent, dict):
                parent[f"extra_{len(parent)}"] = value
            elif isinstance(parent, list):
                parent.append(value)
        except (KeyError, IndexError, TypeError):
            continue
    path = tmp_path / "r.yaml"
    try:
        text = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError):
        pytest.skip("not representable")
    path.write_text(text, encoding="utf-8")
    _check(path)


def test_the_valid_seed_recipe_is_valid(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(VALID), encoding="utf-8")
    plan = plan_recipe(load_recipe(path), REGISTRY, ENV)
    assert [s.name for s in plan.steps] == ["fuse_qkv", "first_block_cache", "compile"]
