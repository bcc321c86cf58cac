"""``within``: asyncio.wait_for without its lost-cancellation race.

Before Python 3.12, ``asyncio.wait_for`` swallows a cancellation that arrives
as the awaited thing completes (CPython gh-86296): the task goes on as if never
cancelled. The daemon's loops (reporter, worker) then outlived their cancel at
stop and held the process until systemd's SIGKILL; the fault matrix's SIGTERM
cells hit it about once in ten. ``asyncio.wait`` never swallows one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float) -> T:
    """``await aw`` for at most ``seconds``; ``asyncio.TimeoutError`` after that
    (``aw`` is then cancelled). A cancellation of the caller always propagates."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise asyncio.TimeoutError
    return task.result()
