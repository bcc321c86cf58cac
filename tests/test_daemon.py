"""The daemon (`run`) with the spool transport: intake, reports, signals, restarts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Sandbox, wait_for


class Daemon:
    def __init__(self, box: Sandbox, notify: Path) -> None:
        self.box = box
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(notify))
        self.sock.settimeout(30)
        self.notify = notify
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(self.box.config), "run"],
            cwd=REPO, env=self.box.env(NOTIFY_SOCKET=str(self.notify)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        assert self.wait_notify("READY=1")

    def wait_notify(self, what: str) -> bool:
        while True:
            msg = self.sock.recv(4096).decode()
            if what in msg:
                return True

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    @property
    def spool(self) -> Path:
        return self.box.state_dir / "spool"

    @property
    def reports_dir(self) -> Path:
        return self.box.state_dir / "reports"

    def send(self, name: str, payload: bytes | dict[str, Any]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        tmp = self.spool / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.spool / f"{name}.json")

    def reports(self, job_key: str) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.reports_dir.glob(f"{job_key}-*.json")):
            out.append(json.loads(p.read_text()))
        return out

    def final(self, job_key: str) -> list[dict[str, Any]]:
        return [r for r in self.reports(job_key) if r["final"]]

    def rejections(self, name: str) -> list[dict[str, Any]]:
        """Final reports of rejected messages named ``name`` (keys rejected:<name>:<hash>)."""
        return [r for p in sorted(self.reports_dir.glob(f"rejected:{name}:*-*.json"))
                if (r := json.loads(p.read_text()))["final"]]


@pytest.fixture
def daemon(sandbox: Sandbox, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(sandbox, tmp_path / "notify.sock")
    d.start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.stop(signal.SIGKILL)
    d.sock.close()


def test_command_file_runs_to_a_final_report(daemon: Daemon, sandbox: Sandbox) -> None:
    daemon.send("c1", {"jobName": "job-1", "version": "v1.13.0", "checkItems": ["disk"]})
    wait_for(lambda: daemon.final("job-1"))
    (final,) = daemon.final("job-1")
    assert final["result"] == "upgrade_success" and final["phase"] == "succeeded"
    assert sandbox.running_version() == "v1.13.0"
    assert not list(daemon.spool.glob("*.json"))
    wait_for(lambda: sandbox.reports() == [])  # outbox drained after delivery
    # A duplicate of a finished job re-sends its final report, the same report
    # (same sequence, so the same spool file), and runs nothing.
    for path in daemon.reports_dir.glob("job-1-*.json"):
        path.unlink()
    daemon.send("c2", {"jobName": "job-1", "version": "v1.13.0"})
    wait_for(lambda: len(daemon.final("job-1")) == 1)
    (again,) = daemon.final("job-1")
    assert again["sequence"] == final["sequence"] and again["result"] == final["result"]
    assert daemon.stop() == 0


BAD: list[tuple[str, bytes, str]] = [
    ("bad-version", b'{"jobName": "bad-1", "version": "1.13"}', "bad version string"),
    ("wrong-node", b'{"jobName": "bad-2", "version": "v1.13.0", "nodeName": "node-2"}',
     "command is for node 'node-2'"),
    ("bad-image", b'{"jobName": "bad-3", "version": "v1.13.0", "image": "x;rm -rf /"}',
     "bad image reference"),
    ("bad-op", b'{"jobName": "bad-4", "operation": "format-disk"}', "unknown operation"),
    ("oversize", b'{"jobName": "bad-5", "pad": "' + b"x" * 70000 + b'"}', "exceeds the"),
]


def test_bad_inputs_are_reported_and_the_daemon_keeps_serving(daemon: Daemon) -> None:
    for name, payload, _ in BAD:
        daemon.send(name, payload)
    for i in range(100):
        daemon.send(f"garbage-{i:03d}", b"\x00\xff{not json" * (i % 7))
    for i, (_, _, needle) in enumerate(BAD, 1):
        name = f"bad-{i}"
        wait_for(lambda name=name: daemon.rejections(name))
        (report,) = daemon.rejections(name)
        assert report["phase"] == "rejected" and needle in report["reason"], report
        assert report["jobName"] == name
    daemon.send("good", {"jobName": "good-1", "version": "v1.13.0"})
    wait_for(lambda: daemon.final("good-1"))
    assert daemon.final("good-1")[0]["result"] == "upgrade_success"
    assert not list(daemon.spool.glob("*.json"))


def test_kill9_of_daemon_mid_install_then_restart(daemon: Daemon, sandbox: Sandbox) -> None:
    sandbox.image("v1.13.0", keadm_behaviour="hang")
    daemon.send("c1", {"jobName": "job-k", "version": "v1.13.0", "timeoutSeconds": 600})
    marker = sandbox.root / "etc/kubeedge/idempotency_record"
    wait_for(marker.exists)
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    wait_for(lambda: daemon.final("job-k"))
    (final,) = daemon.final("job-k")
    assert final["phase"] == "rolled_back"
    assert "agent restarted during install" in final["reason"]
    assert sandbox.running_version() == "v1.12.1"
    assert not marker.exists()


def test_sigterm_mid_job_resumes_per_recovery_table(daemon: Daemon, sandbox: Sandbox) -> None:
    """`systemctl stop` during a job, then start: verifying is re-checked, not redone."""
    sandbox.configure(health={"grace_seconds": 2})
    daemon.send("c1", {"jobName": "job-s", "version": "v1.13.0"})
    wait_for(lambda: any(r["phase"] == "verifying" for r in daemon.reports("job-s"))
             or any(r["phase"] == "verifying" for r in sandbox.reports()))
    assert daemon.stop() == 0
    daemon.start()
    wait_for(lambda: daemon.final("job-s"))
    (final,) = daemon.final("job-s")
    assert final["phase"] == "succeeded", final
    assert sandbox.running_version() == "v1.13.0"


def test_remote_dry_run_is_a_rehearsal(daemon: Daemon, sandbox: Sandbox) -> None:
    before = sandbox.binary.read_bytes(), sandbox.db.read_bytes()
    daemon.send("d1", {"jobName": "rehearse-1", "version": "v1.13.0", "dryRun": True})
    daemon.send("d2", {"jobName": "check-1", "operation": "check", "version": "v1.13.0"})
    for key in ("rehearse-1", "check-1"):
        wait_for(lambda key=key: daemon.final(key))
        (report,) = daemon.final(key)
        assert report["rehearsal"] is True and report["plan"]["verdict"] == "GO"
    assert (sandbox.binary.read_bytes(), sandbox.db.read_bytes()) == before
    assert not (sandbox.state_dir / "backups").exists()


def test_require_confirmation_parks_until_confirm(daemon: Daemon, sandbox: Sandbox) -> None:
    daemon.send("c1", {"jobName": "job-c", "version": "v1.13.0", "requireConfirmation": True})
    wait_for(lambda: any(r["phase"] == "awaiting_confirmation" for r in daemon.reports("job-c")))
    assert sandbox.running_version() == "v1.12.1"
    daemon.send("c2", {"jobName": "job-c", "operation": "confirm"})
    wait_for(lambda: daemon.final("job-c"))
    (final,) = daemon.final("job-c")
    assert final["phase"] == "succeeded"
    assert [a["action"] for a in final["actionFlow"]] == [
        "Check", "WaitingConfirmation", "BackUp", "Upgrade"]


def test_cancel_before_install_and_refused_after(daemon: Daemon, sandbox: Sandbox) -> None:
    daemon.send("p1", {"jobName": "parked", "version": "v1.13.0", "requireConfirmation": True})
    wait_for(lambda: any(r["phase"] == "awaiting_confirmation" for r in daemon.reports("parked")))
    daemon.send("p2", {"jobName": "parked", "operation": "cancel"})
    wait_for(lambda: daemon.final("parked"))
    assert daemon.final("parked")[0]["reason"] == "cancelled by the operator before installing"
    sandbox.image("v1.13.0", keadm_behaviour="hang")
    daemon.send("h1", {"jobName": "hanging", "version": "v1.13.0", "timeoutSeconds": 3})
    wait_for(lambda: any(r["phase"] == "installing" for r in daemon.reports("hanging")))
    daemon.send("h2", {"jobName": "hanging", "operation": "cancel"})
    wait_for(lambda: daemon.final("hanging"))
    reasons = [r["reason"] for r in daemon.reports("hanging")]
    assert any(r.startswith("cancel refused: job is installing") for r in reasons), reasons
    assert daemon.final("hanging")[0]["phase"] == "rolled_back"


def test_prepull_and_rollback_dry_run(daemon: Daemon) -> None:
    daemon.send("r1", {"jobName": "rb-dry", "operation": "rollback", "dryRun": True})
    daemon.send("p1", {"jobName": "pp", "operation": "prepull", "version": "v1.13.0"})
    wait_for(lambda: daemon.rejections("rb-dry"))
    assert "rollback has no dry run" in daemon.rejections("rb-dry")[0]["reason"]
    wait_for(lambda: daemon.final("pp"))
    (final,) = daemon.final("pp")
    assert final["result"] == "prepull_success" and "prepulled" in final["reason"]


def test_resolve_over_the_transport(daemon: Daemon) -> None:
    daemon.send("s1", {"jobName": "res", "operation": "resolve", "resolveJob": "up-1"})
    daemon.send("s2", {"jobName": "res-bad", "operation": "resolve"})
    wait_for(lambda: daemon.final("res") and daemon.rejections("res-bad"))
    (final,) = daemon.final("res")
    assert final["result"] == "resolve_failed" and "nothing to resolve" in final["reason"]
    assert "resolve needs the key" in daemon.rejections("res-bad")[0]["reason"]


def test_sd_notify_never_hangs_on_a_full_queue(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A manager that reads nothing: notifications are dropped, the caller goes on."""
    import threading

    from agent.systemd_notify import sd_notify

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))  # and never reads
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sent: list[bool] = []
        worker = threading.Thread(target=lambda: sent.extend(
            sd_notify(f"STATUS=reconnecting {i}") for i in range(200)), daemon=True)
        worker.start()
        worker.join(60)  # bounds a hang; no timing is asserted
        assert not worker.is_alive(), "sd_notify blocked on a full queue"
    assert sent[0] and not sent[-1]  # the first went, the overflow was dropped


@pytest.mark.parametrize("use_within", [True, False])
async def test_within_never_swallows_a_cancel(use_within: bool) -> None:
    """The race that held the daemon at stop: the awaited event fires as the
    cancel lands. asyncio.wait_for (before 3.12) drops the cancel; within never."""
    import asyncio

    from agent.timeouts import within

    event = asyncio.Event()

    async def loop_step() -> str:
        if use_within:
            await within(event.wait(), 5)
        else:
            await asyncio.wait_for(event.wait(), 5)
        return "went on as if never cancelled"

    task = asyncio.ensure_future(loop_step())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    event.set()
    task.cancel()
    try:
        outcome = await task
    except asyncio.CancelledError:
        outcome = "cancelled"
    if use_within or sys.version_info >= (3, 12):
        assert outcome == "cancelled"
    else:  # documents why within exists
        assert outcome == "went on as if never cancelled"
