"""The job runner: a trivial loop over one handler per state, plus recovery.

Each handler does its state's work and names the next state; the runner
commits that state (and its report) to the journal before running the next
handler, so the journal always says what might have happened. At start-up,
``recover`` applies the recovery table of docs/architecture.md to every job
a crash left behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from agent import lean, metrics
from agent.errors import (
    AgentError,
    Busy,
    InvalidCommand,
    PrecheckFailed,
    RollbackError,
    cap,
)
from agent.faults import fault_point
from agent.locks import check_marker, keadm_pids
from agent.logs import note_phase
from agent.messages.commands import Command, Operation
from agent.messages.reports import build_report
from agent.model import ActionStatus, Job, utc_now
from agent.node import RECORD_KEY, Node
from agent.states import NODE_TOUCHED, Action, Note, State
from agent.versions import Version

# The steps (agent/steps/*, agent/operations.py) are imported by the handlers that
# run them: an idle daemon holds none of their code (issue 10, agent/lean.py).

log = structlog.get_logger("agent.runner")
Handler = Callable[[Job], Awaitable[Job]]


@dataclass(frozen=True)
class Step:
    """A state's work, and how its failure reads; the runner decides where it goes."""

    work: Handler
    label: str = ""  # prefixes a failure's reason ("backup: ..."); "" when the work says it
    action: Action | None = None  # the v1alpha2 action a failure before install is recorded as
    log_tail: bool = False  # a failure report carries the installer's log tail


