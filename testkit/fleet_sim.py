"""A fleet of lightweight edge agents in one process, for bench/fleet.py.

Each simulated node is the agent minus its process: a real ``Daemon`` (intake,
worker, the runner with every real step, reporter) over its own SQLite
journal, with ``FakeImages`` holding the v1.13.0 package. Stood in, as cheaply
as the real steps allow:

- **edgecore** (``SimService``): one sleeping ``/bin/sh <script>`` per version
  for the whole fleet; a node's service runs whatever binary is on its disk
  at (re)start, so the runner's own checks hold: the running program's sha256
  (``/proc/<MainPID>``: the script) is the staged edgecore's, and the start
  log says the target version.
- **keadm**: the package's keadm is ``sh`` that writes the new edgecore into
  place and ``exec sleep <install seconds>``; the runner starts it as any
  keadm (own session, deadline, log). It stands in for keadm's duration only,
  not its CLI (it ignores its argv, keeps no backup or lock file): the tests'
  stand-ins in ``testkit/standins``, held against the real binaries by
  ``tests/test_standins.py``, are the ones that imitate keadm.
- **the connection**: a few shared MQTT v5 connections with mutual TLS
  ("gateways", CN ``fleet-gw-<i>``, granted every node's topics by the bench
  ACL). A node's commands come on its own ``cmd`` topic (one subscription per
  node) and are acked after the journal commit; its reports and retained
  presence go to its own topics at QoS 1, each awaiting its PUBACK, as
  ``MqttTransport`` does. Not simulated: a TCP/TLS connection, keepalive and
  will per node (bench/fleet.py ``--connections`` measures those).

``python -m testkit.fleet_sim SPEC.json`` runs one shard (nodes
``shard::shards`` of the fleet): it prints ``ready`` once every node's
presence is at the broker, runs until SIGTERM, then writes ``finish()``'s
stats to ``SPEC["stats"]``; ``merge`` joins the shards' stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.adapters.images import EDGECORE, KEADM
from agent.config import parse_config
from agent.daemon import Daemon
from agent.errors import AgentError, TransientError
from agent.intake import Parser
from agent.logs import setup_logging
from agent.node import build_node
from agent.tls import TlsFiles, client_context
from agent.transport.acks import PublishAcks
from agent.transport.base import Inbound, Presence
from agent.transport.mqtt import DeliveryRefused
from testkit.broker import Broker
from testkit.fakes import FakeImages, FakeService
from testkit.pki import Pki, issue_client, make_pki

OLD, NEW = "v1.12.1", "v1.13.0"
IMAGE_REPO = "kubeedge/installation-package"
PREFIX = "kubeedge/nodes"
GATEWAY_CN = "fleet-gw-{}"
LABEL = {"fleet": "bench"}
CONNECT_TIMEOUT_S = 60.0
PUBACK_TIMEOUT_S = 60.0
BATCH = 500  # topics per SUBSCRIBE; presence publishes in flight at start-up


def edgecore_script(version: str) -> bytes:
    return (f"#!/bin/sh\n# edgecore {version} stand-in (testkit/fleet_sim.py)\n"
            "while :; do sleep 3600; done\n").encode()


def keadm_script(version: str, install_seconds: float) -> bytes:
    # printf is a shell builtin: sleep is the only other program an install runs.
    body = edgecore_script(version).decode().replace("\n", "\\n")
    return (f"#!/bin/sh\n# keadm stand-in: installs edgecore {version}, takes "
            f"{install_seconds:g}s\nprintf '{body}' > \"$EDGE_UPGRADE_ROOT/usr/local/bin/"
            f"edgecore\" || exit 1\nexec sleep {install_seconds:g}\n").encode()


class StandIns:
    """One long-running ``/bin/sh <script>`` per edgecore version, shared by all nodes."""

    def __init__(self, directory: Path, versions: tuple[str, ...] = (OLD, NEW)) -> None:
        self.procs: dict[bytes, tuple[subprocess.Popen[bytes], str]] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for version in versions:
            script = directory / f"edgecore-{version}"
            script.write_bytes(edgecore_script(version))
            proc = subprocess.Popen(["/bin/sh", str(script)], stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            self.procs[edgecore_script(version)] = (proc, version)

    def lookup(self, binary: bytes) -> tuple[int, str] | None:
        found = self.procs.get(binary)
        return (found[0].pid, found[1]) if found else None

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class SimService(FakeService):
    """A service whose (re)start runs the edgecore on the node's disk: its stand-in."""

    _invocations = itertools.count(1)

    def __init__(self, binary: Path, standins: StandIns) -> None:
        self.binary, self.standins = binary, standins
        super().__init__(None)

    def _spawn(self) -> None:
        found = self.standins.lookup(self.binary.read_bytes())
        if found is None:  # an unknown binary fails at start, as a broken one would
            self.active, self.main_pid, self.version, self.invocation = False, 0, None, ""
            return
        self.active, (self.main_pid, self.version) = True, found
        self.invocation = f"{next(self._invocations):032x}"


