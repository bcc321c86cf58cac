"""The durability protocol, held on the calls a real job makes.

A real upgrade runs in-process over a sandbox (the real Node and Runner, the
daemon's reporter on the spool transport, the stand-in keadm and edgecore) while
every call that matters for power loss is recorded in order: opens for writing,
renames, mkdirs and spawns (``sys.addaudithook``), ``os.fsync`` with its fd's
path (``/proc/self/fd``), journal commits with their state and report sequence,
the service manager's calls and each report's publish.

``check`` then holds the trace to docs/architecture.md, "Durability protocol":

* a file renamed into place was fsynced after its last write and before the
  rename; a directory renamed into place (the backup's ``<version>.partial``)
  had its files and its own entries fsynced first; after the rename, the
  directory that received it is fsynced before the next commit or side effect;
* nothing outside the non-durable places (logs, the lock, ``/run``) is written
  in place: everything else goes through a temp file and a rename;
* the journal says what is about to happen before it happens: ``installing``
  is committed before keadm is spawned, ``image_ready`` before the backup is
  renamed into place, ``rolling_back`` before edgecore is stopped and its files
  are restored, and a report's row before it is published.

A successful job and a rolled-back one are recorded; the negative tests break
the helper (its file fsync, its directory fsync) or the journal order and expect
the checker to name the violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from conftest import Sandbox

from agent.adapters import files
from agent.config import load_config
from agent.daemon import Daemon, make_transport
from agent.intake import Parser
from agent.journal import Journal
from agent.messages.commands import Operation, build_command, new_job_name
from agent.model import Job
from agent.node import Node, build_node
from agent.states import State
from agent.versions import VERSION_RE

OLD, NEW = "v1.12.1", "v1.13.0"
STATE = "var/lib/edge-upgrade-agent"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Written in place on purpose, and not durable: job logs, the lock's pid, the
# process manager's pidfile (/run is tmpfs) and edgecore's log. SQLite's own
# files are not opened through Python, and SQLite fsyncs them itself.
NOT_DURABLE = (f"{STATE}/logs/", f"{STATE}/agent.lock", "run/", "var/log/")
# What a renamed file must be durable before: the job moving on (in any thread:
# a step's worker thread is joined before the runner commits), or the next report
# going out or deleted from the outbox in the same thread (the reporter runs on
# the event loop beside a step's worker thread, and does not wait for it).
JOB_FLOW = frozenset({"commit", "meta", "spawn", "service"})
REPORTING = frozenset({"ack", "publish"})
# Where restored edgecore files land, and the states that may write there.
RESTORED = {"usr/local/bin/edgecore": {"rolling_back"},
            "etc/kubeedge/config/edgecore.yaml": {"rolling_back"},
            "var/lib/kubeedge/edgecore.db": {"rolling_back"},
            "etc/systemd/system/edgecore.service": {"installing", "rolling_back"}}
AUDITED = frozenset({"open", "os.rename", "os.mkdir", "subprocess.Popen"})


@dataclass(frozen=True)
class Ev:
    kind: str  # write, fsync, fsync_dir, rename, mkdir, spawn, service, publish, commit, meta, ack
    path: str = ""  # relative to the sandbox root (spawn: the program; service: the call)
    dest: str = ""  # rename: the new name
    key: str = ""
    state: str = ""  # commit: the state committed
    seq: int = 0  # commit, publish: the report sequence
    thread: int = 0  # the thread that made the call


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


# -- the checker ----------------------------------------------------------------


def check(trace: list[Ev]) -> list[str]:
    """Every violation of the protocol in ``trace``, in order; [] when it holds."""
    errors: list[str] = []
    state, committed = "", set()
    for i, ev in enumerate(trace):
        if ev.kind == "commit":
            state = ev.state
            committed.add((ev.key, ev.seq))
        elif ev.kind == "spawn" and ev.path.rpartition("/")[2] == "keadm" \
                and state != "installing":
            errors.append(f"keadm spawned with the journal at {state!r}")
        elif ev.kind == "service" and state not in ("installing", "rolling_back"):
            errors.append(f"edgecore {ev.path} with the journal at {state!r}")
        elif ev.kind == "publish" and (ev.key, ev.seq) not in committed:
            errors.append(f"report {ev.key}#{ev.seq} published before its journal commit")
        elif ev.kind == "rename" and not ev.dest.startswith(NOT_DURABLE):
            errors += _check_rename(trace, i, state)
        elif ev.kind == "write" and not ev.path.startswith(NOT_DURABLE) and not any(
                e.kind == "rename" and _under(ev.path, e.path) for e in trace[i + 1:]):
            errors.append(f"{ev.path}: written in place, not through a temp file and a rename")
    return errors


def _check_rename(trace: list[Ev], i: int, state: str) -> list[str]:
    src, dst = trace[i].path, trace[i].dest
    before, errors = trace[:i], []
    last: dict[str, int] = {}  # each file written under src: its last write
    for j, e in enumerate(before):
        if e.kind == "write" and _under(e.path, src):
            last[e.path] = j
    for path, j in sorted(last.items()):
        if not any(e.kind == "fsync" and e.path == path for e in before[j:]):
            errors.append(f"{path}: renamed to {dst} without an fsync after its last write")
    for d in sorted({e.path for e in before if e.kind == "mkdir" and _under(e.path, src)}):
        j = max((k for k, e in enumerate(before)
                 if e.kind in ("write", "mkdir", "rename") and _parent(e.dest or e.path) == d),
                default=0)
        if not any(e.kind == "fsync_dir" and e.path == d for e in before[j:]):
            errors.append(f"{d}/: renamed to {dst} before its entries were fsynced")
    parent = _parent(dst)
    for e in trace[i + 1:]:
        if e.kind == "fsync_dir" and e.path == parent:
            break
        if e.kind in JOB_FLOW or (e.kind in REPORTING and e.thread == trace[i].thread):
            errors.append(f"{dst}: directory {parent}/ not fsynced after the rename, "
                          f"before the next {e.kind} ({e.state or e.path})")
            break
    else:
        errors.append(f"{dst}: directory {parent}/ never fsynced after the rename")
    if dst in RESTORED and state not in RESTORED[dst]:
        errors.append(f"{dst}: restored with the journal at {state!r}")
    if _parent(dst) == f"{STATE}/backups" and VERSION_RE.fullmatch(dst.rpartition("/")[2]) \
            and state != "image_ready":
        errors.append(f"{dst}: backup renamed into place with the journal at {state!r}")
    return errors


# -- the recorder ---------------------------------------------------------------

Raw = tuple[str, tuple[Any, ...], int]  # (event, its arguments, thread)


class _Sink:
    events: list[Raw] | None = None  # None: the hook (never removed) is idle


def _audit(event: str, args: tuple[Any, ...]) -> None:
    sink = _Sink.events
    if sink is not None and event in AUDITED:
        sink.append((event, args, threading.get_ident()))


class Recorder:
    hooked = False

    def __init__(self, root: Path, skip_fsync: Callable[[str], bool]) -> None:
        self.roots = sorted({str(root), str(root.resolve())}, key=len, reverse=True)
        self.raw: list[Raw] = []
        self.skip_fsync = skip_fsync

    def rel(self, path: object) -> str | None:
        if isinstance(path, int):
            return None
        text = os.fsdecode(path)  # type: ignore[arg-type]
        for root in self.roots:
            if text.startswith(root + "/"):
                return text[len(root) + 1:]
        return None

    def install(self, mp: pytest.MonkeyPatch, node: Node, transport: Any) -> None:
        if not Recorder.hooked:
            sys.addaudithook(_audit)
            Recorder.hooked = True
        raw, real_fsync = self.raw, os.fsync

        def fsync(fd: Any) -> None:
            no = fd if isinstance(fd, int) else fd.fileno()
            path = os.readlink(f"/proc/self/fd/{no}")
            if self.skip_fsync(path):
                return
            real_fsync(no)
            raw.append(("fsync", (path, stat.S_ISDIR(os.fstat(no).st_mode)),
                        threading.get_ident()))

        mp.setattr(os, "fsync", fsync)
        for name in ("add", "save", "event"):  # recorded once committed
            mp.setattr(Journal, name, self._after(getattr(Journal, name), lambda j: (
                "commit", (j.key, j.state.value, j.seq))))
        mp.setattr(Journal, "ack", self._after(Journal.ack, lambda _: ("ack", ())))
        for name in ("set_meta", "delete_meta"):
            mp.setattr(Journal, name, self._after(getattr(Journal, name), lambda _: ("meta", ())))
        for name in ("start", "stop", "restart", "reload_units"):
            mp.setattr(node.service, name, self._before(getattr(node.service, name), name))
        publish = transport.publish

        async def published(report: dict[str, Any]) -> None:
            raw.append(("publish", (report["jobKey"], report["sequence"]),
                        threading.get_ident()))
            await publish(report)

        mp.setattr(transport, "publish", published)
        _Sink.events = raw

    def _after(self, fn: Callable[..., Any], what: Callable[[Any], tuple[str, tuple[Any, ...]]]
               ) -> Callable[..., Any]:
        def wrapped(*args: Any, **kw: Any) -> Any:
            out = fn(*args, **kw)
            self.raw.append((*what(out), threading.get_ident()))
            return out
        return wrapped

    def _before(self, fn: Callable[[], Any], name: str) -> Callable[[], Any]:
        async def wrapped() -> None:
            self.raw.append(("service", (name,), threading.get_ident()))
            await fn()
        return wrapped

    def stop(self) -> None:
        _Sink.events = None

    def trace(self) -> list[Ev]:
        events = ((self._event(kind, args), thread) for kind, args, thread in self.raw)
        return [replace(ev, thread=thread) for ev, thread in events if ev is not None]

    def _event(self, kind: str, args: tuple[Any, ...]) -> Ev | None:
        if kind in ("open", "fsync", "os.mkdir"):
            path = self.rel(args[0])
            if path is None or (kind == "open" and not args[2] & WRITE_FLAGS):
                return None
            name = {"open": "write", "os.mkdir": "mkdir"}.get(kind)
            return Ev(name or ("fsync_dir" if args[1] else "fsync"), path)
        if kind == "os.rename":
            src, dst = self.rel(args[0]), self.rel(args[1])
            return None if src is None or dst is None else Ev("rename", src, dst)
        if kind == "subprocess.Popen":
            return Ev("spawn", os.fsdecode(args[1][0]))
        if kind in ("commit", "publish"):
            return Ev(kind, key=args[0], state=args[1] if kind == "commit" else "", seq=args[-1])
        return Ev(kind, *args)  # service, meta, ack


async def run_job(box: Sandbox, mp: pytest.MonkeyPatch,
                  skip_fsync: Callable[[str], bool] = lambda path: False,
                  tamper: Callable[[Daemon], None] = lambda daemon: None,
                  ) -> tuple[Job, list[Ev]]:
    """An upgrade to NEW, with the daemon's reporter publishing as it goes."""
    config = load_config(box.config)
    node = build_node(config)
    daemon = Daemon(node, Parser(config))
    daemon.transport = make_transport(config, daemon)
    assert node.journal.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert node.journal.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tamper(daemon)
    rec = Recorder(box.root, skip_fsync)
    rec.install(mp, node, daemon.transport)
    cmd = build_command(config, operation=Operation.UPGRADE, version=NEW,
                        job_name=new_job_name("durability"))
    reporter = asyncio.create_task(daemon.reporter())
    try:
        with node.lock:
            job = await daemon.runner.run(daemon.runner.submit(cmd)[0])
        for _ in range(3000):  # bounds a hang only: until the outbox is delivered
            if not node.journal.outbox():
                break
            daemon.reports_pending.set()
            await asyncio.sleep(0.01)
        assert node.journal.outbox() == [], "every report published"
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        rec.stop()
        node.close()
    return job, rec.trace()


