"""Benchmark: one NodeUpgradeJob across N simulated nodes, against ceil(N/C) x install time.

Run from the repository root::

    .venv/bin/python bench/fleet.py [--nodes 1000] [--concurrency 100] [--install-seconds 2]
                                    [--matrix] [--profile] [--keep] [--json]
    .venv/bin/python bench/fleet.py --connections 1000,5000,10000,19900 [--json]

Per run, on 127.0.0.1, removed afterwards unless ``--keep``: a throw-away PKI
and a real Mosquitto (``testkit.fleet_sim.BenchBroker``), its data and the
controller's store under ``--dir`` (disk, as in production); the fleet
(``python -m testkit.fleet_sim``: real agent Daemons, journals and steps,
stand-in edgecore and keadm, shared MQTT connections; one process per 5,000
nodes, interleaved), the nodes' state directories on tmpfs (``--shm``); then
the real ``python -m agent.ctl apply -f job.yaml --quiet``, a v1alpha2 job
selecting the N nodes by label, concurrency C, ``timeoutSeconds``
max(120, 20 x install), ``failureTolerate: "1"``.

Timed with time.time(), the clock of the controller's store: the controller's
start and exit; each node's dispatch and final commit (the store); when the
broker sent its command (a QoS 0 subscriber to every cmd topic in this
process, the "tap"); when the agent took the command and sent its final
report (the fleet). ``rollout`` = first command to the controller's exit;
``ideal`` = ceil(N/C) x install; ``startup`` = start to first command
(connect, presence settle, selection); ``drain`` = last final report to exit
(the final status). A slot's cycle: ``ingest`` (tap to the agent's intake:
the fleet's event loop), ``job`` (intake to final report sent), ``report``
(to its commit in the store), ``reaction`` (the k-th final commit to the
(C+k)-th dispatch), ``send`` (dispatch to the tap: the controller's publish
and the broker). Along a chain of ceil(N/C) cycles the agents' share is
ingest + job - install, the controller's report + reaction + send, plus the
drain; ``ctl-only ratio`` = (ideal + the controller's share) / ideal: the
ratio had every agent taken exactly the install time. CPU and peak RSS: the
controller's from ``wait4`` (whole life); the broker's and the fleet's CPU
over the controller's life from ``/proc/<pid>/stat`` (the fleet's with its
installers), peak RSS from VmHWM; the fleet's time in the cyclic garbage
collector from the time it is ready (``gc.callbacks``; it freezes its start-up
heap, see testkit/fleet_sim.py). Messages per node, counted at the fleet:
(commands + reports + presence, the start-up presence included) / N; the
broker's rate counts each message in and out to the controller or the fleet
(the tap's copies of the commands not included).

``--connections M1,M2,...``: M idle agent connections to one broker, opened
in steps by a child process (mutual TLS, MQTT v5, own certificate, persistent
session, will, one subscription, retained presence, keepalive 30 s, as an
agent), and the broker's connect cost, RSS and idle CPU at each step; then
(``--rate-seconds``) 100 of them publish 700-byte QoS 1 reports, 20 in flight
each, to one subscriber of every status topic (as the controller): published
and delivered per second and the broker's CPU. The probe's Python clients
share the CPUs with the broker: the rates are lower bounds for the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testkit.ctlrig import ctl_config  # noqa: E402
from testkit.fleet_sim import BenchBroker, fleet_pki, merge, write_manifest  # noqa: E402
from testkit.pki import issue_client  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
MATRIX = ((1000, 100), (1000, 1000), (10000, 1000), (10000, 100))
FILE_LIMIT = 262_144
RATE_PUBLISHERS, RATE_WINDOW = 100, 20  # the probe's message-rate phase
SHARD_NODES = 5000  # 3 descriptors a journal: 5,000 nodes fit a 20,000 descriptor limit


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_s(pid: int, *, children: bool = False) -> float:
    """utime + stime (and of the reaped children, if asked) from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return sum(int(f) for f in fields[11:15 if children else 13]) / TICK


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> str:
    """What the figures depend on: the code measured, and how busy the machine was."""
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False,
                              cwd=REPO).stdout.strip()

    dirty = " (agent/ changed since)" if run("git", "status", "--porcelain", "agent") else ""
    return (f"commit {run('git', 'rev-parse', '--short', 'HEAD')}{dirty}; {os.cpu_count()} "
            f"CPUs; {run('uptime')}")


