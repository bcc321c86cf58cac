"""Commands: the validated model, and the parser of our own JSON envelope.

Parsing is the boundary: past it there are only frozen dataclasses with
validated versions, names and image references, never raw dicts.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from agent.config import CHECK_ITEMS, Config
from agent.errors import InvalidCommand
from agent.versions import ImageRef, Version, check_digest, check_name, parse_image

HISTORY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$", re.ASCII)
SCHEMA = "edge-upgrade-agent/command/v1"


class Operation(str, Enum):
    UPGRADE = "upgrade"
    ROLLBACK = "rollback"
    CHECK = "check"  # a dry run, executed remotely and reported as a rehearsal
    CONFIRM = "confirm"  # releases a job parked for requireConfirmation
    CANCEL = "cancel"  # stops a job before it installs; refused after that
    PREPULL = "prepull"  # fetch and verify the package ahead of a maintenance window
    RESOLVE = "resolve"  # an operator declares a rollback_failed node repaired


# A job key: a job name, optionally "/<historyID>".
JOB_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}(/[A-Za-z0-9][A-Za-z0-9-]{0,63})?$",
                        re.ASCII)


@dataclass(frozen=True)
class Command:
    operation: Operation
    job_name: str
    node_name: str
    version: Version | None
    image: ImageRef
    image_digest: str | None = None
    timeout_seconds: int = 300
    check_items: tuple[str, ...] = ()
    require_confirmation: bool = False
    upgrade_tool: str = ""
    history_id: str = ""
    dry_run: bool = False
    source: str = "cli"
    issued_at: float = field(default_factory=time.time)
    resolves: str = ""  # RESOLVE: the key of the rollback_failed job it clears

    @property
    def key(self) -> str:
        """Idempotency key: a duplicate with the same key never runs twice."""
        return f"{self.job_name}/{self.history_id}" if self.history_id else self.job_name

    @property
    def target(self) -> Version:
        if self.version is None:
            raise InvalidCommand(f"{self.operation.value} needs a target version")
        return self.version

    def to_json(self) -> str:
        data = asdict(self)
        data["operation"] = self.operation.value
        data["version"] = str(self.version) if self.version else None
        data["image"] = str(self.image)
        data["check_items"] = list(self.check_items)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Command:
        """Reload a command the journal stored (already validated once)."""
        d = json.loads(text)
        return cls(
            operation=Operation(d["operation"]),
            job_name=d["job_name"],
            node_name=d["node_name"],
            version=Version.parse(d["version"]) if d["version"] else None,
            image=parse_image(d["image"]),
            image_digest=d["image_digest"],
            timeout_seconds=int(d["timeout_seconds"]),
            check_items=tuple(d["check_items"]),
            require_confirmation=bool(d["require_confirmation"]),
            upgrade_tool=d["upgrade_tool"],
            history_id=d["history_id"],
            dry_run=bool(d["dry_run"]),
            source=d["source"],
            issued_at=float(d["issued_at"]),
            resolves=d.get("resolves", ""),
        )


def new_job_name(prefix: str = "cli") -> str:
    import secrets  # noqa: PLC0415 (random and hmac: not for an idle daemon, issue 10)

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def build_command(
    config: Config,
    *,
    operation: Operation,
    job_name: str,
    node_name: str | None = None,
    version: str | None = None,
    image: str | None = None,
    image_digest: str | None = None,
    timeout_seconds: int | None = None,
    check_items: list[str] | tuple[str, ...] = (),
    require_confirmation: bool = False,
    upgrade_tool: str = "",
    history_id: str = "",
    dry_run: bool = False,
    source: str = "cli",
    resolves: str = "",
) -> Command:
    """Validate every field; the one way a Command gets built from outside input."""
    check_name("job name", job_name)
    node = check_name("node name", config.node_name if node_name is None else node_name)
    if node != config.node_name:
        raise InvalidCommand(f"command is for node {node!r}, this is {config.node_name!r}")
    target = Version.parse(version) if version else None
    if operation in (Operation.UPGRADE, Operation.CHECK, Operation.PREPULL) and target is None:
        raise InvalidCommand(f"{operation.value} needs a version")
    ref = parse_image(image) if image else parse_image(config.images.default_repo)
    if ref.digest:
        if image_digest and image_digest != ref.digest:
            raise InvalidCommand("image digest given twice with different values")
        image_digest = ref.digest
    # Like KubeEdge, the tag always follows the version: the repo is what counts.
    ref = ImageRef(ref.repo)
    # Only where an image is pulled, or named: a confirm, cancel, resolve or
    # rollback carries none, and the default repo need not be allowed on a node
    # that names its private registry in every upgrade.
    pulls = operation in (Operation.UPGRADE, Operation.CHECK, Operation.PREPULL)
    if (pulls or image) and not config.images.allows(ref.registry, ref.repo):
        raise InvalidCommand(
            f"image registry or repository not allowed: {ref.repo} (registry {ref.registry}; "
            "see images.allowed_registries and images.allowed_repositories)")
    if image_digest is not None:
        check_digest(image_digest)
    # 0 or absent means the default, as KubeEdge's timeoutSeconds does.
    timeout = timeout_seconds if timeout_seconds else config.default_timeout_seconds
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
        raise InvalidCommand(f"bad timeoutSeconds {timeout!r}: expected 1..86400")
    if not isinstance(require_confirmation, bool):
        raise InvalidCommand("requireConfirmation must be true or false")
    for item in check_items:
        if not isinstance(item, str) or item not in CHECK_ITEMS:
            raise InvalidCommand(f"unknown checkItem {item!r}: expected one of cpu, mem, disk")
    if isinstance(upgrade_tool, str) and upgrade_tool.lower() == "keadm":
        upgrade_tool = ""  # one name for the built-in installer, whoever spelled it
    if upgrade_tool and config.installer(upgrade_tool) is None:
        raise InvalidCommand(f"unknown upgradeTool {upgrade_tool!r}: not in the installers config")
    if history_id and not HISTORY_ID_RE.fullmatch(history_id):
        raise InvalidCommand(f"bad historyID {history_id!r}")
    if operation == Operation.RESOLVE:
        if not isinstance(resolves, str) or not JOB_KEY_RE.fullmatch(resolves):
            raise InvalidCommand(f"resolve needs the key of the failed job, got {resolves!r}")
    elif resolves:
        raise InvalidCommand("resolveJob only goes with operation resolve")
    return Command(
        operation=operation,
        job_name=job_name,
        node_name=node,
        version=target,
        image=ref,
        image_digest=image_digest,
        timeout_seconds=timeout,
        check_items=tuple(dict.fromkeys(check_items)),
        require_confirmation=require_confirmation,
        upgrade_tool=upgrade_tool,
        history_id=history_id,
        dry_run=dry_run,
        source=source,
        resolves=resolves,
    )


_ENVELOPE_KEYS = {
    "schema": str,
    "operation": str,
    "jobName": str,
    "nodeName": str,
    "version": str,
    "image": str,
    "imageDigest": str,
    "timeoutSeconds": int,
    "checkItems": list,
    "requireConfirmation": bool,
    "upgradeTool": str,
    "historyID": str,
    "dryRun": bool,
    "resolveJob": str,
}


MAX_NUMBER_CHARS = 20  # any count or timeout fits; Python's own limit is 4300 digits


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # json.loads lets the last one win, while a rejection would name the first.
            raise InvalidCommand(f"duplicate key {key[:64]!r} in one JSON object")
        out[key] = value
    return out


def _number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidCommand(f"number too long ({len(text)} characters, at most "
                             f"{MAX_NUMBER_CHARS})")
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidCommand(f"number {text} is out of range")
    return value


def _constant(name: str) -> float:
    raise InvalidCommand(f"{name} is not a JSON number")


def _unicode_only(data: Any) -> None:
    """Every key and string valid Unicode end to end: no lone surrogate from a \\ud800
    escape, which JSON decoding lets through. Iterative: nesting depth is the parser's."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidCommand("invalid Unicode in a JSON string "
                                     "(a lone surrogate)") from None


