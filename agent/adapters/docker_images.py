"""ImageBackend through Docker Engine, with registry credentials and digest checks.

KubeEdge pulls the installation package with no credentials at all, so a
private registry cannot serve upgrades (#4721, #5004, #5395, #5680, #6011).
Here the credentials come from the agent config (username + password file,
for systemd's LoadCredential=) or docker's config.json, and never reach a
log, report or exception. The docker SDK is blocking and untyped: every call
runs in a thread, and the SDK is imported only when an image is needed, so
the idle daemon does not pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.adapters.credentials import registry_auth
from agent.adapters.images import ImageInfo, Progress
from agent.adapters.registry import RegistryClient, node_platform
from agent.config_reader import Section, optional_path
from agent.errors import AgentError, ConfigError, FatalError, TransientError
from agent.versions import ImageRef

if TYPE_CHECKING:
    from agent.config import Config, Images

MAX_EXTRACT_BYTES = 512 * 1024 * 1024
CHUNK = 1024 * 1024


def classify(message: str, status: int | None = None) -> Exception:
    """Registry and daemon errors: fatal ones at once, the rest worth a retry."""
    text = message.lower()
    if "repository does not exist" in text:  # Docker Hub's answer to both cases
        return FatalError(f"image not found in the registry (or access denied): {message[:200]}")
    if status in (401, 403) or any(w in text for w in ("unauthorized", "authentication required",
                                                        "denied", "forbidden")):
        return FatalError(f"registry refused the credentials: {message[:200]}")
    if status == 404 or any(w in text for w in ("manifest unknown", "not found",
                                                "does not exist", "manifest for")):
        return FatalError(f"image not found in the registry: {message[:200]}")
    return TransientError(f"registry or docker error: {message[:200]}")


@dataclass(frozen=True)
class DockerSettings:
    """``images.docker``: which engine, and docker's own credentials file."""

    host: str = "unix:///var/run/docker.sock"
    config: str | None = "/root/.docker/config.json"  # None: not read


