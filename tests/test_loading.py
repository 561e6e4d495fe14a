"""Recipe loading through `dgrun.loading.load_recipe`: safe YAML, strict validation, `extends`, `--set` and
`--optimize`. Every bad input must come back as a RecipeError whose problems point at the offending item
(`FILE:LINE:COL`) with a message a user can act on — never as another exception.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from dgrun.errors import Problem, RecipeError
from dgrun.loading import load_recipe

VALID = """\
dgrun: 1
name: demo
model:
  id: dgrun:tiny-sd
prompts:
  - a red circle
"""


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in a fresh directory, so recipe files are named by short relative paths in messages."""
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of_path(path: Path, **kwargs) -> list[Problem]:
    """Load `path` and return the problems it must be rejected with."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, **kwargs)
    assert info.value.problems, "a RecipeError must carry at least one problem"
    return info.value.problems


def problems_of(text: str, name: str = "recipe.yaml", **kwargs) -> list[Problem]:
    """Write `text` as a recipe, load it, and return the problems it must be rejected with."""
    return problems_of_path(write(name, text), **kwargs)


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def where(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the `occurrence`-th appearance of `needle` in `text`."""
    text = textwrap.dedent(text)
    start = -1
    for _ in range(occurrence):
        start = text.index(needle, start + 1)
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return line, column


def value_at(text: str, entry: str) -> tuple[int, int]:
    """Line and column of the value in the first `key: value` line equal to `entry`."""
    key = entry.partition(": ")[0]
    line, column = where(text, entry)
    return line, column + len(key) + 2


def assert_at(problem: Problem, file: str, line: int, column: int | None = None) -> None:
    assert problem.position.file == file, str(problem)
    assert problem.position.line == line, str(problem)
    if column is not None:
        assert problem.position.column == column, str(problem)


# --------------------------------------------------------------------------------------------- valid


def test_valid_recipe_loads_with_defaults() -> None:
    loaded = load_recipe(write("recipe.yaml", VALID))
    recipe = loaded.recipe
    assert recipe.name == "demo"
    assert recipe.model.id == "dgrun:tiny-sd"
    assert recipe.generate.steps == 20
    assert recipe.on_unavailable == "fail"
    assert [p.text for p in recipe.prompts] == ["a red circle"]
    assert recipe.optimize == []


def test_step_items_bare_null_and_mapping() -> None:
    text = VALID + "optimize:\n  - tf32\n  - compile:\n  - first_block_cache: {threshold: 0.1}\n"
    steps = load_recipe(write("recipe.yaml", text)).recipe.optimize
    assert [(s.name, s.params) for s in steps] == [
        ("tf32", {}),
        ("compile", {}),
        ("first_block_cache", {"threshold": 0.1}),
    ]


def test_on_unavailable_in_step_params_is_the_step_override() -> None:
    text = VALID + "optimize:\n  - attention_backend: {backend: flash, on_unavailable: skip}\n"
    (step,) = load_recipe(write("recipe.yaml", text)).recipe.optimize
    assert step.on_unavailable == "skip"
    assert step.params == {"backend": "flash"}


# ------------------------------------------------------------------------------------------ YAML safety


def test_yaml_syntax_error_is_located() -> None:
    text = "dgrun: 1\nname: demo\nprompts: [a, b\nmodel: {id: dgrun:tiny-sd}\n"
    problem = only(problems_of(text))
    assert problem.position.file == "recipe.yaml"
    assert problem.position.line in (3, 4)
    assert "YAML syntax error" in problem.message


def test_tab_indentation_is_explained() -> None:
    text = "dgrun: 1\nname: demo\nmodel:\n\tid: dgrun:tiny-sd\nprompts: [a]\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", 4, 1)
    assert "tab" in problem.message.lower()


def test_duplicate_key_points_at_the_second() -> None:
    text = VALID + "name: again\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "name", occurrence=2))
    assert "duplicate key 'name'" in problem.message
    assert "line 2" in problem.message  # where the first one is


def test_duplicate_key_in_a_nested_mapping() -> None:
    text = VALID + "generate:\n  steps: 4\n  seed: 1\n  steps: 5\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "steps", occurrence=2))
    assert problem.location == "generate.steps"
    assert "duplicate" in problem.message


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object:os.system {}",
        "!!python/name:os.system ''",
        "!!python/object/apply:os.system ['echo pwned > pwned.txt']",
        "!custom value",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
        "!!omap [a: 1]",
    ],
)
def test_tags_are_rejected_and_never_executed(value: str) -> None:
    text = VALID + f"description: {value}\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, value[:3]))
    assert "tag" in problem.message
    assert not Path("pwned.txt").exists()


