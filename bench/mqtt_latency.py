"""Benchmark: the daemon's command-to-report latency over MQTT, and its idle cost.

Run from the repository root::

    python bench/mqtt_latency.py [--count 1000] [--skips 50] [--idle-seconds 60] [--json]

Everything runs on loopback in a temporary directory under ``--dir`` (default
``/var/tmp``): a throw-away PKI (``testkit/pki.py``), a real Mosquitto 2.0 with
mutual TLS and the production ACL (``testkit/broker.py``), a sandboxed node with
the stand-in edgecore v1.12.1 running and a v1.13.0 package
(``testkit/standins``), and the daemon, ``python -m agent --config <cfg> run``
with ``transport.kind: mqtt`` (production MQTT defaults otherwise).

Latency, one command in flight at a time (closed loop), timed with
``time.perf_counter`` in the controller's paho client (CN ``cloud-controller``,
QoS 1) from just before ``publish()`` to the arrival of the job's first status
report on ``kubeedge/nodes/node-1/upgrade/status``:

* ``--count`` dry-run commands (``{"jobName": "lat-000123", "version":
  "v1.13.0", "dryRun": true}``): each produces exactly one report, the
  rehearsal (final, ``rehearsal: true``), sent once the daemon has planned the
  upgrade (version detection, image inspection, prechecks) and journalled it.
* ``--skips`` real upgrade commands whose target is the node's current version
  (v1.12.1): timed to the ``received`` report (the command journalled, before
  any step ran) and, separately, to the final ``skipped`` report; the next
  command is sent only after the final report, so jobs never queue. The lag
  from the daemon's log line for the ``skipped`` commit to the report's arrival
  is printed too (same wall clock).
* Baseline, same client, same payload size, same count: the broker round trip
  alone, controller publish to ``kubeedge/nodes/node-2/upgrade/cmd`` until a
  second paho client (CN ``node-2``, subscribed to that topic) receives it.
  The ratios agent/baseline are printed for p50 and p99.
* ``--burst`` (default 100, 0 to skip) dry-run commands published back to back:
  time from the first publish to the last report, i.e. throughput with a queue.

The benchmark's own two paho clients set ``TCP_NODELAY`` (as Go's net package,
and so a Go controller, does by default), so that they add no Nagle delay of
their own; the broker and the daemon run as configured. Two diagnostic flags
change that: ``--broker-nodelay`` adds ``set_tcp_nodelay true`` to the broker's
configuration and ``--agent-nodelay`` starts the daemon through a shim that sets
``TCP_NODELAY`` on its MQTT socket (the agent has no such option).

Version detection never executes edgecore (no KubeEdge release has a version
flag; ``edgecore --version`` starts a second edgecore): the daemon reads the
klog ``Version:`` line that the running stand-in edgecore logged first, with its
pid, in ``<root>/var/log/edgecore.log``. So the stand-in runs throughout, as a
real edgecore would, and nothing is executed per command to learn the version.

Idle cost (``--idle-seconds``, default 60): after the latency runs and a
settling pause, VmRSS (``/proc/<pid>/status``) and utime+stime
(``/proc/<pid>/stat``) of the connected daemon are sampled at the start and the
end of the window. Baselines over the same window: ``python -c "import time;
time.sleep(...)"`` and a connected paho client process (CN ``idle-probe``,
``loop_forever``, keepalive 30 s like the daemon).

Context figure, to attribute the latency: the median time of one SQLite commit
with WAL and ``synchronous=FULL`` in the same directory
(the journal's settings). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testkit.broker import Broker  # noqa: E402
from testkit.pki import make_pki  # noqa: E402
from testkit.standins import (  # noqa: E402
    make_image_dir,
    make_node,
    sandbox_settings,
    start_edgecore,
    stop_edgecore,
)

NODE = "node-1"
ECHO = "node-2"
IDLE_PROBE = "idle-probe"
CONTROLLER = "cloud-controller"
FROM_VERSION = "v1.12.1"
TO_VERSION = "v1.13.0"
REPO_IMAGE = "kubeedge/installation-package"
CONNECT_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Runs the daemon like `python -m agent`, with TCP_NODELAY on paho's sockets.
AGENT_NODELAY_SHIM = """
import socket, sys
import paho.mqtt.client as _paho
_create = _paho.Client._create_socket_connection
def _nodelay(self):
    sock = _create(self)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
