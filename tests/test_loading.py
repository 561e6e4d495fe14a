"""Recipe loading through `dgrun.loading.load_recipe`: safe YAML and strict validation. Every bad input
must come back as a RecipeError whose problems point at the offending item (`FILE:LINE:COL`) with a
message a user can act on — never as another exception.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from recipe_text import VALID, assert_at, only, problems_of, value_at, where, write

from dgrun.errors import RecipeError
from dgrun.loading import load_recipe


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in a fresh directory, so recipe files are named by short relative paths in messages."""
    monkeypatch.chdir(tmp_path)


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
