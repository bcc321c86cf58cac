"""edge-upgrade-ctl against real agents: several agent daemons, each in its own
sandbox root with the stand-in keadm and edgecore, over one real Mosquitto with
mutual TLS and the sample ACL; the controller runs as its own process.

What each test holds the controller to is read from the agents' own journals
where it can be (what ran where, and when), not from the controller's word.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.ctlrig import Ctl, ctl_config, run_ctl, start_nodes
from testkit.faultrig import NEW, OLD, FaultNode, Fleet, sha256, wait_until
from testkit.fleet_sim import max_overlap
from testkit.pki import Pki

SEED = Path(__file__).resolve().parents[2] / "shared" / "examples" / "nodeupgradejob.yaml"


@pytest.fixture
def fleet(pki: Pki, broker: Broker, cloud: Cloud) -> Fleet:
    return Fleet(pki, broker, cloud)


@pytest.fixture
def nodes() -> Iterator[list[FaultNode]]:
    started: list[FaultNode] = []
    yield started
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGCONT)
        node.stop()


def manifest(work: Path, name: str, **spec: Any) -> Path:
    doc = {"apiVersion": "operations.kubeedge.io/v1alpha2", "kind": "NodeUpgradeJob",
           "metadata": {"name": name},
           "spec": {"version": NEW, "image": "kubeedge/installation-package", **spec}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def jobs(node: FaultNode, name: str) -> list[tuple[str, str, float, float]]:
    """(key, state, created, updated) of the node's jobs of that name, from its journal."""
    return [(str(k), str(s), float(c), float(u)) for k, s, c, u in node.journal(
        "SELECT key, state, created_at, updated_at FROM jobs WHERE key LIKE ?", f"{name}/%")]


def node_status(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["nodeName"]: n for n in status["status"]["nodeStatus"]}


def store_phases(work: Path, job: str) -> dict[str, str]:
    path = work / "ctl" / "jobs.db"
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return {n: p for n, p in db.execute(
                "SELECT node, last_action FROM nodes WHERE job=?", (job,))}
    except sqlite3.Error:
        return {}


def test_seed_manifest_verbatim(tmp_path: Path, fleet: Fleet, nodes: list[FaultNode]) -> None:
    """The seed lecture's v1alpha1 job as written: both nodeNames and labelSelector
    (a warning; nodeNames win) and version v1.12.1, which the nodes already run."""
    edge = {"labels": {"node-role.kubernetes.io/edge": "", "node-role.kubernetes.io/agent": ""}}
    nodes += start_nodes(tmp_path, fleet, {"edge-node1": edge, "edge-node2": edge,
                                           "edge-node3": edge})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    done = run_ctl(config, "apply", "-f", str(SEED))
    assert done.returncode == 0, done.stderr
    assert "nodeNames win" in done.stderr
    status = yaml.safe_load(done.stdout)
    assert status["apiVersion"] == "operations.kubeedge.io/v1alpha1"
    assert status["status"]["phase"] == "Completed"
    by_node = node_status(status)
    assert set(by_node) == {"edge-node1", "edge-node2"}  # not edge-node3: nodeNames win
    for n in by_node.values():
        assert n["phase"] == "Successful" and n["currentVersion"] == OLD
        assert n["result"] == "upgrade_success"
    assert not jobs(nodes[2], "upgrade-example")
    assert all(j[1] == "skipped" for n in nodes[:2] for j in jobs(n, "upgrade-example"))


def test_label_selector_and_concurrency(tmp_path: Path, fleet: Fleet,
                                        nodes: list[FaultNode]) -> None:
    nodes += start_nodes(tmp_path, fleet, {
        "site-a1": {"labels": {"site": "factory-a", "tier": "edge"}},
        "site-a2": {"labels": {"site": "factory-a", "tier": "edge"}},
        "site-b1": {"labels": {"site": "factory-b", "tier": "edge"}},
        "site-c1": {"labels": {"site": "factory-c", "tier": "edge"}},
        "site-b9": {"labels": {"site": "factory-b", "tier": "edge", "hold": "yes"}},
    })
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "wave-1", concurrency=2, labelSelector={
        "matchLabels": {"tier": "edge"},
        "matchExpressions": [{"key": "site", "operator": "In",
                              "values": ["factory-a", "factory-b"]},
                             {"key": "hold", "operator": "DoesNotExist"}]})
    done = run_ctl(config, "apply", "-f", str(job))
    assert done.returncode == 0, done.stderr
    status = node_status(yaml.safe_load(done.stdout))
    assert sorted(status) == ["site-a1", "site-a2", "site-b1"]
    assert all(n["phase"] == "Successful" and n["currentVersion"] == NEW
               for n in status.values())
    ran = {n.name: jobs(n, "wave-1") for n in nodes}
    assert not ran["site-c1"] and not ran["site-b9"]
    intervals = []
    for name in status:
        assert len(ran[name]) == 1 and ran[name][0][1] == "succeeded", ran[name]
        intervals.append((ran[name][0][2], ran[name][0][3]))
    assert max_overlap(intervals) <= 2  # from the agents' own journals
    listed = run_ctl(config, "get", "nodes")
    assert listed.returncode == 0, listed.stderr
    assert "site-b9" in listed.stdout and "hold=yes" in listed.stdout
    jobs_out = run_ctl(config, "get", "jobs")
    assert "wave-1" in jobs_out.stdout and "Completed" in jobs_out.stdout
    page = tmp_path / "wave-1.html"
    report = run_ctl(config, "report", "wave-1", "--html", str(page))
    assert report.returncode == 0, report.stderr
    assert all(name in page.read_text() for name in status)