class Counters:
    """Messages through the fleet. Times are time.time(), the clock of the controller's
    store, so that its dispatch and final times line up with ours."""

    def __init__(self) -> None:
        self.commands = self.reports = self.presence = 0
        self.per_second: Counter[int] = Counter()

    def tick(self) -> float:
        now = time.time()
        self.per_second[int(now)] += 1
        return now


class NodeLink:
    """The Transport of one node, over a shared gateway connection."""

    def __init__(self, gateway: Gateway, node: str, presence: Presence) -> None:
        self.gateway, self.presence, self.node = gateway, presence, node
        self.cmd_topic, self.status_topic, self.presence_topic = (
            f"{PREFIX}/{node}/upgrade/{leaf}" for leaf in ("cmd", "status", "presence"))
        self.inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        # The job as the agent sees it: first command in, final report handed to MQTT.
        self.command_at: float | None = None
        self.final_at: float | None = None

    async def commands(self) -> AsyncIterator[Inbound]:
        while True:
            yield await self.inbox.get()

    async def publish(self, report: dict[str, Any]) -> None:
        sent = time.time()
        await self.gateway.publish(self.status_topic, report, retain=False)
        self.gateway.counters.tick()
        self.gateway.counters.reports += 1
        if report.get("final"):
            self.final_at = sent

    async def run(self) -> None:
        await asyncio.Event().wait()  # the gateway keeps the connection

    async def update_presence(self) -> None:
        try:
            await self.gateway.publish(self.presence_topic, await self.presence(), retain=True)
        except AgentError:
            return  # best effort, as MqttTransport's
        self.gateway.counters.tick()
        self.gateway.counters.presence += 1


class Gateway:
    """One MQTT connection carrying the commands, reports and presence of many nodes."""

    def __init__(self, ident: str, files: TlsFiles, host: str, port: int,
                 counters: Counters) -> None:
        self.ident, self.files, self.host, self.port = ident, files, host, port
        self.counters = counters
        self.links: dict[str, NodeLink] = {}
        self.connected = asyncio.Event()
        self.connections = 0
        self._client: aiomqtt.Client | None = None
        self._acks = PublishAcks()

    async def run(self) -> None:
        ctx = client_context(self.files)
        while True:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600  # a reconnect gets unacked commands again
            client = aiomqtt.Client(self.host, self.port, identifier=self.ident,
                                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                                    properties=props, tls_context=ctx, keepalive=30, timeout=30)
            client._client.manual_ack_set(True)  # acked after the journal commit, as the agent
            self._acks.watch(client)
            try:
                async with client:
                    topics = [(link.cmd_topic, 1) for link in self.links.values()]
                    for i in range(0, len(topics), BATCH):
                        await client.subscribe(topics[i:i + BATCH])
                    self._client = client
                    self.connections += 1
                    self.connected.set()
                    await self._read(client)
            except aiomqtt.MqttError as exc:
                print(f"{self.ident}: connection lost: {exc}", file=sys.stderr, flush=True)
            finally:
                self._client = None
                self.connected.clear()
                self._acks.fail_all()
            await asyncio.sleep(1)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            link = self.links.get(str(message.topic).split("/")[2])
            if link is None:
                continue
            payload = message.payload if isinstance(message.payload, bytes) else \
                str(message.payload).encode()
            now = self.counters.tick()
            self.counters.commands += 1
            link.command_at = link.command_at or now

            async def ack(mid: int = message.mid, qos: int = message.qos) -> None:
                if qos > 0 and client is self._client:
                    client._client.ack(mid, qos)

            link.inbox.put_nowait(Inbound(f"mqtt:{message.topic}", payload, ack))

    async def publish(self, topic: str, body: dict[str, Any], *, retain: bool) -> None:
        client = self._client
        if client is None:
            raise TransientError("not connected to the broker")
        code = await self._acks.publish(client, topic, json.dumps(body, sort_keys=True).encode(),
                                        retain=retain, timeout=PUBACK_TIMEOUT_S)
        if code >= 0x80:
            raise DeliveryRefused(f"broker refused publish to {topic} (reason code {code})")


