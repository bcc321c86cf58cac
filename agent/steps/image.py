"""Image step: make the installation package available and stage keadm from it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.files import sha256_file
from agent.adapters.images import EDGECORE, KEADM, ImageInfo, Progress, verify_digest
from agent.messages.commands import Command
from agent.node import Node
from agent.retry import retry_transient


@dataclass(frozen=True)
class Staged:
    keadm: Path
    edgecore: Path
    edgecore_sha256: str  # what the health gate expects /proc/<MainPID>/exe to be
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
    edgecore = files[EDGECORE]
    sha = (await asyncio.to_thread(sha256_file, edgecore)).sha256
    # Detection by checksum: this binary is cmd.target wherever it turns up.
    node.remember_edgecore(sha, str(cmd.target))
    return Staged(files[KEADM], edgecore, sha, info)
