"""The fault matrix's rig: one sandboxed node, its real daemon over a real broker.

A cell of the matrix is a fault injected while a job stands in one state.
The daemon runs with ``EDGE_UPGRADE_AGENT_FAULT=after:<state>=<action>``
(``agent.faults``): it kills itself, stops itself, or pauses on that exact
commit while the cell breaks something outside it (the broker, the disk, the
clock, the registry). Then the rig lets it go, restarts it if it died (as
systemd would) and holds the node to the promise: old version intact or new
version healthy, one final report at the broker, a valid journal, a free lock
and an agent that serves the next command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.pki import Pki, issue_client
from testkit.standins import (
    edgecore_pid,
    logged_version,
    make_image_dir,
    make_node,
    sandbox_settings,
    start_edgecore,
    stop_edgecore,
)

REPO = Path(__file__).resolve().parents[1]
OLD, NEW = "v1.12.1", "v1.13.0"
IMAGE_REPO = "kubeedge/installation-package"
# The states of docs/architecture.md a job can stand in when a fault hits,
# the last two being final states committed but not yet reported.
STATES = ["received", "prechecked", "awaiting_confirmation", "image_ready", "backed_up",
          "installing", "verifying", "rolling_back", "succeeded", "rolled_back"]
# Reached only when the new edgecore fails its health gate.
FAILURE_PATH = {"rolling_back", "rolled_back"}
TERMINAL = {"succeeded", "skipped", "failed", "rolled_back", "rollback_failed", "rejected"}


def sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "missing"


def wait_until(predicate: Any, timeout: float = 60, what: str = "condition") -> None:
    """Poll (never a timing assertion: the timeout only bounds a hang)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not reached")
        time.sleep(0.05)


@dataclass(frozen=True)
class Fleet:
    """The cloud side every cell shares: the CA, the broker and the controller."""

    pki: Pki
    broker: Broker
    cloud: Cloud


@dataclass
class Outcome:
    """What a cell ended with: the row of docs/reliability.md."""

    fault: str
    state: str
    final_state: str
    result: str
    version: str
    restarts: int
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


