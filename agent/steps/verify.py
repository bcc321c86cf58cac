"""The health gate: keadm exiting 0 is not success (KubeEdge #4993).

edgecore must become active, stay up with the same MainPID and NRestarts for
the whole grace period (systemd's Restart= would otherwise hide a crash
loop), and report the expected version.
"""

from __future__ import annotations

import asyncio
import time

from agent.adapters.edgecore import EdgecoreProbe
from agent.adapters.service import ServiceManager
from agent.config import Health
from agent.errors import HealthCheckFailed
from agent.versions import Version


async def health_gate(service: ServiceManager, probe: EdgecoreProbe, expected: Version,
                      health: Health) -> str:
    deadline = time.monotonic() + health.start_timeout_seconds
    status = await service.status()
    while not status.active:
        if time.monotonic() >= deadline:
            raise HealthCheckFailed(
                f"edgecore did not become active within {health.start_timeout_seconds:g}s "
                f"(state {status.state})"
            )
        await asyncio.sleep(health.poll_interval_seconds)
        status = await service.status()
    first = status
    end = time.monotonic() + health.grace_seconds
    while time.monotonic() < end:
        await asyncio.sleep(min(health.poll_interval_seconds, max(0.0, end - time.monotonic())))
        status = await service.status()
        if not status.active:
            raise HealthCheckFailed(
                f"edgecore stopped during the {health.grace_seconds:g}s grace period "
                f"(state {status.state})"
            )
        if status.n_restarts != first.n_restarts or status.main_pid != first.main_pid:
            raise HealthCheckFailed(
                f"edgecore restarted during the grace period (NRestarts "
                f"{first.n_restarts}->{status.n_restarts}, MainPID {first.main_pid}->"
                f"{status.main_pid})"
            )
    # The agent's own record says what we *hoped* to install; only the node counts here.
    detected = await probe.detect(use_record=False)
    if detected is None:
        raise HealthCheckFailed(
            "edgecore is running but its version cannot be detected (no --version flag, "
            "no edgecoreVersion in edgecore.yaml; set health.metaserver_url)"
        )
    if detected.version != expected:
        raise HealthCheckFailed(
            f"edgecore reports {detected.version} (from {detected.source}), expected {expected}"
        )
    return f"edgecore {expected} active, pid {status.main_pid}, stable for " \
           f"{health.grace_seconds:g}s"
