"""The process table, read from /proc: one parser for every caller.

The locks look for a running keadm, recovery for a leftover installer to
kill, the service manager for a live edgecore, the health gate for when a
process started. A zombie (Z) or dead (X) entry is not a live process: an
orphan inside a container may never be reaped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold ')')."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()


def pid_alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every live process; ones that vanish meanwhile are skipped."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid_alive(pid):
            yield pid, argv


def started_at(pid: int) -> float:
    """Wall-clock start of ``pid`` (field 22 of its stat, in ticks since boot),
    known to a second: the boot time in /proc/stat is whole seconds."""
    ticks = int(_stat_fields(pid)[19])
    btime = next(int(line.split()[1]) for line in (PROC / "stat").read_text().splitlines()
                 if line.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")
