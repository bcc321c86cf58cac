"""The operator's edgecore unit, kept across keadm.

keadm (v1.12 to v1.20) deletes ``edgecore.service`` and writes its own template,
so an operator's ``Environment=``, ``KillMode=`` or resource limits vanish on
every upgrade. After keadm has run, if the unit changed and keadm's
``ExecStart`` still runs the same binary as the operator's, the operator's
unit is put back, systemd reloads it and edgecore restarts under it. If the
binary differs, keadm meant something else: its unit stays and the report
says what differs. ``service.preserve_unit: false`` keeps keadm's unit always.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

from agent.adapters.files import atomic_install, sha256_file
from agent.node import Node
from agent.retry import retry_transient
from agent.steps.backup import load_manifest


def exec_binary(unit_text: str) -> str | None:
    """The program of the effective ``ExecStart=`` in ``[Service]`` (the last one set)."""
    section, program = "", None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and line.startswith("ExecStart="):
            value = line.partition("=")[2].strip()
            try:
                words = shlex.split(value)
            except ValueError:
                words = value.split()
            # An empty ExecStart= resets the list; prefixes like "-" or "@" are not the path.
            program = words[0].lstrip("-@:+!") if words else None
    return program


async def keep_operator_unit(node: Node, backup_dir: Path) -> str:
    """Restore the operator's unit after keadm if it is safe; say what happened."""
    unit = node.probe.files().unit
    manifest = await asyncio.to_thread(load_manifest, backup_dir)
    entry = manifest.entry(unit.name)
    if entry is None:
        return ""  # there was no unit file of the operator's to keep
    saved = backup_dir / entry.name
    try:
        now_sha = (await asyncio.to_thread(sha256_file, unit)).sha256
        theirs = unit.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        now_sha, theirs = "", ""
    if now_sha == entry.digest.sha256:
        return ""
    if not node.config.preserve_unit:
        return f"keadm rewrote {unit}; kept keadm's unit (service.preserve_unit is off)"
    ours = saved.read_text(encoding="utf-8", errors="replace")
    if theirs and exec_binary(theirs) != exec_binary(ours):
        return (f"keadm rewrote {unit} and its ExecStart runs {exec_binary(theirs)}, the "
                f"operator's ran {exec_binary(ours)}: kept keadm's unit")
    await asyncio.to_thread(atomic_install, saved, unit, entry.digest.mode)
    await retry_transient("reload units", node.service.reload_units)
    await retry_transient("restart edgecore", node.service.restart)
    return f"keadm rewrote {unit}; the operator's unit was restored and edgecore restarted"