class Sim:
    """One shard of the fleet. ``spec``: root, nodes, install_seconds, host, port, ca,
    gateways ([[cn, cert, key], ...]), shard and shards (default 0 and 1)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.root = Path(spec["root"])
        self.counters = Counters()
        self.standins = StandIns(self.root / f"standins-{spec.get('shard', 0)}")
        self.images = FakeImages()
        self.images.add(f"{IMAGE_REPO}:{NEW}", {
            KEADM: keadm_script(NEW, float(spec["install_seconds"])),
            EDGECORE: edgecore_script(NEW)})
        ca = Path(spec["ca"])
        self.gateways = [Gateway(cn, TlsFiles(ca, Path(c), Path(k)), spec["host"],
                                 int(spec["port"]), self.counters)
                         for cn, c, k in spec["gateways"]]
        self.daemons: list[Daemon] = []
        self.tasks: list[asyncio.Task[None]] = []

    def build(self) -> None:
        """Every node: config, its edgecore binary and config, a real journal, a Daemon."""
        base = parse_config({
            "node_name": "fleet-00000", "labels": LABEL, "paths": {"root": str(self.root)},
            "service": {"manager": "process"},
            # No grace period: the job is to take the install time, and nothing else.
            "health": {"grace_seconds": 0, "start_timeout_seconds": 5,
                       "poll_interval_seconds": 0.05},
            "precheck": {"reserve_bytes": 0}})
        names = node_names(int(self.spec["nodes"]))
        for i, name in enumerate(names[self.spec.get("shard", 0)::self.spec.get("shards", 1)]):
            config = replace(base, node_name=name).with_root(self.root / "nodes" / name)
            binary = config.paths.node(config.paths.edgecore_binary)
            binary.parent.mkdir(parents=True)
            binary.write_bytes(edgecore_script(OLD))
            edgecore_yaml = config.paths.node(config.paths.edgecore_config)
            edgecore_yaml.parent.mkdir(parents=True, exist_ok=True)
            edgecore_yaml.write_bytes(b"database:\n  dataSource: /var/lib/kubeedge/edgecore.db\n")
            node = build_node(config, images=self.images,
                              service=SimService(binary, self.standins))
            daemon = Daemon(node, Parser(config))
            gateway = self.gateways[i % len(self.gateways)]
            daemon.transport = gateway.links[name] = NodeLink(gateway, name, daemon.presence)
            daemon.recover()
            self.daemons.append(daemon)

    async def start(self) -> None:
        self.tasks += [asyncio.create_task(gw.run()) for gw in self.gateways]
        for gw in self.gateways:
            await asyncio.wait_for(gw.connected.wait(), CONNECT_TIMEOUT_S)
        for d in self.daemons:
            self.tasks += [asyncio.create_task(d.take_commands()),
                           asyncio.create_task(d.worker()), asyncio.create_task(d.reporter())]
        for i in range(0, len(self.daemons), BATCH):  # the retained presence, as at start
            await asyncio.gather(*(d.link.update_presence() for d in self.daemons[i:i + BATCH]))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)

    def finish(self) -> dict[str, Any]:
        """Close every node and say what happened: the counters, and from the journals
        each job's state and span (received to final commit, on the agent's clock)."""
        states: Counter[str] = Counter()
        spans: list[tuple[float, float]] = []
        for d in self.daemons:
            for state, created, updated in d.node.journal.db.execute(
                    "SELECT state, created_at, updated_at FROM jobs"):
                states[str(state)] += 1
                spans.append((float(created), float(updated)))
            d.node.close()
        self.standins.stop()
        links = [link for gw in self.gateways for link in gw.links.values()]
        c = self.counters
        return {
            "nodes": len(self.daemons), "states": dict(states), "spans": spans,
            "commands": c.commands, "reports": c.reports, "presence": c.presence,
            "per_second": {str(k): v for k, v in c.per_second.items()},
            "per_node": {x.node: [x.command_at, x.final_at] for x in links},
            "gateway_connections": sum(g.connections for g in self.gateways),
            "gc_s": _GC.seconds, "gc_by_gen": _GC.by_gen,
        }


class _GcClock:
    """Seconds spent in the cyclic garbage collector (gc.callbacks), once ready."""

    def __init__(self) -> None:
        self._start = 0.0
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.by_gen: list[list[float]] = [[0, 0.0, 0], [0, 0.0, 0], [0, 0.0, 0]]  # n, s, freed

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            took = time.perf_counter() - self._start
            self.seconds += took
            g = self.by_gen[info["generation"]]
            g[0] += 1
            g[1] += took
            g[2] += info["collected"]


_GC = _GcClock()


def node_names(count: int) -> list[str]:
    return [f"fleet-{i:05d}" for i in range(count)]


def max_overlap(spans: list[tuple[float, float]] | list[list[float]]) -> int:
    """The most spans open at one instant."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' stats as one fleet's."""
    states: Counter[str] = Counter()
    per_second: Counter[str] = Counter()
    for p in parts:
        states.update(p["states"])
        per_second.update(p["per_second"])
    out: dict[str, Any] = {k: sum(p.get(k, 0) for p in parts) for k in (
        "nodes", "commands", "reports", "presence", "gateway_connections", "gc_s")}
    out["per_node"] = {k: v for p in parts for k, v in p["per_node"].items()}
    out["spans"] = [x for p in parts for x in p["spans"]]
    first = min((c for c, _ in out["per_node"].values() if c is not None), default=None)
    out.update(states=dict(states), max_in_flight=max_overlap(out["spans"]), first_command=first,
               last_final=max((f for _, f in out["per_node"].values() if f is not None),
                              default=None),
               # From the first command's second on: not the presence burst at start-up.
               peak_messages_per_s=max((v for k, v in per_second.items()
                                        if first is not None and int(k) >= int(first)),
                                       default=0))
    return out


