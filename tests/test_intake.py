"""Intake's command policy and the daemon's message loop, in-process.

The policy (accept, duplicate, confirm, cancel, reject) lives in
``agent/intake.py``; these tests drive it, and the daemon's intake and
report loops, over ``testkit.fakes`` in milliseconds. ``tests/test_daemon.py``
runs the same policy through the real daemon process and spool directory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Daemon
from agent.intake import Intake, Parser
from agent.node import Node
from agent.runner import Runner
from agent.states import State
from agent.transport.base import Inbound
from testkit.fakes import MemoryTransport, fake_node

TARGET = "v1.13.0"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = fake_node(tmp_path)
    yield n
    n.close()


class Policy:
    def __init__(self, node: Node, running: str | None = None) -> None:
        self.node = node
        self.queued: list[str] = []
        self.running = running
        self.runner = Runner(node)
        self.intake = Intake(node, self.runner, Parser(node.config), self.queued.append,
                             lambda: self.running)
        self.acks = 0

    def take(self, body: dict[str, Any] | bytes) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()

        async def ack() -> None:
            self.acks += 1

        return self.intake.accept(Inbound("test", raw, ack))

    def reports(self) -> list[dict[str, Any]]:
        return [report for _, report in self.node.journal.outbox(limit=1000)]


def test_a_new_upgrade_is_journalled_and_queued_once(node: Node) -> None:
    p = Policy(node)
    assert p.take({"jobName": "up-1", "version": TARGET}) is None
    assert p.take({"jobName": "up-1", "version": TARGET}) is None  # a duplicate while it waits
    job = node.journal.get("up-1")
    assert job is not None and job.state == State.RECEIVED
    assert p.queued == ["up-1"]
    assert [r["phase"] for r in p.reports()] == ["received"]


def test_a_duplicate_of_a_finished_job_gets_its_final_report_again(node: Node) -> None:
    p = Policy(node)
    p.take({"jobName": "up-1", "version": TARGET})
    job = node.journal.get("up-1")
    assert job is not None
    p.runner.advance(job, State.SUCCEEDED, "done")
    p.take({"jobName": "up-1", "version": TARGET})  # the final is still queued: enough
    (final,) = [r for r in p.reports() if r["phase"] == "succeeded"]
    for outbox_id, _ in node.journal.outbox():
        node.journal.ack(outbox_id)  # delivered
    p.take({"jobName": "up-1", "version": TARGET})
    (again,) = [r for r in p.reports() if r["phase"] == "succeeded"]
    # The same report again (receivers dedupe by (jobKey, sequence)), not news.
    assert again["sequence"] == final["sequence"] and again["final"]
    assert p.queued == ["up-1"]


@pytest.mark.parametrize(("body", "reason"), [
    ({"jobName": "bad-1", "version": "v1.13"}, "version"),
    ({"jobName": "bad-2", "operation": "format-disk"}, "unknown operation"),
    ({"jobName": "bad-3", "version": TARGET, "nodeName": "other-node"}, "other-node"),
    ({"jobName": "bad-4", "operation": "rollback", "dryRun": True}, "has no dry run"),
])
def test_an_invalid_command_is_rejected_with_a_report(node: Node, body: dict[str, Any],
                                                      reason: str) -> None:
    p = Policy(node)
    assert p.take(body) is None
    (job,) = [j for j in node.journal.jobs(limit=100)
              if j.key.startswith(f"rejected:{body['jobName']}:")]
    assert job.state == State.REJECTED and reason in job.reason
    assert p.queued == []
    assert p.reports()[-1]["phase"] == "rejected"


def test_a_dry_run_is_handed_back_to_rehearse_not_journalled(node: Node) -> None:
    p = Policy(node)
    cmd = p.take({"jobName": "chk", "operation": "check", "version": TARGET})
    assert cmd is not None and cmd.dry_run and node.journal.get("chk") is None


def test_confirm_releases_a_parked_job_and_ignores_an_unknown_one(node: Node) -> None:
    p = Policy(node)
    p.take({"jobName": "up-1", "version": TARGET, "requireConfirmation": True})
    job = node.journal.get("up-1")
    assert job is not None
    p.runner.advance(job, State.AWAITING_CONFIRMATION, "waiting")
    p.take({"jobName": "nobody", "operation": "confirm"})
    p.take({"jobName": "up-1", "operation": "confirm"})
    confirmed = node.journal.get("up-1")
    assert confirmed is not None and confirmed.state == State.PRECHECKED
    assert p.queued == ["up-1", "up-1"]


def test_cancel_of_the_running_job_waits_for_a_step_boundary(node: Node) -> None:
    p = Policy(node, running="up-1")
    p.take({"jobName": "up-1", "version": TARGET})
    p.take({"jobName": "up-1", "operation": "cancel"})
    job = node.journal.get("up-1")
    assert job is not None and job.state == State.RECEIVED  # not yet: the worker acts
    assert "up-1" in p.runner.cancel_requests


def test_cancel_of_a_waiting_job_is_answered_at_once(node: Node) -> None:
    p = Policy(node)
    p.take({"jobName": "up-1", "version": TARGET})
    p.take({"jobName": "up-1", "operation": "cancel"})
    job = node.journal.get("up-1")
    assert job is not None and job.terminal and "cancel" in job.reason


async def test_daemon_acks_after_journalling_and_delivers_through_an_outage(
        node: Node) -> None:
    daemon = Daemon(node, Parser(node.config))
    link = MemoryTransport()
    daemon.transport = link
    link.fail_next = 2  # the broker is away for the first two publishes
    tasks = [asyncio.ensure_future(c) for c in (daemon.take_commands(), daemon.reporter())]
    try:
        link.send(b"\xff not json")
        link.send(json.dumps({"jobName": "bad-v", "version": "one"}).encode())
        for _ in range(800):
            if len(link.acked) == 2 and any(r["jobKey"].startswith("rejected:bad-v:")
                                           for r in link.published):
                break
            await asyncio.sleep(0.01)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(link.acked) == 2  # both messages left the transport, journalled or answered
    assert [r["phase"] for r in link.published
            if r["jobKey"].startswith("rejected:bad-v:")] == ["rejected"]
    assert node.journal.outbox() == []  # delivered once the link was back: nothing lost


# -- found when tried as a hostile sender would (issue 13) --------------------------------


def rejections(node: Node, name: str = "") -> list[Any]:
    return [j for j in node.journal.jobs(limit=1000) if j.key.startswith(f"rejected:{name}")]


def test_a_rejection_never_shares_a_key_with_a_job(node: Node) -> None:
    p = Policy(node)
    p.take({"jobName": "foo", "version": "bad"})
    p.take({"jobName": "rejected-foo", "version": TARGET})  # a valid job with that name
    assert p.queued == ["rejected-foo"]
    job = node.journal.get("rejected-foo")
    assert job is not None and job.state == State.RECEIVED
    (rejection,) = rejections(node, "foo:")
    assert rejection.key.startswith("rejected:foo:") and rejection.command.job_name == "foo"


def test_every_rejected_message_leaves_a_trace(node: Node) -> None:
    p = Policy(node)
    for body in (b'{"jobName": "foo", "version": "bad"}',
                 b'{"jobName": "foo", "version": "worse"}',  # same name, another message
                 b"[]", b"", b"   ", b'{"jobName": "Not_A_Name", "version": "v1.13.0"}',
                 b'{"jobName": "x\xff", "version": "v1.13.0"}'):
        p.take(body)
    assert len(rejections(node, "foo:")) == 2
    assert len(rejections(node, "unnamed:")) == 5
    assert p.intake.rejected_total == 7
    finals = [r for r in p.reports() if r["phase"] == "rejected"]
    assert len(finals) == 7 and all(r["final"] for r in finals)


def test_the_same_bad_bytes_again_get_the_first_answer_at_most_once_a_minute(
        node: Node) -> None:
    p = Policy(node)
    body = {"jobName": "foo", "version": "bad"}
    p.take(body)
    for outbox_id, _ in node.journal.outbox():
        node.journal.ack(outbox_id)  # the answer was delivered
    for _ in range(4):
        p.take(body)
    finals = [r for r in p.reports() if r["phase"] == "rejected"]
    assert len(rejections(node)) == 1 and len(finals) == 1  # one resend, same sequence
    assert p.intake.rejected_total == 5


def test_a_flood_of_rejections_is_rate_limited_but_counted(node: Node) -> None:
    from agent.intake import REJECTIONS_PER_MINUTE

    p = Policy(node)
    for i in range(REJECTIONS_PER_MINUTE + 15):
        p.take({"jobName": f"bad-{i}", "version": "bad"})
    assert len(rejections(node)) == REJECTIONS_PER_MINUTE
    assert p.intake.rejected_unreported == 15
    assert p.intake.rejected_total == REJECTIONS_PER_MINUTE + 15


def test_reasons_are_bounded(node: Node) -> None:
    p = Policy(node)
    p.take({"jobName": "big", "version": "v1.13.0", "k" * 60000: 1})  # quoted in the reason
    (job,) = rejections(node, "big:")
    assert len(job.reason) <= 240 and "characters)" in job.reason
    assert len(p.reports()[-1]["reason"]) <= 240


@pytest.mark.parametrize("version", ["v\uff11.\uff11\uff13.\uff10", "v\u0661.\u0661\u0663.\u0660",
                                     "v1.13.0\n", "v1.\u0661\u0663.0"])
def test_only_ascii_digits_make_a_version(node: Node, version: str) -> None:
    p = Policy(node)
    p.take({"jobName": "uni", "version": version})
    (job,) = rejections(node, "uni:")
    assert "bad version string" in job.reason
    assert node.journal.get("uni") is None


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"jobName": "s1", "version": "v1.13.0", "image": "\\ud800"}', "lone surrogate"),
    (b'{"jobName": "s2", "version": "v1.13.0", "checkItems": ["\\udfff"]}', "lone surrogate"),
    (b'{"jobName": "d1", "version": "v1.13.0", "version": "v9.9.9"}', "duplicate key 'version'"),
    (b'{"jobName": "n1", "version": "v1.13.0", "timeoutSeconds": ' + b"9" * 5000 + b"}",
     "number too long (5000 characters"),
    (b'{"jobName": "n2", "version": "v1.13.0", "timeoutSeconds": NaN}', "NaN is not a JSON"),
    (b'{"jobName": "n3", "version": "v1.13.0", "timeoutSeconds": 1e999}', "out of range"),
    (b'{"jobName": "u1", "version": "v1.13.0", "x": "\xc3\x28"}', "not valid UTF-8"),
])
def test_strict_json(node: Node, raw: bytes, reason: str) -> None:
    p = Policy(node)
    p.take(raw)
    (job,) = rejections(node)
    assert reason in job.reason, job.reason
    assert "sys.set_int_max_str_digits" not in job.reason


async def test_the_version_policy_is_decided_before_the_image_is_looked_up(
        tmp_path: Path) -> None:
    """A downgrade is refused as a downgrade, not as 'image not found'."""
    from agent.messages.commands import Operation, build_command
    from testkit.fakes import FakeImages, FakeService

    images = FakeImages()  # holds nothing: a lookup would fail
    node = fake_node(tmp_path, images=images, service=FakeService("v1.13.0"))
    try:
        runner = Runner(node)
        cmd = build_command(node.config, operation=Operation.UPGRADE, job_name="down",
                            version="v1.12.1")
        job = await runner.run(runner.submit(cmd)[0])
        assert job.state == State.FAILED
        assert "refusing downgrade from v1.13.0 to v1.12.1" in job.reason, job.reason
        assert "image" not in job.reason
    finally:
        node.close()


def test_commands_that_pull_nothing_are_not_held_to_the_image_allow_list(
        node: Node) -> None:
    """Found by the fault matrix: on a node that allows only its private registry,
    a confirm (no image in it) was rejected for the default repo on docker.io."""
    from dataclasses import replace as copy

    from agent.errors import InvalidCommand
    from agent.messages.commands import Operation, build_command

    config = copy(node.config, images=copy(node.config.images,
                                           allowed_registries=("registry.example:5000",)))
    for op in (Operation.CONFIRM, Operation.CANCEL, Operation.ROLLBACK):
        assert build_command(config, operation=op, job_name="j").operation == op
    with pytest.raises(InvalidCommand, match="not allowed"):
        build_command(config, operation=Operation.UPGRADE, job_name="j", version=TARGET)
    with pytest.raises(InvalidCommand, match="not allowed"):  # named, so checked
        build_command(config, operation=Operation.CANCEL, job_name="j",
                      image="docker.io/kubeedge/installation-package")
