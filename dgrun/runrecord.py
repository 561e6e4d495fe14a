"""The run record (run.json) as pydantic models: what a run writes, and what dgrun reads back.

`RunRecord` is what the runner fills in and saves; its JSON form is the documented run.json. Records also
travel (a run.json in a repository, a PNG in a chat) and are then untrusted input: `reproduce` and
`--resume` read them through the lenient `Recorded*` models below, so a malformed record is bad input
naming the field that is wrong (exit 2), never an internal error. Those ignore unknown keys: records of
other dgrun versions carry more (or fewer) fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dgrun.errors import UsageError, format_location

RECORD_FILE = "run.json"
RECORD_SCHEMA = 1

# An image file name as dgrun writes it: no directories, no hidden files.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$", max_length=255)]
Index = Annotated[int, Field(ge=0, le=10_000_000)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Written(BaseModel):
    """A part of the record dgrun writes (attribute access while the run fills it in)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class StepRecord(_Written):
    """One plan entry as run.json keeps it: what the step was, and what became of it."""

    step: str
    params: dict[str, Any]
    stage: str
    plugin: str
    on_unavailable: str
    status: str = "planned"  # planned | applied | no effect | fell back | skipped | failed
    detail: str | None = None
    seconds: float | None = None
    effect: dict[str, Any] | None = None  # the step's counters (StepEffect.record())


class Timings(_Written):
    load_seconds: float | None = None
    apply_seconds: float | None = None
    warmup_seconds: float | None = None
    first_call_seconds: float | None = None
    total_seconds: float | None = None


class ModelInfo(_Written):
    id: str
    kind: str | None = None
    pipeline_class: str | None = None


class TrustRemoteCode(_Written):
    recipe: bool
    command_line: bool
    effective: bool


class PluginEntry(_Written):
    name: str
    distribution: str
    version: str
    error: str | None = None


class RunRecord(_Written):
    """run.json: written when a run starts, after every batch, and however it ends."""

    schema_version: int = Field(RECORD_SCHEMA, alias="schema")
    status: str = "running"  # running | complete | failed | interrupted
    dgrun: str
    started_at: str
    finished_at: str | None = None
    command: list[str]
    recipe_file: str | None
    git: dict[str, Any] | None
    recipe: dict[str, Any]
    recipe_sha256: str
    versions: dict[str, str]
    plugins: list[PluginEntry]
    device: str
    world_size: int = 1
    dtype: str | None = None
    model: ModelInfo
    trust_remote_code: TrustRemoteCode
    plan: list[StepRecord]
    timings: Timings = Field(default_factory=Timings)
    peak_memory: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None  # machine.runtime_facts()
    images: list[dict[str, Any]] = Field(default_factory=list)  # one entry per finished image
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    ranks: list[dict[str, Any]] | None = None  # per-rank summaries of a distributed run

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, as run.json holds it (`ranks` only for distributed runs)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"ranks"} if self.ranks is None else None)

    def write(self, directory: Path) -> None:
        from dgrun.records import write_json

        write_json(Path(directory) / RECORD_FILE, self.as_dict())


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class RecordedImage(_Read):
    """One image entry of run.json."""

    file: FileName
    prompt_index: Index
    image_index: Index
    sha256: Digest | None = None


class RecordedRun(_Read):
    """What `reproduce` needs from a run.json."""

    recipe: dict[str, Any]
    images: list[RecordedImage]
    recipe_sha256: Digest | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    device: str | None = None
    recipe_file: str | None = None
    status: str = "complete"
    runtime: dict[str, Any] | None = None


class ImageChunk(_Read):
    """What `reproduce` needs from a PNG's `dgrun` chunk."""

    recipe: dict[str, Any]
    prompt_index: Index = 0
    image_index: Index = 0
    recipe_sha256: Digest | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    runtime: dict[str, Any] | None = None


def read_model(model: type[_Read], data: Any, what: str) -> Any:
    """Validate record data; UsageError naming the first wrong fields and what is wrong with them."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        lines = []
        for item in error.errors(include_url=False)[:5]:
            where = format_location(tuple(item["loc"])) or "the record"
            lines.append(f"{where}: {str(item['msg']).removeprefix('Value error, ')}")
        raise UsageError(f"{what} is malformed: " + "; ".join(lines)) from None


def resumable_images(record: dict[str, Any] | None) -> list[RecordedImage]:
    """The well-formed image entries of an earlier run.json (a malformed entry is simply not reused)."""
    images = record.get("images") if isinstance(record, dict) else None
    found = []
    for item in images if isinstance(images, list) else []:
        try:
            found.append(RecordedImage.model_validate(item))
        except ValidationError:
            continue
    return found
