"""Benchmark: a real KubeEdge v1.12.1 -> v1.13.0 upgrade through the agent vs keadm alone.

Run from the repository root, as root (a private dockerd)::

    .venv/bin/python bench/real_upgrade.py [--rounds 3] [--warmup 1] [--grace 3]
        [--agent-image cold|warm|prepulled] [--no-preserve-unit] [--json]

Needs what tests/test_e2e_real_kubeedge.py needs: the real binaries in
../shared/kubeedge (testkit/kubeedge_real.py), dockerd, docker-registry,
mosquitto, debootstrap (the cached host rootfs) and busybox-static. It reuses
that test's rig (testkit/e2e_host.py): a private dockerd and registry with
htpasswd, a Mosquitto with mutual TLS, and one Debian host container with
systemd as PID 1 running the real v1.12.1 edgecore as the operator's
edgecore.service and the agent installed by scripts/install.sh.

Each round, the node is first reset to v1.12.1 (the v1.12.1 binary, its
config and the operator's unit; edgecore restarted and its `Version:` line
seen; keadm's backup, staging copy and marker removed). Then, in alternating
order:

- **keadm alone**: the installation-package image is pre-pulled into dockerd
  (with the registry credentials, which keadm lacks) and the real keadm
  v1.13.0 runs in the host, with the agent stopped, as the agent would run it:
  ``keadm upgrade --upgradeID .. --historyID .. --fromVersion v1.12.1
  --toVersion v1.13.0 --config /etc/kubeedge/config/edgecore.yaml --image
  <ref>``. Wall: keadm's start to its exit, timed inside the host; then we
  wait for the new edgecore's ``Version: v1.13.0`` journal line.
- **agent**: the image is removed from dockerd (``--agent-image cold``,
  default: the agent pulls it, as on a real node), left pulled (``warm``), or
  staged ahead by a ``prepull`` command (``prepulled``: an operator's
  pre-maintenance step, untimed; the fair match for keadm's pre-pulled image);
  an upgrade command goes over MQTT; wall: publish to the final report.

Edgecore downtime: a sampler inside the host runs ``pgrep -c -x edgecore``
every 50 ms for the whole run; the downtime is the time covered by samples
that saw none (each sample counts until the next one). The agent's restart of
edgecore under the operator's restored unit (``service.preserve_unit``) is a
second down window, counted in.

Overhead = median agent wall - median keadm wall - health grace (the agent
waits ``--grace`` seconds with the new edgecore up before it declares
success). The agent's phases come from its "job state" log lines.
Prints a small table (``--json`` for a JSON document). Never run by the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testkit.cloud import Cloud  # noqa: E402
from testkit.dockerenv import remove_image  # noqa: E402
from testkit.e2e_host import (  # noqa: E402
    EDGECORE_UNIT,
    KEADM_UPGRADE_DIR,
    EdgeHost,
    Rig,
    SharedDir,
    agent_settings,
    build_wheelhouse,
    edgecore_config,
    install_agent,
    install_real_edgecore,
    real_package_files,
    wait_version,
)
from testkit.kubeedge_real import real_binary  # noqa: E402

FROM, TO = "v1.12.1", "v1.13.0"
KEADM = "/var/tmp/bench/keadm"
SAMPLER = ("echo $$ > /run/bench-sampler.pid; while :; do "
           'echo "$(date +%s.%N) $(pgrep -c -x edgecore)"; sleep 0.05; '
           "done > /run/bench-sampler.log")
#: (state entered, name of the step that ends with it)
PHASES = (("sent", ""), ("prechecked", "precheck"), ("image_ready", "image"),
          ("backed_up", "backup"), ("installing", "handoff"), ("verifying", "install"),
          ("succeeded", "verify"), ("done", "report"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reset_node(host: EdgeHost, edgecore: Path) -> None:
    """Back to v1.12.1 as the operator installed it; keadm's leftovers removed."""
    host.ok("systemctl stop edgecore; rm -f /etc/kubeedge/idempotency_record; "
            f"rm -rf /etc/kubeedge/backup {KEADM_UPGRADE_DIR}/*")
    host.put("/usr/local/bin/edgecore", edgecore.read_bytes(), 0o755)
    host.put("/etc/kubeedge/config/edgecore.yaml", edgecore_config(FROM), 0o644)
    host.put("/etc/systemd/system/edgecore.service", EDGECORE_UNIT.encode(), 0o644)
    host.ok("systemctl daemon-reload && systemctl enable edgecore && systemctl restart edgecore")
    wait_version(host, FROM)


