"""The operator's edgecore unit, kept across keadm.

keadm (v1.12 to v1.20) deletes ``edgecore.service`` and writes its own
template, so an operator's ``Environment=``, ``KillMode=`` or resource limits
vanish on every upgrade. The unit in the backup is the operator's. If keadm's
``ExecStart`` runs the same program, the operator's unit is put back; if the
program differs, keadm meant something else: its unit stays and the report
says what differs. ``service.preserve_unit: false`` keeps keadm's unit always.

When is it put back? keadm writes its unit, then runs ``daemon-reload &&
enable && start``. A guard watches the file while keadm runs and puts the
operator's unit back as soon as keadm's appears, which usually lands before
keadm's ``daemon-reload``: edgecore then starts once, under the operator's
unit. Whether it did is known afterwards without guessing: the file is the
operator's and systemd has nothing left to reload (``NeedDaemonReload=no``).
Otherwise (the guard lost the race, or no guard ran) the unit is put back
after keadm, followed by ``daemon-reload`` and a restart of edgecore.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.adapters.files import atomic_install, sha256_file
from agent.node import Node
from agent.retry import retry_transient
from agent.steps.backup import load_manifest

log = structlog.get_logger("agent.unit")
POLL_SECONDS = 0.005  # a stat() per poll; keadm's next step is a bash and a sudo away


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


@dataclass(frozen=True)
class OperatorUnit:
    path: Path  # the unit file on the node
    saved: Path  # its copy in the backup
    text: str
    sha256: str
    mode: int

    @classmethod
    def from_backup(cls, node: Node, backup_dir: Path) -> OperatorUnit | None:
        """None if the node had no unit file when it was backed up."""
        unit = node.probe.files().unit
        entry = load_manifest(backup_dir).entry(unit.name)
        if entry is None:
            return None
        saved = backup_dir / entry.name
        return cls(unit, saved, saved.read_text(encoding="utf-8", errors="replace"),
                   entry.digest.sha256, entry.digest.mode)

    def current(self) -> tuple[str, str]:
        """(sha256, text) of the unit file now; ("", "") if there is none."""
        try:
            return sha256_file(self.path).sha256, self.path.read_text(encoding="utf-8",
                                                                      errors="replace")
        except FileNotFoundError:
            return "", ""

    def differs_in_program(self, theirs: str) -> bool:
        return bool(theirs) and exec_binary(theirs) != exec_binary(self.text)

    def put_back(self) -> None:
        atomic_install(self.saved, self.path, self.mode)


@dataclass
class Guard:
    put_back: bool = False  # the operator's unit was written back while keadm ran


@contextlib.asynccontextmanager
async def guard_unit(node: Node, backup_dir: Path) -> AsyncIterator[Guard]:
    """While the body (keadm) runs, put the operator's unit back whenever keadm's
    replaces it with one that runs the same program."""
    guard = Guard()
    unit = None
    if node.config.preserve_unit:
        unit = await asyncio.to_thread(OperatorUnit.from_backup, node, backup_dir)
    if unit is None:
        yield guard
        return
    task = asyncio.create_task(_watch(unit, guard))
    try:
        yield guard
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watch(unit: OperatorUnit, guard: Guard) -> None:
    seen: tuple[int, int, int] | None = None
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            st = unit.path.stat()
        except FileNotFoundError:
            continue  # keadm removed it (its stop step); wait for its own unit
        if (st.st_ino, st.st_size, st.st_mtime_ns) == seen:
            continue
        try:
            sha, text = unit.current()
            if sha and sha != unit.sha256 and not unit.differs_in_program(text):
                unit.put_back()
                guard.put_back = True
                log.info("put the operator's unit back while keadm runs", unit=str(unit.path))
            st = unit.path.stat()
        except OSError as exc:
            # Not fatal: after keadm the unit is checked again and put back there.
            log.warning("cannot guard the operator's unit", unit=str(unit.path), error=str(exc))
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)


async def keep_operator_unit(node: Node, backup_dir: Path, guard: Guard) -> str:
    """After keadm: make sure edgecore runs under the operator's unit if it should;
    say what happened ("" when there was nothing to do)."""
    unit = await asyncio.to_thread(OperatorUnit.from_backup, node, backup_dir)
    if unit is None:
        return ""
    sha, theirs = await asyncio.to_thread(unit.current)
    if not node.config.preserve_unit:
        return "" if sha == unit.sha256 else \
            f"keadm rewrote {unit.path}; kept keadm's unit (service.preserve_unit is off)"
    if sha == unit.sha256:
        # Only a unit we wrote back can have missed keadm's reload; an operator's own
        # pending edit is not ours to apply with a restart.
        if not guard.put_back or not await node.service.needs_reload():
            return ""  # untouched, or the guard won: edgecore started under it
        why = "the operator's unit was put back too late for keadm's daemon-reload"
    elif unit.differs_in_program(theirs):
        return (f"keadm rewrote {unit.path} and its ExecStart runs {exec_binary(theirs)}, the "
                f"operator's ran {exec_binary(unit.text)}: kept keadm's unit")
    else:
        await asyncio.to_thread(unit.put_back)
        why = f"keadm rewrote {unit.path}; the operator's unit was restored"
    await retry_transient("reload units", node.service.reload_units)
    await retry_transient("restart edgecore", node.service.restart)
    return f"{why}; edgecore restarted under it"
