"""The runner's state machine, in-process: every transition in milliseconds.

Each state with a step is driven to success, to failure (an AgentError and an
OSError) and to a crash before its next commit, followed by a restart (a new
Node and Runner over the same state directory) and ``recover()``. The steps'
work is replaced by fakes (``runner.steps[state] = replace(step, work=...)``),
so these tests hold the machine to docs/architecture.md (the failure rule,
the recovery table, the loop breaker, cancels), not the steps, which the
subprocess tests cover. A few tests run the real early steps over the
in-memory fakes of ``testkit.fakes``, where that costs nothing.

Every fake step first checks the invariant the machine exists for: the state
it is asked to work in is already committed, with its report queued under the
same sequence number.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.images import EDGECORE, KEADM, ImageBackend
from agent.adapters.service import ServiceManager
from agent.errors import (
    AgentError,
    BackupError,
    Busy,
    HealthCheckFailed,
    InstallError,
    PrecheckFailed,
    RollbackError,
    StepError,
)
from agent.faults import ENV as FAULT_ENV
from agent.journal import Journal
from agent.messages.commands import Command, Operation, build_command
from agent.model import Job
from agent.runner import Runner
from agent.states import NODE_TOUCHED, Action, Note, State
from agent.transport.base import Transport
from testkit.fakes import FakeImages, FakeService, MemoryTransport, fake_node

FROM, TARGET = "v1.12.1", "v1.13.0"
IMAGE = f"kubeedge/installation-package:{TARGET}"
S = State

# Every non-terminal state with a step, in pipeline order.
STEPPED = [S.RECEIVED, S.PRECHECKED, S.IMAGE_READY, S.BACKED_UP, S.INSTALLING, S.VERIFYING,
           S.ROLLING_BACK]
# A succeeding step: the next state, and the action the real step records with it.
SUCCESS: dict[State, tuple[State, Action | None]] = {
    S.RECEIVED: (S.PRECHECKED, None),
    S.PRECHECKED: (S.IMAGE_READY, Action.CHECK),
    S.IMAGE_READY: (S.BACKED_UP, Action.BACKUP),
    S.BACKED_UP: (S.INSTALLING, None),
    S.INSTALLING: (S.VERIFYING, None),
    S.VERIFYING: (S.SUCCEEDED, Action.UPGRADE),
    S.ROLLING_BACK: (S.ROLLED_BACK, Action.ROLLBACK),
}
# A failing step: where the one failure rule sends the job, the action it records.
FAILURE: dict[State, tuple[State, Action | None]] = {
    S.RECEIVED: (S.FAILED, Action.CHECK),
    S.PRECHECKED: (S.FAILED, Action.CHECK),
    S.IMAGE_READY: (S.FAILED, Action.BACKUP),
    S.BACKED_UP: (S.FAILED, Action.BACKUP),  # the hand-over re-checks the backup
    S.INSTALLING: (S.ROLLING_BACK, Action.UPGRADE),
    S.VERIFYING: (S.ROLLING_BACK, Action.UPGRADE),
    S.ROLLING_BACK: (S.ROLLBACK_FAILED, Action.ROLLBACK),
}
LABELS = {S.PRECHECKED: "image", S.IMAGE_READY: "backup", S.BACKED_UP: "backup",
          S.INSTALLING: "install", S.VERIFYING: "health"}
# A plausible AgentError for each state's work.
ERRORS: dict[State, type[AgentError]] = {
    S.RECEIVED: PrecheckFailed, S.PRECHECKED: StepError, S.IMAGE_READY: BackupError,
    S.BACKED_UP: StepError, S.INSTALLING: InstallError, S.VERIFYING: HealthCheckFailed,
    S.ROLLING_BACK: RollbackError,
}

Work = Callable[[Job], Awaitable[Job]]


class SimulatedCrash(Exception):
    """Not an AgentError or OSError: the runner lets it escape, as the daemon's crash."""


def path_from(state: State) -> list[State]:
    """The states a job in ``state`` passes through when every step succeeds."""
    out = [state]
    while out[-1] in SUCCESS:
        out.append(SUCCESS[out[-1]][0])
    return out


