"""End to end with the REAL KubeEdge v1.12.1 / v1.13.0 edgecore and keadm.

The edge host is the real-systemd Debian container of testkit/e2e_host.py. It
runs the real v1.12.1 edgecore as the operator's ``edgecore.service`` (with
custom lines keadm drops when it rewrites the unit) and the agent installed by
scripts/install.sh from a wheelhouse. The agent takes the commands over MQTT
(testkit/cloud.py), pulls the installation package from the private registry
with credentials into the private dockerd (whose socket is the host's
/var/run/docker.sock), and runs the real keadm v1.13.0 out of it. keadm finds
the image in Docker's store, copies edgecore out of it through a throw-away
container running the package's busybox ``sh``/``cp`` with a bind mount of
/etc/kubeedge/upgrade/<to>, which dockerd resolves on this machine: that
directory is shared with the host at the same path.

The tests run in order on one host:

a. v1.12.1 -> v1.13.0 succeeds, the version comes from edgecore's journal,
   and a sampler in the host never sees two edgecores during the job;
b. a broken v1.13.1 (real keadm, an edgecore that exits 1) is rolled back to
   the exact previous state (binary, database, config, unit);
c. the agent is SIGKILLed while the real keadm runs (package v1.13.2: real
   v1.13.0 keadm and edgecore): one final report, a consistent node;
d. the operator's unit lines survived a, b and c;
e. a downgrade to v1.12.1 is refused by policy and the node is untouched.

Skipped with the reason when ../shared/kubeedge (testkit/kubeedge_real.py) or an
engine is missing, except with EDGE_TEST_REQUIRE_REAL_KUBEEDGE=1 (CI), where
that fails. Takes about 85 s on 2 cores (40 s of it the set-up).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from testkit.cloud import Cloud
from testkit.dockerenv import DockerUnavailable, RegistryUnavailable
from testkit.e2e_host import (
    EDGECORE_UNIT,
    KEADM_UPGRADE_DIR,
    OPERATOR_MARK,
    REPO,
    EdgeHost,
    HostUnavailable,
    Rig,
    SharedDir,
    agent_settings,
    build_wheelhouse,
    install_agent,
    install_real_edgecore,
    journal_version,
    real_package_files,
    skip_or_fail,
)
from testkit.kubeedge_real import require_real_binary

pytestmark = pytest.mark.slow
REQUIRE = "EDGE_TEST_REQUIRE_REAL_KUBEEDGE"
BROKEN_EDGECORE = b"#!/bin/sh\nexit 1\n"
EDGECORE = "/usr/local/bin/edgecore"
CONFIG = "/etc/kubeedge/config/edgecore.yaml"
DB = "/var/lib/kubeedge/edgecore.db"
UNIT = "/etc/systemd/system/edgecore.service"
BACKUPS = "/var/lib/edge-upgrade-agent/backups"
AGENT = "/opt/edge-upgrade-agent/venv/bin/edge-upgrade-agent"
KEADM_RUNNING = "pgrep -f '[s]taging/.*/keadm'"  # the brackets keep a waiting shell out
KILLER = f"""touch /run/killer.armed
end=$((SECONDS + 200))
until {KEADM_RUNNING} >/dev/null; do [ $SECONDS -lt $end ] || exit 1; sleep 0.01; done
systemctl kill -s KILL --kill-whom=main edge-upgrade-agent
date +%s.%N > /run/killed
"""


@dataclass
class RealE2E:
    host: EdgeHost
    cloud: Cloud
    repo: str
    sha: dict[str, str]  # "v1.13.0" etc. -> sha256 of that package's edgecore
    units: dict[str, str] = field(default_factory=dict)  # unit file after each test

    def run_job(self, name: str, version: str, timeout: float = 240,
                **extra: Any) -> dict[str, Any]:
        self.cloud.send({"jobName": name, "version": version, "image": self.repo, **extra})
        try:
            wait_for(lambda: self.cloud.finals(name), timeout=timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(f"no final report for {name}\n{self.diag(name)}") from None
        return self.cloud.finals(name)[0]

    def diag(self, job: str | None = None) -> str:
        """What a failure message needs: the job's reports and the agent's journal."""
        reports = "\n".join(json.dumps({k: r.get(k) for k in
                                        ("seq", "phase", "result", "reason", "final")})
                            for r in self.cloud.status(job))
        journal = self.host.sh("journalctl -u edge-upgrade-agent --no-pager -o cat | tail -60")[1]
        edgecore = self.host.sh("systemctl status edgecore --no-pager -n 8 | cat")[1]
        return f"--- reports of {job}:\n{reports}\n--- agent journal:\n{journal}\n" \
               f"--- edgecore:\n{edgecore}"

    def version(self) -> str:
        return journal_version(self.host)

    def active(self) -> bool:
        return self.host.sh("systemctl is-active edgecore")[1].strip() == "active"

    def edgecores(self) -> int:
        return int(self.host.sh("pgrep -c -x edgecore")[1].strip() or 0)

    def main_pid(self) -> int:
        return int(self.host.ok("systemctl show -p MainPID --value edgecore").strip())

    def running_sha(self) -> str:
        """sha256 of the binary the unit's main process runs (what the health gate checks)."""
        return self.host.ok(f"sha256sum /proc/{self.main_pid()}/exe").split()[0]

    def files(self) -> dict[str, str]:
        return self.host.sha256(EDGECORE, CONFIG, DB, UNIT)

    def status(self) -> dict[str, Any]:
        out = self.host.ok(f"{AGENT} --output json status")
        data: dict[str, Any] = json.loads(out)
        return data

    def integrity(self, path: str) -> str:
        script = ("import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True);"
                  "print(c.execute('PRAGMA integrity_check').fetchone()[0])")
        return self.host.ok(f"python3 -c {shlex.quote(script)} {shlex.quote(path)}").strip()


