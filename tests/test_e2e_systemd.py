"""End to end on a real systemd: install, then upgrades driven over MQTT.

The edge host is a debootstrapped Debian running systemd as PID 1 in a
container (testkit/e2e_host.py). The agent is installed by scripts/install.sh
from a wheelhouse and runs as its systemd unit, next to a stand-in
edgecore.service; images come from the test registry through the test
dockerd; commands and reports go through the test Mosquitto with mutual TLS.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, wait_for

from agent.adapters.images import EDGECORE, KEADM
from testkit.cloud import Cloud
from testkit.dockerenv import DockerUnavailable, RegistryUnavailable
from testkit.e2e_host import (
    EdgeHost,
    HostUnavailable,
    Rig,
    agent_settings,
    build_wheelhouse,
    install_agent,
    journal_version,
    skip_or_fail,
)
from testkit.standins import write_edgecore, write_keadm

pytestmark = pytest.mark.slow
PY = "/usr/bin/python3"  # the host's interpreter for the stand-ins
EDGECORE_UNIT = """[Unit]
Description=edgecore (stand-in)
[Service]
ExecStart=/usr/local/bin/edgecore --config /etc/kubeedge/config/edgecore.yaml
Restart=always
RestartSec=1
KillMode=process
[Install]
WantedBy=multi-user.target
"""


class E2E:
    def __init__(self, host: EdgeHost, cloud: Cloud, repo: str) -> None:
        self.host = host
        self.cloud = cloud
        self.repo = repo

    def version(self) -> str:
        """What the unit's current invocation logged at start (never runs edgecore)."""
        wait_for(lambda: journal_version(self.host) != "", timeout=30, interval=0.2)
        return journal_version(self.host)

    def active(self) -> bool:
        return self.host.sh("systemctl is-active edgecore")[1].strip() == "active"

    def start_hanging_install(self, name: str) -> None:
        """v1.15.0's keadm hangs: returns once the job is in `installing`."""
        self.cloud.send({"jobName": name, "version": "v1.15.0", "image": self.repo,
                         "timeoutSeconds": 600})
        wait_for(lambda: any(r["phase"] == "installing" for r in self.cloud.status(name)),
                 timeout=120)

    def run_job(self, name: str, version: str, **extra: Any) -> dict[str, Any]:
        self.cloud.send({"jobName": name, "version": version, "image": self.repo, **extra})
        wait_for(lambda: self.cloud.finals(name), timeout=240)
        return self.cloud.finals(name)[0]


def _node_files(host: EdgeHost, work: Path) -> None:
    edgecore = write_edgecore(work / "node/edgecore", "v1.12.1", interpreter=PY)
    host.put("/usr/local/bin/edgecore", edgecore.read_bytes(), 0o755)
    host.put("/etc/kubeedge/config/edgecore.yaml", yaml.safe_dump({
        "apiVersion": "edgecore.config.kubeedge.io/v1alpha2", "kind": "EdgeCore",
        "database": {"dataSource": "/var/lib/kubeedge/edgecore.db"},
        "modules": {"edged": {"hostnameOverride": "node-1"}}}).encode())
    db = work / "node/edgecore.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT)")
        conn.execute("INSERT INTO meta VALUES('version', 'v1.12.1')")
        conn.execute("CREATE TABLE pods(id INTEGER PRIMARY KEY, spec TEXT)")
        conn.executemany("INSERT INTO pods(spec) VALUES(?)", [("x" * 2000,)] * 50)
    host.put("/var/lib/kubeedge/edgecore.db", db.read_bytes())
    host.put("/etc/systemd/system/edgecore.service", EDGECORE_UNIT.encode())
    host.ok("systemctl daemon-reload && systemctl enable --now edgecore")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    work = tmp_path_factory.mktemp("e2e")
    rig = Rig(work / "rig")
    host: EdgeHost | None = None
    cloud: Cloud | None = None
    try:
        try:
            rig.start()
            for version, kw in (("v1.13.0", {}), ("v1.14.0", {"edgecore": "crash"}),
                                ("v1.15.0", {"keadm": "hang"})):
                bindir = work / "pkg" / version
                rig.package(version, {
                    KEADM: write_keadm(bindir / "keadm", version,
                                       behaviour=kw.get("keadm", "ok"), interpreter=PY),
                    EDGECORE: write_edgecore(bindir / "edgecore", version,
                                             behaviour=kw.get("edgecore", "ok"), interpreter=PY),
                })
            wheels = build_wheelhouse(work / "wheels")
            host = rig.host({str(REPO): "/src:ro", str(wheels): "/wheels:ro"},
                            share_upgrade_dir=False)
        except (HostUnavailable, DockerUnavailable, RegistryUnavailable) as exc:
            skip_or_fail(f"no edge host: {exc}", "EDGE_TEST_REQUIRE_DOCKERD")
        _node_files(host, work)
        install_agent(host, agent_settings(rig.registry.address, rig.broker.port), rig.pki.dir)
        cloud = Cloud(rig.broker)
        wait_for(lambda: any(p["online"] for p in cloud.presence()), timeout=60)
        yield E2E(host, cloud, f"{rig.registry.address}/kubeedge/installation-package")
    finally:
        if host is not None and host.container is not None:
            print(host.sh("journalctl -u edge-upgrade-agent --no-pager | tail -40")[1])
        if cloud is not None:
            cloud.close()
        rig.stop()


