"""Recipe composition: `extends`, `--set` and the `--optimize` shorthand, with every problem located in
the file (or flag) that wrote the offending value."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipe_text import VALID, assert_at, only, problems_of, problems_of_path, where, write

from dgrun.loading import load_recipe


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in a fresh directory, so recipe files are named by short relative paths in messages."""
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------- extends

BASE = """\
dgrun: 1
name: base
model:
  id: dgrun:tiny-sd
  dtype: float32
generate:
  steps: 5
  width: 64
  extra:
    a: 1
    b: 2
optimize:
  - tf32
  - vae_tiling
prompts:
  - a red circle
  - a blue square
"""


def test_extends_deep_merges_mappings_and_replaces_lists() -> None:
    write("base.yaml", BASE)
    child = write(
        "child.yaml",
        """\
        extends: base.yaml
        name: child
        model:
          device: cpu
        generate:
          steps: 3
          extra:
            b: 20
        optimize:
          - compile
        prompts:
          - a green triangle
        """,
    )
    recipe = load_recipe(child).recipe
    assert recipe.name == "child"
    assert (recipe.model.id, recipe.model.dtype, recipe.model.device) == ("dgrun:tiny-sd", "float32", "cpu")
    assert (recipe.generate.steps, recipe.generate.width) == (3, 64)
    assert recipe.generate.extra == {"a": 1, "b": 20}
    assert [s.name for s in recipe.optimize] == ["compile"]
    assert [p.text for p in recipe.prompts] == ["a green triangle"]


def test_a_bad_value_inherited_from_the_base_points_into_the_base() -> None:
    base_text = BASE.replace("  steps: 5", "  steps: '5'")
    write("base.yaml", base_text)
    child = write("child.yaml", "extends: base.yaml\nname: child\n")
    problem = only(problems_of_path(child))
    assert_at(problem, "base.yaml", *where(base_text, "'5'"))
    assert problem.location == "generate.steps"


def test_a_bad_value_in_the_child_points_into_the_child() -> None:
    write("base.yaml", BASE)
    child_text = "extends: base.yaml\nname: child\ngenerate:\n  seed: -1\n"
    child = write("child.yaml", child_text)
    problem = only(problems_of_path(child))
    assert_at(problem, "child.yaml", *where(child_text, "-1"))


def test_a_child_value_replaces_a_bad_base_value() -> None:
    write("base.yaml", BASE.replace("  steps: 5", "  steps: 0"))
    child = write("child.yaml", "extends: base.yaml\nname: child\ngenerate:\n  steps: 2\n")
    assert load_recipe(child).recipe.generate.steps == 2


def test_extends_is_relative_to_the_extending_file() -> None:
    base_text = BASE.replace("  width: 64", "  width: 63")
    write("recipes/base.yaml", base_text)
    child = write("recipes/child.yaml", "extends: base.yaml\nname: child\n")
    problem = only(problems_of_path(child))
    assert Path(problem.position.file).name == "base.yaml"
    assert Path(problem.position.file).parent.name == "recipes"
    assert problem.position.line == where(base_text, "63")[0]


def test_missing_base_file() -> None:
    text = "extends: nowhere.yaml\nname: child\n"
    problem = only(problems_of(text, name="child.yaml"))
    assert_at(problem, "child.yaml", *where(text, "nowhere.yaml"))
    assert "nowhere.yaml" in problem.message
    assert "not found" in problem.message


def test_extends_cycle_is_detected() -> None:
    write("a.yaml", VALID + "extends: b.yaml\n")
    write("b.yaml", "extends: a.yaml\nname: b\n")
    problem = only(problems_of_path(Path("a.yaml")))
    assert "cycle" in problem.message
    assert "a.yaml" in problem.message and "b.yaml" in problem.message
    assert problem.position.file in ("a.yaml", "b.yaml")
    assert problem.location == "extends"


def test_a_recipe_extending_itself_is_a_cycle() -> None:
    problem = only(problems_of(VALID + "extends: recipe.yaml\n"))
    assert "cycle" in problem.message


# ------------------------------------------------------------------------------------------------ --set


def test_set_reads_values_as_yaml() -> None:
    path = write("recipe.yaml", VALID)
    recipe = load_recipe(
        path,
        sets=[
            "generate.steps=4",
            "model.trust_remote_code=true",
            "generate.guidance_scale=3.5",
            "prompts=[one, two]",
            "optimize=[tf32, {compile: {mode: max-autotune}}]",
        ],
    ).recipe
    assert recipe.generate.steps == 4 and isinstance(recipe.generate.steps, int)
    assert recipe.model.trust_remote_code is True
    assert recipe.generate.guidance_scale == 3.5
    assert [p.text for p in recipe.prompts] == ["one", "two"]
    assert [(s.name, s.params) for s in recipe.optimize] == [
        ("tf32", {}),
        ("compile", {"mode": "max-autotune"}),
    ]


