"""Prometheus metrics, the Grafana dashboard and the alert rules (issue 12).

Off by default and then free (no ``prometheus_client``); the recorder's values
in process; the textfile a CLI job writes, checked by ``promtool check
metrics``; a real Prometheus (Debian's ``prometheus``) scraping a running
daemon, through which every expression of the dashboard must answer with
series; and ``promtool`` on the alert rules and their unit test.

Prometheus and promtool are skipped when missing, unless
``EDGE_TEST_REQUIRE_PROMETHEUS=1`` (as in CI), which makes their absence a
failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, Sandbox, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import Daemon
from test_mqtt import Agent as MqttAgent

from agent import metrics
from agent.config import Config, Metrics, parse_config
from agent.errors import ConfigError
from agent.messages.commands import Operation, build_command
from agent.model import Job
from agent.node import Node, build_node
from agent.states import State
from testkit.broker import Broker
from testkit.pki import make_pki

DASHBOARD = REPO / "config/grafana/edge-upgrades.json"
ALERTS = REPO / "config/prometheus/alerts.yml"
ALERTS_TEST = REPO / "config/prometheus/alerts_test.yml"
REQUIRE = os.environ.get("EDGE_TEST_REQUIRE_PROMETHEUS") == "1"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} is not installed, and EDGE_TEST_REQUIRE_PROMETHEUS=1")
        pytest.skip(f"{name} is not installed (Debian's prometheus package)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def promtool_check_metrics(text: str) -> None:
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def lint_if_available(text: str) -> None:
    """promtool where it is (always in CI); the unit tests do not need it otherwise."""
    if shutil.which("promtool") or REQUIRE:
        promtool_check_metrics(text)


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(data["panels"]) for t in p.get("targets", [])]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("listen", "expected"), [
    (9464, ("127.0.0.1", 9464)),
    ("9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9464", ("::1", 9464)),
    ("edge-1.example:9464", ("edge-1.example", 9464)),
])
def test_listen_takes_host_and_port_and_defaults_to_loopback(
        listen: Any, expected: tuple[str, int]) -> None:
    config = parse_config({"node_name": "n", "metrics": {"listen": listen}})
    assert config.metrics.listen == expected and config.metrics.enabled


@pytest.mark.parametrize(("section", "message"), [
    ({"listen": "::1:9464"}, "metrics.listen: put an IPv6 address in brackets"),
    ({"listen": ":9464"}, "metrics.listen: ':9464' has no valid host"),
    ({"listen": "a b:9464"}, "has no valid host"),
    ({"listen": "127.0.0.1:http"}, "has no port in 1..65535"),
    ({"listen": 70000}, "has no port in 1..65535"),
    ({"listen": 0}, "has no port in 1..65535"),
    ({"listen": True}, "metrics.listen: expected [host:]port"),
    ({"listen": [9464]}, "metrics.listen: expected str/int"),
    ({"textfile": "metrics.prom"}, "metrics.textfile: 'metrics.prom' must be an absolute path"),
    ({"textfile_interval_seconds": 0.5}, "metrics.textfile_interval_seconds: 0.5 is outside"),
    ({"listn": 9464}, "metrics.listn: unknown key"),
])
def test_metrics_config_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"node_name": "n", "metrics": section})


def test_metrics_are_off_by_default() -> None:
    config = parse_config({"node_name": "n", "metrics": None})
    assert config.metrics == Metrics() and not config.metrics.enabled
    assert config.metrics.textfile_interval_seconds == 60


# --------------------------------------------------------------------------- off: free

OFF = """
import asyncio, json, sys
from pathlib import Path
from agent import metrics
from agent.cli import main  # every module a CLI job or the daemon loads
from agent.config import parse_config
from agent.daemon import Daemon
from agent.intake import Parser
from agent.node import build_node
import agent.transport.mqtt

def build(extra):
    data = {"node_name": "n", "service": {"manager": "process"}, **extra}
    return parse_config(data).with_root(Path(sys.argv[1]))

config = build({})
node = build_node(config)
daemon = Daemon(node, Parser(config))
off = metrics.enable(config, node, rejected=lambda: 0)
with metrics.timed("received"):
    pass
