"""Facts about the installed edgecore: its files and its version.

Version detection tries, in order: ``edgecore --version``, the
``edgecoreVersion`` field of edgecore.yaml, the node's ``kubeletVersion``
suffix from MetaServer, and the agent's own record. Real v1.12 edgecore has
no ``--version`` flag and only v1.21+ writes ``edgecoreVersion``, so each
fallback is load-bearing somewhere in the fleet.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.config import Config
from agent.errors import InvalidCommand
from agent.versions import Version, version_from_kubelet

_VERSION_IN_TEXT = re.compile(r"\bv\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?\b")
DEFAULT_DB = "/var/lib/kubeedge/edgecore.db"


@dataclass(frozen=True)
class Detected:
    version: Version
    source: str  # "binary" | "config" | "metaserver" | "record"


@dataclass(frozen=True)
class EdgecoreFiles:
    binary: Path
    config: Path
    db: Path

    def all(self) -> list[Path]:
        return [self.binary, self.config, self.db]


def _find_key(data: Any, names: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in names:
                return value
            found = _find_key(value, names)
            if found is not None:
                return found
    return None


class EdgecoreProbe:
    def __init__(self, config: Config, record: Callable[[], str | None] = lambda: None) -> None:
        self.config = config
        self.record = record

    def files(self) -> EdgecoreFiles:
        paths = self.config.paths
        config_path = paths.node(paths.edgecore_config)
        db = paths.edgecore_db
        if db is None:
            source = _find_key(self._read_yaml(config_path).get("database"), ("dataSource",))
            db = source if isinstance(source, str) and source.startswith("/") else DEFAULT_DB
        db_path = Path(db)
        # dataSource in a sandboxed edgecore.yaml may already point inside the root.
        if not db_path.is_relative_to(paths.root) or paths.root == Path("/"):
            db_path = paths.node(db)
        return EdgecoreFiles(paths.node(paths.edgecore_binary), config_path, db_path)

    @staticmethod
    def _read_yaml(path: Path) -> dict[str, Any]:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    async def from_binary(self, binary: Path | None = None) -> Version | None:
        binary = binary or self.files().binary
        try:
            proc = await asyncio.create_subprocess_exec(
                str(binary), "--version",
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        except OSError:
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        if proc.returncode != 0:
            return None
        m = _VERSION_IN_TEXT.search(out.decode(errors="replace"))
        return _parse(m[0]) if m else None

    def from_config(self) -> Version | None:
        names = ("edgecoreVersion", "edgeCoreVersion")
        value = _find_key(self._read_yaml(self.files().config), names)
        return _parse(value) if isinstance(value, str) else None

    async def from_metaserver(self) -> Version | None:
        base = self.config.health.metaserver_url
        if not base:
            return None
        url = f"{base.rstrip('/')}/api/v1/nodes/{self.config.node_name}"
        if not url.startswith(("http://", "https://")):
            return None

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (scheme checked)
                return json.loads(resp.read(1024 * 1024))

        try:
            node = await asyncio.to_thread(fetch)
        except (OSError, ValueError):
            return None
        kubelet = _find_key(node, ("kubeletVersion",))
        return version_from_kubelet(kubelet) if isinstance(kubelet, str) else None

    async def detect(self, *, use_record: bool = True) -> Detected | None:
        if (v := await self.from_binary()) is not None:
            return Detected(v, "binary")
        if (v := self.from_config()) is not None:
            return Detected(v, "config")
        if (v := await self.from_metaserver()) is not None:
            return Detected(v, "metaserver")
        if use_record and (text := self.record()) and (v := _parse(text)) is not None:
            return Detected(v, "record")
        return None


def _parse(text: str) -> Version | None:
    try:
        return Version.parse(text)
    except InvalidCommand:
        return None