class DockerImageBackend:
    @staticmethod
    def parse_settings(section: Section) -> DockerSettings:
        host = section.get("host", str, DockerSettings.host)
        if not host.startswith(("unix://", "tcp://")):
            raise ConfigError(f"{section.key('host')}: {host!r} is not a docker URL")
        settings = DockerSettings(host, optional_path(section, "config", DockerSettings.config))
        section.done()
        return settings

    @classmethod
    def from_config(cls, config: Config, settings: DockerSettings) -> DockerImageBackend:
        return cls(config.images, settings)

    def __init__(self, images: Images, settings: DockerSettings | None = None) -> None:
        self.images = images
        self.settings = settings or DockerSettings()

    # -- credentials --------------------------------------------------------

    def auth_for(self, registry: str) -> dict[str, str]:
        """Credentials for ``registry``; {} means anonymous.

        Never None: given None the SDK would fall back to the process's own
        ~/.docker/config.json, which the operator may have turned off.
        """
        return registry_auth(self.images, registry, self.settings.config) or {}

    # -- the SDK, lazily ------------------------------------------------------

    def _client(self, timeout: int = 60) -> Any:
        import docker  # noqa: PLC0415 (lazy: the idle daemon never loads the SDK)

        # A fixed API version: "auto" would ask the engine at construction,
        # outside our error mapping. 1.41 is Docker 20.10; newer engines accept it.
        return self._call(docker.DockerClient, base_url=self.settings.host,
                          timeout=timeout, version="1.41")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import docker.errors  # noqa: PLC0415
        import requests.exceptions  # noqa: PLC0415

        try:
            return fn(*args, **kwargs)
        except docker.errors.APIError as exc:
            raise classify(str(exc.explanation or exc), exc.status_code) from None
        except (requests.exceptions.RequestException, docker.errors.DockerException,
                OSError) as exc:
            raise TransientError(f"docker engine unreachable: {str(exc)[:200]}") from None

    # -- ImageBackend ---------------------------------------------------------

    async def inspect(self, ref: ImageRef) -> ImageInfo:
        """Registry data without pulling: proves the tag and the credentials."""
        def work() -> ImageInfo:
            client = self._client()
            auth = self.auth_for(ref.registry)
            try:
                local = self._local_digest(client, ref)
                data = self._call(client.api.inspect_distribution, str(ref), auth_config=auth)
                digest = str(data["Descriptor"]["digest"])
                # A local image of the same tag but another build says nothing of size.
                size = (self._local_size(client, ref) if local == digest else 0) or \
                    registry_size(ref, auth)
                return ImageInfo(ref, digest, size, present_locally=local == digest)
            finally:
                client.close()
        return await asyncio.to_thread(work)

    async def storage_path(self) -> Path | None:
        """Docker's data root: where a pulled image takes its space."""
        def work() -> Path | None:
            client = self._client()
            try:
                return Path(self._call(client.info)["DockerRootDir"])
            except (FatalError, TransientError, KeyError):
                return None
            finally:
                client.close()
        return await asyncio.to_thread(work)

    async def pull(self, ref: ImageRef, deadline: float, progress: Progress) -> ImageInfo:
        loop = asyncio.get_running_loop()
        client = self._client(timeout=max(1, int(deadline - time.monotonic())))

        def report(text: str) -> None:
            loop.call_soon_threadsafe(progress, text)

        def work() -> ImageInfo:
            # The low-level stream: registry errors arrive in-band with HTTP 200.
            events = self._call(client.api.pull, ref.repo, tag=ref.tag, stream=True,
                                decode=True, auth_config=self.auth_for(ref.registry))
            last = 0.0
            layers: dict[str, tuple[int, int]] = {}
            for event in self._iterate(events):
                if time.monotonic() > deadline:
                    # Leave the stream: the engine drops the pull with the connection.
                    raise FatalError(f"pull of {ref} did not finish within the job deadline")
                if "error" in event:
                    detail = event.get("errorDetail", {})
                    code = detail.get("code") if isinstance(detail, dict) else None
                    raise classify(str(event["error"]), code if isinstance(code, int) else None)
                pd = event.get("progressDetail") or {}
                if event.get("id") and isinstance(pd, dict) and pd.get("total"):
                    layers[event["id"]] = (int(pd.get("current", 0)), int(pd["total"]))
                now = time.monotonic()
                total = sum(t for _, t in layers.values())
                if total and now - last >= self.images.progress_interval_seconds:
                    last = now
                    done = sum(c for c, _ in layers.values())
                    report(f"pulling {ref}: {done}/{total} bytes, {len(layers)} layers")
            digest = self._local_digest(client, ref)
            if digest is None:
                raise TransientError(f"pulled {ref} but docker has no digest for it")
            return ImageInfo(ref, digest, self._local_size(client, ref), present_locally=True)

        try:
            return await asyncio.wait_for(asyncio.to_thread(work), deadline - time.monotonic())
        except asyncio.TimeoutError:
            # The SDK's pull has no timeout; closing the client aborts the stream.
            client.close()
            raise FatalError(f"pull of {ref} did not finish within the job deadline") from None
        finally:
            client.close()

    def _iterate(self, events: Any) -> Any:
        import docker.errors  # noqa: PLC0415
        import requests.exceptions  # noqa: PLC0415

        try:
            yield from events
        except (requests.exceptions.RequestException, docker.errors.DockerException,
                OSError) as exc:
            raise TransientError(f"pull stream broke: {str(exc)[:200]}") from None

    def _local_image(self, client: Any, ref: ImageRef) -> Any:
        import docker.errors  # noqa: PLC0415

        try:
            return self._call(client.images.get, str(ref))
        except FatalError:  # 404: not here
            return None
        except docker.errors.ImageNotFound:
            return None

    def _local_digest(self, client: Any, ref: ImageRef) -> str | None:
        image = self._local_image(client, ref)
        want = _short_repo(ref.repo)
        for repo_digest in (image.attrs.get("RepoDigests") or []) if image else []:
            repo, _, digest = str(repo_digest).partition("@")
            if _short_repo(repo) == want:
                return digest
        return None

    def _local_size(self, client: Any, ref: ImageRef) -> int:
        image = self._local_image(client, ref)
        return int(image.attrs.get("Size", 0)) if image else 0

    async def extract(self, ref: ImageRef, files: list[str], dest: Path) -> dict[str, Path]:
        def work() -> dict[str, Path]:
            client = self._client()
            container = self._call(client.containers.create, str(ref),
                                   command=["/nonexistent"])  # created, never started
            try:
                dest.mkdir(parents=True, exist_ok=True)
                return {name: self._copy_out(container, name, dest) for name in files}
            finally:
                with contextlib.suppress(Exception):
                    container.remove(force=True)
                client.close()
        return await asyncio.to_thread(work)

    def _copy_out(self, container: Any, name: str, dest: Path) -> Path:
        """Stream ``name`` out of the container's tar straight into ``dest``.

        No temporary copy of the archive: keadm and edgecore are 70 MB each, and
        the package's extraction sits in the upgrade's critical path.
        """
        import tarfile  # noqa: PLC0415 (tarfile, and files' hashing: a job's, not idle, issue 10)

        from agent.adapters.files import fsync_dir  # noqa: PLC0415

        stream, _ = self._call(container.get_archive, name)
        base = Path(name).name
        target, tmp = dest / base, dest / f".{base}.eua-tmp"
        try:
            raw = io.BufferedReader(_ChunkReader(stream, name), CHUNK)
            with tarfile.open(fileobj=raw, mode="r|", bufsize=CHUNK) as tar:
                member = tar.next()
                # Exactly one regular file named as asked: no links, no paths.
                if member is None or member.name != base or not member.isreg():
                    kind = "link" if member and (member.issym() or member.islnk()) else ""
                    got = "nothing" if member is None else \
                        f"{member.name} ({kind or repr(member.type)})"
                    raise FatalError(f"refusing {name} from the image: expected one regular "
                                     f"file, got {got}")
                source = tar.extractfile(member)
                assert source is not None
                with tmp.open("wb") as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                    os.fchmod(out.fileno(), 0o755)
                    os.fsync(out.fileno())
                extra = tar.next()
                if extra is not None:
                    raise FatalError(f"refusing {name} from the image: expected one regular "
                                     f"file, got {base} and {extra.name}")
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(dest)
        return target


