"""Template for the stand-in `keadm` binary.

The builder in testkit/standins/__init__.py prepends a shebang, a docstring that
holds the version as a bare literal, and VERSION and BEHAVIOUR assignments; the
fallbacks below only exist so the template itself can be imported and
type-checked. The generated script must be standalone (stdlib + yaml), which is
why the edgecore start/stop helpers duplicate those in __init__.py instead of
importing them.

The upgrade follows the real keadm of each era (sources at the release tags,
v1.13.0 measured, v1.20.0 and v1.23.1 observed; ../shared/kubeedge/README.md,
../shared/design/kubeedge.md):

* Era A, ``keadm upgrade --upgradeID --historyID --fromVersion --toVersion
  --config --image`` (v1.12-v1.15), and Era B, ``keadm upgrade edge ...``
  (v1.16-v1.20): read the config, refuse while ``idempotency_record`` exists
  (and, from a deferred cleanup, remove it even then), create it, back up
  ``edgecore.db`` (from ``database.dataSource``, copied while edgecore runs),
  ``edgecore.yaml`` and ``edgecore`` to ``/etc/kubeedge/backup/<fromVersion>/``
  (Era B unless ``--disable-backup``), pull, stage the new binary under
  ``/etc/kubeedge/upgrade/<toVersion>/`` (left behind), stop edgecore (on
  systemd: stop, disable, delete the unit file, daemon-reload), install the
  binary, write keadm's own unit file, daemon-reload, enable, start; log that
  the report to the cloud (``edgeHub.httpServer``) failed; exit 0.
* Era B pulls ``--image`` exactly as given: no default, no tag added, so a
  bare repo means ``<repo>:latest``, which is not there: exit 1, edgecore
  untouched. ``--toVersion`` only names the staging dir.
* Era C, ``keadm upgrade edge --force ...`` (v1.21+, or any ``--force``):
  pulls ``<--image, default kubeedge/installation-package>:<--toVersion>``
  (a tagged ``--image`` makes ``<repo>:<tag>:<toVersion>``: invalid, exit 1);
  without ``--force`` (and without ``--upgradeID``) it asks y/N on stdin and,
  with no "y", does nothing and exits 0. No backup, the unit file is kept,
  the staging dir is removed at the end, and the result goes to
  ``/etc/kubeedge/upgrade_report.json``. The current version comes from
  MetaServer's kubeletVersion, else ``edgecoreVersion`` in the config.
* Eras B and C pull through CRI only (v1.19+): ImageStatus first, no pull when
  the image is in the runtime's store, never any registry credentials; the
  new edgecore is copied out of the image by a privileged pod sandbox. With
  ``EDGE_STANDIN_CRI_SOCKET`` set, or edgecore.yaml's
  ``tailoredKubeletConfig.containerRuntimeEndpoint`` naming a unix socket
  that exists (the real keadm's source), the stand-in asks
  that containerd (``ctr ... images ls name==<CRI name>``, namespace k8s.io):
  present, it goes on; absent, the pull fails as an anonymous pull from a
  private registry does (401). Without it, the package's edgecore beside the
  stand-in is "the image", present under any explicit tag (not ``latest``).

Under a sandbox root (EDGE_UPGRADE_ROOT, no systemd) edgecore is stopped and
started through <root>/run/edgecore.pid, and the unit rewrite applies to
<root>/etc/systemd/system/edgecore.service if that file exists.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from typing import Any, NoReturn

import yaml

_VERSION = str(globals().get("VERSION", "v0.0.0"))
_BEHAVIOUR = str(globals().get("BEHAVIOUR", "ok"))

_DEFAULT_IMAGE = "kubeedge/installation-package"
_UNIT = "edgecore.service"
# keadm writes these paths as constants: they are not taken from any flag.
_BINARY_ON_HOST = "/usr/local/bin/edgecore"
# Lets agent tests assert the exact argv the agent chose for each keadm era.
_ARGV_LOG_ENV = "KEADM_STANDIN_ARGV_LOG"
# A containerd socket: Eras B and C then ask it, as CRI ImageStatus does, whether
# the image is in the runtime's store (see _image_present).
_CRI_SOCKET_ENV = "EDGE_STANDIN_CRI_SOCKET"
_CRI_NAMESPACE = "k8s.io"  # the only namespace CRI's ImageStatus sees
# The docker/distribution reference grammar, as CRI parses an image name.
_DOMAIN = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])" \
          r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?"
# distribution's separator is (?:[._]|__|[-]*); an empty one adds nothing to the
# language here and makes Python's backtracking exponential on a bad reference.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
# Where an Era C keadm (v1.21+) writes its result; the new edgecore relays it to
# the cloud and deletes it (edge/pkg/taskmanager/hub_connected_hooker.go).
_UPGRADE_REPORT = os.path.join("etc", "kubeedge", "upgrade_report.json")
_DEFAULT_HTTP_SERVER = "https://127.0.0.1:10002"
_USAGE = """Usage:
  keadm version
  keadm upgrade --toVersion T [--upgradeID ID --historyID HID --fromVersion F --config C --image I]
  keadm upgrade edge --toVersion T [--force] [--config C] [--image I] [--image-digest D] ...
