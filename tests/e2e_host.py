"""An edge host with a real systemd, for the end-to-end test.

A Debian rootfs made by debootstrap (cached: the build takes about a minute)
is imported into the test's private dockerd and run as a container whose
PID 1 is systemd, on the host network so it reaches the test broker and
registry on loopback, with the dockerd socket mounted for image pulls.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("EDGE_UPGRADE_E2E_CACHE", "/var/tmp/edge-upgrade-agent-e2e"))
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,python3-yaml,procps"
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
    def __init__(self, client: Any, image: str, mounts: dict[str, str]) -> None:
        self.client = client
        self.image = image
        self.mounts = mounts
        self.container: Any = None

    def start(self) -> None:
        volumes = {src: {"bind": dst.rstrip(":ro"), "mode": "ro" if dst.endswith(":ro") else "rw"}
                   for src, dst in self.mounts.items()}
        self.container = self.client.containers.run(
            self.image, ["/lib/systemd/systemd"], detach=True, network_mode="host",
            cap_add=["SYS_ADMIN"], tmpfs={"/run": "", "/run/lock": ""},
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"}, **volumes},
            environment={"container": "docker"}, name=f"edge-host-{os.getpid()}")
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
