"""Prometheus metrics: an opt-in endpoint and a node_exporter textfile.

Off by default, and then free: the hooks (runner, daemon, MQTT transport)
call the module's current recorder, a :class:`NullRecorder` whose methods do
nothing, and ``prometheus_client`` is never imported. ``metrics.listen`` or
``metrics.textfile`` installs a :class:`NodeMetrics` instead (:func:`enable`).

What an enabled recorder costs when idle: nothing but one textfile refresh
per ``metrics.textfile_interval_seconds``. The endpoint is an asyncio server
on the daemon's own loop (no thread, no poll; ``prometheus_client``'s HTTP
server wakes twice a second), and every value is either kept from the event
that changed it (edgecore version, broker connection) or read when it is
asked for (outbox, backups, job counts), in a worker thread with a read-only
SQLite connection of its own, since the journal's connection belongs to the
loop's thread.

The job counts and the last result are counted from the journal, and the
phase histogram is kept in the journal's ``meta`` table: they survive a
restart, and the daemon and a CLI job, which both write the textfile, write
the same values (counters that went back and forth between two processes
would read as resets, and fire the failure alert).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import __version__
from agent.errors import AgentError
from agent.states import TERMINAL, State

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from agent.adapters.edgecore import Detected
    from agent.config import Config
    from agent.node import Node

log = structlog.get_logger("agent.metrics")

# The states that have a step of their own in the runner (agent/runner.py).
PHASES = tuple(s.value for s in State if s not in TERMINAL and s != State.AWAITING_CONFIRMATION)
RESULTS = tuple(s.value for s in State if s in TERMINAL)
# edge_upgrade_last_result: outcomes of jobs that ran (a rejection is counted, not a result).
LAST_RESULTS = tuple(r for r in RESULTS if r != State.REJECTED.value)
# 0.1 s (an intake check) to 30 min (a slow pull or keadm on a weak node).
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
PHASE_KEY = "metrics:phase_seconds"  # journal meta: the phase histogram, as JSON
# Series present from the start, at 0, so that the first failure is an increase
# Prometheus can see (a series that appears at 1 has no increase).
EXPECTED_JOBS = (
    *(("upgrade", r) for r in RESULTS),
    ("rollback", "rolled_back"), ("rollback", "failed"), ("rollback", "rollback_failed"),
    ("prepull", "succeeded"), ("prepull", "failed"),
    ("resolve", "succeeded"), ("resolve", "failed"),
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_SECONDS = 10.0


class Recorder(Protocol):
    """What the hooks call; both implementations below."""

    @property
    def enabled(self) -> bool: ...

    def phase(self, phase: str, seconds: float) -> None:
        """A state's step took ``seconds`` (the runner)."""

    def broker(self, connected: bool) -> None:
        """The broker connection went up or down (the MQTT transport)."""

    async def after_job(self) -> None:
        """A job ended: look at edgecore's version again, rewrite the textfile."""


class NullRecorder:
    """Metrics off: every hook is a no-op."""

    enabled = False

    def phase(self, phase: str, seconds: float) -> None:
        return None

    def broker(self, connected: bool) -> None:
        return None

    async def after_job(self) -> None:
        return None


_current: Recorder = NullRecorder()


def current() -> Recorder:
    return _current


def enable(config: Config, node: Node, *, serve: bool = True,
           rejected: Callable[[], int] | None = None) -> NodeMetrics | None:
    """Install a recorder for ``node`` if ``config.metrics`` asks for one.

    ``serve=False`` (a CLI job) keeps only the textfile; ``rejected`` reads the
    daemon's count of rejected commands.
    """
    global _current  # noqa: PLW0603 (the hooks' one switch)
    settings = config.metrics
    if not (settings.textfile or (serve and settings.listen)):
        return None
    recorder = NodeMetrics(config, node, listen=settings.listen if serve else None,
                           rejected=rejected)
    if serve:  # the daemon; a spool is a local directory: "connected", never reconnects
        recorder.broker(config.transport.kind == "spool")
    _current = recorder
    return recorder


def disable() -> None:
    global _current  # noqa: PLW0603
    _current = NullRecorder()


def flush() -> None:
    """The CLI's one textfile write at the end of a job, then metrics off again."""
    recorder = _current
    disable()
    if isinstance(recorder, NodeMetrics):
        asyncio.run(recorder.after_job())


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    """Time one step; a cancelled step (daemon stop) is no duration."""
    recorder = _current
    if not recorder.enabled:
        yield
        return
    started = time.monotonic()
    try:
        yield
    except Exception:
        recorder.phase(phase, time.monotonic() - started)
        raise
    recorder.phase(phase, time.monotonic() - started)


