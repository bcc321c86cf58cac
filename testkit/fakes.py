"""In-process fakes for the inner test ring: the agent's adapters, in memory.

Two rings test the agent. The outer ring (``tests/conftest.py``'s sandbox,
the kill -9 matrix, the end-to-end tests) runs ``python -m agent`` against
the stand-in edgecore and keadm, real processes and real signals; each state
transition there costs a process start. The inner ring drives the runner's
state machine in-process in milliseconds, over these fakes:

- ``FakeService``: a ``ServiceManager`` whose edgecore is a few fields;
- ``FakeImages``: an ``ImageBackend`` over a dict of images held in memory;
- ``MemoryTransport``: a ``Transport`` fed and read by the test itself;
- ``fake_node``: a real ``Node`` (config, SQLite journal, lock, probe) in a
  temporary directory, wired to ``FakeImages`` and ``FakeService``.

The fakes answer the protocols only; they never start a process.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.images import EDGECORE, KEADM, ImageInfo, Progress
from agent.adapters.service import ServiceStatus
from agent.config import parse_config
from agent.errors import FatalError
from agent.node import Node, build_node
from agent.transport.base import Inbound
from agent.versions import ImageRef

__all__ = ["FakeImage", "FakeImages", "FakeService", "MemoryTransport", "fake_node",
           "package_files"]

_pids = itertools.count(4000)  # never a real process: nothing here is ever signalled


class FakeService:
    """A ``ServiceManager`` in memory: edgecore is ``active``, ``main_pid`` and ``version``.

    ``start``/``stop``/``restart`` flip the state and count calls; every start
    gets a new pid and invocation, and ``logged_version`` answers ``version``
    for the current pid only, as the real managers match MainPID.
    """

    def __init__(self, version: str | None = "v1.12.1", *, active: bool = True,
                 enabled_for_keadm: bool | None = None, needs_reload: bool = False,
                 log_name: str = "log") -> None:
        self.version = version  # what the running edgecore logged at start (None: nothing)
        self.log_name = log_name  # detection source name, as in reports' versionSource
        self.active = False
        self.main_pid = 0
        self.invocation = ""
        self.n_restarts = 0  # systemd's NRestarts: automatic restarts (set it to fake a loop)
        self.enabled = enabled_for_keadm
        self.reload_needed = needs_reload
        self.starts = self.stops = self.restarts = self.reloads = 0
        if active:
            self._spawn()

    def _spawn(self) -> None:
        self.active, self.main_pid = True, next(_pids)
        self.invocation = f"{self.main_pid:032x}"

    async def status(self) -> ServiceStatus:
        return ServiceStatus(self.active, "active" if self.active else "inactive",
                             self.n_restarts, self.main_pid, self.invocation)

    async def start(self) -> None:
        self.starts += 1
        if not self.active:
            self._spawn()

    async def stop(self) -> None:
        self.stops += 1
        self.active, self.main_pid, self.invocation = False, 0, ""

    async def restart(self) -> None:
        self.restarts += 1
        self._spawn()

    async def reload_units(self) -> None:
        self.reloads += 1
        self.reload_needed = False

    async def logged_version(self, status: ServiceStatus) -> str | None:
        if not self.active or status.main_pid <= 0 or status.main_pid != self.main_pid:
            return None
        return self.version

    async def enabled_for_keadm(self) -> bool | None:
        return self.enabled

    async def needs_reload(self) -> bool:
        return self.reload_needed


def package_files(version: str) -> dict[str, bytes]:
    """An installation package's two files; edgecore holds its version literal."""
    return {KEADM: f"#!/bin/sh\n# fake keadm {version}\nexit 0\n".encode(),
            EDGECORE: b"\x7fELF\x00" + version.encode() + b"\x00fake edgecore\x00"}


@dataclass(frozen=True)
class FakeImage:
    digest: str
    size: int
    files: dict[str, bytes]  # absolute path in the image -> content


