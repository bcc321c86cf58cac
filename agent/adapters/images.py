"""The ImageBackend interface, and a local-directory backend.

An installation-package image is, to the agent, a source of two files:
``/usr/local/bin/keadm`` (whose CLI matches the target version) and
``/usr/local/bin/edgecore``. The docker backend (issue 4) and a containerd
one (later) implement the same four calls; the local backend reads an
unpacked image tree ``<images.local.dir>/<repo>/<tag>/usr/local/bin/…`` so the
pipeline can be tested and rehearsed without a container engine.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.errors import FatalError
from agent.versions import ImageRef

if TYPE_CHECKING:
    from agent.config import Config
    from agent.config_reader import Section

KEADM = "/usr/local/bin/keadm"
EDGECORE = "/usr/local/bin/edgecore"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    ref: ImageRef
    digest: str
    size: int
    present_locally: bool


class ImageBackend(Protocol):
    async def inspect(self, ref: ImageRef) -> ImageInfo:
        """Prove the image exists and give its digest and size without pulling (dry-run)."""

    async def pull(self, ref: ImageRef, deadline: float, progress: Progress) -> ImageInfo:
        """Make the image available locally; raise FatalError or TransientError."""

    async def extract(self, ref: ImageRef, files: list[str], dest: Path) -> dict[str, Path]:
        """Copy ``files`` (absolute paths in the image) into ``dest``, mode 0755."""

    async def storage_path(self) -> Path | None:
        """Where pulled images take their space (None: the agent's state dir)."""


def verify_digest(info: ImageInfo, expected: str | None) -> None:
    if expected and info.digest != expected:
        raise FatalError(
            f"image {info.ref} digest mismatch: expected {expected}, got {info.digest}"
        )


@dataclass(frozen=True)
class LocalSettings:
    """``images.local``: where unpacked images live."""

    dir: str = "/var/lib/edge-upgrade-agent/images"  # a node path


class LocalDirImageBackend:
    @staticmethod
    def parse_settings(section: Section) -> LocalSettings:
        settings = LocalSettings(section.path("dir", LocalSettings.dir))
        section.done()
        return settings

    @classmethod
    def from_config(cls, config: Config, settings: LocalSettings) -> LocalDirImageBackend:
        return cls(config.paths.node(settings.dir))

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, ref: ImageRef) -> Path:
        if not ref.tag:
            raise FatalError(f"image {ref} has no tag")
        path = self.root / ref.repo / ref.tag
        # ref parts are validated by IMAGE_RE; this guards the join anyway.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise FatalError(f"image {ref} escapes the image directory")
        return path

    def _digest(self, tree: Path) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            data = f.read_bytes()
            h.update(str(f.relative_to(tree)).encode() + b"\0" + data)
            size += len(data)
        return f"sha256:{h.hexdigest()}", size

    async def inspect(self, ref: ImageRef) -> ImageInfo:
        tree = self._dir(ref)
        if not tree.is_dir():
            raise FatalError(f"image {ref} not found in {self.root}")
        digest, size = await asyncio.to_thread(self._digest, tree)
        return ImageInfo(ref, digest, size, present_locally=True)

    async def storage_path(self) -> Path | None:
        return None

    async def pull(self, ref: ImageRef, deadline: float, progress: Progress) -> ImageInfo:
        info = await self.inspect(ref)
        progress(f"image {ref} available locally ({info.size} bytes)")
        return info

    async def extract(self, ref: ImageRef, files: list[str], dest: Path) -> dict[str, Path]:
        from agent.adapters.files import atomic_install  # noqa: PLC0415 (a job's, issue 10)

        tree = self._dir(ref)
        out: dict[str, Path] = {}
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            src = tree / name.lstrip("/")
            if src.is_symlink() or not src.is_file():
                raise FatalError(f"image {ref} has no regular file {name}")
            target = dest / Path(name).name
            await asyncio.to_thread(atomic_install, src, target, 0o755)
            out[name] = target
        return out
