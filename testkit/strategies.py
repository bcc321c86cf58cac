"""Hypothesis strategies for every parser of outside input: valid values and near misses.

Shared by ``tests/test_fuzz.py`` and ``bench/fuzz.py``; ``testkit.raw_strategies``
turns these into bytes on the wire and adds the configuration file. Each value
the agent parses is drawn mostly from two pools: values it must accept (so a
property reaches past the first check and out as a ``Command``), and near misses
made from a valid value by one hostile edit: a shell metacharacter or a whole
injection (CVE-2026-62371 passed ``spec.version`` to a shell), a path traversal,
NUL, a newline, a lone surrogate, a non-ASCII digit, a wrong JSON type, a huge
number, deep nesting.

The messages are addressed to ``NODE`` and pass the allow-list of
``fuzz_config()``, the configuration the properties parse them with.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from hypothesis import strategies as st

from agent.config import Config, parse_config
from agent.errors import InvalidCommand
from agent.security.signing import sign

NODE = "node-1"
REPO = "kubeedge/installation-package"
REGISTRY = "registry.example.internal:5000"
INSTALLER = "custom"  # the one configured installer: upgradeTool may name it
KEY_ID = "fuzz-1"
OPERATIONS = ("upgrade", "rollback", "check", "confirm", "cancel", "prepull", "resolve")
V1ALPHA2 = "operations.kubeedge.io/v1alpha2/nodeupgradejob"

SHELL = (";", "|", "&", "&&", "||", "$(", ")", "`", ">", "<", "*", "?", "~", "!", "#", "'",
         '"', "\\", "{", "}", "[", "]", "=", "%", " ", "\t", "\n", "\r", "\x00", "\x1b")
INJECTIONS = (";touch /tmp/pwned", "$(touch /tmp/pwned)", "`touch /tmp/pwned`",
              "|touch /tmp/pwned", "&&touch /tmp/pwned", "\ntouch /tmp/pwned", "${IFS}",
              "%0atouch%20/tmp/pwned", "\r\nX-Injected: 1", "-rf", "--config=/etc/shadow")
TRAVERSALS = ("../../etc/passwd", "/etc/passwd", "..", "../", "..%2f", "%2e%2e%2f",
              "..%252f", "....//", "..\\..\\", "./", "/", "~root", "%00", "..\u2215..")
# Lone surrogates, other scripts' digits (int() and \d take them), invisible and
# look-alike characters, and a bidi override that makes a report lie.
UNICODE = ("\ud800", "\udfff", "\uff11", "\u0661", "\U0001d7d9", "\u200b", "\u202e", "\ufeff",
           "\u0131", "\u212a", "\uff56", "\u00a0", "\u2028", "\u0085", "\u00e9")
FRAGMENTS: st.SearchStrategy[str] = st.sampled_from(SHELL + INJECTIONS + TRAVERSALS + UNICODE)
# Digits of other scripts: "v\uff11.13.0" must never read as v1.13.0.
_DIGITS = {"fullwidth": 0xFF10, "arabic-indic": 0x0660, "devanagari": 0x0966,
           "mathematical": 0x1D7CE}

_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_HEX = "0123456789abcdef"


def fuzz_config(**extra: Any) -> Config:
    """The configuration fuzzed messages are parsed with: this node, three registries,
    one custom installer whose argv template uses every value a command feeds it."""
    return parse_config({
        "node_name": NODE,
        "images": {"allowed_registries": ["docker.io", REGISTRY, "localhost:5000"]},
        "installers": {INSTALLER: ["/opt/installer/bin/upgrade", "--to={to_version}",
                                   "--from={from_version}", "{image}", "{repo}",
                                   "{upgrade_id}", "{history_id}"]},
        **extra,
    })


# ------------------------------------------------------------------ near misses


@st.composite
def near(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """``valid`` with one hostile edit."""
    text = draw(valid)
    at = draw(st.integers(0, len(text)))
    edit = draw(st.sampled_from(("insert", "insert", "replace", "append", "prepend",
                                 "digits", "case", "huge", "double")))
    if edit == "digits":
        base = _DIGITS[draw(st.sampled_from(sorted(_DIGITS)))]
        return "".join(chr(base + int(c)) if c.isascii() and c.isdigit() else c for c in text)
    if edit == "case":
        return text.upper() if text != text.upper() else text.lower() + "\u0307"
    if edit == "huge":
        # Past any 4-digit field, past a float, past Python's 4300-digit int() limit.
        return text[:at] + draw(st.sampled_from(("99999", "1" * 40, "9" * 5000))) + text[at:]
    if edit == "double":
        return text + draw(st.sampled_from(("", "/", ".", ":", "@", "-"))) + text
    fragment = draw(FRAGMENTS)
    if edit == "replace":
        return text[:at] + fragment + text[at + len(fragment):]
    if edit == "append":
        return text + fragment
    if edit == "prepend":
        return fragment + text
    return text[:at] + fragment + text[at:]


@functools.cache
def wrong_types(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value but a string: what a field of the wrong Go type carries."""
    scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from((10**30, -(10**30)))
               | st.floats(allow_nan=True, allow_infinity=True))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                        max_leaves=max_leaves)


