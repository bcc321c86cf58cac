"""Entry points shared by the CLI and the daemon: run a command, or rehearse it."""

from __future__ import annotations

from dataclasses import replace

from agent.errors import InvalidCommand
from agent.messages.commands import Command, Operation
from agent.messages.reports import build_report
from agent.model import Job
from agent.node import Node
from agent.plan import GO, NO_GO, Plan, make_plan
from agent.runner import Runner
from agent.states import State


async def rehearse(node: Node, cmd: Command) -> tuple[Job, Plan]:
    """Dry run: plan and verdict, journalled as a rehearsal (terminal at once)."""
    if cmd.operation in (Operation.ROLLBACK, Operation.RESOLVE):
        raise InvalidCommand(f"{cmd.operation.value} has no dry run; use `check` or `status`")
    plan = await make_plan(node, cmd)
    state = {GO: State.SUCCEEDED, NO_GO: State.FAILED}.get(plan.verdict, State.SKIPPED)
    job = Job(key=cmd.key, command=replace(cmd, dry_run=True), state=state,
              reason=f"rehearsal {plan.verdict}: {plan.reason}", from_version=plan.from_version)
    existing = node.journal.get(cmd.key)
    if existing is not None:
        return existing, plan
    job = node.journal.add(job, lambda j: build_report(j, plan=plan.to_dict()))
    return job, plan


async def execute(node: Node, runner: Runner, cmd: Command) -> Job:
    """Run ``cmd`` to a terminal (or parked) state under the agent lock.

    Any job a crash left behind is recovered first, so a new upgrade never
    starts on a half-upgraded node.
    """
    with node.lock:
        for job in runner.recover("found unfinished before a new job"):
            await runner.run(job)
        job, new = runner.submit(cmd)
        if not new:
            return job
        return await runner.run(job)


async def recover_all(node: Node, runner: Runner) -> list[Job]:
    with node.lock:
        return [await runner.run(job) for job in runner.recover()]
