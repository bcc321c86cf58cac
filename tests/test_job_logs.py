"""Issue 12, logs: job and phase on every line, per-job log files, `logs JOB`, fluentd.

fluentd is not installable here, so the end-to-end tests do what its pipeline
(config/fluentd/edge-upgrade-agent.conf) does to each line the agent writes
during a real job: journald takes the ``<N>`` prefix off into PRIORITY, the
parser filter reads MESSAGE as one JSON object. Every line must survive that
with ``job``, ``phase``, ``level``, ``event`` and ``timestamp`` as fields.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import REPO, Sandbox

from agent.errors import AgentError
from agent.logs import (
    LOG_FORMAT_ENV,
    REDACTED,
    add_phase,
    is_agent_line,
    job_log_files,
    note_phase,
    setup_logging,
    show_job_log,
)

JSON_ENV = {LOG_FORMAT_ENV: "json"}
PRIORITY = re.compile(r"^<([0-7])>(.*)$")
LEVELS = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
FIELDS = ("job", "phase", "level", "event", "timestamp")
CONF = REPO / "config/fluentd/edge-upgrade-agent.conf"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def journald(line: str) -> dict[str, Any]:
    """What fluentd gets from the journal for one stderr line, parsed as its filter does."""
    match = PRIORITY.match(line)
    assert match, f"no syslog priority prefix: {line!r}"
    record = json.loads(match.group(2))  # one line, one JSON object: or this raises
    assert isinstance(record, dict), line
    assert LEVELS[record["level"]] == int(match.group(1)), line
    return record


# --------------------------------------------------------------------------- phase


def test_phase_follows_the_job_state_events() -> None:
    def phase(**event: Any) -> Any:
        return add_phase(None, "info", dict(event)).get("phase", "absent")

    assert phase(event="agent ready") == "absent"  # no job: no phase
    assert phase(event="waiting", job="job-p1") is None  # a job not seen yet: null
    note_phase("job-p1", "received")  # the runner takes the job up
    assert phase(event="stale marker", job="job-p1") == "received"
    assert phase(event="job state", job="job-p1", state="prechecked") == "prechecked"
    assert phase(event="image staged", job="job-p1") == "prechecked"
    assert phase(event="other job", job="job-p2") is None
    assert phase(event="explicit", job="job-p1", phase="mine") == "mine"


# --------------------------------------------------------------------------- per-job files


def test_job_lines_go_to_stderr_and_to_the_job_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"  # created on the first line
    setup_logging("info", json_output=True, job_log_dir=logs)
    log = structlog.get_logger()
    log.info("agent ready")  # no job: stderr only
    with structlog.contextvars.bound_contextvars(job="job-1/h1"):
        log.info("job state", state="prechecked", reason="prechecks passed")
        log.warning("pull", registry="https://bob:s3cr3t@registry.example/v2", token="t0k")
    log.info("duplicate command ignored", job="job-2")
    log.warning("command rejected", job="../../etc/passwd")  # never a path
    err = capsys.readouterr().err.splitlines()
    records = [journald(line) for line in err]
    assert [r.get("job") for r in records] == [None, "job-1/h1", "job-1/h1", "job-2",
                                                "../../etc/passwd"]
    assert [r.get("phase", "-") for r in records] == ["-", "prechecked", "prechecked", None,
                                                       None]
    assert sorted(p.name for p in logs.iterdir()) == ["job-1_h1.jsonl", "job-2.jsonl"]
    lines = (logs / "job-1_h1.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records[1:3]  # the same objects
    assert all(is_agent_line(line) for line in lines)
    assert "s3cr3t" not in lines[1] and json.loads(lines[1])["token"] == REDACTED
    assert oct((logs / "job-2.jsonl").stat().st_mode & 0o777) == "0o600"


def test_console_output_still_writes_json_job_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_output=False, job_log_dir=tmp_path)
    structlog.get_logger().info("job state", job="job-1", state="backed_up")
    assert "job state" in capsys.readouterr().err
    (line,) = (tmp_path / "job-1.jsonl").read_text().splitlines()
    assert {k: json.loads(line)[k] for k in ("job", "phase", "level", "event")} == {
        "job": "job-1", "phase": "backed_up", "level": "info", "event": "job state"}


def test_a_full_disk_never_breaks_the_job(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    (tmp_path / "job-1.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    (tmp_path / "job-2.jsonl").mkdir()  # cannot be opened for writing at all
    setup_logging("info", json_output=True, job_log_dir=tmp_path)
    log = structlog.get_logger()
    log.info("job state", job="job-1", state="installing")
    log.error("step failed", job="job-2")
    first, second = (journald(line) for line in capsys.readouterr().err.splitlines())
    assert first["event"] == "job state" and "No space left" in first["job_log_error"]
    assert second["level"] == "error" and "job_log_error" in second


@pytest.mark.parametrize(("forced", "tty", "json_lines"), [
    ("json", True, True), ("text", False, False), ("", False, True), ("bogus", True, False)])
def test_log_format_environment_variable(monkeypatch: pytest.MonkeyPatch, forced: str,
                                         tty: bool, json_lines: bool) -> None:
    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return tty

    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv(LOG_FORMAT_ENV, forced)
    setup_logging("info")
    structlog.get_logger().info("hello", job="job-1")
    assert stderr.getvalue().startswith("<6>{") == json_lines, stderr.getvalue()


# --------------------------------------------------------------------------- reading


def write_job(logs: Path, key: str, agent: list[dict[str, Any]], installer: str) -> None:
    installer_log, agent_log = job_log_files(logs, key)
    logs.mkdir(parents=True, exist_ok=True)
    agent_log.write_text("".join(json.dumps(e) + "\n" for e in agent))
    if installer:
        installer_log.write_text(installer)


def state(name: str) -> dict[str, Any]:
    return {"job": "job-1", "phase": name, "state": name, "event": "job state",
            "level": "info"}


def test_show_puts_the_installer_output_where_the_install_ran(tmp_path: Path) -> None:
    write_job(tmp_path, "job-1", [state("prechecked"), state("installing"),
                                  state("verifying")],
              "$ keadm upgrade\n{not the agent}\nno newline at the end")
    out = io.StringIO()
    show_job_log(tmp_path, "job-1", out=out)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["state"] if is_agent_line(line) else line for line in lines] == [
        "prechecked", "installing", "$ keadm upgrade", "{not the agent}",
        "no newline at the end", "verifying"]


def test_show_a_job_that_never_installed_or_predates_the_agent_lines(tmp_path: Path) -> None:
    write_job(tmp_path, "prepull-1", [state("received"), state("succeeded")], "")
    out = io.StringIO()
    show_job_log(tmp_path, "prepull-1", out=out)
    assert len(out.getvalue().splitlines()) == 2
    job_log_files(tmp_path, "old-1")[0].write_text("$ keadm\nkeadm line\n")
    out = io.StringIO()
    show_job_log(tmp_path, "old-1", out=out)
    assert out.getvalue() == "$ keadm\nkeadm line\n"


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "job-1/../../x", ".hidden",
                                 "Job-1", "job-1/h1/h2", "", "a" * 300])
def test_show_refuses_anything_but_a_job_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(AgentError, match="not a job key"):
        show_job_log(tmp_path, key)


def test_show_unknown_job(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no log for job 'job-9'"):
        show_job_log(tmp_path / "logs", "job-9")


class Lines(io.StringIO):
    """A stream a follower writes to from another thread, and a test waits on."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def write(self, s: str) -> int:
        with self.changed:
            n = super().write(s)
            self.changed.notify_all()
            return n

    def wait_for(self, text: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: text in self.getvalue(), timeout=10), \
                self.getvalue()


