"""The controller's durable job store: one SQLite database (WAL, synchronous=FULL).

What a killed ``edge-upgrade-ctl`` needs to carry on lives here, committed
before the side effect it announces (the agent journal's rule): a node is
marked in flight *before* its command is published, so a restarted controller
re-sends it (the agent dedupes on the job key and repeats its last report) and
never upgrades a node twice or forgets one. Every report and presence message
is committed before its MQTT ack, whichever controller process took it, so a
report is never lost between the broker and the store.

The manifest is stored as the operator wrote it and parsed again on resume:
``agent.ctl.manifest`` stays the one parsing gate.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

from agent.ctl.model import Action, JobPhase, JobView, NodePhase, NodeView, ReportEvent
from agent.errors import JournalError, ManifestError
from agent.journal import immediate

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    name TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    manifest TEXT NOT NULL,
    history_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes(
    job TEXT NOT NULL,
    node TEXT NOT NULL,
    ord INTEGER NOT NULL,
    phase TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT,
    last_action TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    result TEXT,
    dispatched_at REAL,
    heard_at REAL,
    finished_at REAL,
    PRIMARY KEY(job, node)
);
-- The rollout counts and picks nodes by phase every step: without it, each
-- step scanned every node of the job (py-spy, bench/fleet.py at 10,000 nodes).
CREATE INDEX IF NOT EXISTS nodes_by_phase ON nodes(job, phase, ord);
CREATE TABLE IF NOT EXISTS reports(
    job TEXT NOT NULL,
    node TEXT NOT NULL,
    key TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY(job, node, key, sequence)
);
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS presence(
    node TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the job store {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self.db, "job store")

    # -- jobs ------------------------------------------------------------------

    def create_job(self, name: str, operation: str, manifest: str, history_id: str, *,
                   nodes: list[tuple[str, NodePhase, str]], now: float) -> None:
        """A new job and its selection, in one transaction; ``nodes`` is (name, phase, reason)."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name=?", (name,)).fetchone():
                raise ManifestError(f"job {name} exists already: `edge-upgrade-ctl resume "
                                    f"{name}` carries it on; a new run needs a new name")
            db.execute("INSERT INTO jobs VALUES(?,?,?,?,?,?,?,?)",
                       (name, operation, manifest, history_id, JobPhase.IN_PROGRESS.value,
                        "", now, now))
            db.executemany(
                "INSERT INTO nodes(job, node, ord, phase, reason, finished_at) "
                "VALUES(?,?,?,?,?,?)",
                [(name, n, i, p.value, r, now if p.final else None)
                 for i, (n, p, r) in enumerate(nodes)])

    def job_absent(self, name: str) -> None:
        if self.db.execute("SELECT 1 FROM jobs WHERE name=?", (name,)).fetchone():
            raise ManifestError(f"job {name} exists already: `edge-upgrade-ctl resume "
                                f"{name}` carries it on; a new run needs a new name")

    def refresh_in_flight(self, job: str, now: float) -> None:
        """A resumed job resends its in-flight commands: their silence counts from now,
        not from before the controller died."""
        with self.tx() as db:
            db.execute("UPDATE nodes SET heard_at=? WHERE job=? AND phase=?",
                       (now, job, NodePhase.IN_PROGRESS.value))

    def job_row(self, name: str) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM jobs WHERE name=?", (name,)).fetchone()
        if row is None:
            raise ManifestError(f"no job {name} in {self.path}")
        return row  # type: ignore[no-any-return]

    def job_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM jobs ORDER BY created_at")]

    def set_job_phase(self, name: str, phase: JobPhase, reason: str, now: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE jobs SET phase=?, reason=?, updated_at=? WHERE name=?",
                       (phase.value, reason, now, name))

    # -- nodes -----------------------------------------------------------------

    def mark_dispatched(self, job: str, nodes: list[str], now: float) -> None:
        with self.tx() as db:
            db.executemany(
                "UPDATE nodes SET phase=?, dispatched_at=COALESCE(dispatched_at, ?), "
                "heard_at=COALESCE(heard_at, ?), last_action='dispatched' "
                "WHERE job=? AND node=? AND phase=?",
                [(NodePhase.IN_PROGRESS.value, now, now, job, node, NodePhase.PENDING.value)
                 for node in nodes])

    def finish_node(self, job: str, node: str, phase: NodePhase, reason: str,
                    now: float) -> None:
        """The controller's own verdict (timed out, skipped); an agent's is a report."""
        with self.tx() as db:
            db.execute("UPDATE nodes SET phase=?, reason=?, last_action=?, finished_at=? "
                       "WHERE job=? AND node=?",
                       (phase.value, reason, phase.value.lower(), now, job, node))

    def skip_pending(self, job: str, reason: str, now: float) -> int:
        with self.tx() as db:
            cur = db.execute("UPDATE nodes SET phase=?, reason=?, finished_at=? "
                             "WHERE job=? AND phase=?",
                             (NodePhase.SKIPPED.value, reason, now, job,
                              NodePhase.PENDING.value))
            return cur.rowcount

    # -- what agents say -------------------------------------------------------

    def record_report(self, node: str, report: dict[str, Any], now: float) -> str | None:
        """Commit one agent report; the job it belongs to, or None if it is none of ours."""
        with self.tx() as db:
            return _record_report(db, node, report, now)

    def record_batch(self, items: list[tuple[str, str, dict[str, Any]]], now: float) -> None:
        """Reports and presence, ``(leaf, node, body)``, in one transaction: one fsync
        for a burst, where a fleet's reports would otherwise wait on one each."""
        with self.tx() as db:
            for leaf, node, body in items:
                if leaf == "status":
                    _record_report(db, node, body, now)
                elif leaf == "presence":
                    db.execute("INSERT OR REPLACE INTO presence VALUES(?,?,?)",
                               (node, json.dumps(body, sort_keys=True), now))

    # -- commands handed to whichever process holds the broker link ---------------

    def queue_command(self, node: str, body: dict[str, Any], now: float) -> int:
        with self.tx() as db:
            cur = db.execute("INSERT INTO outbox(node, body, created_at) VALUES(?,?,?)",
                             (node, json.dumps(body, sort_keys=True), now))
            return int(cur.lastrowid or 0)

    def unsent(self) -> list[tuple[int, str, dict[str, Any]]]:
        return [(r[0], r[1], json.loads(r[2])) for r in self.db.execute(
            "SELECT id, node, body FROM outbox WHERE sent_at IS NULL ORDER BY id")]

    def mark_sent(self, ident: int, now: float, error: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE outbox SET sent_at=?, error=? WHERE id=?", (now, error, ident))

    def outcome(self, ident: int) -> tuple[bool, str | None]:
        """(sent yet, the broker's refusal if any) of a queued command."""
        row = self.db.execute("SELECT sent_at, error FROM outbox WHERE id=?",
                              (ident,)).fetchone()
        return (row is not None and row[0] is not None), (row[1] if row else None)

    def record_presence(self, node: str, body: dict[str, Any], now: float) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO presence VALUES(?,?,?)",
                       (node, json.dumps(body, sort_keys=True), now))

    def presence(self) -> dict[str, dict[str, Any]]:
        out = {}
        for row in self.db.execute("SELECT node, body, received_at FROM presence ORDER BY node"):
            body = json.loads(row["body"])
            body["_receivedAt"] = row["received_at"]
            out[row["node"]] = body
        return out

    # -- views -----------------------------------------------------------------

    def view(self, name: str, *, events: bool | Literal["last"] = True,
             spec_fields: dict[str, Any] | None = None) -> JobView:
        """The job as it stands; ``events=False`` leaves out the reports (the hot loop),
        ``"last"`` keeps each node's newest report with an actionFlow: all the final
        status needs, and one JSON parse a node instead of one a report (13 a node)."""
        job = self.job_row(name)
        found: dict[str, list[ReportEvent]] = {}
        rows: Iterable[sqlite3.Row] = ()
        if events:
            order = "DESC" if events == "last" else ""
            rows = self.db.execute("SELECT node, body, received_at FROM reports WHERE job=? "
                                   f"ORDER BY node, received_at {order}, sequence {order}",
                                   (name,))
        done: set[str] = set()
        for r in rows:
            if r["node"] in done:
                continue  # "last": this node's newest report with a flow is in
            event = _event(r["node"], json.loads(r["body"]), r["received_at"])
            if events == "last":
                if not event.action_flow:
                    continue
                done.add(r["node"])
            found.setdefault(r["node"], []).append(event)
        nodes = tuple(
            NodeView(name=r["node"], phase=NodePhase(r["phase"]),
                     from_version=r["from_version"], to_version=r["to_version"],
                     last_action=r["last_action"], reason=r["reason"], result=r["result"],
                     dispatched_at=r["dispatched_at"], finished_at=r["finished_at"],
                     events=tuple(found.get(r["node"], ())))
            for r in self.db.execute("SELECT * FROM nodes WHERE job=? ORDER BY ord", (name,)))
        f = spec_fields or {}
        return JobView(
            name=name, operation=job["operation"], version=f.get("version", ""),
            image=f.get("image", ""), phase=JobPhase(job["phase"]),
            concurrency=f.get("concurrency", 1), failure_tolerate=f.get("failure_tolerate", 0.1),
            timeout_seconds=f.get("timeout_seconds", 300), created_at=job["created_at"],
            updated_at=job["updated_at"], history_id=job["history_id"], reason=job["reason"],
            nodes=nodes)

    def counts(self, job: str) -> dict[NodePhase, int]:
        out = dict.fromkeys(NodePhase, 0)
        for phase, n in self.db.execute("SELECT phase, count(*) FROM nodes WHERE job=? "
                                        "GROUP BY phase", (job,)):
            out[NodePhase(phase)] = n
        return out

    def pending(self, job: str, limit: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT node FROM nodes WHERE job=? AND phase=? ORDER BY ord LIMIT ?",
            (job, NodePhase.PENDING.value, limit))]

    def arch(self, node: str) -> str | None:
        row = self.db.execute("SELECT body FROM presence WHERE node=?", (node,)).fetchone()
        arch = json.loads(row[0]).get("arch") if row else None
        return arch if isinstance(arch, str) else None

    def in_flight(self, job: str) -> dict[str, tuple[float | None, bool]]:
        """In-flight nodes: when each was last heard from (or sent its command), and
        whether it has answered at all."""
        return {r[0]: (r[1], r[2] != "dispatched") for r in self.db.execute(
            "SELECT node, heard_at, last_action FROM nodes WHERE job=? AND phase=?",
            (job, NodePhase.IN_PROGRESS.value))}


