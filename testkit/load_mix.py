"""The command mix of the load burst: valid and invalid messages, each with its answer.

Every message says which final report must answer it: a valid one names the
job key whose final report it causes (one per message; a duplicate of a
finished job re-sends that job's final report); an invalid one names the
rejection key intake derives from its bytes (``rejected:<name>:<hash>``,
agent/intake.py). Invalid messages are unique byte strings on purpose: the
same bytes again within a minute are answered by no new report, so a repeat
could not be told from a loss.

Valid kinds are the cheap ones: they exercise intake, the journal, the
worker and the reporter without a one-second install each (phase 2 of the
load does real installs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.messages.commands import peek_job_name

NODE = "node-1"
FROM_VERSION = "v1.12.1"
TO_VERSION = "v1.13.0"
REPO_IMAGE = "kubeedge/installation-package"
SEEDS = 5  # finished jobs the burst duplicates: ``seed-0`` .. ``seed-4``


@dataclass(frozen=True)
class Sent:
    kind: str
    payload: bytes
    key: str  # the job key of the final report that answers it, or its rejection key
    valid: bool


def rejection_key(payload: bytes) -> str:
    """The key intake journals a rejection of ``payload`` under (Intake.reject)."""
    name = peek_job_name(payload) or "unnamed"
    return f"rejected:{name}:{hashlib.sha256(payload).hexdigest()[:12]}"


def seed_command(k: int) -> dict[str, Any]:
    # An upgrade to the version already running: journalled, run, ``skipped``.
    return {"jobName": f"seed-{k}", "version": FROM_VERSION}


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


# kind -> (command for message i, its job key); weighted by repetition in MIX.
VALID: dict[str, Callable[[int], tuple[dict[str, Any], str]]] = {
    "dry-run": lambda i: ({"jobName": f"dry-{i}", "version": TO_VERSION, "dryRun": True},
                          f"dry-{i}"),
    "check": lambda i: ({"jobName": f"chk-{i}", "operation": "check", "version": TO_VERSION},
                        f"chk-{i}"),
    "skip": lambda i: ({"jobName": f"skip-{i}", "version": FROM_VERSION}, f"skip-{i}"),
    "duplicate": lambda i: (seed_command(i % SEEDS), f"seed-{i % SEEDS}"),
    "era-a-skip": lambda i: ({"UpgradeID": f"era-a-{i}", "HistoryID": f"h{i}",
                              "Version": FROM_VERSION, "UpgradeTool": "keadm",
                              "Image": f"{REPO_IMAGE}:{FROM_VERSION}"}, f"era-a-{i}/h{i}"),
    "prepull": lambda i: ({"jobName": f"pp-{i}", "operation": "prepull",
                           "version": TO_VERSION}, f"pp-{i}"),
}

INVALID: dict[str, Callable[[int], bytes]] = {
    "malformed-json": lambda i: b'{"jobName": "junk-%d", not json' % i,
    "not-an-object": lambda i: b"[%d]" % i,
    "not-utf8": lambda i: b'{"jobName": "bytes-%d", "version": "\xff\xfe"}' % i,
    "duplicate-key": lambda i: b'{"jobName": "dk-%d", "jobName": "dk-%d"}' % (i, i),
    "nan": lambda i: b'{"jobName": "nan-%d", "timeoutSeconds": NaN}' % i,
    "deep-nesting": lambda i: b'{"jobName": "deep-%d", "x": ' % i + b"[" * 5000 + b"]" * 5000
                              + b"}",
    "oversized": lambda i: _json({"jobName": f"big-{i}", "pad": "x" * 70_000}),
    "bad-version": lambda i: _json({"jobName": f"badver-{i}", "version": "1.13"}),
    "wrong-node": lambda i: _json({"jobName": f"node-{i}", "version": TO_VERSION,
                                   "nodeName": "node-2"}),
    "bad-image": lambda i: _json({"jobName": f"img-{i}", "version": TO_VERSION,
                                  "image": "x;rm -rf /"}),
    "foreign-registry": lambda i: _json({"jobName": f"reg-{i}", "version": TO_VERSION,
                                         "image": "evil.example.com/kubeedge/pkg"}),
    "unknown-operation": lambda i: _json({"jobName": f"op-{i}", "operation": "format-disk"}),
    "unknown-field": lambda i: _json({"jobName": f"uf-{i}", "version": TO_VERSION,
                                      "rm": "-rf"}),
    "bad-job-name": lambda i: _json({"jobName": f"Bad_Name_{i}", "version": TO_VERSION}),
    "string-timeout": lambda i: _json({"jobName": f"to-{i}", "version": TO_VERSION,
                                       "timeoutSeconds": "300"}),
    "rollback-dry-run": lambda i: _json({"jobName": f"rbd-{i}", "operation": "rollback",
                                         "dryRun": True}),
    # KubeEdge Era B sends one message per stage; only the first one starts a job.
    "era-b-stage": lambda i: _json({
        "header": {"msg_id": f"m{i}", "parent_msg_id": "", "timestamp": i, "sync": False},
        "route": {"source": "taskmanager", "group": "taskmanager", "operation": "upgrade",
                  "resource": f"upgrade/erab-{i}/node/{NODE}"},
        "content": {"TaskID": f"erab-{i}", "Type": "upgrade", "State": "Checking",
                    "Item": {"CheckItem": ["cpu"]}}}),
}

# About half valid; dry runs and skips weighted up, as the common traffic.
MIX: tuple[str, ...] = (
    "dry-run", "malformed-json", "skip", "not-an-object", "check", "not-utf8", "duplicate",
    "duplicate-key", "dry-run", "nan", "era-a-skip", "deep-nesting", "skip", "oversized",
    "prepull", "bad-version", "dry-run", "wrong-node", "skip", "bad-image", "check",
    "foreign-registry", "duplicate", "unknown-operation", "dry-run", "unknown-field",
    "era-a-skip", "bad-job-name", "skip", "string-timeout", "dry-run", "rollback-dry-run",
    "check", "era-b-stage",
)


def burst_commands(n: int) -> list[Sent]:
    """``n`` messages cycling through MIX; message i is unique wherever it must be."""
    out = []
    for i in range(n):
        kind = MIX[i % len(MIX)]
        if kind in VALID:
            body, key = VALID[kind](i)
            out.append(Sent(kind, _json(body), key, True))
        else:
            payload = INVALID[kind](i)
            out.append(Sent(kind, payload, rejection_key(payload), False))
    return out