def states(trace: list[Ev]) -> list[str]:
    return [state for state, _ in groupby(e.state for e in trace if e.kind == "commit")]


def renames_into(trace: list[Ev], directory: str) -> list[str]:
    return [e.dest for e in trace if e.kind == "rename" and _parent(e.dest) == directory]


# -- the tests ------------------------------------------------------------------


async def test_a_successful_upgrade_keeps_the_protocol(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator's unit and a drop-in: backed up in a subdirectory, and the
    # unit is put back after the stand-in keadm rewrites it.
    unit = sandbox.root / "etc/systemd/system/edgecore.service"
    (unit.parent / "edgecore.service.d").mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/local/bin/edgecore\nEnvironment=X=1\n")
    (unit.parent / "edgecore.service.d/limits.conf").write_text("[Service]\nMemoryMax=1G\n")
    job, trace = await run_job(sandbox, monkeypatch)
    assert job.state == State.SUCCEEDED, job.reason
    assert check(trace) == []
    assert "etc/systemd/system/edgecore.service" in {e.dest for e in trace if e.kind == "rename"}
    assert states(trace) == ["received", "prechecked", "image_ready", "backed_up",
                             "installing", "verifying", "succeeded"]
    # Not vacuous: each rule had something to hold.
    assert any(e.kind == "spawn" and e.path.endswith("/keadm") for e in trace)
    assert renames_into(trace, f"{STATE}/backups") == [f"{STATE}/backups/{OLD}"]
    assert {e.path for e in trace if e.kind == "fsync"} >= {
        f"{STATE}/backups/{OLD}.partial/{name}"
        for name in ("edgecore", "edgecore.yaml", "edgecore.db", "manifest.json")}
    reports = renames_into(trace, f"{STATE}/reports")
    assert len(reports) == len([e for e in trace if e.kind == "publish"]) >= 8
    assert renames_into(trace, f"{STATE}/staging/{NEW}")


async def test_a_rolled_back_upgrade_keeps_the_protocol(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.image(NEW, edgecore_behaviour="crash")
    job, trace = await run_job(sandbox, monkeypatch)
    assert job.state == State.ROLLED_BACK, job.reason
    assert check(trace) == []
    assert states(trace)[-3:] == ["verifying", "rolling_back", "rolled_back"]
    restored = {e.dest for e in trace if e.kind == "rename"} & set(RESTORED)
    assert restored == {"usr/local/bin/edgecore", "var/lib/kubeedge/edgecore.db"}, restored
    calls = [e.path for e in trace if e.kind == "service"]
    assert calls[-2:] == ["stop", "start"], calls
    # Every edgecore file is on disk before rolled_back is: restored, or (equal to
    # the backup already, as keadm left it) fsynced where it is.
    start = max(i for i, e in enumerate(trace) if e.state == "rolling_back")
    durable = {e.dest or e.path for e in trace[start:] if e.kind in ("rename", "fsync")}
    assert durable >= set(RESTORED) - {"etc/systemd/system/edgecore.service"}, durable


async def test_a_helper_that_skips_its_file_fsync_is_caught(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """atomic_write and atomic_install write ``*.eua-tmp`` files: their fsync is dropped."""
    job, trace = await run_job(sandbox, monkeypatch,
                               skip_fsync=lambda path: path.endswith(".eua-tmp"))
    assert job.state == State.SUCCEEDED
    errors = check(trace)
    report = next(e for e in trace if e.kind == "rename" and e.dest.startswith(f"{STATE}/reports/"))
    assert f"{report.path}: renamed to {report.dest} without an fsync after its last write" \
        in errors, errors
    assert any(f"renamed to {STATE}/staging/{NEW}/keadm without an fsync" in e for e in errors)


async def test_a_helper_that_skips_its_directory_fsync_is_caught(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "fsync_dir", lambda path: None)  # the helpers' own reference
    job, trace = await run_job(sandbox, monkeypatch)
    assert job.state == State.SUCCEEDED
    errors = check(trace)
    report = next(e for e in trace if e.kind == "rename" and e.dest.startswith(f"{STATE}/reports/"))
    assert any(e.startswith(f"{report.dest}: directory {STATE}/reports/ not fsynced after the "
                            "rename, before the next ack") for e in errors), errors
    # The backup keeps its own fsyncs (not through the helper): nothing said about it.
    assert not any(f"{STATE}/backups" in e for e in errors), errors


async def test_keadm_run_before_installing_is_committed_is_caught(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    def skip_hand_over(daemon: Daemon) -> None:
        runner = daemon.runner
        step = runner.steps[State.BACKED_UP]
        runner.steps[State.BACKED_UP] = replace(step, work=runner._install)

    job, trace = await run_job(sandbox, monkeypatch, tamper=skip_hand_over)
    assert job.state == State.SUCCEEDED  # the outcome does not show it; the order does
    assert "keadm spawned with the journal at 'backed_up'" in check(trace)


def test_the_checker_on_hand_made_traces() -> None:
    good = [Ev("commit", key="j", state="image_ready", seq=4),
            Ev("write", "s/a.tmp"), Ev("fsync", "s/a.tmp"), Ev("rename", "s/a.tmp", "s/a"),
            Ev("fsync_dir", "s"), Ev("commit", key="j", state="backed_up", seq=5),
            Ev("publish", key="j", seq=5)]
    assert check(good) == []
    swapped = [good[0], good[1], good[3], good[2], *good[4:]]  # fsync after the rename
    assert check(swapped) == ["s/a.tmp: renamed to s/a without an fsync after its last write"]
    assert check([good[0], Ev("write", "s/a"), Ev("fsync", "s/a")]) == [
        "s/a: written in place, not through a temp file and a rename"]
    assert check([good[-1], *good[:-1]]) == ["report j#5 published before its journal commit"]
    late = [*good[:4], good[5], good[4]]
    assert check(late) == ["s/a: directory s/ not fsynced after the rename, "
                           "before the next commit (backed_up)"]
