"""The operations besides an upgrade, dispatched by the ``received`` step:
``prepull``, ``resolve`` and a manual ``rollback``. Like any step's work,
each advances the job through the runner or raises; ``Runner.fail`` maps it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from agent.adapters.edgecore import Detected
from agent.errors import AgentError, PrecheckFailed, StepError
from agent.model import Job
from agent.states import Note, State
from agent.steps.backup import list_backups
from agent.steps.image import stage_image
from agent.steps.precheck import resolve_verdict

if TYPE_CHECKING:
    from agent.runner import Runner


async def prepull(runner: Runner, job: Job) -> Job:
    """Fetch and verify the package now, so the upgrade later skips the download."""
    started = time.monotonic()
    try:
        staged = await stage_image(runner.node, job.command,
                                   lambda msg: runner.progress(job, msg))
    except AgentError as exc:
        raise StepError(f"prepull: {exc.reason}") from exc
    return runner.advance(job, State.SUCCEEDED,
                          f"prepulled {staged.info.ref} ({staged.info.size} bytes, "
                          f"{staged.info.digest}) in {time.monotonic() - started:.1f}s",
                          notes={Note.IMAGE_SIZE: str(staged.info.size)})


def resolve(runner: Runner, job: Job) -> Job:
    """``resolve JOB``: the operator says the node a failed rollback left is repaired."""
    state, reason = resolve_verdict(runner.node, job.command.resolves)
    if state == State.FAILED:
        raise PrecheckFailed(reason)
    return runner.advance(job, state, reason)


async def manual_rollback(runner: Runner, job: Job) -> Job:
    """``rollback [--to-version V]``: restore a backup (the newest by default)."""
    root = runner.node.backup_root
    backups = list_backups(root)
    target = job.command.version or (backups[-1] if backups else None)
    if target is None or target not in backups:
        what = f"no backup of {target}" if target else "no backups"
        raise PrecheckFailed(f"{what} in {root}")
    detected = await runner.node.probe.detect(use_record=False)
    current = str(detected.version) if detected else None
    job = with_version(job, detected)
    return runner.advance(job, State.ROLLING_BACK,
                          f"manual rollback from {current or 'unknown'} to {target}",
                          notes={Note.BACKUP: str(root / str(target)),
                                 Note.RESTORE_VERSION: str(target)})


def with_version(job: Job, detected: Detected | None) -> Job:
    """The detected version, and (for every later report) the source that answered."""
    if detected is None:
        return replace(job, from_version=None)
    notes = {**dict(job.notes), Note.VERSION_SOURCE.value: detected.source}
    return replace(job, from_version=str(detected.version), notes=tuple(sorted(notes.items())))
