"""An edge host with a real systemd, for the end-to-end test.

A Debian rootfs made by debootstrap (cached: the build takes about a minute)
is imported into the test's private dockerd and run as a container whose
PID 1 is systemd, on the host network so it reaches the test broker and
registry on loopback, with the dockerd socket mounted for image pulls.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from testkit.broker import Broker
from testkit.dockerenv import (
    Dockerd,
    Registry,
    build_package_image,
    pull_events,
    push,
    remove_image,
    stream_errors,
)
from testkit.kubeedge_real import minconfig
from testkit.pki import make_pki

# A cache kept across runs (and reboots), as the rootfs build takes a minute.
CACHE = Path(os.environ.get(
    "EDGE_UPGRADE_E2E_CACHE", "/var/tmp/edge-upgrade-agent-e2e"))  # noqa: S108
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,python3-yaml,procps,sudo"
MIRROR = os.environ.get("EDGE_UPGRADE_E2E_MIRROR", "http://deb.debian.org/debian")


class HostUnavailable(RuntimeError):
    """debootstrap or a systemd container cannot run here."""


def rootfs_tar() -> Path:
    """The cached rootfs tarball, built on first use."""
    tar = CACHE / f"rootfs-{SUITE}-{PACKAGES.replace(',', '_')}.tar"
    if tar.exists():
        return tar
    if shutil.which("debootstrap") is None:
        raise HostUnavailable("debootstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / "rootfs.build"
    shutil.rmtree(root, ignore_errors=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), MIRROR],
        capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise HostUnavailable(f"debootstrap failed: {proc.stderr[-2000:]}")
    partial = tar.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
    partial.replace(tar)
    shutil.rmtree(root, ignore_errors=True)
    return tar


class EdgeHost:
    def __init__(self, client: Any, image: str, mounts: dict[str, str],
                 name: str | None = None) -> None:
        self.client = client
        self.image = image
        self.mounts = mounts
        self.name = name or f"edge-host-{os.getpid()}"
        self.container: Any = None

    def start(self) -> None:
        volumes = {src: {"bind": dst.rstrip(":ro"), "mode": "ro" if dst.endswith(":ro") else "rw"}
                   for src, dst in self.mounts.items()}
        self.container = self.client.containers.run(
            self.image, ["/lib/systemd/systemd"], detach=True, network_mode="host",
            cap_add=["SYS_ADMIN"], tmpfs={"/run": "", "/run/lock": ""},
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"}, **volumes},
            environment={"container": "docker"}, name=self.name)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            _, out = self.sh("systemctl is-system-running || true")
            if out.strip() in ("running", "degraded"):
                return
            time.sleep(0.5)
        raise HostUnavailable(f"systemd did not come up in the container: {out!r}")

    def sh(self, script: str, timeout: float = 300) -> tuple[int, str]:
        result = self.container.exec_run(["timeout", str(int(timeout)), "bash", "-c", script],
                                         demux=False)
        return int(result.exit_code), result.output.decode(errors="replace")

    def ok(self, script: str, timeout: float = 300) -> str:
        code, out = self.sh(script, timeout)
        if code != 0:
            raise AssertionError(f"`{script}` exited {code}:\n{out[-3000:]}")
        return out

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
        self.container.put_archive("/", buf.getvalue())

    def stop(self) -> None:
        if self.container is not None:
            self.container.remove(force=True)

    # -- additions for the real-KubeEdge test and bench ----------------------

    def spawn(self, script: str) -> None:
        """Run ``script`` in the background inside the host (not waited for)."""
        self.container.exec_run(["bash", "-c", script], detach=True)

    def read(self, path: str) -> bytes:
        """A file's bytes, read inside the host."""
        stream, _ = self.container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            handle = tar.extractfile(member) if member is not None else None
            if handle is None:
                raise FileNotFoundError(path)
            return handle.read()

    def sha256(self, *paths: str) -> dict[str, str]:
        out = self.ok("sha256sum " + " ".join(shlex.quote(p) for p in paths))
        sums = {}
        for line in out.splitlines():
            digest, _, name = line.partition("  ")
            sums[name] = digest
        return sums


# ------------------------------------------------------------------ shared rig
#
# Everything below is shared by the end-to-end tests and bench/real_upgrade.py:
# the private dockerd, registry and broker, the agent's install and config,
# and a node running the real KubeEdge edgecore under systemd.

REPO = Path(__file__).resolve().parent.parent
REGISTRY_USER, REGISTRY_PASSWORD = "edge", "e2e-secret"
HOST_IMAGE = "edge-host:e2e"
#: A static busybox (Debian's busybox-static): the package image's /bin/sh and
#: /bin/cp, which keadm v1.13's copy container runs.
BUSYBOX = Path(os.environ.get("EDGE_UPGRADE_E2E_BUSYBOX", "/bin/busybox"))
#: keadm v1.13's copy container bind-mounts /etc/kubeedge/upgrade/<to> *as a
#: path on the machine running dockerd*; the host container must see the same
#: directory at the same path.
KEADM_UPGRADE_DIR = Path("/etc/kubeedge/upgrade")