"""
# Era A's flags and help lines, as `keadm upgrade --help` of v1.12.1/v1.13.0 prints them.
_ERA_A_HELP = """Upgrade edge component. Upgrade the edge node to the desired version.

Usage:
  keadm upgrade [flags]

Flags:
      --config string        Use this key to specify the path to the edgecore configuration \
file. (default "/etc/kubeedge/config/edgecore.yaml")
      --fromVersion string   Use this key to specify the origin version before upgrade
  -h, --help                 help for upgrade
      --historyID string     Use this key to specify Upgrade CR status history ID.
      --image string         Use this key to specify installation image to download.
      --toVersion string     Use this key to upgrade the required KubeEdge version \
(default "{to_version}")
      --upgradeID string     Use this key to specify Upgrade CR ID
"""
_EDGE_HELP = """Upgrade the edge node to the desired version.

Usage:
  keadm upgrade edge [flags]

Flags:
      --config string         (default "/etc/kubeedge/config/edgecore.yaml")
      --disable-backup
      --force
      --fromVersion string
  -h, --help                  help for edge
      --historyID string
      --image string
      --image-digest string
      --post-run string
      --pre-run string
      --toVersion string      (default "{to_version}")
      --type string           (default "upgrade")
      --upgradeID string
"""
_UPGRADE_TIPS = (
    "Upgrade will automatically back up the edge node's data and configuration files "
    "before upgrading. (stand-in: Era C does not back up)"
)


class _CobraError(Exception):
    pass


class _HelpRequested(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 with its own wording; cobra prints "Error: ..." and exits 1.
    def error(self, message: str) -> NoReturn:
        needs = re.fullmatch(r"argument (--[\w-]+): expected one argument", message)
        raise _CobraError(f"flag needs an argument: {needs[1]}" if needs else message)

    def print_help(self, file: Any = None) -> None:
        raise _HelpRequested


class _StepError(Exception):
    """An upgrade step failed; the message is keadm's error text."""


def _minor() -> int | None:
    match = re.match(r"v1\.(\d+)\.", _VERSION)
    return int(match.group(1)) if match else None


def _default_to_version(era: str) -> str:
    # keadm's DefaultKubeEdgeVersion lags: v1.13.0 defaults to v1.12.0, v1.12.1 to
    # v1.11.0; from v1.22 it is the minor's own .0.
    minor = _minor()
    if minor is None:
        return "v1.0.0"
    return f"v1.{minor if era == 'C' else minor - 1}.0"


def _progress(msg: str) -> None:
    print(f"[keadm {_VERSION}] {msg}", flush=True)