class Sampler:
    def __init__(self, host: EdgeHost) -> None:
        self.host = host
        self.since = 0.0

    def __enter__(self) -> Sampler:
        self.since = time.time()
        self.host.ok("rm -f /run/bench-sampler.log")
        self.host.spawn(SAMPLER)
        wait(lambda: self.host.sh("test -s /run/bench-sampler.log")[0] == 0, 10, "the sampler")
        return self

    def __exit__(self, *exc: object) -> None:
        self.host.sh("kill $(cat /run/bench-sampler.pid)")

    def result(self) -> dict[str, float]:
        rows = [line.split() for line in
                self.host.ok("cat /run/bench-sampler.log").splitlines() if len(line.split()) == 2]
        ts = [float(t) for t, _ in rows]
        counts = [int(c) for _, c in rows]
        down = sum(ts[i + 1] - ts[i] for i in range(len(ts) - 1) if counts[i] == 0)
        windows = sum(1 for i, c in enumerate(counts) if c == 0 and (i == 0 or counts[i - 1]))
        period = (ts[-1] - ts[0]) / max(1, len(ts) - 1)
        # Every edgecore start logs its version first: a restart shorter than one
        # sample is missed by the sampler but counted here.
        starts = self.host.ok(f"journalctl -u edgecore --since @{self.since:.3f} -o cat "
                              "--no-pager | grep -c 'Version: v' || true")
        return {"down_s": down, "down_windows": windows, "max_edgecores": max(counts),
                "sample_period_s": period, "edgecore_starts": int(starts.strip() or 0)}


def keadm_alone(rig: Rig, host: EdgeHost, ref: str) -> dict[str, float]:
    rig.pull(ref)
    host.ok("systemctl stop edge-upgrade-agent")
    try:
        with Sampler(host) as sampler:
            out = host.ok(
                f"s=$(date +%s.%N); {KEADM} upgrade --upgradeID bench --historyID bench "
                f"--fromVersion {FROM} --toVersion {TO} "
                f"--config /etc/kubeedge/config/edgecore.yaml --image {ref} "
                f">/var/tmp/bench/keadm.log 2>&1; rc=$?; e=$(date +%s.%N); echo $rc $s $e")
            wait_version(host, TO)
            time.sleep(0.3)
        rc, start, end = out.split()
        if rc != "0":
            raise RuntimeError(f"keadm exited {rc}:\n{host.ok('cat /var/tmp/bench/keadm.log')}")
        return {"wall_s": float(end) - float(start), **sampler.result()}
    finally:
        host.ok("systemctl start edge-upgrade-agent")


def phase_times(host: EdgeHost, job: str, sent: float, done: float) -> dict[str, float]:
    """Seconds per step, from the agent's "job state" log lines (the host shares this
    machine's clock): "precheck" runs from our publish to the first "prechecked"
    state (MQTT in, intake, version detection, prechecks), "image" is pull and
    extraction, ..., "report" from "succeeded" to the final report here."""
    stamps: dict[str, float] = {}
    for line in host.ok("journalctl -u edge-upgrade-agent --no-pager -o cat").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("job") == job and event.get("event") == "job state":
            when = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            stamps.setdefault(event["state"], when.timestamp())
            if event["state"] == "backed_up":  # "... in 0.12s": the copy itself
                copy = re.search(r" in ([0-9.]+)s", str(event.get("reason", "")))
                if copy:
                    stamps.setdefault("backup_copy_s", float(copy[1]))
    stamps["sent"], stamps["done"] = sent, done
    out = {}
    for (a, _), (b, name) in itertools.pairwise(PHASES):
        if a in stamps and b in stamps:
            out[name] = stamps[b] - stamps[a]
    if "backup_copy_s" in stamps:
        out["backup_copy"] = stamps["backup_copy_s"]
    return out