class _ChunkReader(io.RawIOBase):
    """A raw stream over the docker SDK's chunk iterator, with a size cap."""

    def __init__(self, chunks: Any, name: str) -> None:
        super().__init__()
        self.chunks = iter(chunks)
        self.name = name
        self.chunk = memoryview(b"")
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.chunk:
            data = next(self.chunks, None)
            if data is None:
                return 0
            self.total += len(data)
            if self.total > MAX_EXTRACT_BYTES:
                raise FatalError(f"{self.name} in the image is larger than {MAX_EXTRACT_BYTES}")
            self.chunk = memoryview(data)
        n = min(len(buffer), len(self.chunk))
        buffer[:n] = self.chunk[:n]
        self.chunk = self.chunk[n:]
        return n


def _short_repo(repo: str) -> str:
    """Docker Hub names as dockerd reports them: no docker.io/, no library/."""
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if repo.startswith(prefix):
            return repo[len(prefix):]
    return repo


def registry_size(ref: ImageRef, auth: dict[str, str] | None) -> int:
    """Compressed size of this node's build of the image, 0 when unknown.

    Only for the free-space precheck, so any failure (an unreachable
    registry, an unknown auth scheme) just means "unknown".
    """
    try:
        return RegistryClient(ref, auth, timeout=10).resolve(ref.tag or "latest",
                                                              node_platform()).size
    except (AgentError, OSError, ValueError):
        return 0
