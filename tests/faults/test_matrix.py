"""The fault matrix: every job state crossed with every fault, on real processes.

Each cell runs the real daemon over a real Mosquitto (mutual TLS, ACLs) on a
sandboxed node with the stand-in edgecore and keadm, stops it at the commit
of one state (``agent.faults``) and breaks something there. Whatever the
fault, ``FaultNode.check`` holds the node to the promise (old version intact
or new version healthy, one final report at the broker, a valid journal, a
free lock) and the agent must serve the next command.

Faults of keadm and edgecore exist in one state only (keadm runs only in
``installing``, the health gate only in ``verifying``); the corrupted backup
in the states that have a backup. ``EDGE_FAULT_RESULTS=<file>`` appends each
cell's outcome as a JSON line; ``scripts/fault-matrix.sh`` turns those into
docs/reliability.md. The registry and docker cells run the docker backend
against a private dockerd and an htpasswd registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.images import EDGECORE, KEADM
from testkit.broker import Broker
from testkit.cloud import Cloud
from testkit.dockerenv import (
    Dockerd,
    Registry,
    build_package_image,
    dockerd_and_registry,
    push,
    remove_image,
)
from testkit.faultrig import FAILURE_PATH, IMAGE_REPO, NEW, OLD, STATES, Cell, Fleet, paused
from testkit.pki import Pki, make_pki
from testkit.standins import write_edgecore, write_keadm

CLOCK_JUMP = {"clock_forward": 86400, "clock_back": -86400}  # seconds
SHORT_TIMEOUT = 4  # seconds, for the job that outlives a broker outage


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(pki, tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet(pki: Pki, broker: Broker) -> Iterator[Fleet]:
    cloud = Cloud(broker)
    yield Fleet(pki, broker, cloud)
    cloud.close()


# -- the faults: each drives one cell to where ``finish`` takes over ----------

def kill9(cell: Cell) -> None:
    cell.node.start(fault=f"after:{cell.state}")
    cell.send()
    assert cell.node.wait_exit() == -9


def sigterm(cell: Cell) -> None:
    cell.node.start(fault=f"after:{cell.state}=term")
    cell.send()
    assert cell.node.wait_exit() == 0, cell.node.log_tail()


def broker_down(cell: Cell) -> None:
    paused(cell, cell.broker.stop)
    cell.until_final_or_stuck(30)
    cell.broker.start()


def broker_down_long(cell: Cell) -> None:
    """Down for longer than the job's timeout: the upgrade must not depend on it."""
    paused(cell, cell.broker.stop, timeoutSeconds=SHORT_TIMEOUT)
    time.sleep(SHORT_TIMEOUT + 1.5)  # the outage outlasts the job's own timeout
    cell.broker.start()


def disk_full(cell: Cell) -> None:
    filler = cell.node.root / "filler"

    def fill() -> None:
        with open(filler, "wb") as out:
            block = b"\0" * (1 << 20)
            try:
                while True:
                    out.write(block)
                    out.flush()
            except OSError:
                pass  # ENOSPC: full

    try:
        paused(cell, fill)
        cell.until_final_or_stuck(15)
    finally:
        filler.unlink(missing_ok=True)


def clock(cell: Cell) -> None:
    stamp = cell.node.work / "clock-offset"
    stamp.write_text("0\n")
    cell.node.start(fault=f"after:{cell.state}=pause", clock=stamp)
    cell.send()
    cell.node.wait_paused()
    stamp.write_text(f"{CLOCK_JUMP[cell.fault]}\n")
    cell.node.release()


FAULTS: dict[str, Callable[[Cell], None]] = {
    "kill9": kill9,
    "sigterm": sigterm,
    "broker_down": broker_down,
    "broker_down_long": broker_down_long,
    "disk_full": disk_full,
    "clock_forward": clock,
    "clock_back": clock,
}


