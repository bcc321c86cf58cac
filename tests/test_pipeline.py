"""The upgrade pipeline end to end through the CLI, on a sandboxed node."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Sandbox, wait_for

from testkit.standins import make_node, start_edgecore, stop_edgecore


def backup_db(box: Sandbox, version: str = "v1.12.1") -> bytes:
    return (box.state_dir / "backups" / version / "edgecore.db").read_bytes()


def installer_argv(box: Sandbox, job_key: str) -> str:
    log = box.state_dir / "logs" / f"{job_key}.log"
    return log.read_text().splitlines()[0]


def test_successful_upgrade(sandbox: Sandbox) -> None:
    rc, out = sandbox.upgrade("v1.13.0")
    job = out["job"]
    assert (rc, job["state"]) == (0, "succeeded"), job
    assert sandbox.running_version() == "v1.13.0" and sandbox.edgecore_running()
    backup = sandbox.state_dir / "backups/v1.12.1"
    assert sorted(p.name for p in backup.iterdir()) == [
        "edgecore", "edgecore.db", "edgecore.yaml", "manifest.json"]
    assert [a["action"] for a in job["actionFlow"]] == [
        "Check", "WaitingConfirmation", "BackUp", "Upgrade"]
    (final,) = sandbox.final_reports(job["jobKey"])
    assert (final["fromVersion"], final["versionSource"]) == ("v1.12.1", "log")
    assert "runs sha256" in final["reason"] and "logged Version: v1.13.0" in final["reason"]
    assert all(a["succ"] and a["extend"] == "v1.12.1,v1.13.0" for a in job["actionFlow"])
    finals = sandbox.final_reports(job["jobKey"])
    assert len(finals) == 1 and finals[0]["result"] == "upgrade_success"
    seqs = [r["sequence"] for r in sandbox.reports() if r["jobKey"] == job["jobKey"]]
    assert seqs == sorted(set(seqs))
    # Era A keadm argv, as KubeEdge v1.12-v1.15 edgehub ran it, but without a shell.
    argv = installer_argv(sandbox, job["jobKey"])
    assert " upgrade --upgradeID " in argv
    assert "--image kubeedge/installation-package:v1.13.0" in argv
    assert not (sandbox.root / "etc/kubeedge/idempotency_record").exists()


@pytest.mark.parametrize(("version", "expected"), [
    ("v1.13.0", "upgrade --upgradeID"),
    ("v1.17.2", "--image kubeedge/installation-package:v1.17.2 --disable-backup"),
    ("v1.21.0", "upgrade edge --force --toVersion v1.21.0 --image kubeedge/installation-package"),
    ("v1.13.0", "/bin/echo custom"),
])
def test_dry_run_prints_the_argv_that_runs(sandbox: Sandbox, version: str, expected: str) -> None:
    """One assessment used twice: the plan's installer argv is the executed one."""
    extra: list[str] = []
    if expected.startswith("/bin/echo"):
        sandbox.configure(installers={"echo-tool": ["/bin/echo", "custom", "{keadm}",
                                                    "{to_version}", "{image}"]})
        extra = ["--upgrade-tool", "echo-tool"]
    sandbox.image(version)
    _rc, dry = sandbox.upgrade(version, "--dry-run", *extra)
    # The CLI names each job anew: the one difference allowed is the job name.
    planned = " ".join(dry["plan"]["installerArgv"]).replace(dry["job"]["jobKey"], "JOB")
    rc, out = sandbox.upgrade(version, *extra)
    key = out["job"]["jobKey"]
    ran = installer_argv(sandbox, key).removeprefix("$ ").replace(key, "JOB")
    assert planned == ran and expected in ran, (planned, ran)
    if not extra:
        assert rc == 0, out
        assert ("--disable-backup" in ran) == version.startswith("v1.17")
        # keadm v1.21+'s upgrade_report.json is read and removed, so edgecore's
        # taskmanager never relays it or starts a rollback of its own.
        assert not (sandbox.root / "etc/kubeedge/upgrade_report.json").exists()


def test_unknown_keadm_era_is_refused_before_anything(sandbox: Sandbox) -> None:
    sandbox.image("v1.24.0")
    rc, out = sandbox.upgrade("v1.24.0")
    assert (rc, out["job"]["state"]) == (5, "failed"), out
    assert "no built-in keadm command line for v1.24.0" in out["job"]["reason"]
    assert not (sandbox.state_dir / "backups").exists()


def test_skip_when_already_at_target(sandbox: Sandbox) -> None:
    rc, out = sandbox.upgrade("v1.12.1")
    assert (rc, out["job"]["state"]) == (0, "skipped")
    assert sandbox.final_reports()[0]["result"] == "upgrade_success"
    assert not (sandbox.state_dir / "backups").exists()


