"""Template for the stand-in `edgecore` binary.

The builder in testkit/standins/__init__.py prepends a shebang, a docstring that
holds the version as a bare literal (as a real build holds its -X version), and
VERSION and BEHAVIOUR assignments; the fallbacks below only exist so the
template itself can be imported and type-checked. Only stdlib + yaml allowed:
the generated script runs outside this package.

What it imitates of the real edgecore (v1.12.1 and v1.13.0 measured, see
../shared/kubeedge/README.md and tests/test_standins.py):

* There is no version flag. ``--version`` is a hidden boolean flag that is
  parsed and ignored: edgecore starts, with ``--config`` if given, else with
  the absolute default /etc/kubeedge/config/edgecore.yaml (never remapped
  under a sandbox root).
* A missing config file: one klog fatal line (multi-line message) on stderr,
  nothing on stdout, exit 1.
* Bad flags: ``Error: ...`` plus usage on stderr, exit 1.
* The first line it logs (stderr, klog format, its own pid) is
  ``Version: <version>``; no other line carries the version.
* From v1.21, at every start, it rewrites its config file (README, "Facts
  about later releases"): it sets the top-level ``edgecoreVersion`` to its
  version and drops what it does not know. The stand-in knows only the
  top-level keys in _KNOWN_TOP_LEVEL (v1alpha2 EdgeCoreConfig: TypeMeta,
  DataBase, Modules, FeatureGates, EdgeCoreVersion), keeps their values as
  they are except for an ``edgecoreVersion`` nested below them (not a field
  there), and writes the keys sorted, as sigs.k8s.io/yaml marshals. Before
  v1.21 the file is only read: never written, its bytes and mtime unchanged.
"""

import json
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import yaml

_VERSION = str(globals().get("VERSION", "v0.0.0"))
_BEHAVIOUR = str(globals().get("BEHAVIOUR", "ok"))

_DEFAULT_CONFIG = "/etc/kubeedge/config/edgecore.yaml"
_CONFIG_SUFFIX = os.path.join("etc", "kubeedge", "config", "edgecore.yaml")
# server.go lines of the config check's klog.Exit and of the "Version:" line,
# per minor, from the release tags' edge/cmd/edgecore/app/server.go.
_SERVER_GO_LINES = {
    12: (58, 74), 13: (62, 103), 14: (62, 103), 15: (61, 102), 16: (61, 102),
    17: (61, 102), 18: (62, 103), 19: (62, 103), 20: (62, 103), 21: (63, 104),
    22: (63, 104), 23: (66, 107),
}
# Go's strconv.ParseBool, plus verflag's "raw".
_BOOL_OR_RAW = {
    "1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False", "raw",
}
_USAGE = """Usage:
  edgecore [flags]

Global flags:

      --config string                    The path to the configuration file. Flags override \
values in this file. (default "/etc/kubeedge/config/edgecore.yaml")
  -h, --help                             help for edgecore
"""
_HELP = "Edgecore is the core edge part of KubeEdge (test stand-in).\n\n" + _USAGE
# The top-level keys of edgecore.yaml that a v1.21+ stand-in keeps; any other
# top-level key is dropped when it rewrites the file at start.
_KNOWN_TOP_LEVEL = ("apiVersion", "kind", "database", "modules", "featureGates",
                    "edgecoreVersion")
_VERSION_KEYS = ("edgecoreVersion", "edgeCoreVersion")


def _server_go_lines() -> tuple[int, int]:
    match = re.match(r"v1\.(\d+)\.", _VERSION)
    return _SERVER_GO_LINES.get(int(match.group(1)) if match else 0, (62, 103))


def _rewrites_config() -> bool:
    """v1.21 and later rewrite edgecore.yaml at every start."""
    match = re.match(r"v(\d+)\.(\d+)\.", _VERSION)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (1, 21)


def _without_version_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_version_keys(v) for k, v in data.items() if k not in _VERSION_KEYS}
    if isinstance(data, list):
        return [_without_version_keys(v) for v in data]
    return data


def _rewrite_config(config_path: str, config: dict[str, Any]) -> None:
    """What v1.21+ does at start: edgecoreVersion set, unknown fields dropped."""
    out = {key: _without_version_keys(value) for key, value in config.items()
           if key in _KNOWN_TOP_LEVEL and key != "edgecoreVersion"}
    out["edgecoreVersion"] = _VERSION
    text = yaml.safe_dump(out, sort_keys=True)
    # The real one writes in place (os.WriteFile); replacing the file keeps a
    # reader (the agent reading edgecoreVersion) from ever seeing half of it.
    tmp = f"{config_path}.edgecore-tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, os.stat(config_path).st_mode & 0o7777)
        os.replace(tmp, config_path)
    except OSError as exc:
        _klog("E", "server.go:112", f"failed to write config file {config_path}: {exc}")
        return
    dropped = sorted(str(k) for k in config if k not in _KNOWN_TOP_LEVEL)
    _log(f"updated edgecoreVersion in {config_path}"
         + (f", dropped unknown fields {', '.join(dropped)}" if dropped else ""),
         "server.go:113")