_paho.Client._create_socket_connection = _nodelay
from agent.cli import main
sys.exit(main())
"""

PAHO_IDLE = """
import pathlib, ssl, sys
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key, topic, ready = sys.argv[1:]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="idle-probe", protocol=paho.MQTTv5)
c.tls_set_context(ctx)
c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
c.on_subscribe = lambda *a: pathlib.Path(ready).touch()
c.connect("127.0.0.1", int(port), keepalive=30)
c.loop_forever()
"""


def topic(node: str, leaf: str) -> str:
    return f"kubeedge/nodes/{node}/upgrade/{leaf}"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- statistics ----------------------------------------------------------------


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(p / 100 * len(sorted_xs)))
    return sorted_xs[rank - 1]


def summary(latencies: Sequence[float], elapsed: float) -> dict[str, float]:
    xs = sorted(latencies)
    return {
        "n": len(xs),
        "p50_ms": percentile(xs, 50) * 1e3,
        "p90_ms": percentile(xs, 90) * 1e3,
        "p99_ms": percentile(xs, 99) * 1e3,
        "max_ms": xs[-1] * 1e3,
        "mean_ms": statistics.fmean(xs) * 1e3,
        "over_1s": sum(x > 1 for x in xs),
        "elapsed_s": elapsed,
        "per_s": len(xs) / elapsed if elapsed > 0 else 0.0,
    }


def fmt(s: dict[str, float]) -> str:
    return (f"p50 {s['p50_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
            f"max {s['max_ms']:.2f} ms  ({s['per_s']:.1f}/s, n={s['n']:.0f})")


# -- MQTT clients ----------------------------------------------------------------


Message = tuple[float, float, dict[str, Any]]  # perf_counter, wall clock, body


class Inbox:
    """Messages received by one paho client, keyed by job, in arrival order."""

    def __init__(self, key_of: Callable[[str, dict[str, Any]], str | None]) -> None:
        self.key_of = key_of
        self.cond = threading.Condition()
        self.by_key: dict[str, list[Message]] = {}
        self.presence: list[dict[str, Any]] = []

    def on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        arrived, wall = time.perf_counter(), time.time()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self.cond:
            if msg.topic.endswith("/presence"):
                self.presence.append(body)
            else:
                key = self.key_of(msg.topic, body)
                if key is not None:
                    self.by_key.setdefault(key, []).append((arrived, wall, body))
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}")

    def first(self, key: str) -> Message:
        with self.cond:
            return self.by_key[key][0]

    def wait_for_key(self, key: str, timeout: float,
                     pred: Callable[[dict[str, Any]], bool] = lambda _: True) -> Message:
        def found() -> Message | None:
            return next((m for m in self.by_key.get(key, []) if pred(m[2])), None)

        self.wait(lambda: found() is not None, timeout, f"a message for {key}")
        with self.cond:
            message = found()
        assert message is not None
        return message


def connect(broker: Broker, cn: str, subscriptions: list[str], inbox: Inbox) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cn, protocol=paho.MQTTv5)
    client.tls_set_context(broker.client_tls(cn))
    subscribed = threading.Event()

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe([(t, 1) for t in subscriptions])

    def on_subscribe(*_: Any) -> None:
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = inbox.on_message
    client.connect(broker.host, broker.port, keepalive=30)
    sock = client.socket()
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket here
        # Our clients must not add a Nagle delay of their own (Go sets NODELAY by default).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not subscribed.wait(CONNECT_TIMEOUT):
        client.loop_stop()
        raise BenchError(f"paho client {cn} not connected and subscribed in time")
    return client


def close(client: paho.Client | None) -> None:
    if client is not None:
        client.disconnect()
        client.loop_stop()


class NoDelayBroker(Broker):
    """The test broker plus ``set_tcp_nodelay true`` (a diagnostic, not the sample config)."""

    def render_config(self) -> str:
        return super().render_config() + "set_tcp_nodelay true\n"


# -- processes -----------------------------------------------------------------


@dataclass
class ProcSample:
    rss_kib: int
    cpu_ticks: int  # utime + stime, all threads
    child_ticks: int  # cutime + cstime (children waited for)
    voluntary_switches: int  # summed over the threads alive now


def sample(pid: int) -> ProcSample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # Fields after the comm: [0] is field 3 (state), so utime (field 14) is [11].
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except OSError:
            continue
    return ProcSample(rss, utime + stime, cutime + cstime, switches)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


@dataclass
class Setup:
    work: Path
    root: Path
    broker: Broker
    agent_log: Path
    config: Path
    agent: subprocess.Popen[bytes] | None = None
    controller: paho.Client | None = None
    echo: paho.Client | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def agent_log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def write_agent_config(work: Path, root: Path, broker: Broker) -> Path:
    cert, key = broker.pki.client(NODE)
    settings = sandbox_settings(root, NODE)
    # Production MQTT defaults (keepalive 30 s, certificate check every 10 s)
    # but for where the broker and the files are.
    settings["transport"] = {"kind": "mqtt", "mqtt": {
        "host": broker.host, "port": broker.port, "ca_file": str(broker.pki.ca_cert),
        "cert_file": str(cert), "key_file": str(key)}}
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def start_agent(s: Setup, *, nodelay: bool) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.pop("EDGE_UPGRADE_AGENT_FAULT", None)
    head = ["-c", AGENT_NODELAY_SHIM] if nodelay else ["-m", "agent"]
    with s.agent_log.open("ab") as log:
        s.agent = subprocess.Popen(
            [sys.executable, *head, "--config", str(s.config), "run"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def wait_online(s: Setup, inbox: Inbox) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        with inbox.cond:
            if any(p.get("online") and p.get("nodeName") == NODE for p in inbox.presence):
                return
        check_agent(s)
        if time.monotonic() > deadline:
            raise BenchError(f"daemon not online within {CONNECT_TIMEOUT:g} s")
        time.sleep(0.05)


def check_agent(s: Setup) -> None:
    if s.agent is None or s.agent.poll() is not None:
        code = None if s.agent is None else s.agent.returncode
        raise BenchError(f"daemon is not running (exit code {code})")


def job_state_times(log: Path, state: str) -> dict[str, float]:
    """job -> wall-clock time of the daemon's "job state" log line for ``state``."""
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if event.get("event") == "job state" and event.get("state") == state:
            stamp = str(event["timestamp"]).replace("Z", "+00:00")
            out[str(event["job"])] = dt.datetime.fromisoformat(stamp).timestamp()
    return out