def test_follow_prints_what_is_appended_until_stopped(tmp_path: Path) -> None:
    write_job(tmp_path, "job-1", [state("backed_up"), state("installing")], "")
    installer_log, agent_log = job_log_files(tmp_path, "job-1")
    out, stop = Lines(), threading.Event()
    follower = threading.Thread(target=show_job_log, args=(tmp_path, "job-1"),
                                kwargs={"follow": True, "out": out, "poll_seconds": 0.02,
                                        "stop": stop})
    follower.start()
    try:
        out.wait_for('"installing"')
        with installer_log.open("a") as f:
            f.write("$ keadm upgrade\nhalf a li")
        out.wait_for("$ keadm upgrade\n")
        with installer_log.open("a") as f:
            f.write("ne\n")
        with agent_log.open("a") as f:
            f.write(json.dumps(state("verifying")) + "\n")
        out.wait_for('"verifying"')
    finally:
        stop.set()
        follower.join(10)
    assert not follower.is_alive()
    lines = out.getvalue().splitlines()
    assert lines[2:4] == ["$ keadm upgrade", "half a line"]
    assert json.loads(lines[4])["state"] == "verifying"


def test_follow_ends_when_the_reader_goes(tmp_path: Path) -> None:
    class Gone(io.StringIO):  # `logs -f JOB | head -1`
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    write_job(tmp_path, "job-1", [state("installing")], "")
    show_job_log(tmp_path, "job-1", follow=True, out=Gone(), poll_seconds=0.01)  # returns


