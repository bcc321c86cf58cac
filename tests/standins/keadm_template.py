"""Template for the stand-in `keadm` binary.

The builder in tests/standins/__init__.py prepends a shebang plus VERSION and
BEHAVIOUR assignments; the fallbacks below only exist so the template itself can
be imported and type-checked. The generated script must be standalone (stdlib +
yaml), which is why the edgecore start/stop helpers duplicate those in
__init__.py instead of importing them.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import NoReturn

_VERSION = str(globals().get("VERSION", "v0.0.0"))
_BEHAVIOUR = str(globals().get("BEHAVIOUR", "ok"))

_DEFAULT_IMAGE = "kubeedge/installation-package"
# Lets agent tests assert the exact argv the agent chose for each keadm era.
_ARGV_LOG_ENV = "KEADM_STANDIN_ARGV_LOG"
_USAGE = """Usage:
  keadm version
  keadm upgrade --toVersion T [--upgradeID ID --historyID HID --fromVersion F --config C --image I]
  keadm upgrade edge --toVersion T [--force] [--config C] [--image I] [--image-digest D] ...
"""


class _CobraError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 with its own wording; cobra prints "Error: ..." and exits 1.
    def error(self, message: str) -> NoReturn:
        raise _CobraError(message)


def _progress(msg: str) -> None:
    print(f"[keadm {_VERSION}] {msg}", flush=True)


def _fail(msg: str) -> int:
    sys.stderr.write(f"Error: {msg}\n")
    sys.stderr.flush()
    return 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return False
    # comm may contain ')' so split after the last one; a zombie counts as dead
    # because orphans may never be reaped inside a container.
    state = stat.rpartition(")")[2].split()[0]
    # A recycled pid must not be mistaken for edgecore (and then killed).
    return state not in ("Z", "X") and b"edgecore" in cmdline


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile, encoding="utf-8") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _systemd(root: str) -> bool:
    # Like the real keadm: on a systemd host (and not in a sandbox root) the
    # edgecore unit is stopped and started with systemctl.
    return root == "/" and os.path.isdir("/run/systemd/system")


def _systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args, "edgecore.service"], check=True, timeout=60)
    _progress(f"systemctl {' '.join(args)} edgecore.service")


def _stop_edgecore(root: str) -> None:
    if _systemd(root):
        _systemctl("stop")
        return
    pidfile = os.path.join(root, "run", "edgecore.pid")
    pid = _read_pid(pidfile)
    if pid is not None and _alive(pid):
        _progress(f"stopping edgecore (pid {pid})")
        try:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 5.0):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 2.0)
        except ProcessLookupError:
            pass
    else:
        _progress("edgecore is not running")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)


def _start_edgecore(root: str, config: str) -> int:
    if _systemd(root):
        _systemctl("start")
        return 0
    binary = os.path.join(root, "usr", "local", "bin", "edgecore")
    log_path = os.path.join(root, "var", "log", "edgecore.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        # New session + no inherited fds: edgecore must outlive keadm and must
        # not hold the caller's stdout pipe open.
        proc = subprocess.Popen(
            [binary, "--config", config],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
        )
    pidfile = os.path.join(root, "run", "edgecore.pid")
    os.makedirs(os.path.dirname(pidfile), exist_ok=True)
    tmp = f"{pidfile}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{proc.pid}\n")
    os.replace(tmp, pidfile)
    _progress(f"started edgecore (pid {proc.pid})")
    return proc.pid


def _install_binary(new_bin: str, target: str) -> None:
    tmp = os.path.join(os.path.dirname(target), ".edgecore.new")
    with open(new_bin, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    dirfd = os.open(os.path.dirname(target), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    _progress(f"installed new edgecore at {target}")


def _hang() -> NoReturn:
    # The child stays in our process group, so only a group kill cleans up both.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    _progress(f"waiting for image pull (child pid {child.pid})")
    while True:
        time.sleep(3600)


def _upgrade(args: argparse.Namespace) -> int:
    root = os.environ.get("EDGE_UPGRADE_ROOT", "/")
    config = args.config or os.path.join(root, "etc", "kubeedge", "config", "edgecore.yaml")
    image = args.image or _DEFAULT_IMAGE
    _progress(f"upgrading edge node from {args.fromVersion or '?'} to {args.toVersion}")
    lock = os.path.join(root, "etc", "kubeedge", "idempotency_record")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _fail("last upgrade not finished")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    _progress(f"created upgrade record {lock}")
    if _BEHAVIOUR == "hang":
        _hang()
    try:
        return _run_behaviour(root, config, image, args.toVersion)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _run_behaviour(root: str, config: str, image: str, to_version: str) -> int:
    new_bin = os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "edgecore")
    if not os.path.isfile(new_bin):
        return _fail(f"new edgecore binary not found at {new_bin}")
    _progress(f"pulling image {image}:{to_version}")
    target = os.path.join(root, "usr", "local", "bin", "edgecore")
    if _BEHAVIOUR == "fail":
        return _fail(f"failed to pull image {image}:{to_version}: simulated")
    if _BEHAVIOUR == "fail-after-stop":
        _stop_edgecore(root)
        os.truncate(target, 0)
        return _fail(f"failed to copy edgecore to {target}: simulated I/O error")
    if _BEHAVIOUR not in ("ok", "ok-no-restart"):
        sys.stderr.write(f"Error: unknown stand-in behaviour {_BEHAVIOUR!r}\n")
        return 2
    _stop_edgecore(root)
    _install_binary(new_bin, target)
    if _BEHAVIOUR == "ok":
        _start_edgecore(root, config)
    _progress(f"upgrade to {to_version} finished")
    return 0


def _upgrade_parser(edge: bool) -> _Parser:
    parser = _Parser(prog="keadm upgrade edge" if edge else "keadm upgrade", allow_abbrev=False)
    parser.add_argument("--upgradeID", dest="upgradeID")
    parser.add_argument("--historyID", dest="historyID")
    parser.add_argument("--fromVersion", dest="fromVersion")
    parser.add_argument("--toVersion", dest="toVersion")
    parser.add_argument("--config", dest="config")
    parser.add_argument("--image", dest="image")
    if edge:
        parser.add_argument("--disable-backup", dest="disable_backup", action="store_true")
        parser.add_argument("--type", dest="type")
        parser.add_argument("--pre-run", dest="pre_run")
        parser.add_argument("--post-run", dest="post_run")
        parser.add_argument("--force", dest="force", action="store_true")
        parser.add_argument("--image-digest", dest="image_digest")
    return parser


def _unknown(extra: str, command: str) -> int:
    if extra.startswith("-"):
        return _fail(f"unknown flag: {extra.partition('=')[0]}")
    return _fail(f'unknown command "{extra}" for "{command}"')


def main(argv: list[str]) -> int:
    log_path = os.environ.get(_ARGV_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(argv) + "\n")
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0
    if argv[0] == "version":
        print(f"version: {_VERSION}", flush=True)
        return 0
    if argv[0] != "upgrade":
        return _unknown(argv[0], "keadm")
    rest = argv[1:]
    edge = bool(rest) and rest[0] == "edge"
    if edge:
        rest = rest[1:]
    parser = _upgrade_parser(edge)
    try:
        args, extras = parser.parse_known_args(rest)
    except _CobraError as exc:
        return _fail(str(exc))
    if extras:
        return _unknown(extras[0], parser.prog)
    if not args.toVersion:
        return _fail('required flag(s) "toVersion" not set')
    if edge and not args.force and args.upgradeID is None:
        return _fail("refusing to prompt without a terminal, pass --force")
    for hook in ("pre_run", "post_run"):
        if getattr(args, hook, None):
            _progress(f"{hook} script {getattr(args, hook)} accepted (stand-in does not run it)")
    return _upgrade(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