def raise_file_limit() -> int:
    """Children inherit it: the broker and the fleet hold thousands of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (FILE_LIMIT, hard):  # above the hard limit needs CAP_SYS_RESOURCE
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            return max(soft, want)
        except (ValueError, OSError):
            continue
    return soft


def wait_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready = select.select([proc.stdout], [], [], 1.0)[0]
        if ready and (line := proc.stdout.readline().decode(errors="replace")):
            return line.strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
    raise TimeoutError(f"{what}: nothing after {timeout:g}s")


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def wait_ctl(proc: subprocess.Popen[bytes], timeout: float
             ) -> tuple[int, resource.struct_rusage] | None:
    """Reap the controller with wait4, for its exact CPU and peak RSS; None on timeout."""
    end = shown = time.monotonic()
    end += timeout
    while time.monotonic() < end:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage
        if time.monotonic() - shown >= 30:
            shown = time.monotonic()
            progress(f"  controller: {cpu_s(proc.pid):.0f} CPU s, "
                     f"{status_kib(proc.pid, 'VmRSS') / 1024:.0f} MiB")
        time.sleep(0.2)
    return None


class Tap:
    """A QoS 0 subscriber to every command topic: when the broker sent each node's command.

    Splits a command's way into the controller's and broker's part (dispatch to the tap)
    and the fleet's (the tap to the agent's intake, which waits for the fleet's event
    loop when the fleet is busy). A paho thread in this otherwise idle process."""

    def __init__(self, broker: BenchBroker, cn: str, cert: str, key: str) -> None:
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cn,
                                  protocol=paho.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(broker.pki.ca_cert))
        ctx.load_cert_chain(cert, key)
        self.client.tls_set_context(ctx)
        self.client.on_message = self._seen
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.connect(broker.host, broker.port, keepalive=60)
        self.client.subscribe("kubeedge/nodes/+/upgrade/cmd", qos=0)
        self.client.loop_start()
        if not self.ready.wait(30):
            raise TimeoutError("the command tap did not subscribe")

    def _seen(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.seen.setdefault(msg.topic.split("/")[2], time.time())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Run:
    nodes: int
    concurrency: int
    install_s: float
    gateways: int
    shards: int
    ideal_s: float
    rollout_s: float = math.nan
    ratio: float = math.nan
    ctl_only_ratio: float = math.nan
    successful: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    agent_states: dict[str, int] = field(default_factory=dict)
    ctl_exit: int | None = None
    ctl_wall_s: float = math.nan
    startup_s: float = math.nan
    drain_s: float = math.nan
    # mean, p50, p99 of each part of a slot's cycle (see the module's docstring)
    job_s: tuple[float, float, float] = (math.nan,) * 3
    ingest_s: tuple[float, float, float] = (math.nan,) * 3
    report_s: tuple[float, float, float] = (math.nan,) * 3
    reaction_s: tuple[float, float, float] = (math.nan,) * 3
    send_s: tuple[float, float, float] = (math.nan,) * 3
    agents_share_s: float = math.nan
    ctl_share_s: float = math.nan
    max_in_flight: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    msgs_per_node: float = math.nan
    broker_msgs_per_s: float = math.nan  # average over the rollout, in + out
    broker_peak_msgs_per_s: int = 0
    broker_us_per_msg: float = math.nan
    ctl_cpu_s: float = math.nan
    ctl_rss_mib: float = math.nan
    broker_cpu_s: float = math.nan
    broker_rss_mib: float = math.nan
    fleet_cpu_s: float = math.nan
    fleet_rss_mib: float = math.nan
    fleet_gc_s: float = math.nan  # in the cyclic garbage collector, once the fleet is ready
    fleet_start_s: float = math.nan
    notes: list[str] = field(default_factory=list)


def run_one(args: argparse.Namespace, nodes: int, concurrency: int) -> Run:
    shards = math.ceil(nodes / SHARD_NODES)  # node i in shard i % S: even dispatch order
    gateways = max(shards, args.gateways or min(32, math.ceil(nodes / 500)))
    install = args.install_seconds
    r = Run(nodes, concurrency, install, gateways, shards,
            math.ceil(nodes / concurrency) * install)
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=args.dir))
    shm = Path(tempfile.mkdtemp(prefix="fleet-", dir=args.shm))
    broker: BenchBroker | None = None
    sims: list[subprocess.Popen[bytes]] = []
    ctl: subprocess.Popen[bytes] | None = None
    spies: list[subprocess.Popen[bytes]] = []
    tap: Tap | None = None
    try:
        pki, identities = fleet_pki(work / "pki", gateways + 1)  # the last one: the tap
        broker = BenchBroker(pki, work / "broker", gateways + 1)
        broker.start()
        assert broker.pid is not None
        progress(f"N={nodes} C={concurrency} install={install:g}s: {nodes} agents in "
                 f"{shards} process(es), {gateways} gateway connection(s)")
        started = time.monotonic()
        for k in range(shards):
            spec = {"root": str(shm), "nodes": nodes, "install_seconds": install,
                    "host": broker.host, "port": broker.port, "ca": str(pki.ca_cert),
                    "gateways": identities[:-1][k::shards], "shard": k, "shards": shards,
                    "stats": str(work / f"fleet-{k}.json")}
            (work / f"spec-{k}.json").write_text(json.dumps(spec))
            with (work / f"fleet-{k}.log").open("wb") as log:
                sims.append(subprocess.Popen(
                    [sys.executable, "-m", "testkit.fleet_sim", str(work / f"spec-{k}.json")],
                    cwd=REPO, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL))
        for k, sim in enumerate(sims):
            progress(f"  fleet {k}: {wait_line(sim, 120 + nodes / shards / 10, 'the fleet')}")
        r.fleet_start_s = time.monotonic() - started
        tap = Tap(broker, *identities[-1])
        job = write_manifest(work / "job.yaml", "fleet", concurrency=concurrency,
                             timeout_seconds=max(120, int(20 * install)))
        config = ctl_config(work, pki, broker, presence_settle_seconds=1.0, tick_seconds=0.5)
        b0, f0 = cpu_s(broker.pid), sum(cpu_s(p.pid, children=True) for p in sims)
        t0 = time.time()  # the clock of the fleet's stats and the controller's store
        with (work / "ctl.out").open("wb") as out, (work / "ctl.err").open("wb") as err:
            ctl = subprocess.Popen(
                [sys.executable, "-m", "agent.ctl", "--config", str(config), "apply", "-f",
                 str(job), "--quiet"], cwd=REPO, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
        if args.profile:  # raw collapsed stacks: one line per stack, with its sample count
            spies = [subprocess.Popen([str(REPO / ".venv/bin/py-spy"), "record", "--pid",
                                       str(pid), "--rate", "50", "--format", "raw", "-o",
                                       str(work / f"{name}.pyspy.txt")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for name, pid in (("ctl", ctl.pid), ("fleet-0", sims[0].pid))]
        reaped = wait_ctl(ctl, args.timeout or max(300, 4 * r.ideal_s + nodes * 0.05))
        t1 = time.time()
        r.ctl_wall_s = t1 - t0
        r.broker_cpu_s = cpu_s(broker.pid) - b0
        r.fleet_cpu_s = sum(cpu_s(p.pid, children=True) for p in sims) - f0
        r.broker_rss_mib = status_kib(broker.pid, "VmHWM") / 1024
        r.fleet_rss_mib = sum(status_kib(p.pid, "VmHWM") for p in sims) / 1024
        if reaped is None:
            r.notes.append(f"the controller timed out after {r.ctl_wall_s:.0f}s; killed")
            stop(ctl, signal.SIGKILL)
        else:
            r.ctl_exit, usage = reaped
            r.ctl_cpu_s, r.ctl_rss_mib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        for sim in sims:
            stop(sim)
        for spy in spies:
            spy.wait(60)
        if spies:
            r.notes.append(f"py-spy profiles of the controller and fleet 0: "
                           f"{work}/{{ctl,fleet-0}}.pyspy.txt")
        fill(r, merge([json.loads((work / f"fleet-{k}.json").read_text())
                       for k in range(shards)]), tap.seen, t0=t0, t1=t1, work=work,
             broker=broker)
        if args.keep or args.profile:
            r.notes.append(f"kept {work} and {shm}")
    finally:
        if tap is not None:
            tap.close()
        for p in (*spies, ctl, *sims):
            stop(p, signal.SIGKILL)
        if broker is not None:
            broker.stop()
        if not (args.keep or args.profile):
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
    return r


def stats3(values: list[float]) -> tuple[float, float, float]:
    """Mean, p50 and p99 (nearest rank)."""
    if not values:
        return (math.nan,) * 3
    v = sorted(values)
    return sum(v) / len(v), v[(len(v) - 1) // 2], v[min(len(v), math.ceil(0.99 * len(v))) - 1]


def fill(r: Run, stats: dict[str, Any], tapped: dict[str, float], *, t0: float, t1: float,
         work: Path, broker: BenchBroker) -> None:
    first, last, waves = stats["first_command"], stats["last_final"], r.ideal_s / r.install_s
    if first is not None:
        r.startup_s, r.rollout_s = first - t0, t1 - first
        r.ratio = r.rollout_s / r.ideal_s
    r.drain_s = t1 - last if last is not None else math.nan
    r.messages = {k: stats[k] for k in ("commands", "reports", "presence")}
    r.fleet_gc_s = stats["gc_s"]
    if stats["gateway_connections"] != r.gateways:
        r.notes.append(f"{stats['gateway_connections'] - r.gateways} gateway reconnect(s)")
    total = sum(r.messages.values())
    r.msgs_per_node = total / r.nodes
    # Each message passes the broker twice; the start-up presence (one a node) came earlier.
    ops = 2 * (total - r.nodes)
    r.broker_msgs_per_s = ops / r.rollout_s
    r.broker_us_per_msg = 1e6 * r.broker_cpu_s / ops
    r.broker_peak_msgs_per_s = 2 * stats["peak_messages_per_s"]
    r.max_in_flight, r.agent_states = stats["max_in_flight"], stats["states"]
    # The agents' clock and the controller's store are both time.time() on this machine.
    with sqlite3.connect(f"file:{work / 'ctl' / 'jobs.db'}?mode=ro", uri=True) as db:
        ctl = {n: (d, f) for n, d, f in db.execute(
            "SELECT node, dispatched_at, finished_at FROM nodes WHERE job='fleet'")}
    fleet = {n: (c, f) for n, (c, f) in stats["per_node"].items()
             if c and f and n in ctl and n in tapped}
    r.job_s = stats3([f - c for c, f in fleet.values()])
    r.ingest_s = stats3([c - tapped[n] for n, (c, _) in fleet.items()])
    r.report_s = stats3([ctl[n][1] - f for n, (_, f) in fleet.items() if ctl[n][1]])
    r.send_s = stats3([tapped[n] - ctl[n][0] for n in fleet if ctl[n][0]])
    sent = sorted(d for d, _ in ctl.values() if d)
    done = sorted(f for _, f in ctl.values() if f)
    reactions = [sent[r.concurrency + i] - done[i]
                 for i in range(max(0, min(len(sent) - r.concurrency, len(done))))]
    r.reaction_s = stats3(reactions)
    # A slot's chain of ceil(N/C) cycles: ingest, job | report, reaction, send | ingest, ...
    r.agents_share_s = waves * (r.ingest_s[0] + r.job_s[0] - r.install_s)
    r.ctl_share_s = waves * (r.report_s[0] + r.send_s[0]) + r.drain_s + \
        (waves - 1) * (r.reaction_s[0] if reactions else 0)
    r.ctl_only_ratio = (r.ideal_s + r.ctl_share_s) / r.ideal_s
    if r.job_s[1] + r.ingest_s[1] > 1.5 * r.install_s:
        r.notes.append(f"the agents took {r.ingest_s[1]:.1f}s to take a command and "
                       f"{r.job_s[1]:.1f}s for a job (p50) for a {r.install_s:g}s install: "
                       "the fleet, sharing this machine's CPUs, is the bottleneck here")
    if len(tapped) != r.nodes:
        r.notes.append(f"the tap saw {len(tapped)} of {r.nodes} commands")
    text = (work / "ctl.out").read_text(errors="replace")
    if text.strip():
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for n in doc["status"]["nodeStatus"]:
            r.phases[n["phase"]] = r.phases.get(n["phase"], 0) + 1
    r.successful = r.phases.get("Successful", 0)
    if drops := len(re.findall(r"(?i)dropp", broker.log_tail(100_000))):
        r.notes.append(f"the broker logged {drops} dropped-message line(s)")
    if r.successful != r.nodes:
        err = (work / "ctl.err").read_text(errors="replace")[-1500:]
        r.notes.append(f"only {r.successful} of {r.nodes} Successful; ctl stderr: {err}")


def _md(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def table(runs: list[Run]) -> str:
    def three(x: tuple[float, float, float]) -> str:
        return "/".join(f"{v:.2f}" for v in x)

    main = _md(("N", "C", "install s", "rollout s", "ideal s", "ratio", "Successful",
                "msgs/node", "ctl CPU s", "ctl peak RSS MiB", "broker CPU s",
                "broker peak RSS MiB", "fleet CPU s"),
               [(str(r.nodes), str(r.concurrency), f"{r.install_s:g}", f"{r.rollout_s:.1f}",
                 f"{r.ideal_s:g}", f"{r.ratio:.2f}x", f"{r.successful}/{r.nodes}",
                 f"{r.msgs_per_node:.1f}", f"{r.ctl_cpu_s:.1f}", f"{r.ctl_rss_mib:.0f}",
                 f"{r.broker_cpu_s:.1f}", f"{r.broker_rss_mib:.0f}", f"{r.fleet_cpu_s:.1f}")
                for r in runs])
    where = _md(("N", "C", "startup s", "drain s", "fleet ingest s", "agent job s",
                 "report s", "ctl reaction s", "send s", "agents' share s", "ctl share s",
                 "ctl-only ratio"),
                [(str(r.nodes), str(r.concurrency), f"{r.startup_s:.1f}", f"{r.drain_s:.1f}",
                  three(r.ingest_s), three(r.job_s), three(r.report_s), three(r.reaction_s),
                  three(r.send_s), f"{r.agents_share_s:.0f}", f"{r.ctl_share_s:.0f}",
                  f"{r.ctl_only_ratio:.2f}x") for r in runs])
    load = _md(("N", "C", "max in flight", "ctl CPU %", "broker CPU %", "broker msgs/s avg/peak",
                "broker CPU µs/msg", "fleet CPU ms/job", "fleet GC s", "fleet peak RSS MiB",
                "fleet start s"),
               [(str(r.nodes), str(r.concurrency), str(r.max_in_flight),
                 f"{100 * r.ctl_cpu_s / r.ctl_wall_s:.0f}",
                 f"{100 * r.broker_cpu_s / r.ctl_wall_s:.0f}",
                 f"{r.broker_msgs_per_s:.0f}/{r.broker_peak_msgs_per_s}",
                 f"{r.broker_us_per_msg:.0f}", f"{1000 * r.fleet_cpu_s / r.nodes:.1f}",
                 f"{r.fleet_gc_s:.1f}", f"{r.fleet_rss_mib:.0f}", f"{r.fleet_start_s:.0f}")
                for r in runs])
    notes = [f"N={r.nodes} C={r.concurrency}: {note}" for r in runs for note in r.notes]
    return "\n".join([*main, "", "Where the time went (seconds: mean/p50/p99):", "", *where, "",
                      "Load (CPU % of the controller's wall time):", "", *load, "", *notes])


# -- the connection probe: idle agents, each with a connection of its own ----------


def _s(text: str) -> bytes:
    return len(text.encode()).to_bytes(2, "big") + text.encode()


def _pkt(kind: int, body: bytes) -> bytes:
    size, n = bytearray(), len(body)
    while True:  # MQTT's variable byte integer
        n, b = divmod(n, 128)
        size.append(b | 0x80 if n else b)
        if not n:
            return bytes([kind]) + size + body


def agent_packets(cn: str) -> tuple[bytes, bytes, bytes]:
    """An agent's MQTT v5 CONNECT (persistent session, receive maximum 1, keepalive 30 s,
    a retained offline will), SUBSCRIBE to its commands, retained presence PUBLISH."""
    topic = f"kubeedge/nodes/{cn}/upgrade/"
    props = b"\x11" + (7 * 86400).to_bytes(4, "big") + b"\x21\x00\x01"
    will = json.dumps({"online": False, "nodeName": cn}).encode()
    connect = _pkt(0x10, _s("MQTT") + b"\x05\x2c\x00\x1e" + bytes([len(props)]) + props
                   + _s(cn) + b"\x00" + _s(topic + "presence") + _s(will.decode()))
    subscribe = _pkt(0x82, b"\x00\x01\x00" + _s(topic + "cmd") + b"\x01")
    presence = json.dumps({"online": True, "nodeName": cn, "edgecoreVersion": "v1.12.1",
                           "labels": {"fleet": "probe"}, "arch": "amd64"}).encode()
    return connect, subscribe, _pkt(0x33, _s(topic + "presence") + b"\x00\x02\x00" + presence)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    kind, length, shift = (await reader.readexactly(1))[0], 0, 0
    while (b := (await reader.readexactly(1))[0]) & 0x80:
        length, shift = length | (b & 0x7F) << shift, shift + 7
    return kind, await reader.readexactly(length | b << shift)


async def _agent(cn: str, pki_dir: Path, host: str, port: int, clean: bool = False
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / f"{cn}.crt"), str(pki_dir / f"{cn}.key"))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 60)
    packets = agent_packets(cn) if not clean else (  # the controller: status of every node
        _pkt(0x10, _s("MQTT") + b"\x05\x02\x00\x3c\x00" + _s(cn)),
        _pkt(0x82, b"\x00\x01\x00" + _s("kubeedge/nodes/+/upgrade/status") + b"\x01"))
    for packet, expected in zip(packets, (0x20, 0x90, 0x40), strict=False):
        writer.write(packet)
        kind, body = await asyncio.wait_for(_answer(reader), 60)
        if kind != expected or (kind == 0x20 and body[1]):
            raise ConnectionError(f"{cn}: answer 0x{kind:02x} {body[:4].hex()}")
    return reader, writer


async def _keepalive(cn: str, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30 * (hash(cn) % 1000) / 1000)  # independent agents: spread
    while True:
        writer.write(b"\xc0\x00")  # PINGREQ; a publisher reads the answers, others leave them
        await asyncio.sleep(30)


async def _publish(cn: str, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                   end: float, acked: list[int]) -> None:
    """QoS 1 reports of a report's size, RATE_WINDOW in flight, until ``end``."""
    body = _s(f"kubeedge/nodes/{cn}/upgrade/status") + b"%b\x00" + b"x" * 700
    pid, in_flight = 0, 0
    while time.monotonic() < end:
        while in_flight < RATE_WINDOW:
            pid, in_flight = pid % 65535 + 1, in_flight + 1
            conn[1].write(_pkt(0x32, body.replace(b"%b", pid.to_bytes(2, "big"))))
        if (await _answer(conn[0]))[0] == 0x40:
            in_flight, acked[0] = in_flight - 1, acked[0] + 1


