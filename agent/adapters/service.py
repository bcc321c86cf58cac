"""Service managers for edgecore: systemctl, and a child-process one for tests.

The health gate needs three facts: is the unit active, how often has it been
restarted, and which pid runs it. systemd gives all three; the process
manager derives them from a pidfile so that it survives an agent crash the
way a systemd unit does.

Each manager also answers "which version did the running edgecore log at
start?". No KubeEdge release has a version flag (``edgecore --version``
starts a second edgecore), but every release logs ``Version: vX.Y.Z`` as its
first klog line. Under systemd that line is in the journal of the unit's
current invocation, written by MainPID; for the process manager it is in the
log file the child's stderr goes to.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.adapters.procfs import pid_alive
from agent.errors import TransientError

if TYPE_CHECKING:
    from agent.config import Config
    from agent.config_reader import Section

# klog's header: severity, MMDD, time, pid (right-aligned), file:line], message.
# e.g. "I1130 15:06:04.800382   30539 server.go:103] Version: v1.13.0"
VERSION_LINE = re.compile(
    r"^[IWEF]\d{4} [\d:.]+\s+(?P<pid>\d+) [^\]]*\] Version: (?P<version>v\S+)\s*$")
# Only the start of an invocation is read: the line is edgecore's first.
START_LINES = 200


def version_in_log(lines: list[str], pid: int) -> str | None:
    """The version that process ``pid`` logged at start, if these lines have it."""
    found = None
    for line in lines:
        m = VERSION_LINE.match(line)
        if m and int(m["pid"]) == pid:
            found = m["version"]
    return found


@dataclass(frozen=True)
class ServiceStatus:
    active: bool
    state: str  # systemd ActiveState: active, inactive, failed, activating …
    n_restarts: int
    main_pid: int
    invocation: str = ""  # systemd's InvocationID: one per start of the unit


class ServiceManager(Protocol):
    log_name: str

    async def status(self) -> ServiceStatus: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def restart(self) -> None: ...
    async def reload_units(self) -> None:
        """Make the manager re-read unit files (``daemon-reload``) after we changed one."""

    async def logged_version(self, status: ServiceStatus) -> str | None:
        """The ``Version:`` line MainPID of this invocation logged at start, if any."""

    async def enabled_for_keadm(self) -> bool | None:
        """Whether keadm will find the unit enabled (None: no unit files here)."""

    async def needs_reload(self) -> bool:
        """Whether the unit file changed since the manager loaded it."""


def parse_show(text: str) -> ServiceStatus:
    """Parse ``systemctl show -p ActiveState,NRestarts,MainPID,InvocationID`` output."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    state = props.get("ActiveState", "unknown")
    restarts = props.get("NRestarts", "0")
    pid = props.get("MainPID", "0")
    invocation = props.get("InvocationID", "")
    return ServiceStatus(
        active=state == "active",
        state=state,
        n_restarts=int(restarts) if restarts.isdigit() else 0,
        main_pid=int(pid) if pid.isdigit() else 0,
        invocation=invocation if re.fullmatch(r"[0-9a-f]{32}", invocation) else "",
    )


@dataclass(frozen=True)
class SystemdSettings:
    """``service.systemd``: nothing yet; the unit (``service.unit``) is keadm's too."""


@dataclass(frozen=True)
class ProcessSettings:
    """``service.process``: where the detached edgecore writes its log."""

    log_file: str = "/var/log/edgecore.log"  # a node path


