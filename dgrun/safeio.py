"""Reading untrusted files: regular files only, bounded in size, never blocking.

Recipes, bases, run records, PNGs and model indexes may name any path, including a FIFO (which would hang
a plain `open`) or /dev/zero (which would fill memory). Everything dgrun reads as input goes through here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError/ValueError say why not.

    Opened without blocking and checked with fstat before reading, so a FIFO, a device such as /dev/zero,
    or a directory is refused at once instead of hanging or filling memory.
    """
    mode = os.stat(path).st_mode  # before open: opening some devices has side effects
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"is not a regular {what} (a device, FIFO or socket)")
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)  # it may have been swapped since the stat
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"is not a regular {what} (a device, FIFO or socket)")
        if info.st_size > limit:
            raise TooLarge(f"{what} is larger than {limit} bytes")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(descriptor, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise TooLarge(f"{what} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


class NotRegularFile(ValueError):
    """The path is a device, FIFO or socket: never read as input."""


class TooLarge(ValueError):
    """The file is over its size limit."""
