"""Shared fixtures: a sandboxed edge node driven through the real CLI.

The agent runs as a separate process (``python -m agent``) against a
directory standing in for ``/``, with the stand-in edgecore and keadm from
``testkit/standins``. Everything else (files, SQLite, processes, signals) is
real.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.pki import Pki, make_pki
from testkit.standins import (
    edgecore_pid,
    make_image_dir,
    make_node,
    sandbox_settings,
    start_edgecore,
    stop_edgecore,
)

# Every captured output and every file the agent wrote is searched for the
# test passwords at the end of the run (docs/security.md).
pytest_plugins = ["testkit.secretguard"]

REPO = Path(__file__).resolve().parent.parent
REPO_IMAGE = "kubeedge/installation-package"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def kill_processes_under(root: Path) -> None:
    """Kill leftovers (hung keadm, edgecores) whose argv mentions the sandbox."""
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


@dataclass
class Sandbox:
    root: Path
    config: Path
    settings: dict[str, Any]

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/edge-upgrade-agent"

    @property
    def db(self) -> Path:
        return self.root / "var/lib/kubeedge/edgecore.db"

    @property
    def binary(self) -> Path:
        return self.root / "usr/local/bin/edgecore"

    def configure(self, **extra: Any) -> None:
        self.settings = deep_merge(self.settings, extra)
        self.config.write_text(yaml.safe_dump(self.settings))

    def image(self, version: str, **kwargs: Any) -> Path:
        return make_image_dir(self.images, REPO_IMAGE, version, **kwargs)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        env.pop("EDGE_UPGRADE_AGENT_FAULT", None)
        env.update(extra)
        return env

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(self.config), *args],
            cwd=REPO, env=env or self.env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )

    def cli_json(self, *args: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        proc = self.cli("--output", "json", *args, **kw)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"no JSON (rc {proc.returncode}): {proc.stdout}\n"
                                 f"{proc.stderr}") from None

    def upgrade(self, version: str, *extra: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        return self.cli_json("upgrade", "--to-version", version, "--yes", *extra, **kw)

    def reports(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.state_dir / "journal.db") as db:
            rows = db.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def final_reports(self, job_key: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.reports() if r["final"] and job_key in (None, r["jobKey"])]

    def running_version(self) -> str:
        """The version the running edgecore logged at start; "" if none is running.

        Never executes edgecore: it has no version flag, and `edgecore --version`
        starts a second one. Its stderr is appended to <root>/var/log/edgecore.log,
        where its first line is the klog ``Version:`` line, with its pid.
        """
        from testkit.standins import logged_version

        deadline = time.monotonic() + 5  # a just-started one may not have logged yet
        while True:
            pid = edgecore_pid(self.root)
            if pid is None:
                return ""
            version = logged_version(self.root, pid)
            if version is not None:
                return version
            if time.monotonic() > deadline:
                return ""
            time.sleep(0.02)

    def edgecore_running(self) -> bool:
        return edgecore_pid(self.root) is not None


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    root = tmp_path / "root"
    make_node(root, "v1.12.1")
    make_image_dir(root / "images", REPO_IMAGE, "v1.13.0")
    start_edgecore(root)
    settings = sandbox_settings(root)
    settings["transport"] = {"spool": {"poll_interval_seconds": 0.05}}
    box = Sandbox(root, tmp_path / "agent.yaml", settings)
    box.configure()
    yield box
    stop_edgecore(root)
    kill_processes_under(root)


# The MQTT tests' cloud side: a fresh CA, a Mosquitto with mutual TLS and the
# production ACL, and the controller's client (module-scoped copies live in
# tests/faults, where one broker serves many cells).
@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(pki, tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def cloud(broker: Broker) -> Iterator[Cloud]:
    c = Cloud(broker)
    yield c
    c.close()


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.05) -> None:
    """Poll a condition (never a timing assertion: the timeout only bounds a hang)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(interval)