@dataclass
class Machine:
    """A Node over the fakes, a Runner whose every step is a succeeding fake."""

    root: Path
    overrides: dict[str, Any]
    service: FakeService = field(default_factory=FakeService)
    images: FakeImages = field(default_factory=FakeImages)
    ran: list[State] = field(default_factory=list)  # the states whose work ran, in order

    def __post_init__(self) -> None:
        self.node = fake_node(self.root, images=self.images, service=self.service,
                              **self.overrides)
        self.runner = Runner(self.node)
        self.own = dict(self.runner.steps)  # the runner's own steps, for ``real``
        for state in STEPPED:
            self.on(state, self.succeed)

    def on(self, state: State, work: Work) -> None:
        """Replace ``state``'s work, keeping its label, action and log-tail flag."""
        self.runner.steps[state] = replace(self.runner.steps[state], work=work)

    def real(self, *states: State) -> None:
        """Put the runner's own work back for ``states``."""
        for state in states:
            self.runner.steps[state] = self.own[state]

    def committed(self, job: Job) -> None:
        """The state a step works in is on disk, its report queued with the same seq."""
        stored = self.node.journal.get(job.key)
        assert stored is not None
        assert (stored.state, stored.seq) == (job.state, job.seq)
        last = [r for r in self.reports() if r["jobKey"] == job.key][-1]
        assert (last["phase"], last["sequence"]) == (job.state.value, job.seq)

    async def succeed(self, job: Job) -> Job:
        self.committed(job)
        self.ran.append(job.state)
        nxt, action = SUCCESS[job.state]
        return self.runner.advance(job, nxt, f"fake {job.state.value} done",
                                   action=(action, True) if action else None)

    def raising(self, make: Callable[[], BaseException]) -> Work:
        async def work(job: Job) -> Job:
            self.committed(job)
            self.ran.append(job.state)
            raise make()
        return work

    def command(self, name: str = "job-1", **kw: Any) -> Command:
        return build_command(self.node.config, operation=Operation.UPGRADE, job_name=name,
                             version=TARGET, **kw)

    def job_in(self, state: State, name: str = "job-1", **kw: Any) -> Job:
        """A job journalled in ``state`` (with its report), as the steps before left it."""
        job, new = self.runner.submit(self.command(name, **kw))
        assert new
        if state != S.RECEIVED:
            job = self.runner.advance(replace(job, from_version=FROM), state,
                                      f"test: put in {state.value}")
        return job

    def reports(self) -> list[dict[str, Any]]:
        return [payload for _, payload in self.node.journal.outbox(limit=10_000)]

    def phases(self, key: str = "job-1") -> list[str]:
        return [r["phase"] for r in self.reports() if r["jobKey"] == key]

    def get(self, key: str = "job-1") -> Job:
        job = self.node.journal.get(key)
        assert job is not None
        return job

    def reopen(self) -> Machine:
        """The agent after a crash: a new Node (journal re-opened) and Runner, same root."""
        self.node.close()
        return Machine(self.root, self.overrides, FakeService(self.service.version),
                       self.images)


@pytest.fixture(autouse=True)
def _no_fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    # advance() calls fault_point(); an inherited fault would SIGKILL pytest itself.
    monkeypatch.delenv(FAULT_ENV, raising=False)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    m = machine_with(tmp_path)
    yield m
    m.node.close()


def machine_with(tmp_path: Path, **overrides: Any) -> Machine:
    """A machine whose image backend holds the target's package."""
    m = Machine(tmp_path, overrides)
    m.images.add(IMAGE)
    return m


# -- success ----------------------------------------------------------------------


@pytest.mark.parametrize("state", STEPPED)
async def test_success_commits_the_next_state_with_its_report(machine: Machine,
                                                              state: State) -> None:
    job = machine.job_in(state)
    before = len(machine.reports())

    done = await machine.runner.run(job)

    expected = path_from(state)
    assert machine.ran == expected[:-1]
    assert done.state == expected[-1] and done.terminal
    queued = machine.reports()[before:]
    assert [r["phase"] for r in queued] == [s.value for s in expected[1:]]
    # One report per commit, numbered on from the setup's; the journal's seq is the last.
    assert [r["sequence"] for r in queued] == list(range(job.seq + 1, job.seq + 1 + len(queued)))
    assert machine.get().seq == done.seq == queued[-1]["sequence"]
    assert [r["final"] for r in queued] == [False] * (len(queued) - 1) + [True]
    assert machine.get().entry_count(expected[1]) == 1


