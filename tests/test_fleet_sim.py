"""bench/fleet.py's simulated fleet at smoke size, so that it does not rot.

Twenty lightweight agents (testkit/fleet_sim.py: real Daemons and journals,
stand-in edgecore and keadm, shared gateway connections) in this process,
against a real Mosquitto with the bench ACL and the real ``edge-upgrade-ctl``
as its own process. Nothing here is timed: the bench prints the figures.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import yaml

from testkit.ctlrig import ctl_config
from testkit.fleet_sim import BenchBroker, Sim, fleet_pki, max_overlap, write_manifest

REPO = Path(__file__).resolve().parent.parent
NODES, CONCURRENCY, INSTALL_S, GATEWAYS = 20, 5, 0.2, 2
CTL_TIMEOUT_S = 120


async def test_fleet_rolls_out_with_bounded_concurrency(tmp_path: Path) -> None:
    pki, gateways = fleet_pki(tmp_path / "pki", GATEWAYS)
    broker = BenchBroker(pki, tmp_path / "broker", GATEWAYS)
    broker.start()
    sim = Sim({"root": str(tmp_path / "fleet"), "nodes": NODES, "install_seconds": INSTALL_S,
               "host": broker.host, "port": broker.port, "ca": str(pki.ca_cert),
               "gateways": gateways})
    try:
        sim.build()
        await sim.start()
        config = ctl_config(tmp_path, pki, broker)
        job = write_manifest(tmp_path / "job.yaml", "fleet-smoke", concurrency=CONCURRENCY,
                             timeout_seconds=60)
        ctl = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.ctl", "--config", str(config), "apply", "-f",
            str(job), "--quiet", cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(ctl.communicate(), CTL_TIMEOUT_S)
        assert ctl.returncode == 0, err.decode(errors="replace")[-3000:]
    finally:
        await sim.stop()
        stats = sim.finish()
        broker.stop()
    status = yaml.safe_load(out)
    phases = {n["nodeName"]: n["phase"] for n in status["status"]["nodeStatus"]}
    assert len(phases) == NODES and set(phases.values()) == {"Successful"}, phases
    assert stats["states"] == {"succeeded": NODES}
    assert 1 <= max_overlap(stats["spans"]) <= CONCURRENCY  # from the agents' own journals
    assert stats["commands"] == NODES
    assert all(cmd is not None and final is not None for cmd, final in stats["per_node"].values())
    # Per node: 9 reports (received ... succeeded), presence at start and around the job.
    assert stats["reports"] == 9 * NODES and stats["presence"] == 3 * NODES
