"""OCI images without Docker: build layers in memory and push them to a registry.

For the containerd tests and benches: the installation package as a
registry holds it (gzip layers, an image config, a manifest, and for a
multi-arch image an index over several platforms), pushed with the
distribution API's monolithic upload and basic auth, as docker-registry's
htpasswd expects.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files: Mapping[str, bytes], *, whiteouts: tuple[str, ...] = (),
          links: Mapping[str, str] | None = None) -> bytes:
    """A gzip tar layer: ``files`` (path → content, mode 0755), whiteout entries, symlinks."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        dirs: set[str] = set()
        entries = [*files, *whiteouts, *(links or {})]
        for path in sorted(entries):
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for path in whiteouts:
            head, _, name = path.strip("/").rpartition("/")
            info = tarfile.TarInfo(f"{head}/.wh.{name}" if head else f".wh.{name}")
            tar.addfile(info, io.BytesIO(b""))
        for path, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass(frozen=True)
class Built:
    """One platform's image: its manifest bytes and the blobs it needs."""

    manifest: bytes
    blobs: dict[str, bytes]
    platform: tuple[str, str]  # (os, architecture)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def image(layers: list[bytes], *, arch: str = "amd64", os_name: str = "linux") -> Built:
    diff_ids = [digest_of(gzip.decompress(blob)) for blob in layers]
    config = json.dumps({"architecture": arch, "os": os_name,
                         "config": {"Entrypoint": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b), "size": len(b)}
                   for b in layers],
    }).encode()
    blobs = {digest_of(b): b for b in (config, *layers)}
    return Built(manifest, blobs, (os_name, arch))


def index(images: list[Built]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": b.digest, "size": len(b.manifest),
                       "platform": {"os": b.platform[0], "architecture": b.platform[1]}}
                      for b in images],
    }).encode()


class Pusher:
    """Push blobs and manifests to ``http://<address>/v2/<repo>`` with basic auth."""

    def __init__(self, address: str, username: str, password: str) -> None:
        self.base = f"http://{address}/v2"
        pair = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {pair}"}

    def _send(self, method: str, url: str, data: bytes | None = None,
              content_type: str | None = None) -> tuple[int, Mapping[str, str]]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 (http only)
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status, resp.headers

    def blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        try:
            self._send("HEAD", f"{self.base}/{repo}/blobs/{digest}")
            return digest  # already there
        except urllib.error.HTTPError:
            pass
        _, headers = self._send("POST", f"{self.base}/{repo}/blobs/uploads/")
        location = headers["Location"]
        if location.startswith("/"):
            location = self.base.removesuffix("/v2") + location
        sep = "&" if "?" in location else "?"
        self._send("PUT", f"{location}{sep}digest={digest}", data, "application/octet-stream")
        return digest

    def manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        self._send("PUT", f"{self.base}/{repo}/manifests/{reference}", data, media_type)
        return digest_of(data)

    def push(self, repo: str, tag: str, built: Built) -> str:
        """One platform's image under ``tag``; its manifest digest."""
        for blob in built.blobs.values():
            self.blob(repo, blob)
        return self.manifest(repo, tag, built.manifest, OCI_MANIFEST)

    def push_index(self, repo: str, tag: str, images: list[Built]) -> str:
        """A multi-arch image under ``tag``; the index digest."""
        for built in images:
            self.push(repo, built.digest, built)
        return self.manifest(repo, tag, index(images), OCI_INDEX)


def package(version: str, keadm: bytes, edgecore: bytes, *, arch: str = "amd64") -> Built:
    """An installation-package image: a base layer with sh and sleep stand-ins, and
    keadm + edgecore in a top layer, as KubeEdge's image holds them."""
    base = layer({"bin/sh": b"#!/bin/false\n", "bin/sleep": b"#!/bin/false\n",
                  "usr/local/bin/keadm": b"old keadm, replaced by the layer above\n"})
    top = layer({"usr/local/bin/keadm": keadm, "usr/local/bin/edgecore": edgecore,
                 "etc/kubeedge-version": version.encode()})
    return image([base, top], arch=arch)