@pytest.mark.parametrize(("setup", "args", "needle"), [
    ("downgrade", ["v1.11.0"], "refusing downgrade from v1.12.1 to v1.11.0"),
    ("disk", ["v1.13.0"], "disk full"),
    ("mem", ["v1.13.0", "--check-items", "mem"], "mem: "),
    ("missing", ["v1.13.0"], "edgecore binary missing"),
    ("marker", ["v1.13.0"], "idempotency_record is present and live"),
    ("no-image", ["v1.14.0"], "image kubeedge/installation-package:v1.14.0 not found"),
    ("skip", ["v1.15.0"], "more than 1 minor version"),
])
def test_precheck_failures_leave_node_untouched(sandbox: Sandbox, setup: str, args: list[str],
                                                 needle: str) -> None:
    sandbox.image("v1.11.0")
    sandbox.image("v1.15.0")
    if setup == "disk":
        sandbox.configure(precheck={"reserve_bytes": 2**49})
    elif setup == "mem":
        sandbox.configure(precheck={"mem_max_percent": 0})
    elif setup == "missing":
        stop_edgecore(sandbox.root)
        sandbox.binary.unlink()
    elif setup == "marker":
        (sandbox.root / "etc/kubeedge/idempotency_record").write_text("123")
    elif setup == "skip":
        sandbox.configure(policy={"max_minor_skip": 1})
    before = sandbox.db.read_bytes()
    rc, out = sandbox.upgrade(args[0], *args[1:])
    assert (rc, out["job"]["state"]) == (4 if setup == "marker" else 5, "failed"), out
    assert needle in out["job"]["reason"]
    assert not (sandbox.state_dir / "backups").exists()
    assert sandbox.db.read_bytes() == before
    assert sandbox.final_reports()[0]["result"] == "upgrade_failed_rollback_success"


def test_bad_version_string_is_rejected_before_anything(sandbox: Sandbox) -> None:
    proc = sandbox.cli("upgrade", "--to-version", "v1.13.0;id", "--yes")
    assert proc.returncode == 2
    assert "bad version string 'v1.13.0;id'" in proc.stderr


def test_stale_keadm_marker_is_cleared(sandbox: Sandbox) -> None:
    marker = sandbox.root / "etc/kubeedge/idempotency_record"
    marker.write_text("123")
    os.utime(marker, (time.time() - 86400, time.time() - 86400))
    rc, out = sandbox.upgrade("v1.13.0")
    assert rc == 0, out
    assert not marker.exists()
    reasons = [r["reason"] for r in sandbox.reports()]
    stale = "cleared a stale keadm marker (idempotency_record, stale"
    assert any(r.startswith(stale) for r in reasons)


def test_agent_lock_makes_a_second_job_wait(sandbox: Sandbox) -> None:
    lock = sandbox.state_dir / "agent.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        rc, out = sandbox.upgrade("v1.13.0")
    assert rc == 4 and "another job is running" in out["error"]


@pytest.mark.parametrize("behaviour", ["fail", "fail-after-stop"])
def test_keadm_failure_rolls_back(sandbox: Sandbox, behaviour: str) -> None:
    sandbox.image("v1.14.0", keadm_behaviour=behaviour)
    sandbox.configure(policy={"max_minor_skip": 5})
    rc, out = sandbox.upgrade("v1.14.0")
    job = out["job"]
    assert (rc, job["state"]) == (1, "rolled_back"), job
    assert "installer exited with code 1" in job["reason"]
    assert sandbox.running_version() == "v1.12.1" and sandbox.edgecore_running()
    assert sandbox.db.read_bytes() == backup_db(sandbox)
    final = sandbox.final_reports(job["jobKey"])
    assert len(final) == 1 and final[0]["result"] == "upgrade_failed_rollback_success"
    assert "Error" in final[0]["logTail"]


def test_keadm_hang_is_killed_with_its_process_group(sandbox: Sandbox) -> None:
    sandbox.image("v1.13.0", keadm_behaviour="hang")
    rc, out = sandbox.upgrade("v1.13.0", "--timeout", "2")
    assert (rc, out["job"]["state"]) == (1, "rolled_back"), out
    assert "timed out after 2s" in out["job"]["reason"]
    staged = str(sandbox.state_dir / "staging/v1.13.0").encode()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and _cmdline_has(p, staged)]
    assert leftovers == []
    assert sandbox.running_version() == "v1.12.1"