@functools.cache
def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=16),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=max_leaves)


def nested(depth: int, leaf: Any = "v1.13.0") -> Any:
    """``leaf`` inside ``depth`` lists and objects, built without recursion."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


@functools.cache
def field_value(valid: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """Mostly valid, often a near miss, sometimes any text or the wrong type."""
    return st.one_of(valid, valid, near(valid), st.text(max_size=24), wrong_types())


# ------------------------------------------------------------------ values


@functools.cache
def versions() -> st.SearchStrategy[str]:
    num = st.integers(0, 9999).map(str)
    pre = st.text(_LOWER + "ABCXYZ.-", min_size=1, max_size=12)
    real = st.sampled_from(("v1.12.1", "v1.13.0", "v1.16.0-rc.1", "v1.21.0", "v1.23.1",
                            "v1.13.0-rc.10", "v1.13.0-rc.2", "v0.0.0", "v9999.9999.9999"))
    built = st.builds(lambda a, b, c, p: f"v{a}.{b}.{c}" + (f"-{p}" if p else ""),
                      num, num, num, st.none() | pre)
    return real | built


@functools.cache
def names() -> st.SearchStrategy[str]:
    """DNS-1123 names, as Kubernetes names jobs and nodes."""
    label = st.builds(lambda a, mid, b: a + mid + b if mid or b else a,
                      st.sampled_from(_LOWER), st.text(_LOWER + "-", max_size=10),
                      st.sampled_from(_LOWER))
    return st.lists(label, min_size=1, max_size=3).map(".".join) | st.sampled_from(
        ("job-1", "upgrade-edge", "a", "n" * 63, ".".join(["a" * 63] * 3) + ".abcdefghi"))


@functools.cache
def history_ids() -> st.SearchStrategy[str]:
    return st.sampled_from(("5f0c2a0e-3b1d-4c5e-9f7a-1b2c3d4e5f60", "h-1", "A")) | st.builds(
        lambda a, rest: a + rest, st.sampled_from("AZaz09"),
        st.text("abcXYZ019-", max_size=20))


@functools.cache
def digests() -> st.SearchStrategy[str]:
    return st.text(_HEX, min_size=64, max_size=64).map("sha256:".__add__)


@functools.cache
def images(tagged: bool = True) -> st.SearchStrategy[str]:
    """``[host[:port]/]path[:tag][@digest]``; mostly in ``fuzz_config``'s allow-list."""
    host = st.sampled_from((None, None, "docker.io", REGISTRY, "localhost:5000", "localhost",
                            "evil.example.com", "127.0.0.1:5000"))
    component = st.builds(lambda a, sep, b: a + sep + b if b else a,
                          st.text(_LOWER, min_size=1, max_size=8),
                          st.sampled_from((".", "_", "__", "-", "--")),
                          st.text(_LOWER, max_size=6))
    path = st.lists(component, min_size=1, max_size=3).map("/".join) | st.just(REPO)
    tag = (st.none() | st.sampled_from(("v1.13.0", "latest"))
           | st.text(_LOWER + "_.-ABC", min_size=1, max_size=12).filter(
               lambda t: t[0] not in ".-")) if tagged else st.none()
    digest = st.none() | digests() if tagged else st.none()
    return st.builds(lambda h, p, t, d: (f"{h}/" if h else "") + p + (f":{t}" if t else "")
                     + (f"@{d}" if d else ""), host, path, tag, digest)


# ------------------------------------------------------------------ JSON text


TEXT_EDITS = ("duplicate", "nan", "number", "garbage", "truncate", "surrogate-escape")


def _member(text: str, member: str) -> str:
    """``text`` (a JSON object) with ``member`` as its first member."""
    return "{" + member + ("}" if text.strip() == "{}" else "," + text[1:])


