"""Dry run: every read-only check, the exact plan, and a verdict.

Nothing is written outside the agent's own state dir (where the rehearsal is
journalled): no backup, no staging, no lock taken, no marker cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.adapters.images import EDGECORE, KEADM
from agent.adapters.keadm import era
from agent.errors import AgentError
from agent.messages.commands import Command
from agent.node import Node
from agent.steps.install import installer_argv
from agent.steps.precheck import CheckResult, assess
from agent.versions import Version

GO, NO_GO, SKIP = "GO", "NO-GO", "SKIP"


@dataclass(frozen=True)
class Plan:
    verdict: str
    reason: str
    from_version: str | None
    to_version: str
    checks: tuple[CheckResult, ...]
    steps: tuple[str, ...]
    argv: tuple[str, ...]
    backup_bytes: int
    free_bytes: int
    needed_bytes: int
    image: dict[str, Any]
    paths: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "fromVersion": self.from_version,
            "toVersion": self.to_version,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "steps": list(self.steps),
            "installerArgv": list(self.argv),
            "backupBytes": self.backup_bytes,
            "freeBytes": self.free_bytes,
            "neededBytes": self.needed_bytes,
            "image": self.image,
            "pathsTouched": self.paths,
        }


async def make_plan(node: Node, cmd: Command) -> Plan:
    ref = cmd.image.with_tag(str(cmd.target))
    staging = node.staging_dir(str(cmd.target))
    files = node.probe.files()
    found = await assess(node, cmd)
    from_version = str(found.detected.version) if found.detected else None
    backup_dir = node.backup_root / (from_version or "<unknown>")
    paths = {
        "edgecoreBinary": str(files.binary),
        "edgecoreConfig": str(files.config),
        "edgecoreDb": str(files.db),
        "backupDir": str(backup_dir),
        "staging": str(staging),
        "keadmMarker": str(node.keadm_marker),
        "stateDir": str(node.state_dir),
    }
    if found.report is None:
        # The run decides a skip before anything else, so the plan shows nothing else.
        source = found.detected.source if found.detected else "?"
        return Plan(
            verdict=SKIP, reason=f"already at {cmd.target}", from_version=from_version,
            to_version=str(cmd.target),
            checks=(CheckResult("edgecore", True, f"{cmd.target} (from {source})"),),
            steps=(f"skip: edgecore already runs {cmd.target}; nothing is changed",), argv=(),
            backup_bytes=0, free_bytes=0, needed_bytes=0, image={"reference": str(ref)},
            paths=paths)
    report = found.report
    image: dict[str, Any] = {"reference": str(ref)}
    if found.image is not None:
        info = found.image
        image |= {"digest": info.digest, "size": info.size, "presentLocally": info.present_locally}
    checks = report.checks + ((found.image_check,) if found.image_check else ())
    from_known = found.detected.version if found.detected else Version(0, 0, 0)
    try:
        argv = installer_argv(node, cmd, staging / "keadm", from_known)
    except AgentError:
        argv = []  # an unknown keadm era: the installer precheck says so
    era_found = era(cmd.target)
    installer = (f"custom installer {cmd.upgrade_tool}" if cmd.upgrade_tool
                 else f"keadm era {era_found.name if era_found else 'unknown'}")
    steps = (
        f"precheck: version policy, {', '.join(cmd.check_items) or 'no'} resource checks, "
        "free space, locks",
        f"image: pull {ref}, extract {KEADM} and {EDGECORE} into {staging}",
        f"backup: {', '.join(str(p) for p in files.present())} -> {backup_dir}",
        f"install: {installer}, timeout {cmd.timeout_seconds}s",
        f"verify: edgecore ({_service_name(node)}) runs the package's binary (sha256), "
        f"logged Version: {cmd.target}, stable for {node.config.health.grace_seconds:g}s",
        "rollback on any failure after install: restore the backup, restart, re-verify",
    )
    if all(c.ok for c in checks):
        verdict, reason = GO, "all checks passed"
    else:
        verdict = NO_GO
        reason = "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok)
    return Plan(
        verdict=verdict, reason=reason, from_version=from_version, to_version=str(cmd.target),
        checks=checks, steps=steps, argv=tuple(argv), backup_bytes=report.backup_bytes,
        free_bytes=report.free_bytes, needed_bytes=report.needed_bytes, image=image,
        paths=paths,
    )


def _service_name(node: Node) -> str:
    if node.config.service_manager == "systemd":
        return f"unit {node.config.edgecore_unit}"
    return "process manager"