# --------------------------------------------------------------------------- end to end


def job_lines(box: Sandbox, key: str) -> tuple[list[str], list[str]]:
    installer_log, agent_log = job_log_files(box.state_dir / "logs", key)
    return installer_log.read_text().splitlines(), agent_log.read_text().splitlines()


def assert_fluentd_ready(stderr: str, key: str) -> list[dict[str, Any]]:
    """Every line of the job is one JSON object with the fields fluentd keeps."""
    records = [journald(line) for line in stderr.splitlines()]
    assert records
    for record in records:
        assert all(record.get(f) for f in FIELDS), record
        assert record["job"] == key, record
    return records


def test_upgrade_logs_are_fluentd_ready_and_in_the_job_log(sandbox: Sandbox) -> None:
    sandbox.image("v1.13.0")
    proc = sandbox.cli("--output", "json", "upgrade", "--to-version", "v1.13.0", "--yes",
                       env=sandbox.env(**JSON_ENV))
    result = json.loads(proc.stdout)  # stdout: the command's result alone
    key = result["job"]["jobKey"]
    assert (proc.returncode, result["job"]["state"]) == (0, "succeeded"), proc.stderr
    records = assert_fluentd_ready(proc.stderr, key)
    assert [r["state"] for r in records if r["event"] == "job state"] == [
        "prechecked", "prechecked", "image_ready", "backed_up", "installing", "verifying",
        "succeeded"]
    assert all(r["phase"] == r["state"] for r in records if r["event"] == "job state")
    pulled = next(r for r in records if "available locally" in r["event"])
    assert pulled["phase"] == "prechecked"

    installer, agent = job_lines(sandbox, key)
    # The agent's own lines: the same objects as on stderr, without the prefix.
    assert [json.loads(line) for line in agent] == records
    # The installer's log stays keadm's alone, `$ argv` first (what reports tail).
    assert installer[0].startswith("$ ") and " upgrade --upgradeID " in installer[0]
    assert not any(is_agent_line(line) for line in installer)

    shown = sandbox.cli("logs", key)
    assert (shown.returncode, shown.stderr) == (0, "")
    lines = shown.stdout.splitlines()
    assert sorted(lines) == sorted(agent + installer)
    start = next(i for i, line in enumerate(lines) if line.startswith("$ "))
    assert json.loads(lines[start - 1])["state"] == "installing"
    assert json.loads(lines[start + len(installer)])["state"] == "verifying"
    assert lines[start:start + len(installer)] == installer


