"""Faults of the machine in words a client can act on: a full disk, server paths.

A full disk shows up as an :class:`OSError` (``ENOSPC``, ``EDQUOT``) from a write, or as
SQLite's ``database or disk is full``. Both are answered 507 by the API and recorded on a job
as ``disk: ...`` with what to do. Messages that reach clients (a job's ``error``) name files
relative to the service's folders, never by the server's absolute paths.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) says the disk is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if (
            isinstance(e, sqlite3.Error)
            and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_store_error(exc: BaseException) -> bool:
    """True for the errors a write to the job store or a job folder can raise when the
    machine, not the request, is at fault (SQLite errors, a full disk)."""
    return isinstance(exc, sqlite3.Error) or is_disk_full(exc)


def redact_paths(text: str, roots: Iterable[str | os.PathLike]) -> str:
    """``text`` with every ``root/`` prefix removed (each root as given and resolved), so a
    file reads as ``mnist/c/0/0`` instead of the server's absolute path."""
    forms: set[str] = set()
    for root in roots:
        for p in (Path(root), Path(root).resolve(), Path(root).absolute()):
            forms.add(str(p).rstrip("/"))
    for form in sorted(forms, key=len, reverse=True):
        if len(form) > 1 and form != ".":  # never "/": that would drop every slash
            text = text.replace(form + "/", "")
    return text


def job_failure(exc: BaseException, roots: Iterable[str | os.PathLike]) -> str:
    """What a job's ``error`` says for the exception that ended it."""
    if is_disk_full(exc):
        return (
            "disk: no space left on the device of the service's state or data folder while"
            f" the job ran ({redact_paths(str(exc), roots)}); the job keeps its last"
            " checkpoint: free space, then POST /jobs/ID/retry (sae retry ID) continues it"
        )
    return redact_paths(f"{type(exc).__name__}: {exc}", roots)


async def storage_error(request, exc: Exception):
    """The API's answer to an error of the disk or the job store outside a route's own
    handling: 507 for a full disk, 503 for a busy or failing store, naming ``storage``.
    Any other error is raised again (a 500, logged with its traceback)."""
    from fastapi.responses import JSONResponse

    if is_disk_full(exc):
        return JSONResponse(
            {"detail": "storage: the service's disk is full; free space and try again"},
            status_code=507,
        )
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower():
        return JSONResponse(
            {"detail": "storage: the job store is busy; try again"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    raise exc  # a broken disk or store: a 500, logged with its traceback
