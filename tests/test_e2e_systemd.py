"""End to end on a real systemd: install, then upgrades driven over MQTT.

The edge host is a debootstrapped Debian running systemd as PID 1 in a
container (tests/e2e_host.py). The agent is installed by scripts/install.sh
from a wheelhouse and runs as its systemd unit, next to a stand-in
edgecore.service; images come from the test registry through the test
dockerd; commands and reports go through the test Mosquitto with mutual TLS.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from broker import Broker
from cloud import Cloud
from conftest import REPO, wait_for
from dockerenv import Dockerd, DockerUnavailable, Registry, build_package_image, push
from e2e_host import EdgeHost, HostUnavailable, rootfs_tar
from pki import make_pki
from standins import write_edgecore, write_keadm

from agent.adapters.images import EDGECORE, KEADM

pytestmark = pytest.mark.slow
USER, PASSWORD = "edge", "e2e-secret"
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
    def __init__(self, host: EdgeHost, cloud: Cloud, registry: Registry) -> None:
        self.host = host
        self.cloud = cloud
        self.repo = f"{registry.address}/kubeedge/installation-package"

    def version(self) -> str:
        return self.host.ok("/usr/local/bin/edgecore --version").split()[-1]

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


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("EDGE_TEST_REQUIRE_DOCKERD"):
        pytest.fail(reason)
    pytest.skip(reason)


def _wheelhouse(directory: Path) -> Path:
    proc = subprocess.run([str(REPO / "scripts/build-wheelhouse.sh"), str(directory)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        _skip_or_fail(f"cannot build a wheelhouse: {proc.stderr[-500:]}")
    return directory


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


def _agent_config(host: EdgeHost, broker: Broker, registry: Registry, pki_dir: Path) -> None:
    for name in ("ca.crt", "node-1.crt", "node-1.key"):
        host.put(f"/etc/edge-upgrade-agent/tls/{name}", (pki_dir / name).read_bytes(), 0o600)
    host.put("/etc/edge-upgrade-agent/credentials/registry", PASSWORD.encode(), 0o600)
    config = {
        "node_name": "node-1",
        "health": {"grace_seconds": 3, "start_timeout_seconds": 20, "poll_interval_seconds": 0.5},
        "precheck": {"reserve_bytes": 0},
        "images": {"backend": "docker", "docker_config": "",
                   "allowed_registries": [registry.address],
                   "credentials": {registry.address: {
                       "username": USER,
                       "password_file": "/etc/edge-upgrade-agent/credentials/registry"}}},
        "transport": {"kind": "mqtt", "mqtt": {
            "host": "127.0.0.1", "port": broker.port, "reconnect_min_seconds": 0.2,
            "reconnect_max_seconds": 2, "ca_file": "/etc/edge-upgrade-agent/tls/ca.crt",
            "cert_file": "/etc/edge-upgrade-agent/tls/node-1.crt",
            "key_file": "/etc/edge-upgrade-agent/tls/node-1.key"}},
    }
    # Written before install.sh, which never overwrites an operator's config.
    host.put("/etc/edge-upgrade-agent/agent.yaml", yaml.safe_dump(config).encode(), 0o640)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    work = tmp_path_factory.mktemp("e2e")
    try:
        tar = rootfs_tar()
    except HostUnavailable as exc:
        _skip_or_fail(f"no edge host image: {exc}")
    dockerd = Dockerd(work / "dockerd")
    try:
        dockerd.start()
    except DockerUnavailable as exc:
        _skip_or_fail(f"no container engine: {exc}")
    registry = Registry(work / "registry", {USER: PASSWORD})
    pki = make_pki(work / "pki")
    broker = Broker(pki, work / "broker")
    host: EdgeHost | None = None
    cloud: Cloud | None = None
    try:
        registry.start()
        broker.start()
        client = dockerd.client()
        with tar.open("rb") as f:
            client.api.import_image_from_data(f.read(), repository="edge-host", tag="e2e")
        for version, kw in (("v1.13.0", {}), ("v1.14.0", {"edgecore": "crash"}),
                            ("v1.15.0", {"keadm": "hang"})):
            bindir = work / "pkg" / version
            files: dict[str, bytes | Path] = {
                KEADM: write_keadm(bindir / "keadm", version, behaviour=kw.get("keadm", "ok"),
                                   interpreter=PY),
                EDGECORE: write_edgecore(bindir / "edgecore", version,
                                         behaviour=kw.get("edgecore", "ok"), interpreter=PY),
            }
            ref = f"{registry.address}/kubeedge/installation-package:{version}"
            build_package_image(client, ref, files)
            push(client, ref, USER, PASSWORD)
        wheels = _wheelhouse(work / "wheels")
        socket_path = dockerd.host.removeprefix("unix://")
        host = EdgeHost(client, "edge-host:e2e", {
            str(REPO): "/src:ro", str(wheels): "/wheels:ro",
            socket_path: "/var/run/docker.sock"})
        try:
            host.start()
        except HostUnavailable as exc:
            _skip_or_fail(str(exc))
        _node_files(host, work)
        _agent_config(host, broker, registry, pki.dir)
        host.ok("bash /src/scripts/install.sh --wheelhouse /wheels --node-name node-1")
        host.ok("systemctl is-active edge-upgrade-agent")
        cloud = Cloud(broker)
        wait_for(lambda: any(p["online"] for p in cloud.presence()), timeout=60)
        yield E2E(host, cloud, registry)
    finally:
        if host is not None and os.environ.get("EDGE_UPGRADE_E2E_KEEP") is None:
            log = host.sh("journalctl -u edge-upgrade-agent --no-pager | tail -40")[1]
            print(log)  # shown by pytest on failure
            host.stop()
        if cloud is not None:
            cloud.close()
        broker.stop()
        registry.stop()
        dockerd.stop()


def test_1_successful_upgrade(e2e: E2E) -> None:
    final = e2e.run_job("e2e-ok", "v1.13.0")
    assert final["result"] == "upgrade_success", final
    assert e2e.version() == "v1.13.0" and e2e.active()
    e2e.host.ok("test -f /etc/kubeedge/backup/v1.12.1/manifest.json")


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
