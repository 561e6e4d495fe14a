"""One writer per output directory: an exclusive lock held for the whole run, and a disk-space reserve.

Two runs into one directory would both exit 0 while one's images silently replace the other's. The lock
is an `flock` on `.dgrun.lock` inside the directory: the kernel releases it when the holder exits in any
way (kill -9 included), so a lock is never stale. The file names its holder (pid, start time, command) for
the message the second run gets.

The reserve is a file of real, allocated blocks that the run gives back when a write fails for lack of
space, so that the final run.json (status `failed`, the cause, every finished image) still fits on a full
disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dgrun.errors import UsageError

LOCK_FILE = ".dgrun.lock"
RESERVE_FILE = ".dgrun.reserve"
RESERVE_BASE_BYTES = 1 << 20
RESERVE_PER_IMAGE_BYTES = 1024
RESERVE_MAX_BYTES = 64 << 20
# Temp files of dgrun's atomic writes (`.NAME.RANDOM.tmp`): under the lock, any left is from a dead run.
STALE_TEMP = re.compile(r"^\.(run\.json|report\.json|.+\.png)\.[A-Za-z0-9_]+\.tmp$")


class DirectoryLocked(UsageError):
    """Another dgrun run holds the output directory."""


class OutputLock:
    """The exclusive lock of one output directory (`acquire` creates the directory if needed)."""

    def __init__(self, directory: Path, command: list[str] | None = None):
        self.directory = Path(directory)
        self.command = list(command or [])
        self.descriptor: int | None = None
        self.created_directory = False
        self.reserve: Path | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def acquire(self) -> None:
        """Take the lock or raise DirectoryLocked naming the holder."""
        import fcntl

        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created_directory = True
        for _ in range(10):  # the holder may remove the file between our open and our lock: retry
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(descriptor)
                os.close(descriptor)
                raise DirectoryLocked(
                    f"output directory {self.directory} is in use by another dgrun run ({holder}); "
                    "wait for it to finish, or choose another --out"
                ) from None
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)
        else:
            raise UsageError(f"cannot lock output directory {self.directory}: the lock file keeps changing")
        self.descriptor = descriptor
        info = {
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(info).encode("utf-8"), 0)

    def remove_stale_temp_files(self) -> list[str]:
        """Delete temp files of earlier runs that died mid-write (only while holding the lock)."""
        removed = []
        for entry in self.directory.iterdir():
            if STALE_TEMP.match(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def reserve_space(self, images: int) -> None:
        """Set aside allocated blocks for the final record (best effort: a full disk gets no reserve)."""
        size = min(RESERVE_MAX_BYTES, RESERVE_BASE_BYTES + RESERVE_PER_IMAGE_BYTES * images)
        path = self.directory / RESERVE_FILE
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(descriptor, 0, size)
                else:
                    os.write(descriptor, b"\0" * size)
            finally:
                os.close(descriptor)
        except OSError:
            path.unlink(missing_ok=True)
            return
        self.reserve = path

    def release_reserve(self) -> bool:
        """Give the reserved blocks back (when a write has failed for lack of space)."""
        if self.reserve is None:
            return False
        self.reserve.unlink(missing_ok=True)
        self.reserve = None
        return True

    def release(self, remove_directory_if_empty: bool = False) -> None:
        """Drop the reserve and the lock; remove the directory if this run created it and left nothing."""
        self.release_reserve()
        if self.descriptor is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: a waiting opener re-checks the inode
        os.close(self.descriptor)
        self.descriptor = None
        if remove_directory_if_empty and self.created_directory:
            with contextlib.suppress(OSError):
                self.directory.rmdir()


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        mine, current = os.fstat(descriptor), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _holder(descriptor: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info: Any = json.loads(os.pread(descriptor, 64 * 1024, 0).decode("utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "its pid is not recorded yet"
    return f"pid {info.get('pid', '?')}, started {info.get('started_at', '?')}"


def is_out_of_space(error: BaseException) -> bool:
    """Whether an OSError means the disk (or quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