def _record_report(db: sqlite3.Connection, node: str, report: dict[str, Any],
                   now: float) -> str | None:
    """Commit one agent report; the job it belongs to, or None if it is none of ours.

    A report for a node the controller already timed out still counts: the
    truth arriving late replaces ``Unknown`` with the agent's final word.
    """
    name, history = report.get("jobName"), report.get("historyID", "")
    seq, key = report.get("sequence"), str(report.get("jobKey", ""))
    if not isinstance(name, str) or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    # The agent refused our command: its answer has a key (and sequence) of its own.
    rejected = key.startswith(f"rejected:{name}:")
    job = db.execute("SELECT history_id FROM jobs WHERE name=?", (name,)).fetchone()
    row = db.execute("SELECT phase FROM nodes WHERE job=? AND node=?",
                     (name, node)).fetchone()
    if job is None or row is None or (job[0] != history and not rejected):
        return None
    # A refusal while the node runs our command answers someone else's message.
    rejected_other = rejected and db.execute(
        "SELECT 1 FROM reports WHERE job=? AND node=? AND key NOT LIKE 'rejected:%' LIMIT 1",
        (name, node)).fetchone() is not None
    fresh = db.execute("INSERT OR IGNORE INTO reports VALUES(?,?,?,?,?,?)",
                       (name, node, key, seq, json.dumps(report, sort_keys=True),
                        now)).rowcount
    if not fresh or rejected_other:
        return name  # a redelivery (at least once: deduped on the sequence), or not ours
    latest = db.execute("SELECT max(sequence) FROM reports WHERE job=? AND node=? "
                        "AND key=?", (name, node, key)).fetchone()[0]
    current = NodePhase(row[0])
    if seq < latest and not report.get("final"):
        return name  # an older report arriving late changes nothing
    final = bool(report.get("final"))
    if current.final and (current is not NodePhase.UNKNOWN or not final):
        # Kept as an event. A re-sent final (a refused cancel) changes nothing, and
        # progress after a timeout leaves the timeout's reason; only the truth does.
        return name
    phase = current
    if final:
        phase = (NodePhase.SUCCESSFUL if report.get("state") == "Successful"
                 else NodePhase.FAILURE)
    elif current is NodePhase.PENDING:
        phase = NodePhase.IN_PROGRESS  # dispatched by a controller that then died
    reason = str(report.get("reason", ""))
    if current is NodePhase.UNKNOWN and final:
        reason = f"after the timeout: {reason}"
    db.execute(
        "UPDATE nodes SET phase=?, from_version=COALESCE(?, from_version), "
        "to_version=COALESCE(?, to_version), last_action=?, reason=?, result=?, "
        "heard_at=?, finished_at=CASE WHEN ? THEN ? ELSE finished_at END "
        "WHERE job=? AND node=?",
        (phase.value, report.get("fromVersion"), report.get("toVersion"),
         str(report.get("phase", "")), reason, report.get("result"), now,
         final, now, name, node))
    return name


def _event(node: str, body: dict[str, Any], received_at: float) -> ReportEvent:
    flow = tuple(Action(str(a.get("action", "")), bool(a.get("succ")), str(a.get("reason", "")),
                        str(a.get("finishTime", "")))
                 for a in body.get("actionFlow") or () if isinstance(a, dict))
    return ReportEvent(
        node=node, sequence=int(body.get("sequence", 0)), phase=str(body.get("phase", "")),
        state=str(body.get("state", "")), final=bool(body.get("final")),
        result=body.get("result"), reason=str(body.get("reason", "")),
        from_version=body.get("fromVersion"), to_version=body.get("toVersion"),
        timestamp=str(body.get("timestamp", "")), received_at=received_at,
        log_tail=str(body.get("logTail", "")), action_flow=flow)


def now() -> float:
    return time.time()
