"""The agent on a real arm64 Debian, under emulation (issue 15, item 3).

The arm64 bundle is built on this amd64 machine by
``scripts/build-wheelhouse.sh --arch arm64 --python 3.11`` and installed into
an arm64 Debian bookworm (``debootstrap --arch arm64``, cached) by
``scripts/install.sh --wheelhouse`` without any network, with that rootfs's
own arm64 python3. Every arm64 binary runs through binfmt_misc and Debian's
qemu-user-static (testkit/arm64_host.py). Then, on a sandboxed node inside
it (``service.manager: process`` with the stand-in edgecore and keadm, the
``local`` image backend, as tests/conftest.py makes one): ``config
validate``, ``upgrade --dry-run``, and one upgrade and one rollback sent to
the daemon as command files over the spool transport.

Twice, once per ``host`` parameter:

- ``systemd``: the rootfs runs as a container of the test's private dockerd
  (no network) with the arm64 systemd as PID 1, as the amd64 e2e host does.
  install.sh enables and starts the agent as its unit, which then serves the
  sandboxed node (a drop-in adds ``ReadWritePaths=/node``). One concession to
  qemu-user, in another drop-in (testkit/arm64_host.py, EMULATION_DROPIN):
  systemd 252 sets up the unit's credentials in a child forked with
  clone(CLONE_NEWNS), which qemu-user fails with EINVAL (it emulates clone()
  only as a plain fork or a thread), so LoadCredential=/SetCredential= are
  reset. systemd also skips the seccomp-based settings itself (SystemCallFilter=
  and the like): qemu-user gives its guest no seccomp.
- ``chroot``: the same rootfs entered with chroot (install.sh in a network
  namespace of its own: no network either), the daemon run as
  ``edge-upgrade-agent run`` without systemd; needs no dockerd.

Skips only where binfmt_misc cannot be mounted or qemu-user-static is missing
(and the ``systemd`` host where the private dockerd cannot start), and not even
then with EDGE_TEST_REQUIRE_ARM64=1 (.ci/run sets it).

This test found that the health gate, which proves which binary edgecore runs
by hashing ``/proc/<pid>/exe``, saw qemu-aarch64-static for every emulated
process (argv is ``[qemu, program, argv0, ...]``); ``running_sha256`` now
recognises an emulator and hashes the program it runs.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, wait_for

from testkit.arm64_host import (
    EMULATION_DROPIN,
    Arm64Host,
    Arm64Root,
    Arm64Unavailable,
    import_rootfs,
    rootfs,
)
from testkit.dockerenv import Dockerd, DockerUnavailable
from testkit.e2e_host import skip_or_fail
from testkit.standins import logged_version

pytestmark = pytest.mark.slow

REQUIRE = "EDGE_TEST_REQUIRE_ARM64"
ARCH, PYTHON = "arm64", "3.11"  # bookworm's python3
BUNDLE = f"/bundles/wheelhouse-{ARCH}-py{PYTHON}"
VENV = "/opt/edge-upgrade-agent/venv"
AGENT = f"{VENV}/bin/edge-upgrade-agent"
CONF = "/etc/edge-upgrade-agent/agent.yaml"  # the unit's
UNIT = "edge-upgrade-agent.service"
DROPINS = f"/etc/systemd/system/{UNIT}.d"
NODE = "/node"  # the sandboxed node's "/", inside the arm64 root
NOTIFY = "/run/test-notify.sock"
REPO_IMAGE = "kubeedge/installation-package"
EM_AARCH64 = 183  # ELF e_machine
#: Makes the node with the installed venv's python, so the stand-ins' shebang
#: is that arm64 interpreter (which has yaml); starts its edgecore.
MAKE_NODE = """
import sys
from pathlib import Path
from testkit.standins import make_image_dir, make_node, start_edgecore
root = Path(sys.argv[1])
make_node(root, "v1.12.1")
make_image_dir(root / "images", sys.argv[2], "v1.13.0")
start_edgecore(root)
"""
#: The pid in pidfile $1 if it is a live edgecore (seen inside the host).
ALIVE = """p=$(cat "$1") || exit 1
s=$(cat "/proc/$p/stat") || exit 1
case ${s##*) } in Z* | X*) exit 1 ;; esac
tr '\\0' ' ' <"/proc/$p/cmdline" | grep -q edgecore && echo "$p"
"""
SETTINGS: dict[str, Any] = {
    "node_name": "node-1",
    "paths": {"root": NODE},
    "service": {"manager": "process"},
    # Emulated Python starts an edgecore in a second or two, not milliseconds.
    "health": {"grace_seconds": 1, "start_timeout_seconds": 60, "poll_interval_seconds": 0.2},
    "images": {"backend": "local", "local": {"dir": "/images"}},
    "precheck": {"reserve_bytes": 0},
    "transport": {"kind": "spool", "spool": {"poll_interval_seconds": 0.2}},
}


def build_bundle(out: Path) -> Path:
    """OUT/wheelhouse-arm64-py3.11 by scripts/build-wheelhouse.sh."""
    proc = subprocess.run([str(REPO / "scripts/build-wheelhouse.sh"), "--arch", ARCH,
                           "--python", PYTHON, "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"build-wheelhouse.sh --arch {ARCH}:\n{proc.stderr}"
    bundle = out / Path(BUNDLE).name
    assert json.loads((bundle / "bundle.json").read_text())["arch"] == ARCH
    return bundle


def stage(work: Path) -> Path:
    """What goes into the host: /src (what install.sh needs of the tree, and
    the stand-ins) and /bundles (the arm64 bundle)."""
    staged = work / "stage"
    for part in ("scripts", "config", "systemd", "testkit/standins"):
        shutil.copytree(REPO / part, staged / "src" / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "testkit/__init__.py", staged / "src/testkit/__init__.py")
    build_bundle(staged / "bundles")
    return staged


def elf_machine(head: bytes) -> int:
    assert head[:4] == b"\x7fELF", head[:4]
    return int.from_bytes(head[18:20], "little")


class Host:
    """One arm64 host with the agent installed and a sandboxed node; ``node``
    is this machine's path of the node's root."""

    mode = ""
    install_log = ""

    def __init__(self, base: Path, work: Path, staged: Path) -> None:
        self.base = base
        self.work = work
        self.staged = staged
        self.node = work / "node"

    def setup(self) -> None:
        """Start the host, install the agent, make the node (``close`` undoes
        whatever part of it was done)."""
        raise NotImplementedError

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        raise NotImplementedError

    def start_agent(self) -> None:
        raise NotImplementedError

    def stop_agent(self) -> None:
        """Stop the daemon; AssertionError unless it exited cleanly."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------

    def make_node(self) -> None:
        self.run([f"{VENV}/bin/python", "-c", MAKE_NODE, NODE, REPO_IMAGE],
                 env={"PYTHONPATH": "/src"}, timeout=300)

    def cli(self, *args: str) -> dict[str, Any]:
        proc = self.run([AGENT, "--config", CONF, "--output", "json", *args],
                        timeout=300, check=False)
        try:
            out: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"no JSON (rc {proc.returncode}): {proc.stdout}\n"
                                 f"{proc.stderr}") from None
        out["rc"] = proc.returncode
        return out

    def send(self, name: str, payload: dict[str, Any]) -> None:
        spool = self.node / "var/lib/edge-upgrade-agent/spool"
        tmp = spool / f".{name}.tmp"
        tmp.write_text(json.dumps(payload))
        tmp.rename(spool / f"{name}.json")

    def final(self, job: str) -> list[dict[str, Any]]:
        reports_dir = self.node / "var/lib/edge-upgrade-agent/reports"
        reports = (json.loads(p.read_text()) for p in sorted(reports_dir.glob(f"{job}-*.json")))
        return [r for r in reports if r["final"]]

    def wait_final(self, job: str) -> dict[str, Any]:
        wait_for(lambda: self.final(job), timeout=300, interval=0.2)
        (final,) = self.final(job)
        return final

    def running_version(self) -> str:
        """What the running edgecore logged at start ("" if none runs)."""
        proc = self.run(["sh", "-c", ALIVE, "sh", f"{NODE}/run/edgecore.pid"], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return ""
        return logged_version(self.node, int(proc.stdout)) or ""


class ChrootHost(Host):
    """The daemon as a plain process in a chroot (no systemd, no dockerd)."""

    mode = "chroot"

    def __init__(self, base: Path, work: Path, staged: Path) -> None:
        super().__init__(base, work, staged)
        self.root = Arm64Root(base, work / "chroot")
        self.node = self.root.path(NODE)
        self.log = work / "daemon.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def setup(self) -> None:
        self.root.start()
        shutil.copytree(self.staged / "src", self.root.path("/src"))
        shutil.copytree(self.staged / "bundles", self.root.path("/bundles"))
        # No network at all for the install: a network namespace of its own.
        install = self.root.run(["bash", "/src/scripts/install.sh", "--wheelhouse", BUNDLE,
                                 "--node-name", "node-1"], offline=True, timeout=1200)
        self.install_log = install.stdout
        self.make_node()
        self.root.path(CONF).write_text(yaml.safe_dump(SETTINGS))

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.root.run(argv, env=env, timeout=timeout, check=check)

    def read(self, path: str) -> bytes:
        return self.root.path(path).read_bytes()

    def start_agent(self) -> None:
        notify = self.root.path(NOTIFY)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(notify))
            sock.settimeout(1)
            self.daemon = self.root.spawn([AGENT, "--config", CONF, "run"],
                                          env={"NOTIFY_SOCKET": NOTIFY}, log=self.log)
            end = time.monotonic() + 180
            while True:
                assert self.daemon.poll() is None, self.log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < end, "the daemon never sent READY=1"
                try:
                    if b"READY=1" in sock.recv(4096):
                        break
                except TimeoutError:
                    continue
        notify.unlink()

    def stop_agent(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        assert self.daemon.wait(timeout=120) == 0, self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        self.root.close()


class SystemdHost(Host):
    """The agent as its systemd unit, in a container whose PID 1 is the arm64
    systemd (no network); the node is a directory of this machine mounted at /node."""

    mode = "systemd"

    def __init__(self, base: Path, work: Path, staged: Path) -> None:
        super().__init__(base, work, staged)
        self.dockerd = Dockerd(work / "dockerd")
        self.host: Arm64Host | None = None

    def setup(self) -> None:
        self.node.mkdir()
        try:
            self.dockerd.start()
        except DockerUnavailable as exc:
            skip_or_fail(f"no private dockerd for the systemd host: {exc}",
                         REQUIRE, "EDGE_TEST_REQUIRE_DOCKERD")
        client = self.dockerd.client()
        import_rootfs(client, self.base, "edge-arm64-host:test")
        self.host = Arm64Host(client, "edge-arm64-host:test", {
            str(self.staged / "src"): "/src:ro", str(self.staged / "bundles"): "/bundles:ro",
            str(self.node): NODE}, name=f"edge-arm64-host-{self.work.name}")
        self.host.start()
        # Both drop-ins before install.sh: it starts the unit (and keeps drop-ins).
        self.host.put(f"{DROPINS}/emulation.conf", EMULATION_DROPIN.encode())
        self.host.put(f"{DROPINS}/sandbox.conf", f"[Service]\nReadWritePaths={NODE}\n".encode())
        install = self.run(["bash", "/src/scripts/install.sh", "--wheelhouse", BUNDLE,
                            "--node-name", "node-1"], timeout=1200)
        self.install_log = install.stdout
        self.run(["systemctl", "is-active", "--quiet", UNIT])
        self.make_node()
        self.host.put(CONF, yaml.safe_dump(SETTINGS).encode(), 0o640)

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.host is not None
        return self.host.run(argv, env=env, timeout=timeout, check=check)

    def read(self, path: str) -> bytes:
        assert self.host is not None
        return self.host.read(path)

    def start_agent(self) -> None:
        """The unit, restarted onto the sandbox's config (it runs since install.sh)."""
        self.run(["systemctl", "restart", UNIT], timeout=180)  # returns after READY=1
        self.run(["systemctl", "is-active", "--quiet", UNIT])

    def stop_agent(self) -> None:
        self.run(["systemctl", "stop", UNIT], timeout=180)
        shown = self.run(["systemctl", "show", "-p", "Result", "-p", "ExecMainStatus",
                          UNIT]).stdout.split()
        assert sorted(shown) == ["ExecMainStatus=0", "Result=success"], shown

    def close(self) -> None:
        if self.host is not None and self.host.container is not None:
            print(self.host.sh(f"journalctl -u {UNIT} --no-pager | tail -30")[1])
            self.host.stop()
        self.dockerd.stop()


class Arm:
    def __init__(self, host: Host) -> None:
        self.host = host


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The cached arm64 rootfs, and the staged tree and bundle (built once)."""
    try:
        base = rootfs()
    except Arm64Unavailable as exc:
        skip_or_fail(f"no arm64 emulation here: {exc}", REQUIRE)
    return base, stage(tmp_path_factory.mktemp("arm64-stage"))


@pytest.fixture(scope="module", params=["chroot", "systemd"])
def arm(request: pytest.FixtureRequest, prepared: tuple[Path, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arm]:
    base, staged = prepared
    work = tmp_path_factory.mktemp(f"arm64-{request.param}")
    kind: type[Host] = ChrootHost if request.param == "chroot" else SystemdHost
    host = kind(base, work, staged)
    try:
        host.setup()
        host.start_agent()
        yield Arm(host)
    finally:
        host.close()


def test_1_bundle_installs_offline_and_runs_as_aarch64(arm: Arm) -> None:
    host = arm.host
    log = host.install_log
    assert f"bundle {BUNDLE}: {ARCH} / Python {PYTHON}" in log, log
    assert "installed edge-upgrade-agent" in log and "config validate" in log, log
    if host.mode == "systemd":
        assert f"enabled and started {UNIT}" in log, log
    assert host.run(["uname", "-m"]).stdout.strip() == "aarch64"
    # The venv is the rootfs's arm64 python3; the compiled wheels are aarch64 and load.
    python = host.run(["readlink", "-f", f"{VENV}/bin/python"]).stdout.strip()
    assert python.startswith("/usr/bin/python3"), python
    assert elf_machine(host.read(python)[:20]) == EM_AARCH64
    rust = host.run(["sh", "-c", f'ls {VENV}/lib/python3*/site-packages/cryptography/'
                     'hazmat/bindings/_rust*.so']).stdout.split()
    assert len(rust) == 1 and elf_machine(host.read(rust[0])[:20]) == EM_AARCH64, rust
    out = host.run([f"{VENV}/bin/python", "-c",
                    "import platform, yaml\n"
                    "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
                    "k = ed25519.Ed25519PrivateKey.generate()\n"
                    "k.public_key().verify(k.sign(b'x'), b'x')\n"
                    "print(platform.machine(), yaml.__with_libyaml__)"]).stdout.split()
    assert out == ["aarch64", "True"], out


def test_2_config_validate_and_dry_run(arm: Arm) -> None:
    host = arm.host
    proc = host.run([AGENT, "--config", CONF, "config", "validate"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.running_version() == "v1.12.1"
    plan = host.cli("upgrade", "--to-version", "v1.13.0", "--dry-run")
    assert plan["rc"] == 0 and plan["plan"]["verdict"] == "GO", plan
    assert host.running_version() == "v1.12.1"


def test_3_upgrade_over_the_spool(arm: Arm) -> None:
    host = arm.host
    host.send("c1", {"jobName": "arm-up", "version": "v1.13.0", "checkItems": ["disk"]})
    final = host.wait_final("arm-up")
    assert (final["result"], final["phase"]) == ("upgrade_success", "succeeded"), final
    assert host.running_version() == "v1.13.0"
    assert (host.node / "var/lib/edge-upgrade-agent/backups/v1.12.1/manifest.json").is_file()
    assert not list((host.node / "var/lib/edge-upgrade-agent/spool").glob("*.json"))


def test_4_rollback_over_the_spool(arm: Arm) -> None:
    host = arm.host
    host.send("c2", {"jobName": "arm-rb", "operation": "rollback"})
    final = host.wait_final("arm-rb")
    assert final["result"] == "rollback_success", final
    assert host.running_version() == "v1.12.1"
    backup = host.node / "var/lib/edge-upgrade-agent/backups/v1.12.1/edgecore.db"
    assert (host.node / "var/lib/kubeedge/edgecore.db").read_bytes() == backup.read_bytes()


def test_5_agent_stops_cleanly(arm: Arm) -> None:
    arm.host.stop_agent()
