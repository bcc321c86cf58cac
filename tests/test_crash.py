"""kill -9 of the agent in every state, then a restart: the node ends consistent.

A fault point makes the agent SIGKILL itself at an exact place (just after a
state's journal commit, or half-way through a backup or restore); the keadm
case kills it from outside while keadm runs. After ``recover`` the node must
run either the old version with data byte-identical to the backup, or the new
version healthy, and the job must have exactly one final report.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Sandbox, wait_for

from testkit.standins import edgecore_pid

OLD, NEW = "v1.12.1", "v1.13.0"


def assert_consistent(box: Sandbox, state: str) -> None:
    backup = box.state_dir / "backups" / OLD
    if state == "succeeded":
        assert box.running_version() == NEW
    else:
        assert state == "rolled_back"
        assert box.running_version() == OLD
        assert box.db.read_bytes() == (backup / "edgecore.db").read_bytes()
        assert box.binary.read_bytes() == (backup / "edgecore").read_bytes()
    assert box.edgecore_running()
    leftovers = list((box.state_dir / "backups").glob("*.partial"))
    assert leftovers == []
    assert not (box.root / "etc/kubeedge/idempotency_record").exists()


def recover_and_check(box: Sandbox, expected: str) -> None:
    _rc, out = box.cli_json("recover")
    history = box.cli_json("history")[1]["jobs"]
    assert len(history) == 1, history
    job = history[0]
    assert job["state"] == expected, (out, job)
    finals = box.final_reports(job["jobKey"])
    assert len(finals) == 1, finals
    assert_consistent(box, expected)
    # A second restart changes nothing and adds no report.
    box.cli_json("recover")
    assert len(box.final_reports(job["jobKey"])) == 1


@pytest.mark.parametrize(("fault", "crash_build", "expected"), [
    ("after:received", False, "succeeded"),
    ("after:prechecked", False, "succeeded"),
    ("after:image_ready", False, "succeeded"),
    ("backup:partial", False, "succeeded"),
    ("after:backed_up", False, "succeeded"),
    ("after:installing", False, "rolled_back"),
    ("after:verifying", False, "succeeded"),
    ("after:succeeded", False, "succeeded"),
    ("after:rolling_back", True, "rolled_back"),
    ("restore:partial", True, "rolled_back"),
    ("after:rolled_back", True, "rolled_back"),
])
def test_kill9_at_fault_point(sandbox: Sandbox, fault: str, crash_build: bool,
                              expected: str) -> None:
    if crash_build:
        sandbox.image(NEW, edgecore_behaviour="crash")
    proc = sandbox.cli("upgrade", "--to-version", NEW, "--yes",
                       env=sandbox.env(EDGE_UPGRADE_AGENT_FAULT=fault))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    recover_and_check(sandbox, expected)


def test_kill9_while_keadm_runs(sandbox: Sandbox) -> None:
    sandbox.image(NEW, keadm_behaviour="hang")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(sandbox.config), "upgrade",
         "--to-version", NEW, "--yes"],
        cwd=REPO, env=sandbox.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    marker = sandbox.root / "etc/kubeedge/idempotency_record"
    try:
        wait_for(lambda: _state(sandbox) == "installing" and marker.exists())
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    keadm = str(sandbox.state_dir / "staging" / NEW / "keadm").encode()
    assert _procs_with(keadm), "keadm should outlive the agent (own session)"
    recover_and_check(sandbox, "rolled_back")
    assert _procs_with(keadm) == []


def test_kill9_of_edgecore_during_grace_period_is_a_failed_health_gate(
        sandbox: Sandbox) -> None:
    """Not an agent crash: the new edgecore dying mid-gate must roll back too."""
    sandbox.configure(health={"grace_seconds": 3})
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(sandbox.config), "--output", "json",
         "upgrade", "--to-version", NEW, "--yes"],
        cwd=REPO, env=sandbox.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _state(sandbox) == "verifying" and sandbox.edgecore_running())
    pid = edgecore_pid(sandbox.root)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, _ = agent.communicate(timeout=60)
    job = json.loads(out)["job"]
    assert job["state"] == "rolled_back", job
    assert_consistent(sandbox, "rolled_back")


def _state(box: Sandbox) -> str | None:
    try:
        with sqlite3.connect(box.state_dir / "journal.db", timeout=1) as db:
            row = db.execute("SELECT state FROM jobs").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _procs_with(needle: bytes) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if needle in p.joinpath("cmdline").read_bytes().split(b"\0")[:2] and \
                    p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def test_loop_breaker_caps_reentries(sandbox: Sandbox) -> None:
    """A state that crashes the agent every time is given up on, not retried forever."""
    sandbox.configure(policy={"max_state_entries": 2})
    env = sandbox.env(EDGE_UPGRADE_AGENT_FAULT="backup:partial")
    proc = sandbox.cli("upgrade", "--to-version", NEW, "--yes", env=env)
    assert proc.returncode == -signal.SIGKILL
    # Entered once by the job, once more by the first recovery: both crash.
    assert sandbox.cli("recover", env=env).returncode == -signal.SIGKILL
    _rc, out = sandbox.cli_json("recover", env=env)
    (job,) = out["jobs"]
    assert job["state"] == "failed" and "loop breaker: state image_ready entered 3" in job["reason"]
    assert sandbox.running_version() == OLD and sandbox.edgecore_running()
    assert len(sandbox.final_reports(job["jobKey"])) == 1