def _cmdline_has(proc: Path, needle: bytes) -> bool:
    try:
        return needle in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_health_gate_failure_rolls_back_to_identical_data(sandbox: Sandbox) -> None:
    sandbox.image("v1.13.0", edgecore_behaviour="crash")
    rc, out = sandbox.upgrade("v1.13.0")
    job = out["job"]
    assert (rc, job["state"]) == (1, "rolled_back"), job
    assert job["reason"].startswith("health: edgecore")
    assert sandbox.running_version() == "v1.12.1" and sandbox.edgecore_running()
    assert sandbox.db.read_bytes() == backup_db(sandbox)
    assert [a["action"] for a in job["actionFlow"]][-2:] == ["Upgrade", "RollBack"]


def test_keadm_that_forgets_to_restart_is_covered(sandbox: Sandbox) -> None:
    sandbox.image("v1.13.0", keadm_behaviour="ok-no-restart")
    rc, out = sandbox.upgrade("v1.13.0")
    assert rc == 0, out
    assert sandbox.edgecore_running() and sandbox.running_version() == "v1.13.0"


def test_corrupted_backup_is_detected_before_restore(sandbox: Sandbox) -> None:
    rc, _ = sandbox.upgrade("v1.13.0")
    assert rc == 0
    db = sandbox.state_dir / "backups/v1.12.1/edgecore.db"
    data = bytearray(db.read_bytes())
    data[5000] ^= 0xFF
    db.write_bytes(bytes(data))
    pid_before = sandbox.root.joinpath("run/edgecore.pid").read_text()
    rc, out = sandbox.cli_json("rollback", "--yes")
    assert (rc, out["job"]["state"]) == (3, "rollback_failed"), out
    assert "edgecore.db is corrupted" in out["job"]["reason"]
    # The running node was not touched: same process, same version.
    assert sandbox.root.joinpath("run/edgecore.pid").read_text() == pid_before
    assert sandbox.running_version() == "v1.13.0"

    # From now on no upgrade builds on this node until an operator has looked.
    failed = out["job"]["jobKey"]
    sandbox.image("v1.14.0")
    rc, out = sandbox.upgrade("v1.14.0")
    assert (rc, out["job"]["state"]) == (5, "failed"), out
    assert f"job {failed} ended rollback_failed" in out["job"]["reason"]
    rc, plan = sandbox.upgrade("v1.14.0", "--dry-run")
    assert plan["plan"]["verdict"] == "NO-GO" and failed in plan["plan"]["reason"]
    assert sandbox.cli_json("status")[1]["blockedBy"] == failed
    rc, out = sandbox.cli_json("resolve", out["job"]["jobKey"], "--yes")  # the wrong job
    assert (rc, out["job"]["state"]) == (5, "failed"), out
    assert f"{failed} is" in out["job"]["reason"]
    rc, out = sandbox.cli_json("resolve", failed, "--yes")
    assert (rc, out["job"]["state"]) == (0, "succeeded"), out
    assert sandbox.final_reports(out["job"]["jobKey"])[0]["result"] == "resolve_success"
    assert sandbox.cli_json("status")[1]["blockedBy"] is None
    rc, out = sandbox.upgrade("v1.14.0")
    assert (rc, out["job"]["state"]) == (0, "succeeded"), out


def test_manual_rollback_restores_the_newest_backup(sandbox: Sandbox) -> None:
    assert sandbox.upgrade("v1.13.0")[0] == 0
    rc, out = sandbox.cli_json("rollback", "--to-version", "v1.11.0", "--yes")
    assert (rc, out["job"]["state"]) == (5, "failed") and "no backup of v1.11.0" in \
        out["job"]["reason"]
    assert sandbox.running_version() == "v1.13.0"
    rc, out = sandbox.cli_json("rollback", "--yes")
    assert (rc, out["job"]["state"]) == (0, "rolled_back"), out
    assert (out["job"]["fromVersion"], out["job"]["toVersion"]) == ("v1.13.0", None)
    assert sandbox.running_version() == "v1.12.1"
    assert sandbox.db.read_bytes() == backup_db(sandbox)
    final = sandbox.final_reports(out["job"]["jobKey"])[0]
    assert (final["state"], final["result"]) == ("Successful", "rollback_success")


def test_custom_installer_template(sandbox: Sandbox) -> None:
    keadm = "{keadm}"
    sandbox.configure(installers={"site-tool": [keadm, "upgrade", "edge", "--force",
                                                "--toVersion", "{to_version}",
                                                "--config", "{config}"]})
    rc, out = sandbox.upgrade("v1.13.0", "--upgrade-tool", "site-tool")
    assert rc == 0, out
    rc, out = sandbox.upgrade("v1.13.0", "--upgrade-tool", "nope")
    assert rc == 2 and "unknown upgradeTool 'nope'" in out["error"]


