"""Fast unit tests of pure logic: installer argv, systemctl parsing, state mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.keadm import InstallSpec, custom_argv, era, keadm_argv
from agent.adapters.service import parse_show
from agent.errors import InstallError
from agent.states import TERMINAL, State, kubeedge_phase, kubeedge_result
from agent.versions import ImageRef, Version


def spec(to: str, digest: str | None = None) -> InstallSpec:
    return InstallSpec(Path("/s/keadm"), Version.parse("v1.12.1"), Version.parse(to),
                       ImageRef("reg.local:5000/kubeedge/installation-package"),
                       Path("/etc/kubeedge/config/edgecore.yaml"), "job-1", "", digest)


@pytest.mark.parametrize(("version", "expected"), [
    ("v1.12.0-0", "A"), ("v1.12.1", "A"), ("v1.15.9", "A"), ("v1.16.0-rc.1", "B"),
    ("v1.16.0", "B"), ("v1.20.3", "B"), ("v1.21.0-beta.0", "C"), ("v1.23.1", "C"),
    ("v1.23.99", "C"),
    # No NodeUpgradeJob before v1.12; nobody has checked keadm's CLI from v1.24 on.
    ("v1.11.0", None), ("v1.24.0-alpha.0", None), ("v1.24.0", None), ("v2.0.0", None),
])
def test_era_boundaries(version: str, expected: str | None) -> None:
    found = era(Version.parse(version))
    assert (found.name if found else None) == expected


def test_unknown_era_fails_loudly() -> None:
    with pytest.raises(InstallError, match=r"no built-in keadm command line for v1\.24\.0"):
        keadm_argv(spec("v1.24.0"))


def test_keadm_argv_per_era() -> None:
    assert keadm_argv(spec("v1.13.0")) == [
        "/s/keadm", "upgrade", "--upgradeID", "job-1", "--historyID", "job-1",
        "--fromVersion", "v1.12.1", "--toVersion", "v1.13.0",
        "--config", "/etc/kubeedge/config/edgecore.yaml",
        "--image", "reg.local:5000/kubeedge/installation-package:v1.13.0"]
    b = keadm_argv(spec("v1.18.0"))
    assert b[1:3] == ["upgrade", "edge"] and b[-1] == "--disable-backup"
    assert b[b.index("--image") + 1] == "reg.local:5000/kubeedge/installation-package:v1.18.0"
    digest = "sha256:" + "a" * 64
    assert keadm_argv(spec("v1.22.0", digest)) == [
        "/s/keadm", "upgrade", "edge", "--force", "--toVersion", "v1.22.0",
        "--image", "reg.local:5000/kubeedge/installation-package",
        "--config", "/etc/kubeedge/config/edgecore.yaml", "--image-digest", digest]


def test_custom_argv_fills_within_single_arguments() -> None:
    argv = custom_argv(("/opt/tool", "--to={to_version}", "{image}", "{from_version} x"),
                       spec("v1.13.0"))
    assert argv == ["/opt/tool", "--to=v1.13.0",
                    "reg.local:5000/kubeedge/installation-package:v1.13.0", "v1.12.1 x"]


def test_parse_systemctl_show() -> None:
    s = parse_show("ActiveState=active\nNRestarts=3\nMainPID=812\n")
    assert (s.active, s.state, s.n_restarts, s.main_pid) == (True, "active", 3, 812)
    s = parse_show("ActiveState=failed\nNRestarts=\nMainPID=0\n")
    assert (s.active, s.n_restarts, s.main_pid) == (False, 0, 0)


def test_every_terminal_state_has_a_kubeedge_result() -> None:
    for state in TERMINAL:
        assert kubeedge_result(state) is not None
    assert kubeedge_result(State.ROLLBACK_FAILED) == "upgrade_failed_rollback_failed"
    assert kubeedge_result(State.INSTALLING) is None
    assert kubeedge_phase(State.RECEIVED) == "Pending"
    assert kubeedge_phase(State.VERIFYING) == "InProgress"
    assert kubeedge_phase(State.SKIPPED) == "Successful"
    assert kubeedge_phase(State.ROLLED_BACK) == "Failure"


async def test_transient_errors_are_retried_within_bounds() -> None:
    from agent.errors import FatalError, TransientError
    from agent.retry import retry_transient

    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("registry hiccup")
        return "ok"

    assert await retry_transient("flaky", flaky, max_wait=0.01) == "ok"
    assert len(calls) == 3

    async def always() -> str:
        calls.append(1)
        raise TransientError("still down")

    calls.clear()
    with pytest.raises(TransientError):
        await retry_transient("always", always, attempts=3, max_wait=0.01)
    assert len(calls) == 3

    async def fatal() -> str:
        calls.append(1)
        raise FatalError("401 unauthorized")

    calls.clear()
    with pytest.raises(FatalError):
        await retry_transient("fatal", fatal, max_wait=0.01)
    assert len(calls) == 1


def test_global_options_work_after_the_command_too() -> None:
    """The unit file (and operators) write `run --config F`."""
    from agent.cli import _parser

    for argv in (["--config", "/x.yaml", "run"], ["run", "--config", "/x.yaml"]):
        args = _parser().parse_args(argv)
        assert (args.cmd, str(args.config)) == ("run", "/x.yaml")
    args = _parser().parse_args(["--output", "json", "status"])
    assert args.output == "json"
    args = _parser().parse_args(["config", "validate", "--root", "/r"])
    assert str(args.root) == "/r" and args.output == "text"
