"""An arm64 Debian host under emulation, for tests/test_arm64.py.

The kernel's binfmt_misc hands every aarch64 ELF to Debian's static
qemu-aarch64 (package qemu-user-static), so a Debian arm64 rootfs made by
``debootstrap --arch arm64`` runs on an amd64 machine: its python3, the venv
install.sh makes with it, the compiled wheels of the arm64 bundle, the agent
and the stand-ins all run as aarch64 code.

The rootfs is cached under /var/tmp/edge-upgrade-agent-arm64 (its build runs
dpkg under emulation: minutes), keyed like the amd64 e2e rootfs by suite and
package list; it is built into a temporary directory and renamed when done,
and never written afterwards. Two ways to run it:

- ``Arm64Root``: an overlay (or, where overlayfs cannot be mounted, a copy)
  of it, entered with ``chroot``. Every command runs as ``unshare --mount
  --propagation private`` + a fixed script that mounts /proc, /sys and /dev
  into the root and execs ``chroot`` with the caller's argv. The mounts live
  in that private mount namespace only: they are gone when its last process
  exits and are never visible to the rest of the machine, so no stray bind
  mount of /dev can outlive a test (or be walked by an rm -rf of its
  directory).
- ``Arm64Host``: the same rootfs imported into the test's private dockerd and
  run as a container whose PID 1 is the arm64 systemd, like the amd64
  ``EdgeHost`` (testkit/e2e_host.py) but with no network at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from testkit.e2e_host import MIRROR, SUITE, EdgeHost

CACHE = Path(os.environ.get(
    "EDGE_UPGRADE_ARM64_CACHE", "/var/tmp/edge-upgrade-agent-arm64"))  # noqa: S108
ARCH = "arm64"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps,sqlite3"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
ENTRY = BINFMT / "qemu-aarch64"
#: qemu-user-static's own registration line (the systemd-binfmt format), with
#: the F flag: the kernel opens the interpreter once, so it works in a chroot.
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
QEMU = "qemu-aarch64-static"
#: What every command inside sees: no PYTHONPATH, venv or locale of the caller.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
#: Mounts the kernel file systems into the rootfs ($1), then becomes ``chroot
#: $1 "$@"``. Runs in a private mount namespace (see the module docstring).
_ENTER = """set -e
r=$1
shift
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
exec chroot "$r" "$@"
"""


class Arm64Unavailable(RuntimeError):
    """binfmt_misc cannot be mounted here, or qemu-user-static is missing."""


class Arm64HostError(RuntimeError):
    """Emulation is available, but building, preparing or booting the rootfs failed."""


# -------------------------------------------------------------- binfmt_misc

def _flags() -> str:
    for line in ENTRY.read_text(encoding="ascii").splitlines():
        if line.startswith("flags:"):
            return line.partition(":")[2].strip()
    return ""


def interpreter() -> Path:
    """The interpreter the kernel runs aarch64 binaries with (from the registration)."""
    for line in ENTRY.read_text(encoding="ascii").splitlines():
        if line.startswith("interpreter "):
            return Path(line.split(None, 1)[1])
    raise Arm64Unavailable(f"{ENTRY} names no interpreter")


def ensure_binfmt() -> None:
    """binfmt_misc mounted and qemu-aarch64 registered and enabled; Arm64Unavailable
    (with the reason) where that cannot be had."""
    if shutil.which(QEMU) is None:
        raise Arm64Unavailable(f"{QEMU} is missing (Debian: apt-get install qemu-user-static)")
    if not (BINFMT / "register").exists():
        if os.geteuid() != 0:
            raise Arm64Unavailable(f"binfmt_misc is not mounted at {BINFMT} (and not root)")
        proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                              capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0 or not (BINFMT / "register").exists():
            raise Arm64Unavailable(f"cannot mount binfmt_misc: {proc.stderr.strip()}")
    if not ENTRY.exists():
        _register()
    if not ENTRY.exists():
        raise Arm64Unavailable(f"qemu-aarch64 is not registered in {BINFMT}")
    if ENTRY.read_text(encoding="ascii").splitlines()[0].strip() != "enabled":
        raise Arm64Unavailable(f"{ENTRY} is registered but disabled")
    if (BINFMT / "status").read_text(encoding="ascii").strip() != "enabled":
        raise Arm64Unavailable(f"binfmt_misc is disabled ({BINFMT / 'status'})")


def _register() -> None:
    """Register qemu-aarch64 as qemu-user-static ships it: its binfmt.d line
    (what systemd-binfmt would write at boot), else binfmt-support."""
    if BINFMT_CONF.is_file():
        line = next((raw for raw in BINFMT_CONF.read_text(encoding="ascii").splitlines()
                     if raw.startswith(":qemu-aarch64:")), None)
        if line is not None:
            try:
                with (BINFMT / "register").open("w", encoding="ascii") as register:
                    register.write(line)
            except FileExistsError:
                pass  # registered meanwhile by someone else
            except OSError as exc:
                raise Arm64Unavailable(f"cannot register qemu-aarch64: {exc}") from exc
            return
    if shutil.which("update-binfmts") is not None:
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"],
                       capture_output=True, timeout=60, check=False)


def _provide_interpreter(root: Path) -> None:
    """Without the F flag the kernel opens the interpreter inside the chroot:
    put a copy at the same path there (the old qemu-debootstrap way)."""
    if "F" in _flags():
        return
    path = interpreter()
    inside = root / path.relative_to("/")
    if not inside.exists():
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), inside)


# ------------------------------------------------------------------- rootfs

def _chroot_argv(root: Path, argv: Sequence[str], offline: bool = False) -> list[str]:
    """``offline``: in a network namespace of its own (a loopback, down)."""
    return ["unshare", "--mount", "--propagation", "private", *(["--net"] if offline else []),
            "--", "sh", "-c", _ENTER, "enter", str(root), *argv]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove(path: Path) -> None:
    """rm -rf, refused while anything is mounted below (never walk into a mount)."""
    if not path.exists():
        return
    if mounts_under(path):
        raise Arm64HostError(f"not removing {path}: mounts below it {mounts_under(path)}")
    shutil.rmtree(path)


def rootfs() -> Path:
    """The cached arm64 rootfs directory, built on first use (minutes)."""
    ensure_binfmt()
    done = CACHE / f"rootfs-{SUITE}-{ARCH}-{PACKAGES.replace(',', '_')}"
    if done.is_dir():
        return done
    if shutil.which("debootstrap") is None:
        raise Arm64HostError("debootstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"{done.name}.build-*"):  # left by a run that was killed
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove(stale)
    build = done.with_name(f"{done.name}.build-{os.getpid()}")
    _remove(build)
    # Two stages: the first unpacks on this machine, the second runs the arm64
    # maintainer scripts under emulation inside the new root. Both in a private
    # mount namespace, so whatever debootstrap mounts dies with it.
    first = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "debootstrap", f"--arch={ARCH}", "--foreign", "--variant=minbase",
         f"--include={PACKAGES}", SUITE, str(build), MIRROR],
        capture_output=True, text=True, timeout=1800, check=False)
    if first.returncode != 0:
        raise Arm64HostError(f"debootstrap (first stage) failed: {first.stderr[-2000:]}")
    _provide_interpreter(build)
    second = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "chroot", str(build), "/debootstrap/debootstrap", "--second-stage"],
        env=BASE_ENV, capture_output=True, text=True, timeout=3600, check=False)
    if second.returncode != 0:
        log = build / "debootstrap/debootstrap.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else second.stderr[-2000:]
        raise Arm64HostError(f"debootstrap (second stage, emulated) failed: {tail}")
    for leftover in (build / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    check = subprocess.run(_chroot_argv(build, ["uname", "-m"]), env=BASE_ENV,
                           capture_output=True, text=True, timeout=120, check=False)
    if check.stdout.strip() != "aarch64":
        raise Arm64HostError(f"the new rootfs does not run as aarch64: {check!r}")
    try:
        build.rename(done)
    except OSError:  # built meanwhile by another run: keep theirs
        if not done.is_dir():
            raise
        _remove(build)
    return done


class Arm64Root:
    """A throwaway arm64 root over the cached rootfs: ``run`` and ``spawn``
    commands in it, ``path`` maps a path inside to this machine's view.

    ``close`` kills every process whose root is this one, unmounts the overlay
    and leaves a plain directory (for pytest's tmp_path to remove).
    """

    def __init__(self, base: Path, work: Path) -> None:
        self.base = base
        self.work = work
        self.root = work / "root"
        self.overlay = False

    def __enter__(self) -> Arm64Root:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        upper, scratch = self.work / "upper", self.work / "overlay-work"
        for d in (self.root, upper, scratch):
            d.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.base},upperdir={upper},workdir={scratch}", str(self.root)],
            capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode == 0:
            self.overlay = True
        else:  # no overlayfs here: a copy, slower
            subprocess.run(["cp", "-a", f"{self.base}/.", str(self.root)],
                           check=True, timeout=600)
        _provide_interpreter(self.root)

    def path(self, inside: str) -> Path:
        """This machine's path of ``inside`` (an absolute path in the root)."""
        return self.root / inside.lstrip("/")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True,
            offline: bool = False) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the root, as root; output captured. With ``check``,
        a non-zero exit raises AssertionError with the output; ``offline``
        takes the network away."""
        proc = subprocess.run(_chroot_argv(self.root, argv, offline),
                              env={**BASE_ENV, **(env or {})},
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{list(argv)} exited {proc.returncode} in the arm64 root:\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        """``argv`` inside the root in the background (its output to ``log``).
        The pid is the command's own: unshare, sh and chroot all exec."""
        with open(log or os.devnull, "ab") as out:
            return subprocess.Popen(_chroot_argv(self.root, argv),
                                    env={**BASE_ENV, **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def pids(self) -> list[int]:
        """Processes whose root directory is this root (emulated or not)."""
        mine = str(self.root.resolve())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if str((entry / "root").readlink()) == mine:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def kill_all(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > end:
                raise Arm64HostError(f"processes in {self.root} survive SIGKILL: {pids}")
            time.sleep(0.1)

    def close(self) -> None:
        self.kill_all()
        if self.overlay:
            proc = subprocess.run(["umount", str(self.root)], capture_output=True, text=True,
                                  timeout=60, check=False)
            if proc.returncode != 0:  # still busy: detach it, it goes once unused
                subprocess.run(["umount", "--lazy", str(self.root)], timeout=60, check=False)
            self.overlay = False
        left = mounts_under(self.root)
        if left:
            raise Arm64HostError(f"still mounted under {self.root}: {left}")


# ------------------------------------------------------- systemd as PID 1

#: A drop-in the agent's unit needs under qemu-user, and only there. systemd
#: 252 sets up LoadCredential=/SetCredential= in a child it forks with
#: clone(CLONE_NEWNS) ("(sd-mkdcreds)"); qemu-user emulates clone() only as a
#: plain fork or a thread and fails any other flags with EINVAL, so the unit
#: would die with 243/CREDENTIALS before the agent runs. Empty assignments
#: reset both lists (the registry credential is only for the docker backend).
#: Everything else of the unit applies as on a real arm64 host, except what
#: systemd skips itself when seccomp is unavailable (qemu-user has none for its
#: guest): SystemCallFilter= and the other seccomp-based settings.
EMULATION_DROPIN = """[Service]
LoadCredential=
SetCredential=
"""


def import_rootfs(client: Any, base: Path, image: str) -> None:
    """``base`` as the docker image ``image`` (a tar streamed into the engine)."""
    repository, tag = image.split(":")
    tar = subprocess.Popen(["tar", "-C", str(base), "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    try:
        client.api.import_image_from_data(tar.stdout, repository=repository, tag=tag)
    finally:
        tar.stdout.close()
        code = tar.wait(timeout=300)
    if code != 0:
        raise Arm64HostError(f"tar of {base} exited {code}")


class Arm64Host(EdgeHost):
    """The arm64 rootfs as a container with systemd as PID 1 and no network
    (``network_mode=none``: a loopback only). ``mounts`` as for EdgeHost:
    ``{host_dir: "/path"}`` or ``"/path:ro"``."""

    def start(self) -> None:
        volumes = {src: {"bind": dst.removesuffix(":ro"),
                         "mode": "ro" if dst.endswith(":ro") else "rw"}
                   for src, dst in self.mounts.items()}
        self.container = self.client.containers.run(
            self.image, ["/lib/systemd/systemd"], detach=True, network_mode="none",
            cap_add=["SYS_ADMIN"], tmpfs={"/run": "", "/run/lock": ""},
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"}, **volumes},
            environment={"container": "docker"}, name=self.name)
        end = time.monotonic() + 120
        state = ""
        while time.monotonic() < end:
            self.container.reload()
            if self.container.status != "running":
                break
            state = self.sh("systemctl is-system-running || true")[1].strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.5)
        logs = self.container.logs().decode(errors="replace")[-2000:]
        raise Arm64HostError(f"the arm64 systemd did not come up ({state!r}): {logs}")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Like Arm64Root.run, with ``docker exec``."""
        result = self.container.exec_run(["timeout", str(int(timeout)), *argv],
                                         environment=env or {}, demux=True)
        out, err = (b.decode(errors="replace") if b else "" for b in result.output)
        proc = subprocess.CompletedProcess(list(argv), int(result.exit_code), out, err)
        if check and proc.returncode != 0:
            raise AssertionError(f"{list(argv)} exited {proc.returncode} in the arm64 host:\n"
                                 f"{out[-3000:]}\n{err[-3000:]}")
        return proc
