"""A private containerd for tests, and a CRI client that asks what keadm asks.

``Containerd`` runs Debian's ``containerd`` with its own root, state and
socket under a temporary directory, the CRI plugin on, so a test never
touches the host's runtime. Settings that this kind of machine needs: root
here lacks CAP_SYS_RESOURCE, so CRI must ``restrict_oom_score_adj``; the
overlayfs snapshotter and ``SystemdCgroup = false`` work.

``image_status`` is keadm's own first question: CRI's
``runtime.v1.ImageService/ImageStatus`` over the socket, with no
credentials. It speaks gRPC through grpcio with the two messages encoded by
hand (a few protobuf fields), so no generated CRI stubs are needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG = """version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  disable_apparmor = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
"""


class ContainerdUnavailable(RuntimeError):
    pass


class Containerd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.log = workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            raise ContainerdUnavailable("containerd/ctr not installed (apt-get install containerd)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(CONFIG.format(root=self.root, state=self.state, socket=self.socket))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ContainerdUnavailable(f"containerd exited: {self.log_tail()}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise ContainerdUnavailable(f"containerd did not answer in {timeout:g}s: "
                                    f"{self.log_tail()}")

    def ctr(self, *args: str, namespace: str = "k8s.io",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", namespace,
                               *args], capture_output=True, text=True, check=check, timeout=120)

    def images(self, namespace: str = "k8s.io") -> dict[str, str]:
        """``ctr images ls``: name → digest."""
        out = self.ctr("images", "ls", namespace=namespace).stdout.splitlines()[1:]
        return {f[0]: f[2] for f in (line.split() for line in out) if len(f) >= 3}

    def remove_image(self, name: str) -> None:
        self.ctr("images", "rm", "--sync", name, check=False)

    def clear(self, namespace: str = "k8s.io") -> None:
        """Remove every image, CRI's ``sha256:<id>`` names included, and collect."""
        for name in self.images(namespace):
            self.ctr("images", "rm", "--sync", name, namespace=namespace, check=False)
        self.collect()

    def collect(self) -> None:
        """Drop every lease (ctr's pulls hold one for 24 h) and the content they kept."""
        for line in self.ctr("leases", "ls").stdout.splitlines()[1:]:
            if line.split():
                self.ctr("leases", "rm", "--sync", line.split()[0], check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Snapshot mounts left by an unpack would keep the tree busy.
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mounts").read_text().splitlines():
                point = line.split()[1]
                if point.startswith(str(self.workdir)):
                    subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# -- CRI ImageStatus, as keadm calls it -------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one protobuf message, one level deep."""
    out: list[tuple[int, int, bytes | int]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, varint()))
        elif wire == 2:
            size = varint()
            out.append((number, wire, data[i:i + size]))
            i += size
        elif wire == 1:
            out.append((number, wire, data[i:i + 8]))
            i += 8
        elif wire == 5:
            out.append((number, wire, data[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]


def image_status(socket: Path, image: str, timeout: float = 10) -> CriImage | None:
    """CRI ImageStatus for ``image`` (no credentials, as keadm asks); None: not present."""
    import grpc  # noqa: PLC0415 (a test dependency only)

    request = _field(1, _field(1, image.encode()))  # ImageStatusRequest{image: ImageSpec}
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary("/runtime.v1.ImageService/ImageStatus",
                                   request_serializer=None, response_deserializer=None)
        response: bytes = call(request, timeout=timeout)
    for number, _, value in _fields(response):
        if number == 1 and isinstance(value, bytes):  # ImageStatusResponse.image
            fields = _fields(value)

            def strings(n: int, fields: list[tuple[int, int, bytes | int]] = fields) \
                    -> tuple[str, ...]:
                return tuple(v.decode() for k, _, v in fields if k == n and isinstance(v, bytes))

            ids = strings(1)
            return CriImage(ids[0] if ids else "", strings(2), strings(3))
    return None
