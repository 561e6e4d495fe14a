"""The parts of a run record and of a PNG's `dgrun` chunk that dgrun reads back, as pydantic models.

Records travel (a run.json in a repository, a PNG in a chat) and are untrusted input: `reproduce` and
`--resume` read them through these models, so a malformed record is bad input naming the field that is
wrong (exit 2), never an internal error. Unknown keys are ignored: records of other dgrun versions carry
more (or fewer) fields than these.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dgrun.errors import UsageError, format_location

# An image file name as dgrun writes it: no directories, no hidden files.
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$", max_length=255)]
Index = Annotated[int, Field(ge=0, le=10_000_000)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


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


class ImageChunk(_Read):
    """What `reproduce` needs from a PNG's `dgrun` chunk."""

    recipe: dict[str, Any]
    prompt_index: Index = 0
    image_index: Index = 0
    recipe_sha256: Digest | None = None
    versions: dict[str, str] = Field(default_factory=dict)


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