def test_offline_and_unknown_nodes_are_not_waited_on(tmp_path: Path, fleet: Fleet,
                                                     nodes: list[FaultNode]) -> None:
    nodes += start_nodes(tmp_path, fleet, {"off-1": {}, "off-2": {}})
    nodes[0].stop()  # its Last Will says offline
    wait_until(lambda: any(p.get("nodeName") == "off-1" and not p.get("online")
                           for p in fleet.cloud.presence()), 30, "off-1 offline")
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "partial", failureTolerate="1",
                   nodeNames=["off-1", "off-2", "ghost-node"])
    done = run_ctl(config, "apply", "-f", str(job))
    assert done.returncode == 0, done.stderr
    by_node = node_status(yaml.safe_load(done.stdout))
    assert by_node["off-1"]["phase"] == "Failure" and "offline" in by_node["off-1"]["reason"]
    assert by_node["ghost-node"]["phase"] == "Failure"
    assert "no presence" in by_node["ghost-node"]["reason"]
    assert by_node["off-2"]["phase"] == "Successful"


def test_prepull_fetches_on_the_selection(tmp_path: Path, fleet: Fleet,
                                          nodes: list[FaultNode]) -> None:
    nodes += start_nodes(tmp_path, fleet, {"pre-1": {"labels": {"ring": "canary"}}})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "early", labelSelector={"matchLabels": {"ring": "canary"}})
    done = run_ctl(config, "prepull", "-f", str(job))
    assert done.returncode == 0, done.stderr
    by_node = node_status(yaml.safe_load(done.stdout))
    assert by_node["pre-1"]["result"] == "prepull_success"
    assert [j[1] for j in jobs(nodes[0], "early-prepull")] == ["succeeded"]
    assert (nodes[0].state_dir / "staging" / NEW / "keadm").exists()
    assert sha256(nodes[0].root / "usr/local/bin/edgecore") == nodes[0].old_sha  # untouched


def test_failure_tolerance_stops_dispatch(tmp_path: Path, fleet: Fleet,
                                          nodes: list[FaultNode]) -> None:
    nodes += start_nodes(tmp_path, fleet, {"ft-1": {"new_edgecore": "crash"}, "ft-2": {},
                                           "ft-3": {}})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "tolerate", concurrency=1, failureTolerate="0",
                   nodeNames=["ft-1", "ft-2", "ft-3"])
    done = run_ctl(config, "apply", "-f", str(job))
    assert done.returncode == 1, done.stderr
    status = yaml.safe_load(done.stdout)
    assert status["status"]["phase"] == "Failure"
    by_node = node_status(status)
    # The rollback worked, and it is still a failed upgrade (KubeEdge says Successful).
    assert by_node["ft-1"]["phase"] == "Failure"
    assert by_node["ft-1"]["result"] == "upgrade_failed_rollback_success"
    assert by_node["ft-1"]["currentVersion"] == OLD
    assert [a["action"] for a in by_node["ft-1"]["actionFlow"]][-1] == "RollBack"
    for name in ("ft-2", "ft-3"):
        assert by_node[name]["phase"] == "Pending"
        assert "failureTolerate" in by_node[name]["reason"]
    assert not jobs(nodes[1], "tolerate") and not jobs(nodes[2], "tolerate")


def test_silent_node_times_out_and_frees_its_slot(tmp_path: Path, fleet: Fleet,
                                                  nodes: list[FaultNode]) -> None:
    nodes += start_nodes(tmp_path, fleet, {"quiet-1": {}, "quiet-2": {}})
    assert nodes[0].proc is not None
    os.kill(nodes[0].proc.pid, signal.SIGSTOP)  # online at the broker, and silent
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    # Tolerate one failure in two, so the timeout alone decides whether quiet-2 runs.
    job = manifest(tmp_path, "silent", concurrency=1, timeoutSeconds=4, failureTolerate="0.5",
                   nodeNames=["quiet-1", "quiet-2"])
    done = run_ctl(config, "apply", "-f", str(job))
    assert done.returncode == 0, done.stderr
    by_node = node_status(yaml.safe_load(done.stdout))
    assert by_node["quiet-1"]["phase"] == "Unknown"
    assert "timed out" in by_node["quiet-1"]["reason"]
    assert by_node["quiet-2"]["phase"] == "Successful"  # it got the slot