def load_json_object(raw: bytes, limit: int) -> dict[str, Any]:
    """The size cap and JSON decoding every transport's message goes through.

    Stricter than ``json.loads``: valid UTF-8 end to end (no lone surrogates),
    no duplicate keys, no NaN or Infinity, no numbers longer than any field needs.
    """
    if len(raw) > limit:
        raise InvalidCommand(f"message exceeds the {limit}-byte cap")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCommand(f"message is not valid UTF-8 (byte {exc.start})") from None
    data = load_json_text(text)
    if not isinstance(data, dict):
        raise InvalidCommand("command must be a JSON object")
    return data


def load_json_text(text: str) -> Any:
    """JSON text decoded under ``load_json_object``'s rules; any JSON value.

    Also for JSON carried as a string inside a message (beehive content), so
    that a duplicate key cannot hide there what the message's own rules refuse.
    """
    try:
        data: Any = json.loads(text, object_pairs_hook=_object, parse_int=_number,
                               parse_float=_number, parse_constant=_constant)
    except ValueError as exc:
        raise InvalidCommand(f"malformed JSON: {str(exc)[:200]}") from None
    except RecursionError:
        # A deeply nested document well under the size cap; no command nests past three.
        raise InvalidCommand("malformed JSON: nested too deeply") from None
    _unicode_only(data)
    return data