def _klog(severity: str, where: str, msg: str) -> None:
    now = datetime.now()
    sys.stderr.write(
        f"{severity}{now:%m%d %H:%M:%S}.{now.microsecond:06d} {os.getpid():7d} {where}] {msg}\n"
    )
    sys.stderr.flush()


def _fail(msg: str, usage: str = "Usage:\n  keadm upgrade [flags]\n") -> int:
    # cobra prints the error and the usage on stderr; keadm's main() then prints
    # its own line on stdout and exits 1.
    sys.stderr.write(f"Error: {msg}\n{usage}\n")
    sys.stderr.flush()
    print(f"execute keadm command failed:  {msg}", flush=True)
    return 1


def _go_error(op: str, path: str, exc: OSError) -> str:
    # Go's *PathError text, e.g. "open /x: no such file or directory".
    reason = (exc.strerror or str(exc)).lower()
    return f"{op} {path}: {reason}"


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


def _sh(*argv: str) -> None:
    # keadm runs these through `sh -c` and fails on a non-zero exit.
    proc = subprocess.run(list(argv), check=False, timeout=60)
    _progress(" ".join(argv))
    if proc.returncode != 0:
        raise _StepError(f"exit status {proc.returncode}")


def _systemctl(*args: str) -> None:
    _sh("systemctl", *args, _UNIT)


def _unit_path(root: str) -> str:
    return os.path.join(root, "etc", "systemd", "system", _UNIT)


def _unit_text(config: str) -> str:
    """keadm's own edgecore.service (common/content.go, extsystem/simple.service)."""
    minor = _minor()
    extra = ""
    if minor is not None and minor >= 20:
        extra = 'Environment="DEPLOY_MQTT_CONTAINER=false"\nKillMode=process\n'
    elif minor is not None and minor >= 16:
        extra = "Environment=DEPLOY_MQTT_CONTAINER=false\nKillMode=process\n"
    elif minor == 15:
        extra = "Environment=DEPLOY_MQTT_CONTAINER=false\n"
    return (
        "[Unit]\nDescription=edgecore.service\n\n[Service]\nType=simple\n"
        f"ExecStart={_BINARY_ON_HOST} --config {config}\nRestart=always\nRestartSec=10\n"
        f"{extra}\n[Install]\nWantedBy=multi-user.target\n"
    )


def _write_unit(path: str, config: str) -> None:
    # os.WriteFile(path, content, os.ModePerm) on a path keadm just removed.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o777)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(_unit_text(config))
    _progress(f"wrote {path}")


def _unit_enabled(name: str) -> bool:
    # `systemctl list-unit-files | grep enabled | grep <name>`, as keadm checks it
    # (so "edge" also matches e.g. edge-upgrade-agent.service).
    proc = subprocess.run(
        ["systemctl", "list-unit-files"], capture_output=True, text=True, check=False, timeout=60
    )
    return any("enabled" in line and name in line for line in proc.stdout.splitlines())


def _kill_edgecore_systemd(era: str) -> None:
    if era == "C":
        _systemctl("stop")
        return
    # util.KillKubeEdgeBinary("edgecore") of v1.12-v1.20.
    service = ""
    if _unit_enabled("edge"):
        service = "edge"
    if _unit_enabled("edgecore"):
        service = "edgecore"
    if not service:
        _sh("pkill", "edgecore")
        return
    _sh("systemctl", "stop", f"{service}.service")
    _sh("systemctl", "disable", f"{service}.service")
    unit = f"/etc/systemd/system/{service}.service"
    if os.path.exists(unit):
        os.unlink(unit)
        _progress(f"rm {unit}")
    _sh("systemctl", "daemon-reload")


def _stop_edgecore(root: str, era: str) -> None:
    if _systemd(root):
        _kill_edgecore_systemd(era)
        print("edgecore is stopped", flush=True)
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
    if era != "C" and os.path.exists(_unit_path(root)):
        # What stop/disable/rm did to the unit on a systemd host.
        os.unlink(_unit_path(root))
        _progress(f"rm {_unit_path(root)}")