metrics.current().broker(True)
asyncio.run(metrics.current().after_job())
metrics.flush()
loaded_off = "prometheus_client" in sys.modules
on = metrics.enable(build({"metrics": {"listen": 9464}}), node)
print(json.dumps({"off": off is None, "loaded_off": loaded_off,
                  "loaded_on": "prometheus_client" in sys.modules,
                  "on": type(on).__name__}))
node.close()
"""


def test_metrics_off_never_load_the_client(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", OFF, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "off": True, "loaded_off": False, "loaded_on": True, "on": "NodeMetrics"}


# --------------------------------------------------------------------------- in process


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    config = parse_config({
        "node_name": "node-7", "service": {"manager": "process"},
        "metrics": {"listen": 9464, "textfile": str(tmp_path / "out" / "edge.prom")},
    }).with_root(tmp_path / "root")
    (tmp_path / "out").mkdir()
    built = build_node(config)
    yield built
    metrics.disable()
    built.close()


def add_job(node: Node, name: str, state: State, *, operation: Operation = Operation.UPGRADE,
            dry_run: bool = False) -> None:
    cmd = build_command(node.config, operation=operation, job_name=name,
                        version="v1.13.0" if operation != Operation.ROLLBACK else None,
                        dry_run=dry_run)
    node.journal.add(Job(key=cmd.key, command=cmd, state=state, reason="test"),
                     lambda j: {"jobKey": j.key, "sequence": j.seq})


def recorder(node: Node, config: Config | None = None) -> metrics.NodeMetrics:
    made = metrics.enable(config or node.config, node, rejected=lambda: 3)
    assert made is not None
    return made


def test_values_come_from_the_journal_events_and_the_backups(node: Node) -> None:
    rec = recorder(node)
    text = rec.render().decode()
    lint_if_available(text)
    # Before any job: every expected (operation, result) pair at 0, each phase empty.
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="failed") == 0
    assert value(text, "edge_upgrade_jobs_total", operation="rollback",
                 result="rollback_failed") == 0
    assert value(text, "edge_upgrade_phase_duration_seconds_count", phase="installing") == 0
    assert "edge_upgrade_last_result_timestamp_seconds" not in text
    assert "_created" not in text
    assert value(text, "edge_upgrade_agent_info", version="0.1.0", node="node-7") == 1
    assert value(text, "edge_upgrade_broker_connected") == 1  # spool
    assert value(text, "edge_upgrade_broker_reconnects_total") == 0
    assert value(text, "edge_upgrade_rejected_commands_total") == 3
    assert value(text, "edge_upgrade_outbox_reports") == 0
    assert value(text, "edge_upgrade_outbox_oldest_age_seconds") == 0
    assert value(text, "edge_upgrade_backups") == 0

    add_job(node, "a", State.SUCCEEDED)
    add_job(node, "b", State.ROLLED_BACK)
    add_job(node, "c", State.ROLLED_BACK, operation=Operation.ROLLBACK)
    add_job(node, "d", State.FAILED, dry_run=True)  # a rehearsal: not a job that ran
    add_job(node, "e", State.REJECTED)  # counted, but not the last result
    backup = node.backup_root / "v1.12.1"
    backup.mkdir(parents=True)
    (backup / "manifest.json").write_text("{}")
    (backup / "edgecore").write_bytes(b"x" * 1000)
    rec.edgecore(None)
    text = rec.render().decode()
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="succeeded") == 1
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="rolled_back") == 1
    assert value(text, "edge_upgrade_jobs_total", operation="rollback",
                 result="rolled_back") == 1
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="failed") == 0
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="rejected") == 1
    assert value(text, "edge_upgrade_last_result", result="rolled_back") == 1
    assert value(text, "edge_upgrade_last_result", result="succeeded") == 0
    assert ("edge_upgrade_last_result", frozenset({("result", "rejected")})) not in samples(text)
    assert time.time() - value(text, "edge_upgrade_last_result_timestamp_seconds") < 60
    assert value(text, "edge_upgrade_outbox_reports") == 5
    assert value(text, "edge_upgrade_outbox_oldest_age_seconds") >= 0
    assert value(text, "edge_upgrade_backups") == 1
    assert value(text, "edge_upgrade_backup_bytes") == 1002
    assert value(text, "edge_upgrade_edgecore_info", version="unknown", source="none") == 1

    with sqlite3.connect(node.journal.path) as db:  # a report waiting for an hour
        db.execute("UPDATE outbox SET created_at = created_at - 3600")
    age = value(rec.render().decode(), "edge_upgrade_outbox_oldest_age_seconds")
    assert 3600 <= age < 3700


def test_phase_histogram_is_kept_in_the_journal(node: Node) -> None:
    rec = recorder(node)
    for seconds in (0.05, 0.3, 45, 4000):
        rec.phase("installing", seconds)
    rec.phase("verifying", 2)
    # Another process (a CLI job, the daemon after a restart) reads the same histogram.
    text = recorder(node).render().decode()
    name = "edge_upgrade_phase_duration_seconds"
    assert value(text, f"{name}_bucket", phase="installing", le="0.1") == 1
    assert value(text, f"{name}_bucket", phase="installing", le="0.5") == 2
    assert value(text, f"{name}_bucket", phase="installing", le="60.0") == 3
    assert value(text, f"{name}_bucket", phase="installing", le="1800.0") == 3
    assert value(text, f"{name}_bucket", phase="installing", le="+Inf") == 4
    assert value(text, f"{name}_count", phase="installing") == 4
    assert value(text, f"{name}_sum", phase="installing") == pytest.approx(4045.35)
    assert value(text, f"{name}_count", phase="verifying") == 1
    assert value(text, f"{name}_count", phase="received") == 0
    # A damaged value is dropped, not fatal.
    node.journal.set_meta(metrics.PHASE_KEY, "{not json")
    rec.phase("verifying", 1)
    assert value(rec.render().decode(), f"{name}_count", phase="verifying") == 1


async def test_runner_hook_times_each_step_and_ignores_cancellation(node: Node) -> None:
    rec = recorder(node)
    with metrics.timed("received"):
        pass
    with pytest.raises(ValueError), metrics.timed("prechecked"):
        raise ValueError("a bug in a step still took its time")

    async def stopped() -> None:
        with metrics.timed("installing"):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(stopped())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    text = rec.render().decode()
    count = "edge_upgrade_phase_duration_seconds_count"
    assert value(text, count, phase="received") == 1
    assert value(text, count, phase="prechecked") == 1
    assert value(text, count, phase="installing") == 0


def test_broker_connects_and_reconnects(node: Node) -> None:
    config = parse_config({"node_name": "node-7", "metrics": {"listen": 9464},
                           "transport": {"kind": "mqtt"}}).with_root(node.config.paths.root)
    rec = recorder(node, config)
    assert value(rec.render().decode(), "edge_upgrade_broker_connected") == 0
    for up in (False, True, False, True, False, True):  # a failed attempt, then two drops
        metrics.current().broker(up)
    text = rec.render().decode()
    assert value(text, "edge_upgrade_broker_connected") == 1
    assert value(text, "edge_upgrade_broker_reconnects_total") == 2


def test_textfile_is_replaced_atomically(node: Node, tmp_path: Path) -> None:
    rec = recorder(node)
    assert rec.textfile is not None
    old_umask = os.umask(0o077)
    try:
        rec.write_textfile()
    finally:
        os.umask(old_umask)
    assert os.listdir(tmp_path / "out") == ["edge.prom"]  # no temp file left
    assert stat.S_IMODE(rec.textfile.stat().st_mode) == 0o644  # node_exporter can read it
    first = rec.textfile.stat().st_ino
    rec.write_textfile()
    assert rec.textfile.stat().st_ino != first  # a new file renamed over, never rewritten
    lint_if_available(rec.textfile.read_text())
    # An unwritable place is logged, never raised into a job or the daemon.
    rec.textfile = tmp_path / "missing" / "edge.prom"
    rec.write_textfile()
    assert not (tmp_path / "missing").exists()


async def http(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[str, bytes, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    writer.write_eof()  # a request cut short ends here, not at the server's timeout
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), head, body


async def test_endpoint_serves_get_metrics_only(node: Node) -> None:
    rec = recorder(node)
    port = free_port()
    rec.listen = ("127.0.0.1", port)
    server = await rec._start_server()
    assert server is not None
    try:
        status, head, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert b"edge_upgrade_agent_info{" in body
        assert f"Content-Length: {len(body)}".encode() in head
        status, _, body = await http(port, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b""
        assert (await http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == \
            "HTTP/1.1 405 Method Not Allowed"
        assert (await http(port, b"GET /metr"))[2] == b""  # cut short: closed, no answer
        # A second bind of the same port fails softly: the daemon keeps running.
        assert await rec._start_server() is None
    finally:
        server.close()
        await server.wait_closed()


def test_mqtt_transport_reports_its_connection(sandbox: Sandbox, tmp_path: Path) -> None:
    """The transport's hooks, through a real broker: connected, dropped, reconnected."""
    pki = make_pki(tmp_path / "pki")
    broker = Broker(pki, tmp_path / "broker")
    broker.start()
    cert, key = pki.client("node-1")
    port = free_port()
    sandbox.configure(metrics={"listen": port}, transport={"kind": "mqtt", "mqtt": {
        "host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
        "cert_file": str(cert), "key_file": str(key), "reconnect_min_seconds": 0.2,
        "reconnect_max_seconds": 0.5}})
    agent = MqttAgent(sandbox)
    agent.start()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def broker_state() -> tuple[float, float]:
        try:
            text = scrape()
        except OSError:
            return -1, -1
        return (value(text, "edge_upgrade_broker_connected"),
                value(text, "edge_upgrade_broker_reconnects_total"))

    try:
        wait_for(lambda: broker_state() == (1, 0), timeout=30)
        broker.stop()
        wait_for(lambda: broker_state() == (0, 0), timeout=30)
        broker.start()
        wait_for(lambda: broker_state() == (1, 1), timeout=30)
    finally:
        agent.stop(signal.SIGKILL)
        broker.stop()