def skip_or_fail(reason: str, *require_env: str) -> NoReturn:
    """pytest.skip, or pytest.fail when any of ``require_env`` is set (CI)."""
    if any(os.environ.get(name) for name in require_env):
        pytest.fail(reason)
    pytest.skip(reason)


def build_wheelhouse(directory: Path) -> Path:
    """scripts/build-wheelhouse.sh into ``directory``; HostUnavailable if it fails."""
    proc = subprocess.run([str(REPO / "scripts/build-wheelhouse.sh"), str(directory)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise HostUnavailable(f"cannot build a wheelhouse: {proc.stderr[-500:]}")
    return directory


def agent_settings(registry: str, broker_port: int, **overrides: Any) -> dict[str, Any]:
    """agent.yaml for the e2e host: docker images from ``registry`` with the test
    credentials, MQTT to the test broker with node-1's certificate."""
    settings: dict[str, Any] = {
        "node_name": "node-1",
        "health": {"grace_seconds": 3, "start_timeout_seconds": 20, "poll_interval_seconds": 0.5},
        "precheck": {"reserve_bytes": 0},
        "images": {"backend": "docker", "docker": {"config": ""},
                   "allowed_registries": [registry],
                   "credentials": {registry: {
                       "username": REGISTRY_USER,
                       "password_file": "/etc/edge-upgrade-agent/credentials/registry"}}},
        "transport": {"kind": "mqtt", "mqtt": {
            "host": "127.0.0.1", "port": broker_port, "reconnect_min_seconds": 0.2,
            "reconnect_max_seconds": 2, "ca_file": "/etc/edge-upgrade-agent/tls/ca.crt",
            "cert_file": "/etc/edge-upgrade-agent/tls/node-1.crt",
            "key_file": "/etc/edge-upgrade-agent/tls/node-1.key"}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


def install_agent(host: EdgeHost, settings: dict[str, Any], pki_dir: Path,
                  wheels: str = "/wheels", source: str = "/src") -> None:
    """TLS files, registry password and agent.yaml (written first: install.sh
    never overwrites an operator's config), then scripts/install.sh from the
    wheelhouse; returns once the unit is active."""
    for name in ("ca.crt", "node-1.crt", "node-1.key"):
        host.put(f"/etc/edge-upgrade-agent/tls/{name}", (pki_dir / name).read_bytes(), 0o600)
    host.put("/etc/edge-upgrade-agent/credentials/registry", REGISTRY_PASSWORD.encode(), 0o600)
    host.put("/etc/edge-upgrade-agent/agent.yaml", yaml.safe_dump(settings).encode(), 0o640)
    host.ok(f"bash {source}/scripts/install.sh --wheelhouse {wheels} --node-name node-1")
    host.ok("systemctl is-active edge-upgrade-agent")


class SharedDir:
    """Make ``path`` exist on this machine for a while, then remove only what was
    created: the directories made for it, and entries added to a directory that
    existed before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: list[Path] = []
        self.before: set[str] = set()

    def __enter__(self) -> Path:
        missing = []
        p = self.path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir(mode=0o755)
            self.created.append(d)
        self.before = {e.name for e in self.path.iterdir()}
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.created:
            shutil.rmtree(self.created[0], ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name not in self.before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def real_package_files(keadm: Path | bytes, edgecore: Path | bytes) -> dict[str, bytes | Path]:
    """An installation-package rootfs for Era A's keadm: keadm and edgecore in
    /usr/local/bin, and busybox as /bin/sh and /bin/cp for keadm's copy container."""
    if not BUSYBOX.is_file():
        raise HostUnavailable(f"{BUSYBOX} missing (Debian: apt-get install busybox-static)")
    return {"/usr/local/bin/keadm": keadm, "/usr/local/bin/edgecore": edgecore,
            "/bin/sh": BUSYBOX, "/bin/cp": BUSYBOX}


#: The operator's own edgecore unit: the custom lines must survive keadm.
OPERATOR_MARK = "Environment=OPERATOR_MARK=kept"
EDGECORE_UNIT = f"""[Unit]
Description=edgecore (operator's unit)
After=network-online.target
[Service]
Type=simple
ExecStart=/usr/local/bin/edgecore --config /etc/kubeedge/config/edgecore.yaml
{OPERATOR_MARK}
KillMode=process
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
"""


def edgecore_config(version: str) -> bytes:
    """That version's own minconfig, made runnable in a container: no edged
    (needs /dev/kmsg and a CRI), no edgeHub (no cloud); the runtime stays docker,
    which is what keadm v1.12/v1.13 read to find the image store."""
    path = minconfig(version)
    if path is None:
        raise FileNotFoundError(f"no edgecore-minconfig.yaml of {version} in shared/kubeedge")
    data = yaml.safe_load(path.read_text())
    data["database"]["dataSource"] = "/var/lib/kubeedge/edgecore.db"
    edged = data["modules"]["edged"]
    edged.update({"enable": False, "hostnameOverride": "node-1", "containerRuntime": "docker"})
    data["modules"]["edgeHub"]["enable"] = False
    return yaml.safe_dump(data, sort_keys=True).encode()


def journal_version(host: EdgeHost, unit: str = "edgecore") -> str:
    """The `Version: vX.Y.Z` klog line of the unit's current invocation ('' if none yet)."""
    script = (f"inv=$(systemctl show -p InvocationID --value {unit}); "
              f'[ -n "$inv" ] && journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$inv" '
              "| grep -m1 -o 'Version: v[0-9][^ ]*' || true")
    out = host.sh(script)[1].strip()
    return out.split()[-1] if out else ""


def wait_version(host: EdgeHost, version: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < end:
        seen = journal_version(host)
        if seen == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"edgecore did not log Version: {version} (last: {seen!r})")


def install_real_edgecore(host: EdgeHost, version: str, edgecore: Path) -> None:
    """The node as an operator set it up: edgecore, its config, the operator's unit;
    started, and up once it logged its version."""
    host.put("/usr/local/bin/edgecore", edgecore.read_bytes(), 0o755)
    host.put("/etc/kubeedge/config/edgecore.yaml", edgecore_config(version), 0o644)
    host.ok("mkdir -p /var/lib/kubeedge")
    host.put("/etc/systemd/system/edgecore.service", EDGECORE_UNIT.encode(), 0o644)
    host.ok("systemctl daemon-reload && systemctl enable --now edgecore")
    wait_version(host, version)


class Rig:
    """A private dockerd with the host image imported, a registry with htpasswd,
    and (``with_broker``) a test PKI and Mosquitto. ``start`` raises
    HostUnavailable / DockerUnavailable / RegistryUnavailable when something
    cannot run here; ``stop`` is safe after a partial start."""

    def __init__(self, work: Path, with_broker: bool = True) -> None:
        self.work = work
        self.dockerd = Dockerd(work / "dockerd")
        self.registry = Registry(work / "registry", {REGISTRY_USER: REGISTRY_PASSWORD})
        self.with_broker = with_broker
        self.broker: Any = None
        self.pki: Any = None
        self.client: Any = None
        self.hosts: list[EdgeHost] = []

    @property
    def socket(self) -> str:
        return str(self.dockerd.host.removeprefix("unix://"))

    def start(self) -> None:
        tar = rootfs_tar()
        self.dockerd.start()
        self.registry.start()
        self.client = self.dockerd.client()
        with tar.open("rb") as f:
            name, tag = HOST_IMAGE.split(":")
            self.client.api.import_image_from_data(f, repository=name, tag=tag)
        if self.with_broker:
            self.pki = make_pki(self.work / "pki")
            self.broker = Broker(self.pki, self.work / "broker")
            self.broker.start()

    def package(self, version: str, files: dict[str, bytes | Path],
                repo: str = "kubeedge/installation-package") -> str:
        """Build and push ``<registry>/<repo>:<version>``; removed from the engine
        afterwards, so whoever needs it pulls it with credentials. Returns the ref."""
        ref = f"{self.registry.address}/{repo}:{version}"
        build_package_image(self.client, ref, files)
        push(self.client, ref, REGISTRY_USER, REGISTRY_PASSWORD)
        remove_image(self.client, ref)
        return ref

    def pull(self, ref: str) -> None:
        """Pull ``ref`` into the engine with the registry's credentials."""
        errors = stream_errors(pull_events(self.client, ref, REGISTRY_USER, REGISTRY_PASSWORD))
        if errors:
            raise RuntimeError(f"pull of {ref} failed: {errors}")

    def host(self, mounts: dict[str, str], name: str | None = None,
             share_upgrade_dir: bool = True) -> EdgeHost:
        """A started edge host with the engine's socket as /var/run/docker.sock and
        (for the real keadm, see KEADM_UPGRADE_DIR) keadm's upgrade directory
        shared at the same path."""
        shared = {str(KEADM_UPGRADE_DIR): str(KEADM_UPGRADE_DIR)} if share_upgrade_dir else {}
        all_mounts = {self.socket: "/var/run/docker.sock", **shared, **mounts}
        host = EdgeHost(self.client, HOST_IMAGE, all_mounts, name=name)
        self.hosts.append(host)
        host.start()
        return host

    def stop(self) -> None:
        for host in self.hosts:
            try:
                host.stop()
            except Exception as exc:  # the engine may already be gone
                print(f"cannot remove {host.name}: {exc}")
        if self.broker is not None:
            self.broker.stop()
        self.registry.stop()
        self.dockerd.stop()