# -- latency phases --------------------------------------------------------------


def command(job: str, version: str, *, dry_run: bool) -> bytes:
    body: dict[str, Any] = {"jobName": job, "version": version}
    if dry_run:
        body["dryRun"] = True
    return json.dumps(body).encode()


def run_baseline(s: Setup, echo_inbox: Inbox, n: int, timeout: float, tag: str) -> list[float]:
    assert s.controller is not None
    out: list[float] = []
    for i in range(n):
        job = f"{tag}-{i:06d}"
        payload = command(job, TO_VERSION, dry_run=True)
        start = time.perf_counter()
        s.controller.publish(topic(ECHO, "cmd"), payload, qos=1)
        arrived, _, _ = echo_inbox.wait_for_key(job, timeout)
        out.append(arrived - start)
    return out


def run_dry(s: Setup, inbox: Inbox, n: int, timeout: float, tag: str, *,
            tick: int = 0) -> list[float]:
    assert s.controller is not None
    out: list[float] = []
    for i in range(n):
        job = f"{tag}-{i:06d}"
        start = time.perf_counter()
        s.controller.publish(topic(NODE, "cmd"), command(job, TO_VERSION, dry_run=True), qos=1)
        try:
            arrived, _, report = inbox.wait_for_key(job, timeout)
        except BenchError:
            check_agent(s)
            raise
        if not (report.get("rehearsal") and report.get("final")):
            raise BenchError(f"first report of {job} is not a final rehearsal: {report}")
        out.append(arrived - start)
        if tick and (i + 1) % tick == 0:
            progress(f"  {i + 1}/{n} dry runs, last {out[-1] * 1e3:.1f} ms")
    return out


@dataclass
class SkipRun:
    received: list[float] = field(default_factory=list)  # publish -> "received" report
    final: list[float] = field(default_factory=list)  # publish -> final report
    final_wall: dict[str, float] = field(default_factory=dict)  # job -> arrival (wall)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


