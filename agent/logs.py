"""structlog set-up: JSON lines with a journald priority prefix, secrets redacted.

Logs go to stderr so that stdout stays for command results (``--output
json``); journald reads both and honours the ``<N>`` prefix
(``SyslogLevelPrefix=yes``), so ``journalctl -p err`` works. On a TTY a
human-readable renderer is used instead; ``EDGE_UPGRADE_AGENT_LOG_FORMAT``
(``json`` or ``text``) overrides that guess.

Every event that names a job (``job``, bound by the runner or passed) also
carries the job's ``phase``: the state the job was last seen committing in
this process (see :func:`note_phase`). With a job log directory, each such
event is also appended, as one JSON object per line, to
``<dir>/<jobKey>.jsonl`` (``/`` in the key becomes ``_``), next to the
installer's own output in ``<jobKey>.log``; ``edge-upgrade-agent logs JOB``
prints both (:func:`show_job_log`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
import structlog.tracebacks

from agent.errors import AgentError
from agent.messages.commands import JOB_KEY_RE

SECRET_KEYS = re.compile(r"pass(word)?|secret|token|auth(orization|_config)?|credential|"
                         r"private[_-]?key|api[_-]?key", re.IGNORECASE)
PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                 re.DOTALL)
URL_CREDS = re.compile(r"(://[^/\s:@]*):[^/\s@]+@")
REDACTED = "[REDACTED]"
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

LOG_FORMAT_ENV = "EDGE_UPGRADE_AGENT_LOG_FORMAT"  # "json" or "text"; anything else: guess
STATE_EVENT = "job state"  # what Runner.advance logs, with ``state``, on every commit
INSTALLER_LOG_SUFFIX = ".log"  # the installer's output (Node.log_path)
AGENT_LOG_SUFFIX = ".jsonl"  # the agent's own lines about the job
_MAX_PHASES = 256  # jobs whose phase is remembered (one runs at a time)
_phases: dict[str, str] = {}
_phases_lock = threading.Lock()  # steps log from worker threads too


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return URL_CREDS.sub(r"\1:" + REDACTED + "@", PEM.sub(REDACTED, value))
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and SECRET_KEYS.search(k) else _scrub(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Deny-list redaction over nested values: keys that name secrets, PEM keys, URL passwords."""
    for key in list(event):
        if SECRET_KEYS.search(key):
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


# --------------------------------------------------------------------------- job phase


def note_phase(job_key: str, state: str) -> None:
    """Record the state ``job_key`` is in; later events about the job carry it as ``phase``.

    Every ``job state`` event records it by itself; the runner calls this when it
    takes a job up (a new job is ``received`` before it has logged a transition).
    """
    with _phases_lock:
        _phases.pop(job_key, None)
        _phases[job_key] = state
        while len(_phases) > _MAX_PHASES:
            del _phases[next(iter(_phases))]


