"""Benchmark: the containerd image backend against ``ctr``, from a private registry.

Run from the repository root::

    python bench/containerd_pull.py [--pad-mib 100] [--rounds 5] [--json]

Starts a private ``containerd`` (own root and socket) and a Debian
``docker-registry`` with htpasswd auth on loopback, pushes an
installation-package image (keadm, edgecore, and ``--pad-mib`` MiB of random
bytes in a layer of their own, so a pull takes measurable time) built
without Docker (``testkit/oci.py``). Then, for ``--rounds`` rounds in
alternating order, each contestant fetches the image into ``k8s.io`` and
takes keadm and edgecore out of it, the image removed before every timed
run, with its content and snapshots (every image name, CRI's ``sha256:<id>``
included, then ``ctr leases rm --sync``: ctr's pulls hold a lease for 24 h):

- baseline, ``ctr``: ``ctr images pull --plain-http --user u:p`` (the
  password on the command line: acceptable for a bench, the reason the agent
  does not do it), ``ctr images mount``, two copies, ``ctr images unmount``;
- ours: ``ContainerdImageBackend.pull()`` then ``.extract()``.

Prints the medians (pull, extraction, total) and the ratios ours/ctr.
Everything is removed in a ``finally``. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from agent.adapters.containerd_images import (  # noqa: E402
    ContainerdImageBackend,
    ContainerdSettings,
)
from agent.adapters.images import EDGECORE, KEADM  # noqa: E402
from agent.adapters.registry import node_platform  # noqa: E402
from agent.config import Images, RegistryAuth  # noqa: E402
from agent.versions import parse_image  # noqa: E402
from testkit.containerdenv import Containerd  # noqa: E402
from testkit.dockerenv import Registry  # noqa: E402
from testkit.oci import Pusher, image, layer  # noqa: E402

USER, PASSWORD = "bench", "bench-s3cret"
REPO_NAME = "kubeedge/installation-package"
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ctr_fetch(ctd: Containerd, ref: str, dest: Path) -> tuple[float, float]:
    started = time.perf_counter()
    ctd.ctr("images", "pull", "--plain-http", "--user", f"{USER}:{PASSWORD}", ref)
    pulled = time.perf_counter()
    mount = dest / "mnt"
    mount.mkdir(parents=True, exist_ok=True)
    ctd.ctr("images", "mount", ref, str(mount))
    try:
        for name in (KEADM, EDGECORE):
            shutil.copyfile(mount / name.lstrip("/"), dest / Path(name).name)
    finally:
        ctd.ctr("images", "unmount", "--rm", str(mount))
    return pulled - started, time.perf_counter() - pulled


async def ours_fetch(backend: ContainerdImageBackend, ref: str,
                     dest: Path) -> tuple[float, float]:
    image_ref = parse_image(ref)
    started = time.perf_counter()
    await backend.pull(image_ref, time.monotonic() + 600, lambda _: None)
    pulled = time.perf_counter()
    await backend.extract(image_ref, [KEADM, EDGECORE], dest)
    return pulled - started, time.perf_counter() - pulled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pad-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-ctd-"))
    ctd = Containerd(work / "containerd")
    registry = Registry(work / "registry", {USER: PASSWORD})
    try:
        ctd.start()
        registry.start()
        keadm, edgecore = os.urandom(40 * MIB), os.urandom(40 * MIB)
        pad = layer({"opt/padding": os.urandom(args.pad_mib * MIB)})
        top = layer({"usr/local/bin/keadm": keadm, "usr/local/bin/edgecore": edgecore})
        built = image([pad, top], arch=node_platform().architecture)
        Pusher(registry.address, USER, PASSWORD).push(REPO_NAME, "v1.19.0", built)
        ref = f"{registry.address}/{REPO_NAME}:v1.19.0"
        transfer = sum(len(b) for b in built.blobs.values())
        password = work / "password"
        password.write_text(PASSWORD)
        backend = ContainerdImageBackend(
            Images(backend="containerd", allowed_registries=(registry.address,),
                   credentials=(RegistryAuth(registry.address, USER, str(password)),)),
            ContainerdSettings(address=str(ctd.socket), root=str(ctd.root)), work / "downloads")
        results: dict[str, list[tuple[float, float]]] = {"ctr": [], "ours": []}
        for n in range(args.rounds + 1):  # round 0 warms caches and is not counted
            order = ("ctr", "ours") if n % 2 else ("ours", "ctr")
            for who in order:
                ctd.clear()
                if ctd.ctr("content", "ls", "-q").stdout.strip():
                    raise SystemExit("content left in containerd: the runs would not be equal")
                dest = work / f"out-{who}-{n}"
                dest.mkdir()
                timing = (ctr_fetch(ctd, ref, dest) if who == "ctr"
                          else asyncio.run(ours_fetch(backend, ref, dest)))
                if (dest / "keadm").read_bytes() != keadm or \
                        (dest / "edgecore").read_bytes() != edgecore:
                    raise SystemExit(f"{who}: extracted files differ")
                shutil.rmtree(dest)
                if n:
                    results[who].append(timing)
                log(f"round {n} {who}: pull {timing[0]:.3f}s, extract {timing[1]:.3f}s")
    finally:
        registry.stop()
        ctd.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(who: str, i: int | None) -> float:
        values = [t[0] + t[1] if i is None else t[i] for t in results[who]]
        return statistics.median(values)

    out: dict[str, Any] = {
        "transfer_mib": round(transfer / MIB, 1), "rounds": args.rounds,
        **{f"{who}_median_{k}_s": round(med(who, i), 3)
           for who in ("ctr", "ours") for k, i in (("pull", 0), ("extract", 1), ("total", None))},
        "ratio_total": round(med("ours", None) / med("ctr", None), 2),
        "ratio_pull": round(med("ours", 0) / med("ctr", 0), 2),
        "ratio_extract": round(med("ours", 1) / med("ctr", 1), 2),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"image: {out['transfer_mib']} MiB to transfer, {args.rounds} rounds")
        print(f"{'':6}{'pull s':>9}{'extract s':>11}{'total s':>9}")
        for who in ("ctr", "ours"):
            print(f"{who:6}{out[f'{who}_median_pull_s']:9.3f}"
                  f"{out[f'{who}_median_extract_s']:11.3f}{out[f'{who}_median_total_s']:9.3f}")
        print(f"ratio ours/ctr: total {out['ratio_total']:.2f}x, pull {out['ratio_pull']:.2f}x, "
              f"extract {out['ratio_extract']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
