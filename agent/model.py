"""The job as every layer sees it: what the journal stores, the runner moves
and reports describe. Below the journal, so that reports, the CLI and the
runner need not import the database to name a job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.messages.commands import Command
from agent.states import TERMINAL, Action, Note, State


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class ActionStatus:
    """One v1alpha2 ActionStatus / UpstreamMessage entry."""

    action: Action
    succ: bool
    reason: str
    finish_time: str
    extend: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "succ": self.succ,
            "reason": self.reason,
            "finishTime": self.finish_time,
            "extend": self.extend,
        }


@dataclass(frozen=True)
class Job:
    key: str
    command: Command
    state: State
    reason: str = ""
    from_version: str | None = None
    entries: tuple[tuple[str, int], ...] = ()
    actions: tuple[ActionStatus, ...] = ()
    # Small typed-by-convention facts steps leave for later steps and for
    # recovery (backup dir, log path, image digest); values are strings.
    notes: tuple[tuple[str, str], ...] = ()
    seq: int = 0
    final_reported: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def entry_count(self, state: State) -> int:
        return dict(self.entries).get(state.value, 0)

    def note(self, name: Note) -> str | None:
        return dict(self.notes).get(name.value)