@pytest.mark.parametrize("state", STEPPED)
async def test_a_state_and_its_report_are_one_transaction(
        machine: Machine, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queueing the report fails after the state's UPDATE ran: neither is kept."""
    job = machine.job_in(state)
    before = machine.reports()

    def refuse(*args: object) -> None:
        raise SimulatedCrash("died between the state and its report")

    with monkeypatch.context() as patch:
        patch.setattr(Journal, "_queue", staticmethod(refuse))
        with pytest.raises(SimulatedCrash):
            await machine.runner.run(job)

    assert machine.ran == [state]
    stored = machine.get()
    assert (stored.state, stored.seq, stored.entries) == (job.state, job.seq, job.entries)
    assert machine.reports() == before


# -- failure ----------------------------------------------------------------------


def _failure_case(state: State, kind: str) -> tuple[BaseException, str]:
    if kind == "agent-error":
        return ERRORS[state](f"{state.value} went wrong"), f"{state.value} went wrong"
    exc = OSError(28, "No space left on device")
    return exc, str(exc)


@pytest.mark.parametrize("kind", ["agent-error", "os-error"])
@pytest.mark.parametrize("state", STEPPED)
async def test_failure_follows_the_one_failure_rule(machine: Machine, state: State,
                                                    kind: str) -> None:
    job = machine.job_in(state)
    before = len(machine.reports())
    exc, why = _failure_case(state, kind)
    machine.on(state, machine.raising(lambda: exc))

    done = await machine.runner.run(job)

    nxt, action = FAILURE[state]
    reason = f"{LABELS[state]}: {why}" if state in LABELS else why
    report = machine.reports()[before]
    assert (report["phase"], report["reason"], report["sequence"]) == (nxt.value, reason,
                                                                        job.seq + 1)
    if action is None:
        assert report["actionFlow"] == []
    else:
        # extend is "<from>,<to>"; a received job has not detected its version yet.
        extend = f"{'' if state == S.RECEIVED else FROM},{TARGET}"
        assert report["actionFlow"][-1] == {
            "action": action.value, "succ": False, "reason": reason,
            "finishTime": report["actionFlow"][-1]["finishTime"], "extend": extend}
    # From rolling_back the (succeeding) rollback step runs and ends the job.
    assert done.state == (S.ROLLED_BACK if nxt == S.ROLLING_BACK else nxt)
    assert done.note(Note.REFUSAL) == (
        "precheck" if isinstance(exc, PrecheckFailed) else None)
    assert machine.ran == [state] + ([S.ROLLING_BACK] if nxt == S.ROLLING_BACK else [])


@pytest.mark.parametrize(("exc", "refusal"), [
    (PrecheckFailed("version: downgrade refused"), "precheck"),
    (Busy("keadm lock live (3s old)"), "busy"),
    (StepError("something else"), None),
    (OSError(5, "Input/output error"), None),
])
async def test_refusal_kind_of_a_received_failure(machine: Machine, exc: Exception,
                                                  refusal: str | None) -> None:
    machine.on(S.RECEIVED, machine.raising(lambda: exc))

    done = await machine.runner.run(machine.job_in(S.RECEIVED))

    assert done.state == S.FAILED
    assert done.note(Note.REFUSAL) == refusal
    assert machine.get().note(Note.REFUSAL) == refusal
    final = machine.reports()[-1]
    assert (final["final"], final["result"], final["state"]) == (
        True, "upgrade_failed_rollback_success", "Failure")
    assert [a["action"] for a in final["actionFlow"]] == ["Check"]


@pytest.mark.parametrize("state", [S.INSTALLING, S.VERIFYING])
async def test_only_an_install_failure_reports_the_installer_log_tail(machine: Machine,
                                                                     state: State) -> None:
    log = machine.root / "install.log"
    log.write_text("".join(f"keadm line {i}\n" for i in range(100)))
    job = machine.job_in(S.BACKED_UP)
    job = machine.runner.advance(job, state, "test: installer ran", notes={Note.LOG: str(log)})
    machine.on(state, machine.raising(lambda: ERRORS[state]("it broke")))

    await machine.runner.run(job)

    rolling, rolled = machine.reports()[-2:]
    assert (rolling["phase"], rolling["reason"]) == ("rolling_back", f"{LABELS[state]}: it broke")
    assert ("logTail" in rolling) == (state == S.INSTALLING)
    if state == S.INSTALLING:
        assert rolling["logTail"].splitlines()[-1] == "keadm line 99"
    # Every final report of a job that ran the installer carries the tail.
    assert rolled["phase"] == "rolled_back" and rolled["logTail"].endswith("keadm line 99")


# -- crash before commit, restart, recovery ------------------------------------------


def _crash() -> BaseException:
    return SimulatedCrash("process died before its next commit")


@pytest.mark.parametrize("state", STEPPED)
async def test_crash_before_commit_then_recovery_table(machine: Machine, state: State) -> None:
    job = machine.job_in(state)
    machine.on(state, machine.raising(_crash))
    with pytest.raises(SimulatedCrash):
        await machine.runner.run(job)
    assert machine.get().state == state  # nothing committed past the crash
    seq = machine.get().seq

    after = machine.reopen()
    recovered = after.runner.recover()

    assert [j.key for j in recovered] == [job.key]
    got = recovered[0]
    assert after.get() == got
    last = after.reports()[-1]
    assert last["sequence"] == got.seq == seq + 1
    if state == S.INSTALLING:
        # Never guess that keadm finished: roll back.
        assert got.state == S.ROLLING_BACK
        assert got.reason == "agent restarted during install; rolling back"
        assert got.actions[-1].action == Action.UPGRADE and not got.actions[-1].succ
    else:
        assert got.state == state
        assert got.reason == f"resumed in {state.value}: agent restarted"
        assert got.entry_count(state) == job.entry_count(state) + 1 == 2
    assert last["phase"] == got.state.value and last["reason"] == got.reason

    done = await after.runner.run(got)

    assert done.state == path_from(got.state)[-1]
    assert after.ran == path_from(got.state)[:-1]  # installing's work never ran again
    assert done.terminal and after.runner.recover() == []
    after.node.close()


async def test_awaiting_confirmation_stays_parked_across_a_restart(machine: Machine) -> None:
    job = machine.job_in(S.AWAITING_CONFIRMATION)
    assert await machine.runner.run(job) == job  # parked: no step, nothing written

    after = machine.reopen()
    before = after.reports()
    assert after.runner.recover() == [job]
    assert after.reports() == before and after.get() == job

    confirmed = after.runner.confirm(after.get())
    assert confirmed.state == S.PRECHECKED and confirmed.note(Note.CONFIRMED) == "yes"
    done = await after.runner.run(confirmed)
    assert done.state == S.SUCCEEDED
    assert after.ran == path_from(S.PRECHECKED)[:-1]
    after.node.close()


@pytest.mark.parametrize("state", [s for s in STEPPED if s != S.INSTALLING])
async def test_loop_breaker_ends_a_crash_loop(tmp_path: Path, state: State) -> None:
    limit = 2
    m = machine_with(tmp_path, policy={"max_state_entries": limit})
    job = m.job_in(state)
    crashes = 0
    for _ in range(limit + 3):
        m.on(state, m.raising(_crash))
        try:
            job = await m.runner.run(job)
            break
        except SimulatedCrash:
            crashes += 1
            m = m.reopen()
            [job] = m.runner.recover()
    else:
        pytest.fail("the crash loop never ended")

    assert crashes == limit  # the step ran max_state_entries times, then the breaker
    assert m.ran == ([S.ROLLING_BACK] if state == S.VERIFYING else [])
    nxt, _ = FAILURE[state]
    broke = next(r for r in m.reports() if r["reason"].startswith("loop breaker"))
    assert broke["reason"] == f"loop breaker: state {state.value} entered {limit + 1} times"
    assert broke["phase"] == nxt.value
    assert job.state == (S.ROLLED_BACK if nxt == S.ROLLING_BACK else nxt)
    m.node.close()


async def test_repeated_crashes_in_installing_roll_back_at_once(tmp_path: Path) -> None:
    m = machine_with(tmp_path, policy={"max_state_entries": 2})
    job = m.job_in(S.INSTALLING)
    m.on(S.INSTALLING, m.raising(_crash))
    with pytest.raises(SimulatedCrash):
        await m.runner.run(job)
    m = m.reopen()
    m.on(S.ROLLING_BACK, m.raising(_crash))  # ... and the rollback crashes too
    [job] = m.runner.recover()
    assert job.state == S.ROLLING_BACK
    with pytest.raises(SimulatedCrash):
        await m.runner.run(job)
    m = m.reopen()
    [job] = m.runner.recover()

    assert job.state == S.ROLLING_BACK  # re-run the rollback, never the install
    assert (await m.runner.run(job)).state == S.ROLLED_BACK
    assert m.ran == [S.ROLLING_BACK]
    m.node.close()


# -- whole paths ------------------------------------------------------------------


async def test_happy_path_reports_every_state_in_order(machine: Machine) -> None:
    job, _ = machine.runner.submit(machine.command())

    done = await machine.runner.run(job)

    reports = machine.reports()
    assert [r["phase"] for r in reports] == [
        "received", "prechecked", "image_ready", "backed_up", "installing", "verifying",
        "succeeded"]
    assert [r["sequence"] for r in reports] == list(range(1, 8))
    assert [r["state"] for r in reports] == ["Pending"] + ["InProgress"] * 5 + ["Successful"]
    assert [r["final"] for r in reports] == [False] * 6 + [True]
    assert [r["result"] for r in reports] == [None] * 6 + ["upgrade_success"]
    assert {(r["jobKey"], r["nodeName"], r["toVersion"]) for r in reports} == {
        ("job-1", "edge-1", TARGET)}
    assert [(a["action"], a["succ"]) for a in reports[-1]["actionFlow"]] == [
        ("Check", True), ("BackUp", True), ("Upgrade", True)]
    assert done.state == S.SUCCEEDED and done.final_reported


async def test_install_failure_path_rolls_back(machine: Machine) -> None:
    job, _ = machine.runner.submit(machine.command())
    machine.on(S.INSTALLING, machine.raising(lambda: InstallError("installer exited with 2")))

    done = await machine.runner.run(job)

    reports = machine.reports()
    assert [r["phase"] for r in reports] == [
        "received", "prechecked", "image_ready", "backed_up", "installing", "rolling_back",
        "rolled_back"]
    assert [r["sequence"] for r in reports] == list(range(1, 8))
    assert reports[5]["reason"] == "install: installer exited with 2"
    final = reports[-1]
    assert (final["final"], final["state"], final["result"]) == (
        True, "Failure", "upgrade_failed_rollback_success")
    assert [(a["action"], a["succ"]) for a in final["actionFlow"]] == [
        ("Check", True), ("BackUp", True), ("Upgrade", False), ("RollBack", True)]
    assert done.state == S.ROLLED_BACK
    assert machine.ran == [S.RECEIVED, S.PRECHECKED, S.IMAGE_READY, S.BACKED_UP, S.INSTALLING,
                           S.ROLLING_BACK]


# -- cancel -----------------------------------------------------------------------

BEFORE_INSTALL = [S.RECEIVED, S.PRECHECKED, S.IMAGE_READY, S.BACKED_UP]


@pytest.mark.parametrize("state", BEFORE_INSTALL)
async def test_cancel_before_the_node_is_touched(machine: Machine, state: State) -> None:
    job = machine.job_in(state)
    machine.runner.request_cancel(job.key)

    done = await machine.runner.run(job)

    assert done.state == S.FAILED
    assert done.reason == "cancelled by the operator before installing"
    assert machine.ran == []  # honoured at the step boundary: no step ran
    assert machine.phases()[-1] == "failed"
    assert machine.node.journal.get_meta(f"cancel:{job.key}") is None


async def test_cancel_waits_for_the_running_step(machine: Machine) -> None:
    """A cancel during a step lets it finish, and stops the job before the next one."""

    async def cancel_mid_step(job: Job) -> Job:
        machine.runner.request_cancel(job.key)
        return await machine.succeed(job)

    machine.on(S.PRECHECKED, cancel_mid_step)
    job, _ = machine.runner.submit(machine.command())

    done = await machine.runner.run(job)

    assert done.state == S.FAILED
    assert machine.ran == [S.RECEIVED, S.PRECHECKED]
    assert machine.phases() == ["received", "prechecked", "image_ready", "failed"]


@pytest.mark.parametrize("state", [s for s in STEPPED if s in NODE_TOUCHED])
async def test_cancel_refused_once_the_node_is_touched(machine: Machine, state: State) -> None:
    job = machine.job_in(state)
    machine.runner.request_cancel(job.key)
    before = len(machine.reports())

    done = await machine.runner.run(job)

    refused = machine.reports()[before]
    assert refused["phase"] == state.value and refused["sequence"] == job.seq + 1
    assert refused["reason"] == (f"cancel refused: job is {state.value}; past the installer "
                                 "only a rollback can undo it")
    assert not refused["final"]
    assert done.state == path_from(state)[-1]  # the job went on
    assert machine.ran == path_from(state)[:-1]
    assert machine.node.journal.get_meta(f"cancel:{job.key}") is None


async def test_cancel_survives_a_restart(machine: Machine) -> None:
    job = machine.job_in(S.IMAGE_READY)
    machine.runner.request_cancel(job.key)

    after = machine.reopen()  # the agent died before its runner saw the cancel
    [job] = after.runner.recover()
    done = await after.runner.run(job)

    assert done.state == S.FAILED and done.reason.startswith("cancelled by the operator")
    assert after.ran == []
    after.node.close()


async def test_cancel_of_a_parked_job(machine: Machine) -> None:
    done = machine.runner.cancel(machine.job_in(S.AWAITING_CONFIRMATION))
    assert done.state == S.FAILED and done.final_reported


async def test_late_cancel_of_a_finished_job_is_forgotten(machine: Machine) -> None:
    job = await machine.runner.run(machine.job_in(S.VERIFYING))
    machine.runner.request_cancel(job.key)
    assert await machine.runner.run(job) == job
    assert machine.node.journal.get_meta(f"cancel:{job.key}") is None
    assert machine.runner.cancel_requests == set()


# -- the real early steps, over the fakes ---------------------------------------------


async def test_real_precheck_refuses_a_missing_image(tmp_path: Path) -> None:
    m = Machine(tmp_path, {})  # no image at all
    m.real(S.RECEIVED)

    done = await m.runner.run(m.runner.submit(m.command())[0])

    assert done.state == S.FAILED
    assert done.reason == f"image: image {IMAGE} not found in memory"
    assert done.note(Note.REFUSAL) == "precheck"
    final = m.reports()[-1]
    assert (final["fromVersion"], final["versionSource"]) == (FROM, "log")
    assert [(a["action"], a["succ"]) for a in final["actionFlow"]] == [("Check", False)]
    assert m.images.pulls == []
    m.node.close()


async def test_real_precheck_skips_a_node_at_the_target(tmp_path: Path) -> None:
    m = Machine(tmp_path, {}, service=FakeService(TARGET))  # no image needed for a skip
    m.real(S.RECEIVED)

    done = await m.runner.run(m.runner.submit(m.command())[0])

    assert done.state == S.SKIPPED and done.reason == f"already at {TARGET}"
    assert m.phases() == ["received", "skipped"]
    assert m.reports()[-1]["result"] == "upgrade_success"
    m.node.close()


async def test_real_steps_up_to_the_installer(machine: Machine) -> None:
    machine.real(S.RECEIVED, S.PRECHECKED, S.IMAGE_READY, S.BACKED_UP)

    done = await machine.runner.run(machine.runner.submit(machine.command())[0])

    assert done.state == S.SUCCEEDED
    assert machine.ran == [S.INSTALLING, S.VERIFYING]  # the only fakes left
    image = machine.images.images[IMAGE]
    assert machine.images.pulls == machine.images.extracts == [IMAGE]
    staging = machine.node.staging_dir(TARGET)
    assert (staging / "keadm").read_bytes() == image.files[KEADM]
    assert (staging / "edgecore").read_bytes() == image.files[EDGECORE]
    assert done.note(Note.DIGEST) == image.digest
    assert done.note(Note.KEADM) == str(staging / "keadm")
    assert done.note(Note.INSTALLER) == str(staging / "keadm")
    backup = Path(done.note(Note.BACKUP) or "")
    assert backup == machine.node.backup_root / FROM and (backup / "manifest.json").is_file()
    assert machine.phases() == ["received", "prechecked", "prechecked", "prechecked",
                                "image_ready", "backed_up", "installing", "verifying",
                                "succeeded"]
    reasons = [r["reason"] for r in machine.reports()]
    assert f"image {IMAGE} available locally ({image.size} bytes)" in reasons  # pull progress
    assert [(a.action.value, a.succ) for a in done.actions] == [
        ("Check", True), ("WaitingConfirmation", True), ("BackUp", True), ("Upgrade", True)]


async def test_real_confirmation_gate_parks_across_a_restart(machine: Machine) -> None:
    machine.real(S.RECEIVED, S.PRECHECKED)
    job = machine.runner.submit(machine.command(require_confirmation=True))[0]

    parked = await machine.runner.run(job)

    assert parked.state == S.AWAITING_CONFIRMATION and machine.images.pulls == []
    after = machine.reopen()
    after.real(S.RECEIVED, S.PRECHECKED)
    assert after.runner.recover() == [parked]
    done = await after.runner.run(after.runner.confirm(parked))
    assert done.state == S.SUCCEEDED and after.images.pulls == [IMAGE]
    after.node.close()


async def test_confirming_is_not_a_crash_for_the_loop_breaker(tmp_path: Path) -> None:
    m = machine_with(tmp_path, policy={"max_state_entries": 1})
    m.real(S.RECEIVED, S.PRECHECKED)
    parked = await m.runner.run(m.runner.submit(m.command(require_confirmation=True))[0])
    assert parked.state == S.AWAITING_CONFIRMATION

    done = await m.runner.run(m.runner.confirm(parked))

    m.node.close()
    assert done.state == S.SUCCEEDED, done.reason


async def test_a_failed_rollback_blocks_the_next_upgrade(machine: Machine) -> None:
    machine.on(S.ROLLING_BACK, machine.raising(lambda: RollbackError("restore failed")))
    first = await machine.runner.run(machine.job_in(S.ROLLING_BACK, "job-1"))
    assert first.state == S.ROLLBACK_FAILED
    assert machine.reports()[-1]["result"] == "upgrade_failed_rollback_failed"

    machine.real(S.RECEIVED)
    second = await machine.runner.run(machine.job_in(S.RECEIVED, "job-2"))

    assert second.state == S.FAILED and second.note(Note.REFUSAL) == "precheck"
    assert second.reason.startswith("refused: job job-1 ended rollback_failed (restore failed)")


# -- the fakes themselves -----------------------------------------------------------


async def test_fakes_fit_the_protocols() -> None:
    # mypy checks the assignments: each fake satisfies its Protocol.
    fakes: tuple[ServiceManager, ImageBackend, Transport] = (
        FakeService(), FakeImages(), MemoryTransport())
    service, images, _ = fakes
    status = await service.status()
    assert status.active and await service.logged_version(status) == FROM
    await service.restart()
    assert await service.logged_version(status) is None  # that pid is gone
    assert await images.storage_path() is None

    link = MemoryTransport()
    link.send(b'{"jobName": "a"}')
    link.fail_next = 1
    inbound = await anext(aiter(link.commands()))
    await inbound.ack()
    with pytest.raises(OSError, match="simulated"):
        await link.publish({"sequence": 1})
    await link.publish({"sequence": 1})
    await link.update_presence()
    assert (link.acked, link.published, link.presence_updates) == (
        [b'{"jobName": "a"}'], [{"sequence": 1}], 1)
