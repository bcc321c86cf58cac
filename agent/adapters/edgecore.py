"""Facts about the installed edgecore: its files, its version, the binary it runs.

edgecore is never executed to learn anything. No KubeEdge release has a
version flag: ``edgecore --version`` is ignored and edgecore *starts*, a
second one beside the running one with the same node identity and database
(../shared/kubeedge/README.md). Detection asks, in order:

``journal``/``log``  the ``Version:`` line the running MainPID logged at start
``config``           ``edgecoreVersion`` in edgecore.yaml (written by v1.21+)
``metaserver``       the node's ``kubeletVersion`` suffix
``package``          the binary's sha256, matched against every edgecore the
                     agent has taken out of a package (recorded when staged)
``binary``           the one ``vX.Y.Z`` literal embedded in the binary (set by
                     ``-X …version.gitVersion``; bounded by non-printable bytes)
``record``           the agent's own record: last, and never a backup label
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.procfs import started_at
from agent.adapters.service import ServiceManager
from agent.config import Config
from agent.errors import InvalidCommand
from agent.versions import Version, version_from_kubelet

DEFAULT_DB = "/var/lib/kubeedge/edgecore.db"
# A version string with a non-printable byte (or nothing) on each side: what
# `strings` would print as a line of its own. Real builds hold exactly one.
# Found as plain matches whose neighbours are then checked: a lookbehind on
# every byte of a 70 MB binary takes 40 times as long.
_VERSION_BYTES = re.compile(rb"v\d+\.\d+\.\d+")
_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09}
SHA_KEY = "edgecore_sha256:"  # journal meta: sha256 of a package's edgecore -> version


@dataclass(frozen=True)
class Detected:
    version: Version
    source: str  # journal | log | config | metaserver | package | binary | record


@dataclass(frozen=True)
class EdgecoreFiles:
    binary: Path
    config: Path
    db: Path
    unit: Path  # the unit file keadm rewrites; absent under the process manager
    dropins: Path  # <unit>.d/, the operator's drop-ins

    def all(self) -> list[Path]:
        return [self.binary, self.config, self.db, self.unit]

    def present(self) -> list[Path]:
        """What a backup would hold now: the files that exist, drop-ins included."""
        dropins = sorted(self.dropins.glob("*")) if self.dropins.is_dir() else []
        return [p for p in [*self.all(), *dropins] if p.is_file()]


def _find_key(data: Any, names: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in names:
                return value
            found = _find_key(value, names)
            if found is not None:
                return found
    return None


# libyaml's loader where PyYAML has it: a real edgecore.yaml is about 200 lines,
# and PyYAML's pure-Python loader took 8 % of a simulated fleet's CPU.
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StatCache:
    """Per-file results keyed by (dev, inode, size, mtime): hashing a 100 MB
    binary once per presence update would be wasted work."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], tuple[tuple[int, int, int, int], Any]] = {}

    def get(self, kind: str, path: Path, compute: Callable[[Path], Any]) -> Any:
        st = path.stat()
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._data.get((kind, str(path)))
        if hit is not None and hit[0] == sig:
            return hit[1]
        value = compute(path)
        self._data[(kind, str(path))] = (sig, value)
        return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def embedded_versions(path: Path) -> list[str]:
    """Every bare ``vX.Y.Z`` literal in a file (a real edgecore has one: its own)."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        # mmap: the regex walks the page cache, never a 100 MB copy in memory.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = len(data)
            return [m[0].decode() for m in _VERSION_BYTES.finditer(data)
                    if (m.start() == 0 or data[m.start() - 1] not in _PRINTABLE)
                    and (m.end() == end or data[m.end()] not in _PRINTABLE)]


class EdgecoreProbe:
    def __init__(self, config: Config, service: ServiceManager,
                 record: Callable[[], str | None] = lambda: None,
                 known_sha: Callable[[str], str | None] = lambda sha: None) -> None:
        self.config = config
        self.service = service
        self.record = record
        self.known_sha = known_sha
        self._cache = _StatCache()

    def files(self) -> EdgecoreFiles:
        paths = self.config.paths
        config_path = paths.node(paths.edgecore_config)
        db = paths.edgecore_db
        if db is None:
            source = _find_key(self._yaml(config_path).get("database"), ("dataSource",))
            db = source if isinstance(source, str) and source.startswith("/") else DEFAULT_DB
        db_path = Path(db)
        # dataSource in a sandboxed edgecore.yaml may already point inside the root.
        if not db_path.is_relative_to(paths.root) or paths.root == Path("/"):
            db_path = paths.node(db)
        unit = paths.node(self.config.unit_file)
        return EdgecoreFiles(paths.node(paths.edgecore_binary), config_path, db_path, unit,
                             unit.with_name(unit.name + ".d"))

    def _yaml(self, path: Path) -> dict[str, Any]:
        """edgecore.yaml, parsed once per change of the file (files() is asked
        several times a job); {} if it is missing or no YAML mapping. Callers
        only read the result."""
        try:
            data: dict[str, Any] = self._cache.get("yaml", path, _read_yaml)
        except OSError:
            return {}
        return data

    # -- the sources, in order ------------------------------------------------

    async def from_start_log(self) -> Version | None:
        status = await self.service.status()
        if not status.active:
            return None
        text = await self.service.logged_version(status)
        return _parse(text) if text else None

    def from_config(self) -> Version | None:
        names = ("edgecoreVersion", "edgeCoreVersion")
        value = _find_key(self._yaml(self.files().config), names)
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

    async def from_package(self) -> Version | None:
        try:
            sha = await asyncio.to_thread(
                self._cache.get, "sha256", self.files().binary, _sha256)
        except OSError:
            return None
        text = self.known_sha(sha)
        return _parse(text) if text else None

    async def from_binary(self) -> Version | None:
        try:
            found = await asyncio.to_thread(
                self._cache.get, "literal", self.files().binary, embedded_versions)
        except OSError:
            return None
        return _parse(found[0]) if len(set(found)) == 1 else None

    async def detect(self, *, use_record: bool = True) -> Detected | None:
        if (v := await self.from_start_log()) is not None:
            return Detected(v, self.service.log_name)
        if (v := self.from_config()) is not None:
            return Detected(v, "config")
        if (v := await self.from_metaserver()) is not None:
            return Detected(v, "metaserver")
        if (v := await self.from_package()) is not None:
            return Detected(v, "package")
        if (v := await self.from_binary()) is not None:
            return Detected(v, "binary")
        if use_record and (text := self.record()) and (v := _parse(text)) is not None:
            return Detected(v, "record")
        return None


def running_sha256(pid: int) -> str | None:
    """sha256 of the program ``pid`` is running: ``/proc/<pid>/exe``.

    The kernel keeps the executed inode, so a binary replaced on disk without
    a restart still hashes as the old one, which is the point. A ``#!`` script
    (test stand-ins are) runs an interpreter: there the script named in
    argv[1] counts, and only if it has not changed since the process started.
    Under binfmt_misc emulation (qemu-user on another CPU, flag P) ``exe`` is
    the emulator for every process and argv is ``[emulator, program, argv0,
    ...]``: the program in argv[1] counts, with the same "not changed since
    start" rule, since no inode of it is held.
    """
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        program: Path | None = None
        if _emulated(proc) and len(argv) > 2 and argv[1][:1] == b"/":
            program, argv = Path(os.fsdecode(argv[1])), argv[2:]
        script = Path(os.fsdecode(argv[1])) if len(argv) > 1 and argv[1][:1] == b"/" else None
        if script is not None and _is_script(script):
            program = script
        if program is None:
            # The same process running the same inode hashes the same: asked twice
            # per upgrade (after keadm, in the health gate) for a 70 MB binary.
            st = (proc / "exe").stat()
            key = (pid, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key not in _RUNNING:
                _RUNNING.clear()
                _RUNNING[key] = _sha256(proc / "exe")
            return _RUNNING[key]
        # The start time is known to a second (btime), hence the margin.
        if program.stat().st_ctime > started_at(pid) + 1.0:
            return None  # replaced after start: the process runs something older
        return _sha256(program)
    except (OSError, IndexError, ValueError):
        return None


def _sha256(path: Path) -> str:
    # agent/adapters/files.py (hashlib, mmap, a thread pool) only once a hash
    # is wanted: an idle daemon that found its version in edgecore's log never
    # needs it (issue 10).
    from agent.adapters.files import sha256_file  # noqa: PLC0415

    return sha256_file(path).sha256


def _elf_machine(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(20)[18:20]  # e_machine


def _emulated(proc: Path) -> bool:
    """Whether ``proc`` runs a CPU emulator: its exe is built for another machine
    than the interpreter running the agent."""
    try:
        return _elf_machine(proc / "exe") != _elf_machine(Path(sys.executable))
    except OSError:
        return False


_RUNNING: dict[tuple[int, int, int, int, int], str] = {}


def _is_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _parse(text: str) -> Version | None:
    try:
        return Version.parse(text)
    except InvalidCommand:
        return None
