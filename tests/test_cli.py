"""The command line: exit codes, `FILE:LINE:COL` problem lines without tracebacks, nothing written for bad
input or `--dry-run`, and no torch import for `--help` and `check`. No model is loaded here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dgrun.cli import app, main

GOOD = """\
dgrun: 1
name: good
model:
  id: dgrun:tiny-flux
optimize:
  - fuse_qkv
  - first_block_cache
  - attention_backend: {backend: flash, on_unavailable: skip}
  - compile
prompts:
  - a red circle
"""

BAD = """\
dgrun: 1
name: bad
model:
  id: dgrun:tiny-sd
  trust_remote_code: yes
generate:
  steps: 0
  widht: 64
prompts:
  - a red circle
"""

# Bad only for the planner: the order rule (fuse_qkv must come before compile).
BAD_ORDER = GOOD.replace("  - fuse_qkv\n", "").replace("  - compile\n", "  - compile\n  - fuse_qkv\n")

PROBLEM_LINE = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<column>\d+): ", re.MULTILINE)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def dgrun(cwd: Path, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m dgrun ARGS` in a subprocess."""
    env = dict(os.environ)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "dgrun", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def python(cwd: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


NO_TORCH = """
import sys
from dgrun.cli import main
try:
    main({argv!r})
except SystemExit as exit:
    code = exit.code
else:
    code = 0
assert "torch" not in sys.modules, "torch was imported"
print("exit", code)
"""


# ------------------------------------------------------------------------------------- no torch import


def test_check_of_a_valid_recipe_exits_0_without_importing_torch(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", GOOD)
    result = python(tmp_path, NO_TORCH.format(argv=["check", "good.yaml"]))
    assert result.returncode == 0, result.stderr
    assert "exit 0" in result.stdout
    assert "ok" in result.stdout


def test_help_does_not_import_torch(tmp_path: Path) -> None:
    result = python(tmp_path, NO_TORCH.format(argv=["--help"]))
    assert result.returncode == 0, result.stderr
    assert "exit 0" in result.stdout
    for command in ("run", "check", "steps", "plugins", "schema"):
        assert command in result.stdout


# ------------------------------------------------------------------------------------------- bad input


def test_bad_recipe_end_to_end(tmp_path: Path) -> None:
    """`dgrun RECIPE` (the implicit `run`) on a bad recipe: exit 2, one located line per problem."""
    write(tmp_path, "bad.yaml", BAD)
    result = dgrun(tmp_path, "bad.yaml")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = PROBLEM_LINE.findall(result.stderr)
    assert len(lines) >= 3, result.stderr
    assert {(file, line) for file, line, _ in lines} >= {
        ("bad.yaml", "5"),
        ("bad.yaml", "7"),
        ("bad.yaml", "8"),
    }
    assert re.search(r"\d+ problems? in bad\.yaml", result.stderr)
    assert listing(tmp_path) == {"bad.yaml"}


def test_check_of_a_bad_recipe(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "bad.yaml", BAD)
    result = runner.invoke(app, ["check", "bad.yaml"])
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr + result.stdout
    found = PROBLEM_LINE.findall(result.stderr)
    assert len(found) >= 3, result.stderr
    assert all(file == "bad.yaml" for file, _, _ in found)
    assert "widht" in result.stderr and "did you mean 'width'" in result.stderr
    assert listing(workdir) == {"bad.yaml"}


def test_check_reports_every_recipe(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "good.yaml", GOOD)
    write(workdir, "bad.yaml", BAD)
    write(workdir, "order.yaml", BAD_ORDER)
    result = runner.invoke(app, ["check", "bad.yaml", "good.yaml", "order.yaml"])
    assert result.exit_code == 2
    files = {file for file, _, _ in PROBLEM_LINE.findall(result.stderr)}
    assert files == {"bad.yaml", "order.yaml"}
    assert "'fuse_qkv' must come before 'compile'" in result.stderr


def test_check_of_a_missing_file(workdir: Path, runner: CliRunner) -> None:
    result = runner.invoke(app, ["check", "nowhere.yaml"])
    assert result.exit_code == 2
    assert "nowhere.yaml" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dry_run", [False, True])
def test_run_of_a_bad_recipe_writes_nothing(workdir: Path, runner: CliRunner, dry_run: bool) -> None:
    write(workdir, "bad.yaml", BAD)
    result = runner.invoke(app, ["run", "bad.yaml", *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2
    assert PROBLEM_LINE.search(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert listing(workdir) == {"bad.yaml"}


def test_run_of_a_recipe_the_planner_rejects_writes_nothing(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "order.yaml", BAD_ORDER)
    result = runner.invoke(app, ["run", "order.yaml"])
    assert result.exit_code == 2, result.output
    problem = PROBLEM_LINE.search(result.stderr)
    assert problem and problem.group("file") == "order.yaml"
    assert problem.group("line") == "9"  # the later step, fuse_qkv
    assert listing(workdir) == {"order.yaml"}


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("generate.steps=0", "<--set generate.steps=0>:1:1: generate.steps: "),
        ("optimize=[compil]", "<--set optimize=[compil]>:1:1: optimize[0]: unknown step 'compil'"),
        ("generate.steps", "<--set generate.steps>:1:1: "),
    ],
)
def test_set_problems_are_reported_at_the_flag(
    workdir: Path, runner: CliRunner, assignment: str, expected: str
) -> None:
    write(workdir, "good.yaml", GOOD)
    result = runner.invoke(app, ["check", "good.yaml", "--set", assignment])
    assert result.exit_code == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_overwrite_and_resume_exclude_each_other(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "good.yaml", GOOD)
    result = runner.invoke(app, ["run", "good.yaml", "--overwrite", "--resume"])
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(workdir) == {"good.yaml"}


# ---------------------------------------------------------------------------------------- valid input


def test_check_accepts_set_and_optimize(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "good.yaml", GOOD)
    result = runner.invoke(
        app, ["check", "good.yaml", "--set", "generate.steps=4", "--optimize", "tf32,compile"]
    )
    assert result.exit_code == 0, result.stderr
    assert listing(workdir) == {"good.yaml"}


def test_check_explain_shows_each_step_outlook(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "good.yaml", GOOD)
    result = runner.invoke(app, ["check", "--explain", "good.yaml"])
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())  # undo rich's line wrapping
    for step in ("fuse_qkv", "first_block_cache", "compile"):
        assert re.search(rf"\b{step} (\S+ )?will apply", text), step
    # flash attention needs CUDA and the flash_attn package; the step says `on_unavailable: skip`
    assert re.search(r"\battention_backend (\S+ )?will (be skipped|apply)", text)


def test_dry_run_writes_nothing(workdir: Path, runner: CliRunner) -> None:
    write(workdir, "good.yaml", GOOD)
    result = runner.invoke(app, ["run", "good.yaml", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "will apply" in result.stdout
    assert listing(workdir) == {"good.yaml"}


def test_main_treats_a_recipe_as_the_run_command(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(workdir, "good.yaml", GOOD)
    write(workdir, "bad.yaml", BAD)
    with pytest.raises(SystemExit) as exit_info:
        main(["good.yaml", "--dry-run"])
    assert exit_info.value.code in (0, None)
    assert "will apply" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bad.yaml", "--dry-run"])
    assert exit_info.value.code == 2
    assert PROBLEM_LINE.search(capsys.readouterr().err)
    assert listing(workdir) == {"good.yaml", "bad.yaml"}


def test_version(runner: CliRunner) -> None:
    from dgrun import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


# ----------------------------------------------------------------------------------- info commands


def test_schema_is_json_with_the_recipe_keys(runner: CliRunner) -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"optimize", "prompts", "model", "generate", "dgrun", "name"} <= set(schema["properties"])
    assert {"dgrun", "name", "model", "prompts"} <= set(schema.get("required", []))


def test_steps_lists_the_builtin_steps(tmp_path: Path) -> None:
    result = dgrun(tmp_path, "steps", columns=250)
    assert result.returncode == 0, result.stderr
    for step in ("compile", "first_block_cache", "fuse_qkv", "attention_backend", "tf32"):
        assert re.search(rf"\b{step}\b", result.stdout), step


def test_steps_names_are_never_cut(tmp_path: Path) -> None:
    result = dgrun(tmp_path, "steps", columns=80)
    assert result.returncode == 0, result.stderr
    for step in ("first_block_cache", "attention_backend"):
        assert step in result.stdout, step


def test_plugins_lists_builtin(runner: CliRunner) -> None:
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0
    assert "builtin" in result.stdout
    assert "dgrun" in result.stdout
