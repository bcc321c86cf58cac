"""Load at CI size: 2,000 mixed commands in a burst, then 200 sequential upgrades.

The same code as bench/load.py (testkit/load.py), smaller: one real daemon
over MQTT with mutual TLS to a real Mosquitto. Every command is answered
exactly once (a final report, or a rejection the rate limiter only counts in
presence), the broker never has more than one command unacked at the
daemon, and the daemon's RSS after job 200 is within 10 % of that after
job 20. No assertion on time: the timeouts only bound a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.load import Rig, run_burst, run_jobs

pytestmark = pytest.mark.slow

BURST = 2_000
JOBS = 200
BASELINE_JOB = 20


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        r.start()
        yield r
    finally:
        r.close()


def test_burst_then_sequential_jobs_lose_nothing_and_leak_nothing(rig: Rig) -> None:
    burst = run_burst(rig, BURST, timeout=300)
    assert not burst.problems, burst.problems
    assert burst.valid and burst.invalid and len(burst.kinds) >= 20
    # The rate limiter reported some rejections and only counted the rest.
    assert burst.rejections_reported > 0 and burst.rejections_unreported > 0
    assert burst.rejections_reported + burst.rejections_unreported == burst.invalid
    # The backlog waited at the broker, not in the daemon: one command unacked at a time
    # (RECEIVE_MAXIMUM in agent/transport/mqtt.py; without it mosquitto sent it all).
    assert burst.peak_unacked == 1
    jobs = run_jobs(rig, JOBS, baseline_job=BASELINE_JOB)
    assert not jobs.problems, jobs.problems
    assert jobs.results == {"upgrade_success": JOBS}
    assert jobs.rss_kib[JOBS] <= 1.10 * jobs.rss_kib[BASELINE_JOB], jobs.rss_kib
    rig.check_alive()
