"""The commit and recipe state of a git checkout, read from `.git` without running git.

Recipes and run records are untrusted input. A directory chosen by an attacker can hold a `.git/config`
whose `core.fsmonitor`, or a `.gitattributes` filter driver, makes `git status` run a program of its
choosing. So this module reads HEAD, refs and the index itself and never starts a process. Every read is
bounded, of regular files only, and opened non-blocking, so a FIFO or device planted in `.git` cannot hang
or feed it; ref names are checked before use, so a crafted HEAD cannot point it at arbitrary files.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any

from dgrun.safeio import read_bounded

MAX_LEVELS = 64  # directories walked up from the recipe looking for `.git`
MAX_SYMREF_DEPTH = 5  # symbolic refs followed from HEAD before giving up
SMALL_LIMIT = 1 << 20  # HEAD, loose refs, `.git` files, commondir, config
PACKED_REFS_LIMIT = 1 << 20
INDEX_LIMIT = 64 << 20
RECIPE_LIMIT = 64 << 20
_BAD_REF_CHARS = frozenset(" ~^:?*[\\\x7f")
_PARSE_ERRORS = (OSError, ValueError, IndexError, struct.error)


def git_state(recipe: Path) -> dict[str, Any] | None:
    """Commit, branch and dirtiness of the git work tree holding `recipe`, so a run can be traced to history.

    Returns None when the recipe is not in a work tree or its commit cannot be read (unborn branch,
    reftable refs, corrupt or oversized files). `recipe_modified` compares the recipe's blob id with its
    entry in the index, so staged changes count as unmodified: what `git diff` without --cached shows.
    Clean filters are never run; a file whose only difference is CRLF line ends, as `core.autocrlf`
    would store it, counts as unmodified. It is None when the index is missing, unparsable or unsupported.
    """
    try:
        path = Path(recipe).resolve()
        found = _find_repository(path.parent)
        if found is None:
            return None
        worktree, gitdir = found
        common = _common_dir(gitdir)
        hash_name = _hash_name(common)
        head = _resolve_head(gitdir, common, hashlib.new(hash_name).digest_size * 2)
    except (*_PARSE_ERRORS, RuntimeError):  # RuntimeError: symlink loops in Path.resolve before 3.13
        return None
    if head is None:
        return None
    commit, ref = head
    modified = _recipe_modified(path, worktree, gitdir, hash_name)
    return {"commit": commit, "recipe_modified": modified, "branch": ref and ref.removeprefix("refs/heads/")}


def _read(path: Path, limit: int) -> bytes:
    return read_bounded(path, limit, "git file")


def work_tree(directory: Path) -> Path | None:
    """The git work tree holding `directory` (nothing read but directory entries), or None."""
    try:
        found = _find_repository(Path(directory).resolve())
    except (*_PARSE_ERRORS, RuntimeError):
        return None
    return found[0] if found else None


def _find_repository(directory: Path) -> tuple[Path, Path] | None:
    """The (work tree, git dir) of the nearest `.git` above `directory`, a directory or a `gitdir:` file."""
    for _ in range(MAX_LEVELS):
        dotgit = directory / ".git"
        try:
            mode = os.stat(dotgit).st_mode
        except OSError:
            mode = 0
        if stat.S_ISDIR(mode):
            return directory, dotgit
        if stat.S_ISREG(mode):  # worktrees and submodules: "gitdir: PATH", relative to this directory
            text = _read(dotgit, SMALL_LIMIT).decode("utf-8").strip()
            target = text[7:].strip() if text.startswith("gitdir:") else ""
            return (directory, directory / target) if target else None
        if directory.parent == directory:
            return None
        directory = directory.parent
    return None


def _common_dir(gitdir: Path) -> Path:
    """Where refs, packed-refs and config live: a linked worktree's `commondir`, else the git dir itself."""
    try:
        text = _read(gitdir / "commondir", SMALL_LIMIT).decode("utf-8").strip()
    except FileNotFoundError:
        return gitdir
    if not text:
        raise ValueError("empty commondir")
    return gitdir / text


def _hash_name(common: Path) -> str:
    """The object hash: sha256 when the config's [extensions] says `objectformat = sha256`, else sha1."""
    try:
        text = _read(common / "config", SMALL_LIMIT).decode("utf-8", "replace")
    except _PARSE_ERRORS:
        return "sha1"
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line[1 : line.find("]")].strip().lower() if "]" in line else ""
            continue
        key, equals, value = line.partition("=")
        if section == "extensions" and equals and key.strip().lower() == "objectformat":
            value = value.split("#")[0].split(";")[0].strip().strip('"').lower()
            return "sha256" if value == "sha256" else "sha1"
    return "sha1"


def _valid_ref(name: str) -> bool:
    """Git's own ref-name rules, roughly; above all no `..`, no absolute path and a `refs/` prefix."""
    if not name.startswith("refs/") or name.endswith("/") or ".." in name or "@{" in name:
        return False
    if any(ord(char) < 0x20 or char in _BAD_REF_CHARS for char in name):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in name.split("/"))


