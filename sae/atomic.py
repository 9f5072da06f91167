"""Atomic file replacement: the one place files are written so a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames inside ``directory`` durable (POSIX; a no-op where there is no O_DIRECTORY)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], object],
    *,
    fsync: bool = True,
    sync_dir: bool = False,
    mode: int = 0o644,
) -> Path:
    """Replace the file at ``path`` with what ``write(fh)`` writes, atomically.

    Writes a temporary file in the same directory, optionally fsyncs it, gives it ``mode``
    (mkstemp makes 0600), ``os.replace``-s it onto ``path`` and, with ``sync_dir``, fsyncs the
    directory. On any error the temporary file is removed and the old file is left untouched.

    Returns
    -------
    path : Path
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path