def parse_envelope(raw: bytes, config: Config, source: str) -> Command:
    """Parse our own JSON command envelope (see docs/protocol.md)."""
    return parse_envelope_dict(load_json_object(raw, config.transport.max_message_bytes),
                               config, source)


def parse_envelope_dict(data: dict[str, Any], config: Config, source: str) -> Command:
    for key, value in data.items():
        kind = _ENVELOPE_KEYS.get(key)
        if kind is None:
            raise InvalidCommand(f"unknown field {key!r}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidCommand(f"field {key!r} must be a {kind.__name__}")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise InvalidCommand(f"unknown schema {data['schema']!r}")
    try:
        operation = Operation(data.get("operation", "upgrade"))
    except ValueError:
        raise InvalidCommand(f"unknown operation {data.get('operation')!r}") from None
    if "jobName" not in data:
        raise InvalidCommand("missing jobName")
    return build_command(
        config,
        operation=operation,
        job_name=data["jobName"],
        node_name=data.get("nodeName"),
        version=data.get("version"),
        image=data.get("image"),
        image_digest=data.get("imageDigest"),
        timeout_seconds=data.get("timeoutSeconds"),
        check_items=[str(i) for i in data.get("checkItems", [])],
        require_confirmation=data.get("requireConfirmation", False),
        upgrade_tool=data.get("upgradeTool", ""),
        history_id=data.get("historyID", ""),
        dry_run=data.get("dryRun", False),
        source=source,
        resolves=data.get("resolveJob", ""),
    )


# Our envelope's jobName, KubeEdge's UpgradeID/TaskID, or the job in a resource path.
_JOB_NAME_PEEK = re.compile(
    rb'"(?:jobName|UpgradeID|TaskID)"\s*:\s*"([a-z0-9.-]{1,253})"'
    rb'|nodeupgradejob/([a-z0-9.-]{1,253})/node/|"upgrade/([a-z0-9.-]{1,253})/node/')


def peek_job_name(raw: bytes) -> str | None:
    """Best effort: the job name of a rejected message, so the rejection can be reported.

    Only the first KiB is searched: an oversized message is never parsed whole.
    """
    m = _JOB_NAME_PEEK.search(raw[:1024])
    name = next((g for g in m.groups() if g), None) if m else None
    try:
        return check_name("job name", name.decode()) if name else None
    except InvalidCommand:
        return None
