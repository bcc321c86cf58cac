"""Benchmark: backup, rollback restore and verification against ``cp`` and ``sha256sum``.

Run from the repository root::

    python bench/backup_throughput.py [--size-mib 256] [--rounds 3] [--dir /var/tmp]
        [--journal-mode delete|wal] [--breakdown] [--json]

Creates a random ``edgecore`` binary and a SQLite ``edgecore.db`` of about
``--size-mib`` MiB each plus a small ``edgecore.yaml``, then alternates, for
``--rounds`` rounds, a baseline (``cp`` of the three files into a fresh
directory followed by ``sync -f`` so that the copy also reaches the disk, as
our fsyncs do) and ``agent.steps.backup.make_backup`` into a fresh backup root.
Both read the same warm (page-cached) source files; ``--warmup`` untimed runs
of each come first, and every timed run starts after ``sync -f`` with no
earlier output left on disk. The database is in a rollback journal, as
edgecore's is (``--journal-mode wal`` for the other path).

Then the rollback's two file steps, on one backup made by ``make_backup``:
``restore_backup`` (what edgecore waits for while it is stopped: the files put
back, each re-hashed, temp + fsync + rename) against ``cp`` of the backup's
files over the originals + ``sync -f``, and ``verify_backup`` (the checksums,
checked before edgecore is stopped) against ``sha256sum`` of the same files.
Before each restore the node is "upgraded": the binary is rewritten with other
random bytes, 1 MiB longer (untimed).

Prints the median time of each, the throughput, the CPU time (user + system,
all threads and child processes: SHA-256 is CPU work that ``cp`` does not do,
so the ratio depends on whether a second core is free) and the ratio
ours / baseline for each of the three. ``--breakdown`` also times each part on its own:
SHA-256 alone (the floor of any hashing copy of one file), ``copy_hashed``, the
alternative it was measured against (read/write in one thread, hash in
another), the locked database copy against the backup API it replaced, and
``cp`` of each file. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.adapters.edgecore import EdgecoreFiles  # noqa: E402
from agent.adapters.files import (  # noqa: E402
    FileDigest,
    copy_hashed,
    sha256_file,
    sqlite_backup,
    sqlite_copy,
)
from agent.steps.backup import load_manifest, make_backup, restore_backup, verify_backup  # noqa: E402

MIB = 1024 * 1024
VERSION = "v1.12.1"
EDGECORE_YAML = """\
apiVersion: edgecore.config.kubeedge.io/v1alpha2
kind: EdgeCore
database:
  aliasName: default
  dataSource: /var/lib/kubeedge/edgecore.db
  driverName: sqlite3
modules:
  edged:
    enable: true
    hostnameOverride: node-1
  edgeHub:
    enable: true
    heartbeat: 15
    httpServer: https://10.0.0.1:10002
    websocket:
      enable: true
      server: 10.0.0.1:10000
  metaManager:
    enable: true
    metaServer:
      enable: true
"""


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # user + system, all threads and children

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def mib_per_s(self, nbytes: int) -> float:
        return nbytes / MIB / self.median

    def to_dict(self, nbytes: int) -> dict[str, Any]:
        return {
            "seconds": [round(s, 4) for s in self.seconds],
            "median_s": round(self.median, 4),
            "mib_per_s": round(self.mib_per_s(nbytes), 1),
            "cpu_s": [round(s, 4) for s in self.cpu],
            "median_cpu_s": round(statistics.median(self.cpu), 4),
        }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def source_files(src: Path) -> EdgecoreFiles:
    """Where a benchmark puts the node's files to back up (a fresh directory); the
    small unit file is written here, the binary, config and database by the caller."""
    src.mkdir()
    files = EdgecoreFiles(src / "edgecore", src / "edgecore.yaml", src / "edgecore.db",
                          src / "edgecore.service", src / "edgecore.service.d")
    files.unit.write_text("[Service]\nExecStart=/usr/local/bin/edgecore\nRestart=always\n")
    return files


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def write_db(path: Path, size: int, journal_mode: str = "delete") -> None:
    """A SQLite file of about ``size`` bytes: rows of random blobs of mixed sizes."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, type TEXT, value BLOB)")
        key = 0
        while True:
            rows = []
            for _ in range(512):
                key += 1
                # 200 B .. ~6 KiB: most rows fit in a page, some spill to overflow pages.
                n = 200 + (key * 2654435761) % 6000
                rows.append((f"default/pod/{key:08d}", "pod", os.urandom(n)))
            with conn:
                conn.executemany("INSERT INTO meta VALUES (?, ?, ?)", rows)
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            if pages * page_size >= size:
                break
    finally:
        conn.close()


