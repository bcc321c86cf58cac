"""The load rig: a broker, a sandboxed node and one daemon, and the indexed controller.

Used by ``testkit/load.py``; see there for what the load does and why over MQTT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml

from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.load_mix import FROM_VERSION, NODE, REPO_IMAGE, TO_VERSION
from testkit.pki import make_pki
from testkit.standins import (
    make_image_dir,
    make_node,
    sandbox_settings,
    start_edgecore,
    stop_edgecore,
)

REPO = Path(__file__).resolve().parent.parent
CMD_TOPIC = f"kubeedge/nodes/{NODE}/upgrade/cmd"

# The cheapest installer the agent accepts, as keadm does it minus the start:
# stop edgecore (the pidfile the process manager and the stand-in keadm share),
# put the staged edgecore in place by rename; the agent then starts edgecore.
# It waits for the old one to exit or turn zombie (its parent, the agent or
# this harness, reaps it later). Not a swap alone: a stand-in is a script, and
# a script replaced less than a second after edgecore started would count as
# running (agent/adapters/edgecore.py, running_sha256), so no restart.
# A file of its own, never /bin/sh as argv[0]: a rollback kills every session
# whose program is the installer's argv[0].
SWAP_INSTALLER = """#!/bin/sh
set -eu
pidfile="$EDGE_UPGRADE_ROOT/run/edgecore.pid"
target="$EDGE_UPGRADE_ROOT/usr/local/bin/edgecore"
pid=$(cat "$pidfile" 2>/dev/null || true)
# Only our edgecore: a pidfile left by one that died may name a recycled pid.
if [ -n "$pid" ] && tr '\\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -qF "$target" &&
        kill "$pid" 2>/dev/null; then
    while [ -r "/proc/$pid/stat" ] && ! grep -q ') Z ' "/proc/$pid/stat" 2>/dev/null; do
        sleep 0.01
    done
fi
rm -f "$pidfile"
staged="$(dirname "$1")/edgecore"
cp "$staged" "$target.swap"
mv -f "$target.swap" "$target"
"""


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Controller(Cloud):
    """The cloud side, indexed: final reports per job key, the latest presence."""

    def __init__(self, broker: Broker) -> None:
        self.final_counts: Counter[str] = Counter()
        self.last_final: dict[str, dict[str, Any]] = {}
        self.status_count = 0
        self.presence_count = 0
        self.last_presence: dict[str, Any] = {}
        self.idle_presence_at = 0  # presence_count of the latest one with no current job
        self.changed = threading.Condition(threading.Lock())
        super().__init__(broker)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self.changed:
            if msg.topic.endswith("/status"):
                self.status_count += 1
                if body.get("final"):
                    self.final_counts[body["jobKey"]] += 1
                    self.last_final[body["jobKey"]] = body
            elif msg.topic.endswith("/presence"):
                self.presence_count += 1
                self.last_presence = body
                if body.get("online") and body.get("currentJob") is None:
                    self.idle_presence_at = self.presence_count
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float,
             alive: Callable[[], None]) -> bool:
        """Wait for ``predicate`` (called under the lock); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
                alive()
        return True

    def publish_all(self, payloads: list[bytes]) -> None:
        """Publish back to back; return once the broker has acknowledged each."""
        infos = [self.client.publish(CMD_TOPIC, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(120)
            if not info.is_published():
                raise RuntimeError(f"command {info.mid} not acknowledged by the broker")


class Rig:
    """A broker, a sandboxed node and one daemon, all under ``work``."""

    def __init__(self, work: Path, *, grace_seconds: float = 0.2) -> None:
        self.work = work
        self.root = work / "root"
        self.log_path = work / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.broker = Broker(make_pki(work / "pki"), work / "broker")  # started by start()
        self.cloud: Controller | None = None
        make_node(self.root, FROM_VERSION, node_name=NODE)
        for version in (FROM_VERSION, TO_VERSION):
            make_image_dir(self.root / "images", REPO_IMAGE, version)
        swap = work / "swap-edgecore"
        swap.write_text(SWAP_INSTALLER)
        swap.chmod(0o755)
        settings = sandbox_settings(self.root, NODE)
        cert, key = self.broker.pki.client(NODE)
        (work / "trusted").mkdir()
        settings.update({
            "health": {"grace_seconds": grace_seconds, "start_timeout_seconds": 10,
                       "poll_interval_seconds": 0.05},
            "policy": {"allow_downgrade": True},
            "installers": {"swap": [str(swap), "{keadm}"]},
            "security": {"trusted_keys_dir": str(work / "trusted")},
            "transport": {"kind": "mqtt", "mqtt": {
                "host": self.broker.host, "port": self.broker.port,
                "ca_file": str(self.broker.pki.ca_cert), "cert_file": str(cert),
                "key_file": str(key), "reconnect_min_seconds": 0.2}},
        })
        self.config = work / "agent.yaml"
        self.config.write_text(yaml.safe_dump(settings))

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/edge-upgrade-agent"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Controller:
        """Broker, edgecore, controller and daemon; ``close`` undoes any part of it."""
        self.broker.start()
        start_edgecore(self.root)
        self.cloud = Controller(self.broker)
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "EDGE_UPGRADE_AGENT_FAULT")}
        env["PYTHONPATH"] = str(REPO)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(self.config), "run"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if not self.cloud.wait(lambda: bool(self.cloud and self.cloud.last_presence.get(
                "online")), 60, self.check_alive):
            raise RuntimeError(f"the daemon never came online:\n{self.log_tail()}")
        return self.cloud

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"the daemon exited ({code}):\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stuck(self, key: str) -> str:
        """What a wait for ``key`` lacks: its final report, or only the presence after it."""
        assert self.cloud is not None
        with self.cloud.changed:
            finals, presence = self.cloud.final_counts[key], dict(self.cloud.last_presence)
        lines = [ln for ln in self.log_tail(2000).splitlines() if key in ln][-8:]
        what = ("final report in, but no presence saying the job ended" if finals
                else "no final report")
        return (f"{what}; last presence {presence}; outbox {self.outbox_size()}; "
                "daemon log about it:\n" + "\n".join(lines))

    def outbox_size(self) -> int:
        uri = f"file:{self.state_dir / 'journal.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def broker_dropped(self) -> bool:
        with contextlib.suppress(OSError):
            text = self.broker.log_path.read_text(errors="replace")
            return "Outgoing messages are being dropped" in text
        return False

    def peak_unacked_commands(self) -> int:
        """Most commands the broker had sent the daemon unacked at once (from its log)."""
        out = peak = 0
        with contextlib.suppress(OSError), self.broker.log_path.open(errors="replace") as log:
            for line in log:
                if f"Sending PUBLISH to {NODE} " in line and "/upgrade/cmd'" in line:
                    out += 1
                    peak = max(peak, out)
                elif f"Received PUBACK from {NODE} " in line:
                    out -= 1
        return peak

    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        stop_edgecore(self.root)
        self.broker.stop()
        _kill_under(self.root)


def _kill_under(root: Path) -> None:
    """Leftover stand-ins whose argv names the sandbox (an edgecore the pidfile lost)."""
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)


def send_and_wait(rig: Rig, body: dict[str, Any], key: str, timeout: float) -> bool:
    """Send one command; wait for a new final report of ``key`` and the idle presence after."""
    cloud = rig.cloud
    assert cloud is not None
    with cloud.changed:
        before, presence_before = cloud.final_counts[key], cloud.presence_count
    cloud.send(body)
    return cloud.wait(lambda: cloud.final_counts[key] > before
                      and cloud.idle_presence_at > presence_before, timeout, rig.check_alive)