def edit_json(draw: st.DrawFn, text: str, edit: str) -> str:
    """One of ``TEXT_EDITS`` applied to JSON text: what no encoder would write."""
    if edit == "duplicate" and text.startswith("{"):
        try:
            present = sorted(json.loads(text))  # a key that follows: json.loads keeps the last
        except (ValueError, TypeError):
            present = []
        key = draw(st.sampled_from([*present, "jobName", "version", "UpgradeID", "signed"]))
        return _member(text, f'"{key}": "v1.13.0;id"')
    if edit == "nan" and text.startswith("{"):
        constant = draw(st.sampled_from(("NaN", "Infinity", "-Infinity")))
        return _member(text, f'"timeoutSeconds": {constant}')
    if edit == "number" and text.startswith("{"):
        number = draw(st.sampled_from(("1" * 21, "1" * 5000, "1e999", "-1e400", "1.0e-999",
                                       "0.1" + "0" * 30, "-0", "1E+2")))
        return _member(text, f'"timeoutSeconds": {number}')
    if edit == "surrogate-escape" and text.startswith("{"):
        return _member(text, '"UpgradeTool": "\\ud800", "jobName": "job-\\udfff"')
    if edit == "garbage":
        return text + draw(st.sampled_from(("x", "}", " {}", "\x00", "//", "\n{}")))
    if edit == "truncate":
        return text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    return text


# ------------------------------------------------------------------ commands


_ENVELOPE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "schema": st.just("edge-upgrade-agent/command/v1"),
    "nodeName": st.just(NODE),
    "image": images(),
    "imageDigest": digests(),
    "timeoutSeconds": st.integers(0, 86400),
    "checkItems": st.lists(st.sampled_from(("cpu", "mem", "disk")), max_size=4),
    "requireConfirmation": st.booleans(),
    "upgradeTool": st.sampled_from(("", "keadm", "KEADM", INSTALLER)),
    "historyID": history_ids(),
    "dryRun": st.booleans(),
}
_ENVELOPE_KEYS = st.sets(st.sampled_from(sorted(_ENVELOPE_FIELDS)), max_size=5)


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Our own command envelope (docs/protocol.md), mostly valid."""
    op = draw(st.sampled_from(OPERATIONS))
    data: dict[str, Any] = {"jobName": draw(names())}
    if op != "upgrade" or draw(st.booleans()):
        data["operation"] = op
    if op in ("upgrade", "check", "prepull") or draw(st.booleans()):
        data["version"] = draw(versions())
    for key in draw(_ENVELOPE_KEYS):
        data[key] = draw(_ENVELOPE_FIELDS[key])
    if op in ("rollback", "resolve"):
        data.pop("dryRun", None)  # refused with them: valid messages leave it out
    if op == "resolve":
        data["resolveJob"] = draw(names())
    return data


@st.composite
def requests(draw: st.DrawFn, job: str | None = None) -> dict[str, Any]:
    """KubeEdge's Era A/B ``NodeUpgradeJobRequest`` (Go field names, no JSON tags)."""
    version = draw(versions())
    req: dict[str, Any] = {"UpgradeID": job or draw(names()), "Version": version,
                           "UpgradeTool": draw(st.sampled_from(("", "keadm", INSTALLER))),
                           "Image": draw(st.sampled_from(("", f"{REPO}:{version}"))
                                         | images())}
    if draw(st.booleans()):
        req["HistoryID"] = draw(history_ids())
    if draw(st.booleans()):  # Era B's additions
        req["ImageDigest"] = draw(digests())
        req["RequireConfirmation"] = draw(st.booleans())
    return req


def beehive(resource: str, operation: str, content: Any) -> dict[str, Any]:
    return {"header": {"msg_id": "5f0c2a0e-3b1d-4c5e-9f7a-1b2c3d4e5f60", "parent_msg_id": "",
                       "timestamp": 1_700_000_000_000, "sync": False},
            "route": {"source": "nodeupgradejobcontroller", "group": "nodeupgradejobcontroller",
                      "operation": operation, "resource": resource},
            "content": content}


_SPEC_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "image": st.just("") | images(tagged=False),
    "timeoutSeconds": st.integers(0, 86400),
    "checkItems": st.lists(st.sampled_from(("cpu", "mem", "disk")), max_size=3),
    "requireConfirmation": st.booleans(),
    "nodeNames": st.just([NODE]), "labelSelector": st.none(),
    "concurrency": st.integers(0, 10), "failureTolerate": st.just("0.1"),
    "imageDigestGatter": st.builds(lambda a, b: {"amd64": a, "arm64": b}, digests(), digests()),
}
_SPEC_KEYS = st.sets(st.sampled_from(sorted(_SPEC_FIELDS)), max_size=6)


