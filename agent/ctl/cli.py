"""``edge-upgrade-ctl``: the cloud half of the protocol (docs/controller.md).

Exit codes: 0 the job Completed (or the command succeeded); 1 the job ended
Failure; 2 a bad manifest, configuration or job name; 3 interrupted before the
job was final (``resume JOB`` carries it on); 6 the job store is unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from agent.ctl.lease import Lease
from agent.ctl.link import BrokerUnreachable, Link
from agent.ctl.manifest import JobSpec, parse_manifest, read_manifest
from agent.ctl.model import JobPhase, JobView, NodePhase
from agent.ctl.rollout import Rollout, command_for, new_history_id, select_nodes
from agent.ctl.settings import DEFAULT_CONFIG, CtlSettings, load_settings
from agent.ctl.store import Store, now
from agent.ctl.view import Live, dump_status, status_document, summary, table
from agent.errors import AgentError, Busy, ConfigError, ManifestError, TransientError
from agent.faults import fault_point
from agent.logs import setup_logging
from agent.versions import check_name

log = structlog.get_logger("agent.ctl")
DESCRIPTION = "Apply NodeUpgradeJob manifests to a fleet of edge-upgrade-agent nodes."
EXIT_INTERRUPTED = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-upgrade-ctl", description=DESCRIPTION)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="controller YAML config")
    p.add_argument("--log-level", default="warning", help="log level on stderr (default warning)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("apply", "upgrade the nodes a NodeUpgradeJob selects"),
                       ("prepull", "fetch a NodeUpgradeJob's package on its nodes ahead")):
        a = sub.add_parser(name, help=what)
        a.add_argument("-f", "--filename", type=Path, required=True, help="the manifest (YAML)")
        a.add_argument("--quiet", action="store_true", help="no live table; only the status")
    for name, what in (("resume", "carry on a job a killed controller left"),
                       ("watch", "follow a job without dispatching")):
        r = sub.add_parser(name, help=what)
        r.add_argument("job")
        r.add_argument("--quiet", action="store_true")
    g = sub.add_parser("get", help="nodes, jobs, or one job")
    g.add_argument("what", choices=("nodes", "jobs", "job"))
    g.add_argument("name", nargs="?")
    g.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    c = sub.add_parser("confirm", help="release nodes parked by requireConfirmation")
    c.add_argument("job")
    c.add_argument("nodes", nargs="*", help="default: every node awaiting confirmation")
    r = sub.add_parser("report", help="write a rollout report")
    r.add_argument("job")
    r.add_argument("--html", type=Path, required=True, metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, json_output=False)
    try:
        return _dispatch(args)
    except AgentError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: `edge-upgrade-ctl resume JOB` carries the job on", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store = Store(settings.store_path)
    try:
        if args.cmd == "get":
            if args.what == "nodes":
                return asyncio.run(_get_nodes(settings, store, args.output))
            return _get_jobs(store, args.what, args.name, args.output)
        if args.cmd == "report":
            from agent.ctl.report_html import write_html  # noqa: PLC0415 (plotly, on demand)

            try:
                write_html(_stored_view(store, args.job), args.html)
            except ImportError:
                raise ConfigError("report --html needs plotly: pip install "
                                  "'edge-upgrade-agent[ctl]'") from None
            except OSError as exc:
                raise ConfigError(f"cannot write {args.html}: {exc.strerror or exc}") from None
            print(f"wrote {args.html}")
            return 0
        if args.cmd == "confirm":
            return asyncio.run(_confirm(settings, store, args.job, args.nodes))
        return asyncio.run(_run_job(settings, store, args))
    finally:
        store.close()


def _stored_spec(store: Store, job: str) -> JobSpec:
    # A prepull job is stored under "<name>-prepull": the row names the job.
    return replace(parse_manifest(store.job_row(job)["manifest"].encode(), f"job {job}"),
                   name=job)


def _stored_view(store: Store, job: str) -> JobView:
    spec = _stored_spec(store, job)
    return store.view(job, spec_fields=_fields(spec))


def _fields(spec: JobSpec) -> dict[str, Any]:
    return {"version": spec.version, "image": spec.image or "(agent default)",
            "concurrency": spec.concurrency, "failure_tolerate": spec.failure_tolerate,
            "timeout_seconds": spec.timeout_seconds}


def _signer(settings: CtlSettings) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    if settings.signing_key is None:
        return None
    from agent.security.signing import load_private_key, sign  # noqa: PLC0415

    key, key_id = load_private_key(settings.signing_key), settings.signing_key_id
    ttl = settings.signing_ttl_seconds
    return lambda body: sign(body, key, key_id, ttl_seconds=ttl)


@contextlib.asynccontextmanager
async def _connected(settings: CtlSettings, store: Store,
                     on_change: Callable[[], None] = lambda: None) -> Any:
    link = Link(settings, store, on_change)
    task = asyncio.ensure_future(link.run())
    pump = asyncio.ensure_future(link.pump())
    try:
        waiter = asyncio.ensure_future(link.settled.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED,
                                     timeout=settings.connect_timeout_seconds)
        if task in done:
            waiter.cancel()
            task.result()  # raises the configuration error that ended it
        if not done:
            waiter.cancel()
            m = settings.mqtt
            raise BrokerUnreachable(
                f"no connection to the broker {m.host}:{m.port} within "
                f"{settings.connect_timeout_seconds:g}s: {link.last_error or 'no answer'}")
        yield link
    finally:
        for t in (task, pump):
            t.cancel()
        await asyncio.gather(task, pump, return_exceptions=True)


@dataclass(frozen=True)
class Plan:
    """What a job command will run, settled before the broker is touched: a bad
    manifest or signing key fails at once, and no job is stored half-started."""

    spec: JobSpec
    operation: str
    manifest: str = ""       # for a new job: the text to store
    history_id: str = ""     # for a stored job


def _plan(store: Store, args: argparse.Namespace) -> Plan:
    if args.cmd in ("apply", "prepull"):
        raw = read_manifest(args.filename)
        spec = parse_manifest(raw, str(args.filename))
        if args.cmd == "prepull":
            spec = replace(spec, name=check_name("job name", f"{spec.name}-prepull"))
        store.job_absent(spec.name)
        return Plan(spec, "upgrade" if args.cmd == "apply" else "prepull", raw.decode())
    row = store.job_row(args.job)
    return Plan(_stored_spec(store, args.job), row["operation"], history_id=row["history_id"])


async def _run_job(settings: CtlSettings, store: Store, args: argparse.Namespace) -> int:
    plan = _plan(store, args)
    signer = _signer(settings)
    for warning in plan.spec.warnings if plan.manifest else ():
        print(f"warning: {warning}", file=sys.stderr)
    lease = Lease(settings.state_dir, settings.client_id)
    if not lease.try_take():
        if args.cmd == "watch":  # the holder keeps the store current: follow it there
            return await _watch_store(store, plan.spec, args.quiet, settings.tick_seconds)
        raise Busy(f"another edge-upgrade-ctl (pid {lease.holder()}) holds the broker link of "
                   f"{settings.client_id}: wait for it, or run this job under another "
                   "identity (its own certificate and client_id)")
    try:
        return await _drive(settings, store, args, plan, signer)
    finally:
        lease.release()


async def _watch_store(store: Store, spec: JobSpec, quiet: bool, tick: float) -> int:
    live = Live(sys.stderr, quiet=quiet)
    while True:
        view = store.view(spec.name, events=False, spec_fields=_fields(spec))
        live(view)
        if view.phase.final:
            break
        await asyncio.sleep(tick)
    view = store.view(spec.name, events="last", spec_fields=_fields(spec))
    print(dump_status(view, spec.api_version), end="")
    return 0 if view.phase is JobPhase.COMPLETED else 1


async def _drive(settings: CtlSettings, store: Store, args: argparse.Namespace, plan: Plan,
                 signer: Callable[[dict[str, Any]], dict[str, Any]] | None) -> int:
    # The table goes to stderr, the final status to stdout: `apply -f j.yaml > s.yaml`.
    live = Live(sys.stderr, quiet=args.quiet)
    rollout: Rollout | None = None

    def poke() -> None:
        if rollout is not None:
            rollout.poke()

    spec, operation, history = plan.spec, plan.operation, plan.history_id
    async with _connected(settings, store, poke) as link:
        if plan.manifest:
            history = new_history_id()
            chosen = select_nodes(spec, store.presence())
            if not chosen:
                raise ManifestError(f"{spec.name}: the labelSelector matches no node")
            store.create_job(spec.name, operation, plan.manifest, history,
                             nodes=[(c.name, c.phase, c.reason) for c in chosen], now=now())
            fault_point("ctl:created")
        else:
            store.refresh_in_flight(spec.name, now())  # the resent commands' timeout window
        rollout = Rollout(store, link, spec, operation=operation, history_id=history,
                          signer=signer, tick=settings.tick_seconds,
                          grace=settings.timeout_grace_seconds, dispatch=args.cmd != "watch")
        view = await rollout.run(None if args.quiet else live)
    print(dump_status(view, spec.api_version), end="")
    print(summary(view), file=sys.stderr)
    return 0 if view.phase is JobPhase.COMPLETED else 1


async def _get_nodes(settings: CtlSettings, store: Store, output: str) -> int:
    lease = Lease(settings.state_dir, settings.client_id)
    if lease.try_take():
        try:
            async with _connected(settings, store):
                pass
        finally:
            lease.release()
    else:  # the holder keeps the store's presence current
        print(f"(presence as kept by edge-upgrade-ctl pid {lease.holder()})", file=sys.stderr)
    presence = store.presence()
    if output != "table":
        print(json.dumps(presence, indent=2, sort_keys=True) if output == "json"
              else _yaml(presence), end="" if output == "yaml" else "\n")
        return 0
    rows = [("NODE", "ONLINE", "VERSION", "ARCH", "JOB", "LABELS")]
    for node, p in presence.items():
        raw = p.get("labels")
        labels: dict[str, Any] = raw if isinstance(raw, dict) else {}
        rows.append((node, "yes" if p.get("online") else "no", str(p.get("edgecoreVersion")),
                     str(p.get("arch") or "-"), str(p.get("currentJob") or "-"),
                     ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"))
    _print_rows(rows)
    return 0


def _get_jobs(store: Store, what: str, name: str | None, output: str) -> int:
    if what == "job":
        if not name:
            raise ManifestError("get job needs a job name")
        spec = _stored_spec(store, name)
        view = store.view(name, events="last", spec_fields=_fields(spec))
        if output == "table":
            print(summary(view))
            for line in table(view, at=now(), width=10_000, max_rows=len(view.nodes))[1:]:
                print(line.rstrip())
        elif output == "json":
            print(json.dumps(status_document(view, spec.api_version), indent=2))
        else:
            print(dump_status(view, spec.api_version), end="")
        return 0
    views = [store.view(job, events=False) for job in store.job_names()]
    if output != "table":
        data = [{"name": v.name, "operation": v.operation, "phase": v.phase.value,
                 "reason": v.reason, "historyID": v.history_id, "created": _when(v.created_at),
                 "nodes": {p.value: v.count(p) for p in NodePhase if v.count(p)}}
                for v in views]
        print(json.dumps(data, indent=2) if output == "json" else _yaml(data), end="\n"
              if output == "json" else "")
        return 0
    rows = [("JOB", "OPERATION", "PHASE", "NODES", "SUCCESSFUL", "FAILED", "CREATED")]
    for view in views:
        failed = view.count(NodePhase.FAILURE) + view.count(NodePhase.UNKNOWN)
        rows.append((view.name, view.operation, view.phase.value, str(len(view.nodes)),
                     str(view.count(NodePhase.SUCCESSFUL)), str(failed),
                     _when(view.created_at)))
    _print_rows(rows)
    return 0


async def _confirm(settings: CtlSettings, store: Store, job: str, nodes: list[str]) -> int:
    row = store.job_row(job)
    view = store.view(job, events=False)
    known = {n.name: n for n in view.nodes}
    for n in nodes:
        if n not in known:
            raise ManifestError(f"node {n} is not part of job {job}")
    targets = nodes or [n.name for n in view.nodes if n.last_action == "awaiting_confirmation"]
    if not targets:
        print(f"no node of {job} is awaiting confirmation", file=sys.stderr)
        return 0
    sign = _signer(settings)
    queued = {}
    for node in targets:
        body = {"schema": "edge-upgrade-agent/command/v1", "operation": "confirm",
                "jobName": job, "nodeName": node, "historyID": row["history_id"]}
        queued[node] = store.queue_command(node, sign(body) if sign else body, now())
    lease = Lease(settings.state_dir, settings.client_id)
    if lease.try_take():
        try:
            async with _connected(settings, store):
                await _sent(store, queued, settings.mqtt.reconnect_max_seconds + 30)
        finally:
            lease.release()
    else:  # the process running the job holds the connection: it sends them
        await _sent(store, queued, 60, holder=lease.holder())
    failed = 0
    for node, ident in queued.items():
        error = store.outcome(ident)[1]
        # The broker took it; the agent drops a confirm for a job that is not parked.
        print(f"confirm for {job} refused on the way to {node}: {error}" if error
              else f"confirm for {job} sent to {node}")
        failed += bool(error)
    return 1 if failed else 0


async def _sent(store: Store, queued: dict[str, int], seconds: float, holder: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not all(store.outcome(i)[0] for i in queued.values()):
        if loop.time() > end:
            who = f"edge-upgrade-ctl pid {holder}" if holder else "the broker"
            raise TransientError(f"the confirmation is queued but {who} did not take it in "
                                 f"{seconds:g}s; it is sent when a controller next connects")
        await asyncio.sleep(0.1)


def _print_rows(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _when(ts: float) -> str:
    import time  # noqa: PLC0415

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _yaml(data: Any) -> str:
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(data, sort_keys=True)


__all__ = ["command_for", "main"]