def test_1_successful_upgrade(e2e: E2E) -> None:
    final = e2e.run_job("e2e-ok", "v1.13.0")
    assert final["result"] == "upgrade_success", final
    assert e2e.version() == "v1.13.0" and e2e.active()
    e2e.host.ok("test -f /var/lib/edge-upgrade-agent/backups/v1.12.1/manifest.json")


def test_2_crashing_build_is_rolled_back(e2e: E2E) -> None:
    final = e2e.run_job("e2e-crash", "v1.14.0")
    assert final["result"] == "upgrade_failed_rollback_success", final
    assert final["reason"].startswith("health: edgecore"), final["reason"]
    assert e2e.version() == "v1.13.0" and e2e.active()


def test_3_agent_killed_while_installing(e2e: E2E) -> None:
    e2e.start_hanging_install("e2e-kill")
    e2e.host.ok("systemctl kill -s KILL edge-upgrade-agent")
    wait_for(lambda: e2e.cloud.finals("e2e-kill"), timeout=120)
    finals = e2e.cloud.finals("e2e-kill")
    assert len(finals) == 1 and finals[0]["phase"] == "rolled_back", finals
    assert e2e.version() == "v1.13.0" and e2e.active()
    restarts = e2e.host.ok("systemctl show -p NRestarts --value edge-upgrade-agent")
    assert int(restarts) >= 1  # systemd restarted it; recovery did the rest


def test_4_dry_run_changes_nothing(e2e: E2E) -> None:
    before = e2e.host.ok("sha256sum /usr/local/bin/edgecore /var/lib/kubeedge/edgecore.db")
    final = e2e.run_job("e2e-dry", "v1.13.0", dryRun=True)
    assert final["rehearsal"] is True and final["plan"]["verdict"] == "SKIP", final
    final = e2e.run_job("e2e-dry-2", "v1.14.0", dryRun=True)
    assert final["plan"]["verdict"] == "GO", final["plan"]
    assert e2e.host.ok("sha256sum /usr/local/bin/edgecore /var/lib/kubeedge/edgecore.db") \
        == before


def test_5_stop_and_start_mid_job_resumes(e2e: E2E) -> None:
    e2e.start_hanging_install("e2e-stop")
    e2e.host.ok("systemctl stop edge-upgrade-agent")
    assert not e2e.host.sh("pgrep -f '[s]taging/v1.15.0/keadm'")[1].strip()  # KillMode=mixed
    e2e.host.ok("systemctl start edge-upgrade-agent")
    wait_for(lambda: e2e.cloud.finals("e2e-stop"), timeout=120)
    (final,) = e2e.cloud.finals("e2e-stop")
    assert final["phase"] == "rolled_back", final
    assert e2e.version() == "v1.13.0" and e2e.active()
