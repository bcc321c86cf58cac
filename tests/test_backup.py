"""agent/steps/backup.py and agent/adapters/files.py against real files and a real SQLite DB."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.edgecore import EdgecoreFiles
from agent.adapters.files import (
    FileDigest,
    atomic_install,
    copy_hashed,
    sha256_file,
    sqlite_backup,
    sqlite_copy,
)
from agent.errors import BackupError
from agent.steps.backup import (
    MANIFEST,
    BackupEntry,
    Manifest,
    load_manifest,
    make_backup,
    prune_backups,
    restore_backup,
    verify_backup,
)

OLD = "v1.12.1"
BINARY = bytes(range(256)) * 1024 + b"edgecore v1.12.1\n"  # 256 KiB and a bit
CONFIG = b"apiVersion: edgecore.config.kubeedge.io/v1alpha2\nkind: EdgeCore\n"
ROWS = 50


# --------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_name(manifest: Manifest) -> tuple[str, dict[str, BackupEntry]]:
    """A manifest's content, independent of entry order (load_manifest sorts by name)."""
    return manifest.version, {e.name: e for e in manifest.entries}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def connect(path: Path | str, *, uri: bool = False) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, uri=uri, isolation_level=None, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def create_db(path: Path, rows: int = ROWS) -> None:
    with connect(path) as db:
        assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        db.execute("CREATE TABLE meta (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO meta (id, value) VALUES (?, ?)",
                       [(i, f"row-{i}-" + "x" * 200) for i in range(1, rows + 1)])
        db.execute("COMMIT")


def db_report(path: Path) -> tuple[str, int, int]:
    """(integrity_check, row count, max id) of a copy of ``path``, leaving ``path`` alone."""
    probe = path.with_name(path.name + ".probe")
    shutil.copyfile(path, probe)
    try:
        with connect(probe) as db:
            check = db.execute("PRAGMA integrity_check").fetchone()[0]
            count, top = db.execute("SELECT count(*), coalesce(max(id), 0) FROM meta").fetchone()
        return str(check), int(count), int(top)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(probe) + suffix).unlink(missing_ok=True)


@pytest.fixture
def node(tmp_path: Path) -> EdgecoreFiles:
    root = tmp_path / "node"
    files = EdgecoreFiles(
        binary=root / "usr/local/bin/edgecore",
        config=root / "etc/kubeedge/config/edgecore.yaml",
        db=root / "var/lib/kubeedge/edgecore.db",
        unit=root / "etc/systemd/system/edgecore.service",
        dropins=root / "etc/systemd/system/edgecore.service.d",
    )
    for path in files.all()[:3]:
        path.parent.mkdir(parents=True, exist_ok=True)
    files.binary.write_bytes(BINARY)
    files.binary.chmod(0o755)
    files.config.write_bytes(CONFIG)
    files.config.chmod(0o600)
    create_db(files.db)
    files.db.chmod(0o640)
    return files


@pytest.fixture
def backup_root(tmp_path: Path) -> Path:
    return tmp_path / "node/var/lib/edge-upgrade-agent/backups"


# --------------------------------------------------------------------------- make_backup


def test_make_backup_layout_and_manifest(node: EdgecoreFiles, backup_root: Path) -> None:
    manifest = make_backup(backup_root, OLD, node)
    final = backup_root / OLD
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["edgecore", "edgecore.yaml", "edgecore.db", MANIFEST])
    assert [p.name for p in backup_root.iterdir()] == [OLD]  # no .partial, no .old

    assert (final / "edgecore").read_bytes() == BINARY
    assert (final / "edgecore.yaml").read_bytes() == CONFIG
    assert mode_of(final / "edgecore") == 0o755
    assert mode_of(final / "edgecore.yaml") == 0o600
    assert mode_of(final / "edgecore.db") == 0o640

    data = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
    assert data["version"] == OLD
    assert set(data["files"]) == {"edgecore", "edgecore.yaml", "edgecore.db"}
    origins = {"edgecore": node.binary, "edgecore.yaml": node.config, "edgecore.db": node.db}
    for name, entry in data["files"].items():
        copy = (final / name).read_bytes()
        assert entry["sha256"] == sha(copy), name
        assert entry["size"] == len(copy), name
        assert int(entry["mode"], 8) == mode_of(final / name), name
        assert entry["origin"] == str(origins[name]), name
    assert data["files"]["edgecore"]["sha256"] == sha(BINARY)
    assert data["files"]["edgecore"]["mode"] == "0o755"

    assert manifest.version == OLD
    assert manifest.size == sum(e.digest.size for e in manifest.entries)
    assert by_name(load_manifest(final)) == by_name(manifest)
    assert by_name(verify_backup(final)) == by_name(manifest)
    assert load_manifest(final).created_at == manifest.created_at
    assert db_report(final / "edgecore.db") == ("ok", ROWS, ROWS)