def _tree_hash(root: Path, skip: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_relative_to(skip) or path.name == "edgecore.pid":
            continue
        st = path.lstat()
        h.update(f"{path.relative_to(root)}:{st.st_mode}:{st.st_size}".encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(("version", "rc_expected", "verdict"),
                         [("v1.13.0", 0, "GO"), ("v1.14.0", 5, "NO-GO")])
def test_dry_run_changes_nothing_outside_state_dir(sandbox: Sandbox, version: str,
                                                   rc_expected: int, verdict: str) -> None:
    sandbox.cli("status")  # let the state dir exist, so only its contents may change
    before = _tree_hash(sandbox.root, sandbox.state_dir)
    rc, out = sandbox.upgrade(version, "--dry-run")
    assert rc == rc_expected, out
    plan = out["plan"]
    assert plan["verdict"] == verdict
    assert _tree_hash(sandbox.root, sandbox.state_dir) == before
    if verdict == "GO":
        assert plan["installerArgv"][1:3] == ["upgrade", "--upgradeID"]
        assert plan["backupBytes"] > 0 and plan["freeBytes"] > plan["neededBytes"]
        assert set(plan["pathsTouched"]) >= {"edgecoreBinary", "backupDir", "keadmMarker"}
    report = sandbox.final_reports()[0]
    assert report["rehearsal"] is True and report["plan"]["verdict"] == verdict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("source",
                         ["log", "config", "metaserver", "package", "binary", "record"])
def test_version_detection_sources(tmp_path: Path, sandbox: Sandbox, source: str) -> None:
    """Each source answers when those before it cannot; none runs edgecore."""
    stop_edgecore(sandbox.root)
    port = _free_port()
    make_node(sandbox.root, "v1.12.1", config_version_field=source == "config",
              metaserver_port=port if source == "metaserver" else None)
    log = sandbox.root / "var/log/edgecore.log"
    log.unlink(missing_ok=True)
    if source in ("log", "metaserver"):
        start_edgecore(sandbox.root)
        wait_for(lambda: log.exists() and "Version:" in log.read_text())
    if source == "metaserver":
        log.write_text("")  # the start line is gone (journal rotated): MetaServer answers
        sandbox.configure(health={"metaserver_url": f"http://127.0.0.1:{port}"})
        wait_for(lambda: _port_open(port))
    sandbox.cli("status")  # creates the journal
    with sqlite3.connect(sandbox.state_dir / "journal.db") as db:
        if source == "package":
            sha = hashlib.sha256(sandbox.binary.read_bytes()).hexdigest()
            db.execute("INSERT INTO meta(k, v) VALUES(?, 'v1.12.1')",
                       (f"edgecore_sha256:{sha}",))
        if source == "record":
            db.execute("INSERT INTO meta(k, v) VALUES('edgecore_version', 'v1.12.1')")
    if source == "record":
        # A binary with no single version literal (not a release build).
        sandbox.binary.write_bytes(b"\0v1.1.1\0v2.2.2\0")
    _rc, out = sandbox.cli_json("status")
    assert (out["edgecoreVersion"], out["versionSource"]) == ("v1.12.1", source)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


OPERATOR_UNIT = """[Unit]
Description=edgecore (the operator's)
[Service]
ExecStart={program} --config /etc/kubeedge/config/edgecore.yaml
Environment=HTTPS_PROXY=http://proxy.local:3128
KillMode=process
[Install]
WantedBy=multi-user.target
"""


@pytest.mark.parametrize(("preserve", "program", "kept"), [
    (True, "/usr/local/bin/edgecore", "operator"),
    (False, "/usr/local/bin/edgecore", "keadm"),
    (True, "/opt/edge/bin/edgecore", "keadm"),  # keadm's unit runs another program
])
def test_operator_unit_across_keadm(sandbox: Sandbox, preserve: bool, program: str,
                                    kept: str) -> None:
    """The keadm stand-in rewrites a unit file it finds, as the real one does."""
    unit = sandbox.root / "etc/systemd/system/edgecore.service"
    unit.parent.mkdir(parents=True)
    ours = OPERATOR_UNIT.format(program=program)
    unit.write_text(ours)
    sandbox.configure(service={"preserve_unit": preserve})
    rc, out = sandbox.upgrade("v1.13.0")
    assert rc == 0, out
    assert (unit.read_text() == ours) == (kept == "operator"), unit.read_text()
    reasons = " ".join(r["reason"] for r in sandbox.reports())
    if kept == "keadm":
        assert "kept keadm's unit" in reasons
    # The backup holds the operator's unit; a rollback puts it back whatever keadm did.
    assert (sandbox.state_dir / "backups/v1.12.1/edgecore.service").read_text() == ours
    sandbox.image("v1.14.0", edgecore_behaviour="crash")
    rc, out = sandbox.upgrade("v1.14.0")
    assert out["job"]["state"] == "rolled_back", out
    if kept == "operator":
        assert unit.read_text() == ours
