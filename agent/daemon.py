"""The long-running service: transport, intake, job worker, reporter and watchdog.

READY=1 is sent once the config is loaded and crash recovery is done, not
when a broker answers: an offline node must still start and roll back.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import structlog

from agent import __version__, lean, metrics
from agent.backends import transport_plugin
from agent.config import Config
from agent.errors import AgentError, Busy, JournalError
from agent.intake import Intake, Parser
from agent.messages.commands import Command
from agent.messages.kubeedge import machine_arch
from agent.node import Node, build_node
from agent.runner import Runner
from agent.systemd_notify import sd_notify, watchdog_interval
from agent.timeouts import within
from agent.transport.base import Inbound, Transport

log = structlog.get_logger("agent.daemon")
BUSY_RETRY_SECONDS = 2.0
REPORT_RETRY_MAX_SECONDS = 30.0
STOP_GRACE_SECONDS = 5.0


class Daemon:
    def __init__(self, node: Node, parser: Parser) -> None:
        self.node = node
        self.runner = Runner(node)
        self.transport: Transport | None = None
        self.queue: asyncio.Queue[str] = asyncio.Queue()  # keys of jobs to run
        self.reports_pending = asyncio.Event()
        self.runner.on_report = self.reports_pending.set
        self.running: str | None = None
        # The command policy; the daemon only moves messages and acks them after it.
        self.intake = Intake(node, self.runner, parser, self.queue.put_nowait,
                             lambda: self.running)

    @property
    def link(self) -> Transport:
        assert self.transport is not None
        return self.transport

    # -- commands in --------------------------------------------------------

    async def take_commands(self) -> None:
        async for msg in self.link.commands():
            # Retried here, not left to the transport: a broker redelivers an unacked
            # command only after a reconnect, and with a receive window of one
            # (transport/mqtt.py) it sends nothing else until then.
            while True:
                if await self._take(msg):
                    break
                await asyncio.sleep(BUSY_RETRY_SECONDS)
            # The command is journalled (or its rejection is), so it may leave the transport.
            await msg.ack()
            self.reports_pending.set()

    async def _take(self, msg: Inbound) -> bool:
        """Hand one message to intake; False if the journal could not take it."""
        try:
            rehearsal = self.intake.accept(msg)
            if rehearsal is not None:
                await self._rehearse(rehearsal)
        except JournalError as exc:
            log.error("journal write failed; command kept for retry", error=exc.reason)
            return False
        except Exception as exc:
            # A bug must not stop intake or make one message a poison pill.
            log.exception("unexpected error handling a command", source=msg.source)
            self.intake.reject(msg, f"internal error: {type(exc).__name__}")
        return True

    async def _rehearse(self, cmd: Command) -> None:
        existing = self.node.journal.get(cmd.key)
        if existing is not None:
            if existing.terminal:
                self.runner.resend_final(existing)
            return
        # Imported here: the plan pulls in every precheck, the doctor and tenacity,
        # ~0.9 MiB an idle daemon need not hold (issue 10).
        from agent.execute import rehearse  # noqa: PLC0415

        await rehearse(self.node, cmd)

    # -- jobs ---------------------------------------------------------------

    async def worker(self) -> None:
        while True:
            item = await self.queue.get()
            job = self.node.journal.get(item)
            if job is None or job.terminal:
                continue
            self.running = item
            await self.link.update_presence()
            try:
                with self.node.lock:
                    await self.runner.run(job)
                await metrics.current().after_job()  # edgecore's version, the textfile
            except Busy as exc:
                log.info("waiting for the lock", job=item, reason=exc.reason)
                await asyncio.sleep(BUSY_RETRY_SECONDS)
                self.queue.put_nowait(item)
            except Exception as exc:
                # A bug in a step: treat it like a crash of that step, so the
                # recovery table and the loop breaker apply, and keep serving.
                log.exception("job handler failed", job=item)
                current = self.node.journal.get(item)
                if current is not None and not current.terminal:
                    self.runner.resume(current, f"internal error {type(exc).__name__}")
                    await asyncio.sleep(BUSY_RETRY_SECONDS)
                    self.queue.put_nowait(item)
            finally:
                self.running = None
                self.reports_pending.set()
            await self.link.update_presence()

    def recover(self) -> None:
        with self.node.lock:
            for job in self.runner.recover():
                self.queue.put_nowait(job.key)

    async def presence(self) -> dict[str, Any]:
        detected = await self.node.probe.detect()
        return {
            "online": True,
            "nodeName": self.node.config.node_name,
            "edgecoreVersion": str(detected.version) if detected else None,
            "versionSource": detected.source if detected else None,
            "labels": dict(self.node.config.labels),
            "agentVersion": __version__,
            # The GOARCH name: a controller picks a per-arch digest (imageDigestGatter) by it.
            "arch": machine_arch(),
            "currentJob": self.running,
            # Every rejected message counts, reported or over the rate limit.
            "rejectedCommands": self.intake.rejected_total,
            "rejectedUnreported": self.intake.rejected_unreported,
        }

    # -- reports out --------------------------------------------------------

    async def reporter(self) -> None:
        delay = 0.5
        while True:
            # Cleared before reading, so a report queued while we publish wakes us again.
            self.reports_pending.clear()
            batch = self.node.journal.outbox()
            for outbox_id, report in batch:
                try:
                    await self.link.publish(report)
                except (OSError, AgentError) as exc:
                    log.warning("report delivery failed; will retry", error=str(exc),
                                retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, REPORT_RETRY_MAX_SECONDS)
                    break
                # Deleted only after the broker's PUBACK (or the file's fsync).
                self.node.journal.ack(outbox_id)
                delay = 0.5
            else:
                if batch:
                    continue  # a backlog may hold more than one batch
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(self.reports_pending.wait(), 5)

    async def watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def make_transport(config: Config, daemon: Daemon) -> Transport:
    t = config.transport
    return transport_plugin(t.kind).from_config(config, t.settings, daemon.presence)


async def _supervise(*coros: Coroutine[Any, Any, None]) -> None:
    """Run until the first task ends; cancel the rest (a 3.10-compatible TaskGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        # Bounded: aiomqtt's __aexit__ waits for paho's on_disconnect without a
        # timeout, and a disconnect racing the cancel can leave it waiting for
        # good (the fault matrix's SIGTERM cells, about 1 stop in 10). Presence
        # already says offline, the broker's will covers the rest, and the
        # journal is committed: an orderly stop must end, not hang until
        # systemd's SIGKILL.
        _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        if stuck:
            log.warning("tasks still running at stop; leaving them",
                        tasks=sorted(repr(t.get_coro()) for t in stuck))


async def run_daemon(config: Config) -> int:
    node = build_node(config)
    daemon = Daemon(node, Parser(config))
    daemon.transport = make_transport(config, daemon)
    recorder = metrics.enable(config, node, rejected=lambda: daemon.intake.rejected_total)
    while True:
        try:
            daemon.recover()
            break
        except Busy as exc:
            log.info("recovery waits for the lock", reason=exc.reason)
            await asyncio.sleep(BUSY_RETRY_SECONDS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sd_notify("READY=1\nSTATUS=ready")
    lean.release_memory()  # start-up's freed heap back to the kernel (agent/lean.py)
    for note in config.deprecations:
        log.warning("deprecated config key", note=note)
    log.info("agent ready", version=__version__, node=config.node_name,
             transport=config.transport.kind)
    tasks = [daemon.link.run(), daemon.take_commands(), daemon.worker(), daemon.reporter(),
             stop.wait()]
    if (interval := watchdog_interval()) is not None:
        tasks.append(daemon.watchdog(interval))
    if recorder is not None:
        tasks.append(recorder.run())
    try:
        await _supervise(*tasks)  # type: ignore[arg-type]
    finally:
        sd_notify("STOPPING=1")
        metrics.disable()
        node.close()
        log.info("agent stopped")
    return 0
