"""Rollback: restore the backup and prove the old edgecore healthy again.

Idempotent by construction, so recovery can simply run it again: every file
is restored by rename from a checksum-verified backup, and stop/start of a
service are no-ops when already in the wanted state. The unit file is part of
the backup (keadm rewrites it), so a restored unit is followed by a
``daemon-reload`` before edgecore starts. Checksums and copies run in a
thread: a multi-gigabyte database must not stall the event loop (and with it
the systemd watchdog).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.errors import AgentError, RollbackError
from agent.node import Node
from agent.retry import retry_transient
from agent.steps.backup import NAMES, restore_backup, verify_backup
from agent.steps.verify import health_gate
from agent.versions import Version


async def roll_back(node: Node, backup_dir: Path, expected: Version) -> str:
    try:
        # Checked before edgecore is stopped: a bad backup must not cost a running node.
        manifest = await asyncio.to_thread(verify_backup, backup_dir)
    except AgentError as exc:
        raise RollbackError(f"rollback refused: {exc.reason}") from None
    binary = manifest.entry(NAMES["binary"])
    try:
        await retry_transient("stop edgecore", node.service.stop)
        unit_restored = await asyncio.to_thread(restore_backup, backup_dir, manifest)
        if unit_restored:
            await retry_transient("reload units", node.service.reload_units)
        await retry_transient("start edgecore", node.service.start)
        detail = await health_gate(node, expected, binary.digest.sha256 if binary else None)
    except AgentError as exc:
        raise RollbackError(f"rollback to {expected} failed: {exc.reason}") from None
    except OSError as exc:
        raise RollbackError(f"rollback to {expected} failed: {exc}") from None
    unit = "; unit file restored" if unit_restored else ""
    return f"restored {backup_dir.name} ({manifest.size} bytes{unit}); {detail}"
