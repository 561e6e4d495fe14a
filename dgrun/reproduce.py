"""`dgrun reproduce`: run a recorded experiment again and say whether its images came out the same.

The recipe comes from the record itself — run.json's resolved recipe, or the `dgrun` chunk of a PNG — so
a single image copied anywhere is enough: no recipe file, checkout or run directory is needed. The new
run goes into a new directory; nothing recorded is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgrun.errors import Position, UsageError
from dgrun.loading import LoadedRecipe, recipe_from_resolved
from dgrun.machine import runtime_differences
from dgrun.metrics import compare
from dgrun.outputs import resolve_output_dir
from dgrun.plugins import Registry
from dgrun.records import UnreadableImage, read_json, read_png_metadata, sha256_file
from dgrun.runner import Run, RunObserver, RunOptions
from dgrun.runrecord import ImageChunk, RecordedRun, read_model
from dgrun.yamlio import SourceMap

PASSING = ("identical", "same pixels", "within tolerance")


@dataclass
class Target:
    """A recorded image to compare: which job it was, and the bytes we have of it (file and/or hash)."""

    prompt_index: int
    image_index: int
    file: str
    path: Path | None  # the recorded image on disk, if it is there
    sha256: str | None  # the hash the record states


@dataclass
class Origin:
    """What the record says: the resolved recipe, the environment, and the images to compare."""

    kind: str  # "run" (run.json) or "image" (a PNG)
    path: Path
    recipe: dict[str, Any]
    recipe_sha256: str | None
    versions: dict[str, str]
    device: str | None
    recipe_file: Path | None
    targets: list[Target]
    status: str = "complete"  # the recorded run's status; an unfinished run is compared on what it made
    runtime: dict[str, Any] | None = None  # threads, CPU capability, ... as recorded


@dataclass
class ImageCheck:
    """One recorded image against its new counterpart."""

    file: str
    new_file: str | None
    status: str  # identical | same pixels | within tolerance | drift | missing
    psnr_db: float | None = None  # None with identical pixels (infinite)
    max_abs_diff: int | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status in PASSING


@dataclass
class Reproduction:
    """The outcome: per-image checks, environment differences, and where the new run went."""

    origin: Origin
    out_dir: Path
    record: dict[str, Any]
    images: list[ImageCheck]
    version_changes: list[tuple[str, str, str]] = field(default_factory=list)
    runtime_changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return bool(self.images) and all(check.passed for check in self.images)


def read_origin(path: Path) -> Origin:
    """Read a run.json or a dgrun PNG; UsageError (exit 2) if it is neither, or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() == ".png":
        return _image_origin(path)
    data = read_json(path)
    if data is None or "recipe" not in data or "images" not in data:
        raise UsageError(f"{path}: not a dgrun run record (run.json) or a dgrun PNG")
    record: RecordedRun = read_model(RecordedRun, data, f"{path}: the run record")
    targets = []
    for image in record.images:
        candidate = path.parent / image.file
        on_disk = candidate if candidate.is_file() and not candidate.is_symlink() else None
        targets.append(Target(image.prompt_index, image.image_index, image.file, on_disk, image.sha256))
    return Origin(
        "run",
        path,
        record.recipe,
        record.recipe_sha256,
        dict(record.versions),
        record.device,
        Path(record.recipe_file) if record.recipe_file else None,
        targets,
        record.status,
        record.runtime,
    )


def _image_origin(path: Path) -> Origin:
    try:
        meta = read_png_metadata(path)
    except UnreadableImage as exc:
        raise UsageError(f"{path}: not a readable dgrun PNG: {exc}") from None
    if meta is None or "recipe" not in meta:
        raise UsageError(
            f"{path}: this PNG has no dgrun chunk; only images written by dgrun can be reproduced"
        )
    chunk: ImageChunk = read_model(ImageChunk, meta, f"{path}: the image's dgrun chunk")
    target = Target(chunk.prompt_index, chunk.image_index, path.name, path, sha256_file(path))
    return Origin(
        "image",
        path,
        chunk.recipe,
        chunk.recipe_sha256,
        dict(chunk.versions),
        None,
        None,
        [target],
        runtime=chunk.runtime,
    )


def new_out_dir(recipe: Any, out: str | None) -> Path:
    """`--out` (which must be new or empty), else the first free `output.dir`-reproduce[-N]."""
    if out is not None:
        directory = Path(out).expanduser().resolve()
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise UsageError(f"--out {directory} is not empty; reproduce writes into a new directory")
        return directory
    base = resolve_output_dir(recipe, None)
    for number in range(1, 10_000):
        suffix = "-reproduce" if number == 1 else f"-reproduce-{number}"
        directory = base.with_name(base.name + suffix)
        if not directory.exists():
            return directory
    raise UsageError(f"no free directory name next to {base}; pass --out")


