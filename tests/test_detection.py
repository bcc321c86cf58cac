"""Version detection and the pieces around it, without executing edgecore.

Pure logic (klog lines, ExecStart parsing, embedded literals, the rollback
block) gets fast tests here; the detection order runs against a sandboxed
node with the stand-in edgecore, which logs like the real one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Sandbox, wait_for

from agent.adapters.edgecore import embedded_versions, running_sha256
from agent.adapters.files import FileDigest, copy_hashed, sha256_file
from agent.adapters.service import SystemctlManager, parse_show, version_in_log
from agent.config import load_config, parse_config
from agent.errors import ConfigError, InvalidCommand
from agent.journal import Journal
from agent.messages.commands import Operation, build_command, parse_envelope
from agent.messages.reports import build_report
from agent.model import Job
from agent.node import build_node
from agent.runner import Runner
from agent.states import State
from agent.steps.unit import exec_binary
from testkit.standins import stop_edgecore

REAL_LINE = "I1130 15:06:04.800382   30539 server.go:103] Version: v1.13.0"


def test_version_line_is_matched_to_its_pid() -> None:
    lines = ["random text", REAL_LINE,
             "I1130 15:06:05.000001   30540 server.go:103] Version: v1.12.1"]
    assert version_in_log(lines, 30539) == "v1.13.0"
    assert version_in_log(lines, 30540) == "v1.12.1"
    assert version_in_log(lines, 1) is None
    # A version mentioned anywhere else is not the start line.
    assert version_in_log(["I1130 1:1:1.1 30539 x.go:1] upgrading to Version: v9.9.9 now"],
                          30539) is None


def test_systemctl_show_carries_the_invocation() -> None:
    s = parse_show("ActiveState=active\nNRestarts=0\nMainPID=7\n"
                   "InvocationID=0123456789abcdef0123456789abcdef\n")
    assert s.invocation == "0123456789abcdef0123456789abcdef"
    assert parse_show("InvocationID=../../etc\n").invocation == ""


def test_embedded_version_literal(tmp_path: Path) -> None:
    blob = tmp_path / "bin"
    blob.write_bytes(b"\x00\x01go1.19.8\x00v1.13.0\x00k8s.io/api@v0.26.0\x00"
                     b"xv1.2.3\x00" + b"\xff" * 10 + b"v1.13.0")
    assert embedded_versions(blob) == ["v1.13.0", "v1.13.0"]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert embedded_versions(empty) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("[Service]\nExecStart=/usr/local/bin/edgecore --config /x.yaml\n", "/usr/local/bin/edgecore"),
    ("[Unit]\nExecStart=/nope\n[Service]\nExecStart=-/usr/bin/edgecore\n", "/usr/bin/edgecore"),
    ("[Service]\nExecStart=/a\nExecStart=\n", None),
    ("[Service]\nEnvironment=A=1\n", None),
])
def test_exec_binary(text: str, expected: str | None) -> None:
    assert exec_binary(text) == expected


def test_running_sha256_of_a_script_pins_the_started_file(tmp_path: Path) -> None:
    script = tmp_path / "prog"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    script.chmod(0o755)
    time.sleep(1.2)  # the start time is known to a second: keep the write before it
    proc = subprocess.Popen([str(script)])
    try:
        deadline = time.monotonic() + 10
        while running_sha256(proc.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_sha256(proc.pid) == sha256_file(script).sha256
        elf = subprocess.Popen(["sleep", "30"])
        try:
            sleep_bin = Path(f"/proc/{elf.pid}/exe").resolve()
            assert running_sha256(elf.pid) == sha256_file(sleep_bin).sha256
        finally:
            elf.kill()
            elf.wait()
        time.sleep(1.2)
        tmp = script.with_name("new")
        tmp.write_text(script.read_text() + "# changed\n")
        tmp.replace(script)  # what an installer does; the process still runs the old one
        assert running_sha256(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_backup_dir_may_not_be_keadms() -> None:
    with pytest.raises(ConfigError, match=r"paths\.backup_dir: .*keadm's own backup"):
        parse_config({"node_name": "n", "paths": {"backup_dir": "/etc/kubeedge/backup"}})
    cfg = parse_config({"node_name": "n"})
    assert cfg.backup_root == Path("/var/lib/edge-upgrade-agent/backups")
    assert cfg.unit_file == "/etc/systemd/system/edgecore.service" and cfg.preserve_unit


def test_resolve_command_needs_a_job_key() -> None:
    cfg = parse_config({"node_name": "n"})
    cmd = parse_envelope(b'{"operation":"resolve","jobName":"r1","resolveJob":"up-1/h1"}',
                         cfg, "spool")
    assert (cmd.operation, cmd.resolves) == (Operation.RESOLVE, "up-1/h1")
    with pytest.raises(InvalidCommand, match="resolve needs the key"):
        build_command(cfg, operation=Operation.RESOLVE, job_name="r2", resolves="../x")
    with pytest.raises(InvalidCommand, match="only goes with operation resolve"):
        build_command(cfg, operation=Operation.UPGRADE, job_name="r3", version="v1.13.0",
                      resolves="up-1")


def test_rollback_failure_blocks_until_resolved_or_rolled_back(tmp_path: Path) -> None:
    cfg = parse_config({"node_name": "n"})
    journal = Journal(tmp_path / "j.db")

    def finish(name: str, op: Operation, state: State, resolves: str = "") -> None:
        version = "v1.13.0" if op == Operation.UPGRADE else None
        cmd = build_command(cfg, operation=op, job_name=name, version=version,
                            resolves=resolves)
        journal.add(Job(key=name, command=cmd, state=state), build_report)
        time.sleep(0.01)  # distinct updated_at

    assert journal.unresolved_rollback_failure() is None
    finish("up-1", Operation.UPGRADE, State.ROLLBACK_FAILED)
    blocking = journal.unresolved_rollback_failure()
    assert blocking is not None and blocking.key == "up-1"
    finish("res-bad", Operation.RESOLVE, State.FAILED, resolves="up-1")
    assert journal.unresolved_rollback_failure() is not None
    finish("res-1", Operation.RESOLVE, State.SUCCEEDED, resolves="up-1")
    assert journal.unresolved_rollback_failure() is None
    finish("up-2", Operation.UPGRADE, State.ROLLBACK_FAILED)
    finish("rb-1", Operation.ROLLBACK, State.ROLLED_BACK)
    assert journal.unresolved_rollback_failure() is None
    journal.close()


def test_detection_never_runs_edgecore_and_names_its_source(sandbox: Sandbox) -> None:
    config = load_config(sandbox.config)
    node = build_node(config)
    log = sandbox.root / "var/log/edgecore.log"
    wait_for(lambda: log.exists() and "Version:" in log.read_text())
    try:
        detected = asyncio.run(node.probe.detect())
        assert detected is not None and (str(detected.version), detected.source) \
            == ("v1.12.1", "log")
        stop_edgecore(sandbox.root)
        # Not running: no start log; the one literal in the binary answers.
        detected = asyncio.run(node.probe.detect())
        assert detected is not None and (str(detected.version), detected.source) \
            == ("v1.12.1", "binary")
        node.remember_edgecore(sha256_file(sandbox.binary).sha256, "v1.12.1")
        detected = asyncio.run(node.probe.detect())
        assert detected is not None and detected.source == "package"
    finally:
        node.close()


def test_backup_runs_off_the_event_loop(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a file is copied, the loop must keep running (watchdog, MQTT keepalive).

    The copy waits for a tick from the loop: on the loop itself it would wait
    forever, so it gives up after 10 s and the backup fails.
    """
    ticked = threading.Event()

    def copy_waiting_for_the_loop(src: Path, dst: Path, mode: int | None = None) -> FileDigest:
        if not ticked.wait(10):
            raise OSError("the event loop did not run during the copy")
        return copy_hashed(src, dst, mode)

    monkeypatch.setattr("agent.steps.backup.copy_hashed", copy_waiting_for_the_loop)
    node = build_node(load_config(sandbox.config))
    try:
        cmd = build_command(node.config, operation=Operation.UPGRADE, job_name="off-loop",
                            version="v1.13.0")
        job = node.journal.add(Job(key=cmd.key, command=cmd, state=State.IMAGE_READY,
                                   from_version="v1.12.1"), build_report)

        async def main() -> Job:
            async def tick() -> None:
                await asyncio.sleep(0.05)
                ticked.set()

            ticker = asyncio.create_task(tick())
            done = await Runner(node)._back_up(job)
            await ticker
            return done

        assert asyncio.run(main()).state == State.BACKED_UP
    finally:
        node.close()