def _start_edgecore(root: str, config: str, era: str, unit_removed: bool, start: bool) -> None:
    if _systemd(root):
        if era != "C":
            _write_unit(_unit_path("/"), config)
            _sh("systemctl", "daemon-reload")
            _sh("systemctl", "enable", "edgecore")
            if start:
                _sh("systemctl", "start", "edgecore")
        elif start:
            _systemctl("start")
        return
    if unit_removed:
        _write_unit(_unit_path(root), config)
    if not start:
        return
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


def _copy(src: str, dst: str) -> None:
    """keadm's copy(): a regular file, dst opened O_TRUNC with src's mode."""
    st = os.stat(src)
    if not os.path.isfile(src):
        raise OSError(f"{src} is not a regular file")
    with open(src, "rb") as source:
        fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o7777)
        with os.fdopen(fd, "wb") as destination:
            shutil.copyfileobj(source, destination)


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


def _section(data: Any, *keys: str) -> dict[str, Any]:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def _backup(root: str, config: str, cfg: dict[str, Any], from_version: str) -> None:
    """PreProcess of v1.12-v1.20: plain copies, overwriting an earlier backup."""
    backup = os.path.join(root, "etc", "kubeedge", "backup", from_version)
    os.makedirs(backup, 0o750, exist_ok=True)
    data_source = str(_section(cfg, "database").get("dataSource") or "")
    binary = os.path.join(root, "usr", "local", "bin", "edgecore")
    for src, name, what in (
        (data_source, "edgecore.db", "failed to backup db"),
        (config, "edgecore.yaml", "failed to back config"),
        (binary, "edgecore", "failed to backup edgecore"),
    ):
        try:
            _copy(src, os.path.join(backup, name))
        except OSError as exc:
            detail = _go_error("stat", src, exc) if exc.strerror else str(exc)
            raise _StepError(f"{what}: {detail}") from exc
    _progress(f"backed up edgecore.db, edgecore.yaml and edgecore to {backup}")


def _split_reference(ref: str) -> tuple[str, str, str]:
    """(name, tag, digest) of a valid reference; tag and digest may be empty."""
    name, _, digest = ref.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest


def _cri_name(ref: str) -> str:
    """The name CRI gives ``ref``: ``docker.io/library/x:tag`` for ``x:tag``,
    ``docker.io/<ns>/<name>:tag`` for a Docker Hub path without a host, any
    other host unchanged; no tag and no digest means ``:latest``."""
    name, tag, digest = _split_reference(ref)
    first, slash, rest = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + (name if slash else f"library/{name}")
    elif first == "docker.io" and "/" not in rest:
        name = f"docker.io/library/{rest}"
    if not tag and not digest:
        tag = "latest"
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _cri_socket(cfg: dict[str, Any]) -> str | None:
    """The runtime socket keadm v1.19+ talks CRI to: EDGE_STANDIN_CRI_SOCKET, else, as the
    real keadm reads it, edgecore.yaml's tailoredKubeletConfig.containerRuntimeEndpoint
    when that is a unix socket that exists (a sandbox's edgecore.yaml names none)."""
    if os.environ.get(_CRI_SOCKET_ENV):
        return os.environ[_CRI_SOCKET_ENV]
    edged = (cfg.get("modules") or {}).get("edged") or {}
    tailored = edged.get("tailoredKubeletConfig") if isinstance(edged, dict) else None
    endpoint = tailored.get("containerRuntimeEndpoint") if isinstance(tailored, dict) else None
    if isinstance(endpoint, str) and endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if os.path.exists(path):
            return path
    return None