def test_killed_controller_resumes(tmp_path: Path, fleet: Fleet,
                                   nodes: list[FaultNode]) -> None:
    names = ["res-1", "res-2", "res-3"]
    nodes += start_nodes(tmp_path, fleet, {n: {} for n in names})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "resumed", concurrency=1, nodeNames=names)
    first = Ctl(config, "apply", "-f", str(job))
    # Killed while the second node is in flight: one done, one running, one pending.
    wait_until(lambda: store_phases(tmp_path, "resumed").get("res-2", "") not in ("", "-"),
               60, f"second node dispatched ({first.errors()[-2000:]})")
    first.kill()
    done = run_ctl(config, "resume", "resumed")
    assert done.returncode == 0, done.stderr
    by_node = node_status(yaml.safe_load(done.stdout))
    assert all(by_node[n]["phase"] == "Successful" for n in names), by_node
    for node in nodes:  # each node upgraded exactly once
        ran = jobs(node, "resumed")
        assert len(ran) == 1 and ran[0][1] == "succeeded", (node.name, ran)
    watched = run_ctl(config, "watch", "resumed")
    assert watched.returncode == 0, watched.stderr


@pytest.mark.parametrize("point", ["ctl:created", "ctl:dispatched", "ctl:sent", "ctl:taken"])
def test_controller_killed_at_each_point_resumes(point: str, tmp_path: Path, fleet: Fleet,
                                                 nodes: list[FaultNode]) -> None:
    """SIGKILL just after the job is stored, after a node is marked in flight but
    before its command leaves, after commands left, and after reports were
    committed but before their acks: resume ends with each node upgraded once."""
    names = ["kp-1", "kp-2"]
    nodes += start_nodes(tmp_path, fleet, {n: {} for n in names})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    job = manifest(tmp_path, "killed", concurrency=1, nodeNames=names)
    first = Ctl(config, "apply", "-f", str(job), fault=f"{point}=kill")
    assert first.wait() == -signal.SIGKILL, first.errors()[-2000:]
    done = run_ctl(config, "resume", "killed")
    assert done.returncode == 0, done.stderr
    by_node = node_status(yaml.safe_load(done.stdout))
    assert all(by_node[n]["phase"] == "Successful" for n in names), by_node
    for node in nodes:
        ran = jobs(node, "killed")
        assert len(ran) == 1 and ran[0][1] == "succeeded", (node.name, ran)


def test_confirmation_and_signed_commands(tmp_path: Path, fleet: Fleet,
                                          nodes: list[FaultNode]) -> None:
    key = Ed25519PrivateKey.generate()
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "ops-1.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    private = tmp_path / "ops-1.key"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    security = {"security": {"require_signed_commands": True, "trusted_keys_dir": str(trusted)}}
    nodes += start_nodes(tmp_path, fleet, {"gate-1": {"settings": security}})
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    data = yaml.safe_load(config.read_text())
    data["signing"] = {"key_file": str(private), "key_id": "ops-1"}
    config.write_text(yaml.safe_dump(data))
    job = manifest(tmp_path, "gated", requireConfirmation=True, nodeNames=["gate-1"])
    apply = Ctl(config, "apply", "-f", str(job))
    wait_until(lambda: store_phases(tmp_path, "gated").get("gate-1") == "awaiting_confirmation",
               60, f"parked ({apply.errors()[-2000:]})")
    confirmed = run_ctl(config, "confirm", "gated")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "confirm for gated sent to gate-1" in confirmed.stdout
    assert apply.wait() == 0, apply.errors()
    assert node_status(apply.status())["gate-1"]["phase"] == "Successful"
    assert jobs(nodes[0], "gated")[0][1] == "succeeded"


def test_bad_manifest_is_refused_by_name(tmp_path: Path, fleet: Fleet) -> None:
    config = ctl_config(tmp_path, fleet.pki, fleet.broker)
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        apiVersion: operations.kubeedge.io/v1alpha2
        kind: NodeUpgradeJob
        metadata: {name: bad}
        spec: {version: "v1.13.0; reboot", nodeNames: [n1]}
        """))
    done = run_ctl(config, "apply", "-f", str(bad))
    assert done.returncode == 2
    assert "bad version" in done.stderr and "Traceback" not in done.stderr
