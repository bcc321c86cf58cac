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

from pathlib import Path

from agent.errors import Busy
from agent.locks import JobLock


class Lease:
    """The agent's job lock (``agent.locks.JobLock``) on the link of one identity."""

    def __init__(self, state_dir: Path, identity: str) -> None:
        self.lock = JobLock(state_dir / f"link-{identity}.lock")
        self.path = self.lock.path

    def try_take(self) -> bool:
        try:
            self.lock.acquire()
        except Busy:
            return False
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        self.lock.release()
