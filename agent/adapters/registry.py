"""A small client of the OCI distribution API: manifests and blobs, with auth.

The containerd backend fetches the installation package itself, so that
registry credentials travel only in HTTP headers of this process: never on
a command line (``ctr --user u:p`` is readable by anyone in /proc), never
in a file another program reads. The subset is small and every byte it
returns is checked against a digest: a tag's manifest (or image index, then
this node's platform's manifest), and blobs streamed to disk with their
sha256 verified.

- Scheme: https, except for a loopback registry (``localhost``,
  ``127.0.0.1``, ``[::1]``), which Docker and containerd also reach over
  plain http by default.
- Auth: anonymous first; on 401 the ``WWW-Authenticate`` challenge decides:
  ``Bearer`` fetches a pull token from the realm (with basic credentials if
  any; the realm must be https unless it is on loopback), ``Basic`` sends
  them. Docker Hub's ``docker.io`` is ``registry-1.docker.io``, single names
  are ``library/<name>``.
- Redirects (blob storage on another host) drop the Authorization header,
  which urllib would otherwise forward to whoever the registry names.
- Blocking (urllib): callers run it in a thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import FatalError, TransientError
from agent.versions import ImageRef

if TYPE_CHECKING:
    import urllib.error

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CHUNK = 1024 * 1024
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm"}
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


def node_platform() -> Platform:
    """This machine's platform in OCI terms (linux/amd64, linux/arm64/v8, linux/arm/v7)."""
    machine = os.uname().machine
    arch = _ARCH.get(machine, machine)
    variant = {"aarch64": "v8", "armv7l": "v7", "armv6l": "v6"}.get(machine)
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @staticmethod
    def of(data: Any) -> Descriptor:
        try:
            digest, size = str(data["digest"]), int(data["size"])
        except (KeyError, TypeError, ValueError):
            raise FatalError("registry sent a malformed descriptor") from None
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or size < 0:
            raise FatalError(f"registry sent an unsupported digest {digest[:80]!r}")
        return Descriptor(str(data.get("mediaType", "")), digest, size)


@dataclass(frozen=True)
class Resolved:
    """What a tag names, down to this platform's config and layers."""

    digest: str  # the tag's own digest: an index's for a multi-arch image
    media_type: str
    raw: bytes  # the tag's manifest or index, as served (its sha256 is ``digest``)
    manifest: Descriptor  # this platform's manifest (the same as the tag's if no index)
    manifest_raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def size(self) -> int:
        """Bytes a pull transfers: config and layers (manifests are noise)."""
        return self.config.size + sum(layer.size for layer in self.layers)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pick_platform(index: Any, platform: Platform) -> Descriptor:
    """The index entry for ``platform``; an arm64 variant may be omitted, as it often is."""
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise FatalError("registry sent a malformed image index")
    offered = []
    for entry in entries:
        p = entry.get("platform", {}) if isinstance(entry, dict) else {}
        if not isinstance(p, dict):
            continue
        offered.append("/".join(str(p.get(k)) for k in ("os", "architecture", "variant")
                                if p.get(k)))
        if (p.get("os"), p.get("architecture")) != (platform.os, platform.architecture):
            continue
        if p.get("variant") in (None, platform.variant) or platform.architecture == "amd64":
            return Descriptor.of(entry)
    raise FatalError(f"the image has no {platform} build (it offers: "
                     f"{', '.join(o for o in offered if o) or 'none'})")


@functools.cache
def _no_auth_on_redirect() -> type[urllib.request.HTTPRedirectHandler]:
    # Made on the first pull: a subclass at import would load urllib.request
    # (with http.client and email, 1.4 MiB; agent/lean.py defers it) in every
    # idle daemon that merely has a registry backend configured (issue 10).
    class NoAuthOnRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(  # noqa: PLR0917 (urllib's signature)
                self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                             headers: Any, newurl: str) -> urllib.request.Request | None:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None and urllib.parse.urlsplit(newurl).netloc != \
                    urllib.parse.urlsplit(req.full_url).netloc:
                new.remove_header("Authorization")
            return new

    return NoAuthOnRedirect


