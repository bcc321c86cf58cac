"""Service managers for edgecore: systemctl, and a child-process one for tests.

The health gate needs three facts: is the unit active, how often has it been
restarted, and which pid runs it. systemd gives all three; the process
manager derives them from a pidfile so that it survives an agent crash the
way a systemd unit does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import TransientError


@dataclass(frozen=True)
class ServiceStatus:
    active: bool
    state: str  # systemd ActiveState: active, inactive, failed, activating …
    n_restarts: int
    main_pid: int


class ServiceManager(Protocol):
    async def status(self) -> ServiceStatus: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def parse_show(text: str) -> ServiceStatus:
    """Parse ``systemctl show -p ActiveState,NRestarts,MainPID`` output."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    state = props.get("ActiveState", "unknown")
    restarts = props.get("NRestarts", "0")
    pid = props.get("MainPID", "0")
    return ServiceStatus(
        active=state == "active",
        state=state,
        n_restarts=int(restarts) if restarts.isdigit() else 0,
        main_pid=int(pid) if pid.isdigit() else 0,
    )


class SystemctlManager:
    def __init__(self, unit: str, systemctl: str = "systemctl") -> None:
        self.unit = unit
        self.systemctl = systemctl

    async def _run(self, *args: str, timeout: float = 90) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.systemctl, *args, self.unit,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise TransientError(f"systemctl {args[0]} {self.unit} timed out") from None
        if proc.returncode != 0 and args[0] != "show":
            msg = err.decode(errors="replace").strip()[:300]
            raise TransientError(f"systemctl {args[0]} {self.unit} failed: {msg}")
        return out.decode(errors="replace")

    async def status(self) -> ServiceStatus:
        return parse_show(await self._run("show", "-p", "ActiveState,NRestarts,MainPID"))

    async def start(self) -> None:
        await self._run("start")

    async def stop(self) -> None:
        await self._run("stop")


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class ProcessManager:
    """Runs edgecore as a detached child recorded in a pidfile.

    Used for tests and rehearsals without systemd. It shares the pidfile
    convention (``<run_dir>/edgecore.pid``) with the keadm stand-in, as the
    real keadm shares the unit name with systemd.
    """

    def __init__(self, binary: Path, config: Path, pidfile: Path, log: Path) -> None:
        self.binary = binary
        self.config = config
        self.pidfile = pidfile
        self.log = log
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _pid(self) -> int:
        try:
            return int(self.pidfile.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _reap(self) -> None:
        # Our own children stay zombies until waited for; reap the finished ones.
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    async def status(self) -> ServiceStatus:
        self._reap()
        pid = self._pid()
        active = pid > 0 and pid_alive(pid)
        return ServiceStatus(active, "active" if active else "inactive", 0, pid if active else 0)

    async def start(self) -> None:
        if (await self.status()).active:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            child = subprocess.Popen(
                [str(self.binary), "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, close_fds=True,
            )
        self._children[child.pid] = child
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(f"{child.pid}\n")
        os.replace(tmp, self.pidfile)

    async def stop(self) -> None:
        pid = self._pid()
        if pid > 0 and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                self._reap()
                if not pid_alive(pid):
                    break
                await asyncio.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.05)
        self._reap()
        self.pidfile.unlink(missing_ok=True)