def _binaries() -> dict[tuple[str, str], Path]:
    """Skips (fails under EDGE_TEST_REQUIRE_REAL_KUBEEDGE=1) when shared/ is absent."""
    return {(version, name): require_real_binary(version, name)
            for version in ("v1.12.1", "v1.13.0") for name in ("edgecore", "keadm")}


def _sha(data: bytes | Path) -> str:
    import hashlib

    return hashlib.sha256(data.read_bytes() if isinstance(data, Path) else data).hexdigest()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealE2E]:
    bins = _binaries()
    work = tmp_path_factory.mktemp("real")
    rig = Rig(work / "rig")
    cloud: Cloud | None = None
    host: EdgeHost | None = None
    with SharedDir(KEADM_UPGRADE_DIR):
        try:
            try:
                rig.start()
            except (HostUnavailable, DockerUnavailable, RegistryUnavailable) as exc:
                skip_or_fail(f"no engine for the real-KubeEdge test: {exc}", REQUIRE,
                             "EDGE_TEST_REQUIRE_DOCKERD")
            k13, e13 = bins["v1.13.0", "keadm"], bins["v1.13.0", "edgecore"]
            packages: dict[str, tuple[Path, bytes | Path]] = {
                "v1.13.0": (k13, e13),
                "v1.13.1": (k13, BROKEN_EDGECORE),  # installs, then exits 1 at every start
                "v1.13.2": (k13, e13),  # the same layer as v1.13.0: pushed for free
                "v1.12.1": (bins["v1.12.1", "keadm"], bins["v1.12.1", "edgecore"]),
            }
            try:
                for version, (keadm, edgecore) in packages.items():
                    rig.package(version, real_package_files(keadm, edgecore))
                wheels = build_wheelhouse(work / "wheels")
                host = rig.host({str(REPO): "/src:ro", str(wheels): "/wheels:ro"},
                                name=f"real-e2e-{os.getpid()}")
            except HostUnavailable as exc:
                skip_or_fail(str(exc), REQUIRE, "EDGE_TEST_REQUIRE_DOCKERD")
            install_real_edgecore(host, "v1.12.1", bins["v1.12.1", "edgecore"])
            install_agent(host, agent_settings(rig.registry.address, rig.broker.port),
                          rig.pki.dir)
            cloud = Cloud(rig.broker)
            wait_for(lambda: any(p["online"] for p in cloud.presence()), timeout=60)
            yield RealE2E(host, cloud, f"{rig.registry.address}/kubeedge/installation-package",
                          {v: _sha(e) for v, (_, e) in packages.items()})
        finally:
            if host is not None and host.container is not None:
                print(host.sh("journalctl -u edge-upgrade-agent --no-pager -o cat | tail -40")[1])
            if cloud is not None:
                cloud.close()
            rig.stop()


