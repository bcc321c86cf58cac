"""Benchmark: the daemon's start-to-READY time against bare interpreter start-up.

Run from the repository root::

    python bench/start_to_ready.py [--rounds 5] [--json]

Each round builds a fresh sandbox (agent config with ``node_name: node-1``,
``paths.root: <sandbox>``, ``service.manager: process`` and the default spool
transport; no edgecore, an empty journal), binds a unix datagram socket and
starts ``python -m agent --config <cfg> run`` with ``NOTIFY_SOCKET`` pointing
at it. The time from spawn to the ``READY=1`` datagram is measured, then the
daemon gets SIGTERM (the time to its exit is reported too). Baselines, timed
in the same rounds from spawn to exit: ``python -c pass`` (interpreter start)
and ``python -c "import agent.cli"`` (interpreter plus the agent's imports).
Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class NotReady(Exception):
    def __init__(self, why: str, stderr: str) -> None:
        super().__init__(why)
        self.why = why
        self.stderr = stderr


def write_config(work: Path) -> Path:
    root = work / "root"
    root.mkdir()
    cfg = work / "agent.yaml"
    cfg.write_text(
        "node_name: node-1\n"
        "paths:\n"
        f"  root: {json.dumps(str(root))}\n"
        "service:\n"
        "  manager: process\n",
        encoding="utf-8",
    )
    return cfg


def child_env(notify: Path | None, pycache: Path | None) -> dict[str, str]:
    drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    if pycache is not None:
        drop.add("PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if pycache is not None:
        # Byte-code cached outside the source tree, as pip's install-time .pyc files would be.
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify)
    return env


def time_exit(code: str, pycache: Path | None) -> float:
    """Seconds from spawn to exit of ``python -c code`` (cwd: the repository)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(None, pycache),
                   check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def time_ready(parent: Path, pycache: Path | None) -> tuple[float, float]:
    """(spawn to READY=1, SIGTERM to exit) of one daemon in a fresh sandbox."""
    work = Path(tempfile.mkdtemp(prefix="eua-ready-", dir=parent))
    try:
        cfg = write_config(work)
        sock_path = work / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
                tempfile.TemporaryFile(dir=work) as err:
            sock.bind(str(sock_path))
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--config", str(cfg), "run"],
                cwd=REPO, env=child_env(sock_path, pycache), stdin=subprocess.DEVNULL,
                stdout=err, stderr=subprocess.STDOUT,
            )
            try:
                ready = _wait_ready(sock, proc, start, err)
                # A pidfd turns readable at the exact exit; Popen.wait(timeout) would poll
                # with back-off and round the stop time up to 31.5 or 63.5 ms.
                pidfd = os.pidfd_open(proc.pid)
                try:
                    proc.send_signal(signal.SIGTERM)
                    stop_start = time.perf_counter()
                    exited, _, _ = select.select([pidfd], [], [], STOP_TIMEOUT)
                    stopped = time.perf_counter() - stop_start
                finally:
                    os.close(pidfd)
                if not exited:
                    raise NotReady(f"daemon did not exit {STOP_TIMEOUT:.0f} s after SIGTERM",
                                   _read(err))
                rc = proc.wait()
                if rc != 0:
                    raise NotReady(f"daemon exited with {rc} after SIGTERM", _read(err))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return ready, stopped
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], start: float,
                err: IO[bytes]) -> float:
    deadline = start + READY_TIMEOUT
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise NotReady(f"no READY=1 within {READY_TIMEOUT:.0f} s", _read(err))
        # Short waits so that a daemon that dies early is noticed at once.
        sock.settimeout(min(left, 0.05))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise NotReady(f"daemon exited with {proc.returncode} before READY=1",
                               _read(err)) from None
            continue
        if "READY=1" in data.decode(errors="replace").splitlines():
            return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="parent of the per-round sandboxes (each removed after its round)")
    ap.add_argument("--pyc", choices=("cached", "env"), default="cached",
                    help="cached (default): children write and reuse .pyc files under a "
                         "temporary PYTHONPYCACHEPREFIX, as on an installed node; env: inherit "
                         "the environment as is (PYTHONDONTWRITEBYTECODE=1 recompiles every run)")
    ap.add_argument("--json", action="store_true", help="print machine-readable results only")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    series: dict[str, list[float]] = {"python -c pass": [], "import agent.cli": [],
                                      "start to READY": [], "SIGTERM to exit": []}
    pycache = (Path(tempfile.mkdtemp(prefix="eua-pycache-", dir=args.dir))
               if args.pyc == "cached" else None)
    try:
        # Untimed warm-up: byte-compile the agent once, warm the page cache.
        time_exit("pass", pycache)
        time_exit("import agent.cli", pycache)
        time_ready(args.dir, pycache)
        for r in range(args.rounds):
            series["python -c pass"].append(time_exit("pass", pycache))
            series["import agent.cli"].append(time_exit("import agent.cli", pycache))
            ready, stopped = time_ready(args.dir, pycache)
            series["start to READY"].append(ready)
            series["SIGTERM to exit"].append(stopped)
            print(f"round {r + 1}/{args.rounds}: READY after {ready * 1000:.1f} ms",
                  file=sys.stderr, flush=True)
    except NotReady as exc:
        print(f"start_to_ready: {exc.why}; daemon stdout+stderr:\n{exc.stderr}", file=sys.stderr)
        return 1
    finally:
        if pycache is not None:
            shutil.rmtree(pycache, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in series.items()}
    ratios = {
        "ready/python-startup": med["start to READY"] / med["python -c pass"],
        "ready/import-agent": med["start to READY"] / med["import agent.cli"],
    }
    if args.json:
        print(json.dumps({
            "rounds": args.rounds,
            "python": sys.version.split()[0],
            "pyc": args.pyc,
            "median_ms": {k: round(v * 1000, 2) for k, v in med.items()},
            "runs_ms": {k: [round(x * 1000, 2) for x in v] for k, v in series.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
        }, indent=2))
        return 0
    print(f"python {sys.version.split()[0]}, pyc: {args.pyc}, rounds: {args.rounds}")
    print(f"{'':18}{'median ms':>10}   all runs (ms)")
    for name, values in series.items():
        runs = " ".join(f"{x * 1000:.1f}" for x in values)
        print(f"{name:18}{med[name] * 1000:10.1f}   {runs}")
    own = med["start to READY"] - med["import agent.cli"]
    print(f"READY minus import-to-exit: {own * 1000:+.1f} ms (the import baseline also pays "
          "interpreter shutdown, so this understates the daemon's own set-up)")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x (median of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
