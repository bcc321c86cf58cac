"""Image step: make the installation package available and stage keadm from it.

What was staged is recorded in ``staging/<version>/staged.json``: the image
digest, and each file's sha256 and stat signature (inode, size, mtime). A
later stage of the same digest (an upgrade after a ``prepull``, a retry after
a failure) whose files still have those signatures skips the extraction,
which for a real package is two 70 MB binaries streamed out of the engine.
Signatures, not hashes, because what matters is caught downstream anyway: the
health gate holds the running edgecore to the recorded sha256, and a damaged
keadm fails the install, which is rolled back.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.files import fsync_dir, sha256_file
from agent.adapters.images import EDGECORE, KEADM, ImageInfo, Progress, verify_digest
from agent.messages.commands import Command
from agent.node import Node
from agent.retry import retry_transient

RECORD = "staged.json"
FILES = (KEADM, EDGECORE)


@dataclass(frozen=True)
class Staged:
    keadm: Path
    edgecore: Path
    edgecore_sha256: str  # what the health gate expects /proc/<MainPID>/exe to be
    info: ImageInfo
    reused: bool = False


async def stage_image(node: Node, cmd: Command, progress: Progress) -> Staged:
    ref = cmd.image.with_tag(str(cmd.target))
    deadline = time.monotonic() + cmd.timeout_seconds
    info = await retry_transient(
        f"pull {ref}", lambda: node.images.pull(ref, deadline, progress),
        max_seconds=cmd.timeout_seconds)
    verify_digest(info, cmd.image_digest)
    # keadm and edgecore land side by side, so the staged keadm can find the new binary.
    staging = node.staging_dir(str(cmd.target))
    shas = await asyncio.to_thread(_still_staged, staging, info.digest)
    reused = shas is not None
    if shas is None:
        (staging / RECORD).unlink(missing_ok=True)
        await retry_transient(
            f"extract from {ref}", lambda: node.images.extract(ref, list(FILES), staging))
        shas = await asyncio.to_thread(_record, staging, info.digest)
    # Detection by checksum: this binary is cmd.target wherever it turns up.
    node.remember_edgecore(shas[EDGECORE], str(cmd.target))
    return Staged(staging / Path(KEADM).name, staging / Path(EDGECORE).name, shas[EDGECORE],
                  info, reused)


def _signature(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _record(staging: Path, digest: str) -> dict[str, str]:
    shas = {name: sha256_file(staging / Path(name).name).sha256 for name in FILES}
    stats = {name: _signature(staging / Path(name).name) for name in FILES}
    tmp = staging / f".{RECORD}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"digest": digest, "sha256": shas, "stat": stats}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(staging / RECORD)
    fsync_dir(staging)
    return shas


def _still_staged(staging: Path, digest: str) -> dict[str, str] | None:
    """The files' sha256s if ``staging`` still holds what was staged from ``digest``."""
    try:
        data = json.loads((staging / RECORD).read_text(encoding="utf-8"))
        if data["digest"] != digest:
            return None
        for name in FILES:
            if _signature(staging / Path(name).name) != list(data["stat"][name]):
                return None
        return {name: str(data["sha256"][name]) for name in FILES}
    except (OSError, ValueError, KeyError, TypeError):
        return None