class NodeMetrics:
    """Metrics on: the collector, the endpoint and the textfile of one node."""

    enabled = True

    def __init__(self, config: Config, node: Node, *, listen: tuple[str, int] | None = None,
                 rejected: Callable[[], int] | None = None) -> None:
        from prometheus_client.core import (  # noqa: PLC0415 (only when metrics are on)
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        self._counter, self._gauge, self._histogram = (
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
        self.config = config
        self.node = node
        self.listen = listen
        self.textfile = Path(config.metrics.textfile) if config.metrics.textfile else None
        self.rejected = rejected
        # Kept from events on the loop; read by the collector in another thread
        # (single attribute reads and writes).
        self._edgecore: tuple[str, str] | None = None
        self._connected: bool | None = None
        self._connects = 0
        self._reconnects = 0

    # -- hooks (the event loop's thread) ---------------------------------------

    def phase(self, phase: str, seconds: float) -> None:
        """Add one observation to the histogram in the journal (under the job lock)."""
        journal = self.node.journal
        try:
            stored = _load_phases(journal.get_meta(PHASE_KEY))
            counts, total = stored.get(phase, ([0] * (len(BUCKETS) + 1), 0.0))
            index = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
            counts[index] += 1
            stored[phase] = (counts, total + seconds)
            journal.set_meta(PHASE_KEY, json.dumps(
                {"buckets": list(BUCKETS),
                 "phases": {p: {"counts": c, "sum": s} for p, (c, s) in stored.items()}},
                sort_keys=True))
        except (AgentError, sqlite3.Error) as exc:
            log.warning("phase duration not recorded", phase=phase, error=str(exc))

    def broker(self, connected: bool) -> None:
        if connected:
            if self._connects:
                self._reconnects += 1
            self._connects += 1
        self._connected = connected

    async def after_job(self) -> None:
        try:
            self.edgecore(await self.node.probe.detect())
        except Exception:  # never a reason for a job or the daemon to fail
            log.exception("metrics: edgecore version detection failed")
        if self.textfile is not None:
            await asyncio.to_thread(self.write_textfile)

    def edgecore(self, detected: Detected | None) -> None:
        self._edgecore = (str(detected.version), detected.source) if detected else \
            ("unknown", "none")

    # -- the daemon's task -------------------------------------------------------

    async def run(self) -> None:
        """Serve GET /metrics and keep the textfile fresh, for the daemon's life."""
        server = await self._start_server() if self.listen is not None else None
        try:
            await self.after_job()
            if self.textfile is None:
                await asyncio.Event().wait()
            while True:
                await asyncio.sleep(self.config.metrics.textfile_interval_seconds)
                await asyncio.to_thread(self.write_textfile)
        finally:
            if server is not None:
                server.close()

    async def _start_server(self) -> asyncio.Server | None:
        assert self.listen is not None
        host, port = self.listen
        try:
            server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            # Upgrades and rollbacks matter more than metrics: keep serving those.
            # The missing endpoint shows as `up == 0` (the EdgeUpgradeAgentDown alert).
            log.error("metrics endpoint not started", listen=f"{host}:{port}",
                      error=exc.strerror or str(exc))
            return None
        log.info("metrics endpoint listening", listen=f"{host}:{port}")
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 request per connection: GET or HEAD /metrics."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), MAX_REQUEST_SECONDS)
            method, target = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""][:2]
            body, status, ctype = b"", "200 OK", CONTENT_TYPE
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif target.split(b"?", 1)[0] != b"/metrics":
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                try:
                    body = await asyncio.to_thread(self.render)
                except Exception:
                    log.exception("metrics collection failed")
                    status, body, ctype = "500 Internal Server Error", b"", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- output (any thread) -------------------------------------------------------

    def render(self) -> bytes:
        from prometheus_client.exposition import generate_latest  # noqa: PLC0415

        return generate_latest(self)

    def write_textfile(self) -> None:
        """Temp file in the same directory, fsync, rename, fsync the directory."""
        from agent.adapters.files import atomic_write  # noqa: PLC0415

        assert self.textfile is not None
        path = self.textfile
        try:
            # node_exporter runs as another user; the temp file is never *.prom (never read)
            atomic_write(path, self.render(), 0o644)
        except OSError as exc:
            log.error("metrics textfile not written", path=str(path),
                      error=exc.strerror or str(exc))

    def collect(self) -> list[Metric]:
        """Every family, read now (prometheus_client's Collector protocol)."""
        counter, gauge = self._counter, self._gauge
        out: list[Metric] = []
        info = gauge("edge_upgrade_agent_info", "The agent's version and node name.",
                     labels=["version", "node"])
        info.add_metric([__version__, self.config.node_name], 1)
        out.append(info)
        out.append(gauge("edge_upgrade_agent_heartbeat_timestamp_seconds",
                         "When these values were read (a stale one: the agent is down).",
                         value=time.time()))
        if self._edgecore is not None:
            edgecore = gauge("edge_upgrade_edgecore_info",
                             "The edgecore version detected on this node, and its source.",
                             labels=["version", "source"])
            edgecore.add_metric(list(self._edgecore), 1)
            out.append(edgecore)
        out += self._journal_families()
        out += self._backup_families()
        if self._connected is not None:
            out.append(gauge("edge_upgrade_broker_connected",
                             "1 while the transport is connected (always 1 for spool).",
                             value=int(self._connected)))
            out.append(counter("edge_upgrade_broker_reconnects",
                               "Broker connections made after the first one.",
                               value=self._reconnects))
        if self.rejected is not None:
            out.append(counter("edge_upgrade_rejected_commands",
                               "Commands refused at intake since the agent started.",
                               value=self.rejected()))
        return out

    def _journal_families(self) -> list[Metric]:
        try:
            with _read_only(self.node.journal.path) as db:
                jobs = db.execute(
                    "SELECT json_extract(command, '$.operation'), state, COUNT(*) FROM jobs"
                    f" WHERE state IN ({', '.join('?' * len(RESULTS))})"
                    " AND NOT coalesce(json_extract(command, '$.dry_run'), 0)"
                    " GROUP BY 1, 2", RESULTS).fetchall()
                last = db.execute(
                    "SELECT state, updated_at FROM jobs"
                    f" WHERE state IN ({', '.join('?' * len(LAST_RESULTS))})"
                    " AND NOT coalesce(json_extract(command, '$.dry_run'), 0)"
                    " ORDER BY updated_at DESC, rowid DESC LIMIT 1", LAST_RESULTS).fetchone()
                depth, oldest = db.execute(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
                row = db.execute("SELECT v FROM meta WHERE k=?", (PHASE_KEY,)).fetchone()
        except sqlite3.Error as exc:
            log.warning("metrics: journal not readable", error=str(exc))
            return []
        counter, gauge = self._counter, self._gauge
        counts = {(op, result): 0 for op, result in EXPECTED_JOBS}
        counts.update({(str(op), str(state)): int(n) for op, state, n in jobs})
        total = counter("edge_upgrade_jobs", "Jobs that reached a final state, by result.",
                        labels=["operation", "result"])
        for (op, result), n in sorted(counts.items()):
            total.add_metric([op, result], n)
        out: list[Metric] = [total]
        last_result = gauge("edge_upgrade_last_result",
                            "1 for the final state of the newest job that ran, 0 for the others.",
                            labels=["result"])
        for result in LAST_RESULTS:
            last_result.add_metric([result], int(last is not None and last[0] == result))
        out.append(last_result)
        if last is not None:
            out.append(gauge("edge_upgrade_last_result_timestamp_seconds",
                             "When the newest job that ran reached its final state.",
                             value=float(last[1])))
        out.append(gauge("edge_upgrade_outbox_reports",
                         "Reports in the journal's outbox, not yet delivered.", value=depth))
        out.append(gauge("edge_upgrade_outbox_oldest_age_seconds",
                         "Age of the oldest undelivered report (0: the outbox is empty).",
                         value=max(0.0, time.time() - oldest) if oldest is not None else 0.0))
        out.append(self._phase_family(_load_phases(row[0] if row else None)))
        return out

    def _phase_family(self, stored: dict[str, tuple[list[int], float]]) -> Metric:
        family = self._histogram("edge_upgrade_phase_duration_seconds",
                                 "Time spent in each state's step.", labels=["phase"])
        for phase in sorted(set(PHASES) | set(stored)):
            counts, total = stored.get(phase, ([0] * (len(BUCKETS) + 1), 0.0))
            cumulative, buckets = 0, []
            for bound, n in zip((*(str(b) for b in BUCKETS), "+Inf"), counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric([phase], buckets, total)
        return family

    def _backup_families(self) -> list[Metric]:
        from agent.steps.backup import list_backups  # noqa: PLC0415 (import order)

        root = self.node.backup_root
        try:
            versions = list_backups(root)
            size = sum(_tree_bytes(root / str(v)) for v in versions)
        except OSError as exc:
            log.warning("metrics: backups not readable", error=str(exc))
            return []
        gauge = self._gauge
        return [gauge("edge_upgrade_backups", "Whole backups kept under the backup root.",
                      value=len(versions)),
                gauge("edge_upgrade_backup_bytes", "Bytes of the files of those backups.",
                      value=size)]


def _load_phases(text: str | None) -> dict[str, tuple[list[int], float]]:
    """The stored histogram; one with other buckets (an older agent) starts again."""
    if not text:
        return {}
    try:
        data: dict[str, Any] = json.loads(text)
        if data.get("buckets") != list(BUCKETS):
            return {}
        return {str(phase): ([int(n) for n in v["counts"]], float(v["sum"]))
                for phase, v in data.get("phases", {}).items()
                if len(v["counts"]) == len(BUCKETS) + 1}
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("metrics: stored phase histogram unreadable; starting again")
        return {}


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of this thread's own that cannot write (WAL: never blocks the writer)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        yield db
    finally:
        db.close()


def _tree_bytes(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            total += _tree_bytes(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_size
    return total
