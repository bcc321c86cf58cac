"""Durable file operations: hash-while-copy, temp+fsync+rename, SQLite backups.

Durable means temp file in the same directory, fsync, rename, fsync of the
directory (``atomic_write``, ``atomic_install``); tests/test_durability.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import sqlite3
import threading
import urllib.parse
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
# Unit of the copy and of the hash pipeline: big enough that a thread hand-off
# per chunk costs nothing, small enough that the hash waits little for the
# first chunk (2.5 ms at 3.4 GB/s). A multiple of mmap.ALLOCATIONGRANULARITY,
# as mmap offsets must be.
COPY_CHUNK = 8 * 1024 * 1024
HASH_LAG = 256 * 1024 * 1024  # how far the copy may run ahead of the hash (page cache)
# errnos with which copy_file_range(2) says "not between these two files"
# (other filesystems on Linux >= 5.19, kernels before 4.5, some FUSE and NFS
# mounts, EPERM from seccomp filters that do not know the call); sendfile(2)
# copies between any two regular files.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                       errno.EPERM}
_NO_SENDFILE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


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


def fsync_file(path: Path) -> None:
    """Make a file already in place durable: its data, then its directory entry."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def ensure_dir(path: Path) -> None:
    """``mkdir -p`` whose new directories survive power loss: each parent is fsynced."""
    if not path.is_dir():
        ensure_dir(path.parent)
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: a temp file beside it, fsync, rename, fsync
    of the directory (which must exist). A crash leaves the old file or the new.
    Without ``mode`` the file is created as ``open`` would, under the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.eua-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as f:
            if mode is not None:
                os.fchmod(fd, mode)
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    st = path.stat()
    return FileDigest(h.hexdigest(), st.st_size, st.st_mode & 0o7777)


class _Copier:
    """Copies one open file into another at their offsets, in the kernel where it can.

    copy_file_range(2) first (no copy through user space, as ``cp`` does), then
    sendfile(2) (between any two regular files, whatever the filesystems), then
    read/write.
    """

    def __init__(self, fin: int, fout: int) -> None:
        self.fin, self.fout = fin, fout
        self.how = "copy_file_range"
        self.copied = 0
        self.buf: bytearray | None = None

    def copy(self, want: int) -> int:
        """Copy up to ``want`` bytes; 0 only at the end of ``fin``."""
        n = self._copy(want)
        if n == 0 and self.copied == 0 and self.how != "read" and os.fstat(self.fin).st_size:
            # Some kernels return 0 for files whose size they do not know (procfs,
            # some FUSE mounts): read them instead.
            self.how = "read"
            n = self._copy(want)
        self.copied += n
        return n

    def _copy(self, want: int) -> int:
        if self.how == "copy_file_range":
            try:
                return os.copy_file_range(self.fin, self.fout, want)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                self.how = "sendfile"
        if self.how == "sendfile":
            try:
                return os.sendfile(self.fout, self.fin, None, want)
            except OSError as exc:
                if exc.errno not in _NO_SENDFILE:
                    raise
                self.how = "read"
        if self.buf is None:
            self.buf = bytearray(COPY_CHUNK)
        view = memoryview(self.buf)[:want]
        n = os.readv(self.fin, [view])
        done = 0
        while done < n:  # writes may be short (e.g. a filling disk)
            done += os.write(self.fout, view[done:n])
        return n


