"""KubeEdge's own upgrade messages: cloud→edge requests in, and the v1alpha2
action message shape for a future KubeEdge-native status relay (not sent yet).

Three protocol eras reach an edge node (docs: /work/shared/design/kubeedge.md §2):
A (v1.12-v1.15) a bare or beehive-wrapped ``NodeUpgradeJobRequest``; B (v1.16-v1.20)
a ``NodeTaskRequest`` per stage; C (v1.21+) the whole ``NodeUpgradeJobSpec`` once.
Key names are KubeEdge's exactly: Go field names where its structs have no JSON tags
(A/B), json tags for the v1alpha2 spec (C). This module only checks shapes and Go
types; every value is then validated by ``build_command``, the one gate to a Command.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Iterable
from typing import Any

from agent.config import Config
from agent.errors import InvalidCommand
from agent.messages.commands import Command, Operation, build_command, load_json_text
from agent.versions import check_name

V1ALPHA2_KIND = "operations.kubeedge.io/v1alpha2/nodeupgradejob"
EDGEHUB_MODULE = "websocket"  # KubeEdge's EdgeHubModuleName: edge→cloud messages name it
_KINDS = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "a list"}
_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

_REQUEST_KEYS = ("UpgradeID", "HistoryID", "Version", "UpgradeTool", "Image",
                 "ImageDigest", "RequireConfirmation")  # the last two since Era B
_TASK_KEYS = ("TaskID", "Type", "State", "Item")
_SPEC_KEYS = ("version", "timeoutSeconds", "image", "imageDigestGatter", "checkItems",
              "requireConfirmation", "nodeNames", "labelSelector", "concurrency",
              "failureTolerate")  # the last four schedule the job cloud-side: ignored here
_GATHERER_KEYS = ("value", "amd64", "arm64", "registryAPI")
# Era B node states. The first message (""/Init) carries the whole request, and
# Upgrading repeats it: the agent runs the whole flow from either, duplicates being
# caught by the command's key. The others only drive KubeEdge's own per-stage edge.
_START_STATES = ("", "Init", "Upgrading")
_STAGE_STATES = ("Checking", "BackingUp", "RollingBack")


def machine_arch() -> str:
    """The GOARCH name of this machine, as imageDigestGatter keys digests by it."""
    machine = platform.machine().lower()
    return _ARCHES.get(machine, machine)


def parse_kubeedge(data: dict[str, Any], config: Config, source: str, *,
                   arch: str | None = None) -> Command | None:
    """A Command from a KubeEdge message; None if ``data`` is none of KubeEdge's shapes.

    A KubeEdge shape that is invalid raises InvalidCommand with a report-safe reason.
    ``arch`` overrides the machine architecture (tests; None: ``machine_arch()``).
    """
    # build_command quotes bad values; InvalidCommand caps its reason (MAX_INPUT_REASON).
    if "route" in data and "content" in data:
        return _beehive(data, config, source, arch or machine_arch())
    if "UpgradeID" in data:
        # Era A/B request without the envelope: it names no node, so it is for this one.
        return _request(data, config, source, job=None, node=None)
    return None


def _show(value: Any) -> str:
    """Quote a value from the wire for a reason, cut short: reasons end up in reports."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _known(obj: dict[str, Any], keys: Iterable[str], where: str) -> None:
    # Unknown keys are refused, not skipped: a misspelt field (say a digest) silently
    # dropped would run an upgrade with less checking than the sender asked for.
    allowed = set(keys)
    for key in obj:
        if key not in allowed:
            raise InvalidCommand(f"unknown {where} field {_show(key)}")


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]`` checked against its Go type; None when absent or null (Go's zero)."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidCommand(f"{where}.{key} must be {_KINDS[kind]}")
    return value


def _strings(obj: dict[str, Any], key: str, where: str) -> list[str]:
    items = _field(obj, key, list, where) or []
    if not all(isinstance(item, str) for item in items):
        raise InvalidCommand(f"{where}.{key} must be a list of strings")
    return list(items)


def _content(content: Any) -> dict[str, Any]:
    # beehive fills an object; a relay may hand it on as JSON text instead,
    # decoded as strictly as the message itself.
    if isinstance(content, str):
        try:
            content = load_json_text(content)
        except InvalidCommand as exc:
            raise InvalidCommand(f"content is a string but not a JSON document: "
                                 f"{exc.reason}") from None
    if not isinstance(content, dict):
        raise InvalidCommand("content must be an object")
    return content


def _beehive(msg: dict[str, Any], config: Config, source: str, arch: str) -> Command:
    _known(msg, ("header", "route", "content"), "message")
    _field(msg, "header", dict, "message")  # unused, but must be beehive's shape
    if (route := _field(msg, "route", dict, "message")) is None:
        raise InvalidCommand("message.route must be an object")
    operation = _field(route, "operation", str, "route") or ""
    resource = _field(route, "resource", str, "route") or ""
    content = _content(msg["content"])
    parts = resource.split("/")
    if len(parts) == 6 and "/".join(parts[:3]) == V1ALPHA2_KIND and parts[4] == "node":
        job, node = _names(parts[3], parts[5])
        # "Check" is the first action of KubeEdge's flow, not our dry run: the spec
        # asks for the whole upgrade, so it becomes an upgrade command.
        if operation != "Check":
            raise InvalidCommand(f"unknown operation {_show(operation)} for nodeupgradejob")
        return _spec(content, config, source, job=job, node=node, arch=arch)
    if len(parts) == 4 and parts[0] in ("upgrade", "prepull") and parts[2] == "node":
        job, node = _names(parts[1], parts[3])
        if parts[0] != "upgrade" or operation != "upgrade":
            raise InvalidCommand(f"unknown operation {_show(operation)} for {parts[0]}")
        if "TaskID" in content:
            return _task(content, config, source, job, node)
        return _request(content, config, source, job=job, node=node)
    raise InvalidCommand(f"unsupported KubeEdge resource {_show(resource)}")


def _names(job: str, node: str) -> tuple[str, str]:
    # Checked here although build_command checks them again: an empty node name
    # would otherwise fall back to this node's name there.
    return check_name("job name", job), check_name("node name", node)


def _request(req: dict[str, Any], config: Config, source: str, *, job: str | None,
             node: str | None, where: str = "NodeUpgradeJobRequest") -> Command:
    """Era A/B ``NodeUpgradeJobRequest``; ``job`` is the job the envelope names."""
    _known(req, _REQUEST_KEYS, where)
    upgrade_id = _field(req, "UpgradeID", str, where) or ""
    if not upgrade_id:
        raise InvalidCommand("empty UpgradeID")  # KubeEdge's edge refuses it too
    if job is not None and upgrade_id != job:
        raise InvalidCommand(f"UpgradeID {_show(upgrade_id)} does not match job {job!r}")
    tool = _field(req, "UpgradeTool", str, where) or ""
    return build_command(
        config, operation=Operation.UPGRADE, job_name=upgrade_id, node_name=node,
        version=_field(req, "Version", str, where) or None,
        # "<repo>:<version>": build_command keeps the repo, the version picks the tag.
        image=_field(req, "Image", str, where) or None,
        image_digest=_field(req, "ImageDigest", str, where) or None,
        timeout_seconds=None, check_items=(),  # the request carries neither
        require_confirmation=bool(_field(req, "RequireConfirmation", bool, where)),
        # KubeEdge lower-cases the tool; "keadm" is our built-in installer, named "".
        upgrade_tool="" if tool.lower() == "keadm" else tool,
        history_id=_field(req, "HistoryID", str, where) or "",
        dry_run=False, source=source,
    )


def _task(task: dict[str, Any], config: Config, source: str, job: str, node: str) -> Command:
    """Era B ``NodeTaskRequest``: only the message that starts the flow is a command."""
    where = "NodeTaskRequest"
    _known(task, _TASK_KEYS, where)
    task_id = _field(task, "TaskID", str, where) or ""
    if task_id != job:
        raise InvalidCommand(f"TaskID {_show(task_id)} does not match job {job!r}")
    kind = _field(task, "Type", str, where) or ""
    if kind != "upgrade":
        raise InvalidCommand(f"unknown operation {_show(kind)} for NodeTaskRequest")
    state = _field(task, "State", str, where) or ""
    if state in _STAGE_STATES:
        raise InvalidCommand(f"KubeEdge per-stage message {state} is not needed: "
                             "the agent runs the whole flow from the first message")
    if state not in _START_STATES:
        raise InvalidCommand(f"unknown NodeTaskRequest.State {_show(state)}")
    if (item := _field(task, "Item", dict, where)) is None:
        raise InvalidCommand("NodeTaskRequest.Item must be an object")
    return _request(item, config, source, job=job, node=node, where=f"{where}.Item")


def _spec(spec: dict[str, Any], config: Config, source: str, *, job: str, node: str,
          arch: str) -> Command:
    """Era C: the whole v1alpha2 ``NodeUpgradeJobSpec``, sent once per node."""
    where = "NodeUpgradeJobSpec"
    _known(spec, _SPEC_KEYS, where)
    return build_command(
        config, operation=Operation.UPGRADE, job_name=job, node_name=node,
        version=_field(spec, "version", str, where) or None,
        # Empty means the default repo. KubeEdge's edge pulls ":vX.Y.Z" instead (a bug).
        image=_field(spec, "image", str, where) or None,
        image_digest=_digest(spec.get("imageDigestGatter"), arch),
        # uint32; 0 means "default" as in KubeEdge. build_command checks the range.
        timeout_seconds=_field(spec, "timeoutSeconds", int, where) or None,
        check_items=_strings(spec, "checkItems", where),
        require_confirmation=bool(_field(spec, "requireConfirmation", bool, where)),
        upgrade_tool="", history_id="",  # v1alpha2 has none: the job name keys the command
        dry_run=False, source=source,
    )


def _digest(gatherer: Any, arch: str) -> str | None:
    """The digest from ``imageDigestGatter`` (sic): v1alpha1 gives one ``value``,
    v1alpha2 one per arch. ``registryAPI`` lookups are implemented nowhere in KubeEdge."""
    where = "imageDigestGatter"
    if gatherer is None:
        return None
    if not isinstance(gatherer, dict):
        raise InvalidCommand(f"{where} must be an object")
    _known(gatherer, _GATHERER_KEYS, where)
    value = _field(gatherer, "value", str, where)
    per_arch = {a: d for a in ("amd64", "arm64") if (d := _field(gatherer, a, str, where))}
    registry = _field(gatherer, "registryAPI", dict, where)
    if value and per_arch:
        raise InvalidCommand(f"{where} gives both value and per-arch digests")
    if value:
        return str(value)
    if per_arch:
        if arch not in per_arch:
            raise InvalidCommand(f"{where} has no digest for {arch}")
        return str(per_arch[arch])
    if registry is not None:
        raise InvalidCommand(f"{where}.registryAPI is not supported; give the digest")
    return None


def upstream_action_message(report: dict[str, Any], node_name: str) -> dict[str, Any] | None:
    """KubeEdge v1alpha2's ``UpdateNodeActionStatus`` for the last action of a report
    (the cloud appends each to the node's actionFlow); None before the first action."""
    flow = report.get("actionFlow")
    if not isinstance(flow, list) or not flow:
        return None
    last = flow[-1]
    return {
        "header": {"msg_id": str(uuid.uuid4()), "parent_msg_id": "",
                   "timestamp": int(time.time() * 1000), "sync": False},
        "route": {"source": EDGEHUB_MODULE, "group": "hub", "operation": "UpdateNodeActionStatus",
                  "resource": f"{V1ALPHA2_KIND}/{report['jobName']}/node/{node_name}"},
        # UpstreamMessage's json tags; extend is "<fromVersion>,<toVersion>".
        "content": {"action": last["action"], "succ": bool(last["succ"]),
                    "finishTime": last["finishTime"], "reason": last.get("reason", ""),
                    "extend": last.get("extend", "")},
    }