def reproduce(
    path: Path,
    registry: Registry,
    out: str | None = None,
    tolerance: float | None = None,
    trust_remote_code: bool = False,
    argv: list[str] | None = None,
    observer: RunObserver | None = None,
    threads: int | None = None,
    wait_policy: str | None = None,
) -> Reproduction:
    """Re-run the recorded recipe into a new directory and compare every recorded image.

    The recorded CPU thread count is used again (CPU images depend on it) unless `threads` says otherwise;
    from a PNG, only the call that made that image is run again.
    """
    origin = read_origin(path)
    display = str(origin.path)
    recipe = recipe_from_resolved(origin.recipe, f"<recipe recorded in {display}>")
    # Relative local model paths resolve against the recorded recipe's folder, as they did in the run.
    # Nothing else is taken from the recorded paths: no git (record_git off), nothing run.
    recipe_path = origin.recipe_file if origin.recipe_file and origin.recipe_file.is_file() else None
    loaded = LoadedRecipe(
        recipe, SourceMap(default=Position(display)), recipe_path or origin.path.parent / "recorded-recipe"
    )
    out_dir = new_out_dir(recipe, out)
    recorded_threads = (origin.runtime or {}).get("threads")
    options = RunOptions(
        out=str(out_dir),
        trust_remote_code=trust_remote_code,
        argv=list(argv or []),
        record_git=False,
        threads=threads
        or (recorded_threads if isinstance(recorded_threads, int) and recorded_threads > 0 else None),
        wait_policy=wait_policy,
        only={(t.prompt_index, t.image_index) for t in origin.targets} if origin.kind == "image" else None,
    )
    record = Run(loaded, registry, options, observer or RunObserver()).execute()
    result = Reproduction(origin, out_dir, record, [])
    if origin.status != "complete":
        count = len(origin.targets)
        result.notes.append(
            f"the recorded run is {origin.status}: only its {count} finished images are compared"
        )
    if origin.recipe_sha256 and recipe.sha256() != origin.recipe_sha256:
        result.notes.append(
            "the recipe re-validated to a different sha256 (this dgrun fills it in differently), "
            "so PNG metadata cannot match byte for byte"
        )
    new_images = {(i["prompt_index"], i["image_index"]): i for i in record["images"]}
    for target in origin.targets:
        result.images.append(
            check_image(target, new_images.get((target.prompt_index, target.image_index)), out_dir, tolerance)
        )
    recorded, current = origin.versions, record.get("versions") or {}
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            result.version_changes.append((name, recorded.get(name, "absent"), current.get(name, "absent")))
    if origin.device and origin.device != record.get("device"):
        result.notes.append(f"device differs: recorded {origin.device}, now {record.get('device')}")
    result.runtime_changes = runtime_differences(origin.runtime, record.get("runtime"))
    return result


def check_image(
    target: Target, new: dict[str, Any] | None, out_dir: Path, tolerance: float | None
) -> ImageCheck:
    """Same bytes, else same pixels (metadata differs), else PSNR against the tolerance."""
    from PIL import Image

    if new is None:
        return ImageCheck(target.file, None, "missing", detail="the new run made no such image")
    new_path = out_dir / new["file"]
    check = ImageCheck(target.file, str(new_path), "drift")
    if target.path is None:
        if target.sha256 == new["sha256"]:
            check.status, check.detail = "identical", "recorded file absent; its sha256 matches"
        else:
            check.detail = "recorded file absent and its sha256 differs; pixels cannot be compared"
        return check
    recorded_sha = sha256_file(target.path)
    if target.sha256 and recorded_sha != target.sha256:
        check.detail = "the file on disk differs from its recorded sha256; "
    if recorded_sha == new["sha256"]:
        check.status, check.max_abs_diff = "identical", 0
        return check
    with Image.open(target.path) as old_image, Image.open(new_path) as new_image:
        fidelity = compare(old_image, new_image, with_lpips=False)
    if not fidelity["comparable"]:
        check.detail += fidelity["reason"]
        return check
    check.psnr_db, check.max_abs_diff = fidelity["psnr_db"], fidelity["max_abs_diff"]
    if fidelity["identical"]:
        check.status = "same pixels"
        check.detail += "pixels identical; the PNG's metadata differs (recipe, versions or runtime)"
    elif tolerance is not None and check.psnr_db is not None and check.psnr_db >= tolerance:
        check.status = "within tolerance"
    return check
