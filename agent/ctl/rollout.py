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
from typing import Any

import structlog

from agent.ctl.link import CommandRefused, Link
from agent.ctl.manifest import JobSpec
from agent.ctl.model import JobPhase, JobView, NodePhase
from agent.ctl.store import Store, now
from agent.errors import AgentError, ManifestError, TransientError
from agent.timeouts import within

log = structlog.get_logger("agent.ctl")
COMMAND_SCHEMA = "edge-upgrade-agent/command/v1"


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


def job_phase(view: JobView, tolerate: float) -> JobPhase:
    """KubeEdge's calculation (controllermanager/nodetask/calculation.go): any node
    not final keeps the job InProgress; then Failure if failed/total, to two
    decimals, exceeds failureTolerate, else Completed. Unknown counts as failed."""
    if not view.nodes:
        return JobPhase.FAILURE
    if any(not n.phase.final for n in view.nodes):
        return JobPhase.IN_PROGRESS
    return JobPhase.FAILURE if _over(view, tolerate) else JobPhase.COMPLETED


def _failed(view: JobView) -> int:
    return sum(1 for n in view.nodes if n.phase in (NodePhase.FAILURE, NodePhase.UNKNOWN))


def _over(view: JobView, tolerate: float) -> bool:
    return round(_failed(view) / len(view.nodes), 2) > tolerate


class Rollout:
    """One job, driven until every node is final. ``dispatch=False`` only watches."""

    def __init__(self, store: Store, link: Link, spec: JobSpec, *, operation: str,
                 history_id: str, signer: Callable[[dict[str, Any]], dict[str, Any]] | None,
                 tick: float, dispatch: bool = True) -> None:
        self.store, self.link, self.spec = store, link, spec
        self.operation, self.history_id = operation, history_id
        self.signer, self.tick, self.dispatch = signer, tick, dispatch
        self.sent: set[str] = set()  # commands published by this process
        self.changed = asyncio.Event()

    def poke(self) -> None:
        self.changed.set()

    def view(self, *, events: bool = False) -> JobView:
        s = self.spec
        return self.store.view(s.name, events=events, spec_fields={
            "version": s.version, "image": s.image or "(agent default)",
            "concurrency": s.concurrency, "failure_tolerate": s.failure_tolerate,
            "timeout_seconds": s.timeout_seconds})

    async def run(self, on_view: Callable[[JobView], None] = lambda v: None) -> JobView:
        await self.link.settled.wait()
        while True:
            view = self.view()
            if self.dispatch:
                view = await self._step(view)
            on_view(view)
            phase = job_phase(view, self.spec.failure_tolerate)
            if phase.final:
                reason = self._reason(view)
                if self.dispatch or view.phase is not phase:
                    self.store.set_job_phase(self.spec.name, phase, reason, now())
                view = self.view(events=True)
                on_view(view)
                return view
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self.changed.wait(), self.tick)

    async def _step(self, view: JobView) -> JobView:
        t = now()
        name, spec = self.spec.name, self.spec
        for node, heard in self.store.heard_at(name).items():
            if heard is not None and t - heard > spec.timeout_seconds:
                log.warning("node timed out", job=name, node=node, seconds=spec.timeout_seconds)
                self.store.finish_node(name, node, NodePhase.UNKNOWN,
                                       f"The node task has timed out: no report for "
                                       f"{spec.timeout_seconds}s", t)
        view = self.view()
        pending = [n for n in view.nodes if n.phase is NodePhase.PENDING]
        if pending and _over(view, spec.failure_tolerate):
            skipped = self.store.skip_pending(
                name, f"not dispatched: failures ({_failed(view)}/{len(view.nodes)}) exceed "
                f"failureTolerate {spec.failure_tolerate:g}", t)
            log.warning("failure tolerance exceeded; dispatch stopped", job=name,
                        skipped=skipped)
            view = self.view()
            pending = []
        in_flight = [n for n in view.nodes if n.phase is NodePhase.IN_PROGRESS]
        for n in pending[:max(0, spec.concurrency - len(in_flight))]:
            self.store.mark_dispatched(name, n.name, t)  # before the side effect
        for n in self.view().nodes:
            if n.phase is NodePhase.IN_PROGRESS and n.name not in self.sent:
                await self._send(n.name)
        return self.view()

    async def _send(self, node: str) -> None:
        presence = self.store.presence().get(node, {})
        body = command_for(self.spec, self.operation, node, self.history_id,
                           _str(presence.get("arch")))
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

    def _reason(self, view: JobView) -> str:
        failed, total = _failed(view), len(view.nodes)
        ok = view.count(NodePhase.SUCCESSFUL)
        return (f"{ok} of {total} node(s) successful, {failed} failed or unknown, "
                f"{view.count(NodePhase.SKIPPED)} not dispatched "
                f"(failureTolerate {self.spec.failure_tolerate:g})")
