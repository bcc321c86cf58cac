"""Fault injection for the crash tests and the fault matrix, at named points.

``EDGE_UPGRADE_AGENT_FAULT=<point>[=<action>]`` acts when the agent reaches
that point, e.g. ``after:installing`` (just after the journal commit of that
state) or ``backup:partial`` (half-way through a backup). The actions:

- ``kill`` (the default): SIGKILL, the power cut of the crash tests;
- ``term``: SIGTERM, the orderly stop that systemd sends;
- ``pause``: create ``<dir>/paused`` and block, event loop included, until a
  test removes it (at most ``PAUSE_LIMIT_SECONDS``); once per process, though
  a state may be committed again (news within it, a resume). The test injects its
  fault (broker down, disk full, clock jump ...) while the agent stands at
  exactly that point; ``<dir>`` is ``EDGE_UPGRADE_AGENT_FAULT_DIR``.

edge-upgrade-ctl has points of its own: ``ctl:created`` (the job stored),
``ctl:dispatched`` (nodes marked in flight, commands not sent), ``ctl:sent``
and ``ctl:taken`` (reports committed, not yet acked).

Unset in production, where the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "EDGE_UPGRADE_AGENT_FAULT"
DIR_ENV = "EDGE_UPGRADE_AGENT_FAULT_DIR"
PAUSE_LIMIT_SECONDS = 120.0
_paused: set[str] = set()


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted is None:
        return
    point, _, action = wanted.partition("=")
    if point != name:
        return
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "pause":
        if name in _paused:
            return
        _paused.add(name)
        _pause(Path(os.environ.get(DIR_ENV, ".")) / "paused")
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(marker: Path) -> None:
    # Blocking on purpose: nothing of the agent may move while the fault is set up.
    marker.write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
