"""ImageBackend for containerd nodes (the KubeEdge default since v1.14), no Docker needed.

keadm pulls the installation package through CRI with no credentials, and
skips the pull when the image is already in the runtime's store: for
containerd, the ``k8s.io`` namespace. So the agent puts ``<repo>:<version>``
there first, under the name CRI normalises it to
(``docker.io/kubeedge/installation-package:v1.19.0``):

1. ``RegistryClient`` fetches the manifest (this node's platform out of an
   index), the config and the layers, digests checked, into a download dir;
   the registry credentials stay in this process's HTTP headers.
2. ``ctr images import -`` reads an OCI archive streamed from those blobs on
   its stdin (no second copy on disk) and unpacks it for the node's platform,
   as keadm's CRI copy pod needs.
3. ``ctr content get`` streams a layer back for extraction: keadm and
   edgecore are read straight from the layer tarballs, top layer first,
   whiteouts honoured. No container runs.

``ctr`` is given only names, digests and the socket: never a credential
(its ``--user u:p`` would be readable by anyone in /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from agent.adapters.credentials import registry_auth
from agent.adapters.docker_images import MAX_EXTRACT_BYTES
from agent.adapters.images import EDGECORE, KEADM, ImageInfo, Progress
from agent.adapters.registry import (
    CHUNK,
    INDEXES,
    Descriptor,
    RegistryClient,
    Resolved,
    node_platform,
    pick_platform,
)
from agent.config_reader import Section
from agent.errors import AgentError, ConfigError, FatalError, TransientError
from agent.versions import ImageRef

if TYPE_CHECKING:
    from agent.config import Config, Images

CTR_TIMEOUT = 120.0


@dataclass(frozen=True)
class ContainerdSettings:
    """``images.containerd``: which containerd, and where keadm's CRI looks."""

    address: str = "/run/containerd/containerd.sock"  # the node's (not under paths.root)
    namespace: str = "k8s.io"  # CRI's namespace: the only one keadm's ImageStatus sees
    root: str = "/var/lib/containerd"  # where pulled content takes its space
    ctr: str = "ctr"  # the client program, resolved through PATH


def cri_name(ref: ImageRef) -> str:
    """The name CRI gives ``ref`` (``docker.io/library/x:tag`` for ``x:tag``)."""
    repo = ref.repo
    if ref.registry == "docker.io" and not repo.startswith("docker.io/"):
        repo = "docker.io/" + (repo if "/" in repo else f"library/{repo}")
    return f"{repo}:{ref.tag}" if ref.tag else repo


