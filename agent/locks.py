"""Mutual exclusion: our flock, and keadm's own idempotency marker.

keadm's marker is a plain file that a crash leaves behind, blocking every
later upgrade forever. Ours is an ``flock`` that the kernel drops with the
process. We honour keadm's marker while it is live (recent, or a keadm is
running) and clear it only when it is provably stale.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.procfs import live_processes
from agent.errors import Busy


class JobLock:
    """Non-blocking exclusive flock on ``<state_dir>/agent.lock``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise Busy(f"another job is running (agent lock held by pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_by_other(self) -> bool:
        """True when someone else holds the lock (read-only probe for dry runs)."""
        if self.fd is not None or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def keadm_pids() -> list[int]:
    """Pids of running processes whose program is named ``keadm``."""
    return [pid for pid, argv in live_processes()
            if "keadm" in (Path(a.decode(errors="replace")).name for a in argv[:2])]


@dataclass(frozen=True)
class MarkerState:
    present: bool
    stale: bool = False
    age_seconds: float = 0.0
    keadm_running: bool = False

    def describe(self) -> str:
        if not self.present:
            return "absent"
        what = "stale" if self.stale else "live"
        running = ", keadm running" if self.keadm_running else ""
        return f"{what} (age {self.age_seconds:.0f}s{running})"


def inspect_marker(path: Path, stale_after: float) -> MarkerState:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return MarkerState(present=False)
    running = bool(keadm_pids())
    return MarkerState(True, stale=age > stale_after and not running, age_seconds=age,
                       keadm_running=running)


def check_marker(path: Path, stale_after: float) -> MarkerState:
    """Raise Busy while keadm's marker is live; the caller reports and clears a stale one."""
    state = inspect_marker(path, stale_after)
    if state.present and not state.stale:
        raise Busy(
            f"keadm's lock {path.name} is present and {state.describe()}: "
            "another upgrade may be in progress"
        )
    return state
