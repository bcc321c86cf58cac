"""Rollback: restore the backup and prove the old edgecore healthy again.

Idempotent by construction, so recovery can simply run it again: every file
is restored by rename from a checksum-verified backup, and stop/start of a
service are no-ops when already in the wanted state.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError, RollbackError
from agent.node import Node
from agent.retry import retry_transient
from agent.steps.backup import restore_backup, verify_backup
from agent.steps.verify import health_gate
from agent.versions import Version


async def roll_back(node: Node, backup_dir: Path, expected: Version) -> str:
    try:
        # Checked before edgecore is stopped: a bad backup must not cost a running node.
        manifest = verify_backup(backup_dir)
    except AgentError as exc:
        raise RollbackError(f"rollback refused: {exc.reason}") from None
    try:
        await retry_transient("stop edgecore", node.service.stop)
        restore_backup(backup_dir, manifest)
        await retry_transient("start edgecore", node.service.start)
        detail = await health_gate(node.service, node.probe, expected, node.config.health)
    except AgentError as exc:
        raise RollbackError(f"rollback to {expected} failed: {exc.reason}") from None
    except OSError as exc:
        raise RollbackError(f"rollback to {expected} failed: {exc}") from None
    return f"restored {backup_dir.name} ({manifest.size} bytes); {detail}"
