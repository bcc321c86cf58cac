"""The transport interface: commands in, reports out.

The spool transport (a directory of JSON files) and the MQTT one implement
it; intake, journal and reporter never see which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

# What this node runs now (version, labels, current job), for the cloud side.
Presence = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Inbound:
    source: str  # where it came from, for logs and reports
    payload: bytes
    ack: Callable[[], Awaitable[None]]  # called only after the journal commit


class Transport(Protocol):
    def commands(self) -> AsyncIterator[Inbound]: ...

    async def publish(self, report: dict[str, Any]) -> None:
        """Deliver one report; return only once it is durably accepted, else raise."""

    async def run(self) -> None:
        """Keep the connection up (reconnects included); runs for the daemon's life."""

    async def update_presence(self) -> None:
        """Tell the cloud side what this node runs now (best effort)."""