class RegistryClient:
    """Pull-only access to one repository, for one image reference."""

    def __init__(self, ref: ImageRef, auth: dict[str, str] | None, timeout: float = 30) -> None:
        registry = ref.registry
        path = ref.repo[len(registry) + 1:] if ref.repo.startswith(registry + "/") else ref.repo
        if registry == "docker.io":
            host = "registry-1.docker.io"
            path = path if "/" in path else f"library/{path}"
        else:
            host = registry
        scheme = "http" if host.rsplit(":", 1)[0] in LOOPBACK else "https"
        self.base = f"{scheme}://{host}/v2/{path}"
        self.scope = f"repository:{path}:pull"
        self.auth = auth or None
        self.timeout = timeout
        self._header: str | None = None  # the Authorization that worked
        self._opener = urllib.request.build_opener(_no_auth_on_redirect()())

    # -- requests -------------------------------------------------------------

    def _open(self, url: str, accept: str | None = None) -> Any:
        # Here, not at import: with tempfile and random, a pull's (issue 10).
        from urllib.error import HTTPError, URLError  # noqa: PLC0415

        for attempt in (1, 2):
            headers = {"Accept": accept} if accept else {}
            if self._header:
                headers["Authorization"] = self._header
            req = urllib.request.Request(url, headers=headers)  # noqa: S310 (http/https only)
            try:
                return self._opener.open(req, timeout=self.timeout)
            except HTTPError as exc:
                if exc.code == 401 and attempt == 1:
                    self._authenticate(exc.headers.get("WWW-Authenticate", ""))
                    continue
                raise self._error(exc) from None
            except (URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TransientError(f"registry unreachable: {reason}"[:240]) from None
        raise FatalError("registry refused the credentials (401 after authenticating)")

    def _error(self, exc: urllib.error.HTTPError) -> Exception:
        detail = ""
        try:
            body = json.loads(exc.read(64 * 1024) or b"{}")
            detail = "; ".join(str(e.get("message", "")) for e in body.get("errors", []))
        except (ValueError, AttributeError, OSError, TypeError):
            pass
        text = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
        if exc.code in (401, 403):
            return FatalError(f"registry refused the credentials ({text})"[:240])
        if exc.code == 404:
            return FatalError(f"image not found in the registry ({text})"[:240])
        if exc.code == 429 or exc.code >= 500:
            return TransientError(f"registry error ({text})"[:240])
        return FatalError(f"registry error ({text})"[:240])

    def _basic(self) -> str | None:
        if not self.auth:
            return None
        pair = f"{self.auth['username']}:{self.auth['password']}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _authenticate(self, challenge: str) -> None:
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            self._header = self._basic()
            if self._header is None:
                raise FatalError("registry requires credentials; none are configured for it")
            return
        if kind != "bearer":
            raise FatalError(f"registry asks for unsupported auth {kind or '(none)'!r}")
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        # The realm gets the credentials: never in clear text off this host, as
        # the registry itself is reached over http only on loopback.
        loopback = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback in LOOPBACK):
            raise FatalError(f"registry sent a token realm that is not an https URL "
                             f"({realm[:80]!r}): credentials are never sent in clear text")
        query = {"scope": params.get("scope", self.scope)}
        if "service" in params:
            query["service"] = params["service"]
        url = f"{realm}?{urllib.parse.urlencode(query)}"
        headers = {"Authorization": basic} if (basic := self._basic()) else {}
        req = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked)
        from urllib.error import HTTPError, URLError  # noqa: PLC0415 (see _open)

        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = json.loads(resp.read(MAX_MANIFEST_BYTES))
        except HTTPError as exc:
            raise self._error(exc) from None
        except (URLError, OSError, ValueError) as exc:
            raise TransientError(f"token service unreachable: {exc}"[:240]) from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise FatalError("token service sent no token")
        self._header = f"Bearer {token}"

    # -- the API --------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[bytes, str]:
        """A manifest or index (by tag or digest): its bytes and media type."""
        with self._open(f"{self.base}/manifests/{reference}", ACCEPT) as resp:
            raw = resp.read(MAX_MANIFEST_BYTES + 1)
            media = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if len(raw) > MAX_MANIFEST_BYTES:
            raise FatalError(f"manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes")
        if reference.startswith("sha256:") and sha256(raw) != reference:
            raise FatalError(f"manifest {reference} does not match its digest")
        return raw, media

    def resolve(self, reference: str, platform: Platform) -> Resolved:
        raw, media = self.manifest(reference)
        data = _json(raw)
        media = str(data.get("mediaType") or media)
        top = sha256(raw)
        if media in INDEXES or "manifests" in data:
            chosen = pick_platform(data, platform)
            manifest_raw, manifest_media = self.manifest(chosen.digest)
            manifest = Descriptor(chosen.media_type or manifest_media, chosen.digest,
                                  len(manifest_raw))
            body = _json(manifest_raw)
        else:
            manifest, manifest_raw, body = Descriptor(media, top, len(raw)), raw, data
        layers = body.get("layers")
        if not isinstance(layers, list) or "config" not in body:
            raise FatalError("registry sent a manifest without config and layers "
                             "(a schema 1 manifest is not supported)")
        return Resolved(top, media, raw, manifest, manifest_raw, Descriptor.of(body["config"]),
                        tuple(Descriptor.of(layer) for layer in layers))

    def fetch_blob(self, blob: Descriptor, dest: Path, deadline: float,
                   on_bytes: Callable[[int], None]) -> None:
        """Stream a blob to ``dest`` (atomically), checking its size and sha256."""
        tmp = dest.with_name(f".{dest.name}.part")
        h = hashlib.sha256()
        done = 0
        with self._open(f"{self.base}/blobs/{blob.digest}") as resp, tmp.open("wb") as out:
            while chunk := resp.read(CHUNK):
                if time.monotonic() > deadline:
                    raise TransientError(f"pull deadline passed while fetching {blob.digest}")
                done += len(chunk)
                if done > blob.size:
                    raise FatalError(f"blob {blob.digest} is larger than its manifest says")
                h.update(chunk)
                out.write(chunk)
                on_bytes(len(chunk))
        if done != blob.size or "sha256:" + h.hexdigest() != blob.digest:
            tmp.unlink(missing_ok=True)
            raise FatalError(f"blob {blob.digest} does not match its digest or size")
        tmp.replace(dest)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise FatalError("registry sent a manifest that is not JSON") from None
    if not isinstance(data, dict):
        raise FatalError("registry sent a manifest that is not a JSON object")
    return data
