"""Executable stand-ins for KubeEdge's `keadm` and `edgecore`, plus sandboxed nodes.

Tests run the agent against a directory `root` that stands in for "/"; the
generated scripts honour the same paths the real binaries use beneath it. The
scripts are rendered from edgecore_template.py / keadm_template.py so they stay
readable, type-checked Python while still running standalone (stdlib + yaml,
interpreter = sys.executable of the builder).
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.service import version_in_log

__all__ = [
    "edgecore_pid",
    "logged_version",
    "make_image_dir",
    "make_node",
    "start_edgecore",
    "stop_edgecore",
    "write_edgecore",
    "write_keadm",
]

_HERE = Path(__file__).resolve().parent
_BIN = Path("usr", "local", "bin")
_CONFIG = Path("etc", "kubeedge", "config", "edgecore.yaml")
_DB = Path("var", "lib", "kubeedge", "edgecore.db")
_PIDFILE = Path("run", "edgecore.pid")
_LOG = Path("var", "log", "edgecore.log")
# The klog line every edgecore (real or stand-in) logs first at start, e.g.
# "I1130 15:06:04.800382   30539 server.go:103] Version: v1.13.0" (pid after the time).
# What a stand-in may be built as: a tag, printable, one line.
_VERSION_TEXT = re.compile(r"v\d+\.\d+\.\d+[0-9A-Za-z.+-]*")

# Popen handles for edgecores this process started, so they get reaped instead
# of lingering as zombies that would look alive to a naive kill(pid, 0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _render(template: str, constants: dict[str, object],
            interpreter: str | None = None) -> str:
    version = str(constants["VERSION"])
    if not _VERSION_TEXT.fullmatch(version):
        raise ValueError(f"bad stand-in version {version!r}")
    program = template.removesuffix("_template.py")
    # The end-to-end host runs the scripts with its own /usr/bin/python3.
    lines = [
        f"#!{interpreter or sys.executable}",
        # Like a real build (-X ...version.gitVersion=<tag>), the file holds its
        # version exactly once as a bare literal, a line of its own: nothing
        # printable on either side. VERSION below is quoted, so it is not one.
        f'"""Stand-in {program} from testkit/standins, built as',
        version,
        '"""',
    ]
    lines += [f"{name} = {value!r}" for name, value in constants.items()]
    body = (_HERE / template).read_text(encoding="utf-8")
    return "\n".join(lines) + "\n" + body


def _write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replace rather than rewrite in place: the old script may be executing.
    tmp = path.with_name(f".{path.name}.standin-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def write_edgecore(
    path: Path, version: str, *, behaviour: str = "ok", interpreter: str | None = None,
) -> Path:
    """Like the real edgecore: no version flag; it logs ``Version: <v>`` first at start."""
    constants: dict[str, object] = {"VERSION": version, "BEHAVIOUR": behaviour}
    return _write_executable(path, _render("edgecore_template.py", constants, interpreter))


def write_keadm(path: Path, version: str, *, behaviour: str = "ok",
                interpreter: str | None = None) -> Path:
    constants: dict[str, object] = {"VERSION": version, "BEHAVIOUR": behaviour}
    return _write_executable(path, _render("keadm_template.py", constants, interpreter))


def make_image_dir(
    images_dir: Path,
    repo: str,
    version: str,
    *,
    edgecore_behaviour: str = "ok",
    keadm_behaviour: str = "ok",
) -> Path:
    parts = Path(repo).parts
    if not parts or Path(repo).is_absolute() or ".." in parts or "/" in version:
        raise ValueError(f"bad image reference {repo!r}:{version!r}")
    image = images_dir / repo / version
    bindir = image / _BIN
    write_edgecore(bindir / "edgecore", version, behaviour=edgecore_behaviour)
    write_keadm(bindir / "keadm", version, behaviour=keadm_behaviour)
    return image


def _make_db(path: Path, version: str, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT)")
            conn.execute("INSERT INTO meta(k, v) VALUES('version', ?)", (version,))
            conn.execute("CREATE TABLE pods(id INTEGER PRIMARY KEY, name TEXT, spec TEXT)")
            # Some KB per row so a backup/restore of the DB moves real bytes.
            conn.executemany(
                "INSERT INTO pods(id, name, spec) VALUES(?, ?, ?)",
                [
                    (i, f"pod-{i}", json.dumps({"name": f"pod-{i}", "pad": f"{i:06d}" * 400}))
                    for i in range(rows)
                ],
            )
    finally:
        conn.close()


