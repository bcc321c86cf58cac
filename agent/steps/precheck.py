"""Precheck: every read-only check, collected so a dry run can show them all."""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent.adapters import resources
from agent.adapters.edgecore import Detected
from agent.adapters.files import tree_size
from agent.adapters.images import ImageInfo, verify_digest
from agent.adapters.keadm import era, unknown_era
from agent.doctor import doomed
from agent.errors import AgentError, Busy
from agent.locks import inspect_marker
from agent.messages.commands import Command
from agent.node import Node
from agent.retry import retry_transient
from agent.states import State
from agent.versions import Decision


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class PrecheckReport:
    checks: tuple[CheckResult, ...]
    detected: Detected | None
    decision: Decision | None
    backup_bytes: int
    free_bytes: int
    needed_bytes: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)


@dataclass(frozen=True)
class Assessment:
    """What the dry run and the real run both know before anything is touched."""

    detected: Detected | None
    image: ImageInfo | None  # None: not looked up (a skip) or not found
    image_check: CheckResult | None
    report: PrecheckReport | None  # None: a skip, decided before anything else

    @property
    def skip(self) -> bool:
        return self.report is None


async def assess(node: Node, cmd: Command, *, lock_held: bool = False) -> Assessment:
    """The one assessment behind ``--dry-run`` and the ``received`` step alike.

    A node already at the target is a skip before the image is looked at (a
    skip needs no package). The lookup retries transient registry errors and
    checks the command's digest, so the plan sees what the run will see.
    """
    detected = await node.probe.detect(use_record=False)
    if detected is not None and detected.version == cmd.target:
        return Assessment(detected, None, None, None)
    if detected is not None and _refused_by_policy(node, detected, cmd):
        # A downgrade or too long a skip is the answer, whatever the registry says.
        report = await run_prechecks(node, cmd, lock_held=lock_held, detected=detected)
        return Assessment(report.detected, None, None, report)
    ref = cmd.image.with_tag(str(cmd.target))
    info: ImageInfo | None = None
    try:
        info = await retry_transient(f"look up {ref}", lambda: node.images.inspect(ref))
        verify_digest(info, cmd.image_digest)
        image_check = CheckResult("image", True, f"{ref} exists, digest {info.digest}")
    except AgentError as exc:
        info, image_check = None, CheckResult("image", False, exc.reason)
    image_bytes = 0 if info is None or info.present_locally else info.size
    report = await run_prechecks(node, cmd, image_bytes=image_bytes, lock_held=lock_held,
                                 detected=detected)
    return Assessment(report.detected, info, image_check, report)


def _refused_by_policy(node: Node, detected: Detected, cmd: Command) -> bool:
    try:
        node.config.policy.decide(detected.version, cmd.target)
    except AgentError:
        return True
    return False


def unresolved_failure(node: Node) -> str | None:
    """Why no upgrade may start: an earlier rollback failed and nobody has fixed it.

    Upgrading on top of a node whose rollback failed would take its backup of
    a broken state and label it as good.
    """
    job = node.journal.unresolved_rollback_failure()
    if job is None:
        return None
    return (f"refused: job {job.key} ended rollback_failed ({job.reason[:200]}); after "
            f"repairing the node run `edge-upgrade-agent rollback` or "
            f"`edge-upgrade-agent resolve {job.key}`")


def resolve_verdict(node: Node, key: str) -> tuple[State, str]:
    """The outcome of ``resolve KEY``: it must name the unresolved rollback failure."""
    blocking = node.journal.unresolved_rollback_failure()
    if blocking is None:
        return State.FAILED, f"nothing to resolve: no unresolved rollback failure ({key} given)"
    if blocking.key != key:
        return State.FAILED, f"{key} is not the unresolved rollback failure; {blocking.key} is"
    return State.SUCCEEDED, f"operator resolved the rollback failure of {key}; upgrades allowed"


