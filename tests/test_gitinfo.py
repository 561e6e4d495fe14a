"""dgrun.gitinfo reads commit, branch and recipe state from `.git` without running git.

The fixture repositories are built with the real git binary (with no user or system config), and the
answers are checked against `git rev-parse`. The security tests plant what would make `git status` run a
program, or hang a plain reader, and check that git_state neither runs it nor hangs.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from dgrun import gitinfo
from dgrun.gitinfo import git_state

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary to build repos")

RECIPE = "recipes/tiny.yaml"


def _git_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_DATE="2024-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
    )
    return env


def git(cwd: Path, *args: str) -> str:
    """Run git for building fixtures only, with a fixed identity and no user or system config."""
    command = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com", *args]
    result = subprocess.run(command, cwd=cwd, env=_git_env(), check=True, capture_output=True, text=True)
    return result.stdout.strip()


def make_repo(root: Path, *init_args: str) -> Path:
    """A repository on branch `main` with a committed recipe and a few other files in nested folders."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main", *init_args)
    for name, text in {
        RECIPE: "model: tiny\nsteps: 2\n",
        "recipes/tiny_other.yaml": "model: other\n",
        "recipes/deep/nested/x.yaml": "x: 1\n",
        "README.md": "hello\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    return root


def bounded_git_state(path: Path, seconds: float = 5.0) -> dict[str, Any] | None:
    """git_state in a thread: a hang (FIFO, device) fails the test instead of blocking the suite."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(value=git_state(path)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "git_state did not return in time"
    return result["value"]


def test_fresh_repo_commit_branch_and_modification(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    recipe = repo / RECIPE
    state = git_state(recipe)
    assert state == {"commit": git(repo, "rev-parse", "HEAD"), "recipe_modified": False, "branch": "main"}

    recipe.write_text("model: tiny\nsteps: 3\n")
    assert git_state(recipe)["recipe_modified"] is True
    git(repo, "add", RECIPE)  # staged changes count as unmodified, as in `git diff` without --cached
    assert git_state(recipe)["recipe_modified"] is False

    untracked = repo / "recipes" / "new.yaml"
    untracked.write_text("model: new\n")
    assert git_state(untracked)["recipe_modified"] is True


def test_packed_refs_detached_head_and_worktree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "README.md").write_text("second\n")
    git(repo, "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")

    git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert git_state(repo / RECIPE) == {"commit": second, "recipe_modified": False, "branch": "main"}

    git(repo, "checkout", "-q", "--detach", first)
    assert git_state(repo / RECIPE) == {"commit": first, "recipe_modified": False, "branch": None}
    git(repo, "checkout", "-q", "main")

    worktree = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "feature", str(worktree))
    assert (worktree / ".git").is_file()
    (worktree / RECIPE).write_text("model: tiny\nsteps: 9\n")
    git(worktree, "commit", "-q", "-am", "on feature")
    feature = git(worktree, "rev-parse", "HEAD")
    assert feature != second
    assert git_state(worktree / RECIPE) == {"commit": feature, "recipe_modified": False, "branch": "feature"}
    assert git_state(repo / RECIPE) == {"commit": second, "recipe_modified": False, "branch": "main"}
    (worktree / RECIPE).write_text("changed\n")
    assert git_state(worktree / RECIPE)["recipe_modified"] is True


def test_submodule_gitdir_file(tmp_path: Path) -> None:
    sub = make_repo(tmp_path / "sub")
    parent = make_repo(tmp_path / "parent")
    git(parent, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "vendored")
    inner = parent / "vendored"
    assert (inner / ".git").read_text().startswith("gitdir: ../.git/modules/")
    state = git_state(inner / RECIPE)
    assert state is not None and state["commit"] == git(sub, "rev-parse", "HEAD")
    assert state["recipe_modified"] is False


def test_index_versions_3_and_4(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    index = repo / ".git" / "index"

    git(repo, "update-index", "--index-version", "4")
    assert index.read_bytes()[:8] == b"DIRC\0\0\0\4"
    assert git_state(repo / RECIPE)["recipe_modified"] is False
    assert git_state(repo / "recipes/deep/nested/x.yaml")["recipe_modified"] is False
    (repo / RECIPE).write_text("edited\n")
    assert git_state(repo / RECIPE)["recipe_modified"] is True
    git(repo, "checkout", "--", RECIPE)

    # Version 3 is only written when an entry has extended flags: intent-to-add sets one.
    git(repo, "update-index", "--index-version", "3")
    intent = repo / "recipes" / "intent.yaml"
    intent.write_text("model: later\n")
    git(repo, "add", "-N", str(intent))
    assert index.read_bytes()[:8] == b"DIRC\0\0\0\3"
    assert git_state(repo / RECIPE)["recipe_modified"] is False
    assert git_state(repo / "recipes/tiny_other.yaml")["recipe_modified"] is False
    assert git_state(intent)["recipe_modified"] is True


def test_sha256_repository(tmp_path: Path) -> None:
    try:
        repo = make_repo(tmp_path / "repo", "--object-format=sha256")
    except subprocess.CalledProcessError:
        pytest.skip("this git cannot create sha256 repositories")
    state = git_state(repo / RECIPE)
    assert state == {"commit": git(repo, "rev-parse", "HEAD"), "recipe_modified": False, "branch": "main"}
    assert len(state["commit"]) == 64


def test_unreadable_index_gives_unknown_modification(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    index = repo / ".git" / "index"
    index.write_bytes(b"DIRC\0\0\0\5" + index.read_bytes()[8:])  # unsupported version
    assert git_state(repo / RECIPE)["recipe_modified"] is None
    index.write_bytes(index.read_bytes()[:100])  # truncated
    assert git_state(repo / RECIPE)["recipe_modified"] is None
    index.unlink()
    state = git_state(repo / RECIPE)
    assert state["recipe_modified"] is None and state["commit"] == git(repo, "rev-parse", "HEAD")


def test_git_config_programs_are_never_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "marker"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\necho ran >> '{marker}'\ncat\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    with (repo / ".git" / "config").open("a") as config:
        config.write(f'[core]\n\tfsmonitor = "{script}"\n[filter "evil"]\n\tclean = "{script}"\n')
    (repo / ".gitattributes").write_text("*.yaml filter=evil\n")
    (repo / RECIPE).write_text("model: tiny\nsteps: 4\n")  # stat-dirty, so git status would clean it

    state = bounded_git_state(repo / RECIPE)
    assert state is not None and state["commit"] == git(repo, "rev-parse", "HEAD")
    assert state["recipe_modified"] is True
    assert not marker.exists()

    # The control: the planted config does make real git run the program.
    git(repo, "status", "--porcelain")
    assert marker.exists()


@pytest.mark.parametrize(
    "head",
    [
        b"ref: ../../../../etc/passwd\n",
        b"ref: refs/heads/../../x\n",
        b"ref: /etc/passwd\n",
        b"ref: refs/heads/.hidden\n",
        b"0123\n",
        b"ref: refs/heads/nobranch\n",  # unborn
    ],
)
def test_crafted_head_gives_none(tmp_path: Path, head: bytes) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / ".git" / "HEAD").write_bytes(head)
    assert bounded_git_state(repo / RECIPE) is None


def test_symbolic_ref_loop_gives_none(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    heads = repo / ".git" / "refs" / "heads"
    (heads / "a").write_text("ref: refs/heads/b\n")
    (heads / "b").write_text("ref: refs/heads/a\n")
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/a\n")
    assert bounded_git_state(repo / RECIPE) is None
    (heads / "b").write_text("ref: refs/heads/main\n")
    assert bounded_git_state(repo / RECIPE)["branch"] == "main"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_head_does_not_hang(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / ".git" / "HEAD").unlink()
    os.mkfifo(repo / ".git" / "HEAD")
    assert bounded_git_state(repo / RECIPE) is None


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_ref_gives_none(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    main = repo / ".git" / "refs" / "heads" / "main"
    main.unlink()
    main.symlink_to("/dev/zero")
    assert bounded_git_state(repo / RECIPE) is None


def test_oversized_packed_refs_gives_none(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    git(repo, "pack-refs", "--all")
    packed = repo / ".git" / "packed-refs"
    with packed.open("ab") as handle:
        handle.write(b"# padding\n" * (gitinfo.PACKED_REFS_LIMIT // 10 + 1))
    assert packed.stat().st_size > gitinfo.PACKED_REFS_LIMIT
    assert bounded_git_state(repo / RECIPE) is None


def test_outside_any_repository(tmp_path: Path) -> None:
    recipe = tmp_path / "plain" / "tiny.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: tiny\n")
    if gitinfo._find_repository(tmp_path) is not None:
        pytest.skip("the temporary directory is itself inside a git work tree")
    assert git_state(recipe) is None
    assert git_state(tmp_path / "missing" / "tiny.yaml") is None