class FaultNode:
    """A sandboxed node under ``root`` and its daemon over ``broker``."""

    def __init__(self, work: Path, name: str, fleet: Fleet, *, new_edgecore: str = "ok",
                 keadm: str = "ok", settings: dict[str, Any] | None = None) -> None:
        self.work, self.name, self.cloud = work, name, fleet.cloud
        broker, pki = fleet.broker, fleet.pki
        self.root = work / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        make_node(self.root, OLD, node_name=name)
        image = make_image_dir(self.root / "images", IMAGE_REPO, NEW,
                               edgecore_behaviour=new_edgecore, keadm_behaviour=keadm)
        self.old_sha = sha256(self.root / "usr/local/bin/edgecore")
        self.new_sha = sha256(next(image.rglob("edgecore")))
        start_edgecore(self.root)
        cert, key = issue_client(pki, name)
        config = sandbox_settings(self.root, name)
        config["transport"] = {"kind": "mqtt", "mqtt": {
            "host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
            "cert_file": str(cert), "key_file": str(key), "reconnect_min_seconds": 0.2,
            "reconnect_max_seconds": 1}}
        for key_, value in (settings or {}).items():
            config[key_] = {**config.get(key_, {}), **value}
        self.config = work / "agent.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.clock: Path | None = None
        self.copies = 0  # redelivered copies of the final report
        self.notify = work / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify))
        self.sock.settimeout(60)

    # -- the daemon ---------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/edge-upgrade-agent"

    @property
    def paused_marker(self) -> Path:
        return self.work / "paused"

    def start(self, fault: str | None = None, clock: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_UPGRADE_AGENT")}
        env.update(PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(self.notify),
                   EDGE_UPGRADE_AGENT_FAULT_DIR=str(self.work))
        if fault is not None:
            env["EDGE_UPGRADE_AGENT_FAULT"] = fault
        self.clock = clock or self.clock
        main = "agent"
        if self.clock is not None:
            # The wall clock jumps when the test writes this file; it stays jumped
            # across restarts, as a stepped system clock would.
            env["EDGE_CLOCK_OFFSET_FILE"] = str(self.clock)
            main = "testkit.clockshim"
        log = (self.work / "agent.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", main, "--config", str(self.config), "run"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        self._wait_ready()
        if self.restarts == 0:
            # A first start has no broker session yet: a command sent before its
            # subscription would be dropped by the broker, as for any client.
            wait_until(lambda: any(p.get("nodeName") == self.name and p.get("online")
                                   for p in self.cloud.presence()), 30, "presence online")

    def _wait_ready(self) -> None:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"agent never READY: {self.log_tail()}") from None
            if "READY=1" in msg:
                return

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def restart_if_dead(self) -> bool:
        """What systemd's Restart=always does: start a dead agent again, faults gone."""
        if self.alive():
            return False
        self.restarts += 1
        self.start()
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.paused_marker.unlink(missing_ok=True)
        self.sock.close()
        stop_edgecore(self.root)

    def wait_paused(self) -> None:
        wait_until(lambda: self.paused_marker.exists() or not self.alive(), 60,
                   f"pause point ({self.log_tail()})")
        assert self.alive(), self.log_tail()

    def release(self) -> None:
        self.paused_marker.unlink(missing_ok=True)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = (self.work / "agent.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # -- commands and what the node says ------------------------------------

    def send(self, body: dict[str, Any]) -> None:
        self.cloud.send(body, node=self.name)

    def upgrade(self, job: str, **extra: Any) -> str:
        """Send an upgrade to NEW; its historyID (the key is ``job/historyID``)."""
        history = str(uuid.uuid4())
        self.send({"jobName": job, "version": NEW, "historyID": history, **extra})
        return history

    def journal(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        try:
            with sqlite3.connect(f"file:{self.state_dir / 'journal.db'}?mode=ro", uri=True,
                                 timeout=5) as db:
                return db.execute(sql, args).fetchall()
        except sqlite3.Error:
            return []

    def job_state(self, name: str) -> str | None:
        rows = self.journal("SELECT state FROM jobs WHERE key LIKE ?", f"{name}/%")
        return str(rows[0][0]) if rows else None

    def job_key(self, name: str) -> str:
        rows = self.journal("SELECT key FROM jobs WHERE key LIKE ?", f"{name}/%")
        assert rows, f"no job {name} in the journal"
        return str(rows[0][0])

    def outbox_empty(self) -> bool:
        rows = self.journal("SELECT count(*) FROM outbox")
        return bool(rows) and rows[0][0] == 0

    # -- the promise --------------------------------------------------------

    def settle(self, name: str, timeout: float = 90) -> dict[str, Any]:
        """Wait for the job's one final report at the broker, restarting a dead agent."""
        def final_arrived() -> bool:
            self.restart_if_dead()
            state = self.job_state(name)
            return state in TERMINAL and bool(self.cloud.finals(self.job_key(name)))
        wait_until(final_arrived, timeout, f"final report of {name} ({self.log_tail()})")
        # The agent may die on the way (a journal write on a full disk ends it):
        # systemd would start it again, and so does this wait.
        wait_until(lambda: not self.restart_if_dead() and self.outbox_empty(), 30,
                   f"outbox drained ({self.log_tail()})")
        time.sleep(0.3)  # a duplicate, if any, would be in flight now
        # MQTT QoS 1 is at least once: a copy of one report (same sequence) is
        # a redelivery, which receivers drop; two sequences are two answers.
        finals = self.cloud.finals(self.job_key(name))
        distinct = {f["sequence"]: f for f in finals}
        assert len(distinct) == 1, f"{len(distinct)} final reports: {finals}"
        self.copies = len(finals) - 1
        return finals[0]

    def check(self, name: str, final: dict[str, Any]) -> list[str]:
        """Assert the node's invariants after ``name`` ended; return notes for the table."""
        notes: list[str] = []
        state = final["phase"]
        binary = sha256(self.root / "usr/local/bin/edgecore")
        assert binary in (self.old_sha, self.new_sha), "edgecore binary is neither old nor new"
        db = self.root / "var/lib/kubeedge/edgecore.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        pid = edgecore_pid(self.root)
        running = logged_version(self.root, pid) if pid else None
        if state == "succeeded":
            assert binary == self.new_sha and running == NEW, (binary, running)
        elif state in ("rolled_back", "failed", "rejected"):
            assert binary == self.old_sha and running == OLD, (state, running)
            backup = self.state_dir / "backups" / OLD / "edgecore.db"
            if state == "rolled_back":
                assert db.read_bytes() == backup.read_bytes(), "db differs from its backup"
        else:
            notes.append(f"edgecore {'new' if binary == self.new_sha else 'old'} binary, "
                         f"running {running or 'nothing'}")
        rows = self.journal("PRAGMA integrity_check")
        assert rows == [("ok",)], rows
        assert self.journal("SELECT count(*) FROM jobs WHERE state NOT IN "
                            "('succeeded','skipped','failed','rolled_back','rollback_failed',"
                            "'rejected','awaiting_confirmation')") == [(0,)]
        self._assert_lock_free()
        return notes

    def _assert_lock_free(self) -> None:
        fd = os.open(self.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def assert_serving(self) -> None:
        """The agent answers the next command: a dry run of whatever is running now."""
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        self.send({"jobName": probe, "version": NEW, "dryRun": True})
        # Answered is what counts: a rehearsal, or a rejection where the node's
        # images are not the default repository's.
        wait_until(lambda: self.cloud.finals(probe) or self.cloud.rejections(probe), 60,
                   f"answer to {probe} ({self.log_tail()})")


def running_version(root: Path) -> str | None:
    pid = edgecore_pid(root)
    return logged_version(root, pid) if pid else None


def record(outcome: Outcome) -> None:
    path = os.environ.get("EDGE_FAULT_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(outcome.as_json() + "\n")


class Cell:
    """One fault in one state: set up, inject, heal, then the common checks."""

    def __init__(self, fault: str, state: str, work: Path, fleet: Fleet,
                 **node_kw: Any) -> None:
        self.fault, self.state, self.broker = fault, state, fleet.broker
        if state in FAILURE_PATH:
            node_kw.setdefault("new_edgecore", "crash")
        self.name = f"fm-{fault}-{state}".replace("_", "-")
        self.node = FaultNode(work, self.name, fleet, **node_kw)
        self.job = "job"
        self.extra: dict[str, Any] = {}
        if state == "awaiting_confirmation":
            self.extra["requireConfirmation"] = True
        self.history = ""

    def send(self, **extra: Any) -> None:
        self.history = self.node.upgrade(self.job, **{**self.extra, **extra})

    def confirm_if_parked(self) -> None:
        if self.state != "awaiting_confirmation":
            return
        wait_until(lambda: (self.node.restart_if_dead() or True) and
                   self.node.job_state(self.job) in ("awaiting_confirmation", "failed"),
                   60, "parked job")
        self.node.send({"operation": "confirm", "jobName": self.job, "historyID": self.history})

    def until_final_or_stuck(self, seconds: float) -> None:
        """Let the job run on under the fault: to its end, the agent's death, or a limit."""
        # Stuck under the fault is allowed: healing must unstick it.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not self.node.alive() or self.node.job_state(self.job) in
                       ("succeeded", "failed", "rolled_back", "rollback_failed",
                        "awaiting_confirmation"), seconds, "job under fault")

    def finish(self) -> Outcome:
        self.confirm_if_parked()
        final = self.node.settle(self.job)
        notes = self.node.check(self.job, final)
        if self.node.copies:
            notes.append(f"final report delivered {self.node.copies + 1} times (same sequence)")
        self.node.assert_serving()
        outcome = Outcome(self.fault, self.state, final["phase"], final.get("result", ""),
                          _version(final), self.node.restarts, notes)
        record(outcome)
        return outcome


def _version(final: dict[str, Any]) -> str:
    return OLD if final["phase"] != "succeeded" else NEW


def paused(cell: Cell, inject: Callable[[], None], **extra: Any) -> None:
    """Stop the agent on the commit of ``cell.state``, ``inject`` the fault, go on."""
    cell.node.start(fault=f"after:{cell.state}=pause")
    cell.send(**extra)
    cell.node.wait_paused()
    inject()
    cell.node.release()
