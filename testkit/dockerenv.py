"""A real, private Docker daemon and a real registry for tests.

``Dockerd`` runs the machine's ``dockerd`` with its own data root, exec root,
pidfile, config file and unix socket, no bridge and no iptables, so it never
touches a host docker. ``Registry`` runs Debian's ``docker-registry``
(distribution 2.8) on a loopback port with htpasswd (bcrypt) auth and
filesystem storage. Both log to files under their workdir.

dockerd treats 127.0.0.0/8 as an insecure registry by default, so the
registry is plain HTTP and needs no daemon flag.

The image helpers build installation-package images ``FROM scratch`` without
a Dockerfile (a rootfs tar written in memory and imported), push them with
explicit credentials and remove them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors

#: Fixed mtime for every member of a built image, so equal inputs give equal layers.
IMAGE_MTIME = 1_700_000_000
#: bcrypt cost for htpasswd entries: the minimum, since the registry checks the
#: password on every request (a blob-heavy pull makes dozens of them).
BCRYPT_COST = 4

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


class DockerUnavailable(RuntimeError):
    """dockerd is missing or cannot start in this environment."""


class RegistryUnavailable(RuntimeError):
    """docker-registry is missing or did not come up."""


class ImageOperationError(RuntimeError):
    """A push (or import) stream reported an in-band error."""


# --------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """The environment for daemons: no proxies, no inherited DOCKER_* settings."""
    env = dict(os.environ)
    for name in list(env):
        if name.upper() in _PROXY_VARS or name.startswith("DOCKER_"):
            del env[name]
    return env


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM`` when available: a daemon goes away with pytest,
    even on SIGKILL. Only from the main thread: the kernel sends the signal when
    the *thread* that forked exits, so a daemon (re)started from a
    ``threading.Timer`` would be terminated as soon as that timer returned."""
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(lines[-n:])


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 or IPv6, any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl local_address rem_address st(0A = LISTEN) ... inode (index 9)
            if len(fields) <= 9 or fields[3] != "0A":
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _owns_listener(pid: int, port: int) -> bool:
    """True if process ``pid`` holds a socket listening on TCP ``port``."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if str(fd.readlink()) in wanted:
                return True
        except OSError:
            continue
    return False


def _mounts_under(roots: Iterable[Path]) -> list[str]:
    """Mount points below any of ``roots`` (deepest first)."""
    prefixes = [str(r) for r in roots]
    found: list[str] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # mountinfo escapes space, tab, newline and backslash as octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=len, reverse=True)


def _lazy_unmount(points: Iterable[str]) -> None:
    for point in points:
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def bcrypt_hash(password: str, cost: int = BCRYPT_COST) -> str:
    """A ``$2b$`` bcrypt hash, as htpasswd ``-B`` writes and the registry accepts.

    Uses libcrypt (libxcrypt, part of every Debian system); falls back to the
    ``bcrypt`` module and then to ``htpasswd -nbB`` (apache2-utils).
    """
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        lib = ctypes.CDLL(name)
        gensalt = lib.crypt_gensalt
        crypt = lib.crypt
    except (OSError, AttributeError):
        pass
    else:
        gensalt.restype = ctypes.c_char_p
        gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
        crypt.restype = ctypes.c_char_p
        crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        setting = gensalt(b"$2b$", cost, None, 0)
        if setting:
            hashed = crypt(password.encode(), setting)
            if hashed and hashed.startswith(b"$2b$"):
                return str(hashed.decode())
    try:
        import bcrypt  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        pass
    else:
        raw: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost))
        return raw.decode()
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run(
            [htpasswd, "-nbB", "-C", str(cost), "user", password],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split(":", 1)[1]
    raise RuntimeError("no bcrypt implementation: need libcrypt, `bcrypt` or htpasswd")


def split_ref(ref: str) -> tuple[str, str]:
    """``registry:5000/repo/name:tag`` -> (``registry:5000/repo/name``, ``tag``)."""
    if "@" in ref:
        raise ValueError(f"digest references are not supported here: {ref}")
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


# ---------------------------------------------------------------------- dockerd


class Dockerd:
    """A private dockerd for tests: own data root, exec root, pidfile and unix
    socket, --iptables=false --bridge=none, so it never touches a host docker.

    The data root (``workdir/data``) survives ``stop()``/``start()``, so a
    restarted daemon still has its images and containers. The exec root, pidfile
    and socket live in a short directory under /tmp (unix socket paths are
    limited to 107 bytes and pytest's tmp paths are long); ``stop()`` removes it.
    """

    def __init__(self, workdir: Path, *, storage_driver: str | None = None) -> None:
        self.workdir = workdir
        self.data_root = workdir / "data"
        self.log_path = workdir / "dockerd.log"
        self.config_path = workdir / "daemon.json"
        self.storage_driver = storage_driver
        self.rundir = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))
        self.exec_root = self.rundir / "exec"
        self.pidfile = self.rundir / "docker.pid"
        self.socket_path = self.rundir / "docker.sock"
        self.host = f"unix://{self.socket_path}"
        # Only matters if dockerd finds a system containerd and uses it: then
        # our objects stay apart from a host docker's ("moby"). containerd wants
        # ^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$ (a mkdtemp suffix may hold "_" at
        # the end, which fails image pulls and removals with HTTP 400): hex only.
        self.namespace = f"edgetest-{os.urandom(4).hex()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._atexit_registered = False

    def argv(self) -> list[str]:
        binary = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise DockerUnavailable("dockerd not found (Debian: apt-get install docker.io)")
        argv = [
            binary,
            "--config-file", str(self.config_path),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--containerd-namespace", self.namespace,
            "--containerd-plugins-namespace", f"{self.namespace}-plugins",
        ]  # fmt: skip
        if self.storage_driver:
            argv += ["--storage-driver", self.storage_driver]
        return argv

    def start(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("dockerd already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir.mkdir(mode=0o700, exist_ok=True)
        # Never read /etc/docker/daemon.json; keep the trust key (dockerd 20.10
        # writes one; only settable in the config file) out of /etc/docker.
        config = {"deprecated-key-path": str(self.workdir / "key.json")}
        self.config_path.write_text(json.dumps(config) + "\n")
        for stale in (self.socket_path, self.pidfile):
            stale.unlink(missing_ok=True)
        argv = self.argv()
        if not self._atexit_registered:  # a fixture that forgets stop() leaks nothing
            atexit.register(self.stop)
            self._atexit_registered = True
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            try:
                self.proc = subprocess.Popen(
                    _pdeathsig_prefix() + argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_clean_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise DockerUnavailable(f"cannot run dockerd: {exc}") from exc
        deadline = began + timeout
        last_error: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._cleanup()
                raise DockerUnavailable(
                    f"dockerd exited with {code} during start-up:\n{self.log_tail()}"
                )
            if self.socket_path.exists():
                try:
                    client = docker.DockerClient(base_url=self.host, timeout=5)
                    try:
                        if client.ping():
                            break
                    finally:
                        client.close()
                except Exception as exc:  # docker/requests/OS errors while it comes up
                    last_error = exc
            if time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(
                    f"dockerd not answering after {timeout}s ({last_error!r}):\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - began

    def containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, bounded wait, SIGKILL; then kill an orphaned containerd,
        unmount leftovers and remove the run directory. Safe to call twice."""
        containerd = self.containerd_pid()
        if self.proc is not None:
            _terminate(self.proc, timeout)
        if containerd is not None:
            self._kill_own_containerd(containerd)
        self._cleanup()

    def _kill_own_containerd(self, pid: int) -> None:
        """The supervised containerd normally exits with dockerd; after a SIGKILL it
        is orphaned. Kill it only if its argv names our exec root."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if str(self.exec_root).encode() not in cmdline:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(250):
            if not pid_alive(pid):
                break
            time.sleep(0.02)

    def _cleanup(self) -> None:
        _lazy_unmount(_mounts_under([self.rundir, self.data_root]))
        shutil.rmtree(self.rundir, ignore_errors=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: int = 120) -> docker.DockerClient:
        """A client for this daemon (API version negotiated: dockerd 20.10 speaks 1.41)."""
        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)


# --------------------------------------------------------------------- registry

_REGISTRY_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {address}
  secret: edge-upgrade-agent-tests
  draintimeout: 0s
health:
  storagedriver:
    enabled: false
{auth}"""

_REGISTRY_AUTH = """\
auth:
  htpasswd:
    realm: edge-test-registry
    path: {htpasswd}
"""


class Registry:
    """`docker-registry serve` (Debian's distribution registry) on a free
    127.0.0.1 port with htpasswd (bcrypt) auth and filesystem storage under
    workdir; plain HTTP (dockerd treats 127.0.0.0/8 as insecure by default).

    ``address`` ("127.0.0.1:PORT") is chosen once and kept across restarts;
    storage and the log survive ``stop()``/``kill()`` too. An empty ``users``
    runs it without auth.
    """

    def __init__(self, workdir: Path, users: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.storage = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.htpasswd_path = workdir / "htpasswd"
        self.log_path = workdir / "registry.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._atexit_registered = False

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        auth = ""
        if self.users:
            self.htpasswd_path.write_text(
                "".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in self.users.items())
            )
            auth = _REGISTRY_AUTH.format(htpasswd=self.htpasswd_path)
        self.config_path.write_text(
            _REGISTRY_CONFIG.format(storage=self.storage, address=self.address, auth=auth)
        )

    def start(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("registry already running")
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise RegistryUnavailable(
                "docker-registry not found (Debian: apt-get install docker-registry)"
            )
        self._write_config()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_pdeathsig_prefix(), binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,
            )
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RegistryUnavailable(
                    f"docker-registry exited with {code}:\n{_tail(self.log_path, 20)}"
                )
            if self._answers():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RegistryUnavailable(
                    f"docker-registry not answering on {self.address} after {timeout}s:\n"
                    f"{_tail(self.log_path, 20)}"
                )
            time.sleep(0.03)
        self.startup_seconds = time.monotonic() - began

    def _answers(self) -> bool:
        """Our process listens on the port and GET /v2/ answers 401 (auth) or 200
        (no auth). The ownership check matters: if another registry (another
        test session's) holds the port, our process is about to die with
        "address already in use" while the other one answers."""
        if self.proc is None or not _owns_listener(self.proc.pid, self.port):
            return False
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
        except OSError:
            return False
        finally:
            conn.close()
        return status in (200, 401)

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None:
            _terminate(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def request_log(self) -> str:
        """The whole log (all runs): access-log lines look like
        ``127.0.0.1 - - [...] "GET /v2/ HTTP/1.1" 401 87 "" "docker/20.10..."``."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count_requests(self, status: int, path_part: str = "") -> int:
        """Access-log lines with this status (and whose request line has ``path_part``)."""
        pattern = re.compile(r'"(?P<req>[A-Z]+ \S+ HTTP/[\d.]+)" (?P<status>\d{3}) ')
        count = 0
        for line in self.request_log().splitlines():
            match = pattern.search(line)
            if match and int(match["status"]) == status and path_part in match["req"]:
                count += 1
        return count


# ----------------------------------------------------------------------- images


def _tar_dirs(tar: tarfile.TarFile, path: str, seen: set[str]) -> None:
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        name = "/".join(parts[:i])
        if name in seen:
            continue
        seen.add(name)
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = IMAGE_MTIME
        tar.addfile(info)


def rootfs_tar(
    files: Mapping[str, bytes | Path],
    *,
    symlinks: Mapping[str, str] | None = None,
    pad_bytes: int = 0,
) -> bytes:
    """An uncompressed rootfs tar: files mode 0755, parent dirs, symlinks, /pad.bin."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            _tar_dirs(tar, path, seen)
            info = tarfile.TarInfo(path.strip("/"))
            info.size = len(data)
            info.mode = 0o755
            info.mtime = IMAGE_MTIME
            tar.addfile(info, io.BytesIO(data))
        for path, target in (symlinks or {}).items():
            _tar_dirs(tar, path, seen)
            info = tarfile.TarInfo(path.strip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            info.mode = 0o777
            info.mtime = IMAGE_MTIME
            tar.addfile(info)
        if pad_bytes > 0:
            info = tarfile.TarInfo("pad.bin")
            info.size = pad_bytes
            info.mode = 0o644
            info.mtime = IMAGE_MTIME
            tar.addfile(info, io.BytesIO(os.urandom(pad_bytes)))
    return buf.getvalue()


def stream_errors(lines: Iterable[Mapping[str, Any]]) -> list[str]:
    """The in-band error messages of an import/pull/push stream."""
    errors: list[str] = []
    for event in lines:
        if "error" in event or "errorDetail" in event:
            detail = event.get("errorDetail") or {}
            errors.append(str(event.get("error") or detail.get("message") or event))
    return errors


def build_package_image(
    client: docker.DockerClient,
    ref: str,
    files: Mapping[str, bytes | Path],
    *,
    symlinks: Mapping[str, str] | None = None,
    pad_bytes: int = 0,
) -> str:
    """An installation-package image FROM scratch, built without a Dockerfile.

    ``files`` maps absolute paths in the image to content (bytes or a file to
    read), each stored mode 0755 (with parent directories); ``symlinks`` maps
    paths to link targets (for crafted images); ``pad_bytes`` adds /pad.bin of
    random (incompressible) bytes so pulls take time. No CMD: the agent only
    creates containers, and a create needs an explicit command. Returns the
    image id (``sha256:...``).
    """
    repository, tag = split_ref(ref)
    data = rootfs_tar(files, symlinks=symlinks, pad_bytes=pad_bytes)
    text = client.api.import_image_from_data(data, repository=repository, tag=tag)
    events = [json.loads(line) for line in str(text).splitlines() if line.strip()]
    errors = stream_errors(events)
    if errors:
        raise ImageOperationError(f"import of {ref} failed: {'; '.join(errors)}")
    image_id: str = client.api.inspect_image(ref)["Id"]
    return image_id


def push(client: docker.DockerClient, ref: str, username: str, password: str) -> str:
    """Push ``ref`` with explicit credentials, consume the stream, raise
    ImageOperationError on any in-band error; return the manifest digest."""
    repository, tag = split_ref(ref)
    events: list[dict[str, Any]] = list(
        client.api.push(
            repository,
            tag=tag,
            stream=True,
            decode=True,
            auth_config={"username": username, "password": password},
        )
    )
    errors = stream_errors(events)
    if errors:
        raise ImageOperationError(f"push of {ref} failed: {'; '.join(errors)}")
    for event in events:
        aux = event.get("aux")
        if isinstance(aux, dict) and str(aux.get("Digest", "")).startswith("sha256:"):
            return str(aux["Digest"])
    for event in events:
        match = re.search(r"digest: (sha256:[0-9a-f]{64})", str(event.get("status", "")))
        if match:
            return match.group(1)
    raise ImageOperationError(f"push of {ref} reported no digest: {events[-3:]}")


def pull_events(
    client: docker.DockerClient, ref: str, username: str, password: str
) -> list[dict[str, Any]]:
    """Pull with explicit credentials and return every stream event (no raising
    on in-band errors; an HTTP-level failure still raises docker.errors.APIError)."""
    repository, tag = split_ref(ref)
    return list(
        client.api.pull(
            repository,
            tag=tag,
            stream=True,
            decode=True,
            auth_config={"username": username, "password": password},
        )
    )


def remove_image(client: docker.DockerClient, ref: str) -> None:
    """Remove (untag) ``ref`` locally, even if containers use it; absent is fine."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.api.remove_image(ref, force=True)


def start_or_skip(start: Callable[[], None], unavailable: type[Exception], *,
                  require_env: str, what: str) -> None:
    """Start an engine for a test: where it cannot run, skip the test, unless
    ``require_env`` is ``1`` (CI installs the engine: a missing one is a failure)."""
    import pytest  # noqa: PLC0415 (the rehearsal and the benches use this module too)

    try:
        start()
    except unavailable as exc:
        if os.environ.get(require_env) == "1":
            pytest.fail(f"{what} is required here: {exc}")
        pytest.skip(f"{what} cannot run here: {exc}")


@contextlib.contextmanager
def dockerd_and_registry(work: Path,
                         users: Mapping[str, str]) -> Iterator[tuple[Dockerd, Registry]]:
    """A private dockerd and an htpasswd registry for one test module, stopped after."""
    dockerd = Dockerd(work / "dockerd")
    start_or_skip(dockerd.start, DockerUnavailable, require_env="EDGE_TEST_REQUIRE_DOCKERD",
                  what="a container engine")
    registry = Registry(work / "registry", dict(users))
    try:
        registry.start()
        yield dockerd, registry
    finally:
        registry.stop()
        dockerd.stop()