def test_alias_bomb_is_bounded() -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(9):
        prev, cur = chr(ord("a") + i), chr(ord("b") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    started = time.perf_counter()
    problem = only(problems_of("\n".join(lines) + "\n"))
    assert time.perf_counter() - started < 10
    assert problem.position.file == "recipe.yaml"
    assert "alias" in problem.message


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a\n  b: *a\n"])
def test_recursive_alias_is_rejected(text: str) -> None:
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", 1)
    assert "recursive alias" in problem.message


def test_plain_aliases_still_work() -> None:
    text = VALID.replace("  - a red circle", "  - &p a red circle\n  - {text: *p, id: again}")
    prompts = load_recipe(write("recipe.yaml", text)).recipe.prompts
    assert [p.text for p in prompts] == ["a red circle", "a red circle"]


def test_merge_key_is_rejected_with_a_pointer_to_extends() -> None:
    text = VALID + "generate: &g {steps: 3}\nvariants:\n  - name: v\n    generate:\n      <<: *g\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "<<"))
    assert "<<" in problem.message
    assert "extends" in problem.message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", 1)
    assert "empty" in problem.message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just words\n", "str")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", 1, 1)
    assert "mapping" in problem.message
    assert kind in problem.message


def test_several_documents_are_rejected() -> None:
    text = VALID + "---\nname: other\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "---"))
    assert "document" in problem.message


def test_oversized_file_is_rejected() -> None:
    text = VALID + "description: " + "x" * (1024 * 1024 + 10) + "\n"
    problem = only(problems_of(text))
    assert problem.position.file == "recipe.yaml"
    assert "larger than" in problem.message


def test_deeply_nested_document_is_a_recipe_error() -> None:
    problem = only(problems_of(VALID + "description: " + "[" * 600 + "]" * 600 + "\n"))
    assert problem.position.file == "recipe.yaml"
    assert "nested" in problem.message or "deep" in problem.message


def test_file_errors_are_problems() -> None:
    Path("binary.yaml").write_bytes(b"dgrun: 1\nname: \xff\xfe\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(Path("binary.yaml"))
    assert "UTF-8" in only(info.value.problems).message
    with pytest.raises(RecipeError) as info:
        load_recipe(Path("missing.yaml"))
    problem = only(info.value.problems)
    assert problem.position.file == "missing.yaml"
    assert "no such file" in problem.message
    Path("folder").mkdir()
    with pytest.raises(RecipeError) as info:
        load_recipe(Path("folder"))
    assert "directory" in only(info.value.problems).message


# ------------------------------------------------------------------------------------------ validation


def test_missing_top_level_key_is_reported_at_the_root_mapping() -> None:
    text = "dgrun: 1\nname: demo\nprompts: [a]\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", 1, 1)
    assert "missing key 'model'" in problem.message


def test_missing_nested_key_is_reported_at_the_mapping_that_lacks_it() -> None:
    text = "dgrun: 1\nname: demo\nmodel:\n  dtype: float32\nprompts: [a]\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "dtype"))
    assert problem.location == "model"
    assert "missing key 'id'" in problem.message


@pytest.mark.parametrize(
    ("addition", "bad", "suggestion"),
    [
        ("generat:\n  steps: 3\n", "generat", "generate"),
        ("on_unavailble: skip\n", "on_unavailble", "on_unavailable"),
        ("output:\n  dri: out\n", "dri", "dir"),
        ("generate:\n  sead: 3\n", "sead", "seed"),
    ],
)
def test_unknown_key_suggests_the_close_one(addition: str, bad: str, suggestion: str) -> None:
    text = VALID + addition
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, bad))
    assert f"unknown key {bad!r}" in problem.message
    assert f"did you mean {suggestion!r}" in problem.message


def test_unknown_key_in_a_prompt_item_and_model() -> None:
    text = VALID.replace("  id: dgrun:tiny-sd", "  id: dgrun:tiny-sd\n  dtpye: float16") + "  - txt: hi\n"
    problems = problems_of(text)
    messages = {p.message.split(";")[0]: p for p in problems}
    assert_at(messages["unknown key 'dtpye'"], "recipe.yaml", *where(text, "dtpye"))
    assert "did you mean 'dtype'" in messages["unknown key 'dtpye'"].message
    assert_at(messages["unknown key 'txt'"], "recipe.yaml", *where(text, "txt"))
    assert "did you mean 'text'" in messages["unknown key 'txt'"].message


def test_unknown_key_without_a_close_match_lists_the_allowed_ones() -> None:
    text = VALID + "generate:\n  zzzzzz: 1\n"
    problem = next(p for p in problems_of(text) if "zzzzzz" in p.message)
    assert "steps" in problem.message and "seed" in problem.message


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("steps: '3'", ("integer", "str")),
        ("seed: 1.5", ("integer", "float")),
        ("width: 64.0", ("integer",)),
        ("negative_prompt: 3", ("string",)),
        ("extra: [a]", ("dict",)),
    ],
)
def test_types_are_strict(entry: str, words: tuple[str, ...]) -> None:
    text = VALID + f"generate:\n  {entry}\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *value_at(text, entry))
    assert problem.location == "generate." + entry.split(":")[0]
    for word in words:
        assert word in problem.message.lower()


