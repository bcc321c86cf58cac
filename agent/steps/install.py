"""Run the installer (keadm or a configured tool) under a hard deadline.

The installer runs in its own session, so its whole process group can be
killed at the deadline, and so that it is not the target of signals meant
for the agent. Its output goes to a per-job log whose tail goes into the
report (KubeEdge #5051 lost exactly this).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from agent.adapters.keadm import InstallSpec, custom_argv, keadm_argv
from agent.adapters.procfs import live_processes, pid_alive
from agent.errors import InstallError
from agent.messages.commands import Command
from agent.node import Node
from agent.timeouts import within
from agent.versions import Version

TERM_GRACE_SECONDS = 5.0
# keadm >= v1.21 writes its result here; edgecore's taskmanager relays it on its next
# cloud connection and, for a failed upgrade of a job it knows, starts a rollback of
# its own. The agent reads it, decides, and removes it, so neither happens twice.
KEADM_REPORT = "/etc/kubeedge/upgrade_report.json"


def installer_argv(node: Node, cmd: Command, keadm: Path, from_version: Version) -> list[str]:
    """The installer's exact argv: the one the dry run prints is the one that runs."""
    spec = InstallSpec(
        keadm=keadm,
        from_version=from_version,
        to_version=cmd.target,
        image=cmd.image,
        edgecore_config=node.probe.files().config,
        upgrade_id=cmd.job_name,
        history_id=cmd.history_id,
        image_digest=cmd.image_digest,
    )
    template = node.config.installer(cmd.upgrade_tool) if cmd.upgrade_tool else None
    return custom_argv(template, spec) if template else keadm_argv(spec)


def log_tail(path: Path, max_bytes: int = 4096, max_lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-max_lines:])


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def run_installer(argv: list[str], log: Path, timeout: float,
                        env: dict[str, str]) -> int:
    """The installer's exit code; raises InstallError if it cannot start or times out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, close_fds=True,
            )
        except OSError as exc:
            raise InstallError(f"cannot start installer {argv[0]}: {exc.strerror}") from None
    try:
        code = await within(proc.wait(), timeout)
    except asyncio.TimeoutError:
        _killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(proc.wait(), TERM_GRACE_SECONDS)
        # Children that ignored SIGTERM, or the leader itself, go now.
        _killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise InstallError(
            f"installer timed out after {timeout:g}s and was killed; log tail:\n{log_tail(log)}"
        ) from None
    except asyncio.CancelledError:
        # Shutdown mid-install: kill it deliberately; recovery rolls back.
        _killpg(proc.pid, signal.SIGKILL)
        raise
    return code


def kill_installers(program: Path) -> int:
    """Kill every session led by a leftover ``program`` (after an agent crash).

    Recovery never guesses that a keadm from before the crash finished: it
    stops it first, then rolls back. Blocking (it waits for the kills): run it
    in a thread.
    """
    killed: list[int] = []
    target = str(program).encode()
    for pid, argv in live_processes():
        if target in argv[:2]:
            try:
                sid = os.getsid(pid)
            except ProcessLookupError:
                continue
            if sid > 1 and sid != os.getsid(0):
                _killpg(sid, signal.SIGKILL)
                killed.append(pid)
    # SIGKILL is asynchronous; callers then check that no keadm is left.
    for _ in range(100):
        if not any(pid_alive(pid) for pid in killed):
            break
        time.sleep(0.02)
    return len(killed)


def take_keadm_report(node: Node, started: float) -> dict[str, object] | None:
    """keadm's own result file, if this run wrote it (removed once read)."""
    path = node.config.paths.node(KEADM_REPORT)
    try:
        if path.stat().st_mtime < started - 1:
            return None  # an older run's: not evidence about this one
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        data = {"success": False, "errorMessage": f"unreadable {path.name}: {exc}"}
    path.unlink(missing_ok=True)
    return data if isinstance(data, dict) else {"success": False,
                                                 "errorMessage": f"{path.name}: not an object"}


def check_result(code: int, report: dict[str, object] | None) -> None:
    """keadm's exit code and, from v1.21, its report: both must say success."""
    why = str(report.get("errorMessage") or "")[:200] if report else ""
    if code != 0:
        raise InstallError(f"installer exited with code {code}" + (f": {why}" if why else ""))
    if report is not None and report.get("success") is not True:
        # keadm v1.22/v1.23 exit 0 after an aborted prompt or a failure they report.
        raise InstallError("installer exited 0 but its upgrade_report.json says it failed"
                           + (f": {why}" if why else ""))