@st.composite
def kubeedge_messages(draw: st.DrawFn) -> dict[str, Any]:
    """The three eras KubeEdge sends an edge node (agent/messages/kubeedge.py)."""
    job = draw(names())
    era = draw(st.sampled_from(("A-bare", "A", "B", "C-v1alpha1", "C-v1alpha2")))
    if era == "A-bare":
        return draw(requests(job))
    if era in ("A", "B"):
        content: Any = draw(requests(job))
        if era == "B":
            content = {"TaskID": job, "Type": "upgrade",
                       "State": draw(st.sampled_from(("", "Init", "Upgrading"))),
                       "Item": content}
        if draw(st.booleans()):
            # A relay may hand content on as JSON text, where JSON's traps can hide.
            content = edit_json(draw, json.dumps(content),
                                draw(st.sampled_from(("none",) * 4 + TEXT_EDITS)))
        return beehive(f"upgrade/{job}/node/{NODE}", "upgrade", content)
    spec: dict[str, Any] = {"version": draw(versions())}
    for key in draw(_SPEC_KEYS):
        spec[key] = draw(_SPEC_FIELDS[key])
    if "imageDigestGatter" in spec and era == "C-v1alpha1":
        spec["imageDigestGatter"] = {"value": spec["imageDigestGatter"]["amd64"]}
    return beehive(f"{V1ALPHA2}/{job}/node/{NODE}", "Check", spec)


@functools.cache
def commands() -> st.SearchStrategy[dict[str, Any]]:
    """A command in any unsigned shape the agent accepts."""
    return envelopes() | kubeedge_messages()


_VALUE_FOR = {
    "version": versions(), "Version": versions(), "jobName": names(), "UpgradeID": names(),
    "TaskID": names(), "nodeName": names(), "image": images(), "Image": images(),
    "imageDigest": digests(), "ImageDigest": digests(), "value": digests(),
    "amd64": digests(), "historyID": history_ids(), "HistoryID": history_ids(),
    "resource": st.sampled_from((f"upgrade/job-1/node/{NODE}",
                                 f"{V1ALPHA2}/job-1/node/{NODE}")),
}


def _containers(obj: Any) -> list[Any]:
    out, stack = [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list)):
            out.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return out


_SPECIAL = st.sampled_from(("", " ", "\n", "null", "0", "-1", "1e999", "NaN"))
_NESTED = st.builds(nested, st.sampled_from((8, 64, 400)))
_ANY_KEY = st.sampled_from(sorted(_VALUE_FOR)) | st.text(max_size=12)


@functools.cache
def _hostile_value(key: str | None) -> st.SearchStrategy[Any]:
    valid = _VALUE_FOR.get(key or "", st.text(max_size=12))
    return st.one_of(near(valid), wrong_types(), _NESTED, FRAGMENTS, _SPECIAL)


@st.composite
def hostile(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A message from ``base`` with one to three fields turned hostile, anywhere in it."""
    data = json.loads(json.dumps(draw(base)))  # a private copy
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(_containers(data)))
        key: Any
        if isinstance(target, list):
            if not target:
                target.append(draw(wrong_types()))
                continue
            key = draw(st.integers(0, len(target) - 1))
        else:
            key = draw(st.sampled_from(sorted(target)) | _ANY_KEY) if target else draw(_ANY_KEY)
        target[key] = draw(_hostile_value(key if key in _VALUE_FOR else None))
    return data


@st.composite
def signed(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]], key: Any) -> Any:
    """``base`` signed with ``key`` as ``KEY_ID``; often tampered with after signing.

    A hostile payload is signed as it is: an authentic command from a
    compromised controller must meet the same validation as any other.
    """
    payload = draw(base)
    try:
        wrapper = sign(payload, key, KEY_ID, ttl_seconds=draw(st.sampled_from((60, 3600))))
    except InvalidCommand:  # NaN, or a reserved field: not signable, so it goes out bare
        return payload
    tamper = draw(st.sampled_from(("none", "none", "none", "payload", "keyId", "alg",
                                   "signature", "extra", "drop", "window")))
    if tamper == "payload":
        wrapper["signed"][draw(st.sampled_from(sorted(wrapper["signed"])))] = draw(
            field_value(versions()))
    elif tamper in ("keyId", "alg", "signature"):
        wrapper[tamper] = draw(st.one_of(near(st.just(str(wrapper[tamper]))), wrong_types(),
                                         st.text(max_size=24)))
    elif tamper == "extra":
        wrapper[draw(st.sampled_from(("version", "jobName", "signed2")))] = "v1.13.0;id"
    elif tamper == "drop":
        del wrapper[draw(st.sampled_from(sorted(wrapper)))]
    elif tamper == "window":
        wrapper["signed"]["expiresAt"] = draw(st.sampled_from(
            (0, -1, 10**30, 1e308, True, "soon", wrapper["signed"]["issuedAt"])))
    return wrapper