async def run_prechecks(node: Node, cmd: Command, *, image_bytes: int = 0,
                        lock_held: bool = False,
                        detected: Detected | None = None) -> PrecheckReport:
    """All checks; ``image_bytes`` is what the pull still needs (0 if present);
    ``detected``: a version the caller has just detected (else it is detected here)."""
    cfg = node.config
    checks: list[CheckResult] = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append(CheckResult(name, ok, detail))

    if (blocked := unresolved_failure(node)) is not None:
        add("node", False, blocked)
    for finding in doomed(node):
        # The doctor's local, certain failures: no edgecore could start after the upgrade.
        add(finding.name, False, f"{finding.detail}; fix: {finding.fix}")
    files = node.probe.files()
    if not files.binary.is_file():
        add("edgecore", False, f"edgecore binary missing at {files.binary}")
    else:
        # Never the agent's record: the version labels the backup, so it must be seen.
        detected = detected or await node.probe.detect(use_record=False)
        if detected is None:
            add("edgecore", False, "cannot detect the edgecore version (tried: the start log "
                f"of the running edgecore ({node.service.log_name}), edgecoreVersion in "
                "edgecore.yaml, MetaServer, checksums of known packages, the version literal "
                "in the binary; the agent's own record is never used to label a backup)")
        else:
            add("edgecore", True, f"{detected.version} (from {detected.source})")

    decision: Decision | None = None
    if detected is not None:
        try:
            decision = cfg.policy.decide(detected.version, cmd.target)
            add("version", True, f"{detected.version} -> {cmd.target}: {decision.value}")
        except AgentError as exc:
            add("version", False, exc.reason)

    limits = {"cpu": cfg.precheck.cpu_max_percent, "mem": cfg.precheck.mem_max_percent,
              "disk": cfg.precheck.disk_max_percent}
    for item in cmd.check_items:
        if item == "cpu":
            used = await resources.cpu_percent()
        elif item == "mem":
            used = resources.mem_percent()
        else:
            used = resources.disk_percent(cfg.paths.root)
        ok = used <= limits[item]
        add(item, ok, f"{used:.1f}% used (limit {limits[item]:g}%)")

    # The backup lands beside /etc/kubeedge; the image in docker's data root
    # (or, for unpacked images, the state dir). Same filesystem: one sum.
    backup_bytes = tree_size(files.present())
    free = resources.free_bytes(node.backup_root)
    needed = backup_bytes + cfg.precheck.reserve_bytes
    image_root = await node.images.storage_path() or node.state_dir
    image_dev = os.stat(resources.existing_parent(image_root)).st_dev
    backup_dev = os.stat(resources.existing_parent(node.backup_root)).st_dev
    if image_dev == backup_dev:
        needed += image_bytes
    elif image_bytes:
        image_free = resources.free_bytes(image_root)
        add("image-space", image_free >= image_bytes + cfg.precheck.reserve_bytes,
            f"{image_free} bytes free in {image_root}, image needs {image_bytes}")
    add("free-space", free >= needed,
        f"{free} bytes free, {needed} needed (backup {backup_bytes} + image {image_bytes}"
        f" + reserve {cfg.precheck.reserve_bytes})"
        if free >= needed else
        f"disk full: {free} bytes free on the backup filesystem, {needed} needed")

    if not cmd.upgrade_tool and era(cmd.target) is None:
        add("installer", False, unknown_era(cmd.target))
    if not cmd.upgrade_tool and await node.service.enabled_for_keadm() is False:
        # keadm greps `systemctl list-unit-files` for "edge" and then for "edgecore";
        # with edgecore's unit not enabled only edge-upgrade-agent.service matches,
        # keadm runs `systemctl stop edge.service`, fails and rolls back.
        unit = cfg.edgecore_unit
        add("unit", False, f"{unit} is not enabled, so keadm would try to stop 'edge.service' "
            f"(its `grep edge` matches edge-upgrade-agent.service) and fail; run "
            f"`systemctl enable {unit}`")

    if not lock_held and node.lock.held_by_other():
        add("lock", False, "another job holds the agent lock")
    else:
        marker = inspect_marker(node.keadm_marker, cmd.timeout_seconds)
        if marker.present and not marker.stale:
            add("lock", False, Busy(f"keadm lock {marker.describe()}").reason)
        else:
            add("lock", True, f"free (keadm marker {marker.describe()})")
    return PrecheckReport(tuple(checks), detected, decision, backup_bytes, free, needed)