def add_phase(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``phase``: the job's current state, on every event that names a job (null if unknown)."""
    job = event.get("job")
    if not isinstance(job, str) or "phase" in event:
        return event
    state = event.get("state")
    if event.get("event") == STATE_EVENT and isinstance(state, str):
        note_phase(job, state)  # the line announces the state just committed
    event["phase"] = _phases.get(job)
    return event


# --------------------------------------------------------------------------- per-job files


def job_log_files(logs_dir: Path, job_key: str) -> tuple[Path, Path]:
    """(installer output, agent lines) of a job; AgentError for anything but a job key."""
    if not JOB_KEY_RE.fullmatch(job_key):
        raise AgentError(f"not a job key: {job_key[:80]!r}")
    name = job_key.replace("/", "_")
    return logs_dir / f"{name}{INSTALLER_LOG_SUFFIX}", logs_dir / f"{name}{AGENT_LOG_SUFFIX}"


class JobLogWriter:
    """Append each event that names a job to that job's ``.jsonl`` file.

    One ``open(O_APPEND)``, one ``write`` and one ``close`` per line, no
    fsync: cheap enough for the event loop, and whole lines from concurrent
    writers do not interleave. It never raises: a failed write (full disk,
    read-only state dir) is noted as ``job_log_error`` on the event that
    goes on to stderr, and the job carries on.
    """

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        self.json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        job = event.get("job")
        if not isinstance(job, str) or not JOB_KEY_RE.fullmatch(job):
            return event
        try:
            rendered = self.json(logger, name, dict(event))
            text = rendered.decode() if isinstance(rendered, bytes) else rendered
            self._append(job_log_files(self.logs_dir, job)[1], f"{text}\n".encode())
        except Exception as exc:  # a log line must never break the job
            event["job_log_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return event

    def _append(self, path: Path, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- set-up


class _JournaldRenderer:
    def __init__(self) -> None:
        self.json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        prio = _PRIORITY.get(str(event.get("level", "info")), 6)
        rendered = self.json(logger, name, event)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return f"<{prio}>{text}"


def _json_wanted() -> bool:
    forced = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if forced in ("json", "text"):
        return forced == "json"
    return not sys.stderr.isatty()


def setup_logging(level: str = "info", *, json_output: bool | None = None,
                  job_log_dir: Path | None = None) -> None:
    """Configure structlog; ``job_log_dir`` (``<state_dir>/logs``) turns on per-job files."""
    if json_output is None:
        json_output = _json_wanted()
    renderer: Any = _JournaldRenderer() if json_output else structlog.dev.ConsoleRenderer()
    job_files: list[Any] = [JobLogWriter(job_log_dir)] if job_log_dir is not None else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_phase,
            # No frame locals: their reprs would carry secrets past the redactor.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            redact_secrets,  # after tracebacks: exception text can carry secrets too
            *job_files,  # after the redactor: the files hold no more than stderr does
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


# --------------------------------------------------------------------------- reading


def is_agent_line(line: str) -> bool:
    """An agent's line: a JSON object with an ``event`` (installer output is plain text)."""
    if not line.startswith("{"):
        return False
    try:
        data = json.loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and "event" in data


def _starts_install(line: str) -> bool:
    try:
        data = json.loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("event") == STATE_EVENT \
        and data.get("state") == "installing"


class _Tail:
    """New complete lines of a file that may not exist yet, grow, or be truncated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def lines(self, *, partial: bool = False) -> list[str]:
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # truncated: start again
                    self.offset, self.pending = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        data = self.pending + data
        complete, newline, self.pending = data.rpartition(b"\n")
        out = complete.decode(errors="replace").split("\n") if newline else []
        if partial and self.pending:
            out.append(self.pending.decode(errors="replace"))
            self.pending = b""
        return out


def _merged(agent: list[str], installer: list[str]) -> list[str]:
    """The agent's lines with the installer's output where the install started."""
    for i, line in enumerate(agent):
        if _starts_install(line):
            return agent[:i + 1] + installer + agent[i + 1:]
    return agent + installer


def show_job_log(logs_dir: Path, job_key: str, *, follow: bool = False,
                 out: TextIO | None = None, poll_seconds: float = 0.25,
                 stop: threading.Event | None = None) -> None:
    """Print a job's log: the agent's JSON lines, the installer's output in its place.

    With ``follow``, keep printing lines as they are appended, until ``stop``
    is set (or, from the CLI, until Ctrl-C).
    """
    installer_path, agent_path = job_log_files(logs_dir, job_key)
    if not installer_path.is_file() and not agent_path.is_file():
        raise AgentError(f"no log for job {job_key!r} in {logs_dir}")
    stream = out if out is not None else sys.stdout
    agent, installer = _Tail(agent_path), _Tail(installer_path)
    more = _write(stream, _merged(agent.lines(partial=not follow),
                                  installer.lines(partial=not follow)))
    while more and follow and not (stop is not None and stop.is_set()):
        if stop is not None:
            stop.wait(poll_seconds)
        else:
            time.sleep(poll_seconds)
        # Within one poll, installer output comes before the agent's next state line.
        more = _write(stream, installer.lines() + agent.lines())


def _write(stream: TextIO, lines: list[str]) -> bool:
    """Print ``lines``; False once the reader has gone (``logs JOB | head``)."""
    try:
        if lines:
            stream.write("".join(f"{line}\n" for line in lines))
            stream.flush()
    except BrokenPipeError:
        if stream is sys.stdout:  # or Python's exit-time flush complains again
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True