def test_make_backup_without_database(node: EdgecoreFiles, backup_root: Path) -> None:
    node.db.unlink()
    manifest = make_backup(backup_root, OLD, node)
    assert [e.name for e in manifest.entries] == ["edgecore", "edgecore.yaml"]
    assert not (backup_root / OLD / "edgecore.db").exists()
    verify_backup(backup_root / OLD)


@pytest.mark.parametrize("which", ["binary", "config"])
def test_make_backup_missing_file(node: EdgecoreFiles, backup_root: Path, which: str) -> None:
    missing = getattr(node, which)
    missing.unlink()
    with pytest.raises(BackupError) as info:
        make_backup(backup_root, OLD, node)
    assert str(missing) in info.value.reason
    assert not (backup_root / OLD).exists()


def test_make_backup_replaces_leftover_partial(node: EdgecoreFiles, backup_root: Path) -> None:
    partial = backup_root / f"{OLD}.partial"
    partial.mkdir(parents=True)
    (partial / "edgecore").write_bytes(b"half a binary")
    (partial / "junk").write_bytes(b"from the crashed run")
    make_backup(backup_root, OLD, node)
    assert not partial.exists()
    final = backup_root / OLD
    assert not (final / "junk").exists()
    assert (final / "edgecore").read_bytes() == BINARY
    verify_backup(final)


def test_make_backup_twice_replaces_whole(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    (backup_root / OLD / "stale").write_bytes(b"x")
    (backup_root / f"{OLD}.old").mkdir()  # leftover of a crash between the two renames
    node.config.write_bytes(CONFIG + b"# edited\n")
    manifest = make_backup(backup_root, OLD, node)
    assert sorted(p.name for p in backup_root.iterdir()) == [OLD]
    assert not (backup_root / OLD / "stale").exists()
    assert (backup_root / OLD / "edgecore.yaml").read_bytes() == CONFIG + b"# edited\n"
    assert by_name(verify_backup(backup_root / OLD)) == by_name(manifest)


def test_make_backup_db_consistent_with_open_write_transaction(
    node: EdgecoreFiles, backup_root: Path
) -> None:
    """Committed rows that live only in the WAL are included; uncommitted ones are not."""
    with connect(node.db) as committed, connect(node.db) as writer:
        committed.execute("PRAGMA wal_autocheckpoint=0")  # keep these pages in the -wal
        committed.execute("BEGIN")
        committed.executemany("INSERT INTO meta (id, value) VALUES (?, ?)",
                              [(i, "in-wal") for i in range(ROWS + 1, ROWS + 21)])
        committed.execute("COMMIT")
        assert Path(f"{node.db}-wal").stat().st_size > 0

        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("BEGIN IMMEDIATE")  # holds the write lock through the backup
        writer.executemany("INSERT INTO meta (id, value) VALUES (?, ?)",
                           [(i, "uncommitted" * 50) for i in range(ROWS + 21, ROWS + 521)])
        writer.execute("UPDATE meta SET value = 'changed' WHERE id <= 10")

        make_backup(backup_root, OLD, node)
        writer.execute("ROLLBACK")

    backed_up = backup_root / OLD / "edgecore.db"
    assert db_report(backed_up) == ("ok", ROWS + 20, ROWS + 20)
    with connect(f"file:{backed_up}?immutable=1", uri=True) as db:
        assert db.execute("SELECT count(*) FROM meta WHERE value = 'changed'").fetchone() == (0,)
    verify_backup(backup_root / OLD)


def test_make_backup_db_consistent_with_concurrent_commits(
    node: EdgecoreFiles, backup_root: Path
) -> None:
    started = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with connect(node.db) as db:
                next_id = ROWS + 1
                while not stop.is_set():
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO meta (id, value) VALUES (?, ?)",
                               (next_id, "y" * 500))
                    db.execute("COMMIT")
                    next_id += 1
                    started.set()
        except BaseException as exc:
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        assert started.wait(30)
        make_backup(backup_root, OLD, node)
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    check, count, top = db_report(backup_root / OLD / "edgecore.db")
    assert check == "ok"
    assert count > ROWS  # at least the commit that set `started`
    assert top == count  # a snapshot: every id up to the newest one, no gaps
    verify_backup(backup_root / OLD)


