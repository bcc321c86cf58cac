"""Load on one real daemon: a burst of mixed commands, then sequential upgrades.

Shared by ``bench/load.py`` (10,000 commands, 1,000 jobs) and
``tests/test_load.py`` (CI size). One ``python -m agent --config … run``
over MQTT v5 with mutual TLS to a real Mosquitto rendered from the production
sample (``testkit/broker.py``: the ACL, ``max_queued_messages 10000``), on a
sandboxed node with the stand-in edgecore (``testkit/standins``). MQTT, not the
spool, because only MQTT carries presence, whose ``rejectedCommands`` and
``rejectedUnreported`` account for the rejections the rate limiter does not
report, and because it is the production path.

Phases:

1. **Burst** (:func:`run_burst`): :data:`~testkit.load_mix.SEEDS` seed jobs
   first, then the messages of :func:`~testkit.load_mix.burst_commands`
   published back to back (QoS 1; the broker holds the backlog, as the
   daemon takes one unacked command at a time), then one sentinel job.
   Intake takes messages in order, so once the sentinel's final report and
   the presence after it are in, every message of the burst has been taken
   in and its reports sent before it.
2. **Jobs** (:func:`run_jobs`): real upgrades v1.12.1 → v1.13.0 → v1.12.1 …
   (``policy.allow_downgrade``) with the custom installer ``swap``
   (:data:`testkit.load_rig.SWAP_INSTALLER`), one at a time: each is sent once the previous
   one's final report and the presence saying it ended are in; VmRSS is read
   then.

Nothing here asserts: each phase returns what it saw and a list of problems,
so the bench can print everything and the test can show all of them. The rig
(broker, node, daemon, the indexed controller) is ``testkit/load_rig.py``, the
command mix ``testkit/load_mix.py``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.transport.mqtt import RECEIVE_MAXIMUM
from testkit.load_mix import (
    FROM_VERSION,
    SEEDS,
    TO_VERSION,
    Sent,
    burst_commands,
    seed_command,
)
from testkit.load_rig import Rig, send_and_wait, vm_rss_kib

__all__ = ["BurstResult", "JobsResult", "Rig", "checkpoints", "run_burst", "run_jobs"]


# -- phase 1: the burst ------------------------------------------------------------------


@dataclass
class BurstResult:
    sent: int
    valid: int
    invalid: int
    kinds: Counter[str]
    publish_s: float  # first publish to the broker's last PUBACK
    done_s: float  # first publish to the sentinel's final report
    rejections_reported: int = 0
    rejections_unreported: int = 0
    rejected_commands: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    job_log_files: int = 0  # in <state_dir>/logs after the burst, rejected messages' too
    peak_unacked: int = 0  # commands the broker had sent the daemon unacked at once
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.done_s if self.done_s else 0.0


def _expected_finals(sent: list[Sent]) -> Counter[str]:
    expected: Counter[str] = Counter(s.key for s in sent if s.valid)
    for k in range(SEEDS):
        expected[f"seed-{k}"] += 1  # the seed job's own final report
    expected["burst-end"] = 1
    return expected


def run_burst(rig: Rig, n: int, *, timeout: float) -> BurstResult:
    cloud = rig.cloud
    assert cloud is not None
    for k in range(SEEDS):
        if not send_and_wait(rig, seed_command(k), f"seed-{k}", 60):
            raise RuntimeError(f"seed job seed-{k}: {rig.stuck(f'seed-{k}')}")
    sent = burst_commands(n)
    valid = [s for s in sent if s.valid]
    invalid = [s for s in sent if not s.valid]
    rss_before = vm_rss_kib(rig.pid)
    t0 = time.perf_counter()
    cloud.publish_all([s.payload for s in sent])
    publish_s = time.perf_counter() - t0
    # Published after the burst, so intake takes it in last: its final report,
    # and the presence published when it ends, come after every burst message.
    done = send_and_wait(rig, {"jobName": "burst-end", "version": FROM_VERSION}, "burst-end",
                         timeout)
    result = BurstResult(n, len(valid), len(invalid), Counter(s.kind for s in sent), publish_s,
                         time.perf_counter() - t0, rss_before_kib=rss_before)
    if not done:
        result.problems.append(f"no final report of the sentinel within {timeout:g} s")
    _settle(rig, result.problems)
    result.rss_after_kib = vm_rss_kib(rig.pid)
    result.job_log_files = sum(1 for _ in (rig.state_dir / "logs").glob("*"))
    with cloud.changed:
        finals = Counter(cloud.final_counts)
        last_final = dict(cloud.last_final)
        presence = dict(cloud.last_presence)
    expected = _expected_finals(sent)
    rejections = {s.key for s in invalid}
    result.rejections_reported = sum(1 for k in finals if k in rejections)
    result.rejections_unreported = int(presence.get("rejectedUnreported", -1))
    result.rejected_commands = int(presence.get("rejectedCommands", -1))
    p = result.problems
    lost = [k for k, count in expected.items() if finals[k] < count]
    extra = [k for k, count in expected.items() if finals[k] > count]
    if lost:
        p.append(f"{len(lost)} valid commands lost their final report, e.g. {lost[:5]}")
    if extra:
        p.append(f"{len(extra)} jobs got more final reports than commands, e.g. {extra[:5]}")
    twice = [k for k in rejections if finals[k] > 1]
    if twice:
        p.append(f"{len(twice)} rejections reported more than once, e.g. {twice[:5]}")
    strangers = [k for k in finals if k not in expected and k not in rejections]
    if strangers:
        p.append(f"{len(strangers)} final reports answer nothing sent, e.g. {strangers[:5]}")
    if result.rejected_commands != len(invalid):
        p.append(f"presence counts {result.rejected_commands} rejected commands, "
                 f"{len(invalid)} invalid ones were sent")
    if result.rejections_reported + result.rejections_unreported != len(invalid):
        p.append(f"{len(invalid)} invalid commands, but {result.rejections_reported} "
                 f"rejection reports + {result.rejections_unreported} unreported")
    p.extend(_wrong_answers(sent, last_final))
    result.peak_unacked = rig.peak_unacked_commands()
    if result.peak_unacked > RECEIVE_MAXIMUM:
        p.append(f"the broker had {result.peak_unacked} commands unacked at the daemon, "
                 f"over its receive maximum {RECEIVE_MAXIMUM}: the burst sat in its memory")
    if rig.broker_dropped():
        p.append("the broker dropped messages (its max_queued_messages): see its log")
    return result


def _settle(rig: Rig, problems: list[str]) -> None:
    """Wait for an empty outbox, then a moment more: a duplicate would arrive now."""
    deadline = time.monotonic() + 60
    while rig.outbox_size() and time.monotonic() < deadline:
        rig.check_alive()
        time.sleep(0.1)
    if rig.outbox_size():
        problems.append(f"{rig.outbox_size()} reports still in the outbox after 60 s")
    time.sleep(1.0)
    rig.check_alive()


# What the final report of each valid kind must say.
_ANSWER: dict[str, Callable[[dict[str, Any]], bool]] = {
    "dry-run": lambda r: r["rehearsal"] is True and r["plan"]["verdict"] == "GO",
    "check": lambda r: r["rehearsal"] is True and r["plan"]["verdict"] == "GO",
    "skip": lambda r: r["phase"] == "skipped",
    "duplicate": lambda r: r["phase"] == "skipped",
    "era-a-skip": lambda r: r["phase"] == "skipped",
    "prepull": lambda r: r["result"] == "prepull_success",
}


def _wrong_answers(sent: list[Sent], last_final: dict[str, dict[str, Any]]) -> list[str]:
    wrong = []
    for s in sent:
        report = last_final.get(s.key)
        if report is None:
            continue  # counted as lost, or unreported by the rate limiter
        ok = _ANSWER[s.kind](report) if s.valid else report["phase"] == "rejected"
        if not ok:
            wrong.append(f"{s.kind} {s.key}: {report.get('phase')} {report.get('reason')!r}")
    return [f"{len(wrong)} wrong answers, e.g. {wrong[:3]}"] if wrong else []


# -- phase 2: sequential jobs -------------------------------------------------------------


@dataclass
class JobsResult:
    jobs: int
    baseline_job: int
    seconds: list[float] = field(default_factory=list)  # send to final report, per job
    rss_kib: dict[int, int] = field(default_factory=dict)  # after job n
    results: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def rss_ratio(self) -> float:
        return self.rss_kib[self.jobs] / self.rss_kib[self.baseline_job]

    def per_job(self) -> dict[str, float]:
        s = sorted(self.seconds)
        tenth = max(1, len(s) // 10)
        # First and last tenth in run order: a cost that grows with the journal shows here.
        return {"mean": statistics.fmean(s), "p50": s[len(s) // 2],
                "p99": s[math.ceil(0.99 * len(s)) - 1], "max": s[-1],  # nearest rank
                "first_tenth": statistics.fmean(self.seconds[:tenth]),
                "last_tenth": statistics.fmean(self.seconds[-tenth:])}


def checkpoints(jobs: int, baseline: int) -> list[int]:
    marks = {1, baseline, jobs} | {jobs * k // 10 for k in range(1, 10)}
    return sorted(m for m in marks if 1 <= m <= jobs)


def run_jobs(rig: Rig, jobs: int, *, baseline_job: int = 10,
             job_timeout: float = 60) -> JobsResult:
    cloud = rig.cloud
    assert cloud is not None
    result = JobsResult(jobs, baseline_job)
    marks = set(checkpoints(jobs, baseline_job))
    for n in range(1, jobs + 1):
        version = TO_VERSION if n % 2 else FROM_VERSION  # every job changes the version
        key = f"seq-{n}"
        t0 = time.perf_counter()
        if not send_and_wait(rig, {"jobName": key, "version": version, "upgradeTool": "swap"},
                             key, job_timeout):
            result.problems.append(f"job {key}: {rig.stuck(key)} after {job_timeout:g} s")
            return result
        result.seconds.append(time.perf_counter() - t0)
        with cloud.changed:
            final = cloud.last_final[key]
        result.results[str(final.get("result"))] += 1
        if final.get("phase") != "succeeded":
            result.problems.append(f"job {key}: {final.get('phase')} {final.get('reason')!r}")
        if n in marks:
            result.rss_kib[n] = vm_rss_kib(rig.pid)
    _settle(rig, result.problems)
    with cloud.changed:
        counts = [cloud.final_counts[f"seq-{n}"] for n in range(1, jobs + 1)]
    if any(c != 1 for c in counts):
        result.problems.append(f"final reports per job: {sorted(Counter(counts).items())} "
                               "(count, jobs); expected exactly one each")
    if result.rss_ratio > 1.10:
        result.problems.append(
            f"RSS after job {jobs} is {result.rss_ratio:.3f}x that after job {baseline_job}")
    return result