@pytest.fixture
def tmpfs_root(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs for a node whose disk is to fill up (root can mount one)."""
    point = tmp_path / "disk"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0755", "tmpfs",
                           str(point)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if os.environ.get("CI"):
            raise AssertionError(f"cannot mount a tmpfs: {done.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield point
    # The agent's log is on the tmpfs: keep it for a failure's post-mortem.
    with contextlib.suppress(OSError):
        shutil.copy(point / "agent.log", tmp_path / "agent.log")
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_cell(fault: str, state: str, tmp_path: Path, fleet: Fleet,
              request: pytest.FixtureRequest) -> None:
    work = request.getfixturevalue("tmpfs_root") if fault == "disk_full" else tmp_path
    cell = Cell(fault, state, work, fleet)
    try:
        FAULTS[fault](cell)
        cell.finish()
    finally:
        cell.node.stop()
        if not fleet.broker.running:
            fleet.broker.start()


# -- faults of keadm and edgecore: one state each ----------------------------

PROGRAM_FAULTS: dict[str, tuple[str, dict[str, str], dict[str, Any], str]] = {
    # fault: (state, the stand-ins' behaviour, command extras, the end it must reach)
    "keadm_hangs": ("installing", {"keadm": "hang"}, {"timeoutSeconds": 3}, "rolled_back"),
    "keadm_fails": ("installing", {"keadm": "fail-after-stop"}, {}, "rolled_back"),
    # The health gate starts an edgecore the installer left down (KubeEdge #4993),
    # then holds it to the grace period like any other.
    "keadm_kills_edgecore": ("installing", {"keadm": "ok-no-restart"}, {}, "succeeded"),
    "edgecore_crashloop": ("verifying", {"new_edgecore": "crash"}, {}, "rolled_back"),
}


@pytest.mark.parametrize("fault", list(PROGRAM_FAULTS))
def test_program_fault(fault: str, tmp_path: Path, fleet: Fleet) -> None:
    state, behaviour, extra, end = PROGRAM_FAULTS[fault]
    cell = Cell(fault, state, tmp_path, fleet, **behaviour)
    try:
        cell.node.start()
        cell.send(**extra)
        outcome = cell.finish()
        assert outcome.final_state == end, outcome
    finally:
        cell.node.stop()


@pytest.mark.parametrize(("state", "end"), [
    # Found before the installer runs: the job fails with the node untouched.
    ("backed_up", "failed"),
    # Found when the failed install needs it: nothing intact to restore, said so.
    ("installing", "rollback_failed"),
    ("verifying", "rollback_failed"),
])
def test_corrupted_backup(state: str, end: str, tmp_path: Path, fleet: Fleet) -> None:
    """A backup rotted after it was made, then a failed install needs it."""
    cell = Cell("backup_corrupt", state, tmp_path, fleet, new_edgecore="crash")

    def corrupt() -> None:
        db = cell.node.state_dir / "backups" / OLD / "edgecore.db"
        data = bytearray(db.read_bytes())
        data[len(data) // 2] ^= 0xFF
        db.write_bytes(bytes(data))

    try:
        paused(cell, corrupt)
        outcome = cell.finish()
        assert outcome.final_state == end, outcome
    finally:
        cell.node.stop()


# -- the registry and the container engine: the docker backend ---------------

REGISTRY_USER, REGISTRY_PASSWORD = "edge", "fault-matrix-secret"


@dataclass
class Engine:
    dockerd: Dockerd
    registry: Registry
    repo: str  # <registry>/kubeedge/installation-package, v1.13.0 pushed (and -crash)
    password_file: Path

    def settings(self) -> dict[str, Any]:
        return {"images": {
            "backend": "docker", "docker": {"host": self.dockerd.host, "config": None},
            "allowed_registries": [self.registry.address],
            "credentials": {self.registry.address: {
                "username": REGISTRY_USER, "password_file": str(self.password_file)}}}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    work = tmp_path_factory.mktemp("engine")
    with dockerd_and_registry(work, {REGISTRY_USER: REGISTRY_PASSWORD}) as (dockerd, registry):
        repo = f"{registry.address}/{IMAGE_REPO}"
        client = dockerd.client()
        # The failure path's states need a package whose edgecore crashes.
        for where, behaviour in ((repo, "ok"), (f"{repo}-crash", "crash")):
            files = {KEADM: write_keadm(work / behaviour / "keadm", NEW),
                     EDGECORE: write_edgecore(work / behaviour / "edgecore", NEW,
                                              behaviour=behaviour)}
            build_package_image(client, f"{where}:{NEW}", files)
            push(client, f"{where}:{NEW}", REGISTRY_USER, REGISTRY_PASSWORD)
        password = work / "registry-password"
        password.write_text(REGISTRY_PASSWORD + "\n")
        yield Engine(dockerd, registry, repo, password)


def registry_down(cell: Cell, repo: str, engine: Engine) -> None:
    """Down until the job has ended or stalled under it; the job's timeout is short."""
    paused(cell, engine.registry.stop, image=repo, timeoutSeconds=10)
    cell.until_final_or_stuck(20)
    engine.registry.start()


def docker_restarted(cell: Cell, repo: str, engine: Engine) -> None:
    def restart() -> None:
        engine.dockerd.stop()
        engine.dockerd.start()

    paused(cell, restart, image=repo)


ENGINE_FAULTS: dict[str, Callable[[Cell, str, Engine], None]] = {
    "registry_down": registry_down,
    "docker_restarted": docker_restarted,
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("fault", list(ENGINE_FAULTS))
def test_engine_cell(fault: str, state: str, tmp_path: Path, fleet: Fleet,
                     engine: Engine) -> None:
    repo = f"{engine.repo}-crash" if state in FAILURE_PATH else engine.repo
    remove_image(engine.dockerd.client(), f"{repo}:{NEW}")  # every cell really pulls
    cell = Cell(fault, state, tmp_path, fleet, settings=engine.settings())
    try:
        ENGINE_FAULTS[fault](cell, repo, engine)
        cell.finish()
    finally:
        cell.node.stop()
        if not engine.registry.running():
            engine.registry.start()
        if not engine.dockerd.running():
            engine.dockerd.start()