# --------------------------------------------------------------------------- CLI textfile


def test_cli_job_writes_the_textfile(sandbox: Sandbox, tmp_path: Path) -> None:
    textfile = tmp_path / "textfile" / "edge_upgrade_agent.prom"
    textfile.parent.mkdir()
    sandbox.configure(metrics={"textfile": str(textfile)})
    sandbox.image("v1.13.0")
    code, out = sandbox.upgrade("v1.13.0")
    assert code == 0 and out["job"]["state"] == "succeeded", out
    text = textfile.read_text()
    promtool_check_metrics(text)
    assert os.listdir(textfile.parent) == [textfile.name]
    assert value(text, "edge_upgrade_jobs_total", operation="upgrade", result="succeeded") == 1
    assert value(text, "edge_upgrade_last_result", result="succeeded") == 1
    assert value(text, "edge_upgrade_edgecore_info", version="v1.13.0", source="log") == 1
    assert value(text, "edge_upgrade_backups") == 1
    assert value(text, "edge_upgrade_backup_bytes") > 0
    for phase in ("received", "prechecked", "image_ready", "backed_up", "installing",
                  "verifying"):
        assert value(text, "edge_upgrade_phase_duration_seconds_count", phase=phase) == 1
    assert value(text, "edge_upgrade_phase_duration_seconds_count", phase="rolling_back") == 0
    # The daemon's own values are not the CLI's to write.
    assert "edge_upgrade_broker_connected" not in text
    assert "edge_upgrade_rejected_commands_total" not in text
    # Commands that run no job leave the file alone.
    before = textfile.stat().st_mtime_ns
    assert sandbox.cli("status").returncode == 0
    assert textfile.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- dashboard, rules


