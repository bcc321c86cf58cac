"""A small fleet for edge-upgrade-ctl's tests and the rehearsal: real agent
daemons (each in its own sandbox root, with the stand-in edgecore and keadm)
over one real Mosquitto, and the controller run as its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from testkit.broker import Broker
from testkit.faultrig import REPO, FaultNode, Fleet
from testkit.pki import Pki, issue_client

# The controller's identity in the sample ACL besides cloud-controller, which
# testkit.cloud.Cloud takes as the tests' observer.
CTL_IDENTITY = "cloud-controller-2"


def ctl_config(work: Path, pki: Pki, broker: Broker, **controller: Any) -> Path:
    cert, key = issue_client(pki, CTL_IDENTITY)
    data = {
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
                 "cert_file": str(cert), "key_file": str(key),
                 "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 1},
        "controller": {"client_id": CTL_IDENTITY, "state_dir": str(work / "ctl"),
                       "presence_settle_seconds": 0.5, "tick_seconds": 0.2,
                       # The tests' timeouts are the manifest's own, to the second.
                       "timeout_grace_seconds": 0, **controller},
    }
    path = work / "ctl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_nodes(work: Path, fleet: Fleet, specs: dict[str, dict[str, Any]]) -> list[FaultNode]:
    """Nodes by name; each spec may give labels, new_edgecore, keadm and settings."""
    nodes = []
    for name, spec in specs.items():
        settings = {**spec.get("settings", {}), "labels": spec.get("labels", {})}
        node = FaultNode(work / name, name, fleet, new_edgecore=spec.get("new_edgecore", "ok"),
                         keadm=spec.get("keadm", "ok"), settings=settings)
        nodes.append(node)
        node.start()
    return nodes


class Ctl:
    """``python -m agent.ctl --config CONFIG ARGS…`` in the background."""

    def __init__(self, config: Path, *args: str, fault: str | None = None) -> None:
        self.log = config.parent / f"ctl-{args[0]}.log"
        self.out = config.parent / f"ctl-{args[0]}.out"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if fault is not None:  # agent.faults: SIGKILL at that point of the controller
            env["EDGE_UPGRADE_AGENT_FAULT"] = fault
        with self.log.open("ab") as err, self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.ctl", "--config", str(config),
                 "--log-level", "info", *args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def errors(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        """The final NodeUpgradeJob status document it printed."""
        data = yaml.safe_load(self.output() or "{}")
        return data if isinstance(data, dict) else {}


def run_ctl(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent.ctl", "--config", str(config), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
