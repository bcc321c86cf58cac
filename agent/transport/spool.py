"""A local spool transport: command files in, report files out.

For hosts without a broker and for rehearsals: drop ``*.json`` command files
into the spool dir; each report appears as ``<job>-<seq>.json`` in the
outbox dir, written atomically.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.transport.base import Inbound, Presence

if TYPE_CHECKING:
    from agent.config import Config
    from agent.config_reader import Section


@dataclass(frozen=True)
class SpoolSettings:
    """``transport.spool``: node paths (None: under the state dir) and the scan interval."""

    dir: str | None = None  # None: <state_dir>/spool
    outbox_dir: str | None = None  # None: <state_dir>/reports
    poll_interval_seconds: float = 0.5


class SpoolTransport:
    @staticmethod
    def parse_settings(section: Section) -> SpoolSettings:
        settings = SpoolSettings(section.path("dir", None), section.path("outbox_dir", None),
                                 section.number("poll_interval_seconds", 0.5, 0.01, 60))
        section.done()
        return settings

    @classmethod
    def from_config(cls, config: Config, settings: SpoolSettings,
                    presence: Presence) -> SpoolTransport:
        def where(path: str | None, default: str) -> Path:
            return config.paths.node(path) if path else config.state_dir / default

        return cls(where(settings.dir, "spool"), where(settings.outbox_dir, "reports"),
                   settings.poll_interval_seconds, config.transport.max_message_bytes)

    @staticmethod
    def check_files(settings: SpoolSettings) -> None:
        return None  # directories are made at start

    def __init__(self, spool_dir: Path, outbox_dir: Path, poll_interval: float,
                 max_bytes: int) -> None:
        self.spool_dir = spool_dir
        self.outbox_dir = outbox_dir
        self.poll_interval = poll_interval
        self.max_bytes = max_bytes
        # agent/adapters/files.py only once this transport is used: config.py
        # imports this module for SpoolSettings in every daemon (issue 10).
        from agent.adapters.files import ensure_dir  # noqa: PLC0415

        spool_dir.mkdir(parents=True, exist_ok=True)
        ensure_dir(outbox_dir)  # reports are durable: so is their directory

    async def commands(self) -> AsyncIterator[Inbound]:
        while True:
            for path in sorted(self.spool_dir.glob("*.json"), key=_mtime):
                try:
                    with path.open("rb") as f:
                        # Read one byte past the cap so oversize is detected, not truncated.
                        raw = f.read(self.max_bytes + 1)
                except FileNotFoundError:
                    continue

                async def ack(p: Path = path) -> None:
                    p.unlink(missing_ok=True)

                yield Inbound(f"spool:{path.name}", raw, ack)
            await asyncio.sleep(self.poll_interval)

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing to keep up: a local directory

    async def update_presence(self) -> None:
        return None

    async def publish(self, report: dict[str, Any]) -> None:
        name = f"{report['jobKey'].replace('/', '_')}-{report['sequence']:04d}.json"
        from agent.adapters.files import atomic_write  # noqa: PLC0415 (see __init__)

        # Durable before it returns: the daemon then deletes the journal's copy.
        atomic_write(self.outbox_dir / name, json.dumps(report, sort_keys=True).encode())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