def test_set_overrides_a_value_inherited_through_extends() -> None:
    write("base.yaml", BASE)
    child = write("child.yaml", "extends: base.yaml\nname: child\n")
    assert load_recipe(child, sets=["generate.steps=7"]).recipe.generate.steps == 7


@pytest.mark.parametrize("assignment", ["generate.steps", "=4", "generate..steps=4"])
def test_set_syntax_errors_are_reported_at_the_flag(assignment: str) -> None:
    problem = only(problems_of(VALID, sets=[assignment]))
    assert problem.position.file == f"<--set {assignment}>"


def test_set_without_equals_explains_the_form() -> None:
    problem = only(problems_of(VALID, sets=["generate.steps"]))
    assert "KEY.PATH=VALUE" in problem.message


def test_a_bad_set_value_is_reported_at_the_flag() -> None:
    problem = only(problems_of(VALID, sets=["generate.steps=abc"]))
    assert problem.position.file == "<--set generate.steps=abc>"
    assert problem.location == "generate.steps"
    assert "integer" in problem.message


def test_set_value_with_bad_yaml_is_reported_at_the_flag() -> None:
    problem = only(problems_of(VALID, sets=["generate.steps=[1,"]))
    assert problem.position.file == "<--set generate.steps=[1,>"
    assert "YAML" in problem.message


def test_set_of_an_unknown_key_suggests_the_close_one() -> None:
    problem = only(problems_of(VALID, sets=["generate.stpes=4"]))
    assert problem.position.file == "<--set generate.stpes=4>"
    assert "did you mean 'steps'" in problem.message


def test_every_bad_set_is_reported() -> None:
    malformed = problems_of(VALID, sets=["generate.steps", "generate..seed=1"])
    assert {p.position.file for p in malformed} == {"<--set generate.steps>", "<--set generate..seed=1>"}
    invalid = problems_of(VALID, sets=["generate.seed=-1", "generate.width=abc"])
    assert {p.position.file for p in invalid} == {"<--set generate.seed=-1>", "<--set generate.width=abc>"}


# ------------------------------------------------------------------------------------------- --optimize


def test_optimize_shorthand_with_parameters() -> None:
    path = write("recipe.yaml", VALID + "optimize: [tf32, vae_tiling]\n")
    steps = load_recipe(path, optimize="deepcache:interval=2,branch_id=1,compile").recipe.optimize
    assert [(s.name, s.params) for s in steps] == [
        ("deepcache", {"interval": 2, "branch_id": 1}),
        ("compile", {}),
    ]
    assert isinstance(steps[0].params["interval"], int)


def test_optimize_shorthand_with_a_list_value() -> None:
    path = write("recipe.yaml", VALID)
    steps = load_recipe(path, optimize="attention_backend:backend=[flash,native],compile:mode=max-autotune")
    assert [(s.name, s.params) for s in steps.recipe.optimize] == [
        ("attention_backend", {"backend": ["flash", "native"]}),
        ("compile", {"mode": "max-autotune"}),
    ]


def test_optimize_shorthand_bare_names_and_empty() -> None:
    path = write("recipe.yaml", VALID + "optimize: [tf32]\n")
    assert [s.name for s in load_recipe(path, optimize="vae_slicing, compile").recipe.optimize] == [
        "vae_slicing",
        "compile",
    ]
    assert load_recipe(path, optimize="").recipe.optimize == []


def test_optimize_parameter_without_a_step() -> None:
    problem = only(problems_of(VALID, optimize="interval=2"))
    assert problem.position.file == "<--optimize interval=2>"
    assert "interval=2" in problem.message


def test_optimize_bad_step_name_is_reported_at_the_flag() -> None:
    problem = only(problems_of(VALID, optimize="tf32,Deep Cache"))
    assert problem.position.file == "<--optimize tf32,Deep Cache>"
    assert problem.location.startswith("optimize[1]")


def test_bad_optimize_value_is_reported_with_the_set_problems() -> None:
    problems = problems_of(VALID, sets=["generate.steps"], optimize="compile:mode=[")
    assert {p.position.file for p in problems} == {"<--set generate.steps>", "<--optimize compile:mode=[>"}
