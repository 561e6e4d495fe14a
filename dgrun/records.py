"""Run records and image files: atomic writes, PNG metadata, versions, hashes (docs/recipes.md, "Outputs").

Nothing here may make images depend on time or paths: the PNG's `dgrun` chunk holds only the resolved
recipe, the prompt, the seed and versions, so the same recipe with the same versions gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from dgrun.safeio import read_bounded

PNG_CHUNK = "dgrun"
TRACKED_PACKAGES = (
    "dgrun",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "numpy",
    "pillow",
    "safetensors",
)


def package_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions that decide whether a run is reproducible: Python, the ML stack, and plugins."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    if extra:
        versions.update(extra)
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same directory, fsync, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, before the rename
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())  # temp files are private; outputs are for sharing
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (reports, records)."""
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


MAX_RECORD_BYTES = 64 << 20
MAX_PNG_BYTES = 512 << 20
MAX_CHUNK_BYTES = 16 << 20


def read_json(path: Path) -> dict[str, Any] | None:
    """A run record (a regular file of bounded size), or None if it is missing, unreadable or not JSON."""
    try:
        data = json.loads(read_bounded(path, MAX_RECORD_BYTES, "run record").decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def png_metadata(info: dict[str, Any]) -> str:
    return json.dumps(info, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_png(path: Path, image: Any, info: dict[str, Any]) -> str:
    """Save a PIL image as PNG with the `dgrun` tEXt chunk, atomically; return its sha256."""
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text(PNG_CHUNK, png_metadata(info))
    _atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=chunk))
    return sha256_file(path)


class UnreadableImage(ValueError):
    """A PNG that is not a regular file, too large, not a PNG, or with an oversized or broken text chunk."""


def read_png_metadata(path: Path) -> dict[str, Any] | None:
    """The `dgrun` chunk of a PNG written by dgrun (None if it has none); UnreadableImage says why not.

    The file is read bounded into memory first, and PIL's own limit on decompressed text chunks stays on,
    so a crafted zTXt chunk cannot exhaust memory.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        raw = read_bounded(path, MAX_PNG_BYTES, "image")
    except (OSError, ValueError) as exc:
        raise UnreadableImage(getattr(exc, "strerror", None) or str(exc)) from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            text = getattr(image, "text", {}).get(PNG_CHUNK)
    except UnidentifiedImageError:
        raise UnreadableImage("not a PNG image") from None
    except (ValueError, OSError, SyntaxError) as exc:  # PIL: "Decompressed Data Too Large", broken chunks
        raise UnreadableImage(f"a PNG chunk cannot be read ({exc})") from None
    if text is None:
        return None
    if len(text) > MAX_CHUNK_BYTES:
        raise UnreadableImage(f"its dgrun chunk is larger than {MAX_CHUNK_BYTES} bytes")
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def peak_memory(device_kind: str) -> dict[str, Any]:
    """Peak memory so far: CUDA max allocated on GPU, the process's peak RSS otherwise."""
    if device_kind == "cuda":
        import torch

        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return {"kind": "peak_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)}
    except ImportError:
        return {"kind": "unavailable", "bytes": None}