def test_staging_is_reused_only_when_digest_and_files_match(sandbox: Sandbox) -> None:
    from agent.steps.image import stage_image

    node = build_node(load_config(sandbox.config))
    try:
        cmd = build_command(node.config, operation=Operation.PREPULL, job_name="s1",
                            version="v1.13.0")
        first = asyncio.run(stage_image(node, cmd, lambda _: None))
        again = asyncio.run(stage_image(node, cmd, lambda _: None))
        assert (first.reused, again.reused) == (False, True)
        assert again.edgecore_sha256 == first.edgecore_sha256 == \
            sha256_file(first.edgecore).sha256
        first.keadm.write_bytes(b"tampered")  # a damaged staged file is extracted again
        third = asyncio.run(stage_image(node, cmd, lambda _: None))
        assert not third.reused and third.keadm.read_bytes() != b"tampered"
    finally:
        node.close()


@pytest.mark.parametrize(("listing", "expected"), [
    ("edgecore.service enabled enabled\nedge-upgrade-agent.service enabled enabled\n", True),
    # keadm's grep sees "enabled" in the preset column too: it stops edgecore.service fine
    ("edgecore.service disabled enabled\nedge-upgrade-agent.service enabled enabled\n", True),
    ("edgecore.service static -\nedge-upgrade-agent.service enabled enabled\n", False),
])
def test_keadm_finds_edgecore_enabled_as_its_grep_does(tmp_path: Path, listing: str,
                                                        expected: bool) -> None:
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = list-unit-files ] && printf '{listing}'\n")
    fake.chmod(0o755)
    manager = SystemctlManager("edgecore.service", systemctl=str(fake))
    assert asyncio.run(manager.enabled_for_keadm()) is expected