def _klog(severity: str, where: str, msg: str) -> None:
    # klog's header: Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg
    # (the "thread id" is the pid, right-aligned in 7 columns).
    now = datetime.now()
    sys.stderr.write(
        f"{severity}{now:%m%d %H:%M:%S}.{now.microsecond:06d} {os.getpid():7d} {where}] {msg}\n"
    )
    sys.stderr.flush()


def _log(msg: str, where: str = "core.go:46") -> None:
    # stderr is appended to <root>/var/log/edgecore.log by whoever started us.
    _klog("I", where, msg)


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
    _log(f"migrated database {db_path} to this build's schema", "dbm.go:72")


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


def _exit(msg: str, line: int) -> int:
    # klog.Exit: a fatal-severity line, then exit 1.
    _klog("F", f"server.go:{line}", msg)
    return 1


def _run(config_path: str) -> int:
    exit_line, version_line = _server_go_lines()
    # options.Validate(): only that the path exists (os.Stat), checked first.
    if not os.path.exists(config_path):
        return _exit(
            "[\n  config: Required value: config file "
            f"{config_path} not exist. For the configuration file format, please refer to "
            "--minconfig and --defaultconfig command\n]",
            exit_line,
        )
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        return _exit(f"failed to load config {config_path}: {exc}", exit_line + 5)
    if not isinstance(config, dict):
        return _exit(f"failed to load config {config_path}: not a mapping", exit_line + 5)
    # Like every real release: the version is the first line logged at start.
    _log(f"Version: {_VERSION}", f"server.go:{version_line}")
    if _rewrites_config():
        _rewrite_config(config_path, config)
    default_db = os.path.join(_root_from_config(config_path), "var/lib/kubeedge/edgecore.db")
    db_path = str(_section(config, "database").get("dataSource") or default_db)
    try:
        _migrate(db_path)
    except sqlite3.Error as exc:
        _klog("E", "dbm.go:60", f"failed to open database {db_path}: {exc}")
        return 1

    if _BEHAVIOUR == "crash":
        # Soon after start, as a bad config or database does; well inside the
        # sandbox tests' 0.5 s health grace even on a loaded machine.
        time.sleep(0.1)
        _klog("E", "core.go:88", "panic: simulated crash on start")
        return 1
    if _BEHAVIOUR != "ok":
        _klog("E", "core.go:88", f"unknown stand-in behaviour {_BEHAVIOUR!r}")
        return 2

    # A plain flag, never Event.set() in the handler: the handler runs in the main
    # thread, which may hold the Event's lock inside Event.wait() when the signal
    # lands; set() then waits for that lock forever (2 SIGTERMs in 1,500 hung).
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = _start_metaserver(config)
    except (OSError, ValueError) as exc:
        _klog("E", "server.go:60", f"failed to start metaserver: {exc}")
        return 1
    _log("stand-in edgecore started, all modules running")
    # Timed sleeps: the handler runs when one is interrupted, the flag is seen next.
    while not stopping:
        time.sleep(0.1)
    if server is not None:
        server.shutdown()
        server.server_close()
    _log("stopped", "core.go:62")
    return 0


class _FlagError(Exception):
    pass


class _Help(Exception):
    pass


def _parse(argv: list[str]) -> str:
    """The config path, parsed the way cobra/pflag parse edgecore's flags."""
    config = _DEFAULT_CONFIG
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break  # the rest is positional, and edgecore ignores arguments
        if not arg.startswith("-") or arg == "-":
            continue
        if not arg.startswith("--"):
            if arg == "-h":
                raise _Help
            raise _FlagError(f"unknown shorthand flag: '{arg[1]}' in {arg}")
        name, eq, value = arg[2:].partition("=")
        if name == "help":
            raise _Help
        if name == "config":
            if not eq:
                if not args:
                    raise _FlagError("flag needs an argument: --config")
                value = args.pop(0)
            config = value
        elif name == "version":
            # verflag's hidden flag: takes an optional bool (or "raw"), does nothing.
            if eq and value not in _BOOL_OR_RAW:
                raise _FlagError(
                    f'invalid argument "{value}" for "--version" flag: '
                    f'strconv.ParseBool: parsing "{value}": invalid syntax'
                )
        else:
            raise _FlagError(f"unknown flag: --{name}")
    return config


def _usage_error(msg: str) -> int:
    sys.stderr.write(f"Error: {msg}\n{_USAGE}")
    sys.stderr.flush()
    return 1


def main(argv: list[str]) -> int:
    try:
        config = _parse(argv)
    except _FlagError as exc:
        return _usage_error(str(exc))
    except _Help:
        sys.stdout.write(_HELP)
        return 0
    return _run(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