class SystemctlManager:
    log_name = "journal"  # where logged_version looks: named in reports

    @staticmethod
    def parse_settings(section: Section) -> SystemdSettings:
        section.done()
        return SystemdSettings()

    @classmethod
    def from_config(cls, config: Config, settings: SystemdSettings) -> SystemctlManager:
        return cls(config.edgecore_unit)

    def __init__(self, unit: str, systemctl: str = "systemctl",
                 journalctl: str = "journalctl") -> None:
        self.unit = unit
        self.systemctl = systemctl
        self.journalctl = journalctl

    async def _run(self, *args: str, timeout: float = 90, unit: bool = True) -> str:
        what = f"{args[0]} {self.unit}" if unit else args[0]
        proc = await asyncio.create_subprocess_exec(
            self.systemctl, *args, *([self.unit] if unit else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise TransientError(f"systemctl {what} timed out") from None
        if proc.returncode != 0 and args[0] != "show":
            msg = err.decode(errors="replace").strip()[:300]
            raise TransientError(f"systemctl {what} failed: {msg}")
        return out.decode(errors="replace")

    async def status(self) -> ServiceStatus:
        return parse_show(
            await self._run("show", "-p", "ActiveState,NRestarts,MainPID,InvocationID"))

    async def start(self) -> None:
        await self._run("start")

    async def stop(self) -> None:
        await self._run("stop")

    async def restart(self) -> None:
        await self._run("restart")

    async def reload_units(self) -> None:
        await self._run("daemon-reload", unit=False)

    async def needs_reload(self) -> bool:
        return "NeedDaemonReload=yes" in await self._run("show", "-p", "NeedDaemonReload")

    async def enabled_for_keadm(self) -> bool | None:
        # keadm decides which unit to stop with `systemctl list-unit-files | grep
        # enabled | grep edge`, then `... | grep edgecore`: the same test here.
        # The pattern narrows the listing (and systemd's preset lookups) to the
        # lines keadm's `grep edgecore` would keep; a full listing takes 0.2 s.
        name = self.unit.removesuffix(".service")
        listing = await self._run("list-unit-files", "--no-legend", "--no-pager", f"*{name}*",
                                  unit=False)
        return any("enabled" in line and name in line for line in listing.splitlines())

    async def logged_version(self, status: ServiceStatus) -> str | None:
        if status.main_pid <= 0:
            return None
        # The invocation pins this start of the unit; _PID pins MainPID in it.
        match = (f"_SYSTEMD_INVOCATION_ID={status.invocation}" if status.invocation
                 else f"_SYSTEMD_UNIT={self.unit}")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.journalctl, "--no-pager", "--quiet", "-o", "cat", match,
                f"_PID={status.main_pid}",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            return None  # no journalctl on this host: other sources answer
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[str] = []

        async def read() -> None:
            while len(lines) < START_LINES:
                raw = await stdout.readline()
                if not raw:
                    return
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                if version_in_log(lines[-1:], status.main_pid):
                    return

        try:
            await asyncio.wait_for(read(), 10)
        except asyncio.TimeoutError:
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        return version_in_log(lines, status.main_pid)


class ProcessManager:
    """Runs edgecore as a detached child recorded in a pidfile.

    Used for tests and rehearsals without systemd. It shares the pidfile
    convention (``<run_dir>/edgecore.pid``) with the keadm stand-in, as the
    real keadm shares the unit name with systemd.
    """

    log_name = "log"

    @staticmethod
    def parse_settings(section: Section) -> ProcessSettings:
        settings = ProcessSettings(section.path("log_file", ProcessSettings.log_file))
        section.done()
        return settings

    @classmethod
    def from_config(cls, config: Config, settings: ProcessSettings) -> ProcessManager:
        paths = config.paths
        return cls(paths.node(paths.edgecore_binary), paths.node(paths.edgecore_config),
                   paths.node(paths.run_dir) / "edgecore.pid", paths.node(settings.log_file))

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

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def reload_units(self) -> None:
        """No unit files here: the process manager reads nothing to reload."""

    async def enabled_for_keadm(self) -> bool | None:
        return None

    async def needs_reload(self) -> bool:
        return False

    async def logged_version(self, status: ServiceStatus) -> str | None:
        if status.main_pid <= 0:
            return None
        return await asyncio.to_thread(self._logged_version, status.main_pid)

    def _logged_version(self, pid: int) -> str | None:
        try:
            with self.log.open("rb") as f:
                lines = [raw.decode(errors="replace").rstrip("\n") for raw in f]
        except OSError:
            return None
        return version_in_log(lines, pid)

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
