"""Benchmark: the daemon's resident memory idle and after one job, against its floors.

Run from the repository root::

    python bench/idle_rss.py [--idle-seconds 10] [--ready-rounds 5] [--compare DIR] [--json]
                             [--no-unit-env] [--daemon-env KEY=VALUE ...]

Everything runs on loopback in a temporary directory under ``--dir`` (default
``/var/tmp``): a throw-away PKI (``testkit/pki.py``), a real Mosquitto 2.0 with
mutual TLS and the production ACL (``testkit/broker.py``), and for each daemon
a fresh sandboxed node with the stand-in edgecore v1.12.1 running and a
v1.13.0 package (``testkit/standins``). The daemon is ``python -m agent
--config <cfg> run`` with ``transport.kind: mqtt`` (production MQTT defaults
otherwise), ``NOTIFY_SOCKET`` set so that ``READY=1`` can be timed, and the
``Environment=`` of systemd/edge-upgrade-agent.service (``MALLOC_ARENA_MAX``),
as the unit runs it; ``--no-unit-env`` leaves that out, ``--daemon-env
KEY=VALUE`` adds to it. The baselines never get it.

Memory is read from ``/proc/<pid>/status``: VmRSS (resident now), VmHWM (the
peak so far), RssAnon and RssFile (its two parts: private memory, and pages of
mapped files such as shared libraries). ``/proc`` prints KiB ("kB"); the
tables show MiB.

Daemons, each started fresh against the same broker:

* ``local``: the lean configuration: the local image backend, no trusted
  keys (``security.trusted_keys_dir`` is an empty directory, as install.sh
  leaves it). Sampled ``--idle-seconds`` after its presence says online, then
  right after one real upgrade job (v1.12.1 to v1.13.0, sent through the
  broker as the controller would), then ``--settle-seconds`` later.
* ``docker``: ``images.backend: docker`` configured (the configuration the
  issue measured at 44 MB); idle only, as no docker daemon runs here.
* ``signed``: ``security.require_signed_commands: true`` with one trusted
  Ed25519 key, so the key is parsed at start (``cryptography`` is loaded);
  idle, then one signed upgrade job.

For each sample the script also notes whether ``cryptography``'s Rust
extension is mapped (``/proc/<pid>/maps``), and the thread count.

Baselines, in the same run:

* ``floor``: ``python -c "import aiomqtt, structlog, yaml"``; and the same
  plus ``tenacity`` (the floor issue 10 quotes);
* ``imports``: ``python -c "import agent.cli, agent.daemon, agent.transport.mqtt, agent.tls"``:
  every module the daemon imports at start, nothing run;
* ``tls client``: a bare aiomqtt client connected to the same broker with
  mutual TLS and subscribed (CN ``idle-probe``), sampled after the same idle
  time; and the same client with ``sqlite3`` imported and a WAL database open
  and written once, as the journal is: what any Python agent with this
  transport and this journal holds before its own code.

Start to READY: ``--ready-rounds`` starts each of the lean MQTT configuration,
the same with ``images.backend: docker``, and the spool configuration
bench/start_to_ready.py uses (fresh journal, no edgecore), timed from spawn to
the ``READY=1`` datagram, then SIGTERM.

``--compare DIR`` repeats every daemon measurement and the READY rounds with
the ``agent`` package from ``DIR`` (for example the landed code, extracted
with ``git archive HEAD agent | tar -x -C DIR``), interleaved with this
tree's, so before and after come from the same run. ``--pyc cached`` (the
default) lets the children write byte code under a temporary
``PYTHONPYCACHEPREFIX``, as an installed node has ``.pyc`` files; one untimed
import of every module of each tree (and so of what they import at the top)
fills it first, so that no daemon compiles a module in a job. Never run by
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-upgrade-agent.service"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.security.signing import sign  # noqa: E402
from testkit.broker import Broker  # noqa: E402
from testkit.cloud import Cloud  # noqa: E402
from testkit.pki import Pki, make_pki  # noqa: E402
from testkit.standins import (  # noqa: E402
    make_image_dir,
    make_node,
    sandbox_settings,
    start_edgecore,
    stop_edgecore,
)

NODE = "node-1"
IDLE_PROBE = "idle-probe"
CONTROLLER = "cloud-controller"
FROM_VERSION = "v1.12.1"
TO_VERSION = "v1.13.0"
REPO_IMAGE = "kubeedge/installation-package"
KEY_ID = "ops-1"
TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CRYPTO_SO = "cryptography/hazmat/bindings/_rust"

FLOOR = "import aiomqtt, structlog, yaml"
FLOOR_TENACITY = "import aiomqtt, structlog, tenacity, yaml"
IMPORTS = "import agent.cli, agent.daemon, agent.transport.mqtt, agent.tls"
# Imports every module of the agent package (not __main__, which would run).
IMPORT_ALL = ("import importlib, pkgutil, agent\n"
              "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
              "    if not m.name.endswith('__main__'):\n"
              "        importlib.import_module(m.name)\n"
              "print(agent.__file__)\n")
# Prints "ready" once set up, then waits: the parent samples it from outside.
WAIT = "\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()\n"

TLS_CLIENT = """
import asyncio, ssl, sys
import aiomqtt, structlog, yaml
port, ca, cert, key, topic, journal = sys.argv[1:]
if journal:
    import sqlite3
    db = sqlite3.connect(journal, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t(k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t VALUES('a', 'b')")
    db.execute("SELECT v FROM t WHERE k = 'a'").fetchall()

async def main() -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    async with aiomqtt.Client("127.0.0.1", int(port), tls_context=ctx, identifier="idle-probe",
                              protocol=aiomqtt.ProtocolVersion.V5, keepalive=30) as client:
        await client.subscribe(topic, qos=1)
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- samples -------------------------------------------------------------------


@dataclass
class Sample:
    rss_kib: int
    hwm_kib: int
    anon_kib: int
    file_kib: int
    threads: int
    cryptography: bool  # cryptography's Rust extension mapped

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024

    @property
    def hwm_mib(self) -> float:
        return self.hwm_kib / 1024


def sample(pid: int) -> Sample:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            fields[name] = int(value.split()[0])
    maps = Path(f"/proc/{pid}/maps").read_text()
    return Sample(fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"],
                  fields["Threads"], CRYPTO_SO in maps)


def machine_state() -> dict[str, Any]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return {"uptime": uptime.stdout.strip(), "loadavg": os.getloadavg(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    tag: str  # "this" or "compare"
    path: Path  # the directory holding the agent package


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The ``Environment=`` assignments of the unit's [Service] section."""
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "Environment":
            for assignment in shlex.split(value):
                name, eq, val = assignment.partition("=")
                if eq:
                    env[name] = val
    return env


def child_env(source: Source, pycache: Path | None, notify: Path | None = None,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGE_UPGRADE_AGENT_FAULT"}
    if pycache is not None:
        drop.add("PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(source.path)
    if pycache is not None:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    env.update(extra or {})
    return env


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


def wait_ready_line(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        stop(proc)
        raise BenchError(f"{what} did not get ready (exit code {proc.poll()})")


def measure_child(argv: list[str], source: Source, pycache: Path | None, what: str,
                  idle: float = 0.0) -> Sample:
    """Start a child that prints "ready"; sample it ``idle`` seconds later."""
    proc = subprocess.Popen(argv, cwd=source.path, env=child_env(source, pycache),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        wait_ready_line(proc, what)
        time.sleep(idle)
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        return sample(proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        stop(proc)


def wait_notify(sock: socket.socket, proc: subprocess.Popen[bytes], start: float) -> float:
    """Seconds from ``start`` to the daemon's READY=1."""
    deadline = start + TIMEOUT
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise BenchError(f"no READY=1 within {TIMEOUT:g} s")
        sock.settimeout(min(left, 0.05))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise BenchError(f"daemon exited with {proc.returncode} before READY=1") from None
            continue
        if "READY=1" in data.decode(errors="replace").splitlines():
            return time.perf_counter() - start


class Daemon:
    """One ``python -m agent run`` with its own notify socket and log."""

    def __init__(self, work: Path, config: Path, source: Source, pycache: Path | None,
                 extra_env: dict[str, str]) -> None:
        self.work = work
        self.log = work / "agent.log"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify = work / "notify.sock"
        notify.unlink(missing_ok=True)
        self.sock.bind(str(notify))
        env = child_env(source, pycache, notify, extra_env)
        self.start = time.perf_counter()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(config), "run"],
                cwd=source.path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def ready(self) -> float:
        return wait_notify(self.sock, self.proc, self.start)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        stop(self.proc)
        self.sock.close()


# -- set-up --------------------------------------------------------------------


def write_config(work: Path, root: Path, broker: Broker | None, **extra: Any) -> Path:
    settings = sandbox_settings(root, NODE)
    settings["security"] = {"trusted_keys_dir": str(work / "trusted")}
    if broker is not None:
        cert, key = broker.pki.client(NODE)
        settings["transport"] = {"kind": "mqtt", "mqtt": {
            "host": broker.host, "port": broker.port, "ca_file": str(broker.pki.ca_cert),
            "cert_file": str(cert), "key_file": str(key)}}
    settings.update(extra)
    (work / "trusted").mkdir(exist_ok=True)
    path = work / "agent.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def fresh_node(work: Path) -> Path:
    root = work / "root"
    make_node(root, FROM_VERSION, node_name=NODE)
    make_image_dir(root / "images", REPO_IMAGE, TO_VERSION)
    return root


@dataclass(frozen=True)
class Scenario:
    name: str
    job: bool
    signed: bool = False
    images: dict[str, Any] | None = None


SCENARIOS = (
    Scenario("local", job=True),
    Scenario("docker", job=False, images={"backend": "docker"}),
    Scenario("signed", job=True, signed=True),
)


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               check: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def run_scenario(sc: Scenario, source: Source, *, base: Path, broker: Broker, cloud: Cloud,
                 key: Ed25519PrivateKey, args: argparse.Namespace,
                 pycache: Path | None) -> dict[str, Any]:
    work = base / f"{source.tag}-{sc.name}"
    work.mkdir()
    root = fresh_node(work)
    extra: dict[str, Any] = {}
    if sc.images is not None:
        extra["images"] = sc.images
    if sc.signed:
        extra["security"] = {"require_signed_commands": True,
                             "trusted_keys_dir": str(work / "trusted")}
    config = write_config(work, root, broker, **extra)
    if sc.signed:
        (work / "trusted" / f"{KEY_ID}.pub").write_bytes(key.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    start_edgecore(root)
    seen = len(cloud.presence())
    daemon = Daemon(work, config, source, pycache, args.env)
    out: dict[str, Any] = {"source": source.tag, "scenario": sc.name}
    try:
        out["ready_ms"] = daemon.ready() * 1e3

        def online() -> bool:
            return any(p.get("online") and p.get("nodeName") == NODE
                       for p in cloud.presence()[seen:])

        wait_until(online, TIMEOUT, "the daemon's presence", daemon.check)
        out["online_ms"] = (time.perf_counter() - daemon.start) * 1e3
        time.sleep(args.idle_seconds)
        daemon.check()
        out["idle"] = asdict(sample(daemon.proc.pid))
        if sc.job:
            job = f"rss-{source.tag}-{sc.name}"
            body: dict[str, Any] = {"jobName": job, "version": TO_VERSION}
            t0 = time.perf_counter()
            cloud.send(sign(body, key, KEY_ID) if sc.signed else body)
            wait_until(lambda: bool(cloud.finals(job)), TIMEOUT * 2, f"the final report of {job}",
                       daemon.check)
            out["job_s"] = time.perf_counter() - t0
            out["job_result"] = cloud.finals(job)[0].get("result")
            out["after_job"] = asdict(sample(daemon.proc.pid))
            time.sleep(args.settle_seconds)
            daemon.check()
            out["settled"] = asdict(sample(daemon.proc.pid))
    except BenchError as exc:
        raise BenchError(f"{source.tag}/{sc.name}: {exc}\n--- daemon log ---\n{daemon.tail()}"
                         ) from None
    finally:
        daemon.close()
        stop_edgecore(root)
    return out


def ready_round(config: Path, work: Path, source: Source, pycache: Path | None,
                extra_env: dict[str, str]) -> float:
    daemon = Daemon(work, config, source, pycache, extra_env)
    try:
        return daemon.ready()
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- daemon log ---\n{daemon.tail()}") from None
    finally:
        daemon.close()


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle-seconds", type=float, default=10.0,
                    help="idle time after the daemon is online, before the sample (default 10)")
    ap.add_argument("--settle-seconds", type=float, default=5.0,
                    help="pause after the job before the last sample (default 5)")
    ap.add_argument("--ready-rounds", type=int, default=5,
                    help="start-to-READY rounds per configuration and tree (default 5, 0: none)")
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="also measure the agent package in DIR (e.g. the landed code)")
    ap.add_argument("--pyc", choices=("cached", "env"), default="cached",
                    help="cached (default): children share a temporary PYTHONPYCACHEPREFIX; "
                         "env: inherit the environment as is")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="where the temporary work directory goes (default /var/tmp)")
    ap.add_argument("--no-unit-env", action="store_true",
                    help="do not give the daemons the unit's Environment= (MALLOC_ARENA_MAX)")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="one more environment variable for the daemons (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    if not 0 <= args.idle_seconds <= 600 or not 0 <= args.settle_seconds <= 600:
        ap.error("--idle-seconds and --settle-seconds must be between 0 and 600")
    if not 0 <= args.ready_rounds <= 100:
        ap.error("--ready-rounds must be between 0 and 100")
    args.env = {} if args.no_unit_env else unit_environment()
    for item in args.daemon_env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            ap.error(f"--daemon-env {item!r}: expected KEY=VALUE")
        args.env[key] = value
    if args.compare is not None:
        args.compare = args.compare.resolve()
        if not (args.compare / "agent" / "__main__.py").is_file():
            ap.error(f"--compare: no agent package in {args.compare}")
    return args


def baselines(work: Path, pki: Pki, broker: Broker, sources: list[Source], *,
              pycache: Path | None, idle: float) -> dict[str, Any]:
    this = sources[0]
    out: dict[str, Any] = {}
    runs = [("floor", FLOOR, this), ("floor + tenacity", FLOOR_TENACITY, this),
            *((f"imports ({s.tag})", IMPORTS, s) for s in sources)]
    for name, code, source in runs:
        progress(f"baseline: {name}")
        out[name] = asdict(measure_child([sys.executable, "-c", code + WAIT], source, pycache,
                                         name))
    cert, key = pki.client(IDLE_PROBE)
    topic = broker.topic(IDLE_PROBE, "cmd")
    for name, journal in (("tls client", ""), ("tls client + sqlite", str(work / "probe.db"))):
        progress(f"baseline: {name} ({idle:g} s idle)")
        argv = [sys.executable, "-c", TLS_CLIENT, str(broker.port), str(pki.ca_cert), str(cert),
                str(key), topic, journal]
        out[name] = asdict(measure_child(argv, this, pycache, name, idle))
    return out


def measure(args: argparse.Namespace, work: Path, pycache: Path | None,
            results: dict[str, Any]) -> None:
    sources = [Source("this", REPO)]
    if args.compare is not None:
        sources.append(Source("compare", args.compare))
    for source in sources:  # untimed: compile the byte code, warm the page cache
        where = subprocess.run(
            [sys.executable, "-c", IMPORT_ALL],
            cwd=source.path, env=child_env(source, pycache), check=True, capture_output=True,
            text=True).stdout.strip()
        if not Path(where).is_relative_to(source.path):
            raise BenchError(f"{source.tag}: the agent package came from {where}")
    pki = make_pki(work / "pki", (NODE, IDLE_PROBE, CONTROLLER))
    broker = Broker(pki, work / "broker")
    broker.start()
    cloud: Cloud | None = None
    try:
        cloud = Cloud(broker)
        results["baselines"] = baselines(work, pki, broker, sources, pycache=pycache,
                                         idle=args.idle_seconds)
        key = Ed25519PrivateKey.generate()
        daemons: list[dict[str, Any]] = []
        for sc in SCENARIOS:
            for source in sources:
                progress(f"daemon {source.tag}/{sc.name}")
                daemons.append(run_scenario(sc, source, base=work, broker=broker, cloud=cloud,
                                            key=key, args=args, pycache=pycache))
        results["daemons"] = daemons

        kinds = ("mqtt", "mqtt-docker", "spool")
        ready: dict[str, dict[str, list[float]]] = {s.tag: {k: [] for k in kinds}
                                                    for s in sources}
        configs: dict[tuple[str, str], tuple[Path, Path]] = {}
        for source in sources:
            for kind in kinds:
                d = work / f"ready-{source.tag}-{kind}"
                d.mkdir()
                root = d / "root"
                make_node(root, FROM_VERSION, node_name=NODE)
                extra = {"images": {"backend": "docker"}} if kind == "mqtt-docker" else {}
                mqtt = broker if kind.startswith("mqtt") else None
                configs[source.tag, kind] = (write_config(d, root, mqtt, **extra), d)
        if args.ready_rounds:
            progress(f"start to READY: {args.ready_rounds} rounds")
        for r in range(args.ready_rounds):
            for kind in kinds:
                # Alternate which tree starts first, so neither always gets the warmer cache.
                for source in (sources if r % 2 == 0 else sources[::-1]):
                    config, d = configs[source.tag, kind]
                    ready[source.tag][kind].append(
                        ready_round(config, d, source, pycache, args.env) * 1e3)
        results["ready_ms"] = ready
    finally:
        if cloud is not None:
            cloud.close()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="idle-rss-", dir=args.dir))
    pycache = work / "pycache" if args.pyc == "cached" else None
    progress(f"work directory {work}")
    results: dict[str, Any] = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": sys.version.split()[0],
        "machine_before": machine_state(),
    }
    started = time.monotonic()
    try:
        measure(args, work, pycache, results)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["machine_after"] = machine_state()
    results["total_s"] = time.monotonic() - started
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    return 0


def _row(name: str, s: dict[str, Any]) -> str:
    return (f"{name:<44} {s['rss_kib'] / 1024:7.1f} {s['hwm_kib'] / 1024:7.1f} "
            f"{s['anon_kib'] / 1024:6.1f} {s['file_kib'] / 1024:6.1f} {s['threads']:7d}  "
            f"{'yes' if s['cryptography'] else 'no'}")


def report(r: dict[str, Any]) -> None:
    print(f"python {r['python']}; {r['machine_before']['uptime']}")
    env = " ".join(f"{k}={v}" for k, v in r["params"]["env"].items())
    print(f"daemon environment: {env or '(none added)'}")
    print(f"{'process (MiB)':<44} {'VmRSS':>7} {'VmHWM':>7} {'anon':>6} {'file':>6} "
          f"{'threads':>7}  cryptography")
    for name, s in r["baselines"].items():
        print(_row(name, s))
    idle = r["params"]["idle_seconds"]
    for d in r["daemons"]:
        head = f"daemon {d['source']}/{d['scenario']}"
        print(_row(f"{head}, {idle:g} s idle", d["idle"]))
        if "after_job" in d:
            print(_row(f"{head}, right after one job", d["after_job"]))
            print(_row(f"{head}, {r['params']['settle_seconds']:g} s later", d["settled"]))
    print("daemon start (ms): spawn to READY=1, spawn to online; job (s)")
    for d in r["daemons"]:
        job = (f"; job {d['job_s']:.2f} s ({d['job_result']})" if "job_s" in d else "")
        print(f"  {d['source']}/{d['scenario']}: READY {d['ready_ms']:.0f}, "
              f"online {d['online_ms']:.0f}{job}")
    for tag, kinds in r["ready_ms"].items():
        for kind, runs in kinds.items():
            if runs:
                print(f"start to READY, {tag}, {kind}: median {statistics.median(runs):.1f} ms "
                      f"(all: {' '.join(f'{x:.1f}' for x in runs)})")
    print(f"after: {r['machine_after']['uptime']}; total {r['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