async def _subscribe(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                     got: list[int]) -> None:
    while True:
        kind, body = await _answer(conn[0])
        if kind & 0xF6 == 0x32:  # PUBLISH, QoS 1: PUBACK its packet id
            at = 2 + int.from_bytes(body[:2], "big")
            conn[1].write(b"\x40\x02" + body[at:at + 2])
            got[0] += 1


async def _rate(spec: dict[str, Any], conns: list[Any]) -> dict[str, Any]:
    """Publishers (RATE_PUBLISHERS of the idle agents) to one subscriber, as the controller."""
    broker, seconds = int(spec["broker_pid"]), spec["rate_seconds"]
    sub = await _agent("cloud-controller", Path(spec["pki"]), spec["host"], spec["port"],
                       clean=True)
    acked, got = [0], [0]
    reader = asyncio.ensure_future(_subscribe(sub, got))
    c0, t0 = cpu_s(broker), time.monotonic()
    await asyncio.gather(*(_publish(cn, conn, t0 + seconds, acked)
                           for cn, conn in conns[:RATE_PUBLISHERS]))
    wall, cpu = time.monotonic() - t0, cpu_s(broker) - c0
    reader.cancel()
    return {"rate": True, "connections": len(conns), "publishers": min(len(conns),
            RATE_PUBLISHERS), "published_per_s": acked[0] / wall, "delivered_per_s":
            got[0] / wall, "broker_cpu_pct": 100 * cpu / wall, "seconds": wall}


