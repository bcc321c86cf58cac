"""The doctor's checks of the node itself: edgecore's service and version, the
package image, keadm's leftovers, disk and memory. Read-only; edgecore is never run.
"""

from __future__ import annotations

import asyncio
import json

from agent.adapters import resources
from agent.config import Config
from agent.doctor import ERROR, KEADM_REPORT, KEADM_STAGING, OK, WARN, Finding
from agent.errors import AgentError
from agent.locks import inspect_marker, keadm_pids
from agent.node import RECORD_KEY, Node
from agent.versions import Version, parse_image


async def service_finding(node: Node) -> Finding:
    try:
        status = await node.service.status()
        enabled = await node.service.enabled_for_keadm()
    except (AgentError, OSError) as exc:
        reason = exc.reason if isinstance(exc, AgentError) else str(exc)
        return Finding("edgecore-service", WARN, f"cannot ask the service manager: {reason}",
                       "systemctl did not answer.", "Run `systemctl status edgecore` by hand.")
    unit = node.config.edgecore_unit
    detail = (f"{unit} {status.state}, main pid {status.main_pid or '-'}, "
              f"{status.n_restarts} restart(s)")
    logs = f"Read `journalctl -u {unit} -n 100` for the error before each start."
    if not status.active:
        return Finding("edgecore-service", ERROR, detail,
                       "edgecore is not running: stopped by hand, or it exits at start "
                       "(configuration, certificates or token; see the other findings).",
                       f"{logs} Then `systemctl start {unit}`.")
    if status.n_restarts:
        return Finding("edgecore-service", WARN, detail,
                       "edgecore exited and systemd restarted it (keadm's unit has "
                       "Restart=always): it crashes, or exits when it cannot reach cloudcore "
                       "or load its certificates.", logs)
    if enabled is False:
        return Finding("edgecore-service", WARN, f"{detail}; not enabled",
                       f"keadm stops the edge unit it finds with `systemctl list-unit-files | "
                       f"grep enabled | grep edge`; with {unit} not enabled it picks the wrong "
                       "one and the upgrade fails. The node also does not start edgecore at "
                       "boot.", f"`systemctl enable {unit}`.")
    return Finding("edgecore-service", OK, detail)


async def version_finding(node: Node) -> tuple[Finding, Version | None]:
    """Each detection source on its own (edgecore is never run to ask it)."""
    probe = node.probe
    answers: dict[str, Version | None] = {}
    try:
        answers[node.service.log_name] = await probe.from_start_log()
    except AgentError:
        answers[node.service.log_name] = None
    answers["config"] = probe.from_config()
    if node.config.health.metaserver_url:
        answers["metaserver"] = await probe.from_metaserver()
    answers["package"] = await probe.from_package()
    answers["binary"] = await probe.from_binary()
    record = node.journal.get_meta(RECORD_KEY)
    detail = "; ".join(f"{k}: {v or '-'}" for k, v in answers.items())
    detail += f"; agent record: {record or '-'}"
    seen = {v for v in answers.values() if v is not None}
    first = next((v for v in answers.values() if v is not None), None)
    if not seen:
        return Finding(
            "edgecore-version", ERROR, f"no source knows the version ({detail})",
            "edgecore is not running (so it logged no Version: line), edgecore.yaml has no "
            "edgecoreVersion (written from v1.21), and the binary matches no package the agent "
            "has seen and holds no single version literal. An upgrade would be refused.",
            "Start edgecore so it logs its version, or set health.metaserver_url (e.g. "
            "http://127.0.0.1:10550)."), None
    if len(seen) > 1:
        return Finding(
            "edgecore-version", WARN, f"the sources disagree ({detail})",
            "The binary on disk was replaced without a restart, or edgecore.yaml's "
            "edgecoreVersion is from another release. The first answer counts: "
            f"{first}.", "Restart edgecore so the running binary is the one on disk; "
            "check /usr/local/bin/edgecore."), first
    return Finding("edgecore-version", OK, f"{first} ({detail})"), first


