"""Hypothesis strategies for bytes as they arrive: messages on the wire, agent.yaml on disk.

The companion of ``testkit.strategies`` (values and commands as parsed JSON),
for ``tests/test_fuzz.py`` and ``bench/fuzz.py``. ``wire`` serialises a
message and now and then mangles it the way only raw bytes can: invalid
UTF-8, a BOM, UTF-16, duplicate keys, NaN, over-long numbers, nesting deeper
than any encoder would write, a non-object or nothing at all. ``configs`` and
``config_files`` do the same for the agent's configuration: known keys with
mostly valid values, hostile ones (NUL, surrogates, huge numbers, wrong types,
deep nesting), and YAML's own traps (aliases, recursion, tags, tabs).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml
from hypothesis import strategies as st

from testkit.strategies import (
    INSTALLER,
    REGISTRY,
    TEXT_EDITS,
    commands,
    edit_json,
    hostile,
    images,
    names,
    near,
    nested,
    signed,
    wrong_types,
)

# ------------------------------------------------------------------ messages


def deep_json(depth: int, kind: str = "[") -> bytes:
    """``depth`` levels of nesting as text: deeper than ``nested`` could dump."""
    if kind == "[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


_INVALID_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                 b"\xe2\x82", b"\xfe\xff")


@st.composite
def wire(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> bytes:
    """``base`` as the bytes a transport delivers, now and then mangled on the way."""
    try:
        text = json.dumps(draw(base), ensure_ascii=draw(st.booleans()))
    except (ValueError, RecursionError):
        text = "{}"
    edit = draw(st.sampled_from(("none",) * 6 + TEXT_EDITS + (
        "bom", "utf16", "invalid-utf8", "deep", "top-level", "blank")))
    text = edit_json(draw, text, edit)
    if edit == "blank":
        text = draw(st.sampled_from(("", " ", "\n", "\t\r\n ", "\u00a0")))
    elif edit == "top-level":
        text = draw(st.sampled_from(("[]", "null", "1", '"x"', "true", f"[{text}]")))
    raw = text.encode("utf-8", "surrogatepass")
    if edit == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif edit == "utf16":
        raw = text.encode("utf-16", "surrogatepass")
    elif edit == "invalid-utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(_INVALID_UTF8)) + raw[at:]
    elif edit == "deep":
        raw = deep_json(draw(st.sampled_from((100, 990, 1100, 5000, 30000))),
                        draw(st.sampled_from(("[", "{"))))
    return raw


def any_command_bytes(key: Any) -> st.SearchStrategy[bytes]:
    """Every shape, signed or not, valid or hostile, as bytes on the wire."""
    shapes = commands() | hostile(commands())
    return wire(shapes | signed(shapes, key)) | st.binary(max_size=200)


# ------------------------------------------------------------------ configuration


@functools.cache
def paths() -> st.SearchStrategy[str]:
    return st.sampled_from(("/var/lib/edge-upgrade-agent", "/run", "/srv/agent/state",
                            "/etc/kubeedge/backup", "/etc/kubeedge/backup/old",
                            "/etc/kubeedge/x/../backup")) | st.lists(
        st.text("abcxyz019._-", min_size=1, max_size=8), max_size=4).map(
        lambda parts: "/" + "/".join(parts))


_CONFIG_KEYS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("node_name",): names(),
    ("paths", "root"): paths(),
    ("paths", "state_dir"): paths(),
    ("paths", "backup_dir"): paths(),
    ("paths", "edgecore_db"): paths(),
    ("service", "manager"): st.sampled_from(("systemd", "process")),
    ("service", "unit"): st.sampled_from(("edgecore.service", "edge@1.service")),
    ("service", "process", "log_file"): paths(),
    ("policy", "max_minor_skip"): st.integers(0, 5),
    ("policy", "allow_downgrade"): st.booleans(),
    ("policy", "default_timeout_seconds"): st.integers(1, 86400),
    ("precheck", "cpu_max_percent"): st.floats(0, 100),
    ("precheck", "reserve_bytes"): st.integers(0, 2**40),
    ("health", "grace_seconds"): st.floats(0, 3600),
    ("health", "metaserver_url"): st.just("http://127.0.0.1:10550"),
    ("backup", "keep"): st.integers(1, 100),
    ("images", "backend"): st.sampled_from(("local", "docker", "containerd", "auto")),
    ("images", "default_repo"): images(tagged=False),
    ("images", "allowed_registries"): st.lists(st.sampled_from(("docker.io", REGISTRY)),
                                               min_size=1, max_size=2),
    ("images", "allowed_repositories"): st.lists(st.just("kubeedge/*"), max_size=1),
    ("images", "credentials", REGISTRY): st.just(
        {"username": "u", "password_file": "/etc/edge-upgrade-agent/registry-password"}),
    ("images", "docker", "host"): st.just("unix:///run/docker.sock"),
    ("images", "containerd", "namespace"): st.just("k8s.io"),
    ("images", "local", "dir"): paths(),
    ("installers", INSTALLER): st.just(["/opt/installer/bin/upgrade", "{to_version}"]),
    ("transport", "kind"): st.sampled_from(("spool", "mqtt")),
    ("transport", "max_message_bytes"): st.integers(256, 2**24),
    ("transport", "spool", "poll_interval_seconds"): st.floats(0.01, 60),
    ("transport", "mqtt", "host"): st.just("broker.example.internal"),
    ("transport", "mqtt", "port"): st.integers(1, 65535),
    ("transport", "mqtt", "topic_prefix"): st.just("kubeedge/nodes/{node}/upgrade"),
    ("security", "require_signed_commands"): st.booleans(),
    ("security", "trusted_keys_dir"): paths(),
    ("metrics", "listen"): st.sampled_from(("9464", "0.0.0.0:9464", "[::1]:9464", 9464)),
    ("logging", "level"): st.sampled_from(("debug", "info", "warning")),
    ("labels",): st.just({"site": "factory-a"}),
    # Keys that moved: still read, with a note.
    ("images", "local_dir"): paths(),
    ("transport", "spool_dir"): paths(),
    ("transport", "mqtt", "labels"): st.just({"site": "factory-b"}),
}
_HOSTILE_SETTING = st.one_of(
    near(st.sampled_from(("/var/lib/edge-upgrade-agent", "edgecore.service", "node-1", "9464",
                          "unix:///run/docker.sock", "k8s.io")) | paths()),
    wrong_types(),
    st.sampled_from((10**400, -(10**400), float("nan"), float("inf"), True, "", "\x00",
                     "/etc/\x00shadow", "/srv/\ud800", [None], {"": None}, [[]])),
    st.builds(nested, st.sampled_from((5, 200, 2000)), st.just(1)),
)


@st.composite
def configs(draw: st.DrawFn) -> Any:
    """A parsed YAML document for ``parse_config``: known keys, mostly valid values."""
    data: dict[str, Any] = {}
    chosen = draw(st.sets(st.sampled_from(sorted(_CONFIG_KEYS)), max_size=8))
    for path in sorted(chosen):
        value = draw(_HOSTILE_SETTING if draw(st.integers(0, 3)) == 0 else _CONFIG_KEYS[path])
        parent = data
        for key in path[:-1]:
            nxt = parent.setdefault(key, {})
            if not isinstance(nxt, dict):
                break
            parent = nxt
        else:
            parent[path[-1]] = value
    if draw(st.integers(0, 9)) == 0:
        return draw(wrong_types() | st.text(max_size=8))  # not a mapping at all
    return data


def billion_laughs(levels: int) -> str:
    """YAML's "billion laughs": ``levels`` layers of nine aliases each."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join([*lines, f"node_name: *l{levels}", ""])


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """The bytes of an agent.yaml: a dumped ``configs()`` or one of YAML's own traps."""
    data = draw(configs())
    try:
        # "{}" would leave a trap's keys following a flow mapping: invalid, never parsed.
        text = yaml.safe_dump(data, allow_unicode=draw(st.booleans())) if data != {} else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        text = "node_name: node-1\n"
    depth = draw(st.sampled_from((40, 400, 1000)))  # 1000: past PyYAML's own recursion
    trap = draw(st.sampled_from(("none",) * 4 + (
        "duplicate", "tab", "aliases", "recursive", "big-int", "deep", "python-tag",
        "surrogate", "nul", "invalid-utf8", "date", "binary", "complex-key", "empty")))
    extra = {
        "duplicate": "node_name: node-1\nnode_name: node-2\n",
        "tab": "paths:\n\tstate_dir: /x\n",
        "aliases": billion_laughs(draw(st.sampled_from((3, 9)))),
        "recursive": "labels: &a {x: *a}\nimages: {allowed_registries: &b [*b]}\n",
        "big-int": f"precheck: {{reserve_bytes: {'9' * 5000}}}\n",
        "deep": "labels: " + "[" * depth + "]" * depth + "\n",
        "python-tag": "node_name: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
        "surrogate": 'paths: {state_dir: "/srv/\\ud800"}\n',
        "nul": 'paths: {state_dir: "/srv/\\0x"}\n',
        "date": "node_name: 2026-01-01\n",
        "binary": "node_name: !!binary aGVsbG8=\n",
        "complex-key": "? [a, b]\n: c\n",
        "empty": "",
    }.get(trap)
    raw = (text if extra is None else extra if trap == "empty" else text + extra).encode(
        "utf-8", "surrogatepass")
    if trap == "invalid-utf8":
        raw += b"labels: {a: \xff}\n"
    return raw