@dataclass
class FakeImages:
    """An ``ImageBackend`` over ``images``: ``str(ref)`` (``repo:tag``) -> ``FakeImage``."""

    images: dict[str, FakeImage] = field(default_factory=dict)
    pulls: list[str] = field(default_factory=list)  # every pull, in order
    extracts: list[str] = field(default_factory=list)

    def add(self, ref: str, files: dict[str, bytes] | None = None) -> FakeImage:
        """Add image ``ref`` (``repo:tag``); the default files are a package of its tag."""
        if files is None:
            files = package_files(ref.rsplit(":", 1)[-1])
        h = hashlib.sha256()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        image = FakeImage(f"sha256:{h.hexdigest()}", sum(map(len, files.values())), files)
        self.images[ref] = image
        return image

    def _get(self, ref: ImageRef) -> FakeImage:
        # The messages of LocalDirImageBackend: a missing image is a FatalError.
        if not ref.tag:
            raise FatalError(f"image {ref} has no tag")
        image = self.images.get(str(ref))
        if image is None:
            raise FatalError(f"image {ref} not found in memory")
        return image

    async def inspect(self, ref: ImageRef) -> ImageInfo:
        image = self._get(ref)
        return ImageInfo(ref, image.digest, image.size, present_locally=True)

    async def pull(self, ref: ImageRef, deadline: float, progress: Progress) -> ImageInfo:
        self.pulls.append(str(ref))
        info = await self.inspect(ref)
        progress(f"image {ref} available locally ({info.size} bytes)")
        return info

    async def extract(self, ref: ImageRef, files: list[str], dest: Path) -> dict[str, Path]:
        image = self._get(ref)
        self.extracts.append(str(ref))
        dest.mkdir(parents=True, exist_ok=True)
        out: dict[str, Path] = {}
        for name in files:
            if name not in image.files:
                raise FatalError(f"image {ref} has no regular file {name}")
            target = dest / Path(name).name
            target.write_bytes(image.files[name])
            target.chmod(0o755)
            out[name] = target
        return out

    async def storage_path(self) -> Path | None:
        return None


class MemoryTransport:
    """A ``Transport`` in memory: the test ``send``s commands and reads ``published``."""

    def __init__(self, source: str = "memory") -> None:
        self.source = source
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.acked: list[bytes] = []  # payloads acknowledged (after the journal commit)
        self.published: list[dict[str, Any]] = []
        self.fail_next = 0  # publishes still to fail with OSError (a broker outage)
        self.publish_attempts = 0
        self.presence_updates = 0

    def send(self, payload: bytes) -> None:
        self.inbox.put_nowait(payload)

    async def commands(self) -> AsyncIterator[Inbound]:
        while True:
            payload = await self.inbox.get()

            async def ack(p: bytes = payload) -> None:
                self.acked.append(p)

            yield Inbound(self.source, payload, ack)

    async def publish(self, report: dict[str, Any]) -> None:
        self.publish_attempts += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise OSError("broker unavailable (simulated)")
        self.published.append(report)

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing to keep up

    async def update_presence(self) -> None:
        self.presence_updates += 1


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def fake_node(tmp_path: Path, *, images: FakeImages | None = None,
              service: FakeService | None = None, **config_overrides: Any) -> Node:
    """A real ``Node`` rooted at ``tmp_path`` over ``FakeImages`` and ``FakeService``.

    ``config_overrides`` are config file sections, merged into the defaults
    (``policy={"max_state_entries": 2}``). The node gets an edgecore binary
    and edgecore.yaml (kept if present, so a second call reopens the same
    node, as after a restart), which prechecks and backups read.
    """
    settings = _merge({
        "node_name": "edge-1",
        "paths": {"root": str(tmp_path)},
        "service": {"manager": "process"},
        "health": {"grace_seconds": 0, "start_timeout_seconds": 1,
                   "poll_interval_seconds": 0.05},
        "precheck": {"reserve_bytes": 0},
    }, config_overrides)
    config = parse_config(settings)
    service = service if service is not None else FakeService()
    for path, content in (
            (config.paths.edgecore_binary, package_files(service.version or "v1.12.1")[EDGECORE]),
            (config.paths.edgecore_config, b"database:\n  dataSource: /var/lib/kubeedge/"
                                           b"edgecore.db\n")):
        target = config.paths.node(path)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    return build_node(config, images=images if images is not None else FakeImages(),
                      service=service)