def _image_present(ref: str, normalized: str, sock: str | None) -> bool:
    """CRI ImageStatus: is ``normalized`` in the runtime's store?

    With EDGE_STANDIN_CRI_SOCKET, the stand-in asks that containerd with
    ``ctr images ls`` (argv list, no shell), in CRI's namespace k8s.io; the
    output has a header line, then one line per image, its name first.
    Without it, the package's edgecore beside this script is the image,
    present under any explicit tag (there is no ``latest`` in that store).
    """
    if not sock:
        return _split_reference(ref)[1] not in ("", "latest") or "@" in ref
    argv = ["ctr", "--address", sock, "--namespace", _CRI_NAMESPACE,
            "images", "ls", f"name=={normalized}"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _StepError(f"failed to get image status {normalized}: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise _StepError(f"failed to get image status {normalized}: rpc error: "
                         f"code = Unavailable desc = {detail}")
    return any(line.split()[:1] == [normalized] for line in proc.stdout.splitlines()[1:])


def _pull(ref: str, cfg: dict[str, Any]) -> str:
    """Make sure ``ref`` is in the runtime's store, the way keadm v1.19+ does
    through CRI (never with registry credentials); its CRI name, or raises
    _StepError with keadm's text ("failed to pull image <ref>: ...")."""
    if not _REFERENCE.fullmatch(ref):
        raise _StepError(f"failed to pull image {ref}: rpc error: code = Unknown desc = "
                         f'failed to pull and unpack image "{ref}": failed to resolve '
                         f'reference "{ref}": invalid reference format')
    normalized = _cri_name(ref)
    try:
        sock = _cri_socket(cfg)
        present = _image_present(ref, normalized, sock)
    except _StepError as exc:
        raise _StepError(f"failed to pull image {ref}: {exc}") from exc
    if present:
        _klog("I", "container_runtime.go:64",
              f"ImageStatus: image {normalized} is already in the runtime's store, "
              "skipping the pull")
        return normalized
    _klog("I", "container_runtime.go:68", f"pulling image {normalized} (no registry auth)")
    name, tag, digest = _split_reference(normalized)
    host, _, path = name.partition("/")
    if host == "docker.io":
        host = "registry-1.docker.io"
    if sock:
        # A private registry asked anonymously, as CRI's PullImage with no auth is.
        why = (f"unexpected status from HEAD request to https://{host}/v2/{path}/manifests/"
               f"{digest or tag}: 401 Unauthorized")
        code = "Unknown"
    else:
        why = f"{normalized}: not found"
        code = "NotFound"
    raise _StepError(f"failed to pull image {ref}: rpc error: code = {code} desc = failed to "
                     f'pull and unpack image "{normalized}": failed to resolve reference '
                     f'"{normalized}": {why}')


def _copy_out_of_image(normalized: str, new_bin: str, staged: str) -> None:
    """keadm v1.19+ copies edgecore out of the image with a throw-away pod: the
    stand-in copies the package's edgecore and logs what the real one runs."""
    _klog("I", "container_runtime.go:101",
          f"copying {_BINARY_ON_HOST} out of image {normalized} to {staged} through a "
          'privileged pod sandbox (host network) running sh -c "sleep infinity"')
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    shutil.copyfile(new_bin, staged)
    os.chmod(staged, 0o755)


def _load_config(config: str) -> tuple[dict[str, Any], str | None]:
    """edgecore.yaml as a mapping, or keadm's error text."""
    try:
        with open(config, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        return {}, f"failed to read config file {config}: {_go_error('open', config, exc)}"
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        return {}, f"failed to unmarshal config file {config}: {exc}"
    if not isinstance(cfg, dict):
        return {}, f"failed to unmarshal config file {config}: not a mapping"
    return cfg, None


def _report_url(cfg: dict[str, Any], upgrade_id: str) -> str:
    # v1.16+: {httpServer}/task/{taskType}/name/{taskID}/node/{nodeName}/status.
    server = str(_section(cfg, "modules", "edgeHub").get("httpServer") or _DEFAULT_HTTP_SERVER)
    node = str(_section(cfg, "modules", "edged").get("hostnameOverride")
               or socket.gethostname())
    return f"{server}/task/upgrade/name/{upgrade_id}/node/{node}/status"


def _report_failed(cfg: dict[str, Any]) -> None:
    # No cloud here: the report fails, is logged, and does not change the exit code.
    ca = str(_section(cfg, "modules", "edgeHub").get("tlsCaFile") or "")
    reason = f"failed to read ca: open {ca}: no such file or directory"
    if ca and os.path.exists(ca):
        reason = "post http request failed: stand-in keadm has no cloud to report to"
    _klog("E", "upgrade.go:104", f"failed to report upgrade result to cloud: {reason}")


def _upgrade_ab(args: argparse.Namespace, era: str, root: str, config: str, lock: str) -> int:
    """`keadm upgrade` of v1.12-v1.15 and `keadm upgrade edge` of v1.16-v1.20."""
    usage = f"Usage:\n  keadm upgrade{' edge' if era == 'B' else ''} [flags]\n"
    cfg, problem = _load_config(config)
    if problem is not None:
        return _fail(problem, usage)
    try:
        error = _run_ab(args, era, config, cfg, root=root, lock=lock)
    finally:
        # The deferred report and cleanup: they run before cobra prints the
        # error, and the record goes even when it was someone else's. It always
        # tries edgeHub.httpServer; a failure is only logged.
        if era == "B":
            _klog("I", "upgrade.go:98", "reporting upgrade result to "
                  f"{_report_url(cfg, args.upgradeID or '')}")
        _report_failed(cfg)
        try:
            os.unlink(lock)
        except OSError as exc:
            _klog("E", "upgrade.go:108", f"failed to remove idempotency_record file({lock}): "
                  f"{_go_error('remove', lock, exc)}")
    return 0 if error is None else _fail(error, usage)


def _run_ab(args: argparse.Namespace, era: str, config: str, cfg: dict[str, Any], *,
            root: str, lock: str) -> str | None:
    if os.path.exists(lock):
        return "last upgrade not finished, not allowed upgrade again"
    os.makedirs(os.path.dirname(lock), 0o750, exist_ok=True)
    with open(lock, "w", encoding="utf-8"):
        pass  # os.Create: an empty file
    _progress(f"created upgrade record {lock}")
    _klog("I", "upgrade.go:160", "upgrade preprocess start")
    if not getattr(args, "disable_backup", False):
        try:
            _backup(root, config, cfg, args.fromVersion or "")
        except _StepError as exc:
            return f"upgrade pre process failed: {exc}"
    _klog("I", "upgrade.go:180", f"Begin to download version {args.toVersion} edgecore")
    if _BEHAVIOUR == "hang":
        _hang()
    # Era A: the full reference edgehub passed; Era B: --image exactly as given
    # (no default, no tag added), --toVersion only names the staging dir.
    image = args.image or ""
    new_bin = os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "edgecore")
    _progress(f"pulling image {image}")
    normalized = image
    if era == "B":
        try:
            normalized = _pull(image, cfg)
        except _StepError as exc:
            return f"upgrade pre process failed: pull image failed: {exc}"
    if _BEHAVIOUR == "fail" or not os.path.isfile(new_bin):
        why = "simulated" if _BEHAVIOUR == "fail" else f"no edgecore in the image ({new_bin})"
        return f"upgrade pre process failed: pull image failed: " \
               f"failed to pull image {image}: {why}"
    staged = os.path.join(root, "etc", "kubeedge", "upgrade", args.toVersion, "edgecore")
    if era == "B":
        _copy_out_of_image(normalized, new_bin, staged)
    else:
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        shutil.copyfile(new_bin, staged)
        os.chmod(staged, 0o755)
    _klog("I", "upgrade.go:232", "upgrade process start")
    return _process(root, config, era, staged, args.toVersion)


def _process(root: str, config: str, era: str, new_bin: str, to_version: str) -> str | None:
    """Stop, install, (rewrite the unit,) start: the error text, or None."""
    target = os.path.join(root, "usr", "local", "bin", "edgecore")
    if _BEHAVIOUR not in ("ok", "ok-no-restart", "fail-after-stop"):
        return f"unknown stand-in behaviour {_BEHAVIOUR!r}"
    unit_removed = era != "C" and os.path.exists(_unit_path(root))
    try:
        _stop_edgecore(root, era)
    except _StepError as exc:
        return f"upgrade process failed: failed to stop edgecore: {exc}"
    if _BEHAVIOUR == "fail-after-stop":
        # A keadm that dies half-way: edgecore stopped, binary broken, no rollback.
        os.truncate(target, 0)
        return f"failed to copy edgecore to {target}: simulated I/O error"
    _install_binary(new_bin, target)
    try:
        _start_edgecore(root, config, era, unit_removed, start=_BEHAVIOUR == "ok")
    except _StepError as exc:
        return f"upgrade process failed: failed to start edgecore: {exc}"
    _progress(f"upgrade to {to_version} finished")
    return None


def _current_version(cfg: dict[str, Any]) -> str:
    """keadm v1.21+: MetaServer's kubeletVersion suffix, else edgecoreVersion in the config."""
    meta = _section(cfg, "modules", "metaManager", "metaServer")
    if meta.get("enable"):
        server = str(meta.get("server") or "127.0.0.1:10550")
        node = str(_section(cfg, "modules", "edged").get("hostnameOverride")
                   or socket.gethostname())
        try:
            with urllib.request.urlopen(
                    f"http://{server}/api/v1/nodes/{node}", timeout=2) as resp:
                body = json.loads(resp.read(1024 * 1024))
            kubelet = str(body["status"]["nodeInfo"]["kubeletVersion"])
            # "v1.22.17-kubeedge-v1.13.0": the part after the second "-".
            parts = kubelet.split("-", 2)
            if len(parts) == 3 and parts[2]:
                return parts[2]
        except (OSError, ValueError, KeyError, TypeError):
            _klog("W", "edgecore.go:52", "failed to get the edgecore version from MetaServer")
    value = cfg.get("edgecoreVersion")
    return value if isinstance(value, str) else ""


def _write_report(root: str, from_version: str, to_version: str, error: str | None) -> None:
    """Era C's result file.

    The README gives no shape; this is the one read from v1.21+'s
    pkg/upgrade/edge/upgrade_reporter.go (../shared/design/kubeedge.md, code
    reading): {"event", "success", "fromVersion", "toVersion", "errorMessage"}.
    """
    path = os.path.join(root, _UPGRADE_REPORT)
    report = {"event": "Upgrade", "success": error is None, "fromVersion": from_version,
              "toVersion": to_version, "errorMessage": error or ""}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    _progress(f"wrote upgrade report {path}")


def _upgrade_c(args: argparse.Namespace, root: str, config: str, lock: str) -> int:
    """`keadm upgrade edge` of v1.21+: no backup, the unit file is kept."""
    # <--image, default kubeedge/installation-package>:<--toVersion>, whatever
    # --image holds: a tagged one makes an invalid "<repo>:<tag>:<toVersion>".
    image = f"{args.image or _DEFAULT_IMAGE}:{args.toVersion}"
    usage = "Usage:\n  keadm upgrade edge [flags]\n"
    if not args.force and not args.upgradeID:
        print(_UPGRADE_TIPS, flush=True)
        print("Are you sure you want to proceed? [y/N]: ", end="", flush=True)
        answer = sys.stdin.readline().strip()
        if answer.lower() != "y":
            _klog("I", "upgrade.go:63", "aborted upgrade operation")
            return 0
    cfg, problem = _load_config(config)
    if problem is not None:
        return _fail(problem, usage)
    from_version = _current_version(cfg) or args.fromVersion or ""
    _progress(f"upgrading edge node from {from_version or '?'} to {args.toVersion}")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _fail("the mutually exclusive command is being executed", usage)
    os.close(fd)
    _progress(f"created upgrade record {lock}")
    if _BEHAVIOUR == "hang":
        _hang()
    staging = os.path.join(root, "etc", "kubeedge", "upgrade", args.toVersion)
    error: str | None = None
    try:
        error = _run_c(root, config, image, os.path.join(staging, "edgecore"), args.toVersion)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if args.upgradeID:
            # v1alpha1 compatibility: the HTTPS task report instead of the file.
            _klog("I", "upgrade.go:98", f"reporting upgrade result to "
                  f"{_report_url(cfg, args.upgradeID)}")
            _report_failed(cfg)
        else:
            _write_report(root, from_version, args.toVersion, error)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
    return 0 if error is None else _fail(error, usage)


def _run_c(root: str, config: str, image: str, staged: str, to_version: str) -> str | None:
    new_bin = os.path.join(os.path.dirname(os.path.realpath(sys.argv[0])), "edgecore")
    _progress(f"pulling image {image}")
    try:
        normalized = _pull(image, _load_config(config)[0])
    except _StepError as exc:
        return str(exc)
    if not os.path.isfile(new_bin):
        return f"new edgecore binary not found at {new_bin}"
    if _BEHAVIOUR == "fail":
        return f"failed to pull image {image}: simulated"
    _copy_out_of_image(normalized, new_bin, staged)
    return _process(root, config, "C", staged, to_version)


def _upgrade_parser(edge: bool) -> _Parser:
    parser = _Parser(prog="keadm upgrade edge" if edge else "keadm upgrade",
                     allow_abbrev=False, add_help=False)
    parser.add_argument("-h", "--help", action="help")
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
    usage = f"Usage:\n  {command} [flags]\n"
    if extra.startswith("-"):
        return _fail(f"unknown flag: {extra.partition('=')[0]}", usage)
    return _fail(f'unknown command "{extra}" for "{command}"', usage)


def _version_info() -> str:
    minor = _minor()
    return (
        f'version.Info{{Major:"1", Minor:"{minor if minor is not None else 0}", '
        f'GitVersion:"{_VERSION}", GitCommit:"0000000000000000000000000000000000000000", '
        'GitTreeState:"clean", BuildDate:"2026-01-01T00:00:00Z", GoVersion:"go1.19.8", '
        'Compiler:"gc", Platform:"linux/amd64"}'
    )


def main(argv: list[str]) -> int:
    log_path = os.environ.get(_ARGV_LOG_ENV)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(argv) + "\n")
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0
    if argv[0] == "version":
        print(f"version: {_version_info()}", flush=True)
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
    except _HelpRequested:
        era = "C" if (_minor() or 0) >= 21 else ("B" if edge else "A")
        sys.stdout.write((_EDGE_HELP if edge else _ERA_A_HELP)
                         .replace("{to_version}", _default_to_version(era)))
        return 0
    except _CobraError as exc:
        return _fail(str(exc), f"Usage:\n  {parser.prog} [flags]\n")
    if extras:
        return _unknown(extras[0], parser.prog)
    era = "A"
    if edge:
        era = "C" if args.force or (_minor() or 0) >= 21 else "B"
    if not args.toVersion:
        args.toVersion = _default_to_version(era)
    for hook in ("pre_run", "post_run"):
        if getattr(args, hook, None):
            _progress(f"{hook} script {getattr(args, hook)} accepted (stand-in does not run it)")
    root = os.environ.get("EDGE_UPGRADE_ROOT", "/")
    config = args.config or os.path.join(root, "etc", "kubeedge", "config", "edgecore.yaml")
    lock = os.path.join(root, "etc", "kubeedge", "idempotency_record")
    if era == "C":
        return _upgrade_c(args, root, config, lock)
    _progress(f"upgrading edge node from {args.fromVersion or '?'} to {args.toVersion}")
    return _upgrade_ab(args, era, root, config, lock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