def agent_round(rig: Rig, host: EdgeHost, cloud: Cloud, job: str, *,
                repo: str, image: str) -> dict[str, Any]:
    if image == "cold":
        remove_image(rig.client, f"{repo}:{TO}")
    elif image == "warm":
        rig.pull(f"{repo}:{TO}")
    else:  # prepulled: the operator's `prepull` before the window, untimed
        host.ok(f"rm -rf /var/lib/edge-upgrade-agent/staging/{TO}")
        cloud.send({"jobName": f"{job}-pp", "operation": "prepull", "version": TO,
                    "image": repo})
        wait(lambda: cloud.finals(f"{job}-pp"), 240, f"the prepull of {job}")
    with Sampler(host) as sampler:
        sent, start = time.time(), time.monotonic()
        cloud.send({"jobName": job, "version": TO, "image": repo})
        wait(lambda: cloud.finals(job), 240, f"the final report of {job}")
        wall, done = time.monotonic() - start, time.time()
    final = cloud.finals(job)[0]
    if final.get("result") != "upgrade_success":
        raise RuntimeError(f"{job} did not succeed: {final}")
    return {"wall_s": wall, **sampler.result(), "phases": phase_times(host, job, sent, done)}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description="real v1.12.1 -> v1.13.0: agent vs keadm alone")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--grace", type=float, default=3.0, help="health.grace_seconds")
    ap.add_argument("--agent-image", choices=("cold", "warm", "prepulled"), default="cold",
                    help="cold: the agent pulls; warm: already in dockerd; prepulled: "
                         "a prepull command staged the package first (untimed)")
    ap.add_argument("--no-preserve-unit", dest="preserve_unit", action="store_false",
                    help="service.preserve_unit: false (keep keadm's unit, no second restart)")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    bins = {(v, n): real_binary(v, n) for v in (FROM, TO) for n in ("edgecore", "keadm")}
    missing = [f"{n} {v}" for (v, n), p in bins.items() if p is None]
    if missing:
        log(f"real KubeEdge binaries missing: {', '.join(missing)}")
        return 2
    keadm, edgecore_to = bins[TO, "keadm"], bins[TO, "edgecore"]
    edgecore_from = bins[FROM, "edgecore"]
    assert keadm and edgecore_to and edgecore_from

    work = Path(tempfile.mkdtemp(prefix="real-upgrade-", dir=args.dir))
    rig = Rig(work / "rig")
    cloud: Cloud | None = None
    try:
        with SharedDir(KEADM_UPGRADE_DIR):
            log("starting dockerd, registry, broker ...")
            rig.start()
            ref = rig.package(TO, real_package_files(keadm, edgecore_to))
            repo = ref.rsplit(":", 1)[0]
            wheels = build_wheelhouse(work / "wheels")
            host = rig.host({str(REPO): "/src:ro", str(wheels): "/wheels:ro"},
                            name=f"bench-real-{work.name}")
            install_real_edgecore(host, FROM, edgecore_from)
            host.put(KEADM, keadm.read_bytes(), 0o755)
            install_agent(host, agent_settings(rig.registry.address, rig.broker.port,
                                               health={"grace_seconds": args.grace,
                                                       "start_timeout_seconds": 20,
                                                       "poll_interval_seconds": 0.5},
                                               service={"preserve_unit": args.preserve_unit}),
                          rig.pki.dir)
            cloud = Cloud(rig.broker)
            wait(lambda: any(p["online"] for p in cloud.presence()), 60, "the agent online")

            alone: list[dict[str, Any]] = []
            agent: list[dict[str, Any]] = []
            for i in range(args.warmup + args.rounds):
                order = ("keadm", "agent") if i % 2 == 0 else ("agent", "keadm")
                for who in order:
                    reset_node(host, edgecore_from)
                    if who == "keadm":
                        row = keadm_alone(rig, host, ref)
                    else:
                        row = agent_round(rig, host, cloud, f"bench-{i}", repo=repo,
                                          image=args.agent_image)
                    warm = " (warm-up)" if i < args.warmup else ""
                    log(f"round {i} {who}: wall {row['wall_s']:.2f} s, down "
                        f"{row['down_s']:.2f} s in {row['down_windows']} window(s){warm}")
                    if i >= args.warmup:
                        (alone if who == "keadm" else agent).append(row)
    finally:
        if cloud is not None:
            cloud.close()
        rig.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    keadm_wall, agent_wall = median(alone, "wall_s"), median(agent, "wall_s")
    overhead = agent_wall - keadm_wall - args.grace
    names = [name for _, name in PHASES[1:]] + ["backup_copy"]
    phases = {p: statistics.median(r["phases"].get(p, float("nan")) for r in agent)
              for p in names}
    result = {
        "rounds": args.rounds, "grace_s": args.grace, "agent_image": args.agent_image,
        "preserve_unit": args.preserve_unit,
        "keadm_alone": alone, "agent": agent,
        "median": {"keadm_wall_s": keadm_wall, "keadm_down_s": median(alone, "down_s"),
                   "agent_wall_s": agent_wall, "agent_down_s": median(agent, "down_s"),
                   "agent_overhead_s": overhead, "agent_phases_s": phases},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"real upgrade {FROM} -> {TO}, median of {args.rounds} (agent image "
          f"{args.agent_image}, health grace {args.grace:g} s, preserve_unit "
          f"{str(args.preserve_unit).lower()})")
    print(f"{'':24}{'wall s':>8}{'down s':>8}{'windows':>9}{'starts':>8}{'max edgecores':>15}")
    for name, rows in (("keadm alone (pre-pulled)", alone), ("agent over MQTT", agent)):
        print(f"{name:24}{median(rows, 'wall_s'):8.2f}{median(rows, 'down_s'):8.2f}"
              f"{median(rows, 'down_windows'):9.0f}{median(rows, 'edgecore_starts'):8.0f}"
              f"{max(r['max_edgecores'] for r in rows):15d}")
    period = statistics.median(r["sample_period_s"] for r in alone + agent)
    print(f"down: no edgecore process in the samples (one every {period * 1000:.0f} ms); "
          "starts: edgecore starts seen in its journal")
    print(f"agent overhead = agent wall - keadm wall - grace = {overhead:.2f} s")
    print("agent phases (median s): " + ", ".join(f"{p} {v:.2f}" for p, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