def sync_fs(path: Path) -> None:
    subprocess.run(["sync", "-f", str(path)], check=True)


def warm(paths: list[Path]) -> None:
    for p in paths:
        with p.open("rb") as f:
            while f.read(4 * MIB):
                pass


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cp(files: EdgecoreFiles, dst: Path) -> None:
    dst.mkdir()
    subprocess.run(["cp", *(str(p) for p in files.all()), str(dst)], check=True)
    sync_fs(dst)


def run_ours(files: EdgecoreFiles, backup_root: Path) -> None:
    make_backup(backup_root, VERSION, files)


def copy_hashed_readwrite(src: Path, dst: Path) -> FileDigest:
    """The alternative to ``copy_hashed`` that was measured and not kept: read and
    write each block in this thread while a second thread hashes the same buffer."""
    h = hashlib.sha256()
    bufs = [bytearray(4 * MIB) for _ in range(3)]
    hashed: list[Future[None] | None] = [None] * len(bufs)
    size = 0
    with ThreadPoolExecutor(1) as pool, src.open("rb", buffering=0) as fin, \
            dst.open("wb", buffering=0) as fout:
        for i in range(sys.maxsize):
            slot = i % len(bufs)
            if (prev := hashed[slot]) is not None:
                prev.result()  # the buffer's previous block is hashed: reuse it
            n = fin.readinto(bufs[slot])
            if not n:
                break
            view = memoryview(bufs[slot])[:n]
            hashed[slot] = pool.submit(h.update, view)
            done = 0
            while done < n:
                done += fout.write(view[done:]) or 0
            size += n
        os.fsync(fout.fileno())
        for fut in hashed:
            if fut is not None:
                fut.result()
    return FileDigest(h.hexdigest(), size, src.stat().st_mode & 0o7777)


def breakdown(files: EdgecoreFiles, work: Path, rounds: int) -> dict[str, float]:
    """Median time of each part of a backup on its own, each into a fresh directory."""
    parts: dict[str, Callable[[Path], object]] = {
        "sha256_file binary (read+hash only)": lambda d: sha256_file(files.binary),
        "copy_hashed binary (copy || hash, fsync)": lambda d: copy_hashed(files.binary,
                                                                          d / "edgecore"),
        "read/write || hash binary (not kept)": lambda d: copy_hashed_readwrite(
            files.binary, d / "edgecore"),
        "cp binary + sync -f": lambda d: run_cp_one(files.binary, d),
        "sqlite_copy db (locked copy || hash)": lambda d: sqlite_copy(files.db,
                                                                      d / "edgecore.db"),
        "sqlite_backup db (backup API, before)": lambda d: sqlite_backup(files.db,
                                                                         d / "edgecore.db"),
        "sha256_file db (read+hash only)": lambda d: sha256_file(files.db),
        "cp db + sync -f": lambda d: run_cp_one(files.db, d),
    }
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(rounds):
        for name, fn in parts.items():
            out = work / "part"
            out.mkdir()
            sync_fs(work)
            try:
                seconds[name].append(timed(partial(fn, out)))
            finally:
                shutil.rmtree(out)
    return {name: statistics.median(v) for name, v in seconds.items()}


def run_cp_one(src: Path, dst: Path) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)
    sync_fs(dst)


def run_cp_back(directory: Path) -> None:
    """The baseline of a restore: each backed-up file copied over its original."""
    for e in load_manifest(directory).entries:
        subprocess.run(["cp", str(directory / e.name), e.origin], check=True)
    sync_fs(directory)


def run_restore(directory: Path) -> None:
    restore_backup(directory, load_manifest(directory))


def run_sha256sum(directory: Path) -> None:
    names = [str(directory / e.name) for e in load_manifest(directory).entries]
    subprocess.run(["sha256sum", *names], check=True, stdout=subprocess.DEVNULL)


