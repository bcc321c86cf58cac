"""The daemon over MQTT v5 with mutual TLS, against a real Mosquitto with the ACL.

The trust boundaries (certificates, key strength, the ACL, signed commands) are
shown in tests/test_security.py, which reuses ``Agent`` and ``online`` from here.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, Sandbox, wait_for

from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.pki import Pki, issue_client

PREFIX = "kubeedge/nodes/{node}/upgrade"


class Agent:
    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = (self.box.root.parent / "agent.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--config", str(self.box.config), "run"],
            cwd=REPO, env=self.box.env(), stdout=self.log, stderr=self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def log_text(self) -> str:
        return (self.box.root.parent / "agent.log").read_text(errors="replace")


@pytest.fixture
def agent(sandbox: Sandbox, broker: Broker, pki: Pki) -> Iterator[Agent]:
    cert, key = pki.client("node-1")
    sandbox.configure(transport={"kind": "mqtt", "mqtt": {
        "host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
        "cert_file": str(cert), "key_file": str(key), "reconnect_min_seconds": 0.2,
        "reconnect_max_seconds": 1, "cert_check_interval_seconds": 0.3}},
        labels={"site": "factory-a"})
    a = Agent(sandbox)
    a.start()
    yield a
    a.stop(signal.SIGKILL)


def online(cloud: Cloud) -> bool:
    return any(p["online"] for p in cloud.presence())


def test_each_command_format_runs_to_a_final_report(agent: Agent, cloud: Cloud,
                                                     sandbox: Sandbox) -> None:
    for v in ("v1.14.0", "v1.15.0", "v1.16.0"):
        sandbox.image(v)
    sandbox.configure(policy={"max_minor_skip": 9})
    wait_for(lambda: online(cloud))
    assert cloud.presence()[-1]["labels"] == {"site": "factory-a"}
    cloud.send({"jobName": "ours", "version": "v1.13.0"})
    cloud.send({"UpgradeID": "era-a", "HistoryID": "7c4e0f5e-0000-4000-8000-000000000001",
                "Version": "v1.14.0", "UpgradeTool": "keadm",
                "Image": "kubeedge/installation-package:v1.14.0"})
    cloud.send({"header": {"msg_id": "m1", "parent_msg_id": "", "timestamp": 1, "sync": False},
                "route": {"source": "nodeupgradejobcontroller",
                          "group": "nodeupgradejobcontroller", "operation": "upgrade",
                          "resource": "upgrade/beehive-a/node/node-1"},
                "content": {"UpgradeID": "beehive-a", "HistoryID": "h-2", "Version": "v1.15.0",
                            "UpgradeTool": "", "Image": "kubeedge/installation-package"}})
    cloud.send({"header": {"msg_id": "m2", "timestamp": 2},
                "route": {"source": "taskmanager", "group": "taskmanager", "operation": "Check",
                          "resource": "operations.kubeedge.io/v1alpha2/nodeupgradejob/"
                                      "v1a2/node/node-1"},
                "content": {"version": "v1.16.0", "image": "kubeedge/installation-package",
                            "timeoutSeconds": 300, "checkItems": ["disk"]}})
    keys = ["ours", "era-a/7c4e0f5e-0000-4000-8000-000000000001", "beehive-a/h-2", "v1a2"]
    for key in keys:
        wait_for(lambda key=key: cloud.finals(key), timeout=60)
        (final,) = cloud.finals(key)
        assert final["result"] == "upgrade_success", final
    assert sandbox.running_version() == "v1.16.0"
    wait_for(lambda: cloud.presence()[-1]["edgecoreVersion"] == "v1.16.0")


def test_command_queued_while_agent_is_down_is_not_lost(agent: Agent, cloud: Cloud) -> None:
    wait_for(lambda: online(cloud))
    agent.stop()
    wait_for(lambda: not cloud.presence()[-1]["online"])  # the will (or a clean offline)
    cloud.send({"jobName": "while-down", "version": "v1.13.0"})
    agent.start()
    wait_for(lambda: cloud.finals("while-down"), timeout=60)
    assert cloud.finals("while-down")[0]["result"] == "upgrade_success"


def test_broker_killed_mid_job_final_report_arrives_once(agent: Agent, cloud: Cloud,
                                                          broker: Broker,
                                                          sandbox: Sandbox) -> None:
    sandbox.configure(health={"grace_seconds": 3})
    wait_for(lambda: online(cloud))
    cloud.send({"jobName": "outage", "version": "v1.13.0"})
    wait_for(lambda: any(r["phase"] == "installing" for r in cloud.status("outage")))
    broker.wait_saved()  # the controller's session must survive the crash
    broker.kill()
    # The job finishes offline; its reports wait in the journal's outbox.
    wait_for(lambda: any(r["final"] for r in sandbox.reports() if r["jobKey"] == "outage"),
             timeout=60)
    time.sleep(8)  # stay offline a while: the agent must keep retrying, not give up
    broker.start()
    wait_for(lambda: cloud.finals("outage"), timeout=60)
    wait_for(lambda: sandbox.reports() == [])
    time.sleep(1.5)  # any duplicate would arrive now
    assert len(cloud.finals("outage")) == 1


def test_burst_of_malformed_messages(agent: Agent, cloud: Cloud) -> None:
    wait_for(lambda: online(cloud))
    for i in range(1000):
        cloud.client.publish("kubeedge/nodes/node-1/upgrade/cmd", b"{not json %d" % i, qos=1)
    cloud.send({"jobName": "after-burst", "version": "v1.13.0"})
    wait_for(lambda: cloud.finals("after-burst"), timeout=120)
    assert cloud.finals("after-burst")[0]["result"] == "upgrade_success"


def test_certificate_rotation_keeps_commands_flowing(agent: Agent, cloud: Cloud, pki: Pki,
                                                     broker: Broker, tmp_path: Path) -> None:
    wait_for(lambda: online(cloud))
    cert, key = pki.client("node-1")
    new_cert, new_key = issue_client(pki, "node-1", key="rsa2048", directory=tmp_path / "new")
    # Replace by rename, as cert tooling does: never a half-written file.
    for src, dst in ((new_key, key), (new_cert, cert)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        tmp.replace(dst)
    wait_for(lambda: "certificate files changed" in agent.log_text())
    wait_for(lambda: agent.log_text().count('"connected to broker"') >= 2)
    cloud.send({"jobName": "after-rotation", "version": "v1.13.0"})
    wait_for(lambda: cloud.finals("after-rotation"), timeout=60)


def test_presence_will_on_crash(agent: Agent, cloud: Cloud) -> None:
    wait_for(lambda: online(cloud))
    assert cloud.presence()[-1]["edgecoreVersion"] == "v1.12.1"
    agent.stop(signal.SIGKILL)
    wait_for(lambda: cloud.presence()[-1]["online"] is False)

