"""What the controller knows of a rollout, as frozen values: the job, each node
and every report a node sent. The store builds these; the table, the status
YAML and the HTML report only read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class NodePhase(str, Enum):
    """A node's place in a rollout, in KubeEdge v1alpha2's words where they exist."""

    PENDING = "Pending"        # selected, not yet dispatched (waiting for a slot)
    IN_PROGRESS = "InProgress"  # command sent, no final report yet
    SUCCESSFUL = "Successful"
    FAILURE = "Failure"        # includes a rollback that succeeded: the upgrade failed
    UNKNOWN = "Unknown"        # silent for timeoutSeconds; its slot was freed
    SKIPPED = "Skipped"        # never dispatched: failure tolerance reached first

    @property
    def final(self) -> bool:
        return self not in (NodePhase.PENDING, NodePhase.IN_PROGRESS)


class JobPhase(str, Enum):
    INIT = "Init"
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    FAILURE = "Failure"

    @property
    def final(self) -> bool:
        return self in (JobPhase.COMPLETED, JobPhase.FAILURE)


@dataclass(frozen=True)
class Action:
    """One entry of a report's KubeEdge ``actionFlow``."""

    action: str
    succ: bool
    reason: str
    finish_time: str


@dataclass(frozen=True)
class ReportEvent:
    """One agent report (docs/protocol.md#reports), as received."""

    node: str
    sequence: int
    phase: str            # the agent's state: received, prechecked, ... rolled_back
    state: str            # the KubeEdge node phase the agent gave
    final: bool
    result: str | None
    reason: str
    from_version: str | None
    to_version: str | None
    timestamp: str        # the agent's clock, UTC, whole seconds
    received_at: float    # the controller's clock (epoch seconds) when it arrived
    log_tail: str = ""
    action_flow: tuple[Action, ...] = ()


@dataclass(frozen=True)
class NodeView:
    name: str
    phase: NodePhase
    from_version: str | None = None
    to_version: str | None = None
    last_action: str = ""       # the agent's last state, or the controller's verdict
    reason: str = ""
    result: str | None = None   # the agent's result (e.g. upgrade_failed_rollback_success)
    dispatched_at: float | None = None
    finished_at: float | None = None
    events: tuple[ReportEvent, ...] = ()

    @property
    def log_tail(self) -> str:
        for event in reversed(self.events):
            if event.log_tail:
                return event.log_tail
        return ""


@dataclass(frozen=True)
class JobView:
    name: str
    operation: str              # upgrade or prepull
    version: str
    image: str
    phase: JobPhase
    concurrency: int
    failure_tolerate: float
    timeout_seconds: int
    created_at: float
    updated_at: float
    history_id: str
    reason: str = ""
    nodes: tuple[NodeView, ...] = field(default=())

    def count(self, phase: NodePhase) -> int:
        return sum(1 for n in self.nodes if n.phase is phase)