def test_rollback_logs_are_fluentd_ready_and_reports_tail_keadm(sandbox: Sandbox) -> None:
    sandbox.image("v1.14.0", keadm_behaviour="fail")
    sandbox.configure(policy={"max_minor_skip": 5})
    rc, out = sandbox.cli_json("upgrade", "--to-version", "v1.14.0", "--yes",
                               env=sandbox.env(**JSON_ENV))
    key = out["job"]["jobKey"]
    assert (rc, out["job"]["state"]) == (1, "rolled_back"), out
    proc = sandbox.cli("logs", key)
    shown = proc.stdout.splitlines()
    agent = [json.loads(line) for line in shown if is_agent_line(line)]
    assert {r["phase"] for r in agent} >= {"installing", "rolling_back", "rolled_back"}
    assert all(r["job"] == key and r["level"] and r["phase"] for r in agent)
    (final,) = sandbox.final_reports(key)
    tail = final["logTail"].splitlines()
    assert "Error" in final["logTail"] and not any(is_agent_line(line) for line in tail)


def test_lines_before_the_first_transition_have_a_phase(sandbox: Sandbox) -> None:
    marker = sandbox.root / "etc/kubeedge/idempotency_record"
    marker.write_text("123")
    os.utime(marker, (time.time() - 86400, time.time() - 86400))
    proc = sandbox.cli("--output", "json", "upgrade", "--to-version", "v1.13.0", "--yes",
                       env=sandbox.env(**JSON_ENV))
    key = json.loads(proc.stdout)["job"]["jobKey"]
    records = [journald(line) for line in proc.stderr.splitlines()]
    stale = next(r for r in records if r["event"] == "cleared a stale keadm marker")
    assert stale["phase"] == "received"  # logged in `received`, before any `job state`
    assert_fluentd_ready(proc.stderr, key)


def test_logs_command_errors(sandbox: Sandbox) -> None:
    bad = sandbox.cli("logs", "../../etc/passwd")
    assert bad.returncode == 2 and "not a job key" in bad.stderr, bad
    assert bad.stdout == ""
    rc, out = sandbox.cli_json("logs", "job-404")
    assert rc == 2 and out == {"error": f"no log for job 'job-404' in "
                                        f"{sandbox.state_dir / 'logs'}",
                               "errorType": "AgentError"}


def test_logs_follow_until_ctrl_c(sandbox: Sandbox) -> None:
    logs = sandbox.state_dir / "logs"
    write_job(logs, "job-1", [state("installing")], "$ keadm upgrade\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(sandbox.config), "logs", "-f", "job-1"],
        cwd=REPO, env=sandbox.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["state"] == "installing"
        assert proc.stdout.readline() == "$ keadm upgrade\n"
        with job_log_files(logs, "job-1")[0].open("a") as f:
            f.write("[keadm] upgrade finished\n")
        assert proc.stdout.readline() == "[keadm] upgrade finished\n"
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 130
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- fluentd config


def directives(text: str) -> dict[str, list[str]]:
    """``name -> [values]`` of every directive line (a flat view of fluentd's format)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split(" #")[0].strip()
        if line and not line.startswith(("#", "<")):
            name, _, value = line.partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


def test_fluentd_config_reads_the_agent_unit_and_keeps_the_fields() -> None:
    conf = directives(CONF.read_text())
    assert conf["@type"] == ["systemd", "local", "parser", "json", "elasticsearch", "file"]
    (matches,) = conf["matches"]
    (unit,) = (m["_SYSTEMD_UNIT"] for m in json.loads(matches))
    assert (REPO / "systemd" / unit).is_file()
    assert conf["key_name"] == ["MESSAGE"] and conf["time_key"] == ["timestamp"]
    assert conf["keep_time_key"] == conf["reserve_data"] == ["true"]
    assert conf["index_name"] == ["edge-upgrade-agent"]
    assert conf["tag"] == ["edge-upgrade-agent"]