async def _probe_child(spec: dict[str, Any]) -> None:
    conns: list[tuple[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = []
    tasks: list[asyncio.Future[None]] = []
    broker, pki = int(spec["broker_pid"]), Path(spec["pki"])
    for step in spec["steps"]:
        c0, t0, done = cpu_s(broker), time.monotonic(), len(conns)
        for i in range(done, step, 200):  # 200 handshakes in flight
            cns = [f"probe-{j:05d}" for j in range(i, min(step, i + 200))]
            got = await asyncio.gather(*(_agent(cn, pki, spec["host"], spec["port"])
                                         for cn in cns), return_exceptions=True)
            for cn, g in zip(cns, got, strict=True):
                if not isinstance(g, BaseException):
                    conns.append((cn, g))
                    tasks.append(asyncio.ensure_future(_keepalive(cn, g[1])))
            if failed := [g for g in got if isinstance(g, BaseException)]:
                print(json.dumps({"step": step, "connected": len(conns),
                                  "error": f"{type(failed[0]).__name__}: {failed[0]}"}),
                      flush=True)
                return
        connect_s, connect_cpu = time.monotonic() - t0, cpu_s(broker) - c0
        rss, c1 = status_kib(broker, "VmRSS"), cpu_s(broker)
        await asyncio.sleep(spec["idle_seconds"])
        print(json.dumps({"step": step, "new": step - done, "connect_s": connect_s,
                          "connect_cpu_s": connect_cpu, "rss_kib": rss,
                          "idle_cpu_s": cpu_s(broker) - c1, "idle_s": spec["idle_seconds"]}),
              flush=True)
    if spec["rate_seconds"]:
        print(json.dumps(await _rate(spec, conns)), flush=True)


def probe(args: argparse.Namespace, steps: list[int]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fleet-conn-", dir=args.dir))
    broker: BenchBroker | None = None
    child: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, Any]] = []
    try:
        pki, _ = fleet_pki(work / "pki", 0)
        progress(f"issuing {max(steps)} client certificates")
        for cn in [*(f"probe-{j:05d}" for j in range(max(steps))), "cloud-controller"]:
            issue_client(pki, cn)
        broker = BenchBroker(pki, work / "broker", 0)  # the production ACL: CN = node name
        broker.start()
        empty = status_kib(broker.pid or 0, "VmRSS")
        spec = {"broker_pid": broker.pid, "pki": str(pki.dir), "host": broker.host,
                "port": broker.port, "steps": sorted(steps), "idle_seconds": args.idle_seconds,
                "rate_seconds": args.rate_seconds}
        (work / "probe.json").write_text(json.dumps(spec))
        child = subprocess.Popen([sys.executable, __file__, "--probe-child",
                                  str(work / "probe.json")], stdout=subprocess.PIPE)
        for _ in [*steps, *([0] if args.rate_seconds else [])]:
            rows.append(json.loads(line := wait_line(child, 900 + args.idle_seconds, "probe")))
            progress(f"  {line}")
            if "rate" in rows[-1]:  # more than max_queued_messages waiting: dropped
                rows[-1]["drop_lines"] = len(re.findall(r"(?i)dropp", broker.log_tail(10**6)))
            if "error" in rows[-1]:
                # Out of descriptors, mosquitto 2.0 logs "denied access by tcpd".
                rows[-1]["broker_log"] = [ln for ln in broker.log_tail(400).splitlines()
                                          if re.search(r"(?i)files|denied|error", ln)][-3:]
                break
        return {"broker_rss_kib_empty": empty, "file_limit": raise_file_limit(), "steps": rows,
                "table": probe_table(empty, rows)}
    finally:
        stop(child, signal.SIGKILL)
        if broker is not None:
            broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def probe_table(empty: int, rows: list[dict[str, Any]]) -> str:
    lines = _md(("connections", "connects/s", "broker CPU ms/connect", "broker RSS MiB",
                 "KiB/connection", "broker CPU % idle", "idle CPU µs/s a connection"),
                [(str(r["step"]), f"{r['new'] / r['connect_s']:.0f}",
                  f"{1000 * r['connect_cpu_s'] / r['new']:.2f}", f"{r['rss_kib'] / 1024:.0f}",
                  f"{(r['rss_kib'] - empty) / r['step']:.1f}",
                  f"{100 * r['idle_cpu_s'] / r['idle_s']:.1f}",
                  f"{1e6 * r['idle_cpu_s'] / r['idle_s'] / r['step']:.2f}")
                 for r in rows if "step" in r and "error" not in r])
    lines += [f"\n{r['publishers']} of the {r['connections']} agents publishing QoS 1 reports "
              f"({RATE_WINDOW} in flight each) to one subscriber (as the controller), "
              f"{r['seconds']:.0f} s: {r['published_per_s']:.0f} published/s, "
              f"{r['delivered_per_s']:.0f} delivered/s, broker CPU {r['broker_cpu_pct']:.0f} %, "
              f"{r['drop_lines']} 'dropped' line(s) in the broker's log"
              for r in rows if "rate" in r]
    return "\n".join(lines + [f"\nstep {r['step']}: {r['error']} after {r['connected']} "
                              f"connections; broker log: {r.get('broker_log')}"
                              for r in rows if "error" in r])


def no_nan(value: Any) -> Any:
    """NaN (a figure that does not apply, such as refills when N <= C) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return {k: no_nan(v) for k, v in value.items()} if isinstance(value, dict) else value


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000, help="simulated nodes (N)")
    ap.add_argument("--concurrency", type=int, default=100, help="the job's concurrency (C)")
    ap.add_argument("--install-seconds", type=float, default=2.0,
                    help="how long the stand-in keadm takes")
    ap.add_argument("--matrix", action="store_true",
                    help="the issue's runs: N=1000 C=100, 1000/1000, 10000/1000, 10000/100")
    ap.add_argument("--gateways", type=int, default=0,
                    help="the fleet's MQTT connections (default one per 500 nodes, up to 32)")
    ap.add_argument("--timeout", type=float, default=0,
                    help="seconds the controller may take (default 4 x ideal + N/20, >= 300)")
    ap.add_argument("--connections", default="",
                    help="instead, the connection probe's steps, e.g. 1000,5000,10000")
    ap.add_argument("--idle-seconds", type=float, default=35,
                    help="connection probe: idle window at each step (a keepalive and more)")
    ap.add_argument("--rate-seconds", type=float, default=15,
                    help="connection probe: then publish at full speed for this long (0: no)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the controller and fleet process 0 (raw stacks, kept)")
    ap.add_argument("--dir", default="/var/tmp", help="broker data, controller store, PKI")
    ap.add_argument("--shm", default="/dev/shm", help="the nodes' state directories (tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--probe-child"]:  # the connection probe's own process
        raise_file_limit()
        asyncio.run(_probe_child(json.loads(Path(raw[1]).read_text())))
        return 0
    args = parse_args(raw)
    progress(f"{machine()}; file descriptor limit {raise_file_limit()}")
    if args.connections:
        result = probe(args, [int(m) for m in args.connections.split(",")])
        print(json.dumps(result, indent=2) if args.json else result["table"])
        return 0
    runs = []
    for nodes, concurrency in MATRIX if args.matrix else ((args.nodes, args.concurrency),):
        runs.append(r := run_one(args, nodes, concurrency))
        progress(f"  rollout {r.rollout_s:.1f}s, ideal {r.ideal_s:g}s, ratio {r.ratio:.2f}x, "
                 f"{r.successful}/{r.nodes} Successful")
    print(json.dumps(no_nan([asdict(r) for r in runs]), indent=2) if args.json else table(runs))
    return 0 if all(r.successful == r.nodes for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
