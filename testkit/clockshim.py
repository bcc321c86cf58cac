"""Run the agent with a wall clock that a test can make jump.

``python -m testkit.clockshim <agent args>`` offsets ``time.time``,
``time.time_ns`` and ``datetime.now``/``utcnow`` by the seconds written in
``$EDGE_CLOCK_OFFSET_FILE`` (read at each call), the way ``settimeofday``
moves CLOCK_REALTIME; ``time.monotonic`` is left alone, as the kernel leaves
CLOCK_MONOTONIC. libfaketime would do this below Python, but with
``DONT_FAKE_MONOTONIC`` its ``clock_nanosleep`` fails every ``time.sleep``
with EINVAL (Debian's 0.9.10), and without it the monotonic clock jumps too,
which no real clock step does.
"""

from __future__ import annotations

import datetime as _dt
import os
import runpy
import sys
import time
from typing import Any

_real_time, _real_time_ns = time.time, time.time_ns
_FILE = os.environ.get("EDGE_CLOCK_OFFSET_FILE", "")


def offset() -> float:
    try:
        with open(_FILE, encoding="ascii") as f:
            return float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def _time() -> float:
    return _real_time() + offset()


def _time_ns() -> int:
    return _real_time_ns() + int(offset() * 1e9)


class _Datetime(_dt.datetime):
    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return _dt.datetime.fromtimestamp(_time(), tz)

    @classmethod
    def utcnow(cls) -> Any:
        return _dt.datetime.fromtimestamp(_time(), _dt.timezone.utc).replace(tzinfo=None)


def install() -> None:
    time.time = _time
    time.time_ns = _time_ns
    _dt.datetime = _Datetime  # type: ignore[misc]  # before the agent imports it


if __name__ == "__main__":
    install()
    sys.argv = ["agent", *sys.argv[1:]]
    runpy.run_module("agent", run_name="__main__", alter_sys=True)
