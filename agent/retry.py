"""One bounded retry policy for TransientError (tenacity).

Explicit stop and wait, and retry only on TransientError: tenacity's defaults
retry forever with no wait, and its "not exception type" predicates would
retry CancelledError and break shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from agent.errors import TransientError

T = TypeVar("T")
log = structlog.get_logger("agent.retry")


def _before_sleep(what: str) -> Callable[[RetryCallState], None]:
    def hook(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.warning("transient error, retrying", what=what, attempt=state.attempt_number,
                    sleep_s=round(sleep, 2), error=getattr(exc, "reason", repr(exc)))
    return hook


async def retry_transient(what: str, call: Callable[[], Awaitable[T]], *, attempts: int = 4,
                          max_seconds: float = 120, max_wait: float = 15) -> T:
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(max_seconds),
        wait=wait_exponential_jitter(multiplier=0.5, max=max_wait, jitter=0.5),
        retry=retry_if_exception_type(TransientError),
        before_sleep=_before_sleep(what),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
