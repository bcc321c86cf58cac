"""Benchmark: a burst of 10,000 mixed commands and 1,000 sequential upgrades, one daemon.

Run from the repository root::

    .venv/bin/python bench/load.py [--burst 10000] [--jobs 1000] [--baseline-job 10]
                                   [--dir /var/tmp] [--keep] [--json]

The rig and both phases are ``testkit/load.py`` (``tests/test_load.py`` runs
the same code at CI size); the command mix is ``testkit/load_mix.py``. One
``python -m agent run`` over MQTT with mutual TLS to a real Mosquitto, on a
sandboxed node with the stand-in edgecore, all in a temporary directory under
``--dir``, removed at the end unless ``--keep``.

Phase 1 publishes ``--burst`` commands back to back (about half valid:
dry runs, checks, skips, prepulls, Era A skips, duplicates of finished jobs;
the rest invalid in 17 ways) and checks that each is answered: every valid one
by exactly one final report, every invalid one by a rejection report or by
presence's ``rejectedUnreported`` (the rate limiter, 60 reports a minute).
Phase 2 runs ``--jobs`` real upgrades one at a time, alternating v1.13.0 and
v1.12.1, with a custom installer that only swaps the binary, and compares
VmRSS after the last job with VmRSS after ``--baseline-job``.

Exit code 1 if anything was lost, answered twice or wrongly, or RSS grew by
more than 10 %. Progress goes to stderr, the summary (Markdown tables) to
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testkit.load import BurstResult, JobsResult, Rig, run_burst, run_jobs  # noqa: E402


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=10_000, help="commands in the burst")
    ap.add_argument("--jobs", type=int, default=1_000, help="sequential upgrade jobs")
    ap.add_argument("--baseline-job", type=int, default=10,
                    help="the job after which the reference RSS is read")
    ap.add_argument("--burst-timeout", type=float, default=900,
                    help="seconds the whole burst may take to be answered")
    ap.add_argument("--dir", default="/var/tmp", help="where the work directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    args = ap.parse_args(argv)
    if not 1 <= args.baseline_job <= args.jobs:
        ap.error("--baseline-job must be between 1 and --jobs")
    return args


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def summary(burst: BurstResult, jobs: JobsResult, wall_s: float, loads: tuple[str, str]) -> str:
    per = jobs.per_job()
    lines = [
        f"Load: {os.cpu_count()} cores; `uptime` before: {loads[0]}; after: {loads[1]}",
        "",
        "| burst | value |",
        "|---|---|",
        f"| commands | {burst.sent} ({burst.valid} valid, {burst.invalid} invalid, "
        f"{len(burst.kinds)} kinds) |",
        f"| published (all PUBACKed by the broker) | {burst.publish_s:.1f} s |",
        f"| all answered (sentinel's final report) | {burst.done_s:.1f} s |",
        f"| rate | {burst.rate:.0f} commands/s |",
        "| valid: final reports | each exactly one |" if not burst.problems else
        "| valid: final reports | see problems |",
        f"| invalid: rejection reports + rejectedUnreported | {burst.rejections_reported} + "
        f"{burst.rejections_unreported} = "
        f"{burst.rejections_reported + burst.rejections_unreported} |",
        f"| presence rejectedCommands | {burst.rejected_commands} |",
        f"| daemon VmRSS before / after | {mib(burst.rss_before_kib)} / "
        f"{mib(burst.rss_after_kib)} MiB |",
        f"| files in <state_dir>/logs after the burst | {burst.job_log_files} |",
        f"| most commands unacked at the daemon at once | {burst.peak_unacked} |",
        "",
        "| after job | VmRSS (MiB) | vs job " + str(jobs.baseline_job) + " |",
        "|---|---|---|",
    ]
    base = jobs.rss_kib.get(jobs.baseline_job)
    for n, kib in sorted(jobs.rss_kib.items()):
        ratio = f"{kib / base:.3f}x" if base else "-"
        lines.append(f"| {n} | {mib(kib)} | {ratio} |")
    lines += [
        "",
        "| jobs | value |",
        "|---|---|",
        f"| upgrades (send to final report) | {len(jobs.seconds)} of {jobs.jobs}, "
        f"results {dict(jobs.results)} |",
        f"| per job: mean / p50 / p99 / max | {per['mean']:.3f} / {per['p50']:.3f} / "
        f"{per['p99']:.3f} / {per['max']:.3f} s |" if jobs.seconds else "| per job | - |",
        f"| per job: mean of the first / last tenth | {per['first_tenth']:.3f} / "
        f"{per['last_tenth']:.3f} s |" if jobs.seconds else "| per job, tenths | - |",
        f"| RSS after job {jobs.jobs} / after job {jobs.baseline_job} | "
        + (f"{jobs.rss_ratio:.3f} (limit 1.10) |" if jobs.jobs in jobs.rss_kib else "- |"),
        f"| wall time, set-up included | {wall_s:.0f} s |",
    ]
    problems = burst.problems + jobs.problems
    lines += ["", "Problems: " + ("none" if not problems else "")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loads = [uptime()]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="load-", dir=args.dir))
    rig = Rig(work)
    try:
        rig.start()
        progress(f"daemon pid {rig.pid} online; work dir {work}")
        progress(f"burst of {args.burst} commands ...")
        burst = run_burst(rig, args.burst, timeout=args.burst_timeout)
        progress(f"burst answered in {burst.done_s:.1f} s ({burst.rate:.0f}/s); "
                 f"{args.jobs} jobs ...")
        jobs = run_jobs(rig, args.jobs, baseline_job=args.baseline_job)
        rig.check_alive()
    finally:
        rig.close()
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    loads.append(uptime())
    if args.json:
        out: dict[str, Any] = {"burst": asdict(burst), "jobs": asdict(jobs), "wall_s": wall,
                               "uptime": loads}
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(summary(burst, jobs, wall, (loads[0], loads[1])))
    return 1 if burst.problems or jobs.problems else 0


if __name__ == "__main__":
    sys.exit(main())
