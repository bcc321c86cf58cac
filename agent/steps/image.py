"""Image step: make the installation package available and stage keadm from it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.images import EDGECORE, KEADM, ImageInfo, Progress, verify_digest
from agent.messages.commands import Command
from agent.node import Node
from agent.retry import retry_transient


@dataclass(frozen=True)
class Staged:
    keadm: Path
    edgecore: Path
    info: ImageInfo


async def stage_image(node: Node, cmd: Command, progress: Progress) -> Staged:
    ref = cmd.image.with_tag(str(cmd.target))
    deadline = time.monotonic() + cmd.timeout_seconds
    info = await retry_transient(
        f"pull {ref}", lambda: node.images.pull(ref, deadline, progress),
        max_seconds=cmd.timeout_seconds)
    verify_digest(info, cmd.image_digest)
    # keadm and edgecore land side by side, so the staged keadm can find the new binary.
    staging = node.staging_dir(str(cmd.target))
    files = await retry_transient(
        f"extract from {ref}", lambda: node.images.extract(ref, [KEADM, EDGECORE], staging))
    return Staged(files[KEADM], files[EDGECORE], info)