def test_a_upgrade_to_v1_13_0_with_one_edgecore_at_a_time(real: RealE2E) -> None:
    h = real.host
    assert real.version() == "v1.12.1"
    # The sampler runs in the host for the whole job: one line per 50 ms.
    h.spawn("echo $$ > /run/sampler.pid; "
            "while :; do pgrep -c -x edgecore; sleep 0.05; done > /run/sampler.log")
    wait_for(lambda: h.sh("test -s /run/sampler.log")[0] == 0, timeout=10)
    try:
        final = real.run_job("real-ok", "v1.13.0")
    finally:
        h.sh("kill $(cat /run/sampler.pid)")
    counts = [int(x) for x in h.ok("cat /run/sampler.log").split()]
    assert final["result"] == "upgrade_success", f"{final}\n{real.diag('real-ok')}"
    assert max(counts) == 1, f"two edgecores at once: {counts}"
    assert len(counts) >= 20, counts  # the sampler really ran through the job
    assert real.version() == "v1.13.0" and real.active()
    assert real.running_sha() == real.sha["v1.13.0"]
    assert real.edgecores() == 1
    status = real.status()
    assert (status["edgecoreVersion"], status["versionSource"]) == ("v1.13.0", "journal"), status
    h.ok(f"test -f {BACKUPS}/v1.12.1/manifest.json")
    real.units["a"] = h.read(UNIT).decode()


def test_b_broken_package_is_rolled_back_exactly(real: RealE2E) -> None:
    h = real.host
    before = real.files()
    final = real.run_job("real-broken", "v1.13.1")
    assert final["result"] == "upgrade_failed_rollback_success", \
        f"{final}\n{real.diag('real-broken')}"
    assert final["phase"] == "rolled_back", final
    after = real.files()
    for path in (EDGECORE, CONFIG, UNIT):
        assert after[path] == before[path], f"{path} differs after the rollback"
    assert real.integrity(DB) == "ok"
    backup = h.sha256(f"{BACKUPS}/v1.13.0/edgecore.db")[f"{BACKUPS}/v1.13.0/edgecore.db"]
    assert after[DB] == backup, "edgecore.db is not the agent's backup copy"
    assert real.version() == "v1.13.0" and real.active() and real.edgecores() == 1
    assert real.running_sha() == real.sha["v1.13.0"]
    real.units["b"] = h.read(UNIT).decode()


def test_c_agent_killed_while_real_keadm_runs(real: RealE2E) -> None:
    h = real.host
    restarts = int(h.ok("systemctl show -p NRestarts --value edge-upgrade-agent"))
    # Waits in the host (no exec round trips) for keadm, then SIGKILLs the agent only.
    h.ok("rm -f /run/killed /run/killer.armed")
    h.spawn(KILLER)
    wait_for(lambda: h.sh("test -f /run/killer.armed")[0] == 0, timeout=10)
    final = real.run_job("real-kill", "v1.13.2")
    assert h.sh("test -f /run/killed")[0] == 0, f"keadm never seen\n{real.diag('real-kill')}"
    time.sleep(5)  # a duplicate final report would arrive by now
    finals = real.cloud.finals("real-kill")
    assert len(finals) == 1, finals
    assert final["phase"] == "rolled_back", f"{final}\n{real.diag('real-kill')}"
    assert int(h.ok("systemctl show -p NRestarts --value edge-upgrade-agent")) > restarts
    assert real.version() == "v1.13.0" and real.active() and real.edgecores() == 1
    assert real.running_sha() == real.sha["v1.13.0"]
    assert h.sh(f"{KEADM_RUNNING}")[0] != 0, "a keadm outlived the agent"
    h.ok("test ! -e /etc/kubeedge/idempotency_record")
    assert real.integrity(DB) == "ok"
    real.units["c"] = h.read(UNIT).decode()


def test_d_operator_unit_survives(real: RealE2E) -> None:
    for after in ("a", "b", "c"):
        unit = real.units.get(after)
        if unit is None:
            pytest.fail(f"test {after} did not get far enough to look at the unit")
        assert unit == EDGECORE_UNIT, f"unit after {after}:\n{unit}"
    loaded = real.host.ok("systemctl show -p Environment -p KillMode -p NeedDaemonReload "
                          "edgecore")
    assert OPERATOR_MARK.removeprefix("Environment=") in loaded, loaded
    assert "KillMode=process" in loaded and "NeedDaemonReload=no" in loaded, loaded


def test_e_downgrade_is_refused(real: RealE2E) -> None:
    before, pid = real.files(), real.main_pid()
    final = real.run_job("real-down", "v1.12.1")
    assert final["result"] != "upgrade_success", final
    assert final["phase"] == "failed", f"{final}\n{real.diag('real-down')}"
    assert "downgrade" in final["reason"], final["reason"]
    assert real.files() == before and real.main_pid() == pid
    assert real.version() == "v1.13.0"