def test_make_backup_corrupt_db_is_backup_error(node: EdgecoreFiles, backup_root: Path) -> None:
    node.db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BackupError):
        make_backup(backup_root, OLD, node)


def test_make_backup_db_path_with_uri_characters(tmp_path: Path, node: EdgecoreFiles) -> None:
    odd = tmp_path / "odd#dir?x=1"
    odd.mkdir()
    db = odd / "edgecore.db"
    create_db(db)
    files = EdgecoreFiles(node.binary, node.config, db, node.unit, node.dropins)
    make_backup(tmp_path / "backup", OLD, files)
    # today SQLite cuts the URI at '#', opens (and creates) an empty "<tmp>/odd" DB and
    # backs that up: the backup "succeeds" without a single row
    assert db_report(tmp_path / "backup" / OLD / "edgecore.db") == ("ok", ROWS, ROWS)
    assert not (tmp_path / "odd").exists()


# --------------------------------------------------------------------------- copies under load

# A writer process, as edgecore is one: every transaction bumps a counter, appends
# a row and rewrites a random older one (a page anywhere in the file), so
# ``counter.n == count(log) == max(log.n)`` in every committed state, and a copy
# that mixes two states breaks that or the B-tree (integrity_check).
WRITER = """
import os, random, sqlite3, sys, time
db, mode = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db, isolation_level=None, timeout=30)
conn.execute("PRAGMA journal_mode=" + mode).fetchall()
conn.execute("PRAGMA synchronous=OFF")  # no fsyncs: many more commits per copy
n = conn.execute("SELECT n FROM counter").fetchone()[0]
print("ready", flush=True)
while True:
    conn.execute("BEGIN IMMEDIATE")
    n += 1
    conn.execute("UPDATE counter SET n = ?", (n,))
    conn.execute("INSERT INTO log (n, payload) VALUES (?, ?)", (n, os.urandom(1500)))
    conn.execute("UPDATE log SET payload = ? WHERE n = ?",
                 (os.urandom(random.randrange(100, 3000)), random.randrange(1, n)))
    conn.execute("COMMIT")
    time.sleep(0.001)  # in a rollback journal a writer that never pauses starves all readers
"""
WRITER_ROWS = 2000  # about 4 MiB: the writer commits around each copy (in WAL, during it)


