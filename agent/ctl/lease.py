"""One broker connection per controller identity.

The sample broker takes a client's certificate CN as its client id, and a
second connection with one id takes the first one's session over: two
``edge-upgrade-ctl`` processes of one identity would throw each other off in
turn. So the process that runs a job holds ``<state_dir>/link-<client_id>.lock``
(an advisory ``flock``, released by the kernel when the process dies, even by
SIGKILL), and the short commands defer to it: ``confirm`` queues its commands
in the store for the holder to send, ``get nodes`` reads the presence the
holder keeps current. A second job at once needs a second identity; the two
may share one store (docs/controller.md).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Lease:
    def __init__(self, state_dir: Path, identity: str) -> None:
        self.path = state_dir / f"link-{identity}.lock"
        self.fd: int | None = None

    def try_take(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