class _HashedCopy:
    """Copy one open file into another, hashing the copy behind it on a second thread.

    ``copy()`` copies ``fin`` from its offset to its end into ``fout`` (opened
    read-write, empty) and returns the size; ``digest()`` then waits for the
    sha256 of what was written. In between the caller can fsync ``fout``, or
    let go of a lock on ``fin``: the hash does not need the source any more.

    The hash is taken from the *copy*, not from the source, so it is always
    the digest of what the backup holds. The hashing thread reads each
    finished chunk of ``fout`` through mmap: the pages the copy has just put in
    the page cache, with no disk read and no copy to user space. The copy
    calls and hashlib (on buffers over 2 KiB) release the GIL, so on two cores
    the hash runs beside the copy and the fsync. SHA-256 (about 1.4 GB/s on one
    core with SHA-NI) is slower than a page-cache copy (about 3.4 GB/s), so the
    copy runs ahead, by at most ``HASH_LAG`` bytes: beyond that, on a node with
    little memory, the pages might be evicted before they are hashed.
    Files of one chunk or less (configs, units) are hashed inline, with no
    thread.

    ``writeback``: start writing each chunk to disk as soon as it is copied
    (as the kernel would once enough is dirty), so that the final fsync has
    less left to wait for. Not under a database lock: on slow storage it
    paces the copy at the disk's speed, and the lock would be held as long.
    """

    def __init__(self, fin: int, fout: int, *, writeback: bool = False) -> None:
        self.fin, self.fout = fin, fout
        self.writeback = writeback
        self.copier = _Copier(fin, fout)
        self.h = hashlib.sha256()
        self.size = 0
        self.pending: deque[Future[None]] = deque()
        self.pool: ThreadPoolExecutor | None = None
        if os.fstat(fin).st_size > COPY_CHUNK:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="eua-hash")

    def __enter__(self) -> _HashedCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _hash(self, offset: int, length: int) -> None:
        # Whole chunks already written, of our own new file: never past its end.
        with mmap.mmap(self.fout, length, prot=mmap.PROT_READ, offset=offset) as m:
            self.h.update(m)

    def copy(self) -> int:
        while True:
            got = 0
            while got < COPY_CHUNK:  # whole chunks: the next mmap offset stays aligned
                n = self.copier.copy(COPY_CHUNK - got)
                if n == 0:
                    break
                got += n
            if got:
                if self.writeback:
                    # DONTNEED starts writeback of the range (WB_SYNC_NONE, no
                    # wait) and drops only its clean pages: none yet, all just
                    # written, so the hash below still finds them in memory.
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self.fout, self.size, got, os.POSIX_FADV_DONTNEED)
                if self.pool is None:
                    self._hash(self.size, got)
                else:
                    self.pending.append(self.pool.submit(self._hash, self.size, got))
                    while len(self.pending) * COPY_CHUNK > HASH_LAG:
                        self.pending.popleft().result()
                self.size += got
            if got < COPY_CHUNK:
                return self.size

    def digest(self) -> str:
        while self.pending:
            self.pending.popleft().result()
        return self.h.hexdigest()


def copy_hashed(src: Path, dst: Path, mode: int | None = None) -> FileDigest:
    """Copy ``src`` to ``dst`` (which must not be in use), fsync it, return its digest.

    The hash is computed while copying, from the copy itself (see
    ``_HashedCopy``), so it costs no extra pass over the file.
    """
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        src_mode = os.fstat(fin).st_mode & 0o7777
        final_mode = src_mode if mode is None else mode
        fout = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with _HashedCopy(fin, fout, writeback=True) as job:
                size = job.copy()
                os.fchmod(fout, final_mode)
                os.fsync(fout)  # while the last chunks are hashed
                sha256 = job.digest()
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return FileDigest(sha256, size, final_mode)


def atomic_install(src: Path, dst: Path, mode: int | None = None) -> FileDigest:
    """Replace ``dst`` with a copy of ``src`` via a sibling temp file and rename.

    rename() keeps a running program's inode alive and never leaves a
    half-written file under the final name.
    """
    tmp = dst.with_name(f".{dst.name}.eua-tmp")
    ensure_dir(dst.parent)
    try:
        digest = copy_hashed(src, tmp, mode)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)
    return digest


def _sqlite_uri(path: Path, mode: str) -> str:
    # Percent-encode: a '#' or '?' in the path would otherwise end it early.
    return f"file:{urllib.parse.quote(str(path))}?mode={mode}"


def _begin_read(conn: sqlite3.Connection) -> str:
    """Open a read transaction on ``conn`` and return the journal mode seen inside it."""
    conn.execute("BEGIN")
    # The first read takes the lock (rollback journal: SHARED on the file; WAL:
    # a read mark); it is held until the transaction ends. fetchall: a
    # statement left unfinished would hold it too.
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    return str(conn.execute("PRAGMA journal_mode").fetchall()[0][0]).lower()