def _resolve_head(gitdir: Path, common: Path, hex_len: int) -> tuple[str, str | None] | None:
    """(commit, ref name or None when detached); None for an unborn branch or a ref that cannot be read."""
    content = _read(gitdir / "HEAD", SMALL_LIMIT).strip()
    ref: str | None = None
    for _ in range(MAX_SYMREF_DEPTH):
        if not content.startswith(b"ref:"):
            break
        ref = content[4:].strip().decode("utf-8")
        if not _valid_ref(ref):
            return None
        target = _read_ref(gitdir, common, ref)
        if target is None:
            return None
        content = target
    commit = content.decode("ascii")
    return (commit, ref) if len(commit) == hex_len and set(commit) <= set("0123456789abcdef") else None


def _read_ref(gitdir: Path, common: Path, ref: str) -> bytes | None:
    """A ref's content from a loose file (git dir, then common dir) or packed-refs; None if it is absent."""
    for base in dict.fromkeys((gitdir, common)):
        try:
            return _read(base / ref, SMALL_LIMIT).strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
    try:
        packed = _read(common / "packed-refs", PACKED_REFS_LIMIT)
    except FileNotFoundError:
        return None
    wanted = ref.encode("utf-8")
    for line in packed.splitlines():
        if line.startswith((b"#", b"^")):  # header and peeled tag lines
            continue
        oid, _, name = line.partition(b" ")
        if name.strip() == wanted:
            return oid.strip()
    return None


def _recipe_modified(recipe: Path, worktree: Path, gitdir: Path, hash_name: str) -> bool | None:
    """True when the recipe differs from the index or is not in it; None when the index cannot say."""
    try:
        relative = recipe.relative_to(worktree).as_posix()
        if ".git" in relative.split("/"):
            return None
        index = _read(gitdir / "index", INDEX_LIMIT)
        staged = _index_entry(index, os.fsencode(relative), hashlib.new(hash_name).digest_size)
        if staged is None:
            return True
        data = _read(recipe, RECIPE_LIMIT)
    except _PARSE_ERRORS:
        return None
    ids = {_blob_id(data, hash_name)}
    if b"\r\n" in data:
        ids.add(_blob_id(data.replace(b"\r\n", b"\n"), hash_name))
    return staged not in ids


def _blob_id(data: bytes, hash_name: str) -> bytes:
    return hashlib.new(hash_name, b"blob %d\0" % len(data) + data).digest()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """Git's offset varint (index v4 prefix lengths): each continuation byte adds one before shifting."""
    byte = data[pos]
    pos += 1
    value = byte & 0x7F
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        value = ((value + 1) << 7) | (byte & 0x7F)
    return value, pos


def _index_entry(data: bytes, name: bytes, oid_size: int) -> bytes | None:
    """The staged blob id of `name`: None if absent, b"" for a conflict or intent-to-add entry.

    Raises ValueError (or IndexError, struct.error) for a corrupt index, an unsupported version, a split
    index (its entries live in another file) or a name hidden inside a sparse-index directory entry.
    """
    if len(data) < 12 + oid_size or data[:4] != b"DIRC":
        raise ValueError("not a git index")
    version, count = struct.unpack_from(">II", data, 4)
    if version not in (2, 3, 4):
        raise ValueError(f"unsupported index version {version}")
    end = len(data) - oid_size  # the trailing checksum
    pos, path, found = 12, b"", None
    for _ in range(count):
        start = pos
        oid = data[pos + 40 : pos + 40 + oid_size]
        pos += 40 + oid_size
        (flags,) = struct.unpack_from(">H", data, pos)
        pos += 2
        extended = 0
        if flags & 0x4000:
            if version < 3:
                raise ValueError("extended flag in a version 2 index")
            (extended,) = struct.unpack_from(">H", data, pos)
            pos += 2
        if version == 4:
            strip, pos = _varint(data, pos)
            if strip > len(path):
                raise ValueError("bad prefix length")
            nul = data.index(b"\0", pos, end)
            path = path[: len(path) - strip] + data[pos:nul]
            pos = nul + 1
        else:
            nul = data.index(b"\0", pos, end)
            path = data[pos:nul]
            pos = start + ((pos - start + len(path) + 8) & ~7)  # NUL-padded to a multiple of 8
        if pos > end or (flags & 0xFFF) != min(len(path), 0xFFF):
            raise ValueError("truncated or inconsistent index entry")
        if path == name:
            stage, intent_to_add = (flags >> 12) & 3, extended & 0x2000
            found = b"" if stage or intent_to_add else oid
        elif path.endswith(b"/") and name.startswith(path):
            raise ValueError("recipe is inside a sparse-index directory entry")
    while pos + 8 <= end:
        signature, size = data[pos : pos + 4], struct.unpack_from(">I", data, pos + 4)[0]
        if signature == b"link":
            raise ValueError("split index")
        pos += 8 + size
    return found
