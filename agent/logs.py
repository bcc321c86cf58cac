"""structlog set-up: JSON lines with a journald priority prefix, secrets redacted.

Logs go to stderr so that stdout stays for command results (``--output
json``); journald reads both and honours the ``<N>`` prefix
(``SyslogLevelPrefix=yes``), so ``journalctl -p err`` works. On a TTY a
human-readable renderer is used instead.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
import structlog.tracebacks

SECRET_KEYS = re.compile(r"pass(word)?|secret|token|auth(orization|_config)?|credential|"
                         r"private[_-]?key|api[_-]?key", re.IGNORECASE)
PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                 re.DOTALL)
URL_CREDS = re.compile(r"(://[^/\s:@]*):[^/\s@]+@")
REDACTED = "[REDACTED]"
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


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


class _JournaldRenderer:
    def __init__(self) -> None:
        self.json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        prio = _PRIORITY.get(str(event.get("level", "info")), 6)
        rendered = self.json(logger, name, event)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return f"<{prio}>{text}"


def setup_logging(level: str = "info", *, json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = _JournaldRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # No frame locals: their reprs would carry secrets past the redactor.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            redact_secrets,  # after tracebacks: exception text can carry secrets too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
