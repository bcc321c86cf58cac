"""Template for the stand-in `edgecore` binary.

The builder in tests/standins/__init__.py prepends a shebang plus VERSION,
BEHAVIOUR and VERSION_FLAG assignments; the fallbacks below only exist so the
template itself can be imported and type-checked. Only stdlib + yaml allowed:
the generated script runs outside this package.
"""

import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import yaml

_VERSION = str(globals().get("VERSION", "v0.0.0"))
_BEHAVIOUR = str(globals().get("BEHAVIOUR", "ok"))
_VERSION_FLAG = bool(globals().get("VERSION_FLAG", True))

_CONFIG_SUFFIX = os.path.join("etc", "kubeedge", "config", "edgecore.yaml")
_USAGE = "Usage: edgecore --config <file> | edgecore --version\n"


def _log(msg: str) -> None:
    # stderr is appended to <root>/var/log/edgecore.log by whoever started us.
    sys.stderr.write(f"edgecore {_VERSION}: {msg}\n")
    sys.stderr.flush()


def _root_from_config(config: str) -> str:
    config = os.path.abspath(config)
    if config.endswith(os.sep + _CONFIG_SUFFIX):
        return config[: -len(_CONFIG_SUFFIX)] or "/"
    return "/"


def _section(data: Any, *keys: str) -> dict[str, Any]:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def _read_db_version(db_path: str) -> str | None:
    # Read-only URI: an old build restarted on a restored DB must leave the file
    # byte-identical, so the rollback tests can compare it.
    uri = "file:" + urllib.parse.quote(db_path) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        row = conn.execute("SELECT v FROM meta WHERE k = 'version'").fetchone()
    finally:
        conn.close()
    return None if row is None else str(row[0])


def _migrate(db_path: str) -> None:
    if os.path.exists(db_path):
        try:
            if _read_db_version(db_path) == _VERSION:
                return
        except sqlite3.Error:
            pass  # no meta table or unreadable: fall through and (re)create it
    os.makedirs(os.path.dirname(db_path) or ".", exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT)")
            conn.execute(
                "INSERT INTO meta(k, v) VALUES('version', ?) "
                "ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                (_VERSION,),
            )
    finally:
        conn.close()
    _log(f"migrated database {db_path} to {_VERSION}")


def _make_handler(node_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, "text/plain", b"ok")
                return
            prefix = "/api/v1/nodes/"
            if self.path.startswith(prefix) and self.path[len(prefix) :] == node_name:
                body = {
                    "metadata": {"name": node_name},
                    "status": {"nodeInfo": {"kubeletVersion": f"v1.22.17-kubeedge-{_VERSION}"}},
                }
                self._reply(200, "application/json", json.dumps(body).encode())
                return
            self._reply(404, "application/json", b'{"kind":"Status","code":404}')

        def _reply(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep edgecore.log readable; requests are not interesting

    return Handler


def _start_metaserver(config: dict[str, Any]) -> ThreadingHTTPServer | None:
    meta = _section(config, "modules", "metaManager", "metaServer")
    if not meta.get("enable"):
        return None
    host, _, port = str(meta.get("server", "127.0.0.1:10550")).rpartition(":")
    node_name = str(_section(config, "modules", "edged").get("hostnameOverride") or "")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), _make_handler(
        node_name or socket.gethostname()))
    # Short poll interval so SIGTERM -> exit stays fast across many test restarts.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return server


def _run(config_path: str) -> int:
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        _log(f"failed to load config {config_path}: {exc}")
        return 1
    default_db = os.path.join(_root_from_config(config_path), "var/lib/kubeedge/edgecore.db")
    db_path = str(_section(config, "database").get("dataSource") or default_db)
    try:
        _migrate(db_path)
    except sqlite3.Error as exc:
        _log(f"failed to open database {db_path}: {exc}")
        return 1

    if _BEHAVIOUR == "crash":
        time.sleep(0.3)
        _log("panic: simulated crash on start")
        return 1
    if _BEHAVIOUR != "ok":
        _log(f"unknown stand-in behaviour {_BEHAVIOUR!r}")
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = _start_metaserver(config)
    except (OSError, ValueError) as exc:
        _log(f"failed to start metaserver: {exc}")
        return 1
    _log(f"started (pid {os.getpid()})")
    # Timed waits: the signal handler runs between them even if wait() is not
    # interrupted on this platform.
    while not stop.wait(0.1):
        pass
    if server is not None:
        server.shutdown()
        server.server_close()
    _log("stopped")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--version"]:
        if _VERSION_FLAG:
            print(f"KubeEdge {_VERSION}", flush=True)
            return 0
        sys.stderr.write("Error: unknown flag: --version\n")
        return 1
    if len(argv) == 2 and argv[0] == "--config":
        return _run(argv[1])
    if len(argv) == 1 and argv[0].startswith("--config="):
        return _run(argv[0].partition("=")[2])
    sys.stderr.write(_USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
