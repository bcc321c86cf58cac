"""Reports: one JSON object per state change, queued in the journal's outbox.

Each carries ``(jobKey, sequence)`` so receivers can dedupe, KubeEdge's
result enum and v1alpha2 action flow, and on failure the installer log tail.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.messages.commands import Operation
from agent.states import Note, State, kubeedge_phase, kubeedge_result

if TYPE_CHECKING:
    from agent.model import Job

SCHEMA = "edge-upgrade-agent/report/v1"


def build_report(job: Job, *, log_tail: str | None = None,
                 plan: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = job.command
    phase, result = kubeedge_phase(job.state), kubeedge_result(job.state)
    if cmd.operation in (Operation.ROLLBACK, Operation.PREPULL, Operation.RESOLVE) \
            and job.terminal:
        # None is an upgrade: KubeEdge's upgrade results do not fit them.
        ok = job.state in (State.ROLLED_BACK, State.SUCCEEDED)
        phase = "Successful" if ok else "Failure"
        result = f"{cmd.operation.value}_{'success' if ok else 'failed'}"
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "jobKey": job.key,
        "sequence": job.seq,
        "nodeName": cmd.node_name,
        "jobName": cmd.job_name,
        "upgradeID": cmd.job_name,
        "historyID": cmd.history_id,
        "operation": cmd.operation.value,
        "phase": job.state.value,
        "state": phase,
        "final": job.terminal,
        "result": result if job.terminal else None,
        "reason": job.reason,
        "fromVersion": job.from_version,
        "versionSource": job.note(Note.VERSION_SOURCE),
        "toVersion": str(cmd.version) if cmd.version else None,
        "actionFlow": [a.to_dict() for a in job.actions],
        "rehearsal": cmd.dry_run,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if log_tail:
        report["logTail"] = log_tail
    if plan is not None:
        report["plan"] = plan
    return report