def run_skips(s: Setup, inbox: Inbox, n: int, timeout: float) -> SkipRun:
    """Publish -> "received" and publish -> final "skipped", one job at a time."""
    assert s.controller is not None
    run = SkipRun()
    t0 = time.perf_counter()
    for i in range(n):
        job = f"skip-{i:06d}"
        start = time.perf_counter()
        s.controller.publish(topic(NODE, "cmd"), command(job, FROM_VERSION, dry_run=False),
                             qos=1)
        try:
            t_final, wall, last = inbox.wait_for_key(job, timeout, lambda b: bool(b.get("final")))
        except BenchError:
            check_agent(s)
            raise
        t_first, _, first = inbox.first(job)
        if first.get("phase") != "received" or last.get("phase") != "skipped":
            run.unexpected.append({"job": job, "first": first.get("phase"),
                                   "final": last.get("phase"), "reason": last.get("reason")})
        run.received.append(t_first - start)
        run.final.append(t_final - start)
        run.final_wall[job] = wall
    run.elapsed = time.perf_counter() - t0
    return run


def run_burst(s: Setup, inbox: Inbox, n: int, timeout: float) -> tuple[list[float], float]:
    assert s.controller is not None
    starts: dict[str, float] = {}
    first = time.perf_counter()
    for i in range(n):
        job = f"burst-{i:06d}"
        starts[job] = time.perf_counter()
        s.controller.publish(topic(NODE, "cmd"), command(job, TO_VERSION, dry_run=True), qos=1)
    try:
        inbox.wait(lambda: all(j in inbox.by_key for j in starts), timeout,
                   f"the reports of {n} burst commands")
    except BenchError:
        check_agent(s)
        raise
    arrivals = {j: inbox.first(j)[0] for j in starts}
    return [arrivals[j] - t for j, t in starts.items()], max(arrivals.values()) - first


# -- context measurements --------------------------------------------------------


def time_sqlite_commits(directory: Path, rounds: int) -> list[float]:
    db = sqlite3.connect(directory / "commit-probe.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, payload TEXT)")
        out: list[float] = []
        for i in range(rounds):
            start = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t(id, payload) VALUES(?, ?)", (i, "x" * 1500))
            db.execute("COMMIT")
            out.append(time.perf_counter() - start)
        return out
    finally:
        db.close()


# -- idle --------------------------------------------------------------------


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready within {timeout:g} s")
        time.sleep(0.05)


