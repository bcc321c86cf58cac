"""A self-contained local rehearsal of the agent's main job.

Everything is throwaway and under ./.rehearsal: a test PKI, a Mosquitto
broker with mutual TLS and the per-node ACL, a private dockerd with a
registry behind htpasswd holding installation-package images (stand-in keadm
and edgecore), and three sandboxed edge nodes running the stand-in edgecore
v1.12.1, each with its agent daemon over MQTT. ``edge-upgrade-ctl apply -f``
applies two NodeUpgradeJob manifests: one selects the three nodes by label
and upgrades them two at a time to v1.13.0; one sends node-1 a v1.14.0 whose
edgecore crashes on start, which the health gate catches and rolls back (the
job ends Failure). The controller's table, its final status and an HTML
rollout report (.rehearsal/rehearse-upgrade.html) show the result.

Without dockerd or docker-registry (`--local`, or when they are missing and
cannot be installed), images come from unpacked directories instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # testkit: the stand-ins and the throwaway servers
    sys.path.insert(0, str(REPO))

from testkit.broker import Broker  # noqa: E402
from testkit.pki import issue_client, make_pki  # noqa: E402
from testkit.standins import (  # noqa: E402
    make_image_dir,
    make_node,
    start_edgecore,
    stop_edgecore,
    write_edgecore,
    write_keadm,
)

BASE = REPO / ".rehearsal"
IMAGE = "kubeedge/installation-package"
USER, PASSWORD = "rehearsal", "throwaway-password"


def wait(cond: Any, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit("rehearsal: timed out waiting; see .rehearsal/node-*.log")
        time.sleep(0.1)


def images_with_registry() -> tuple[dict[str, Any], list[Any]]:
    from testkit.dockerenv import Dockerd, Registry, build_package_image, push  # noqa: PLC0415

    dockerd, registry = Dockerd(BASE / "dockerd"), Registry(BASE / "registry", {USER: PASSWORD})
    dockerd.start()
    registry.start()
    client = dockerd.client()
    for version, behaviour in (("v1.13.0", "ok"), ("v1.14.0", "crash")):
        bindir = BASE / "pkg" / version
        files: dict[str, bytes | Path] = {
            "/usr/local/bin/keadm": write_keadm(bindir / "keadm", version),
            "/usr/local/bin/edgecore": write_edgecore(bindir / "edgecore", version,
                                                      behaviour=behaviour)}
        ref = f"{registry.address}/{IMAGE}:{version}"
        build_package_image(client, ref, files)
        push(client, ref, USER, PASSWORD)
        print(f"pushed {ref} to the throwaway registry (htpasswd auth)", flush=True)
    (BASE / "registry-password").write_text(PASSWORD)
    images = {"backend": "docker", "docker": {"host": dockerd.host, "config": ""},
              "default_repo": f"{registry.address}/{IMAGE}",
              "allowed_registries": [registry.address],
              "credentials": {registry.address: {
                  "username": USER, "password_file": str(BASE / "registry-password")}}}
    return images, [registry, dockerd]


NODES = {"node-1": "factory-a", "node-2": "factory-a", "node-3": "factory-b"}
WAVE = """\
apiVersion: operations.kubeedge.io/v1alpha2
kind: NodeUpgradeJob
metadata:
  name: rehearse-upgrade
spec:
  version: v1.13.0
  image: {image}
  concurrency: 2
  failureTolerate: "0"
  timeoutSeconds: 120
  checkItems: [disk]
  labelSelector:
    matchExpressions:
      - {{key: site, operator: In, values: [factory-a, factory-b]}}
"""
CRASH = """\
apiVersion: operations.kubeedge.io/v1alpha2
kind: NodeUpgradeJob
metadata:
  name: rehearse-crash
spec:
  version: v1.14.0
  image: {image}
  timeoutSeconds: 120
  nodeNames: [node-1]
"""


def ctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """edge-upgrade-ctl with the rehearsal's config; its live table goes to stderr."""
    argv = [sys.executable, "-m", "agent.ctl", "--config", str(BASE / "ctl.yaml"), *args]
    print(f"$ edge-upgrade-ctl {' '.join(args)}", flush=True)
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    print(done.stdout, end="", flush=True)
    if check and done.returncode != 0:
        raise SystemExit(f"rehearsal: edge-upgrade-ctl {args[0]} failed ({done.returncode})")
    return done


