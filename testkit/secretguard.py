"""A pytest plugin: the run fails if a test credential shows up where it must not.

Enable it in ``tests/conftest.py`` with ``pytest_plugins = ["testkit.secretguard"]``
(or per run with ``-p testkit.secretguard``). It checks two places:

* every test report: captured stdout, stderr and log of each phase, and the
  failure text (``pytest_runtest_logreport``, ``pytest_collectreport``);
* at the end of the session, the files under pytest's ``basetemp`` that the
  agent and the test rigs write: logs (``*.log``, ``*.jsonl``), reports
  (``*.json``), captured output, and the agent's SQLite journal, read as raw
  bytes so that deleted rows and the write-ahead log count too.

A finding names the test or file and the secret's label, never its value (the
guard must not leak what it guards). Files that hold a credential by design
are skipped: password and credential files, ``htpasswd``, docker's
``config.json``, keys. Anything else that holds one is reported and the
session's exit status becomes 1.

The values below are the passwords the test rigs use (a test in
``tests/test_security.py`` holds this list to the sources). A test with a
secret of its own calls :func:`register_secret`; a test that writes a
credential into a file the scan would read calls :func:`allow_path`.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "CANONICAL",
    "MIN_LENGTH",
    "Secret",
    "allow_path",
    "needles",
    "register_secret",
    "scan_bytes",
    "scan_tree",
]


@dataclass(frozen=True)
class Secret:
    label: str  # what a finding names instead of the value
    value: str
    username: str | None = None  # with it, base64("user:password") is looked for too


#: Every password the test rigs hand to a registry (and so to the agent).
CANONICAL: tuple[Secret, ...] = (
    Secret("registry password of tests/test_docker_images.py, tests/test_dockerenv.py",
           "s3cret", "edge"),
    Secret("registry password of tests/test_containerd_images.py", "c0ntainerd-s3cret", "edge"),
    Secret("testkit.e2e_host.REGISTRY_PASSWORD", "e2e-secret", "edge"),
    Secret("registry password of bench/containerd_pull.py", "bench-s3cret", "bench"),
    Secret("registry password of scripts/rehearsal.py", "throwaway-password", "rehearsal"),
)
# Shorter values match ordinary words ("wrong", "secret"): a guard that cries
# wolf gets switched off.
MIN_LENGTH = 6
# Read in slices: a log may be large, and a secret may straddle two slices.
_CHUNK = 1 << 20
_MAX_FILE_BYTES = 256 << 20

_registered: list[Secret] = []
_allowed: set[Path] = set()

# What the scan reads: logs, reports and captured output, and the agent's journal.
_SUFFIXES = frozenset({".log", ".jsonl", ".json", ".txt", ".out", ".err", ".stdout",
                       ".stderr"})
_NAMES = frozenset({"journal.db", "journal.db-wal", "journal.db-journal"})
# Legitimate holders of a credential.
_HOLDER_NAMES = frozenset({"config.json", "htpasswd"})
_HOLDER_WORDS = ("password", "passwd", "credential", "secret")
# Image stores and unpacked packages: large, written by engines, never by the agent.
_PRUNED_DIRS = frozenset({"overlay2", "vfs", "fuse-overlayfs", "storage", "blobs", "images",
                          "staging", "snapshots", "io.containerd.content.v1.content",
                          "io.containerd.snapshotter.v1.overlayfs",
                          "io.containerd.snapshotter.v1.native", "__pycache__"})


def register_secret(value: str, label: str, *, username: str | None = None) -> None:
    """Guard one more secret, for the rest of the session (e.g. at a test module's import)."""
    if len(value) < MIN_LENGTH:
        raise ValueError(f"secret {label!r} is shorter than {MIN_LENGTH} characters")
    _registered.append(Secret(label, value, username))


def allow_path(path: Path) -> None:
    """A file that holds a secret on purpose: the end-of-session scan skips it."""
    _allowed.add(path.resolve())


def needles(extra: Iterable[Secret] = ()) -> list[tuple[str, bytes]]:
    """(label, bytes) of every form of every guarded secret."""
    out: list[tuple[str, bytes]] = []
    for s in (*CANONICAL, *_registered, *extra):
        out.append((s.label, s.value.encode()))
        if s.username is not None:
            pair = base64.b64encode(f"{s.username}:{s.value}".encode())
            out.append((f"{s.label} (base64 user:password)", pair))
    return out


def scan_bytes(data: bytes, found: set[str], table: list[tuple[str, bytes]]) -> None:
    """Add the label of each needle in ``data``; one inside a longer hit is that hit."""
    hits = [(label, needle) for label, needle in table if needle in data]
    found.update(label for label, needle in hits
                 if not any(needle != other and needle in other for _, other in hits))


def _scan_file(path: Path, table: list[tuple[str, bytes]]) -> set[str]:
    found: set[str] = set()
    overlap = max((len(n) for _, n in table), default=1) - 1
    tail = b""
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                scan_bytes(tail + chunk, found, table)
                tail = chunk[-overlap:] if overlap else b""
    except OSError:
        pass  # gone or unreadable since the walk: nothing to report
    return found


def _holds_by_design(path: Path, root: Path) -> bool:
    name = path.name.lower()
    if name in _HOLDER_NAMES or path.suffix in (".key", ".pem") or path.resolve() in _allowed:
        return True
    # The first level under basetemp is named after the test ("test_wrong_password0"):
    # it says nothing about the file.
    parts = path.relative_to(root).parts[1:]
    return any(word in part.lower() for part in parts for word in _HOLDER_WORDS)


def _candidates(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _: None):
        dirnames[:] = [d for d in dirnames if d not in _PRUNED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix not in _SUFFIXES and name not in _NAMES:
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= _MAX_FILE_BYTES \
                    and not _holds_by_design(path, root):
                yield path


def scan_tree(root: Path, extra: Iterable[Secret] = ()) -> list[str]:
    """``"<file>: <label>"`` for each guarded secret found in a scanned file under ``root``."""
    table = needles(extra)
    findings = []
    for path in _candidates(root):
        for label in sorted(_scan_file(path, table)):
            findings.append(f"{path}: {label}")
    return findings


class SecretGuard:
    """The hooks; one instance per session, registered by :func:`pytest_configure`."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.findings: list[str] = []
        self._seen: set[str] = set()

    def _note(self, finding: str) -> None:
        if finding not in self._seen:  # a call report repeats the setup's sections
            self._seen.add(finding)
            self.findings.append(finding)

    def _scan_report(self, where: str, texts: Iterable[tuple[str, str]]) -> None:
        table = needles()
        for section, text in texts:
            found: set[str] = set()
            scan_bytes(text.encode(errors="replace"), found, table)
            for label in sorted(found):
                self._note(f"{where} [{section}]: {label}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        texts = [*report.sections, (f"{report.when} report", report.longreprtext)]
        self._scan_report(report.nodeid, texts)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._scan_report(report.nodeid or "<collection>",
                          [*report.sections, ("collection report", report.longreprtext)])

    def _basetemp(self) -> Path | None:
        """This session's basetemp, if a test made one (asking would create it)."""
        # pytest keeps its TempPathFactory on the config without a public accessor.
        factory = getattr(self.config, "_tmp_path_factory", None)
        if not isinstance(factory, pytest.TempPathFactory):
            return None
        made = getattr(factory, "_basetemp", factory)
        return factory.getbasetemp() if made is not None else None

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        basetemp = self._basetemp()
        if basetemp is not None:
            for finding in scan_tree(basetemp):
                self._note(finding)
        if self.findings:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.findings:
            return
        terminalreporter.section("secretguard: a test credential leaked", sep="=", red=True)
        for finding in self.findings:
            terminalreporter.write_line(finding)
        terminalreporter.write_line(
            "(values are not shown; see testkit/secretguard.py for the labels)")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SecretGuard(config), "secretguard-session")
