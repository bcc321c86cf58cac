"""Command line: ``edge-upgrade-agent [--config F] [--root D] [--output json] CMD``.

Exit codes (docs/operations.md):
  0  success, skipped (already at target), dry-run GO
  1  the job failed; the node is untouched or was rolled back
  2  usage, configuration or invalid command
  3  rollback failed: the node needs an operator
  4  busy: another job or keadm holds the lock
  5  refused by precheck or policy; dry-run NO-GO
  6  the agent's journal is unusable
  10 doctor: warnings only;  11 doctor: errors found (a finding is not a failure)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import lean

# First, before the imports below load any of them (structlog imports uuid, for
# one): the idle daemon never uses the modules lean.DEFERRED names, nor the
# Unicode half of the idna codec (issue 10).
lean.defer_imports()
lean.ascii_idna()

from agent import __version__, metrics  # noqa: E402
from agent.config import DEFAULT_CONFIG, Config, check_daemon_files, load_config  # noqa: E402
from agent.errors import AgentError  # noqa: E402
from agent.logs import setup_logging, show_job_log  # noqa: E402
from agent.messages.commands import Command, Operation, build_command, new_job_name  # noqa: E402
from agent.model import Job  # noqa: E402
from agent.states import Note, State  # noqa: E402

if TYPE_CHECKING:
    from agent.node import Node

# The rest (node, runner, steps, doctor, daemon) is imported by the command that
# needs it: `run` then holds no code that only the other commands use.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ROLLBACK_FAILED, EXIT_BUSY, EXIT_REFUSED = 0, 1, 2, 3, 4, 5


# Most serious first: `recover` reports the worst outcome of all its jobs.
SEVERITY = (3, 6, 1, 5, 4, 2, 0)
# Commands that run jobs: with metrics.textfile set, each rewrites it once at the end.
JOB_COMMANDS = frozenset({"upgrade", "prepull", "rollback", "resolve", "confirm", "recover"})


def job_exit_code(job: Job) -> int:
    if job.state in (State.SUCCEEDED, State.SKIPPED, State.AWAITING_CONFIRMATION):
        return EXIT_OK
    if job.state == State.ROLLED_BACK:
        return EXIT_OK if job.command.operation == Operation.ROLLBACK else EXIT_FAILED
    if job.state == State.ROLLBACK_FAILED:
        return EXIT_ROLLBACK_FAILED
    if job.state == State.REJECTED:
        return EXIT_USAGE
    refusal = job.note(Note.REFUSAL)
    if refusal == "busy":
        return EXIT_BUSY
    if job.command.dry_run or refusal == "precheck":
        return EXIT_REFUSED
    return EXIT_FAILED


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "jobKey": job.key,
        "operation": job.command.operation.value,
        "state": job.state.value,
        "reason": job.reason,
        "fromVersion": job.from_version,
        "toVersion": str(job.command.version) if job.command.version else None,
        "rehearsal": job.command.dry_run,
        "actionFlow": [a.to_dict() for a in job.actions],
        "createdAt": job.created_at,
        "updatedAt": job.updated_at,
    }


class Output:
    def __init__(self, fmt: str) -> None:
        self.json = fmt == "json"

    def emit(self, data: dict[str, Any], text: str) -> None:
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            print(text)

    def error(self, exc: AgentError) -> None:
        if self.json:
            print(json.dumps({"error": exc.reason, "errorType": type(exc).__name__}))
        else:
            print(f"error: {exc.reason}", file=sys.stderr)


class _Formatter(argparse.HelpFormatter):
    """argparse's own, sized without ``shutil``: argparse imports it (and zlib,
    0.25 MiB) for the terminal width whenever a parser is built, and the idle
    daemon parses its argv (issue 10). The width rule is shutil's."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)  # subparsers are of this class too