def run_idle(s: Setup, seconds: float, settle: float, baselines: bool) -> dict[str, Any]:
    assert s.agent is not None
    procs: dict[str, int] = {"daemon": s.agent.pid}
    if baselines:
        sleeper = subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep({seconds + settle + 30:g})"],
            stdin=subprocess.DEVNULL)
        s.extra.append(sleeper)
        procs["python sleep"] = sleeper.pid
        cert, key = s.broker.pki.client(IDLE_PROBE)
        ready = s.work / "idle-probe.ready"
        client = subprocess.Popen(
            [sys.executable, "-c", PAHO_IDLE, str(s.broker.port), str(s.broker.pki.ca_cert),
             str(cert), str(key), topic(IDLE_PROBE, "cmd"), str(ready)],
            cwd=REPO, stdin=subprocess.DEVNULL)
        s.extra.append(client)
        wait_file(ready, client, CONNECT_TIMEOUT, "the paho idle client")
        procs["paho client"] = client.pid
    progress(f"settling {settle:g} s, then a {seconds:g} s idle window")
    time.sleep(settle)
    check_agent(s)
    before = {name: sample(pid) for name, pid in procs.items()}
    t0 = time.monotonic()
    deadline = t0 + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 5.0))
        check_agent(s)
    wall = time.monotonic() - t0
    after = {name: sample(pid) for name, pid in procs.items()}
    rows: dict[str, Any] = {}
    for name in procs:
        b, a = before[name], after[name]
        cpu = (a.cpu_ticks - b.cpu_ticks) / CLK_TCK
        rows[name] = {
            "rss_start_mib": b.rss_kib / 1024, "rss_end_mib": a.rss_kib / 1024,
            "cpu_s": cpu, "cpu_percent": 100 * cpu / wall,
            "child_cpu_s": (a.child_ticks - b.child_ticks) / CLK_TCK,
            "wakeups_per_s": (a.voluntary_switches - b.voluntary_switches) / wall,
        }
    for proc in s.extra:
        stop_process(proc)
    s.extra.clear()
    return {"window_s": wall, "clk_tck": CLK_TCK, "processes": rows}


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=1000,
                    help="dry-run commands (and baseline round trips) to time (default 1000)")
    ap.add_argument("--skips", type=int, default=50,
                    help="real upgrade commands to the current version (skips) to time "
                         "(default 50, 0: none)")
    ap.add_argument("--burst", type=int, default=100,
                    help="dry-run commands published back to back for throughput "
                         "(default 100, 0: none)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed round trips and dry runs first (default 20)")
    ap.add_argument("--idle-seconds", type=float, default=60.0,
                    help="idle window (default 60, 0: skip)")
    ap.add_argument("--settle-seconds", type=float, default=6.0,
                    help="pause before the idle window (default 6)")
    ap.add_argument("--no-idle-baselines", action="store_true",
                    help="measure only the daemon in the idle window")
    ap.add_argument("--broker-nodelay", action="store_true",
                    help="diagnostic: set_tcp_nodelay true in the broker's configuration")
    ap.add_argument("--agent-nodelay", action="store_true",
                    help="diagnostic: start the daemon with TCP_NODELAY on its MQTT socket")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="longest wait for any one report (default 30 s)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="where the temporary work directory goes (default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    for name in ("count", "skips", "burst", "warmup"):
        if not 0 <= getattr(args, name) <= 100_000:
            ap.error(f"--{name} must be between 0 and 100000")
    if args.count < 1:
        ap.error("--count must be at least 1")
    if not 0 <= args.idle_seconds <= 3600:
        ap.error("--idle-seconds must be between 0 and 3600")
    if not 0 < args.timeout <= 600:
        ap.error("--timeout must be in (0, 600]")
    return args


def measure(args: argparse.Namespace, s: Setup, results: dict[str, Any]) -> None:
    broker, root = s.broker, s.root
    broker.start()
    start_edgecore(root)  # runs throughout: its log's Version: line is how the daemon detects it

    status = Inbox(lambda t, b: str(b["jobKey"]) if t.endswith("/status") else None)
    echo = Inbox(lambda _t, b: str(b.get("jobName")))
    s.controller = connect(broker, CONTROLLER,
                           [topic("+", "status"), topic("+", "presence")], status)
    s.echo = connect(broker, ECHO, [topic(ECHO, "cmd")], echo)

    start_agent(s, nodelay=args.agent_nodelay)
    wait_online(s, status)
    assert s.agent is not None
    results["rss_connected_mib"] = sample(s.agent.pid).rss_kib / 1024
    progress(f"daemon pid {s.agent.pid} online; warm-up ({args.warmup} of each)")
    run_baseline(s, echo, args.warmup, args.timeout, "warm-echo")
    run_dry(s, status, args.warmup, args.timeout, "warm-lat")

    progress(f"baseline: {args.count} broker round trips")
    t = time.perf_counter()
    base = run_baseline(s, echo, args.count, args.timeout, "echo")
    results["baseline"] = summary(base, time.perf_counter() - t)

    progress(f"agent: {args.count} dry-run commands")
    t = time.perf_counter()
    dry = run_dry(s, status, args.count, args.timeout, "lat", tick=max(1, args.count // 5))
    results["dry_run"] = summary(dry, time.perf_counter() - t)

    if args.skips:
        progress(f"agent: {args.skips} skip jobs")
        run = run_skips(s, status, args.skips, args.timeout)
        results["skip_received"] = summary(run.received, run.elapsed)
        results["skip_final"] = summary(run.final, run.elapsed)
        results["skip_unexpected"] = run.unexpected
        committed = job_state_times(s.agent_log, "skipped")
        lags = [wall - committed[job] for job, wall in run.final_wall.items()
                if job in committed]
        if lags:
            results["skip_commit_to_arrival"] = summary(lags, run.elapsed)

    if args.burst:
        progress(f"agent: burst of {args.burst} dry-run commands")
        lat, elapsed = run_burst(s, status, args.burst, args.timeout + args.burst)
        results["burst"] = summary(lat, elapsed)

    results["rss_after_load_mib"] = sample(s.agent.pid).rss_kib / 1024

    progress("context: SQLite commits")
    commits = sorted(time_sqlite_commits(s.work, 200))
    results["context"] = {
        "sqlite_commit_ms_median": statistics.median(commits) * 1e3,
        "sqlite_commit_ms_p99": percentile(commits, 99) * 1e3,
    }

    if args.idle_seconds > 0:
        results["idle"] = run_idle(s, args.idle_seconds, args.settle_seconds,
                                   not args.no_idle_baselines)
    check_agent(s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mqtt-latency-", dir=args.dir))
    progress(f"work directory {work}")
    results: dict[str, Any] = {"params": {k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in vars(args).items()}}
    s: Setup | None = None
    started = time.monotonic()
    try:
        pki = make_pki(work / "pki", (NODE, ECHO, IDLE_PROBE, CONTROLLER))
        broker = (NoDelayBroker if args.broker_nodelay else Broker)(pki, work / "broker")
        root = work / "root"
        make_node(root, FROM_VERSION, node_name=NODE)
        make_image_dir(root / "images", REPO_IMAGE, TO_VERSION)
        s = Setup(work, root, broker, work / "agent.log", write_agent_config(work, root, broker))
        measure(args, s, results)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if s is not None:
            print(f"--- daemon log (tail) ---\n{s.agent_log_tail()}", file=sys.stderr)
        return 1
    finally:
        if s is not None:
            for proc in s.extra:
                stop_process(proc)
            close(s.controller)
            close(s.echo)
            stop_process(s.agent)
            stop_edgecore(s.root)
            s.broker.stop()
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.monotonic() - started

    base_s = results["baseline"]
    for name in ("dry_run", "skip_received"):
        if name in results:
            results[f"ratio_{name}_p50"] = results[name]["p50_ms"] / base_s["p50_ms"]
            results[f"ratio_{name}_p99"] = results[name]["p99_ms"] / base_s["p99_ms"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    return 0


def report(r: dict[str, Any]) -> None:
    p = r["params"]
    print(f"broker nodelay: {p['broker_nodelay']}; "
          f"agent nodelay: {p['agent_nodelay']}; total {r['total_s']:.0f} s")
    print(f"baseline broker round trip (controller -> node-2 client):  {fmt(r['baseline'])}")
    print(f"agent dry run, publish -> rehearsal report:               {fmt(r['dry_run'])}")
    if "skip_received" in r:
        print(f"agent skip job, publish -> 'received' report:             "
              f"{fmt(r['skip_received'])}")
        print(f"agent skip job, publish -> final 'skipped' report:        {fmt(r['skip_final'])}")
        if "skip_commit_to_arrival" in r:
            print(f"agent skip job, 'skipped' logged -> report arrives:       "
                  f"{fmt(r['skip_commit_to_arrival'])}")
        if r["skip_unexpected"]:
            print(f"  unexpected reports: {r['skip_unexpected'][:3]}")
    if "burst" in r:
        b = r["burst"]
        print(f"agent burst of {b['n']:.0f} dry runs: {b['per_s']:.1f} commands/s; latency "
              f"with queueing p50 {b['p50_ms']:.0f} ms, max {b['max_ms']:.0f} ms")
    print(f"ratio dry-run/baseline: p50 {r['ratio_dry_run_p50']:.1f}x, "
          f"p99 {r['ratio_dry_run_p99']:.1f}x")
    if "ratio_skip_received_p50" in r:
        print(f"ratio received/baseline: p50 {r['ratio_skip_received_p50']:.1f}x, "
              f"p99 {r['ratio_skip_received_p99']:.1f}x")
    print(f"over 1 s: {r['dry_run']['over_1s']} dry runs"
          + (f", {r['skip_received']['over_1s']} 'received', "
             f"{r['skip_final']['over_1s']} final 'skipped' reports"
             if "skip_received" in r else ""))
    c = r["context"]
    print(f"context: SQLite WAL synchronous=FULL commit {c['sqlite_commit_ms_median']:.2f} ms "
          f"(median of 200, p99 {c['sqlite_commit_ms_p99']:.2f} ms)")
    print(f"daemon RSS: {r['rss_connected_mib']:.1f} MiB just connected, "
          f"{r['rss_after_load_mib']:.1f} MiB after the runs")
    if "idle" in r:
        idle = r["idle"]
        print(f"idle window {idle['window_s']:.1f} s (CPU time in 1/{idle['clk_tck']} s ticks):")
        for name, row in idle["processes"].items():
            print(f"  {name:<13} RSS {row['rss_start_mib']:6.1f} -> {row['rss_end_mib']:6.1f} MiB"
                  f"  CPU {row['cpu_s']:.2f} s ({row['cpu_percent']:.3f} %)"
                  f"  wake-ups {row['wakeups_per_s']:.2f}/s"
                  + (f"  children {row['child_cpu_s']:.2f} s" if row["child_cpu_s"] else ""))


if __name__ == "__main__":
    sys.exit(main())
