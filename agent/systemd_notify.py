"""sd_notify(3) in a few lines: systemd advises reimplementing it, not linking libsystemd.

Never blocks for long: a datagram to a receiver whose queue is full (a busy or
hung manager) would otherwise wait in sendto, on the event loop, and freeze
the whole agent (the fault matrix found it: a STATUS= per reconnect attempt
during a broker outage filled a queue nobody read). The send is non-blocking:
a notification that finds the queue full is dropped, and the next STATUS= or
WATCHDOG= supersedes it.
"""

from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)  # EAGAIN on a full queue: an OSError, so dropped
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, if the watchdog is on and meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
