"""Job records in SQLite (WAL): creation, idempotency, compare-and-set status changes.

A job's status moves ``queued -> running -> succeeded | failed | cancelled`` (and back to
``queued`` when a running job is taken over after a restart). Every change of status is a
compare-and-set: it names the statuses it may replace, so a terminal status is never
overwritten. A job is acknowledged only after its row is committed (``synchronous=FULL``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
#: A job whose runs ended this many times in a row by a crash of the service, each without
#: progress (no new iteration recorded), fails instead of being started again: it is likely
#: what brings the service down. A run that made progress, or that ended by a clean stop of
#: the service (the runner then sets ``crashes`` to 0), starts the count again.
MAX_CRASHES = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    iteration INTEGER NOT NULL DEFAULT 0,
    max_iter INTEGER NOT NULL DEFAULT 0,
    cost REAL,
    grad_norm REAL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    eta_seconds REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    claim_mark TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""

#: Columns added after the first release, with their definitions (added to older stores).
_ADDED_COLUMNS = {
    "crashes": "INTEGER NOT NULL DEFAULT 0",
    "claim_mark": "TEXT",
}

#: Where a job is: its stage and iteration (compared at a crash with the mark of its claim).
_MARK = "COALESCE(stage, '') || ':' || iteration"

_PROGRESS_FIELDS = (
    "iteration",
    "max_iter",
    "cost",
    "grad_norm",
    "stage",
    "progress",
    "eta_seconds",
)


class IdempotencyConflict(ValueError):
    """An ``Idempotency-Key`` was reused with a different spec."""


@dataclass(frozen=True)
class Job:
    """One row of the job table."""

    id: str
    seq: int
    status: str
    spec: dict[str, Any]
    idempotency_key: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    iteration: int
    max_iter: int
    cost: float | None
    grad_norm: float | None
    stage: str | None
    progress: float
    eta_seconds: float | None
    error: str | None
    attempts: int
    crashes: int = 0
    claim_mark: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d.pop("spec_hash", None)
        d["spec"] = json.loads(d["spec"])
        return cls(**d)

    @property
    def terminal(self) -> bool:
        """True once the job has finished one way or another."""
        return self.status in TERMINAL


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable digest of a spec (for idempotent retries)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class JobStore:
    """The job table of one state directory.

    Parameters
    ----------
    path : path
        The SQLite file (created with its folder when missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        have = {r["name"] for r in conn.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:  # a store written by an older release
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> JobStore._Tx:
        return JobStore._Tx(self._conn())

    # -- creation and lookup ---------------------------------------------------------------

    def create(
        self, spec: dict[str, Any], max_iter: int, idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """Add a queued job, or return the job already made with the same idempotency key.

        Returns
        -------
        job : Job
        created : bool
            False when an earlier request with the same key made the job.

        Raises
        ------
        IdempotencyConflict
            If the key was used before with a different spec.
        """
        digest = spec_hash(spec)
        now = time.time()
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    if row["spec_hash"] != digest:
                        raise IdempotencyConflict(
                            "Idempotency-Key: this key was used for a different spec"
                        )
                    return Job.from_row(row), False
            job_id = uuid.uuid4().hex[:16]
            db.execute(
                "INSERT INTO jobs (id, status, spec, spec_hash, idempotency_key, created_at,"
                " updated_at, max_iter) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(spec), digest, idempotency_key, now, now, max_iter),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row), True

    def find_idempotent(self, idempotency_key: str, spec: dict[str, Any]) -> Job | None:
        """The job made earlier with this key, or None.

        Raises
        ------
        IdempotencyConflict
            If the key was used before with a different spec.
        """
        row = (
            self._conn()
            .execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
            .fetchone()
        )
        if row is None:
            return None
        if row["spec_hash"] != spec_hash(spec):
            raise IdempotencyConflict("Idempotency-Key: this key was used for a different spec")
        return Job.from_row(row)

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(
        self, status: Iterable[str] | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """Jobs newest first, optionally of some statuses; also the total count."""
        where, args = "", []
        if status:
            status = list(status)
            where = f"WHERE status IN ({','.join('?' * len(status))})"
            args = status
        db = self._conn()
        total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
        rows = db.execute(
            f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        return [Job.from_row(r) for r in rows], int(total)

    def counts(self) -> dict[str, int]:
        """Number of jobs in each status."""
        rows = self._conn().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: int(n) for s, n in rows})
        return out

    def delete(self, job_id: str) -> bool:
        """Remove a job's record; True if there was one."""
        with self._tx() as db:
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    # -- status changes ----------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        expected: Iterable[str],
        new: str,
        run: int | None = None,
        **fields: Any,
    ) -> Job | None:
        """Compare-and-set the status: change it to ``new`` only if it is one of ``expected``
        (and, with ``run``, only if the job's ``attempts`` is ``run``: the outcome of one run
        never lands on a later run of the job).

        Returns
        -------
        job : Job or None
            The updated job, or None if the job is gone or its status was not expected.
        """
        if new not in STATUSES:
            raise ValueError(f"status: choose one of {STATUSES}, got {new!r}")
        expected = list(expected)
        now = time.time()
        sets = {"status": new, "updated_at": now, **fields}
        if new == "running":
            sets.setdefault("started_at", now)
        if new in TERMINAL:
            sets.setdefault("finished_at", now)
            sets.setdefault("eta_seconds", None)
        cols = ", ".join(f"{k} = ?" for k in sets)
        same_run = "" if run is None else " AND attempts = ?"
        with self._tx() as db:
            n = db.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status IN"
                f" ({','.join('?' * len(expected))}){same_run}",
                [*sets.values(), job_id, *expected, *([] if run is None else [run])],
            ).rowcount
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() if n else None
        return Job.from_row(row) if row else None

    def resume(
        self,
        job_id: str,
        spec: dict[str, Any] | None = None,
        max_iter: int | None = None,
        expected: Iterable[str] = TERMINAL,
    ) -> Job | None:
        """Queue a cancelled, failed or succeeded job again; it continues from its checkpoint.

        Compare-and-set like :meth:`transition` (from one of the ``expected`` statuses, all
        finished ones by default). ``spec`` (a changed ``max_iter``) and
        ``max_iter`` (of the first stage) replace the job's; its crash budget starts again
        (``crashes`` is 0; ``attempts`` at least 1, so the next run resumes its checkpoint).

        Returns
        -------
        job : Job or None
            The queued job, or None if it is gone or not finished.
        """
        sets: dict[str, Any] = {
            "status": "queued",
            "updated_at": time.time(),
            "finished_at": None,
            "eta_seconds": None,
            "error": None,
            "crashes": 0,
        }
        if spec is not None:
            sets["spec"] = json.dumps(spec)
        # attempts only grow (each run is told apart by them); at least 1, so the next run,
        # the second, resumes the checkpoint
        assignments = [f"{k} = ?" for k in sets] + ["attempts = MAX(attempts, 1)"]
        params = list(sets.values())
        if max_iter is not None:  # the progress of the iterations done, of the new total
            assignments += ["max_iter = ?", "progress = MIN(1.0, CAST(iteration AS REAL) / ?)"]
            params += [max_iter, max_iter]
        cols = ", ".join(assignments)
        with self._tx() as db:
            expected = [e for e in expected if e in TERMINAL]
            n = db.execute(
                f"UPDATE jobs SET {cols} WHERE id = ? AND status IN"
                f" ({','.join('?' * len(expected))})",
                [*params, job_id, *expected],
            ).rowcount
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() if n else None
        return Job.from_row(row) if row else None

    def claim_next(self) -> Job | None:
        """Move the oldest queued job to ``running`` and return it (None if none is queued)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = ?,"
                f" started_at = COALESCE(started_at, ?), error = NULL, claim_mark = {_MARK}"
                " WHERE id = ? AND status = 'queued'",
                (now, now, row["id"]),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return Job.from_row(row)

    def update_progress(
        self, job_id: str, statuses: Iterable[str] = ("running",), **fields: Any
    ) -> bool:
        """Record iteration, cost, gradient norm, stage, progress or ETA of a running job (or
        of a job in one of ``statuses``: a cancelled job's last checkpoint is written after
        the cancel)."""
        bad = set(fields) - set(_PROGRESS_FIELDS)
        if bad:
            raise ValueError(f"fields: not progress fields: {sorted(bad)}")
        statuses = list(statuses)
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            return (
                db.execute(
                    f"UPDATE jobs SET {cols} WHERE id = ? AND status IN"
                    f" ({','.join('?' * len(statuses))})",
                    [*fields.values(), job_id, *statuses],
                ).rowcount
                > 0
            )

    def requeue_running(self, max_crashes: int = MAX_CRASHES) -> list[str]:
        """Put every ``running`` job back in the queue (nobody runs them after a restart).

        Each such job's run ended by a crash of the service. A run that made progress (a new
        iteration or stage recorded since it was claimed) starts the job's crash count again;
        one that made none adds one to it, and a job at ``max_crashes`` fails instead of
        restarting: a job that brings the process down would otherwise restart it forever.
        Clean stops never count (they put their jobs back in the queue themselves).

        Returns
        -------
        ids : list of str
            The jobs put back in the queue.
        """
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id, crashes, claim_mark, {_MARK} AS mark FROM jobs"
                " WHERE status = 'running'"
            ).fetchall()
            ids = []
            for r in rows:
                progressed = r["claim_mark"] is None or r["mark"] != r["claim_mark"]
                crashes = 0 if progressed else int(r["crashes"]) + 1
                if crashes >= max_crashes:
                    db.execute(
                        "UPDATE jobs SET status = 'failed', updated_at = ?, finished_at = ?,"
                        " eta_seconds = NULL, crashes = ?, error = ?"
                        " WHERE id = ? AND status = 'running'",
                        (
                            now,
                            now,
                            crashes,
                            f"the service crashed {crashes} times in a row while this job ran,"
                            " each time before it made progress; not restarted again"
                            " (POST /jobs/ID/retry, or sae retry ID, runs it again)",
                            r["id"],
                        ),
                    )
                else:
                    ids.append(r["id"])
                    db.execute(
                        "UPDATE jobs SET status = 'queued', updated_at = ?, eta_seconds = NULL,"
                        " crashes = ? WHERE id = ? AND status = 'running'",
                        (now, crashes, r["id"]),
                    )
        return ids

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