class ContainerdImageBackend:
    @staticmethod
    def parse_settings(section: Section) -> ContainerdSettings:
        address = section.path("address", ContainerdSettings.address)
        namespace = section.get("namespace", str, ContainerdSettings.namespace)
        if not namespace or not namespace.replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"{section.key('namespace')}: {namespace!r} is not a namespace")
        settings = ContainerdSettings(address, namespace,
                                      section.path("root", ContainerdSettings.root),
                                      section.get("ctr", str, ContainerdSettings.ctr))
        section.done()
        return settings

    @classmethod
    def from_config(cls, config: Config, settings: ContainerdSettings) -> ContainerdImageBackend:
        return cls(config.images, settings, config.state_dir / "downloads")

    def __init__(self, images: Images, settings: ContainerdSettings, downloads: Path) -> None:
        self.images = images
        self.settings = settings
        self.downloads = downloads

    # -- ctr ------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        s = self.settings
        return [s.ctr, "--address", s.address, "--namespace", s.namespace, *args]

    async def _ctr(self, *args: str, timeout: float = CTR_TIMEOUT) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        except OSError as exc:
            raise FatalError(f"cannot run {self.settings.ctr}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise TransientError(f"ctr {args[0]} did not answer within {timeout:g}s") from None
        if proc.returncode != 0:
            raise _classify(err.decode(errors="replace"))
        return out.decode(errors="replace")

    async def _local_digest(self, ref: ImageRef) -> str | None:
        name = cri_name(ref)
        out = await self._ctr("images", "ls", f"name=={name}")
        for line in out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == name:
                return fields[2]
        return None

    # -- ImageBackend -----------------------------------------------------------

    def _client(self, ref: ImageRef) -> RegistryClient:
        return RegistryClient(ref, registry_auth(self.images, ref.registry, None))

    async def _resolve(self, ref: ImageRef) -> Resolved:
        if not ref.tag:
            raise FatalError(f"image {ref} has no tag")
        client = self._client(ref)
        return await asyncio.to_thread(client.resolve, ref.tag, node_platform())

    async def inspect(self, ref: ImageRef) -> ImageInfo:
        """The registry's manifest (credentials proven, digest) without fetching layers."""
        resolved = await self._resolve(ref)
        local = await self._local_digest(ref)
        return ImageInfo(ref, resolved.digest, resolved.size, local == resolved.digest)

    async def storage_path(self) -> Path | None:
        return Path(self.settings.root)

    async def pull(self, ref: ImageRef, deadline: float, progress: Progress) -> ImageInfo:
        resolved = await self._resolve(ref)
        if await self._local_digest(ref) == resolved.digest:
            progress(f"image {ref} already in containerd ({self.settings.namespace}), "
                     f"{resolved.digest}")
            return ImageInfo(ref, resolved.digest, resolved.size, True)
        # One job at a time holds the lock: anything here is a crashed job's leftover.
        await asyncio.to_thread(shutil.rmtree, self.downloads, True)
        work = self.downloads / resolved.digest.replace(":", "-")
        try:
            loop = asyncio.get_running_loop()

            def report(text: str) -> None:  # from the fetching thread: the journal is the loop's
                loop.call_soon_threadsafe(progress, text)

            await asyncio.to_thread(self._fetch, ref, resolved, work, deadline, report)
            left = deadline - time.monotonic()
            if left <= 0:
                raise FatalError(f"pull of {ref} did not finish within the job deadline")
            # keadm and edgecore are read from the downloaded layers while containerd
            # imports them: extract() then finds them here instead of streaming the
            # layers back out of containerd (both on one core each).
            await asyncio.gather(
                asyncio.to_thread(self._import, ref, resolved, work, min(left, 900)),
                asyncio.to_thread(self._prefetch, ref, resolved, work))
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        got = await self._local_digest(ref)
        if got != resolved.digest:
            raise FatalError(f"containerd holds {got or 'nothing'} for {cri_name(ref)} after "
                             f"the import, not {resolved.digest}")
        return ImageInfo(ref, resolved.digest, resolved.size, True)

    def _fetch(self, ref: ImageRef, resolved: Resolved, work: Path, deadline: float,
               progress: Progress) -> None:
        blobs = work / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / resolved.digest[7:]).write_bytes(resolved.raw)
        (blobs / resolved.manifest.digest[7:]).write_bytes(resolved.manifest_raw)
        client = self._client(ref)
        total, done, last = resolved.size, 0, 0.0
        wanted = (resolved.config, *resolved.layers)
        progress(f"pulling {ref}: 0/{total} bytes, {len(resolved.layers)} layers")

        def counted(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= self.images.progress_interval_seconds:
                last = now
                progress(f"pulling {ref}: {done}/{total} bytes, {len(resolved.layers)} layers")

        for blob in wanted:
            if time.monotonic() > deadline:
                raise FatalError(f"pull of {ref} did not finish within the job deadline")
            target = blobs / blob.digest[7:]
            if not target.exists():
                client.fetch_blob(blob, target, deadline, counted)
            else:
                counted(blob.size)
        progress(f"pulled {ref}: {total} bytes; importing into containerd")

    def _import(self, ref: ImageRef, resolved: Resolved, work: Path, timeout: float) -> None:
        """Stream an OCI archive of the downloaded blobs into ``ctr images import``."""
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": resolved.media_type, "digest": resolved.digest,
            "size": len(resolved.raw),
            "annotations": {"io.containerd.image.name": cri_name(ref),
                            "org.opencontainers.image.ref.name": ref.tag or "latest"}}]}
        proc = subprocess.Popen(  # a pipe into a blocking tar writer: this runs in a thread
            self._argv("images", "import", "--platform", str(node_platform()), "-"),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            with contextlib.suppress(BrokenPipeError), proc.stdin, \
                    tarfile.open(fileobj=proc.stdin, mode="w|", bufsize=CHUNK) as tar:
                _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                _add_bytes(tar, "index.json", json.dumps(index).encode())
                for path in sorted((work / "blobs" / "sha256").iterdir()):
                    tar.add(path, f"blobs/sha256/{path.name}", recursive=False)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TransientError(f"ctr import of {ref} did not finish in {timeout:g}s") from None
        finally:
            err = proc.stderr.read()
            proc.stderr.close()
        if proc.returncode != 0:
            raise _classify(err.decode(errors="replace"))

    def _cache(self, digest: str) -> Path:
        return self.downloads / f"{digest.replace(':', '-')}.files"

    def _prefetch(self, ref: ImageRef, resolved: Resolved, work: Path) -> None:
        """Take keadm and edgecore from the downloaded layers into the files cache."""
        cache = self._cache(resolved.digest)
        shutil.rmtree(cache, ignore_errors=True)
        tmp = cache.with_name(cache.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        job = _Extraction(ref, [KEADM, EDGECORE], tmp)
        try:
            for layer in reversed(resolved.layers):
                if not job.pending():
                    break
                with (work / "blobs" / "sha256" / layer.digest[7:]).open("rb") as blob:
                    job.scan(blob)
        except (AgentError, OSError, tarfile.TarError):
            job.found.clear()  # extract() reads from containerd and says what is wrong
        if job.pending():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _fsync_dir(tmp)
        tmp.rename(cache)

    async def extract(self, ref: ImageRef, files: list[str], dest: Path) -> dict[str, Path]:
        target = await self._local_digest(ref)
        if target is None:
            raise FatalError(f"image {cri_name(ref)} is not in containerd "
                             f"({self.settings.namespace})")
        cache = self._cache(target)
        if cache.is_dir() and all((cache / Path(f).name).is_file() for f in files):
            return await asyncio.to_thread(_move_all, cache, files, dest)
        top = await self._content(target)
        data = json.loads(top)
        if data.get("mediaType") in INDEXES or "manifests" in data:
            data = json.loads(await self._content(pick_platform(data, node_platform()).digest))
        layers = [Descriptor.of(layer) for layer in data.get("layers", [])]
        dest.mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(self._extract, ref, layers, files, dest)

    async def _content(self, digest: str) -> bytes:
        return (await self._ctr("content", "get", digest)).encode()

    def _extract(self, ref: ImageRef, layers: list[Descriptor], files: list[str],
                 dest: Path) -> dict[str, Path]:
        """Top layer first: the first layer that has a file (or deletes it) decides."""
        job = _Extraction(ref, files, dest)
        for layer in reversed(layers):
            if not job.pending():
                break
            proc = subprocess.Popen(self._argv("content", "get", layer.digest),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None
            try:
                job.scan(proc.stdout)
            finally:
                proc.kill()
                proc.wait()
        missing = [name for name in files if name not in job.found]
        if missing:
            raise FatalError(f"image {ref} has no regular file {', '.join(missing)}")
        _fsync_dir(dest)
        return job.found


class _Extraction:
    """Files wanted from an image's layers, and what the layers seen so far decided."""

    def __init__(self, ref: ImageRef, files: list[str], dest: Path) -> None:
        self.ref = ref
        self.dest = dest
        self.wanted = {PurePosixPath(name.lstrip("/")): name for name in files}
        self.found: dict[str, Path] = {}
        self.gone: set[PurePosixPath] = set()  # deleted by a whiteout above

    def pending(self) -> set[PurePosixPath]:
        return {p for p, name in self.wanted.items()
                if name not in self.found and p not in self.gone}

    def scan(self, stream: IO[bytes]) -> None:
        """One layer's tar: take the pending files it holds, note its whiteouts."""
        pending = self.pending()
        hidden: set[PurePosixPath] = set()
        with tarfile.open(fileobj=stream, mode="r|*", bufsize=CHUNK) as tar:
            for member in tar:
                path = PurePosixPath(os.path.normpath("/" + member.name).lstrip("/"))
                name = path.name
                if name == ".wh..wh..opq":  # lower layers' contents of this dir are hidden
                    hidden |= {p for p in pending if path.parent in p.parents}
                elif name.startswith(".wh."):
                    deleted = path.parent / name[4:]
                    hidden |= {p for p in pending if p == deleted or deleted in p.parents}
                elif path in pending:
                    self._take(tar, member, path)
                    pending.discard(path)
        # A whiteout in this layer hides the file in every lower one.
        self.gone |= {p for p in hidden if self.wanted[p] not in self.found}

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: PurePosixPath) -> None:
        what = f"{self.wanted[path]} from {self.ref}"
        if not member.isreg():
            raise FatalError(f"refusing {what}: not a regular file")
        if member.size > MAX_EXTRACT_BYTES:
            raise FatalError(f"refusing {what}: {member.size} bytes")
        source = tar.extractfile(member)
        assert source is not None
        target, tmp = self.dest / path.name, self.dest / f".{path.name}.eua-tmp"
        with tmp.open("wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            os.fchmod(out.fileno(), 0o755)
            os.fsync(out.fileno())
        tmp.replace(target)
        self.found[self.wanted[path]] = target


def _move_all(cache: Path, files: list[str], dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in files:
        target = dest / Path(name).name
        os.replace(cache / Path(name).name, target)  # the state dir: one filesystem
        out[name] = target
    _fsync_dir(dest)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _fsync_dir(path: Path) -> None:
    # agent/adapters/files.py in a job only: the config imports this module at
    # start whenever containerd is configured (issue 10).
    from agent.adapters.files import fsync_dir  # noqa: PLC0415

    fsync_dir(path)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _classify(stderr: str) -> Exception:
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
    low = text.lower()
    if any(w in low for w in ("connection refused", "no such file or directory",
                              "deadline exceeded", "unavailable", "transport")):
        return TransientError(f"containerd unreachable: {text}"[:240])
    return FatalError(f"containerd: {text}"[:240])
