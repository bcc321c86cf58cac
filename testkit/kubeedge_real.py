"""The real KubeEdge binaries shipped beside the repository, for tests.

``shared/kubeedge/<version>/{edgecore,keadm}.xz`` (see its README.md) sits next
to the repository: ``<repo>/../shared/kubeedge`` (/work/shared/kubeedge for a
checkout at /work/main; CI clones with shared/ beside it), else the directory
named by EDGE_TEST_KUBEEDGE_DIR. A binary is decompressed once into a cache
directory and checked against that version's SHA256SUMS.

Tests that need one call :func:`require_real_binary`: it skips when the
binaries are not there, unless EDGE_TEST_REQUIRE_REAL_KUBEEDGE=1, when it fails.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DIR_ENV = "EDGE_TEST_KUBEEDGE_DIR"
REQUIRE_ENV = "EDGE_TEST_REQUIRE_REAL_KUBEEDGE"
CACHE_DIR_ENV = "EDGE_TEST_KUBEEDGE_CACHE"
DEFAULT_CACHE = Path("/var/tmp/edge-upgrade-agent-kubeedge")  # noqa: S108  (kept across runs)
VERSIONS = ("v1.12.1", "v1.13.0")

_verified: dict[Path, str] = {}


class RealBinaryError(RuntimeError):
    """The shared binaries are there but unusable (bad checksum, unreadable)."""


def shared_dir() -> Path | None:
    """The ``shared/kubeedge`` directory, or None if there is none."""
    default = REPO.parent / "shared" / "kubeedge"
    if default.is_dir():
        return default
    env = os.environ.get(SHARED_DIR_ENV)
    if env and Path(env).is_dir():
        return Path(env)
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_sum(version_dir: Path, name: str) -> str:
    for line in (version_dir / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == name:
            return fields[0].lower()
    raise RealBinaryError(f"{version_dir / 'SHA256SUMS'} has no sum for {name}")


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE)


def real_binary(version: str, name: str) -> Path | None:
    """The decompressed, checksum-verified real ``name`` of ``version``, or None.

    None when the shared directory or that version's ``<name>.xz`` is absent.
    Raises RealBinaryError when a file is there but does not match SHA256SUMS.
    """
    if name not in ("edgecore", "keadm") or "/" in version:
        raise ValueError(f"no such KubeEdge binary {version}/{name}")
    shared = shared_dir()
    if shared is None:
        return None
    version_dir = shared / version
    packed = version_dir / f"{name}.xz"
    if not packed.is_file():
        return None
    expected = _expected_sum(version_dir, name)
    target = _cache_dir() / version / name
    if _verified.get(target) == expected and target.is_file():
        return target
    if target.is_file() and _sha256(target) == expected:
        _verified[target] = expected
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with lzma.open(packed, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        actual = _sha256(tmp)
        if actual != expected:
            raise RealBinaryError(
                f"{packed} decompresses to sha256 {actual}, SHA256SUMS says {expected}")
        tmp.chmod(0o755)
        os.replace(tmp, target)  # atomic: a concurrent run sees the old or the new file
    finally:
        tmp.unlink(missing_ok=True)
    _verified[target] = expected
    return target


def require_real_binary(version: str, name: str) -> Path:
    """:func:`real_binary`, or skip the test (fail under EDGE_TEST_REQUIRE_REAL_KUBEEDGE=1)."""
    path = real_binary(version, name)
    if path is not None:
        return path
    where = shared_dir()
    reason = (f"real KubeEdge {version} {name} not available "
              f"(looked in {where or REPO.parent / 'shared' / 'kubeedge'} "
              f"and ${SHARED_DIR_ENV})")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def minconfig(version: str) -> Path | None:
    """That version's own ``edgecore --minconfig`` output, shipped beside the binaries."""
    shared = shared_dir()
    path = shared / version / "edgecore-minconfig.yaml" if shared else None
    return path if path is not None and path.is_file() else None