def _hold_main_file_snapshot(conn: sqlite3.Connection, src: Path) -> bool:
    """Leave ``conn`` in a read transaction during which the main database file
    alone holds its snapshot and nothing writes to it; False if that cannot be
    had quickly (no transaction is then open).

    * Rollback journal (DELETE, TRUNCATE, PERSIST; edgecore's default: its
      beego/go-sqlite3 DSN sets no journal mode): a writer must hold an
      EXCLUSIVE lock to write the main file, and our SHARED lock keeps it from
      getting one, so the file is a committed state, with any hot journal
      already rolled back by SQLite when we took the lock. Writers wait (their
      busy timeout) for the length of the copy, as they would for any long
      reader.
    * WAL: writers do not wait for readers. They commit into the -wal, and a
      checkpoint may copy into the main file any frame up to the oldest
      reader's snapshot. The main file alone is our snapshot only if every
      frame up to our snapshot has been checkpointed already; from then on no
      checkpoint can write to it while we read (frames up to our snapshot are
      already in it, later ones are held back by our read mark, and a reader
      that began on a fully checkpointed WAL blocks every checkpoint). So:
      checkpoint (PASSIVE: it never waits), take the read transaction, and
      checkpoint again from a second connection: if it reports every frame
      of the WAL checkpointed, the condition holds. A commit that slips in
      between makes that second report fall short; then the same again while
      a third connection holds the write lock (``BEGIN IMMEDIATE``, a few
      milliseconds: no commit can slip in). A busy writer or a reader with an
      older snapshot still makes it fall short, and so does any error of the
      read-write connections (a read-only file, say): False, and the caller
      uses the backup API.
    """
    if _begin_read(conn) != "wal":
        return True
    conn.execute("ROLLBACK")
    try:
        with contextlib.closing(_connect_rw(src)) as ckpt:
            ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            for freeze in (False, True):
                with contextlib.ExitStack() as stack:
                    if freeze:
                        writer = stack.enter_context(contextlib.closing(_connect_rw(src)))
                        writer.execute("BEGIN IMMEDIATE")  # busy after 1 s: a long write
                        stack.callback(writer.execute, "ROLLBACK")
                    mode = _begin_read(conn)
                    busy, log, done = ckpt.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
                if mode != "wal" or (busy == 0 and log == done):
                    return True
                conn.execute("ROLLBACK")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return False


def _connect_rw(src: Path) -> sqlite3.Connection:
    # Never used to write: to checkpoint, and to hold the write lock a moment.
    return sqlite3.connect(_sqlite_uri(src, "rw"), uri=True, timeout=1,
                           isolation_level=None)


def sqlite_copy(src: Path, dst: Path, unlocked: threading.Event | None = None) -> FileDigest:
    """A consistent copy of a live SQLite DB, hashed while copied, and fsynced.

    A plain copy of the file under a read transaction (see
    ``_hold_main_file_snapshot``): at the speed of ``cp``, where the backup API
    goes page by page through SQLite's pager and needs a second pass to hash.
    Falls back to the backup API (``sqlite_backup``) when a WAL database keeps
    changing. ``unlocked`` is set as soon as the read transaction is over (the
    hash and the fsync of the copy may still be running), or the fallback
    begins, or it fails.
    """
    unlocked = unlocked or threading.Event()
    try:
        digest = _sqlite_copy_locked(src, dst, unlocked)
        if digest is None:
            unlocked.set()
            digest = sqlite_backup(src, dst)
        return digest
    finally:
        unlocked.set()


def _sqlite_copy_locked(src: Path, dst: Path, unlocked: threading.Event) -> FileDigest | None:
    with contextlib.ExitStack() as stack:  # closes in reverse order
        # Our descriptor is opened before SQLite's connection and closed after
        # it, never while it is open: closing any descriptor of a file drops all
        # of this process's POSIX locks on it, SQLite's read lock included.
        fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, fin)
        conn = stack.enter_context(contextlib.closing(sqlite3.connect(
            _sqlite_uri(src, "ro"), uri=True, timeout=30, isolation_level=None)))
        if not _hold_main_file_snapshot(conn, src):
            return None
        st, now = os.fstat(fin), os.stat(src)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return None  # replaced since we opened it: our lock is on the new file
        fout = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        stack.callback(os.close, fout)
        job = stack.enter_context(_HashedCopy(fin, fout))
        try:
            size = job.copy()
        finally:
            conn.close()  # ends the read transaction: writers go on from here
            unlocked.set()
        mode = st.st_mode & 0o7777
        os.fchmod(fout, mode)
        os.fsync(fout)  # while the last chunks are hashed
        return FileDigest(job.digest(), size, mode)


def sqlite_backup(src: Path, dst: Path) -> FileDigest:
    """A consistent copy of a live SQLite DB via the online backup API."""
    source = sqlite3.connect(_sqlite_uri(src, "ro"), uri=True, timeout=30)
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
        os.fchmod(f.fileno(), src.stat().st_mode & 0o7777)  # before the fsync: it is metadata
        os.fsync(f.fileno())
    return sha256_file(dst)


def tree_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())