async def image_finding(node: Node, version: Version | str | None, timeout: float) -> Finding:
    if version is None:
        return Finding("image", WARN, "not checked: the edgecore version is unknown",
                       "The package tag follows the version.", "Pass --to-version V.")
    ref = parse_image(node.config.images.default_repo).with_tag(str(version))
    try:
        info = await asyncio.wait_for(node.images.inspect(ref), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return Finding("image", WARN, f"looking up {ref} took over {timeout:g}s",
                       "A slow or unreachable registry or container engine.",
                       "Check the network, a proxy, or the engine; or pre-load the image.")
    except (AgentError, OSError) as exc:
        reason = exc.reason if isinstance(exc, AgentError) else f"{ref}: {exc}"
        reason = reason if str(ref) in reason else f"{ref}: {reason}"
        low = reason.lower()
        if "credential" in low or "password file" in low:
            return Finding("image", ERROR, reason,
                           f"The registry {ref.registry} refused the configured credentials, "
                           "none are configured for it, or the password file is unreadable.",
                           f"Check images.credentials.{ref.registry} (username, password_file) "
                           "and try them with `docker login` by hand.")
        if "not found" in low:
            return Finding("image", WARN, reason,
                           f"No tag {ref.tag} in {ref.repo}: a mirror without this release, or "
                           "a wrong images.default_repo.",
                           "Push or mirror the installation package for this version, or check "
                           "images.default_repo.")
        return Finding("image", WARN, reason,
                       "The registry or the container engine cannot be reached (the seed's "
                       "`pull Images failed`): no internet access, DNS, a proxy, or the engine "
                       "is down.",
                       "Fix the access, or pre-load the image (`docker load`, `ctr -n k8s.io "
                       "images import`), or mirror it to an internal registry and set "
                       "images.default_repo.")
    where = "present locally" if info.present_locally else "in the registry"
    return Finding("image", OK, f"{ref} {where}, digest {info.digest}")


def keadm_findings(config: Config) -> list[Finding]:
    out: list[Finding] = []
    marker_path = config.paths.node(config.paths.keadm_lock)
    marker = inspect_marker(marker_path, config.default_timeout_seconds)
    if not marker.present:
        out.append(Finding("keadm-lock", OK, f"no {marker_path.name}"))
    elif marker.keadm_running:
        pids = ", ".join(map(str, keadm_pids()))
        out.append(Finding("keadm-lock", WARN, f"{marker_path} {marker.describe()}; keadm pid "
                           f"{pids}", "keadm is running an upgrade, backup or rollback now.",
                           "Let it finish (`pgrep -a keadm`); the agent waits for it."))
    else:
        out.append(Finding(
            "keadm-lock", WARN, f"{marker_path} {marker.describe()}",
            "A keadm upgrade, backup or rollback crashed or was killed and left its lock; "
            "keadm refuses to run again while it exists (like the seed's preflight failure "
            "from leftover files).",
            f"If `pgrep -a keadm` shows nothing, `rm {marker_path}`. The agent clears a lock "
            f"older than {config.default_timeout_seconds}s itself at its next upgrade."))
    staging = config.paths.node(KEADM_STAGING)
    dirs = sorted(p.name for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []
    if dirs:
        out.append(Finding("keadm-staging", WARN, f"{staging} holds {', '.join(dirs)}",
                           "keadm stages the new edgecore there and deletes it after a "
                           "successful upgrade: a manual upgrade failed or was interrupted.",
                           f"Once no keadm runs, remove {staging}/<version>/ (only staged "
                           "copies; nothing runs from there)."))
    else:
        out.append(Finding("keadm-staging", OK, f"nothing staged in {staging}"))
    report = config.paths.node(KEADM_REPORT)
    if report.exists():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
            what = (f"{data.get('event')} {data.get('fromVersion')} -> {data.get('toVersion')}"
                    f", success {data.get('success')}, {data.get('errorMessage') or 'no error'}"
                    if isinstance(data, dict) else "not a JSON object")
        except (OSError, ValueError) as exc:
            what = f"unreadable: {exc}"
        out.append(Finding("keadm-report", WARN, f"{report}: {what}",
                           "keadm (v1.21+) leaves its result there for edgecore, which reports "
                           "it to cloudcore and deletes it on its next connection, but only for "
                           "a job it still has: this one was never relayed.",
                           f"Read it; once that upgrade is settled, delete {report}."))
    else:
        out.append(Finding("keadm-report", OK, f"no {report.name}"))
    return out


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # not reached


def resource_findings(config: Config) -> list[Finding]:
    limits = config.precheck
    used = resources.disk_percent(config.paths.root)
    free = resources.free_bytes(config.backup_root)
    disk = (f"{used:.1f}% used (limit {limits.disk_max_percent:g}%), {_size(free)} free where "
            "backups go")
    out = [Finding("disk", OK, disk) if used <= limits.disk_max_percent
           and free >= limits.reserve_bytes else Finding(
               "disk", WARN, disk, "The disk is nearly full: an upgrade needs room for the "
               "backup, the package and precheck.reserve_bytes, and refuses otherwise.",
               "Free space (old backups, unused images, journal logs: `journalctl "
               "--vacuum-size=100M`).")]
    mem = resources.mem_percent()
    text = f"{mem:.1f}% used (limit {limits.mem_max_percent:g}%)"
    out.append(Finding("memory", OK, text) if mem <= limits.mem_max_percent else Finding(
        "memory", WARN, text, "Little memory is available; an upgrade with the mem check "
        "is refused, and edgecore or the container runtime may be OOM-killed.",
        "Find the largest processes (`ps aux --sort=-rss | head`), or raise "
        "precheck.mem_max_percent if this is normal here."))
    return out


