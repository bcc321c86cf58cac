"""Fault injection for the crash tests: a real SIGKILL at a named point.

``EDGE_UPGRADE_AGENT_FAULT=<point>`` makes the agent kill itself with
SIGKILL when it reaches that point, e.g. ``after:installing`` (just after the
journal commit of that state) or ``backup:partial`` (half-way through a
backup). Unset in production, where the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGE_UPGRADE_AGENT_FAULT"


def fault_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
