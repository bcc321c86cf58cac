"""Durable file operations: hash-while-copy, temp+fsync+rename, SQLite backups."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int
    mode: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    st = path.stat()
    return FileDigest(h.hexdigest(), st.st_size, st.st_mode & 0o7777)


def copy_hashed(src: Path, dst: Path, mode: int | None = None) -> FileDigest:
    """Copy ``src`` to ``dst`` (which must not be in use), fsync it, return its digest.

    One read pass feeds both the hash and the write, so hashing costs no
    extra I/O over a plain copy.
    """
    h = hashlib.sha256()
    size = 0
    src_mode = src.stat().st_mode & 0o7777
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with src.open("rb", buffering=0) as fin, dst.open("wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            h.update(view[:n])
            done = 0
            while done < n:  # raw writes may be short (e.g. a filling disk)
                done += fout.write(view[done:n]) or 0
            size += n
        os.fchmod(fout.fileno(), src_mode if mode is None else mode)
        os.fsync(fout.fileno())
    return FileDigest(h.hexdigest(), size, src_mode if mode is None else mode)


def atomic_install(src: Path, dst: Path, mode: int | None = None) -> FileDigest:
    """Replace ``dst`` with a copy of ``src`` via a sibling temp file and rename.

    rename() keeps a running program's inode alive and never leaves a
    half-written file under the final name.
    """
    tmp = dst.with_name(f".{dst.name}.eua-tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        digest = copy_hashed(src, tmp, mode)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return digest


def sqlite_backup(src: Path, dst: Path) -> FileDigest:
    """A consistent copy of a live SQLite DB via the online backup API."""
    # Percent-encode: a '#' or '?' in the path would otherwise end it early.
    source = sqlite3.connect(f"file:{urllib.parse.quote(str(src))}?mode=ro", uri=True,
                             timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            # sleep: the wait after SQLITE_BUSY (edgecore mid-commit). Python's
            # default of 0.25 s is most of a backup's time on a small database.
            source.backup(target, pages=4096, sleep=0.005)
        finally:
            target.close()
    finally:
        source.close()
    with dst.open("rb+") as f:
        os.fsync(f.fileno())
    os.chmod(dst, src.stat().st_mode & 0o7777)
    return sha256_file(dst)


def tree_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())