@pytest.mark.parametrize(
    ("text", "line", "location"),
    [
        ("dgrun: 1\nname:\nmodel:\n  id: dgrun:tiny-sd\nprompts: [a]\n", 2, "name"),
        ("dgrun: 1\nname: demo\nmodel:\nprompts: [a]\n", 3, "model"),
        ("dgrun: 1\nname: demo\nmodel:\n  id:\n  dtype: float32\nprompts: [a]\n", 4, "model.id"),
    ],
    ids=["name", "model", "model.id"],
)
def test_an_empty_value_is_reported_on_its_own_line(text: str, line: int, location: str) -> None:
    problem = only(problems_of(text))
    assert problem.location == location
    assert problem.position.line == line


def test_yes_is_a_string_not_a_boolean() -> None:
    text = VALID.replace("  id: dgrun:tiny-sd", "  id: dgrun:tiny-sd\n  trust_remote_code: yes")
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *value_at(text, "trust_remote_code: yes"))
    assert problem.location == "model.trust_remote_code"
    assert "boolean" in problem.message
    assert "'yes'" in problem.message
    # ... and where a string is wanted, `yes` is simply that string
    loaded = load_recipe(write("other.yaml", VALID + "description: yes\n"))
    assert loaded.recipe.description == "yes"


def test_true_is_a_boolean() -> None:
    text = VALID.replace("  id: dgrun:tiny-sd", "  id: dgrun:tiny-sd\n  trust_remote_code: true")
    assert load_recipe(write("recipe.yaml", text)).recipe.model.trust_remote_code is True


def test_an_integer_is_fine_where_a_float_is_expected() -> None:
    text = VALID + "generate:\n  guidance_scale: 7\n"
    assert load_recipe(write("recipe.yaml", text)).recipe.generate.guidance_scale == 7.0


@pytest.mark.parametrize(
    ("entry", "word"),
    [
        ("width: 30", "multiple of 8"),
        ("height: 100", "multiple of 8"),
        ("steps: 0", "greater than or equal to 1"),
        ("seed: -1", "greater than or equal to 0"),
        ("batch_size: 0", "greater than or equal to 1"),
        ("images_per_prompt: 0", "greater than or equal to 1"),
    ],
)
def test_range_errors(entry: str, word: str) -> None:
    text = VALID + f"generate:\n  {entry}\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *value_at(text, entry))
    assert problem.location == "generate." + entry.split(":")[0]
    assert word in problem.message


@pytest.mark.parametrize(
    ("replacement", "needle", "field"),
    [("dgrun: 2", "2", "dgrun"), ("name: My Recipe", "My Recipe", "name")],
)
def test_version_and_name_are_checked(replacement: str, needle: str, field: str) -> None:
    line = "dgrun: 1" if field == "dgrun" else "name: demo"
    text = VALID.replace(line, replacement)
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, needle))
    assert problem.location == field


def test_step_item_with_two_keys() -> None:
    text = VALID + "optimize:\n  - {tf32: null, vae_tiling: null}\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "{tf32"))
    assert problem.location == "optimize[0]"
    assert "one key" in problem.message
    assert "tf32" in problem.message and "vae_tiling" in problem.message


def test_step_params_must_be_a_mapping() -> None:
    text = VALID + "optimize:\n  - compile: max-autotune\n"
    problem = only(problems_of(text))
    assert problem.position.line == where(text, "compile")[0]
    assert problem.location == "optimize[0]"
    assert "'compile'" in problem.message
    assert "mapping" in problem.message


@pytest.mark.parametrize("item", ["- 3", "- [tf32]", "- Compile", "- fuse-qkv"])
def test_step_item_must_be_a_snake_case_name_or_mapping(item: str) -> None:
    text = VALID + f"optimize:\n  - tf32\n  {item}\n"
    problem = only(problems_of(text))
    assert problem.position.line == where(text, item)[0]
    assert problem.location.startswith("optimize[1]")


def test_duplicate_prompt_ids_point_at_the_second() -> None:
    text = VALID + "  - {text: a blue square, id: shape}\n  - {text: a green square, id: shape}\n"
    problem = only(problems_of(text))
    assert_at(problem, "recipe.yaml", *where(text, "shape", occurrence=2))
    assert problem.location == "prompts[2].id"
    assert "'shape'" in problem.message and "prompts[1]" in problem.message


def test_all_problems_are_reported_at_once() -> None:
    text = """\
        dgrun: 1
        name: demo
        model:
          id: dgrun:tiny-sd
          trust_remote_code: yes
        generate:
          steps: 0
          widht: 64
        optimize:
          - {tf32: null, compile: null}
        prompts:
          - a red circle
        """
    problems = problems_of(text)
    assert len(problems) >= 4, "\n".join(map(str, problems))
    lines = {p.position.line for p in problems}
    assert {5, 7, 8, 10} <= lines
    assert all(p.position.file == "recipe.yaml" for p in problems)


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