def sandbox_settings(root: Path, node: str = "node-1") -> dict[str, Any]:
    """The agent config of a sandboxed node under ``root`` (a directory standing in
    for ``/``): the process manager runs the stand-in edgecore, unpacked images
    under ``<root>/images``, fast health polling. Tests, the rehearsal and the
    benches add their transport and whatever else they measure."""
    return {
        "node_name": node,
        "paths": {"root": str(root)},
        "service": {"manager": "process"},
        "health": {"grace_seconds": 0.5, "start_timeout_seconds": 5,
                   "poll_interval_seconds": 0.1},
        "images": {"local": {"dir": "/images"}},
        "precheck": {"reserve_bytes": 0},
    }


def make_node(
    root: Path,
    version: str,
    *,
    node_name: str = "node-1",
    db_rows: int = 50,
    metaserver_port: int | None = None,
    config_version_field: bool = False,
) -> None:
    root = root.absolute()
    write_edgecore(root / _BIN / "edgecore", version)
    db_path = root / _DB
    edged: dict[str, object] = {"hostnameOverride": node_name}
    config: dict[str, object] = {
        "apiVersion": "edgecore.config.kubeedge.io/v1alpha2",
        "kind": "EdgeCore",
        "database": {"dataSource": str(db_path)},
        "modules": {
            "edged": edged,
            "metaManager": {
                "metaServer": {
                    "enable": metaserver_port is not None,
                    # 10550 is KubeEdge's default metaServer port.
                    "server": f"127.0.0.1:{metaserver_port or 10550}",
                }
            },
        },
    }
    if config_version_field:
        # A top-level field of EdgeCoreConfig, as v1.21+ edgecore writes it.
        config["edgecoreVersion"] = version
    config_path = root / _CONFIG
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    _make_db(db_path, version, db_rows)
    (root / "run").mkdir(parents=True, exist_ok=True)
    (root / "var" / "log").mkdir(parents=True, exist_ok=True)


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _alive(pid: int) -> bool:
    _reap()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # comm may contain ')' so split after the last one; zombies count as dead
    # because orphans may never be reaped inside a container.
    state = stat.rpartition(")")[2].split()[0]
    # A recycled pid must not be mistaken for edgecore (and then killed).
    return state not in ("Z", "X") and b"edgecore" in cmdline


def _read_pid(root: Path) -> int | None:
    try:
        return int((root / _PIDFILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def logged_version(root: Path, pid: int) -> str | None:
    """The version edgecore ``pid`` logged at start, from <root>/var/log/edgecore.log.

    The process manager (start_edgecore, the stand-in keadm) appends each
    edgecore's stderr there; a recycled pid's newer line wins.
    """
    try:
        with (root / _LOG).open("rb") as log:
            lines = [raw.decode(errors="replace").rstrip("\n") for raw in log]
    except OSError:
        return None
    return version_in_log(lines, pid)


def edgecore_pid(root: Path) -> int | None:
    pid = _read_pid(root)
    return pid if pid is not None and _alive(pid) else None


def start_edgecore(root: Path) -> int:
    root = root.absolute()
    running = edgecore_pid(root)
    if running is not None:
        # Overwriting the pidfile would leak a process no finalizer can find.
        raise RuntimeError(f"edgecore already running under {root} (pid {running})")
    log_path = root / _LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(root / _BIN / "edgecore"), "--config", str(root / _CONFIG)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    pidfile = root / _PIDFILE
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = pidfile.with_name(f"{pidfile.name}.tmp")
    tmp.write_text(f"{proc.pid}\n", encoding="utf-8")
    os.replace(tmp, pidfile)
    return proc.pid


def _wait_gone(pid: int, timeout: float) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop_edgecore(root: Path) -> None:
    pid = _read_pid(root)
    if pid is not None and _alive(pid):
        try:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 5.0):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 2.0)
        except ProcessLookupError:
            pass
    (root / _PIDFILE).unlink(missing_ok=True)
    _reap()
