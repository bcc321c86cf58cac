"""The health gate: keadm exiting 0 is not success (KubeEdge #4993).

edgecore must become active and stay up with the same MainPID and NRestarts
for the whole grace period (systemd's Restart= would otherwise hide a crash
loop). Then the running process must be the expected binary: the sha256 of
``/proc/<MainPID>/exe`` equals the edgecore taken from the package (or, for a
rollback, the one in the backup). Where the journal has it, the version that
invocation logged at start must equal the target too. Nothing here executes
edgecore: it has no version flag and would start a second instance.
"""

from __future__ import annotations

import asyncio
import time

from agent.adapters.edgecore import running_sha256
from agent.adapters.service import ServiceStatus
from agent.errors import HealthCheckFailed
from agent.node import Node
from agent.retry import retry_transient
from agent.versions import Version


async def wait_stable(node: Node) -> ServiceStatus:
    """Active, then unchanged MainPID and NRestarts for the grace period."""
    service, health = node.service, node.config.health
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
    return status


async def ensure_new_running(node: Node, expected_sha256: str | None) -> bool:
    """After the installer: start edgecore if it is down, restart it if it still runs
    another binary (keadm may swap the file without a restart, KubeEdge #4993).
    Returns whether it had to restart."""
    service = node.service
    status = await service.status()
    if not status.active:
        await retry_transient("start edgecore", service.start)
        return False
    running = await asyncio.to_thread(running_sha256, status.main_pid)
    if expected_sha256 is None or running == expected_sha256:
        return False
    await retry_transient("restart edgecore", service.restart)
    return True


async def health_gate(node: Node, expected: Version, expected_sha256: str | None) -> str:
    status = await wait_stable(node)
    proofs = []
    if expected_sha256 is not None:
        running = await asyncio.to_thread(running_sha256, status.main_pid)
        if running != expected_sha256:
            seen = f"{running[:12]}…" if running else "an unreadable or replaced executable"
            raise HealthCheckFailed(
                f"edgecore pid {status.main_pid} runs {seen}, not the expected binary "
                f"{expected_sha256[:12]}… of {expected}")
        proofs.append(f"runs sha256 {expected_sha256[:12]}…")
    logged = await node.service.logged_version(status)
    if logged is not None:
        if logged != str(expected):
            raise HealthCheckFailed(
                f"edgecore pid {status.main_pid} logged Version: {logged} at start, "
                f"expected {expected}")
        proofs.append(f"logged Version: {logged} ({node.service.log_name})")
    if not proofs:
        # Neither proof is available (no package binary known, no start log):
        # fall back to the other detection sources, never to the agent's record.
        detected = await node.probe.detect(use_record=False)
        if detected is None:
            raise HealthCheckFailed("edgecore is running but nothing proves which version "
                                    "(no known binary checksum, no start log)")
        if detected.version != expected:
            raise HealthCheckFailed(
                f"edgecore reports {detected.version} (from {detected.source}), "
                f"expected {expected}")
        proofs.append(f"{detected.version} from {detected.source}")
    return (f"edgecore {expected} active, pid {status.main_pid}, stable for "
            f"{node.config.health.grace_seconds:g}s; " + ", ".join(proofs))