class BenchBroker(Broker):
    """The production config and ACL, plus grants for the gateways' CNs; also as in
    production (testkit's Broker turns both up for tests): the log levels (``log_type
    all`` writes a line per PUBLISH) and the 30 s autosave (each save rewrites every
    session and retained presence)."""

    def __init__(self, pki: Pki, workdir: Path, gateways: int) -> None:
        super().__init__(pki, workdir)
        self.gateways = gateways

    def _overrides(self) -> dict[str, Callable[[list[str]], str | None]]:
        out = super()._overrides()
        out["autosave_interval"] = " ".join
        return out

    def render_config(self) -> str:
        levels = ("error", "warning", "notice", "information")
        return super().render_config().replace(
            "log_type all\n", "".join(f"log_type {t}\n" for t in levels))

    def render_acl(self) -> str:
        grants = "".join(
            f"\nuser {GATEWAY_CN.format(i)}\ntopic read {PREFIX}/+/upgrade/cmd\n"
            f"topic write {PREFIX}/+/upgrade/status\n"
            f"topic readwrite {PREFIX}/+/upgrade/presence\n" for i in range(self.gateways))
        return f"{super().render_acl()}\n# bench/fleet.py: the simulated fleet's gateways{grants}"


def fleet_pki(directory: Path, gateways: int) -> tuple[Pki, list[list[str]]]:
    """A throw-away CA and the gateways' identities ([[cn, cert, key], ...])."""
    pki = make_pki(directory, ())
    cns = [GATEWAY_CN.format(i) for i in range(gateways)]
    return pki, [[cn, *map(str, issue_client(pki, cn))] for cn in cns]


def write_manifest(path: Path, name: str, *, concurrency: int, timeout_seconds: int) -> Path:
    """A v1alpha2 job selecting the whole fleet by label. failureTolerate 1: a failed
    node must not stop the dispatch of the others (the bench counts failures itself)."""
    doc = {"apiVersion": "operations.kubeedge.io/v1alpha2", "kind": "NodeUpgradeJob",
           "metadata": {"name": name},
           "spec": {"version": NEW, "image": IMAGE_REPO, "concurrency": concurrency,
                    "timeoutSeconds": timeout_seconds, "failureTolerate": "1",
                    "labelSelector": {"matchLabels": LABEL}}}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


async def _amain(spec: dict[str, Any]) -> None:
    sim = Sim(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        started = time.monotonic()
        sim.build()
        built = time.monotonic()
        await sim.start()
        # Thousands of agents' heaps in one process, where a real node has one: the
        # collector's full passes walked all of them (16 % of the CPU at 5,000 nodes,
        # 0.14 s a pass at 2,000). What exists now lives until the end (freeze), and
        # full passes wait for a million young passes: the jobs' state lasts as long
        # as the fleet, and the young passes collect the jobs' garbage.
        gc.freeze()
        gc.set_threshold(700, 10, 1_000_000)
        _GC.reset()  # from here on: the rollout's
        print(f"ready: {len(sim.daemons)} nodes, build {built - started:.1f}s, "
              f"connect and presence {time.monotonic() - built:.1f}s", flush=True)
        await stop.wait()
        await sim.stop()
    finally:
        Path(spec["stats"]).write_text(json.dumps(sim.finish()))


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((sys.argv[1:] if argv is None else argv)[0]).read_text())
    # Three descriptors a journal (db, -wal, -shm): as many as the hard limit allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Thousands of agents log what one would: warnings and errors only, on stderr.
    setup_logging("warning", json_output=True)
    # A pidfd per running installer, not a thread blocked in waitpid each (3.11's default).
    with contextlib.suppress(AttributeError):  # gone in 3.14, where pidfds are the default
        asyncio.get_event_loop_policy().set_child_watcher(asyncio.PidfdChildWatcher())
    gc.callbacks.append(_GC)
    asyncio.run(_amain(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
