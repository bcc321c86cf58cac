"""Backup and restore of edgecore's binary, config, database and unit file.

Backups live in the agent's own directory (``<state_dir>/backups/<version>/``),
never in keadm's ``/etc/kubeedge/backup/<version>/``: keadm (v1.12 to v1.20)
writes its own live copy there during the very upgrade we back up, and would
overwrite ours. Inside, the file names are keadm's (``edgecore``,
``edgecore.yaml``, ``edgecore.db``) plus the unit file and its drop-ins
(keadm rewrites the unit), and a ``manifest.json`` with sha256, size, mode
and origin of each file. A backup is written into ``<version>.partial`` and
renamed when complete: a directory without the suffix is always whole.

Everything here is blocking file work: callers run it in a thread (``make_backup``
starts helper threads of its own and joins them before it returns).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.adapters.edgecore import EdgecoreFiles
from agent.adapters.files import (
    FileDigest,
    atomic_install,
    copy_hashed,
    ensure_dir,
    fsync_dir,
    fsync_file,
    sha256_file,
    sqlite_copy,
)
from agent.errors import BackupError
from agent.faults import fault_point
from agent.versions import VERSION_RE, Version

MANIFEST = "manifest.json"
NAMES = {"binary": "edgecore", "config": "edgecore.yaml", "db": "edgecore.db"}


@dataclass(frozen=True)
class BackupEntry:
    name: str
    origin: str  # absolute path on the node (inside the sandbox root, if any)
    digest: FileDigest


@dataclass(frozen=True)
class Manifest:
    version: str
    created_at: float
    entries: tuple[BackupEntry, ...]

    @property
    def size(self) -> int:
        return sum(e.digest.size for e in self.entries)

    def entry(self, name: str) -> BackupEntry | None:
        return next((e for e in self.entries if e.name == name), None)


def _sources(files: EdgecoreFiles) -> list[tuple[str, Path, bool]]:
    """(name in the backup, origin, required) for every file a backup holds."""
    out = [(NAMES["binary"], files.binary, True), (NAMES["config"], files.config, True),
           # a node that never ran has no database yet; a process-managed one no unit
           (NAMES["db"], files.db, False), (files.unit.name, files.unit, False)]
    if files.dropins.is_dir():
        out += [(f"{files.dropins.name}/{d.name}", d, False)
                for d in sorted(files.dropins.iterdir()) if d.is_file() and not d.is_symlink()]
    return out


def make_backup(backup_root: Path, version: str, files: EdgecoreFiles) -> Manifest:
    final = backup_root / version
    partial = backup_root / f"{version}.partial"
    ensure_dir(backup_root)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    entries = []
    try:
        todo = []
        for name, src, required in _sources(files):
            if not src.exists():
                if not required:
                    continue
                raise BackupError(f"cannot back up {src}: file missing")
            todo.append((name, src, partial / name))
            (partial / name).parent.mkdir(exist_ok=True)
        # The database goes first, on a thread of its own, and this one copies
        # the other files once the database's copy is done and its read lock
        # (which holds off edgecore's writers) is released: the copy alone keeps
        # it short. The hash of each copy runs on one more thread, so the
        # database's hash and fsync then go on beside the binary's copy and
        # hash: SHA-256, one core at about 1.4 GB/s here, is the slowest part
        # of a backup, and two files are hashed at once.
        unlocked = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="eua-backup-db") as pool:
            db_jobs = [(name, src, pool.submit(sqlite_copy, src, dst, unlocked))
                       for name, src, dst in todo if name == NAMES["db"]]
            try:
                if db_jobs:
                    unlocked.wait()  # set on every path out of sqlite_copy
                for name, src, dst in todo:
                    if name != NAMES["db"]:
                        entries.append(BackupEntry(name, str(src), copy_hashed(src, dst)))
                        fault_point("backup:partial")
            finally:
                futures.wait([job for _, _, job in db_jobs])  # before any rmtree of partial
            for name, src, job in db_jobs:
                entries.append(BackupEntry(name, str(src), job.result()))
                fault_point("backup:partial")
    except (OSError, sqlite3.Error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(f"backup to {partial} failed: {exc}") from None
    except BackupError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = Manifest(version, time.time(), tuple(sorted(entries, key=lambda e: e.name)))
    _write_manifest(partial / MANIFEST, manifest)
    # Every file is fsynced (copy_hashed, sqlite_copy, the manifest); now every
    # directory's entries, the drop-ins' first: a renamed backup is whole.
    for sub in sorted({(partial / e.name).parent for e in manifest.entries} - {partial}):
        fsync_dir(sub)
    fsync_dir(partial)
    old = backup_root / f"{version}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    fsync_dir(backup_root)
    if old.exists():
        shutil.rmtree(old)
    return manifest


def _write_manifest(path: Path, manifest: Manifest) -> None:
    data = {
        "version": manifest.version,
        "createdAt": manifest.created_at,
        "files": {
            e.name: {"origin": e.origin, "sha256": e.digest.sha256, "size": e.digest.size,
                     "mode": oct(e.digest.mode)}
            for e in manifest.entries
        },
    }
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def load_manifest(directory: Path) -> Manifest:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        entries = tuple(
            BackupEntry(name, f["origin"], FileDigest(f["sha256"], int(f["size"]),
                                                      int(f["mode"], 8)))
            for name, f in sorted(data["files"].items())
        )
        return Manifest(str(data["version"]), float(data["createdAt"]), entries)
    except FileNotFoundError:
        raise BackupError(f"no backup at {directory} (manifest.json missing)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackupError(f"backup manifest in {directory} is unreadable: {exc}") from None


def verify_backup(directory: Path) -> Manifest:
    """Check every file against the manifest *before* anything is restored."""
    manifest = load_manifest(directory)
    for e in manifest.entries:
        path = directory / e.name
        if Path(e.name).is_absolute() or ".." in Path(e.name).parts:
            raise BackupError(f"backup manifest in {directory} names a file outside it: {e.name}")
        if path.is_symlink() or not path.is_file():
            raise BackupError(f"backup file {path} is missing")
        actual = sha256_file(path)
        if actual.sha256 != e.digest.sha256 or actual.size != e.digest.size:
            raise BackupError(
                f"backup file {path} is corrupted: sha256 {actual.sha256[:16]}… size "
                f"{actual.size}, manifest says {e.digest.sha256[:16]}… size {e.digest.size}"
            )
    return manifest


def restore_backup(directory: Path, manifest: Manifest) -> bool:
    """Put each file back with temp+fsync+rename, re-checking the copy's hash.

    Returns whether a unit file was among them (the caller then reloads units).
    Files equal to the backup already are left alone, so a re-run after a
    crash, or a rollback of a job that never reached keadm, rewrites nothing.
    Edgecore is stopped meanwhile: the database is put back on a thread of its
    own beside the other files, as make_backup copies it, so that two files
    are hashed at once (docs/performance.md, "Backup throughput").
    """
    unit_restored = False
    with ThreadPoolExecutor(1, thread_name_prefix="eua-restore-db") as pool:
        db_jobs = [pool.submit(_restore_one, directory, e)
                   for e in manifest.entries if e.name == NAMES["db"]]
        try:
            for e in manifest.entries:
                if e.name != NAMES["db"]:
                    unit_restored |= _restore_one(directory, e)
                    fault_point("restore:partial")
        finally:
            futures.wait(db_jobs)
        for job in db_jobs:
            job.result()
            fault_point("restore:partial")
    return unit_restored


def _restore_one(directory: Path, e: BackupEntry) -> bool:
    """Put back one file; whether it was a unit file that had to be rewritten."""
    dst = Path(e.origin)
    # Edgecore is stopped: hash the file in place only when it may be equal (same
    # size), and never the database, which is always rewritten.
    try:
        same = e.name != NAMES["db"] and dst.is_file() and \
            dst.stat().st_size == e.digest.size and sha256_file(dst).sha256 == e.digest.sha256
    except OSError:
        same = False
    if same:
        # Equal, but maybe only in the page cache (keadm wrote it): made durable
        # as a restored file would be. The DB is always rewritten: its -wal may
        # still hold newer pages.
        fsync_file(dst)
        return False
    if e.name == NAMES["db"]:
        # A newer edgecore's WAL replayed onto the old DB would corrupt it.
        for suffix in ("-wal", "-shm", "-journal"):
            dst.with_name(dst.name + suffix).unlink(missing_ok=True)
    try:
        digest = atomic_install(directory / e.name, dst, e.digest.mode)
    except OSError as exc:
        raise BackupError(f"restoring {dst} failed: {exc}") from None
    if digest.sha256 != e.digest.sha256:
        raise BackupError(f"restored {dst} does not match the backup checksum")
    return e.name not in NAMES.values()


def list_backups(backup_root: Path) -> list[Version]:
    """Whole backups (a manifest, a version name), oldest first by mtime."""
    if not backup_root.is_dir():
        return []
    found = []
    for d in backup_root.iterdir():
        if d.is_dir() and VERSION_RE.fullmatch(d.name) and (d / MANIFEST).is_file():
            found.append((d.stat().st_mtime, Version.parse(d.name)))
    return [v for _, v in sorted(found)]


def prune_backups(backup_root: Path, keep: int, protect: str | None = None) -> list[str]:
    """Keep the newest ``keep`` whole backups (ours: those with a manifest)."""
    removed = []
    for version in list_backups(backup_root)[:-keep]:
        if str(version) != protect:
            shutil.rmtree(backup_root / str(version))
            removed.append(str(version))
    return removed
