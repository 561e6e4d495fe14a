"""Where a run writes, what each image is called, and whether an existing directory may be reused.

An existing output directory holding another recipe's run (or files that are not a dgrun run) is never
overwritten without `--overwrite`; `--resume` keeps the images a previous run of the same recipe finished.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgrun.errors import UsageError
from dgrun.lock import OutputLock
from dgrun.recipe import PromptSpec, Recipe
from dgrun.records import read_json, sha256_file
from dgrun.runrecord import RECORD_FILE, resumable_images


@dataclass(frozen=True)
class ImageJob:
    """One image to make: which prompt, which of its images, which seed, which file."""

    number: int
    prompt_index: int
    image_index: int
    prompt: PromptSpec
    seed: int
    file: str


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: lowercase words joined by dashes."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-")) or "prompt"


def image_jobs(recipe: Recipe) -> list[ImageJob]:
    """Every image of the recipe in order; prompt i without its own seed uses `seed + i`."""
    jobs = []
    per_prompt = recipe.generate.images_per_prompt
    width = max(3, len(str(len(recipe.prompts) - 1)))
    for index, prompt in enumerate(recipe.prompts):
        seed = prompt.seed if prompt.seed is not None else recipe.generate.seed + index
        stem = f"{index:0{width}d}-{prompt.id or slug(prompt.text)}"
        for image_index in range(per_prompt):
            suffix = f"-{image_index}" if per_prompt > 1 else ""
            jobs.append(ImageJob(len(jobs), index, image_index, prompt, seed, f"{stem}{suffix}.png"))
    return jobs


def resolve_output_dir(recipe: Recipe, out: str | None, cwd: Path | None = None) -> Path:
    """The run's directory: `--out` if given, else `output.dir` with {name}/{hash} filled in.

    Relative paths must stay inside the working directory; only an absolute `--out` may leave it.
    """
    cwd = (cwd or Path.cwd()).resolve()
    if out is not None:
        if "\0" in out or not out.strip():
            raise UsageError("--out: not a usable path")
        target = Path(out).expanduser()
        if target.is_absolute():
            return target
        origin = "--out"
    else:
        target = Path(recipe.output.dir.format(name=recipe.name, hash=recipe.sha256()[:12]))
        origin = "output.dir"
    resolved = (cwd / target).resolve()
    if resolved != cwd and cwd not in resolved.parents:
        raise UsageError(
            f"{origin}: {target} leaves the working directory; give an absolute --out to do that"
        )
    return resolved


@dataclass
class Previous:
    """What an earlier run left in the output directory."""

    record: dict[str, Any] | None
    done: dict[str, dict[str, Any]]


def claim_output_dir(
    directory: Path, recipe_sha: str, overwrite: bool, resume: bool, command: list[str], images: int
) -> tuple[OutputLock, Previous]:
    """Lock the directory for this run, then decide what an earlier run there left.

    Deciding under the lock means no other run can change the directory in between. On refusal the lock
    is released and a directory this call created is removed again: bad input leaves nothing behind.
    """
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"output path {directory} exists and is not a directory")
    lock = OutputLock(directory, command)
    try:
        try:
            lock.acquire()
        except OSError as exc:
            raise UsageError(f"cannot create output directory {directory}: {exc.strerror}") from None
        previous = inspect_output_dir(directory, recipe_sha, overwrite, resume)
        check_writable(directory)
        lock.remove_stale_temp_files()
        lock.reserve_space(images)
    except BaseException:
        lock.release(remove_directory_if_empty=True)
        raise
    return lock, previous


def inspect_output_dir(directory: Path, recipe_sha: str, overwrite: bool, resume: bool) -> Previous:
    """Decide whether the directory may be used; raise UsageError (exit 2) when it may not."""
    record_path = directory / RECORD_FILE
    record = read_json(record_path) if record_path.exists() else None
    if directory.is_dir() and not overwrite:
        if record is None and _has_visible_files(directory):
            raise UsageError(
                f"output directory {directory} holds files that are not a dgrun run; "
                "choose another --out, or pass --overwrite"
            )
        if record is not None and record.get("recipe_sha256") != recipe_sha:
            raise UsageError(
                f"output directory {directory} holds a run of a different recipe "
                f"({record.get('recipe', {}).get('name', '?')}, "
                f"sha256 {str(record.get('recipe_sha256'))[:12]}); "
                "pass --overwrite to replace it, or choose another --out"
            )
    if record is not None and overwrite:
        _remove_images(directory, record)
        record = None
    done: dict[str, dict[str, Any]] = {}
    if resume and record is not None:
        entries = {e.get("file"): e for e in record.get("images") or [] if isinstance(e, dict)}
        for image in resumable_images(record):
            path = directory / image.file
            if path.is_file() and not path.is_symlink() and sha256_file(path) == image.sha256:
                done[image.file] = entries[image.file]
    return Previous(record, done)


def check_writable(directory: Path) -> None:
    """Fail before generation starts if the directory cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable")


def _has_visible_files(directory: Path) -> bool:
    return any(not entry.name.startswith(".") for entry in directory.iterdir())


def _remove_images(directory: Path, record: dict[str, Any]) -> None:
    for image in resumable_images(record):
        (directory / image.file).unlink(missing_ok=True)