def test_dashboard_and_rules_use_only_exported_metrics(node: Node) -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["targets"]
    rec = recorder(node)
    add_job(node, "a", State.SUCCEEDED)
    rec.edgecore(None)
    exported = {s[0] for s in samples(rec.render().decode())}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    exprs = dashboard_exprs() + [r["expr"] for r in rules]
    used = {m for e in exprs for m in re.findall(r"\bedge_upgrade_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert {"edge_upgrade_edgecore_info", "edge_upgrade_jobs_total",
            "edge_upgrade_phase_duration_seconds_bucket",
            "edge_upgrade_outbox_oldest_age_seconds", "edge_upgrade_broker_connected"} <= used


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for r in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert names == tested  # every rule fires in the test


# --------------------------------------------------------------------------- real Prometheus


def _answers(fetch: Any) -> bool:
    try:
        fetch()
    except OSError:
        return False
    return True


@dataclass
class Prometheus:
    url: str
    agent_port: int  # the scrape target: 127.0.0.1:<agent_port>
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        if answer["data"]["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def number(self, expr: str) -> float:
        found = self.query(expr)
        return float(found[0]["value"][1]) if found else -1.0


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    agent_port, port = free_port(), free_port()
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "edge-upgrade-agent",
                            "static_configs": [{"targets": [f"127.0.0.1:{agent_port}"]}]}],
    }))
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}", agent_port, log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_daemon_and_every_dashboard_query_answers(
        prometheus: Prometheus, sandbox: Sandbox, tmp_path: Path) -> None:
    port = prometheus.agent_port
    textfile = tmp_path / "edge_upgrade_agent.prom"
    sandbox.configure(metrics={"listen": port, "textfile": str(textfile),
                               "textfile_interval_seconds": 1})
    daemon = Daemon(sandbox, tmp_path / "notify.sock")
    daemon.start()
    try:
        # A port alone binds loopback only: 127.0.0.2 is this host too, but refused.
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        wait_for(lambda: _answers(scrape), timeout=30, interval=0.1)  # bound after READY
        promtool_check_metrics(scrape())
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), timeout=2).close()

        def scraped() -> int:
            return int(prometheus.number(
                'count_over_time(up{job="edge-upgrade-agent"}[1h])'))

        wait_for(lambda: prometheus.number('up{job="edge-upgrade-agent"}') == 1
                 and scraped() >= 2, timeout=30, interval=0.2)
        daemon.send("c1", {"jobName": "job-1", "version": "v1.13.0"})
        daemon.send("junk", b"\x00 not a command")
        wait_for(lambda: daemon.final("job-1"), timeout=60)
        assert daemon.final("job-1")[0]["phase"] == "succeeded"
        wait_for(lambda: prometheus.number(
            'edge_upgrade_jobs_total{operation="upgrade",result="succeeded"}') == 1,
            timeout=30, interval=0.2)
        # Then an outbox that stopped moving an hour ago: the spool's outbox directory
        # is gone (a file in its way), and a report has waited since then.
        wait_for(lambda: sandbox.reports() == [])
        reports = daemon.reports_dir
        reports.rename(reports.with_name("reports.away"))
        reports.write_text("in the way")
        with sqlite3.connect(sandbox.state_dir / "journal.db", timeout=10) as db:
            db.execute("INSERT INTO outbox(job_key, seq, final, payload, created_at) "
                       "VALUES('job-old', 1, 0, '{\"jobKey\": \"job-old\", \"sequence\": 1}', ?)",
                       (time.time() - 3600,))
        wait_for(lambda: prometheus.number("edge_upgrade_outbox_oldest_age_seconds") > 3000,
                 timeout=30, interval=0.2)
        done = scraped()
        wait_for(lambda: scraped() >= done + 2, timeout=30, interval=0.2)

        # What the fleet sees of this node.
        assert prometheus.query('edge_upgrade_edgecore_info{version="v1.13.0"}')
        assert prometheus.number("edge_upgrade_rejected_commands_total") == 1
        assert prometheus.number("edge_upgrade_broker_connected") == 1
        assert prometheus.number("edge_upgrade_backups") == 1
        assert prometheus.number('edge_upgrade_last_result{result="succeeded"}') == 1
        assert prometheus.number(
            'edge_upgrade_phase_duration_seconds_count{phase="installing"}') == 1
        # Every expression of the dashboard answers, with series.
        exprs = dashboard_exprs()
        assert len(exprs) >= 15
        empty = [e for e in exprs if not prometheus.query(e)]
        assert not empty, empty
        assert prometheus.number("count(edge_upgrade_outbox_oldest_age_seconds > 600) "
                                 "or vector(0)") == 1
        # The daemon's textfile, refreshed every second, is valid for node_exporter.
        promtool_check_metrics(textfile.read_text())
        heartbeat = value(textfile.read_text(), "edge_upgrade_agent_heartbeat_timestamp_seconds")
        assert time.time() - heartbeat < 30
    finally:
        code = daemon.stop(signal.SIGTERM)
        daemon.sock.close()
    assert code == 0