def online(names: list[str]) -> bool:
    argv = [sys.executable, "-m", "agent.ctl", "--config", str(BASE / "ctl.yaml"),
            "get", "nodes", "-o", "json"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    try:
        nodes = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        return False
    return all(nodes.get(n, {}).get("online") for n in names)


def start_agent(name: str, site: str, pki: Any, broker: Broker,
                images: dict[str, Any]) -> tuple[Path, subprocess.Popen[bytes]]:
    root = BASE / name
    make_node(root, "v1.12.1", node_name=name)
    start_edgecore(root)
    if "local" in images:
        for version, behaviour in (("v1.13.0", "ok"), ("v1.14.0", "crash")):
            make_image_dir(root / "images", IMAGE, version, edgecore_behaviour=behaviour)
    cert, key = issue_client(pki, name)
    config = {
        "node_name": name, "labels": {"site": site}, "paths": {"root": str(root)},
        "service": {"manager": "process"},
        "health": {"grace_seconds": 2, "start_timeout_seconds": 10,
                   "poll_interval_seconds": 0.2},
        "precheck": {"reserve_bytes": 1048576}, "images": images,
        "transport": {"kind": "mqtt", "mqtt": {
            "host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
            "cert_file": str(cert), "key_file": str(key)}},
        "logging": {"level": "info"}}
    path = BASE / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    with (BASE / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(path), "run"],
                                cwd=REPO, stdout=log, stderr=log)
    return root, proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true",
                        help="unpacked image directories instead of dockerd and a registry")
    args = parser.parse_args()
    if BASE.exists():
        for name in NODES:
            stop_edgecore(BASE / name)
        shutil.rmtree(BASE)
    BASE.mkdir()
    pki = make_pki(BASE / "pki")
    broker = Broker(pki, BASE / "broker")
    broker.start()
    print(f"broker: mosquitto with mutual TLS on 127.0.0.1:{broker.port}", flush=True)
    stoppers: list[Any] = [broker]
    agents: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}
    try:
        use_docker = not args.local and shutil.which("dockerd") and shutil.which("docker-registry")
        if use_docker:
            images, servers = images_with_registry()
            stoppers = servers + stoppers
            repo = images["default_repo"]
        else:
            print("images: unpacked directories (no dockerd/docker-registry)", flush=True)
            images, repo = {"local": {"dir": "/images"}}, IMAGE
        for name, site in NODES.items():
            agents[name] = start_agent(name, site, pki, broker, images)
        cert, key = issue_client(pki, "cloud-controller")
        (BASE / "ctl.yaml").write_text(json.dumps({
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
                     "cert_file": str(cert), "key_file": str(key)},
            "controller": {"state_dir": str(BASE / "ctl"), "presence_settle_seconds": 0.5,
                           "tick_seconds": 0.2}}, indent=2))
        wait(lambda: online(list(NODES)))
        print("agents: online (their logs are .rehearsal/node-*.log)\n", flush=True)
        ctl("get", "nodes", check=True)
        results = {}
        for name, text in (("rehearse-upgrade", WAVE), ("rehearse-crash", CRASH)):
            manifest = BASE / f"{name}.yaml"
            manifest.write_text(text.format(image=repo))
            print(f"\n{manifest.read_text()}", flush=True)
            done = ctl("apply", "-f", str(manifest))
            results[name] = (done.returncode, _results(done.stdout))
        ctl("get", "jobs", check=True)
        ctl("report", "rehearse-upgrade", "--html", str(BASE / "rehearse-upgrade.html"))
        expected = {"rehearse-upgrade": (0, {n: "upgrade_success" for n in NODES}),
                    "rehearse-crash": (1, {"node-1": "upgrade_failed_rollback_success"})}
        ok = results == expected
        print(f"\nresults: {results} -> {'as expected' if ok else 'UNEXPECTED'}")
        return 0 if ok else 1
    finally:
        for root, proc in agents.values():
            proc.terminate()
            proc.wait(30)
            stop_edgecore(root)
        for server in stoppers:
            server.stop()


def _results(status_yaml: str) -> dict[str, str]:
    import yaml  # noqa: PLC0415

    doc = yaml.safe_load(status_yaml) or {}
    return {n["nodeName"]: n.get("result", n["phase"])
            for n in doc.get("status", {}).get("nodeStatus", [])}


if __name__ == "__main__":
    sys.exit(main())
