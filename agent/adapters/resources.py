"""CPU, memory and disk usage from /proc and statvfs (KubeEdge's checkItems)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


async def cpu_percent(interval: float = 0.2) -> float:
    total1, idle1 = _cpu_times()
    await asyncio.sleep(interval)
    total2, idle2 = _cpu_times()
    busy = (total2 - total1) - (idle2 - idle1)
    return 100.0 * busy / max(1, total2 - total1)


def mem_percent() -> float:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])
    total = info["MemTotal"]
    return 100.0 * (total - info.get("MemAvailable", info["MemFree"])) / total


def disk_percent(path: Path) -> float:
    usage = shutil.disk_usage(existing_parent(path))
    return 100.0 * usage.used / max(1, usage.total)


def free_bytes(path: Path) -> int:
    st = os.statvfs(existing_parent(path))
    return st.f_bavail * st.f_frsize


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
