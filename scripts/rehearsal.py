"""A self-contained local rehearsal of the agent's main job.

Everything is throwaway and under ./.rehearsal: a test PKI, a Mosquitto
broker with mutual TLS and the per-node ACL, a private dockerd with a
registry behind htpasswd holding installation-package images (stand-in keadm
and edgecore), and a sandboxed edge node running the stand-in edgecore
v1.12.1. The agent daemon runs against that node over MQTT; a controller
client sends one upgrade that succeeds (v1.13.0) and one whose new edgecore
crashes on start (v1.14.0), which the health gate catches and rolls back.
Every report the controller receives is printed.

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
from testkit.cloud import Cloud  # noqa: E402
from testkit.pki import make_pki  # noqa: E402
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
            raise SystemExit("rehearsal: timed out waiting; see .rehearsal/agent.log")
        time.sleep(0.1)


def show(report: dict[str, Any]) -> None:
    keys = ("sequence", "phase", "result", "fromVersion", "versionSource", "toVersion", "reason")
    line = {k: report[k] for k in keys if report.get(k) is not None}
    print(f"  {report['jobKey']}: " + json.dumps(line)[:220], flush=True)


def images_with_registry(root: Path) -> tuple[dict[str, Any], list[Any]]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true",
                        help="unpacked image directories instead of dockerd and a registry")
    args = parser.parse_args()
    if BASE.exists():
        stop_edgecore(BASE / "root")
        shutil.rmtree(BASE)
    BASE.mkdir()
    root = BASE / "root"
    make_node(root, "v1.12.1")
    start_edgecore(root)
    pki = make_pki(BASE / "pki")
    broker = Broker(pki, BASE / "broker")
    broker.start()
    print(f"broker: mosquitto with mutual TLS on 127.0.0.1:{broker.port}", flush=True)
    stoppers: list[Any] = [broker]
    agent: subprocess.Popen[bytes] | None = None
    cloud: Cloud | None = None
    try:
        use_docker = not args.local and shutil.which("dockerd") and shutil.which("docker-registry")
        if use_docker:
            images, servers = images_with_registry(root)
            stoppers = servers + stoppers
        else:
            print("images: unpacked directories (no dockerd/docker-registry)", flush=True)
            for version, behaviour in (("v1.13.0", "ok"), ("v1.14.0", "crash")):
                make_image_dir(root / "images", IMAGE, version, edgecore_behaviour=behaviour)
            images = {"local": {"dir": "/images"}}
        cert, key = pki.client("node-1")
        config = {
            "node_name": "node-1", "paths": {"root": str(root)},
            "service": {"manager": "process"},
            "health": {"grace_seconds": 2, "start_timeout_seconds": 10,
                       "poll_interval_seconds": 0.2},
            "precheck": {"reserve_bytes": 1048576}, "images": images,
            "transport": {"kind": "mqtt", "mqtt": {
                "host": "127.0.0.1", "port": broker.port, "ca_file": str(pki.ca_cert),
                "cert_file": str(cert), "key_file": str(key)}},
            "logging": {"level": "info"}}
        (BASE / "agent.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        with (BASE / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(BASE / "agent.yaml"), "run"],
                cwd=REPO, stdout=log, stderr=log)
        cloud = Cloud(broker)
        wait(lambda: any(p["online"] for p in cloud.presence()))
        print("agent: online (its log is .rehearsal/agent.log)\n", flush=True)
        results = {}
        for job, version in (("rehearse-upgrade", "v1.13.0"), ("rehearse-crash", "v1.14.0")):
            print(f"controller -> node-1: upgrade to {version} (job {job})", flush=True)
            cloud.send({"jobName": job, "version": version})
            wait(lambda job=job: cloud.finals(job))
            for report in cloud.status(job):
                show(report)
            results[job] = cloud.finals(job)[0]["result"]
            print(flush=True)
        ok = results == {"rehearse-upgrade": "upgrade_success",
                         "rehearse-crash": "upgrade_failed_rollback_success"}
        print(f"results: {results} -> {'as expected' if ok else 'UNEXPECTED'}")
        return 0 if ok else 1
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        if cloud is not None:
            cloud.close()
        stop_edgecore(root)
        for server in stoppers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
