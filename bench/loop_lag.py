"""Benchmark: event-loop lag while the agent backs up edgecore.

Run from the repository root::

    python bench/loop_lag.py [--size-mib 1024] [--dir /var/tmp] [--json]

Creates an ``edgecore`` binary and a SQLite ``edgecore.db`` that together hold
``--size-mib`` MiB (half each), then runs ``make_backup`` twice inside an
asyncio loop while a ticker task sleeps 10 ms at a time and records how late
each wake-up is (the lag every other task, the MQTT keepalive and the systemd
watchdog among them, would see):

* ``on-loop``: ``make_backup`` called directly from a coroutine, as the agent
  did before: the baseline, in the same process;
* ``thread``: ``await asyncio.to_thread(make_backup, …)``, as the runner does now.

Prints, for each, the backup's wall time and the ticker's p50, p99 and max
lag, and the ratio of max lags. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backup_throughput import source_files, write_db, write_random  # noqa: E402

from agent.steps.backup import make_backup  # noqa: E402

MIB = 1024 * 1024
TICK = 0.010


async def measure(run: Callable[[], Awaitable[object]]) -> dict[str, float]:
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            lags.append(time.perf_counter() - start - TICK)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker take its first step
    start = time.perf_counter()
    await run()
    wall = time.perf_counter() - start
    done.set()
    await task
    lags.sort()
    return {"wall_s": wall, "ticks": len(lags),
            "lag_p50_ms": 1000 * statistics.median(lags) if lags else 0.0,
            "lag_p99_ms": 1000 * lags[int(len(lags) * 0.99) - 1] if lags else 0.0,
            "lag_max_ms": 1000 * max(lags, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="binary + database, in MiB")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eua-loop-lag-", dir=args.dir))
    try:
        files = source_files(work / "src")
        half = args.size_mib * MIB // 2
        write_random(files.binary, half)
        write_db(files.db, half)
        files.config.write_text("apiVersion: edgecore.config.kubeedge.io/v1alpha2\n")

        async def on_loop() -> object:
            return make_backup(work / "a", "v1.12.1", files)

        async def in_thread() -> object:
            return await asyncio.to_thread(make_backup, work / "b", "v1.12.1", files)

        results: dict[str, Any] = {"size_mib": args.size_mib}
        for name, fn in (("on-loop", on_loop), ("thread", in_thread)):
            results[name] = asyncio.run(measure(fn))
            shutil.rmtree(work / ("a" if name == "on-loop" else "b"))
        base, ours = results["on-loop"]["lag_max_ms"], results["thread"]["lag_max_ms"]
        results["max_lag_ratio_thread_vs_on_loop"] = ours / base if base else None
        if args.json:
            print(json.dumps(results, indent=2))
            return 0
        print(f"backup of {args.size_mib} MiB (binary + SQLite DB), ticker every "
              f"{TICK * 1000:g} ms")
        print(f"{'mode':8} {'wall s':>7} {'ticks':>6} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>8}")
        for name in ("on-loop", "thread"):
            r = results[name]
            print(f"{name:8} {r['wall_s']:7.2f} {r['ticks']:6d} {r['lag_p50_ms']:7.2f} "
                  f"{r['lag_p99_ms']:8.2f} {r['lag_max_ms']:8.1f}")
        print(f"max lag, thread / on-loop: {results['max_lag_ratio_thread_vs_on_loop']:.4f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
