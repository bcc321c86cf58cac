"""A real Mosquitto 2.0 broker for tests: mutual TLS, the production ACL, persistence.

The configuration is rendered from the production sample
``config/mosquitto/mosquitto.conf`` and ``config/mosquitto/acl`` so the sample
stays tested. Only these settings are replaced (``Broker._overrides``): the
listener (a free 127.0.0.1 port), the TLS files (the test PKI), the ACL file,
persistence/log/pid paths (``workdir``), ``log_type`` (``all``),
``autosave_interval`` (1 s) and ``user`` (``root`` when the tests run as root,
so the broker can use pytest's 0700 tmp dirs: mosquitto 2.0 drops privileges
*before* it reads the TLS files, the log and the database).

What tests can rely on across restarts (persistence is on):

* :meth:`Broker.stop` (SIGTERM) and :meth:`Broker.restart` save everything:
  persistent sessions, their subscriptions, QoS 1/2 messages queued for
  offline clients, retained messages.
* :meth:`Broker.kill` (SIGKILL, a crash) keeps only the last complete
  autosave. The broker saves about every 2 s (``autosave_interval 1`` fires
  once more than a second has passed). To make a change survive a kill, call
  :meth:`Broker.wait_saved` after the change was acknowledged (PUBACK/SUBACK/
  CONNACK) and before killing; without that it may or may not survive, so
  never assert either way. The same holds for a subscriber's PUBACK: a
  message delivered and acknowledged after the last save is delivered again
  after a kill (seen in practice), which the agent must tolerate.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from testkit.pki import Pki, make_pki

__all__ = ["CONFIG_DIR", "DEFAULT_PREFIX", "HOST", "Broker", "BrokerError", "running_broker"]

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config" / "mosquitto"
DEFAULT_PREFIX = "kubeedge/nodes"
HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The broker did not start, or died."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """One mosquitto process; ``start``/``stop`` may be called repeatedly (same port, same data)."""

    def __init__(self, pki: Pki, workdir: Path, *, acl: bool = True,
                 prefix: str = DEFAULT_PREFIX) -> None:
        self.pki = pki
        self.workdir = workdir
        self.acl = acl
        self.prefix = prefix.rstrip("/")
        self.host = HOST
        self.port = _free_port()
        self.conf_path = workdir / "mosquitto.conf"
        self.acl_path = workdir / "acl"
        self.log_path = workdir / "mosquitto.log"
        self.stderr_path = workdir / "mosquitto.stderr"
        self.db_path = workdir / "mosquitto.db"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration --------------------------------------------------------

    def _overrides(self) -> dict[str, Callable[[list[str]], str | None]]:
        """Setting name -> new line (None drops it) for the production sample's lines."""
        user = "root" if os.geteuid() == 0 else None
        return {
            "listener": lambda _: f"listener {self.port} {HOST}",
            "cafile": lambda _: f"cafile {self.pki.ca_cert}",
            "certfile": lambda _: f"certfile {self.pki.server_cert}",
            "keyfile": lambda _: f"keyfile {self.pki.server_key}",
            "acl_file": lambda _: f"acl_file {self.acl_path}" if self.acl else None,
            "persistence_location": lambda _: f"persistence_location {self.workdir}/",
            "autosave_interval": lambda _: "autosave_interval 1",
            "log_dest": lambda _: f"log_dest file {self.log_path}",
            "log_type": lambda _: None,
            "pid_file": lambda _: f"pid_file {self.workdir / 'mosquitto.pid'}",
            "user": lambda words: f"user {user}" if user else " ".join(words),
        }

    def render_config(self) -> str:
        """mosquitto.conf for this broker, from the production sample."""
        overrides = self._overrides()
        seen: set[str] = set()
        out: list[str] = []
        for line in (CONFIG_DIR / "mosquitto.conf").read_text().splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            key = words[0]
            if key in overrides:
                seen.add(key)
                new = overrides[key](words)
                if new is not None:
                    out.append(new)
            else:
                out.append(line.strip())
        missing = set(overrides) - seen
        if missing:
            raise BrokerError(f"production mosquitto.conf lacks {sorted(missing)}: "
                              "update testkit/broker.py with it")
        out.append("log_type all")
        return "\n".join(out) + "\n"

    def render_acl(self) -> str:
        """The production ACL, verbatim but for the topic prefix."""
        text = (CONFIG_DIR / "acl").read_text()
        if self.prefix != DEFAULT_PREFIX:
            text = re.sub(rf"(?m)(\s){re.escape(DEFAULT_PREFIX)}/", rf"\g<1>{self.prefix}/", text)
        return text

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render_config())
        self.acl_path.write_text(self.render_acl())
        for path in (self.conf_path, self.acl_path):
            os.chmod(path, 0o644)

    # -- process --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections on ``port``."""
        if self.running:
            raise BrokerError("broker already running")
        self._write_config()
        mark = self.log_mark()
        with self.stderr_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=self.workdir,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = re.compile(r"mosquitto version \S+ running")
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(f"mosquitto exited with {code} during start:\n"
                                  f"{self.log_tail()}\n{self._stderr_tail()}")
            # "running" is logged once the listening sockets exist and the TLS
            # files are loaded (a bad key or CA makes mosquitto exit instead).
            if ready.search(self._log_since(mark)):
                return
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise BrokerError(f"mosquitto not ready on port {self.port}:\n"
                                  f"{self.log_tail()}\n{self._stderr_tail()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` and reap the process (SIGKILL after a bounded wait). No-op if stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)

    def kill(self) -> None:
        """Crash the broker (SIGKILL): state since the last autosave is lost."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Clean stop (SIGTERM saves persistence) and start again on the same port."""
        self.stop()
        self.start()

    # -- logs -----------------------------------------------------------------

    def log_mark(self) -> int:
        """Current end of the log, for :meth:`wait_for_log` / :meth:`wait_saved`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, mark: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 50) -> str:
        return "\n".join(self._log_since(0).splitlines()[-n:])

    def _stderr_tail(self, n: int = 20) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 10.0) -> str:
        """Wait until a log line after ``since`` matches the regex; return that line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self._log_since(since).splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                raise BrokerError(f"no log line matching {pattern!r}:\n{self.log_tail()}")
            if not self.running:
                raise BrokerError(f"broker not running:\n{self.log_tail()}")
            time.sleep(0.05)

    def _db_identity(self) -> tuple[int, int] | None:
        try:
            st = self.db_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Return once every change the broker had processed before this call is on disk.

        mosquitto writes ``mosquitto.db.new`` and renames it over
        ``mosquitto.db`` (its "Saving in-memory database" log line comes
        *before* the write), so a replaced file means a whole save finished.
        The broker is single-threaded: a save that finishes after this call
        started after anything it had already acknowledged (PUBACK, SUBACK).
        """
        before = self._db_identity()
        deadline = time.monotonic() + timeout
        while self._db_identity() in (before, None):
            if time.monotonic() > deadline:
                raise BrokerError(f"no autosave within {timeout} s:\n{self.log_tail()}")
            if not self.running:
                raise BrokerError(f"broker not running:\n{self.log_tail()}")
            time.sleep(0.05)

    # -- clients --------------------------------------------------------------

    def client_tls(self, cn: str) -> ssl.SSLContext:
        """Client TLS context: trusts the test CA, presents ``cn``'s certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.pki.ca_cert))
        cert, key = self.pki.client(cn)
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def topic(self, node: str, leaf: str) -> str:
        """``<prefix>/<node>/upgrade/<leaf>``."""
        return f"{self.prefix}/{node}/upgrade/{leaf}"

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def running_broker(directory: Path, *, pki: Pki | None = None, acl: bool = True,
                   prefix: str = DEFAULT_PREFIX) -> Iterator[Broker]:
    """A started broker: PKI in ``directory/pki`` (unless given), data in ``directory/broker``.

    Usage as a fixture::

        @pytest.fixture
        def broker(tmp_path: Path) -> Iterator[Broker]:
            with running_broker(tmp_path) as b:
                yield b
    """
    pki = pki or make_pki(directory / "pki")
    broker = Broker(pki, directory / "broker", acl=acl, prefix=prefix)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
