"""Driving one job across the fleet: selection, dispatch, timeouts, tolerance.

The rules are KubeEdge's (``cloud/pkg/taskmanager``, design/kubeedge.md §2.4),
with the three ways its controller loses track of a job mended:

- **Resumable.** Every decision is committed to the store before it is acted
  on. A restarted controller re-sends the command to each node in flight; the
  agent answers a repeated job key with its latest report and never runs the
  job twice. KubeEdge never re-dispatches an InProgress job after a restart.
- **Rollbacks are failures.** A node whose upgrade was rolled back is
  ``Failure`` with the agent's result (``upgrade_failed_rollback_success``);
  KubeEdge's action flow ends such a node ``Successful``.
- **Timeouts free their slot.** A node silent for ``timeoutSeconds`` since
  its last report becomes ``Unknown`` and its concurrency slot is given to the
  next node. Its late final report, if one comes, replaces ``Unknown``.

Offline nodes are not waited on: a node whose retained presence says offline
(or that has none) fails at selection, as KubeEdge fails a node not connected
to its cloudcore. Unknown and offline count as failures for ``failureTolerate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import structlog

from agent.ctl.link import CommandRefused, Link
from agent.ctl.manifest import JobSpec
from agent.ctl.model import JobPhase, JobView, NodePhase
from agent.ctl.store import Store, now
from agent.errors import AgentError, ManifestError, TransientError
from agent.faults import fault_point
from agent.timeouts import within

log = structlog.get_logger("agent.ctl")
COMMAND_SCHEMA = "edge-upgrade-agent/command/v1"
DRAW_SECONDS = 0.25
COALESCE_SECONDS = 0.02
SEND_BATCH = 100  # commands awaiting their PUBACKs at once


@dataclass(frozen=True)
class Selected:
    name: str
    phase: NodePhase  # PENDING, or FAILURE when it cannot be dispatched
    reason: str = ""


def select_nodes(spec: JobSpec, presence: dict[str, dict[str, Any]]) -> list[Selected]:
    """The job's nodes from the fleet's retained presence, in a stable order."""
    if spec.node_names:
        names = list(spec.node_names)
    else:
        assert spec.selector is not None
        names = sorted(n for n, p in presence.items()
                       if spec.selector.matches(_labels(p)))
    out = []
    for name in names:
        p = presence.get(name)
        if p is None:
            out.append(Selected(name, NodePhase.FAILURE,
                                "unknown node: no presence on the broker"))
        elif not p.get("online"):
            out.append(Selected(name, NodePhase.FAILURE, "node offline (its last presence "
                                "says online: false); not dispatched"))
        else:
            try:
                spec.digests.for_arch(_str(p.get("arch")))
            except ManifestError as exc:
                out.append(Selected(name, NodePhase.FAILURE, exc.reason))
                continue
            out.append(Selected(name, NodePhase.PENDING))
    return out


def _labels(presence: dict[str, Any]) -> dict[str, str]:
    labels = presence.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def command_for(spec: JobSpec, operation: str, node: str, history_id: str,
                arch: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": COMMAND_SCHEMA, "operation": operation, "jobName": spec.name,
        "nodeName": node, "version": spec.version, "historyID": history_id,
        "timeoutSeconds": spec.timeout_seconds,
    }
    if spec.image:
        body["image"] = spec.image
    digest = spec.digests.for_arch(arch)
    if digest:
        body["imageDigest"] = digest
    if operation == "upgrade":
        body["checkItems"] = list(spec.check_items)
        body["requireConfirmation"] = spec.require_confirmation
    return body


def new_history_id() -> str:
    return str(uuid.uuid4())


def job_phase(counts: dict[NodePhase, int], tolerate: float) -> JobPhase:
    """KubeEdge's calculation (controllermanager/nodetask/calculation.go): any node
    not final keeps the job InProgress; then Failure if failed/total, to two
    decimals, exceeds failureTolerate, else Completed. Unknown counts as failed."""
    if not sum(counts.values()):
        return JobPhase.FAILURE
    if counts[NodePhase.PENDING] or counts[NodePhase.IN_PROGRESS]:
        return JobPhase.IN_PROGRESS
    return JobPhase.FAILURE if _over(counts, tolerate) else JobPhase.COMPLETED


def _failed(counts: dict[NodePhase, int]) -> int:
    return counts[NodePhase.FAILURE] + counts[NodePhase.UNKNOWN]


def _over(counts: dict[NodePhase, int], tolerate: float) -> bool:
    # Decimal, half away from zero, as KubeEdge's shopspring decimal Round(2): a
    # float round() would make 1/8 0.12 (half to even), where KubeEdge says 0.13.
    ratio = (Decimal(_failed(counts)) / Decimal(sum(counts.values()))).quantize(
        Decimal("0.01"), rounding=ROUND_HALF_UP)
    return ratio > Decimal(repr(tolerate))


class Rollout:
    """One job, driven until every node is final. ``dispatch=False`` only watches."""

    def __init__(self, store: Store, link: Link, spec: JobSpec, *, operation: str,
                 history_id: str, signer: Callable[[dict[str, Any]], dict[str, Any]] | None,
                 tick: float, grace: float = 0.0, dispatch: bool = True) -> None:
        self.store, self.link, self.spec = store, link, spec
        self.operation, self.history_id = operation, history_id
        self.signer, self.tick, self.grace, self.dispatch = signer, tick, grace, dispatch
        self.sent: set[str] = set()  # commands published by this process
        self.resent: set[str] = set()  # ... and published again, unanswered
        self.changed = asyncio.Event()

    def poke(self) -> None:
        self.changed.set()

    def view(self, *, events: bool | Literal["last"] = False) -> JobView:
        s = self.spec
        return self.store.view(s.name, events=events, spec_fields={
            "version": s.version, "image": s.image or "(agent default)",
            "concurrency": s.concurrency, "failure_tolerate": s.failure_tolerate,
            "timeout_seconds": s.timeout_seconds})

    async def run(self, on_view: Callable[[JobView], None] | None = None) -> JobView:
        """Drive the job until every node is final; ``on_view`` (the live table) gets
        the whole job at most every DRAW_SECONDS: building it for a fleet of
        thousands on every report would cost more than the rollout."""
        await self.link.settled.wait()
        drawn = 0.0
        while True:
            counts = await self._step() if self.dispatch else self.store.counts(self.spec.name)
            phase = job_phase(counts, self.spec.failure_tolerate)
            loop_now = asyncio.get_running_loop().time()
            if on_view is not None and (phase.final or loop_now - drawn >= DRAW_SECONDS):
                on_view(self.view())
                drawn = loop_now
            if phase.final:
                self.store.set_job_phase(self.spec.name, phase, self._reason(counts), now())
                view = self.view(events="last")  # for the final status
                if on_view is not None:
                    on_view(view)
                return view
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self.changed.wait(), self.tick)
            await asyncio.sleep(COALESCE_SECONDS)  # one step for a burst of reports

    async def _step(self) -> dict[NodePhase, int]:
        t = now()
        name, spec = self.spec.name, self.spec
        limit = spec.timeout_seconds + self.grace
        for node, (heard, answered) in self.store.in_flight(name).items():
            if heard is not None and t - heard > limit:
                log.warning("node timed out", job=name, node=node, seconds=limit)
                self.store.finish_node(name, node, NodePhase.UNKNOWN,
                                       f"The node task has timed out: no report for "
                                       f"{limit:g}s", t)
            elif (heard is not None and not answered and t - heard > limit / 2
                  and node in self.sent and node not in self.resent):
                # Not a word since the command left: it may be lost (a broker crash
                # within its autosave window). Once more; the agent dedupes on the key.
                self.resent.add(node)
                self.sent.discard(node)
        counts = self.store.counts(name)
        if counts[NodePhase.PENDING] and _over(counts, spec.failure_tolerate):
            skipped = self.store.skip_pending(
                name, f"not dispatched: failures ({_failed(counts)}/{sum(counts.values())}) "
                f"exceed failureTolerate {spec.failure_tolerate:g}", t)
            log.warning("failure tolerance exceeded; dispatch stopped", job=name,
                        skipped=skipped)
        else:
            slots = spec.concurrency - counts[NodePhase.IN_PROGRESS]
            if slots > 0 and counts[NodePhase.PENDING]:
                # Committed before the commands leave: a crash now means a resend.
                self.store.mark_dispatched(name, self.store.pending(name, slots), t)
                fault_point("ctl:dispatched")
        unsent = [n for n in self.store.in_flight(name) if n not in self.sent]
        for i in range(0, len(unsent), SEND_BATCH):
            await asyncio.gather(*(self._send(n) for n in unsent[i:i + SEND_BATCH]))
        if unsent:
            fault_point("ctl:sent")
        return self.store.counts(name)

    async def _send(self, node: str) -> None:
        body = command_for(self.spec, self.operation, node, self.history_id,
                           self.store.arch(node))
        if self.signer is not None:
            body = self.signer(body)  # a fresh commandId each time: resends are not replays
        try:
            await self.link.publish(node, body)
        except CommandRefused as exc:
            self.store.finish_node(self.spec.name, node, NodePhase.FAILURE, exc.reason, now())
            self.sent.add(node)
        except TransientError as exc:
            log.info("command not sent yet; will retry", node=node, reason=exc.reason)
        except AgentError as exc:
            self.store.finish_node(self.spec.name, node, NodePhase.FAILURE, exc.reason, now())
            self.sent.add(node)
        else:
            self.sent.add(node)

    def _reason(self, counts: dict[NodePhase, int]) -> str:
        return (f"{counts[NodePhase.SUCCESSFUL]} of {sum(counts.values())} node(s) "
                f"successful, {_failed(counts)} failed or unknown, "
                f"{counts[NodePhase.SKIPPED]} not dispatched "
                f"(failureTolerate {self.spec.failure_tolerate:g})")