def _columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # no stdout (None), or not a terminal
            columns = 0
    return columns if columns > 0 else 80


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-upgrade-agent", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent YAML config")
    p.add_argument("--root", type=Path, help="directory standing in for / (overrides paths.root)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument("--version", action="version", version=f"edge-upgrade-agent {__version__}")
    # The global options are accepted after the command too (`run --config F`),
    # as operators and unit files write them; SUPPRESS keeps the top-level value.
    common = _Parser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    common.add_argument("--root", type=Path, default=argparse.SUPPRESS)
    common.add_argument("--output", choices=("text", "json"), default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=text)

    cmd("run", "the daemon: wait for commands, run jobs, send reports")
    up = cmd("upgrade", "upgrade edgecore on this node")
    up.add_argument("--to-version", required=True)
    up.add_argument("--image", help="installation-package repository (tag follows the version)")
    up.add_argument("--image-digest")
    up.add_argument("--timeout", type=int, help="installer timeout in seconds")
    up.add_argument("--check-items", default="", help="comma list of cpu,mem,disk")
    up.add_argument("--upgrade-tool", default="", help="a configured custom installer")
    up.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    up.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pp = cmd("prepull", "fetch and verify the package ahead of an upgrade")
    pp.add_argument("--to-version", required=True)
    pp.add_argument("--image")
    pp.add_argument("--image-digest")
    rb = cmd("rollback", "restore a backup (the newest by default)")
    rb.add_argument("--to-version")
    rb.add_argument("--yes", action="store_true")
    ck = cmd("check", "run the prechecks and print the plan, changing nothing")
    ck.add_argument("--to-version")
    ck.add_argument("--image")
    ck.add_argument("--check-items", default="cpu,mem,disk")
    rs = cmd("resolve", "clear a rollback_failed block once the node is repaired by hand")
    rs.add_argument("job_key", help="the key of the job that ended rollback_failed")
    rs.add_argument("--yes", action="store_true")
    cmd("recover", "finish or roll back any job a crash left behind")
    dr = cmd("doctor", "diagnose the common installation problems (exit 0 ok, 10 warn, 11 error)")
    dr.add_argument("--timeout", type=float, default=3.0, help="seconds per network check")
    dr.add_argument("--to-version", help="check this version's package (default: the current)")
    cf = cmd("confirm", "release a job waiting for confirmation")
    cf.add_argument("job_key")
    cmd("status", "edgecore version, service, current job, locks")
    hi = cmd("history", "past jobs")
    hi.add_argument("--limit", type=int, default=20)
    lg = cmd("logs", "a job's log: the agent's JSON lines and the installer's output")
    lg.add_argument("job_key", help="the job's key (jobKey), e.g. job-1 or job-1/h1")
    lg.add_argument("-f", "--follow", action="store_true", help="print new lines until Ctrl-C")
    cfg = cmd("config", "configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    val = cfg_sub.add_parser("validate", parents=[common], help="check a config file")
    val.add_argument("file", nargs="?", type=Path)
    return p


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise AgentError(f"refusing to {what} without --yes (no terminal to ask on)")
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise AgentError("cancelled by the operator")


async def _upgrade(node: Node, args: argparse.Namespace, out: Output) -> int:
    items = [i for i in args.check_items.split(",") if i]
    cmd = build_command(
        node.config, operation=Operation.UPGRADE, job_name=new_job_name(),
        version=args.to_version, image=args.image, image_digest=args.image_digest,
        timeout_seconds=args.timeout, check_items=items, upgrade_tool=args.upgrade_tool,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        from agent.execute import rehearse  # noqa: PLC0415 (see the imports)

        job, plan = await rehearse(node, cmd)
        lines = [f"Plan for {plan.from_version} -> {plan.to_version}"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in plan.checks]
        lines += ["Steps:"] + [f"  {i}. {s}" for i, s in enumerate(plan.steps, 1)]
        lines += [f"Installer argv: {json.dumps(list(plan.argv))}",
                  f"Backup {plan.backup_bytes} bytes; free {plan.free_bytes}, "
                  f"needed {plan.needed_bytes}",
                  "Paths touched:"] + [f"  {k}: {v}" for k, v in plan.paths.items()]
        lines.append(f"Verdict: {plan.verdict} ({plan.reason})")
        out.emit({"job": job_dict(job), "plan": plan.to_dict()}, "\n".join(lines))
        return job_exit_code(job)
    _confirm(args, f"upgrade edgecore on {node.config.node_name} to {args.to_version}")
    return await _run_job(node, cmd, out)


async def _run_job(node: Node, cmd: Command, out: Output) -> int:
    from agent.execute import execute  # noqa: PLC0415 (see the imports)
    from agent.runner import Runner  # noqa: PLC0415

    job = await execute(node, Runner(node), cmd)
    out.emit({"job": job_dict(job)}, f"{job.state.value}: {job.reason}")
    return job_exit_code(job)


async def _prepull(node: Node, args: argparse.Namespace, out: Output) -> int:
    cmd = build_command(node.config, operation=Operation.PREPULL, job_name=new_job_name("prepull"),
                        version=args.to_version, image=args.image, image_digest=args.image_digest)
    return await _run_job(node, cmd, out)


async def _rollback(node: Node, args: argparse.Namespace, out: Output) -> int:
    cmd = build_command(node.config, operation=Operation.ROLLBACK,
                        job_name=new_job_name("rollback"), version=args.to_version)
    _confirm(args, f"roll back edgecore on {node.config.node_name}")
    return await _run_job(node, cmd, out)


async def _resolve(node: Node, args: argparse.Namespace, out: Output) -> int:
    cmd = build_command(node.config, operation=Operation.RESOLVE,
                        job_name=new_job_name("resolve"), resolves=args.job_key)
    _confirm(args, f"declare the node repaired after {args.job_key} and allow upgrades again")
    return await _run_job(node, cmd, out)


async def _check(node: Node, args: argparse.Namespace, out: Output) -> int:
    from agent.plan import GO, SKIP, make_plan  # noqa: PLC0415 (see the imports)

    version = args.to_version
    if version is None:
        detected = await node.probe.detect()
        version = str(detected.version) if detected else "v0.0.0"
    cmd = build_command(node.config, operation=Operation.CHECK, job_name=new_job_name("check"),
                        version=version, image=args.image,
                        check_items=[i for i in args.check_items.split(",") if i])
    plan = await make_plan(node, cmd)
    text = "\n".join([f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in plan.checks]
                     + [f"Verdict: {plan.verdict} ({plan.reason})"])
    out.emit(plan.to_dict(), text)
    ok = plan.verdict == GO or (plan.verdict == SKIP and args.to_version is None)
    return EXIT_OK if ok or plan.verdict == SKIP else EXIT_REFUSED


async def _confirm_job(node: Node, key: str, out: Output) -> int:
    from agent.runner import Runner  # noqa: PLC0415 (see the imports)

    runner = Runner(node)
    with node.lock:
        job = node.journal.get(key)
        if job is None:
            raise AgentError(f"no job {key!r} in the journal")
        job = await runner.run(runner.confirm(job))
    out.emit({"job": job_dict(job)}, f"{job.state.value}: {job.reason}")
    return job_exit_code(job)


async def _recover(node: Node, out: Output) -> int:
    from agent.execute import recover_all  # noqa: PLC0415 (see the imports)
    from agent.runner import Runner  # noqa: PLC0415

    jobs = await recover_all(node, Runner(node))
    text = "\n".join(f"{j.key}: {j.state.value}: {j.reason}" for j in jobs)
    out.emit({"jobs": [job_dict(j) for j in jobs]}, text or "nothing to recover")
    return min((job_exit_code(j) for j in jobs), key=SEVERITY.index, default=EXIT_OK)


async def _status(node: Node, out: Output) -> int:
    from agent.steps.backup import list_backups  # noqa: PLC0415 (see the imports)

    detected = await node.probe.detect()
    svc = await node.service.status()
    active = node.journal.jobs(active_only=True)
    blocking = node.journal.unresolved_rollback_failure()
    data = {
        "nodeName": node.config.node_name,
        "edgecoreVersion": str(detected.version) if detected else None,
        "versionSource": detected.source if detected else None,
        "service": {"active": svc.active, "state": svc.state, "nRestarts": svc.n_restarts,
                    "mainPID": svc.main_pid},
        "activeJobs": [job_dict(j) for j in active],
        "blockedBy": blocking.key if blocking else None,
        "lockHeld": node.lock.held_by_other(),
        "keadmMarker": node.keadm_marker.exists(),
        "pendingReports": len(node.journal.outbox(limit=10000)),
        "backups": [str(v) for v in list_backups(node.backup_root)],
    }
    text = "\n".join(f"{k}: {v}" for k, v in data.items())
    out.emit(data, text)
    return EXIT_OK


def _history(node: Node, args: argparse.Namespace, out: Output) -> int:
    jobs = node.journal.jobs(limit=args.limit)
    lines = [f"{j.key:40} {j.command.operation.value:8} {j.state.value:16} "
             f"{j.from_version or '-'} -> {j.command.version or '-'}  {j.reason[:80]}"
             for j in jobs]
    out.emit({"jobs": [job_dict(j) for j in jobs]}, "\n".join(lines) or "no jobs")
    return EXIT_OK


def load(args: argparse.Namespace, path: Path | None = None) -> Config:
    return load_config(path or args.config, args.root)


def main(argv: list[str] | None = None) -> int:
    # The unit's UMask=0027, also for a run by hand (an operator's umask is often
    # 022): the journal, job logs and backups (edgecore.db caches the pods'
    # secrets) are then out of the world's reach. keadm inherits it, as under
    # systemd. Only adds bits: a stricter umask stays.
    os.umask(os.umask(0o027) | 0o027)
    args = _parser().parse_args(argv)
    out = Output(args.output)
    try:
        if args.cmd == "config":
            config = load(args, args.file)
            check_daemon_files(config)
            where = args.file or args.config
            out.emit({"valid": True, "nodeName": config.node_name,
                      "deprecations": list(config.deprecations)},
                     "\n".join([f"{where}: valid (node {config.node_name})",
                                *(f"{where}: warning: {d}" for d in config.deprecations)]))
            return EXIT_OK
        config = load(args)
        setup_logging(config.log_level, job_log_dir=config.state_dir / "logs")
        if args.cmd == "logs":
            show_job_log(config.state_dir / "logs", args.job_key, follow=args.follow)
            return EXIT_OK
        if args.cmd == "run":
            from agent.daemon import run_daemon  # noqa: PLC0415 (see the imports)

            check_daemon_files(config)
            return asyncio.run(run_daemon(config))
        from agent.node import build_node  # noqa: PLC0415

        node = build_node(config)
        if args.cmd in JOB_COMMANDS:
            metrics.enable(config, node, serve=False)
        try:
            if args.cmd == "upgrade":
                return asyncio.run(_upgrade(node, args, out))
            if args.cmd == "prepull":
                return asyncio.run(_prepull(node, args, out))
            if args.cmd == "rollback":
                return asyncio.run(_rollback(node, args, out))
            if args.cmd == "resolve":
                return asyncio.run(_resolve(node, args, out))
            if args.cmd == "check":
                return asyncio.run(_check(node, args, out))
            if args.cmd == "confirm":
                return asyncio.run(_confirm_job(node, args.job_key, out))
            if args.cmd == "recover":
                return asyncio.run(_recover(node, out))
            if args.cmd == "doctor":
                from agent.doctor import run as run_doctor  # noqa: PLC0415

                data, text, code = asyncio.run(
                    run_doctor(node, timeout=args.timeout, to_version=args.to_version))
                out.emit(data, text)
                return code
            if args.cmd == "status":
                return asyncio.run(_status(node, out))
            return _history(node, args, out)
        finally:
            metrics.flush()
            node.close()
    except AgentError as exc:
        out.error(exc)
        return exc.exit_code if type(exc) is not AgentError else EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
