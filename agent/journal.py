"""The journal: jobs and the report outbox in one SQLite database (WAL).

Every state change is one transaction that also queues its report, and it is
committed *before* the side effect it announces, so a crash at any point
leaves a journal that says what may have happened. ``synchronous=FULL``
because a lost state change after power loss could mean a lost rollback: in
WAL mode FULL syncs the WAL at every commit, where NORMAL syncs it only at a
checkpoint, so the last commits could vanish while their side effects (keadm
run, files restored, a report sent) did not. SQLite fsyncs the directory itself
when it creates the WAL. tests/test_durability.py checks both settings.
The calls are synchronous: each is a local, sub-millisecond-to-fsync write,
cheaper than a thread hop. The runner writes states; intake writes new jobs and
answers (a refused cancel, a rejection), each in one transaction of its own.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.errors import JournalError
from agent.messages.commands import Command
from agent.model import ActionStatus, Job
from agent.states import Action, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    key TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    from_version TEXT,
    entries TEXT NOT NULL DEFAULT '{}',
    actions TEXT NOT NULL DEFAULT '[]',
    notes TEXT NOT NULL DEFAULT '{}',
    seq INTEGER NOT NULL DEFAULT 0,
    final_reported INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    final INTEGER NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE(job_key, seq)
);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen(
    command_id TEXT PRIMARY KEY,
    job_key TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

ReportFn = Callable[[Job], dict[str, Any]]


@contextmanager
def immediate(db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE … COMMIT) on an autocommit connection;
    any SQLite error becomes a JournalError starting with ``what``."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        # A failed COMMIT (disk full) may leave the transaction open, and every
        # later BEGIN would fail on this connection even once space is back.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise JournalError(f"{what}: {exc}") from None


def _row_to_job(row: sqlite3.Row) -> Job:
    actions = tuple(
        ActionStatus(Action(a["action"]), a["succ"], a["reason"], a["finishTime"], a["extend"])
        for a in json.loads(row["actions"])
    )
    return Job(
        key=row["key"],
        command=Command.from_json(row["command"]),
        state=State(row["state"]),
        reason=row["reason"],
        from_version=row["from_version"],
        entries=tuple(sorted(json.loads(row["entries"]).items())),
        actions=actions,
        notes=tuple(sorted(json.loads(row["notes"]).items())),
        seq=row["seq"],
        final_reported=bool(row["final_reported"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # 512 KiB of page cache, not SQLite's 2 MiB: the journal is small and
            # read by key, and the default cache grew RSS ~2 KiB a job until full
            # (bench/load.py: 1.10x after 800 jobs on a fresh journal).
            self.db.execute("PRAGMA cache_size=-512")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate(self.db, "journal write failed")

    def get(self, key: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
        return _row_to_job(row) if row else None

    def jobs(self, *, active_only: bool = False, limit: int = 100) -> list[Job]:
        rows = self.db.execute(
            "SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
        ).fetchall()
        jobs = [_row_to_job(r) for r in rows]
        return [j for j in jobs if not j.terminal] if active_only else jobs

    def unresolved_rollback_failure(self) -> Job | None:
        """The newest ``rollback_failed`` job, unless an operator has since cleared it
        with a successful manual rollback or a ``resolve`` of it.

        Derived from the jobs themselves, so a crash can never lose the block:
        the final state that sets it and the one that clears it are each
        committed with their report.
        """
        row = self.db.execute(
            "SELECT * FROM jobs WHERE state='rollback_failed' "
            "ORDER BY updated_at DESC, rowid DESC LIMIT 1").fetchone()
        if row is None:
            return None
        cleared = self.db.execute(
            "SELECT 1 FROM jobs WHERE updated_at > ? AND ("
            " (state='rolled_back' AND json_extract(command, '$.operation')='rollback') OR"
            " (state='succeeded' AND json_extract(command, '$.operation')='resolve')) LIMIT 1",
            (row["updated_at"],)).fetchone()
        return None if cleared else _row_to_job(row)

    def add(self, job: Job, report: ReportFn) -> Job:
        """Insert a new job with its first report. Raises KeyError on a duplicate key."""
        job = replace(job, seq=1, entries=((job.state.value, 1),))
        payload = report(job)
        final = job.terminal
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE key=?", (job.key,)).fetchone():
                raise KeyError(job.key)
            row = {"key": job.key, "command": job.command.to_json(),
                   "created_at": job.created_at, **self._columns(job, final)}
            db.execute(f"INSERT INTO jobs({', '.join(row)}) VALUES({', '.join('?' * len(row))})",
                       tuple(row.values()))
            self._queue(db, job, payload, final)
        return replace(job, final_reported=final)

    @staticmethod
    def _columns(job: Job, final: bool) -> dict[str, Any]:
        """Every column a state change writes (names are constants, never input)."""
        return {
            "state": job.state.value,
            "reason": job.reason,
            "from_version": job.from_version,
            "entries": json.dumps(dict(job.entries)),
            "actions": json.dumps([a.to_dict() for a in job.actions]),
            "notes": json.dumps(dict(job.notes)),
            "seq": job.seq,
            "final_reported": int(final),
            "updated_at": job.updated_at,
        }

    def _next_seq(self, db: sqlite3.Connection, key: str) -> int:
        # Allocated inside the transaction, so two writers (the runner, and
        # intake answering a cancel) can never reuse a report sequence.
        row = db.execute("SELECT seq FROM jobs WHERE key=?", (key,)).fetchone()
        if row is None:
            raise JournalError(f"no job {key!r} in the journal")
        return int(row["seq"]) + 1

    def save(self, job: Job, report: ReportFn) -> Job:
        """Persist ``job`` (already advanced by the caller) and queue its report."""
        final = job.terminal
        with self._tx() as db:
            job = replace(job, seq=self._next_seq(db, job.key), updated_at=time.time())
            payload = report(job)
            row = self._columns(job, final)
            db.execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in row)} WHERE key=?",
                       (*row.values(), job.key))
            self._queue(db, job, payload, final)
        return replace(job, final_reported=job.final_reported or final)

    def event(self, key: str, report: ReportFn) -> Job:
        """Queue a report about ``key`` without changing its state (e.g. a refused cancel)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
            if row is None:
                raise JournalError(f"no job {key!r} in the journal")
            job = replace(_row_to_job(row), seq=int(row["seq"]) + 1)
            db.execute("UPDATE jobs SET seq=? WHERE key=?", (job.seq, key))
            self._queue(db, job, report(job), job.terminal)
        return job

    def repeat(self, key: str, report: ReportFn) -> Job:
        """Queue ``key``'s latest report again under its own sequence: a repeated
        answer (to a duplicate command), not news, so a receiver that dedupes by
        ``(jobKey, sequence)`` sees it once. A copy still queued is enough."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
            if row is None:
                raise JournalError(f"no job {key!r} in the journal")
            job = _row_to_job(row)
            db.execute(
                "INSERT OR IGNORE INTO outbox(job_key, seq, final, payload, created_at) "
                "VALUES(?,?,?,?,?)", (job.key, job.seq, int(job.terminal),
                                      json.dumps(report(job), sort_keys=True), time.time()))
        return job

    def mark_seen(self, command_id: str, job_key: str, expires_at: float) -> str | None:
        """Record a signed command id; return the job key it was first seen with, if any."""
        with self._tx() as db:
            db.execute("DELETE FROM seen WHERE expires_at < ?", (time.time() - 86400,))
            row = db.execute("SELECT job_key FROM seen WHERE command_id=?",
                             (command_id,)).fetchone()
            if row is not None:
                return str(row["job_key"])
            db.execute("INSERT INTO seen(command_id, job_key, expires_at) VALUES(?,?,?)",
                       (command_id, job_key, expires_at))
        return None

    @staticmethod
    def _queue(db: sqlite3.Connection, job: Job, payload: dict[str, Any], final: bool) -> None:
        db.execute(
            "INSERT INTO outbox(job_key, seq, final, payload, created_at) VALUES(?,?,?,?,?)",
            (job.key, job.seq, int(final), json.dumps(payload, sort_keys=True), time.time()),
        )

    def outbox(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        rows = self.db.execute(
            "SELECT id, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(r["id"], json.loads(r["payload"])) for r in rows]

    def ack(self, outbox_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE id=?", (outbox_id,))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return str(row["v"]) if row else None

    def delete_meta(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE k=?", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, value))