def rollback_rounds(files: EdgecoreFiles, work: Path, size: int, rounds: int
                    ) -> tuple[Series, Series, Series, Series]:
    """restore_backup against cp, and verify_backup against sha256sum, alternated."""
    make_backup(work / "backups", VERSION, files)
    directory = work / "backups" / VERSION
    cp_s, ours_s = Series("cp back + sync"), Series("restore_backup")
    sum_s, verify_s = Series("sha256sum"), Series("verify_backup")
    for r in range(rounds):
        pairs: list[list[tuple[Series, Callable[[Path], object]]]] = [
            [(cp_s, run_cp_back), (ours_s, run_restore)],
            [(sum_s, run_sha256sum), (verify_s, verify_backup)]]
        for pair in pairs:
            for series, fn in (pair[::-1] if r % 2 else pair):
                if series in (cp_s, ours_s):
                    write_random(files.binary, size + MIB)  # the upgraded node's binary
                sync_fs(work)
                cpu = cpu_seconds()
                secs = timed(partial(fn, directory))
                series.cpu.append(cpu_seconds() - cpu)
                series.seconds.append(secs)
                log(f"round {r + 1}/{rounds}: {series.name:15} {secs:7.3f} s")
    return cp_s, ours_s, sum_s, verify_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256,
                    help="size of the binary and of the database, each (default 256)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each before the rounds (default 1)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="parent of the temporary work directory (removed at the end)")
    ap.add_argument("--journal-mode", choices=("delete", "wal"), default="delete",
                    help="the database's journal mode (default delete, edgecore's)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time hashing, copy_hashed, sqlite_copy, sqlite_backup and cp of "
                         "each file on their own (median of --rounds)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    args = ap.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--size-mib and --rounds must be at least 1, --warmup at least 0")

    work = Path(tempfile.mkdtemp(prefix="eua-bench-backup-", dir=args.dir))
    try:
        files = source_files(work / "src")
        size = args.size_mib * MIB
        log(f"creating {args.size_mib} MiB binary and database in {files.binary.parent} ...")
        write_random(files.binary, size)
        files.binary.chmod(0o755)
        files.config.write_text(EDGECORE_YAML, encoding="utf-8")
        write_db(files.db, size, args.journal_mode)
        total = sum(p.stat().st_size for p in files.all())
        sync_fs(work)  # sources clean on disk, so no run pays for writing them back
        warm(files.all())

        cp_s, ours_s = Series("cp + sync -f"), Series("make_backup")
        for w in range(args.warmup):
            # Untimed: the first writes into never-used page-cache memory of a VM are slow.
            for kind in ("cp", "ours"):
                dst = work / f"warmup-{kind}-{w}"
                (run_cp if kind == "cp" else run_ours)(files, dst)
                shutil.rmtree(dst)
        for r in range(args.rounds):
            # Alternate which goes first so neither always follows the other's writeback.
            order = [("cp", cp_s), ("ours", ours_s)]
            if r % 2:
                order.reverse()
            for kind, series in order:
                dst = work / f"{kind}-{r}"
                sync_fs(work)
                cpu = cpu_seconds()
                secs = timed(partial(run_cp if kind == "cp" else run_ours, files, dst))
                series.cpu.append(cpu_seconds() - cpu)
                series.seconds.append(secs)
                log(f"round {r + 1}/{args.rounds}: {series.name:14} {secs:7.3f} s")
                shutil.rmtree(dst)
        sync_fs(work)
        back_cp, back_ours, sum_s, verify_s = rollback_rounds(files, work, size, args.rounds)
        sync_fs(work)
        parts = breakdown(files, work, args.rounds) if args.breakdown else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = ours_s.median / cp_s.median
    result: dict[str, Any] = {
        "size_mib": args.size_mib,
        "journal_mode": args.journal_mode,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "bytes": total,
        "baseline_cp_sync": cp_s.to_dict(total),
        "make_backup": ours_s.to_dict(total),
        "ratio_backup_over_cp": round(ratio, 3),
        "baseline_cp_back_sync": back_cp.to_dict(total),
        "restore_backup": back_ours.to_dict(total),
        "ratio_restore_over_cp": round(back_ours.median / back_cp.median, 3),
        "baseline_sha256sum": sum_s.to_dict(total),
        "verify_backup": verify_s.to_dict(total),
        "ratio_verify_over_sha256sum": round(verify_s.median / sum_s.median, 3),
    }
    if parts:
        result["breakdown_s"] = {k: round(v, 4) for k, v in parts.items()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"files: {total / MIB:.1f} MiB (binary + yaml + {args.journal_mode} db), "
          f"rounds: {args.rounds}")
    print(f"{'':16}{'median s':>10}{'MiB/s':>10}{'CPU s':>8}   all runs (s)")
    for s in (cp_s, ours_s, back_cp, back_ours, sum_s, verify_s):
        runs = " ".join(f"{x:.3f}" for x in s.seconds)
        print(f"{s.name:16}{s.median:10.3f}{s.mib_per_s(total):10.1f}"
              f"{statistics.median(s.cpu):8.3f}   {runs}")
    for name, secs in parts.items():
        print(f"  part: {name:42} {secs:7.3f} s (median)")
    print(f"ratio backup / (cp + sync -f): {ratio:.2f}x (median of {args.rounds})")
    print(f"ratio restore / (cp back + sync -f), edgecore's downtime for files: "
          f"{back_ours.median / back_cp.median:.2f}x")
    print(f"ratio verify_backup / sha256sum: {verify_s.median / sum_s.median:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
