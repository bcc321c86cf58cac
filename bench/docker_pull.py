"""Benchmark: the docker image backend against the docker CLI, from a private registry.

Run from the repository root::

    python bench/docker_pull.py [--pad-mib 100] [--rounds 5] [--json]

Starts a private ``dockerd`` and a Debian ``docker-registry`` with htpasswd
auth on loopback (``testkit/dockerenv.py``), builds an installation-package
image (the stand-in ``keadm`` and ``edgecore`` from ``testkit/standins`` plus
``--pad-mib`` MiB of random bytes, so that a pull takes measurable time) and
pushes it with credentials. Then, for ``--rounds`` rounds, alternating the
order, each contestant fetches the image and takes both files out of it, with
the image removed from the engine before every timed run:

- baseline, the docker CLI (logged in once, with ``--password-stdin``, into a
  temporary ``DOCKER_CONFIG``): ``docker pull``, ``docker create <ref>
  /nonexistent``, two ``docker cp`` and ``docker rm``;
- ours: ``DockerImageBackend.pull()`` then ``.extract()``.

Prints the medians (pull, extraction, total), the pull throughput and the
ratio ours/CLI. Everything (daemons, containers, image, work directory, the
temporary DOCKER_CONFIG with its credentials) is removed in a ``finally``.
Never run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.adapters.docker_images import DockerImageBackend, DockerSettings, registry_size  # noqa: E402
from agent.adapters.images import EDGECORE, KEADM  # noqa: E402
from agent.config import Images, RegistryAuth  # noqa: E402
from agent.versions import ImageRef, parse_image  # noqa: E402
from testkit.dockerenv import (  # noqa: E402
    Dockerd,
    DockerUnavailable,
    Registry,
    RegistryUnavailable,
    build_package_image,
    push,
    remove_image,
)
from testkit.standins import write_edgecore, write_keadm  # noqa: E402

MIB = 1024 * 1024
USER = "edge"
PASSWORD = "bench-" + os.urandom(8).hex()  # for the throw-away registry only
REPO_NAME = "kubeedge/installation-package"
VERSION = "v1.13.0"
CLI_TIMEOUT = 300.0  # seconds, for every docker CLI call
PULL_DEADLINE = 300.0  # seconds, for every pull of ours


@dataclass
class Series:
    name: str
    pull: list[float] = field(default_factory=list)
    extract: list[float] = field(default_factory=list)

    @property
    def total(self) -> list[float]:
        return [p + e for p, e in zip(self.pull, self.extract, strict=True)]

    def to_dict(self, nbytes: int) -> dict[str, Any]:
        pull = statistics.median(self.pull)
        return {
            "pull_s": [round(s, 4) for s in self.pull],
            "extract_s": [round(s, 4) for s in self.extract],
            "total_s": [round(s, 4) for s in self.total],
            "median_pull_s": round(pull, 4),
            "median_extract_s": round(statistics.median(self.extract), 4),
            "median_total_s": round(statistics.median(self.total), 4),
            "pull_mib_per_s": round(nbytes / MIB / pull, 1),
        }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def docker_cli() -> str:
    cli = shutil.which("docker")
    if cli is None:
        raise SystemExit("docker CLI not found on PATH (Debian: apt-get install docker.io)")
    return cli


def docker_cli_version() -> str:
    out = subprocess.run([docker_cli(), "--version"], capture_output=True, text=True,
                         timeout=30, check=False).stdout.strip()
    return out.removeprefix("Docker version ")


class Cli:
    """The docker CLI against the private daemon, with its own DOCKER_CONFIG."""

    def __init__(self, host: str, config_dir: Path) -> None:
        self.argv0 = [docker_cli(), "-H", host]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self.env |= {"DOCKER_CONFIG": str(config_dir), "DOCKER_CLI_HINTS": "false"}

    def run(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([*self.argv0, *args], input=stdin, capture_output=True,
                              text=True, env=self.env, timeout=CLI_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"docker {args[0]} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-500:]}")
        return proc.stdout

    def login(self, registry: str) -> None:
        self.run("login", "--username", USER, "--password-stdin", registry, stdin=PASSWORD)

    def fetch(self, ref: str, dest: Path) -> tuple[float, float]:
        """pull, then create + cp + cp + rm: (pull seconds, extraction seconds)."""
        start = time.perf_counter()
        self.run("pull", ref)
        pulled = time.perf_counter()
        cid = self.run("create", ref, "/nonexistent").strip()
        try:
            for name in (KEADM, EDGECORE):
                self.run("cp", f"{cid}:{name}", str(dest))
        finally:
            self.run("rm", cid)
        return pulled - start, time.perf_counter() - pulled


async def fetch_ours(backend: DockerImageBackend, ref: ImageRef,
                     dest: Path) -> tuple[float, float, str, int]:
    """pull() then extract(): (pull s, extraction s, digest, progress reports)."""
    reports: list[str] = []
    start = time.perf_counter()
    info = await backend.pull(ref, time.monotonic() + PULL_DEADLINE, reports.append)
    pulled = time.perf_counter()
    await backend.extract(ref, [KEADM, EDGECORE], dest)
    return pulled - start, time.perf_counter() - pulled, info.digest, len(reports)


def check_files(dest: Path, expected: dict[str, bytes], who: str) -> None:
    for name, data in expected.items():
        got = dest / Path(name).name
        if not got.is_file() or got.read_bytes() != data:
            raise RuntimeError(f"{who}: {name} was not extracted intact into {dest}")


def sync_fs(path: Path) -> None:
    subprocess.run(["sync", "-f", str(path)], check=True, timeout=120)


def remove_leftovers(client: Any, ref: str) -> None:
    """Every container of the private daemon, then the image (its layers go with it)."""
    for container in client.containers.list(all=True):
        with contextlib.suppress(Exception):
            container.remove(force=True)
    remove_image(client, ref)
    if client.images.list(name=ref.rsplit(":", 1)[0]):
        raise RuntimeError(f"{ref} is still present after removal")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pad-mib", type=int, default=100,
                    help="MiB of random bytes in the image besides keadm and edgecore "
                         "(default 100)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each before the rounds (default 1)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="parent of the temporary work directory: dockerd's data root and "
                         "the registry's storage (removed at the end)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    args = ap.parse_args(argv)
    if args.pad_mib < 0 or args.rounds < 1 or args.warmup < 0:
        ap.error("--pad-mib and --warmup must be at least 0, --rounds at least 1")
    cli_version = docker_cli_version()

    work = Path(tempfile.mkdtemp(prefix="eua-bench-docker-", dir=args.dir))
    # The CLI's login lands here (base64 in config.json): removed in the finally.
    config_dir = Path(tempfile.mkdtemp(prefix="eua-bench-docker-config-"))
    dockerd = Dockerd(work / "dockerd")
    registry = Registry(work / "registry", {USER: PASSWORD})
    client: Any = None
    ref_text = ""
    try:
        log(f"starting dockerd and docker-registry under {work} ...")
        try:
            dockerd.start()
            registry.start()
        except (DockerUnavailable, RegistryUnavailable) as exc:
            log(f"cannot run the private engine or registry: {exc}")
            return 1
        client = dockerd.client(timeout=int(CLI_TIMEOUT))
        info = client.info()
        ref_text = f"{registry.address}/{REPO_NAME}:{VERSION}"
        ref = parse_image(ref_text)

        keadm = write_keadm(work / "bin/keadm", VERSION)
        edgecore = write_edgecore(work / "bin/edgecore", VERSION)
        expected = {KEADM: keadm.read_bytes(), EDGECORE: edgecore.read_bytes()}
        log(f"building {ref_text} with {args.pad_mib} MiB of padding and pushing it ...")
        build_package_image(client, ref_text, {KEADM: keadm, EDGECORE: edgecore},
                            pad_bytes=args.pad_mib * MIB)
        digest = push(client, ref_text, USER, PASSWORD)
        image_size = int(client.api.inspect_image(ref_text)["Size"])
        remove_leftovers(client, ref_text)
        password_file = work / "registry-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        auth = {"username": USER, "password": PASSWORD}
        transfer = registry_size(ref, auth)  # what a pull downloads: config + layers
        if transfer <= 0:
            raise RuntimeError("could not read the image size from the registry manifest")

        backend = DockerImageBackend(Images(
            backend="docker", allowed_registries=(registry.address,),
            credentials=(RegistryAuth(registry.address, USER, str(password_file)),),
            progress_interval_seconds=5.0), DockerSettings(dockerd.host, None))
        cli = Cli(dockerd.host, config_dir)
        log("docker login (once) ...")
        cli.login(registry.address)
        saved = json.loads((config_dir / "config.json").read_text())
        if registry.address not in saved.get("auths", {}) or saved.get("credsStore"):
            log(f"warning: the CLI did not store the login in {config_dir}/config.json")

        cli_s, ours_s = Series("docker CLI"), Series("ours")
        progress_reports: list[int] = []

        def one(kind: str, series: Series | None, label: str) -> None:
            dest = work / "out" / f"{kind}-{label}"
            dest.mkdir(parents=True)
            remove_leftovers(client, ref_text)
            sync_fs(dockerd.data_root)
            if kind == "cli":
                pull_s, extract_s = cli.fetch(ref_text, dest)
                got = client.images.get(ref_text).attrs.get("RepoDigests") or []
                if f"{ref.repo}@{digest}" not in got:
                    raise RuntimeError(f"docker CLI pulled {got}, pushed {digest}")
            else:
                pull_s, extract_s, got_digest, reports = asyncio.run(
                    fetch_ours(backend, ref, dest))
                if got_digest != digest:
                    raise RuntimeError(f"ours pulled {got_digest}, pushed {digest}")
                progress_reports.append(reports)
            check_files(dest, expected, kind)
            if client.containers.list(all=True):
                raise RuntimeError(f"{kind} left a container behind")
            shutil.rmtree(dest)
            if series is not None:
                series.pull.append(pull_s)
                series.extract.append(extract_s)
            log(f"{label}: {kind:4} pull {pull_s:7.3f} s  extract {extract_s:6.3f} s  "
                f"total {pull_s + extract_s:7.3f} s")

        for w in range(args.warmup):
            for kind in ("cli", "ours"):
                one(kind, None, f"warm-up {w + 1}/{args.warmup}")
        for r in range(args.rounds):
            order = [("cli", cli_s), ("ours", ours_s)]
            if r % 2:
                order.reverse()
            for kind, series in order:
                one(kind, series, f"round {r + 1}/{args.rounds}")
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                remove_leftovers(client, ref_text)
            client.close()
        registry.stop()
        dockerd.stop()
        shutil.rmtree(config_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    total_ratio = statistics.median(ours_s.total) / statistics.median(cli_s.total)
    pull_ratio = statistics.median(ours_s.pull) / statistics.median(cli_s.pull)
    extract_ratio = statistics.median(ours_s.extract) / statistics.median(cli_s.extract)
    result: dict[str, Any] = {
        "pad_mib": args.pad_mib,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "transfer_bytes": transfer,
        "image_size_bytes": image_size,
        "digest": digest,
        "engine": f"dockerd {info.get('ServerVersion')} ({info.get('Driver')})",
        "docker_cli": cli_version,
        "baseline_docker_cli": cli_s.to_dict(transfer),
        "ours": ours_s.to_dict(transfer),
        "progress_reports_per_pull": progress_reports,
        "ratio_ours_over_cli_total": round(total_ratio, 3),
        "ratio_ours_over_cli_pull": round(pull_ratio, 3),
        "ratio_ours_over_cli_extract": round(extract_ratio, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"image: {transfer / MIB:.1f} MiB to transfer ({args.pad_mib} MiB padding), "
          f"{result['engine']}, docker CLI {cli_version}, rounds: {args.rounds}")
    print(f"{'':12}{'pull s':>9}{'MiB/s':>8}{'extract s':>11}{'total s':>9}   all totals (s)")
    for s in (cli_s, ours_s):
        d = s.to_dict(transfer)
        runs = " ".join(f"{x:.3f}" for x in s.total)
        print(f"{s.name:12}{d['median_pull_s']:9.3f}{d['pull_mib_per_s']:8.1f}"
              f"{d['median_extract_s']:11.3f}{d['median_total_s']:9.3f}   {runs}")
    print(f"ratio ours/CLI: total {total_ratio:.2f}x, pull {pull_ratio:.2f}x, "
          f"extract {extract_ratio:.2f}x (medians of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