class Runner:
    def __init__(self, node: Node) -> None:
        self.node = node
        # The state a job is in -> the work that state stands for. The work
        # returns the next state, or raises; ``fail`` alone maps a failure.
        self.steps: dict[State, Step] = {
            State.RECEIVED: Step(self._check, action=Action.CHECK),
            State.PRECHECKED: Step(self._stage, "image", Action.CHECK),
            State.IMAGE_READY: Step(self._back_up, "backup", Action.BACKUP),
            State.BACKED_UP: Step(self._hand_over, "backup", Action.BACKUP),
            State.INSTALLING: Step(self._install, "install", log_tail=True),
            State.VERIFYING: Step(self._verify, "health"),
            State.ROLLING_BACK: Step(self._roll_back),
        }
        # Cancels for the job being run, honoured between handlers (never mid-step).
        self.cancel_requests: set[str] = set()
        # Told about every queued report, so the reporter sends it at once.
        self.on_report: Callable[[], None] = lambda: None

    # -- journal helpers ----------------------------------------------------

    def advance(self, job: Job, state: State, reason: str = "", *,
                action: tuple[Action, bool] | None = None, notes: dict[Note, str] | None = None,
                log_tail: str | None = None, entered: bool | None = None) -> Job:
        """Commit the next state and its report in one transaction.

        ``entered`` counts an entry for the loop breaker; by default a move to
        another state does and news within a state (image staged) does not.
        """
        actions = job.actions
        if action is not None:
            extend = f"{job.from_version or ''},{job.command.version or ''}"
            actions += (ActionStatus(action[0], action[1], reason, utc_now(), extend),)
        entries = dict(job.entries)
        if entered if entered is not None else state != job.state:
            entries[state.value] = entries.get(state.value, 0) + 1
        merged = {**dict(job.notes), **{k.value: v for k, v in (notes or {}).items()}}
        reason = cap(reason)  # built from parts (cause; error) that are each capped
        job = replace(job, state=state, reason=reason, actions=actions,
                      entries=tuple(sorted(entries.items())), notes=tuple(sorted(merged.items())))
        if job.terminal and log_tail is None:
            log_tail = self._tail(job)
        job = self.node.journal.save(job, lambda j: build_report(j, log_tail=log_tail))
        self.on_report()
        log.info("job state", job=job.key, state=state.value, reason=reason)
        fault_point(f"after:{state.value}")
        return job

    def _tail(self, job: Job) -> str | None:
        from agent.steps.install import log_tail  # noqa: PLC0415 (see the imports)
        path = job.note(Note.LOG)
        return log_tail(Path(path)) if path and job.state != State.SUCCEEDED else None

    def submit(self, cmd: Command) -> tuple[Job, bool]:
        """Journal a command before acting on it; (job, False) for a duplicate key."""
        existing = self.node.journal.get(cmd.key)
        if existing is not None:
            return existing, False
        job = Job(key=cmd.key, command=cmd, state=State.RECEIVED, reason="command received")
        try:
            added = self.node.journal.add(job, build_report)
            fault_point("after:received")
            return added, True
        except KeyError:
            found = self.node.journal.get(cmd.key)
            assert found is not None
            return found, False

    def reject(self, cmd: Command, reason: str, key: str) -> Job:
        job = Job(key=key, command=cmd, state=State.REJECTED, reason=cap(reason))
        return self.node.journal.add(job, build_report)

    # -- the loop -----------------------------------------------------------

    async def run(self, job: Job) -> Job:
        """Drive ``job`` until it is terminal or parked. The caller holds the lock."""
        with structlog.contextvars.bound_contextvars(job=job.key):
            note_phase(job.key, job.state.value)  # lines before the first transition too
            while not job.terminal and job.state != State.AWAITING_CONFIRMATION:
                if self._cancel_requested(job.key):
                    job = self.cancel(job)
                    continue
                if job.entry_count(job.state) > self.node.config.max_state_entries:
                    job = self._break_loop(job)
                    continue
                with metrics.timed(job.state.value):  # the phase histogram
                    job = await self._step(job)
        self._cancel_requested(job.key)  # a late cancel of a finished job: forget it
        lean.release_memory()  # what the job freed, back to the kernel
        return job

    async def _step(self, job: Job) -> Job:
        step = self.steps[job.state]
        try:
            return await step.work(job)
        except (AgentError, OSError) as exc:
            # Anything else is a bug: it escapes to the daemon, which treats it as a crash.
            reason = exc.reason if isinstance(exc, AgentError) else str(exc)
            job = exc.job if isinstance(exc, _Refused) else job
            return self.fail(job, f"{step.label}: {reason}" if step.label else reason,
                             check=step.action, refusal=_refusal(exc),
                             log_tail=self._tail(job) if step.log_tail else None)

    def request_cancel(self, key: str) -> None:
        """Cancel the running job at its next step boundary; survives a restart."""
        self.node.journal.set_meta(f"cancel:{key}", "requested")
        self.cancel_requests.add(key)

    def _cancel_requested(self, key: str) -> bool:
        """Consume a pending cancel request (in memory, or journalled before a crash)."""
        pending = key in self.cancel_requests or \
            self.node.journal.get_meta(f"cancel:{key}") is not None
        if pending:
            self.cancel_requests.discard(key)
            self.node.journal.delete_meta(f"cancel:{key}")
        return pending

    def fail(self, job: Job, reason: str, *, check: Action | None = None,
             refusal: str | None = None, log_tail: str | None = None) -> Job:
        """The one failure rule (Mender's HandleError): ``failed`` before the node is
        touched, ``rolling_back`` after, ``rollback_failed`` when the rollback fails.

        Steps only raise; ``check`` is the action a failure before the node is
        touched is recorded as (Check, BackUp), ``refusal`` the exit code's kind.
        """
        action: Action | None
        if job.state == State.ROLLING_BACK:
            state, action = State.ROLLBACK_FAILED, Action.ROLLBACK
        elif job.state in NODE_TOUCHED:
            state, action = State.ROLLING_BACK, Action.UPGRADE
        else:
            state, action = State.FAILED, check
        return self.advance(job, state, reason, action=(action, False) if action else None,
                            notes={Note.REFUSAL: refusal} if refusal else None,
                            log_tail=log_tail)

    def _break_loop(self, job: Job) -> Job:
        return self.fail(job, f"loop breaker: state {job.state.value} entered "
                              f"{job.entry_count(job.state)} times")

    def recover(self, why: str = "agent restarted") -> list[Job]:
        """Apply the recovery table to every job a crash left non-terminal.

        Terminal jobs need nothing: a final state and its report are one
        transaction, so neither exists without the other.
        """
        return [self.resume(job, why)
                for job in reversed(self.node.journal.jobs(active_only=True, limit=10000))]

    def resend_final(self, job: Job) -> Job:
        """Queue the final report of a finished job again, same sequence (a duplicate
        command asked, or the broker redelivered one)."""
        tail = self._tail(job)
        return self.node.journal.repeat(job.key, lambda j: build_report(j, log_tail=tail))

    def resume(self, job: Job, why: str) -> Job:
        """Re-enter ``job`` after an interruption, per the recovery table."""
        if job.state == State.INSTALLING:
            # Never guess that keadm finished: stop whatever is left and roll back.
            return self.fail(job, f"{why} during install; rolling back")
        if job.state == State.AWAITING_CONFIRMATION:
            return job
        # The re-entry is journalled, so the loop breaker sees repeated interruptions.
        return self.advance(job, job.state, f"resumed in {job.state.value}: {why}",
                            entered=True)

    # -- handlers -----------------------------------------------------------

    async def _check(self, job: Job) -> Job:
        from agent import operations  # noqa: PLC0415 (see the imports)
        from agent.steps.precheck import assess, unresolved_failure  # noqa: PLC0415
        cmd = job.command
        if cmd.operation == Operation.PREPULL:
            return await operations.prepull(self, job)
        if cmd.operation == Operation.RESOLVE:
            return operations.resolve(self, job)
        # A keadm at work (ours or anyone's) rules out an upgrade and a rollback alike.
        marker = check_marker(self.node.keadm_marker, cmd.timeout_seconds)
        if marker.stale:
            # Reported (journalled) first, then removed: a crash in between
            # leaves a stale marker to clear again, never an unreported removal.
            why = f"cleared a stale keadm marker ({self.node.keadm_marker.name}, " \
                  f"{marker.describe()})"
            self.node.journal.event(job.key, lambda j: build_report(replace(j, reason=why)))
            self.on_report()
            log.warning("cleared a stale keadm marker", age_s=round(marker.age_seconds))
            self.node.keadm_marker.unlink(missing_ok=True)
        if cmd.operation == Operation.ROLLBACK:
            return await operations.manual_rollback(self, job)
        if (blocked := unresolved_failure(self.node)) is not None:
            raise PrecheckFailed(blocked)
        found = await assess(self.node, cmd, lock_held=True)
        job = operations.with_version(job, found.detected)
        if found.report is None:
            return self.advance(job, State.SKIPPED, f"already at {cmd.target}",
                                action=(Action.CHECK, True))
        if found.image_check is not None and not found.image_check.ok:
            raise _Refused(job, f"image: {found.image_check.detail}")
        if not found.report.ok:
            raise _Refused(job, found.report.failures())
        return self.advance(job, State.PRECHECKED, "prechecks passed")

    async def _stage(self, job: Job) -> Job:
        cmd = job.command
        if cmd.require_confirmation and job.note(Note.CONFIRMED) != "yes":
            return self.advance(job, State.AWAITING_CONFIRMATION, "waiting for confirmation")
        from agent.steps.image import stage_image  # noqa: PLC0415 (see the imports)
        staged = await stage_image(self.node, cmd, lambda msg: self.progress(job, msg))
        staged_why = "image staged" + (" (already staged from this digest: not extracted again)"
                                       if staged.reused else "")
        job = self.advance(job, job.state, staged_why, action=(Action.CHECK, True),
                           notes={Note.KEADM: str(staged.keadm), Note.DIGEST: staged.info.digest,
                                  Note.EDGECORE_SHA256: staged.edgecore_sha256})
        return self.advance(job, State.IMAGE_READY, f"image {staged.info.digest} ready",
                            action=(Action.WAITING_CONFIRMATION, True))

    def progress(self, job: Job, message: str) -> None:
        """Pull progress as a report of its own (already throttled by the backend)."""
        log.info(message, job=job.key)
        self.node.journal.event(job.key, lambda j: build_report(replace(j, reason=message)))
        self.on_report()

    def cancel(self, job: Job) -> Job:
        """Cancel before the installer runs; afterwards only rollback is safe, so refuse."""
        if job.terminal or job.state in NODE_TOUCHED:
            why = (f"cancel refused: job is {job.state.value}" + ("" if job.terminal else
                   "; past the installer only a rollback can undo it"))
            log.warning("cancel refused", job=job.key, state=job.state.value)
            return self.node.journal.event(
                job.key, lambda j: build_report(replace(j, reason=why)))
        return self.fail(job, "cancelled by the operator before installing")

    def confirm(self, job: Job) -> Job:
        if job.state != State.AWAITING_CONFIRMATION:
            raise InvalidCommand(f"job {job.key} is {job.state.value}, not awaiting confirmation")
        # A return to the state it was parked in, not a retry: the breaker ignores it.
        return self.advance(job, State.PRECHECKED, "confirmed", notes={Note.CONFIRMED: "yes"},
                            entered=False)

    async def _back_up(self, job: Job) -> Job:
        from agent.steps.backup import make_backup, prune_backups  # noqa: PLC0415
        assert job.from_version is not None
        started = time.monotonic()
        # In a thread: a multi-gigabyte database must not stall the loop and the watchdog.
        manifest = await asyncio.to_thread(
            make_backup, self.node.backup_root, job.from_version, self.node.probe.files())
        removed = await asyncio.to_thread(
            prune_backups, self.node.backup_root, self.node.config.keep_backups,
            job.from_version)
        backup_dir = str(self.node.backup_root / job.from_version)
        return self.advance(job, State.BACKED_UP,
                            f"backed up {manifest.size} bytes to {backup_dir} in "
                            f"{time.monotonic() - started:.2f}s"
                            + (f" (pruned {', '.join(removed)})" if removed else ""),
                            action=(Action.BACKUP, True), notes={Note.BACKUP: backup_dir})

    async def _hand_over(self, job: Job) -> Job:
        from agent.steps.backup import verify_backup  # noqa: PLC0415 (see the imports)
        # The last look before the point of no return: a backup that rotted since
        # it was made fails the job here, with the node untouched (fault matrix).
        await asyncio.to_thread(verify_backup, Path(job.note(Note.BACKUP) or ""))
        log_path = self.node.log_path(job.key)
        # Noted before the installer starts: recovery uses them to find and stop it.
        return self.advance(job, State.INSTALLING, "running installer",
                            notes={Note.LOG: str(log_path),
                                   Note.INSTALLER: self._install_argv(job)[0],
                                   Note.INSTALL_STARTED: f"{time.time():.3f}"})

    def _install_argv(self, job: Job) -> list[str]:
        from agent.steps.install import installer_argv  # noqa: PLC0415 (see the imports)
        assert job.from_version is not None
        return installer_argv(self.node, job.command, Path(job.note(Note.KEADM) or ""),
                              Version.parse(job.from_version))

    async def _install(self, job: Job) -> Job:
        from agent.steps.install import check_result, run_installer, take_keadm_report  # noqa: PLC0415
        from agent.steps.unit import guard_unit, keep_operator_unit  # noqa: PLC0415
        from agent.steps.verify import ensure_new_running  # noqa: PLC0415
        argv = self._install_argv(job)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "EDGE_UPGRADE_ROOT": str(self.node.config.paths.root), "LANG": "C.UTF-8"}
        log_path = Path(job.note(Note.LOG) or self.node.log_path(job.key))
        backup = Path(job.note(Note.BACKUP) or "")
        started = time.time()
        async with guard_unit(self.node, backup) as guard:
            code = await run_installer(argv, log_path, job.command.timeout_seconds, env)
        check_result(code, await asyncio.to_thread(take_keadm_report, self.node, started))
        unit = await keep_operator_unit(self.node, backup, guard)
        if await ensure_new_running(self.node, job.note(Note.EDGECORE_SHA256)):
            log.warning("edgecore still ran the old binary after the installer; restarted",
                        job=job.key)
        why = "installer finished; checking health" + (f" ({unit})" if unit else "")
        return self.advance(job, State.VERIFYING, why, notes={Note.UNIT: unit} if unit else None)

    async def _verify(self, job: Job) -> Job:
        import shutil  # noqa: PLC0415 (zlib and fnmatch: 0.25 MiB an idle daemon does not need)

        from agent.steps.verify import health_gate  # noqa: PLC0415 (see the imports)
        detail = await health_gate(self.node, job.command.target, job.note(Note.EDGECORE_SHA256))
        self.node.journal.set_meta(RECORD_KEY, str(job.command.target))
        await asyncio.to_thread(shutil.rmtree, self.node.staging_dir(str(job.command.target)), True)
        return self.advance(job, State.SUCCEEDED, detail, action=(Action.UPGRADE, True))

    async def _roll_back(self, job: Job) -> Job:
        from agent.steps.install import kill_installers  # noqa: PLC0415 (see the imports)
        from agent.steps.rollback import roll_back  # noqa: PLC0415
        for program in {job.note(Note.KEADM), job.note(Note.INSTALLER)} - {None}:
            if await asyncio.to_thread(kill_installers, Path(str(program))):
                log.warning("killed a leftover installer", job=job.key, program=program)
        self._clear_own_marker(job)
        backup = job.note(Note.BACKUP)
        restore = job.note(Note.RESTORE_VERSION) or job.from_version
        cause = job.reason
        if backup is None or restore is None:
            raise RollbackError(f"{cause}; no backup recorded for this job")
        try:
            detail = await roll_back(self.node, Path(backup), Version.parse(restore))
        except AgentError as exc:
            raise RollbackError(f"{cause}; {exc.reason}") from exc
        self.node.journal.set_meta(RECORD_KEY, restore)
        return self.advance(job, State.ROLLED_BACK, f"{cause}; rolled back: {detail}",
                            action=(Action.ROLLBACK, True))

    def _clear_own_marker(self, job: Job) -> None:
        """Remove keadm's marker if our installer left it: written after we started
        it, and no keadm runs any more. Anyone else's marker stays."""
        started = job.note(Note.INSTALL_STARTED)
        try:
            mtime = self.node.keadm_marker.stat().st_mtime
        except FileNotFoundError:
            return
        if started is not None and mtime >= float(started) - 1 and not keadm_pids():
            self.node.keadm_marker.unlink(missing_ok=True)


class _Refused(PrecheckFailed):
    """Prechecks refused ``job``: the failure report carries the version they detected."""

    def __init__(self, job: Job, reason: str) -> None:
        super().__init__(reason)
        self.job = job


def _refusal(exc: BaseException) -> str | None:
    """The kind of a refusal before anything was done, for the CLI's exit code."""
    if isinstance(exc, Busy):
        return "busy"
    return "precheck" if isinstance(exc, PrecheckFailed) else None