def create_counter_db(path: Path, journal_mode: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with connect(path) as db:
        assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone() == (journal_mode,)
        db.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        db.execute("CREATE TABLE log (n INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        db.execute("BEGIN")
        db.execute("INSERT INTO counter VALUES (?)", (WRITER_ROWS,))
        db.executemany("INSERT INTO log VALUES (?, ?)",
                       [(i, os.urandom(2000)) for i in range(1, WRITER_ROWS + 1)])
        db.execute("COMMIT")


def committed(db_path: Path) -> int:
    with connect(db_path) as db:
        return int(db.execute("SELECT n FROM counter").fetchone()[0])


def counter_report(path: Path) -> tuple[str, int, int, int]:
    """(integrity_check, counter, row count, max n) of a copy of the backed-up ``path``."""
    probe = path.with_name(path.name + ".probe")
    shutil.copyfile(path, probe)
    try:
        with connect(probe) as db:
            check = str(db.execute("PRAGMA integrity_check").fetchone()[0])
            (n,) = db.execute("SELECT n FROM counter").fetchone()
            count, top = db.execute("SELECT count(*), max(n) FROM log").fetchone()
        return check, int(n), int(count), int(top)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{probe}{suffix}").unlink(missing_ok=True)


@pytest.fixture
def backup_api_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The database copies that fell back to SQLite's backup API."""
    calls: list[Path] = []

    def counting(src: Path, dst: Path) -> FileDigest:
        calls.append(src)
        return sqlite_backup(src, dst)

    monkeypatch.setattr("agent.adapters.files.sqlite_backup", counting)
    return calls


# "delete" is edgecore's: its DSN sets no journal mode, so SQLite's default
# rollback journal (the stand-in's _migrate does the same).
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_make_backup_db_consistent_while_a_writer_process_hammers_it(
    node: EdgecoreFiles, backup_root: Path, backup_api_calls: list[Path], journal_mode: str
) -> None:
    """Ten backups while another process commits. A plain copy of the file without
    the read transaction fails this in both modes (tried: a torn B-tree or
    counter != rows with a rollback journal, a state older than ``before`` in WAL)."""
    create_counter_db(node.db, journal_mode)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(node.db), journal_mode],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while committed(node.db) == WRITER_ROWS:  # its first commit (bounds a hang only)
            assert time.monotonic() < deadline
            time.sleep(0.001)
        seen = []
        for _ in range(10):
            before = committed(node.db)
            manifest = make_backup(backup_root, OLD, node)
            after = committed(node.db)
            check, n, count, top = counter_report(backup_root / OLD / "edgecore.db")
            assert check == "ok"
            assert n == count == top  # one committed state, not a mix of two
            assert before <= n <= after  # ... and one the writer really committed
            seen.append(n)
            entry = manifest.entry("edgecore.db")
            assert entry is not None
            assert entry.digest == sha256_file(backup_root / OLD / "edgecore.db")
            verify_backup(backup_root / OLD)
        assert writer.poll() is None, "the writer died"
    finally:
        writer.kill()
        writer.wait()
    assert seen[-1] > seen[0]  # the writer went on committing during the backups
    # Each copy was the plain file copy, never the page-by-page backup API: in
    # WAL mode a few-millisecond hold of the write lock lets the checkpoint catch up.
    assert backup_api_calls == []


def test_wal_copy_falls_back_to_backup_api_behind_an_old_reader(
    node: EdgecoreFiles, tmp_path: Path, backup_api_calls: list[Path]
) -> None:
    """A reader on an old snapshot keeps the checkpoint from reaching the newest
    commit: the main file alone is then not a snapshot, and the backup API copies."""
    with connect(node.db) as old_reader, connect(node.db) as writer:
        old_reader.execute("BEGIN")
        assert old_reader.execute("SELECT count(*) FROM meta").fetchone() == (ROWS,)
        writer.execute("INSERT INTO meta (id, value) VALUES (?, 'after the reader')",
                       (ROWS + 1,))
        digest = sqlite_copy(node.db, tmp_path / "copy.db")
        old_reader.execute("ROLLBACK")
    assert backup_api_calls == [node.db]
    assert digest == sha256_file(tmp_path / "copy.db")
    assert db_report(tmp_path / "copy.db") == ("ok", ROWS + 1, ROWS + 1)


def test_wal_copy_holds_the_write_lock_when_a_commit_slips_in(
    node: EdgecoreFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    backup_api_calls: list[Path]
) -> None:
    """A commit between our read transaction and the checkpoint that checks it: the
    second try, with commits held off for a moment, copies the newer state."""
    import agent.adapters.files as files_mod

    real_begin = files_mod._begin_read
    begun: list[str] = []

    def begin_then_commit(conn: sqlite3.Connection) -> str:
        mode = real_begin(conn)
        begun.append(mode)
        if len(begun) == 2:  # the first try in WAL mode: a commit right after it
            with connect(node.db) as other:
                other.execute("INSERT INTO meta (id, value) VALUES (?, 'slipped in')",
                              (ROWS + 1,))
        return mode

    monkeypatch.setattr(files_mod, "_begin_read", begin_then_commit)
    sqlite_copy(node.db, tmp_path / "copy.db")
    assert begun == ["wal", "wal", "wal"]  # journal mode; first try; the try under the lock
    assert backup_api_calls == []
    assert db_report(tmp_path / "copy.db") == ("ok", ROWS + 1, ROWS + 1)


def test_rollback_journal_copy_is_the_file_itself(node: EdgecoreFiles, tmp_path: Path,
                                                  backup_api_calls: list[Path]) -> None:
    create_counter_db(node.db, "delete")
    node.db.chmod(0o640)
    digest = sqlite_copy(node.db, tmp_path / "copy.db")
    assert (tmp_path / "copy.db").read_bytes() == node.db.read_bytes()
    assert digest == FileDigest(sha256_file(node.db).sha256, node.db.stat().st_size, 0o640)
    assert mode_of(tmp_path / "copy.db") == 0o640
    assert backup_api_calls == []


def test_wal_copy_after_commits_left_in_the_wal(node: EdgecoreFiles, tmp_path: Path,
                                                backup_api_calls: list[Path]) -> None:
    with connect(node.db) as db:
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("DELETE FROM meta WHERE id > 10")
        assert Path(f"{node.db}-wal").stat().st_size > 0
        sqlite_copy(node.db, tmp_path / "copy.db")
    assert backup_api_calls == []  # checkpointed first, then copied
    assert db_report(tmp_path / "copy.db") == ("ok", 10, 10)


# --------------------------------------------------------------------------- copy_hashed


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 64 KiB, so that small files take the threaded, multi-chunk path."""
    monkeypatch.setattr("agent.adapters.files.COPY_CHUNK", 64 * 1024)
    return 64 * 1024


@pytest.mark.parametrize("size_in_chunks", [0, 0.5, 1, 5, 5.25, 40.001])
def test_copy_hashed_sizes(tmp_path: Path, small_chunks: int, size_in_chunks: float) -> None:
    data = os.urandom(int(size_in_chunks * small_chunks))
    src = tmp_path / "src"
    src.write_bytes(data)
    src.chmod(0o751)
    digest = copy_hashed(src, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data
    assert digest == FileDigest(sha(data), len(data), 0o751)
    assert mode_of(tmp_path / "dst") == 0o751


@pytest.mark.parametrize(
    ("broken", "tried"),
    [
        pytest.param({}, ["copy_file_range"], id="copy_file_range"),
        pytest.param({"copy_file_range": errno.EXDEV}, ["copy_file_range", "sendfile"],
                     id="other-filesystem"),
        pytest.param({"copy_file_range": errno.ENOSYS, "sendfile": errno.EINVAL},
                     ["copy_file_range", "sendfile"], id="neither-kernel-copy"),
        pytest.param({"copy_file_range": 0}, ["copy_file_range"],
                     id="copy_file_range-returns-0"),
    ],
)
def test_copy_hashed_falls_back_from_kernel_copies(
    tmp_path: Path, small_chunks: int, monkeypatch: pytest.MonkeyPatch, broken: dict[str, int],
    tried: list[str]
) -> None:
    used: list[str] = []
    for name in ("copy_file_range", "sendfile"):
        real = getattr(os, name)

        def fake(*args: int, _name: str = name, _real: Any = real) -> int:
            used.append(_name)
            if _name in broken:
                if not broken[_name]:
                    return 0
                raise OSError(broken[_name], os.strerror(broken[_name]))
            return int(_real(*args))

        monkeypatch.setattr(f"agent.adapters.files.os.{name}", fake)
    data = os.urandom(small_chunks * 3 + 17)
    (tmp_path / "src").write_bytes(data)
    digest = copy_hashed(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data
    assert digest.sha256 == sha(data)
    assert list(dict.fromkeys(used)) == tried
    if broken:  # given up on its first failure, not tried again for every chunk
        assert used.count("copy_file_range") == 1
        assert used.count("sendfile") == (0 if "sendfile" not in tried else
                                          1 if "sendfile" in broken else len(used) - 1)


def test_copy_hashed_error_leaves_no_thread_behind(tmp_path: Path, small_chunks: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.copy_file_range
    calls = []

    def failing(*args: int) -> int:
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr("agent.adapters.files.os.copy_file_range", failing)
    (tmp_path / "src").write_bytes(os.urandom(small_chunks * 10))
    before = threading.active_count()
    with pytest.raises(OSError, match="No space"):
        copy_hashed(tmp_path / "src", tmp_path / "dst")
    assert threading.active_count() == before


# --------------------------------------------------------------------------- verify_backup


@pytest.mark.parametrize("name", ["edgecore", "edgecore.yaml", "edgecore.db"])
def test_verify_detects_flipped_byte(node: EdgecoreFiles, backup_root: Path, name: str) -> None:
    make_backup(backup_root, OLD, node)
    target = backup_root / OLD / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BackupError) as info:
        verify_backup(backup_root / OLD)
    assert str(target) in info.value.reason
    assert "corrupted" in info.value.reason


def test_verify_detects_truncation(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    target = backup_root / OLD / "edgecore"
    with target.open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(BackupError, match="corrupted") as info:
        verify_backup(backup_root / OLD)
    assert str(target) in info.value.reason


@pytest.mark.parametrize("name", ["edgecore", "edgecore.yaml", "edgecore.db"])
def test_verify_detects_missing_file(node: EdgecoreFiles, backup_root: Path, name: str) -> None:
    make_backup(backup_root, OLD, node)
    target = backup_root / OLD / name
    target.unlink()
    with pytest.raises(BackupError) as info:
        verify_backup(backup_root / OLD)
    assert str(target) in info.value.reason
    assert "missing" in info.value.reason


def test_verify_refuses_symlink(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    target = backup_root / OLD / "edgecore"
    real = backup_root / "elsewhere"
    target.rename(real)
    target.symlink_to(real)  # same bytes, but not a regular file of the backup
    with pytest.raises(BackupError, match="missing") as info:
        verify_backup(backup_root / OLD)
    assert str(target) in info.value.reason


def test_verify_missing_manifest(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    (backup_root / OLD / MANIFEST).unlink()
    with pytest.raises(BackupError, match=r"manifest\.json missing") as info:
        verify_backup(backup_root / OLD)
    assert str(backup_root / OLD) in info.value.reason
    with pytest.raises(BackupError, match=r"manifest\.json missing"):
        verify_backup(backup_root / "v0.0.0")


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'"manifest"',
        b'{"version": "v1.12.1"}',
        b'{"version": "v1.12.1", "createdAt": "yesterday", "files": {}}',
        b'{"version": "v1.12.1", "createdAt": 1, "files": {"edgecore": "abc"}}',
        b'{"version": "v1.12.1", "createdAt": 1, "files": {"edgecore": {"origin": "/x"}}}',
        b'{"version": "v1.12.1", "createdAt": 1, "files": {"edgecore": {"origin": "/x",'
        b' "sha256": "00", "size": 1, "mode": 493}}}',
        b'{"version": "v1.12.1", "createdAt": 1, "files": {"edgecore": {"origin": "/x",'
        b' "sha256": "00", "size": "big", "mode": "0o755"}}}',
    ],
)
def test_verify_garbage_manifest(node: EdgecoreFiles, backup_root: Path, garbage: bytes) -> None:
    make_backup(backup_root, OLD, node)
    (backup_root / OLD / MANIFEST).write_bytes(garbage)
    with pytest.raises(BackupError, match="unreadable") as info:
        verify_backup(backup_root / OLD)
    assert str(backup_root / OLD) in info.value.reason


@pytest.mark.parametrize("files", ["[]", "null", '"edgecore"'])
def test_verify_manifest_files_not_an_object(
    node: EdgecoreFiles, backup_root: Path, files: str
) -> None:
    make_backup(backup_root, OLD, node)
    (backup_root / OLD / MANIFEST).write_text(
        f'{{"version": "v1.12.1", "createdAt": 1, "files": {files}}}', encoding="utf-8")
    with pytest.raises(BackupError):
        verify_backup(backup_root / OLD)


# --------------------------------------------------------------------------- restore_backup


def test_restore_backup_is_byte_identical(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    final = backup_root / OLD
    wanted = {p: (p.read_bytes(), mode_of(p)) for p in (node.binary, node.config)}
    backed_db = (final / "edgecore.db").read_bytes()

    # the "new version" rewrote everything, changed modes and dropped the config
    node.binary.write_bytes(b"#!/bin/sh\necho edgecore v1.13.0\n")
    node.binary.chmod(0o700)
    shutil.rmtree(node.config.parent)
    with connect(node.db) as db:
        db.execute("DELETE FROM meta WHERE id > 5")
    node.db.chmod(0o666)

    manifest = verify_backup(final)
    restore_backup(final, manifest)

    for path, (data, mode) in wanted.items():
        assert path.read_bytes() == data
        assert mode_of(path) == mode
    assert node.db.read_bytes() == backed_db
    assert mode_of(node.db) == 0o640
    assert db_report(node.db) == ("ok", ROWS, ROWS)
    for entry in manifest.entries:
        assert sha256_file(Path(entry.origin)).sha256 == entry.digest.sha256
        leftovers = [p.name for p in Path(entry.origin).parent.iterdir() if "eua-tmp" in p.name]
        assert leftovers == []
    verify_backup(final)  # the backup itself is untouched


def test_restore_hashes_in_place_only_what_may_be_equal(node: EdgecoreFiles,
                                                         backup_root: Path) -> None:
    """A file of the backup's size is hashed, and left alone only if equal; one of
    another size is put back unread; the database is always put back."""
    make_backup(backup_root, OLD, node)
    final = backup_root / OLD
    binary = node.binary.read_bytes()
    node.binary.write_bytes(bytes(b ^ 0xFF for b in binary))  # same size, other bytes
    db_inode = node.db.stat().st_ino
    node.config.write_text(node.config.read_text() + "# edited\n")  # another size

    restore_backup(final, verify_backup(final))

    assert node.binary.read_bytes() == binary
    assert node.config.read_bytes() == (final / "edgecore.yaml").read_bytes()
    assert node.db.stat().st_ino != db_inode  # replaced, though it was equal
    config_inode = node.config.stat().st_ino
    restore_backup(final, verify_backup(final))  # all equal now: nothing but the db
    assert node.config.stat().st_ino == config_inode


def test_restore_removes_stale_wal_and_shm(node: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, OLD, node)
    wal, shm, journal = (Path(f"{node.db}{s}") for s in ("-wal", "-shm", "-journal"))

    # A newer edgecore leaves a real WAL behind: replayed onto the old DB it would
    # delete rows (or corrupt it), so restore must remove it first.
    with connect(node.db) as db:
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute("DELETE FROM meta")
        db.execute("INSERT INTO meta (id, value) VALUES (1000, 'new edgecore')")
        saved_wal, saved_shm = wal.read_bytes(), shm.read_bytes()
    assert saved_wal
    wal.write_bytes(saved_wal)
    shm.write_bytes(saved_shm)
    journal.write_bytes(b"stale rollback journal")

    restore_backup(backup_root / OLD, verify_backup(backup_root / OLD))
    assert not wal.exists()
    assert not shm.exists()
    assert not journal.exists()
    with connect(node.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*), max(id) FROM meta").fetchone() == (ROWS, ROWS)


def test_restore_backup_without_db_leaves_wal_alone(
    node: EdgecoreFiles, backup_root: Path
) -> None:
    node.db.unlink()
    make_backup(backup_root, OLD, node)
    create_db(node.db)
    restore_backup(backup_root / OLD, verify_backup(backup_root / OLD))
    assert node.binary.read_bytes() == BINARY
    assert db_report(node.db)[0] == "ok"


# --------------------------------------------------------------------------- prune_backups


def _backups(node: EdgecoreFiles, backup_root: Path, versions: list[str]) -> None:
    for i, version in enumerate(versions):
        make_backup(backup_root, version, node)
        t = 1_700_000_000 + i * 3600
        os.utime(backup_root / version, (t, t))


def test_prune_keeps_newest_by_mtime(node: EdgecoreFiles, backup_root: Path) -> None:
    # oldest first by mtime, deliberately not in version or name order
    order = ["v1.13.0", "v1.10.0", "v1.12.1", "v1.9.0", "v1.11.2"]
    _backups(node, backup_root, order)
    keadm_own = backup_root / "v1.8.0"  # keadm's backup: no manifest, not ours to remove
    keadm_own.mkdir()
    (keadm_own / "edgecore").write_bytes(b"x")
    os.utime(keadm_own, (1, 1))
    partial = backup_root / "v1.14.0.partial"
    shutil.copytree(backup_root / "v1.13.0", partial)
    os.utime(partial, (1, 1))

    removed = prune_backups(backup_root, keep=2)
    assert sorted(removed) == sorted(order[:3])
    remaining = sorted(p.name for p in backup_root.iterdir())
    assert remaining == sorted(["v1.9.0", "v1.11.2", "v1.8.0", "v1.14.0.partial"])
    assert prune_backups(backup_root, keep=2) == []


def test_prune_never_removes_protected(node: EdgecoreFiles, backup_root: Path) -> None:
    order = ["v1.10.0", "v1.11.0", "v1.12.0", "v1.12.1"]
    _backups(node, backup_root, order)
    removed = prune_backups(backup_root, keep=1, protect="v1.10.0")  # the oldest
    assert sorted(removed) == ["v1.11.0", "v1.12.0"]
    assert sorted(p.name for p in backup_root.iterdir()) == ["v1.10.0", "v1.12.1"]
    verify_backup(backup_root / "v1.10.0")


def test_prune_nothing_to_do(node: EdgecoreFiles, backup_root: Path, tmp_path: Path) -> None:
    assert prune_backups(tmp_path / "no-such-dir", keep=1) == []
    _backups(node, backup_root, ["v1.11.0", "v1.12.0"])
    assert prune_backups(backup_root, keep=3) == []
    assert prune_backups(backup_root, keep=2) == []
    assert sorted(p.name for p in backup_root.iterdir()) == ["v1.11.0", "v1.12.0"]


# --------------------------------------------------------------------------- atomic_install


def test_atomic_install_replaces_by_rename(tmp_path: Path) -> None:
    src = tmp_path / "new-edgecore"
    src.write_bytes(b"new binary" * 1000)
    src.chmod(0o750)
    dst = tmp_path / "bin" / "edgecore"
    dst.parent.mkdir()
    dst.write_bytes(b"old binary")
    old_inode = dst.stat().st_ino
    with dst.open("rb") as running:  # like the running edgecore's mapping of its binary
        digest = atomic_install(src, dst)
        assert running.read() == b"old binary"
    assert dst.read_bytes() == b"new binary" * 1000
    assert dst.stat().st_ino != old_inode
    assert mode_of(dst) == 0o750
    assert digest.sha256 == sha(b"new binary" * 1000)
    assert digest.size == 10_000
    assert digest.mode == 0o750
    assert sorted(p.name for p in dst.parent.iterdir()) == ["edgecore"]


def test_atomic_install_mode_and_new_dirs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"config")
    src.chmod(0o644)
    dst = tmp_path / "a" / "b" / "edgecore.yaml"
    digest = atomic_install(src, dst, 0o600)
    assert dst.read_bytes() == b"config"
    assert mode_of(dst) == 0o600
    assert digest.mode == 0o600
    assert mode_of(src) == 0o644


def test_atomic_install_overwrites_stale_temp(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"fresh")
    dst = tmp_path / "d" / "edgecore"
    dst.parent.mkdir()
    stale = dst.with_name(".edgecore.eua-tmp")
    stale.write_bytes(b"left by a crash" * 100)
    atomic_install(src, dst)
    assert dst.read_bytes() == b"fresh"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["edgecore"]


def test_atomic_install_failure_leaves_destination(tmp_path: Path) -> None:
    dst = tmp_path / "edgecore"
    dst.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        atomic_install(tmp_path / "missing", dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgecore"]


def test_unit_file_and_dropins_are_backed_up_and_restored(
        node: EdgecoreFiles, backup_root: Path) -> None:
    node.unit.parent.mkdir(parents=True, exist_ok=True)
    node.unit.write_text("[Service]\nExecStart=/usr/local/bin/edgecore\nEnvironment=X=1\n")
    node.dropins.mkdir()
    (node.dropins / "limits.conf").write_text("[Service]\nMemoryMax=1G\n")
    manifest = make_backup(backup_root, OLD, node)
    assert {e.name for e in manifest.entries} >= {
        "edgecore.service", "edgecore.service.d/limits.conf"}
    # keadm deletes the operator's unit and writes its own; the drop-in is edited too.
    node.unit.write_text("[Service]\nExecStart=/usr/local/bin/edgecore --config x\n")
    (node.dropins / "limits.conf").unlink()
    assert restore_backup(backup_root / OLD, verify_backup(backup_root / OLD)) is True
    assert "Environment=X=1" in node.unit.read_text()
    assert (node.dropins / "limits.conf").read_text() == "[Service]\nMemoryMax=1G\n"
    # Nothing of the unit differs any more: a second restore does not ask for a reload.
    assert restore_backup(backup_root / OLD, verify_backup(backup_root / OLD)) is False
