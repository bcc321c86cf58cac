"""Intake: raw bytes from a transport to a journalled decision.

Two layers. ``Parser`` is the gate: bytes to a validated, authenticated
Command. Order matters: the size cap and JSON decoding first, then the
signature (when present, or required), then whichever of the accepted
shapes the payload has: KubeEdge's own messages, or our envelope.

``Intake`` is the command policy, applied to each parsed command: accept
(journal a new job), replay (refuse a signed command whose job already
ran), confirm, cancel, or reject (journal a rejection with its report).
The daemon only moves messages and acks them once intake has journalled.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.config import Config
from agent.errors import Busy, InvalidCommand
from agent.messages.commands import (
    Command,
    Operation,
    load_json_object,
    parse_envelope_dict,
    peek_job_name,
)
from agent.messages.kubeedge import parse_kubeedge
from agent.messages.reports import build_report
from agent.node import Node
from agent.runner import Runner
from agent.security.signing import is_signed, load_public_keys, verify
from agent.states import NODE_TOUCHED
from agent.transport.base import Inbound
from agent.versions import ImageRef

if TYPE_CHECKING:
    # Only a type here: cryptography loads with the first key (agent.security.signing).
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger("agent.intake")
REJECTIONS_PER_MINUTE = 60


@dataclass(frozen=True)
class Accepted:
    command: Command
    command_id: str | None = None  # signed commands only: for replay detection
    expires_at: float | None = None


class Parser:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys: Mapping[str, Ed25519PublicKey] = {}
        keys_dir = Path(config.security.trusted_keys_dir)
        if config.security.require_signed_commands or keys_dir.is_dir():
            self.keys = load_public_keys(keys_dir)

    def parse(self, raw: bytes, source: str) -> Accepted:
        data = load_json_object(raw, self.config.transport.max_message_bytes)
        command_id = expires_at = None
        if is_signed(data):
            verified = verify(data, self.keys, now=time.time(),
                              max_skew_seconds=self.config.security.max_clock_skew_seconds)
            data, command_id, expires_at = (verified.payload, verified.command_id,
                                            verified.expires_at)
        elif self.config.security.require_signed_commands:
            raise InvalidCommand("unsigned command (signatures are required)")
        command = parse_kubeedge(data, self.config, source)
        if command is None:
            command = parse_envelope_dict(data, self.config, source)
        return Accepted(command, command_id, expires_at)


class Intake:
    def __init__(self, node: Node, runner: Runner, parser: Parser,
                 enqueue: Callable[[str], None], running: Callable[[], str | None]) -> None:
        self.journal = node.journal
        self.config = node.config
        self.lock = node.lock
        self.runner = runner
        self.parser = parser
        self.enqueue = enqueue  # hands a job key to the worker
        self.running = running  # the job key the worker runs now, if any
        self.rejected_total = 0  # since start, for presence: every rejection counts
        self.rejected_unreported = 0  # over the rate limit: counted, not reported
        self._recent: list[float] = []  # when the last minute's rejection reports went
        self._resent: dict[str, float] = {}

    def accept(self, msg: Inbound) -> Command | None:
        """Parse, authenticate, validate, dedupe and journal one command.

        Returns a command to rehearse (which intake journals before the ack).
        """
        try:
            accepted = self.parser.parse(msg.payload, msg.source)
            op = accepted.command.operation
            if accepted.command.dry_run and op in (Operation.ROLLBACK, Operation.RESOLVE):
                raise InvalidCommand(f"{op.value} has no dry run; use check or status")
        except InvalidCommand as exc:
            self.reject(msg, exc.reason)
            return None
        cmd = accepted.command
        if self._replayed(accepted):
            self.reject(msg, f"replayed command {accepted.command_id} (job {cmd.key} already ran)")
            return None
        if cmd.operation == Operation.CONFIRM:
            self._confirm(cmd)
        elif cmd.operation == Operation.CANCEL:
            self._cancel(cmd)
        elif cmd.dry_run or cmd.operation == Operation.CHECK:
            return replace(cmd, dry_run=True)
        else:
            job, new = self.runner.submit(cmd)
            if new:
                self.enqueue(job.key)
            elif job.terminal:
                self.runner.resend_final(job)
            else:
                log.info("duplicate command ignored while its job runs", job=job.key)
        return None

    def _replayed(self, accepted: Accepted) -> bool:
        """A signed command seen before whose job is over is a replay.

        One seen before whose job still runs (or was never journalled) is the
        broker redelivering a message we had not acked: not an attack.
        """
        if accepted.command_id is None or accepted.expires_at is None:
            return False
        key = accepted.command.key
        first = self.journal.mark_seen(accepted.command_id, key, accepted.expires_at)
        job = self.journal.get(key) if first is not None else None
        return first is not None and (first != key or (job is not None and job.terminal))

    def _confirm(self, cmd: Command) -> None:
        job = self.journal.get(cmd.key)
        if job is None:
            log.warning("confirm for an unknown job ignored", job=cmd.key)
            return
        try:
            self.runner.confirm(job)
        except InvalidCommand as exc:
            log.warning("confirm ignored", job=cmd.key, reason=exc.reason)
            return
        self.enqueue(job.key)

    def _cancel(self, cmd: Command) -> None:
        job = self.journal.get(cmd.key)
        if job is None:
            log.warning("cancel for an unknown job ignored", job=cmd.key)
        elif job.key == self.running() and job.state not in NODE_TOUCHED:
            self.runner.request_cancel(job.key)  # the worker acts between steps
        elif job.terminal or job.state in NODE_TOUCHED:
            # Answered now: a refusal only queues a report, it cannot race a state write.
            self.runner.cancel(job)
        else:
            try:
                # Another agent process (a CLI upgrade) may be driving this job.
                with self.lock:
                    self.runner.cancel(job)
            except Busy as exc:
                why = f"cancel refused: {exc.reason}"
                self.journal.event(job.key, lambda j: build_report(replace(j, reason=why)))

    def reject(self, msg: Inbound, reason: str) -> None:
        """Answer every rejected message with a report the controller can see.

        The key is ``rejected:<jobName>:<hash>``: a colon never appears in a
        job key, so a rejection can neither take a valid job's key nor be
        answered by one; the hash of the message tells two different bad
        messages with one name apart, and a message whose name cannot be read
        gets ``rejected:unnamed:<hash>``. The same bytes again get the first
        answer again, at most once a minute; beyond ``REJECTIONS_PER_MINUTE``
        new rejections a minute only the counter in presence moves.
        """
        name = peek_job_name(msg.payload)
        self.rejected_total += 1
        # Not job=: that key opens a per-job log file, and a flood of bad commands
        # with made-up names (rate-limited or not) would leave a file for each.
        log.warning("command rejected", source=msg.source, reason=reason, job_name=name)
        key = f"rejected:{name or 'unnamed'}:{hashlib.sha256(msg.payload).hexdigest()[:12]}"
        now = time.monotonic()
        existing = self.journal.get(key)
        if existing is not None:
            # Forget resends over a minute old, so a stream of repeats cannot grow this.
            self._resent = {k: t for k, t in self._resent.items() if now - t < 60}
            if key not in self._resent:
                self._resent[key] = now
                self.runner.resend_final(existing)
            return
        self._recent = [t for t in self._recent if now - t < 60]
        if len(self._recent) >= REJECTIONS_PER_MINUTE:
            self.rejected_unreported += 1
            return
        self._recent.append(now)
        cmd = Command(Operation.UPGRADE, name or "", self.config.node_name, None,
                      ImageRef(self.config.images.default_repo), source=msg.source)
        self.runner.reject(cmd, reason, key)
