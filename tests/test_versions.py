"""Versions, image references, the version policy and the command envelope parser."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import Config, parse_config
from agent.errors import InvalidCommand, PrecheckFailed
from agent.messages.commands import Command, Operation, parse_envelope
from agent.versions import (
    Decision,
    ImageRef,
    Version,
    VersionPolicy,
    parse_image,
    version_from_kubelet,
)

NODE = "edge-1"
REPO = "kubeedge/installation-package"
PRIVATE_REPO = "registry.example.internal:5000/kubeedge/installation-package"
DIGEST = "sha256:" + "0123456789abcdef" * 4


def v(text: str) -> Version:
    return Version.parse(text)


# --------------------------------------------------------------------------- Version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v1.12.1", Version(1, 12, 1)),
        ("v1.13.0-rc.1", Version(1, 13, 0, "rc.1")),
        ("v0.0.0", Version(0, 0, 0)),
        ("v10.200.3000", Version(10, 200, 3000)),
    ],
)
def test_version_parse_accepts(text: str, expected: Version) -> None:
    assert Version.parse(text) == expected
    assert str(Version.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "1.12",
        "v1.12",
        "1.12.1",
        "v1.12.1; rm -rf /",
        "$(id)",
        "v1.12.1 && id",
        "`id`",
        "v1.12.1-",
        "v1.12.1+build",
        "v1.12.1-rc/1",
        "v12345.0.0",
        "V1.12.1",
        "",
        "v1.12.1-" + "a" * 65,
    ],
)
def test_version_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidCommand, match="bad version string"):
        Version.parse(text)


@pytest.mark.parametrize("text", ["v1.12.1\n", " v1.12.1", "v1.12.1\t"])
def test_version_parse_rejects_surrounding_whitespace(text: str) -> None:
    with pytest.raises(InvalidCommand):
        Version.parse(text)


@pytest.mark.parametrize("value", [None, 1, 1.12, b"v1.12.1", ["v1.12.1"], {"v": 1}])
def test_version_parse_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidCommand, match="bad version string"):
        Version.parse(value)


def test_version_ordering() -> None:
    ordered = [
        v("v1.9.9"),
        v("v1.12.0"),
        v("v1.12.1"),
        v("v1.13.0-alpha.1"),
        v("v1.13.0-beta.1"),
        v("v1.13.0-rc.1"),
        v("v1.13.0"),
        v("v1.13.1"),
        v("v2.0.0-rc.1"),
        v("v2.0.0"),
    ]
    assert sorted(reversed(ordered)) == ordered
    for a, b in itertools.pairwise(ordered):
        assert a < b
        assert b > a
        assert a != b
    assert v("v1.13.0-rc.1") < v("v1.13.0")
    assert v("v1.12.9") < v("v1.13.0-rc.1")
    assert v("v1.12.1") == Version(1, 12, 1)
    assert v("v01.012.1") == v("v1.12.1")  # leading zeros normalise


def test_version_prerelease_numeric_identifiers_compare_numerically() -> None:
    assert v("v1.13.0-rc.2") < v("v1.13.0-rc.10")


def test_version_from_kubelet() -> None:
    assert version_from_kubelet("v1.22.17-kubeedge-v1.12.1") == v("v1.12.1")
    assert version_from_kubelet("v1.27.7-kubeedge-v1.18.0-rc.1") == v("v1.18.0-rc.1")
    assert version_from_kubelet(" v1.22.17-kubeedge-v1.12.1\n") == v("v1.12.1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "v1.22.17",
        "v1.22.17-kubeedge-",
        "v1.22.17-kubeedge-v1.12",
        "v1.22.17-kubeedge-1.12.1",
        "v1.22.17-kubeedge-v1.12.1; id",
        "kubeedge-v1.12.1",
    ],
)
def test_version_from_kubelet_garbage(text: str) -> None:
    assert version_from_kubelet(text) is None


# --------------------------------------------------------------------------- images


def test_parse_image_plain_repo() -> None:
    ref = parse_image(REPO)
    assert ref == ImageRef(REPO)
    assert ref.registry == "docker.io"
    assert str(ref) == REPO


def test_parse_image_registry_port_tag() -> None:
    ref = parse_image(f"{PRIVATE_REPO}:v1.13.0")
    assert ref == ImageRef(PRIVATE_REPO, "v1.13.0", None)
    assert ref.registry == "registry.example.internal:5000"
    assert str(ref) == f"{PRIVATE_REPO}:v1.13.0"
    assert str(ref.with_tag("v1.14.0")) == f"{PRIVATE_REPO}:v1.14.0"


def test_parse_image_digest() -> None:
    ref = parse_image(f"{PRIVATE_REPO}@{DIGEST}")
    assert ref == ImageRef(PRIVATE_REPO, None, DIGEST)
    tagged = parse_image(f"{PRIVATE_REPO}:v1.13.0@{DIGEST}")
    assert tagged == ImageRef(PRIVATE_REPO, "v1.13.0", DIGEST)
    assert str(tagged) == f"{PRIVATE_REPO}:v1.13.0@{DIGEST}"


@pytest.mark.parametrize(
    ("text", "registry"),
    [
        ("installation-package", "docker.io"),
        ("kubeedge/installation-package", "docker.io"),
        ("library/kubeedge/installation-package", "docker.io"),
        ("localhost/kubeedge/installation-package", "localhost"),
        ("localhost:5000/installation-package", "localhost:5000"),
        ("registry.example.internal/kubeedge/installation-package", "registry.example.internal"),
        ("registry:5000/installation-package", "registry:5000"),
    ],
)
def test_image_registry(text: str, registry: str) -> None:
    assert parse_image(text).registry == registry


@pytest.mark.parametrize(
    "text",
    [
        "",
        "kubeedge/Installation-Package",
        "kubeedge/installation package",
        " kubeedge/installation-package",
        "kubeedge/installation-package;id",
        "kubeedge/installation-package:v1.13.0;rm -rf /",
        "kubeedge/../installation-package",
        "../kubeedge/installation-package",
        "kubeedge/installation..package",
        "kubeedge/installation-package:",
        "kubeedge/installation-package@sha256:abc",
        "kubeedge/installation-package@sha256:" + "A" * 64,
        "kubeedge/installation-package:$(id)",
        "kubeedge//installation-package",
        "/kubeedge/installation-package",
        "a/" * 256 + "b",  # > 512 characters
    ],
)
def test_parse_image_rejects(text: str) -> None:
    with pytest.raises(InvalidCommand, match="bad image reference"):
        parse_image(text)


def test_parse_image_rejects_uppercase_first_component() -> None:
    with pytest.raises(InvalidCommand):
        parse_image("KubeEdge/installation-package")


def test_parse_image_length_cap() -> None:
    component = "a" * 100
    ok = "/".join([component] * 5)  # 504 characters
    assert len(ok) <= 512
    assert parse_image(ok).repo == ok
    too_long = ok + "/bbbbbbbbb"
    assert len(too_long) > 512
    with pytest.raises(InvalidCommand):
        parse_image(too_long)


@pytest.mark.parametrize("value", [None, 1, b"kubeedge/installation-package"])
def test_parse_image_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidCommand):
        parse_image(value)


# --------------------------------------------------------------------------- policy


def test_policy_skip_when_equal() -> None:
    assert VersionPolicy().decide(v("v1.12.1"), v("v1.12.1")) is Decision.SKIP


def test_policy_upgrade() -> None:
    policy = VersionPolicy()
    assert policy.decide(v("v1.12.1"), v("v1.13.0")) is Decision.UPGRADE
    assert policy.decide(v("v1.12.1"), v("v1.12.2")) is Decision.UPGRADE
    assert policy.decide(v("v1.13.0-rc.1"), v("v1.13.0")) is Decision.UPGRADE
    assert policy.decide(v("v1.12.1"), v("v3.0.0")) is Decision.UPGRADE  # no skip limit


def test_policy_refuses_downgrade() -> None:
    with pytest.raises(PrecheckFailed) as info:
        VersionPolicy().decide(v("v1.13.0"), v("v1.12.1"))
    assert "v1.13.0" in info.value.reason
    assert "v1.12.1" in info.value.reason
    assert "downgrade" in info.value.reason
    with pytest.raises(PrecheckFailed, match="downgrade"):
        VersionPolicy().decide(v("v1.13.0"), v("v1.13.0-rc.1"))


def test_policy_allows_downgrade_when_configured() -> None:
    policy = VersionPolicy(allow_downgrade=True)
    assert policy.decide(v("v1.13.0"), v("v1.12.1")) is Decision.UPGRADE
    # max_minor_skip limits upgrades only
    policy = VersionPolicy(allow_downgrade=True, max_minor_skip=0)
    assert policy.decide(v("v1.15.0"), v("v1.12.1")) is Decision.UPGRADE


@pytest.mark.parametrize(
    ("skip", "current", "target", "allowed"),
    [
        (0, "v1.12.1", "v1.12.5", True),
        (0, "v1.12.1", "v1.13.0", False),
        (1, "v1.12.1", "v1.13.0", True),
        (1, "v1.12.1", "v1.13.4", True),
        (1, "v1.12.1", "v1.14.0", False),
        (1, "v1.13.0-rc.1", "v1.14.0", True),
        (2, "v1.12.1", "v1.14.0", True),
        (2, "v1.12.1", "v1.15.0", False),
        (None, "v1.12.1", "v1.19.0", True),
        # crossing a major is never within a minor-skip limit ...
        (1, "v1.99.0", "v2.0.0", False),
        (0, "v1.12.1", "v2.12.1", False),
        (5, "v1.30.0", "v2.0.0", False),
        # ... unless there is no limit
        (None, "v1.99.0", "v2.0.0", True),
    ],
)
def test_policy_max_minor_skip(skip: int | None, current: str, target: str, allowed: bool) -> None:
    policy = VersionPolicy(max_minor_skip=skip)
    if allowed:
        assert policy.decide(v(current), v(target)) is Decision.UPGRADE
    else:
        with pytest.raises(PrecheckFailed, match="max_minor_skip") as info:
            policy.decide(v(current), v(target))
        assert current in info.value.reason
        assert target in info.value.reason


# --------------------------------------------------------------------------- envelope


def make_config(**overrides: Any) -> Config:
    data: dict[str, Any] = {
        "node_name": NODE,
        "installers": {"custom": ["/usr/local/bin/install-edgecore", "{to_version}"]},
        "images": {"allowed_registries": ["docker.io", "registry.example.internal:5000"]},
    }
    data.update(overrides)
    return parse_config(data)


CONFIG = make_config()
_DROP = object()  # envelope(field=_DROP) leaves the field out


def envelope(**fields: Any) -> bytes:
    data: dict[str, Any] = {"jobName": "upgrade-job-1", "version": "v1.13.0"}
    data.update(fields)
    return json.dumps({k: val for k, val in data.items() if val is not _DROP}).encode()


def test_envelope_full() -> None:
    raw = envelope(
        schema="edge-upgrade-agent/command/v1",
        operation="upgrade",
        nodeName=NODE,
        image=PRIVATE_REPO,
        imageDigest=DIGEST,
        timeoutSeconds=600,
        checkItems=["cpu", "disk", "cpu"],
        requireConfirmation=True,
        upgradeTool="custom",
        historyID="h-1",
        dryRun=True,
    )
    cmd = parse_envelope(raw, CONFIG, "mqtt")
    assert isinstance(cmd, Command)
    assert cmd.operation is Operation.UPGRADE
    assert cmd.job_name == "upgrade-job-1"
    assert cmd.node_name == NODE
    assert cmd.version == v("v1.13.0")
    assert cmd.target == v("v1.13.0")
    assert cmd.image == ImageRef(PRIVATE_REPO)
    assert cmd.image_digest == DIGEST
    assert cmd.timeout_seconds == 600
    assert cmd.check_items == ("cpu", "disk")
    assert cmd.require_confirmation is True
    assert cmd.upgrade_tool == "custom"
    assert cmd.history_id == "h-1"
    assert cmd.key == "upgrade-job-1/h-1"
    assert cmd.dry_run is True
    assert cmd.source == "mqtt"
    assert Command.from_json(cmd.to_json()) == cmd


def test_envelope_defaults() -> None:
    cmd = parse_envelope(envelope(), CONFIG, "spool")
    assert cmd.operation is Operation.UPGRADE
    assert cmd.node_name == NODE
    assert cmd.image == ImageRef(REPO)
    assert cmd.image_digest is None
    assert cmd.timeout_seconds == CONFIG.default_timeout_seconds
    assert cmd.check_items == ()
    assert cmd.require_confirmation is False
    assert cmd.upgrade_tool == ""
    assert cmd.key == "upgrade-job-1"
    assert cmd.dry_run is False


def test_envelope_rollback_needs_no_version() -> None:
    cmd = parse_envelope(envelope(operation="rollback", version=_DROP), CONFIG, "spool")
    assert cmd.operation is Operation.ROLLBACK
    assert cmd.version is None
    with pytest.raises(InvalidCommand, match="needs a target version"):
        _ = cmd.target


def test_envelope_image_tag_is_dropped() -> None:
    cmd = parse_envelope(envelope(image=f"{PRIVATE_REPO}:v1.99.0"), CONFIG, "spool")
    assert cmd.image == ImageRef(PRIVATE_REPO)
    assert cmd.image.tag is None
    assert cmd.version == v("v1.13.0")


def test_envelope_image_digest_moves_to_image_digest() -> None:
    cmd = parse_envelope(envelope(image=f"{PRIVATE_REPO}:v1.13.0@{DIGEST}"), CONFIG, "spool")
    assert cmd.image == ImageRef(PRIVATE_REPO)
    assert cmd.image_digest == DIGEST
    other = "sha256:" + "f" * 64
    with pytest.raises(InvalidCommand, match="digest given twice"):
        parse_envelope(envelope(image=f"{PRIVATE_REPO}@{DIGEST}", imageDigest=other), CONFIG, "s")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe\xfa", "not valid UTF-8"),
        (b'{"jobName": "a"', "malformed JSON"),
        (b"[]", "must be a JSON object"),
        (b'"upgrade"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (envelope(nodeName="edge-2"), "command is for node 'edge-2'"),
        (envelope(nodeName="Edge_2"), "bad node name"),
        (envelope(nodeName=NODE + "\n"), "bad node name"),
        (envelope(version="v1.13"), "bad version string 'v1.13'"),
        (envelope(version="v1.13.0; reboot"), "bad version string"),
        (envelope(version=_DROP), "upgrade needs a version"),
        (envelope(operation="check", version=_DROP), "check needs a version"),
        (envelope(image="kubeedge/Installation-Package"), "bad image reference"),
        (envelope(image="kubeedge/pkg;id"), "bad image reference"),
        (envelope(imageDigest="sha256:abc"), "bad image digest"),
        (envelope(bogus=1), "unknown field 'bogus'"),
        (envelope(job_name="x"), "unknown field 'job_name'"),
        (envelope(version=113), "field 'version' must be a str"),
        (envelope(timeoutSeconds="300"), "field 'timeoutSeconds' must be a int"),
        (envelope(timeoutSeconds=True), "field 'timeoutSeconds' must be a int"),
        (envelope(timeoutSeconds=1.5), "field 'timeoutSeconds' must be a int"),
        (envelope(timeoutSeconds=86401), "bad timeoutSeconds 86401"),
        (envelope(timeoutSeconds=-1), "bad timeoutSeconds -1"),
        (envelope(checkItems="cpu"), "field 'checkItems' must be a list"),
        (envelope(dryRun="yes"), "field 'dryRun' must be a bool"),
        (envelope(requireConfirmation=1), "field 'requireConfirmation' must be a bool"),
        (envelope(jobName=None), "field 'jobName' must be a str"),
        (envelope(operation="reboot"), "unknown operation 'reboot'"),
        (envelope(schema="other/v9"), "unknown schema 'other/v9'"),
        (envelope(checkItems=["cpu", "gpu"]), "unknown checkItem 'gpu'"),
        (envelope(checkItems=[1]), "unknown checkItem '1'"),
        (envelope(upgradeTool="rm"), "unknown upgradeTool 'rm'"),
        (envelope(historyID="-bad"), "bad historyID"),
        (envelope(jobName=_DROP), "missing jobName"),
        (envelope(jobName="Bad_Name"), "bad job name"),
        (envelope(jobName="x" * 254), "bad job name"),
    ],
)
def test_envelope_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_envelope(raw, CONFIG, "spool")
    assert reason in info.value.reason


def test_envelope_size_cap() -> None:
    config = make_config(transport={"max_message_bytes": 256})
    raw = envelope()
    fits = b" " * (256 - len(raw)) + raw  # leading whitespace is still valid JSON
    assert len(fits) == 256
    assert parse_envelope(fits, config, "spool").job_name == "upgrade-job-1"
    with pytest.raises(InvalidCommand, match="exceeds the 256-byte cap"):
        parse_envelope(b" " + fits, config, "spool")
    # the cap is checked before parsing: oversize garbage says "exceeds", not "malformed"
    with pytest.raises(InvalidCommand, match="exceeds"):
        parse_envelope(b"\xff" * 1000, config, "spool")
    # and the default cap is the configured 64 KiB
    with pytest.raises(InvalidCommand, match="exceeds the 65536-byte cap"):
        parse_envelope(b" " * 65536 + raw, CONFIG, "spool")


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b'{"jobName": ' * 2000, b"1" * 5000, b'{"timeoutSeconds": ' + b"9" * 5000 + b"}"],
)
def test_envelope_pathological_json_is_invalid_command(raw: bytes) -> None:
    assert len(raw) <= CONFIG.transport.max_message_bytes
    with pytest.raises(InvalidCommand):
        parse_envelope(raw, CONFIG, "spool")


@pytest.mark.parametrize(
    "fields",
    [
        {"jobName": "upgrade-job-1\n"},
        {"historyID": "h-1\n"},
        {"imageDigest": DIGEST + "\n"},
    ],
)
def test_envelope_rejects_trailing_newline(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidCommand):
        parse_envelope(envelope(**fields), CONFIG, "spool")


# --------------------------------------------------------------------------- properties

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=10,
)
_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?\Z")
_plausible: dict[str, st.SearchStrategy[Any]] = {
    "schema": st.sampled_from(["edge-upgrade-agent/command/v1", "x"]),
    "operation": st.sampled_from(["upgrade", "rollback", "check", "reboot", ""]),
    "jobName": _names,
    "nodeName": st.sampled_from([NODE, "edge-2", ""]) | _names,
    "version": st.sampled_from(["v1.13.0", "v1.12.1-rc.1", "v1.13", ""])
    | st.from_regex(r"\Av\d{1,3}\.\d{1,3}\.\d{1,3}\Z"),
    "image": st.sampled_from([REPO, PRIVATE_REPO, f"{PRIVATE_REPO}@{DIGEST}", "A/b", ""]),
    "imageDigest": st.sampled_from([DIGEST, "sha256:" + "f" * 64, "md5:x", ""]),
    "timeoutSeconds": st.integers(min_value=-5, max_value=100_000),
    "checkItems": st.lists(st.sampled_from(["cpu", "mem", "disk", "gpu"]), max_size=4),
    "requireConfirmation": st.booleans(),
    "upgradeTool": st.sampled_from(["", "keadm", "custom", "nope"]),
    "historyID": st.sampled_from(["", "h-1", "-x"]) | _names,
    "dryRun": st.booleans(),
}


@st.composite
def _envelopes(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key in draw(st.sets(st.sampled_from(sorted(_plausible)))):
        value_strategy = _plausible[key] | _json if draw(st.booleans()) else _plausible[key]
        data[key] = draw(value_strategy)
    if draw(st.booleans()):
        data.update(draw(st.dictionaries(st.text(max_size=12), _json, max_size=2)))
    return data


_FAST = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


def _outcome(raw: bytes) -> Command | None:
    try:
        return parse_envelope(raw, CONFIG, "fuzz")
    except InvalidCommand as exc:
        assert exc.reason
        return None


@_FAST
@given(st.binary(max_size=300))
def test_envelope_arbitrary_bytes_never_crash(raw: bytes) -> None:
    result = _outcome(raw)
    assert result is None or isinstance(result, Command)


@_FAST
@given(_envelopes())
def test_envelope_arbitrary_dicts_never_crash(data: dict[str, Any]) -> None:
    result = _outcome(json.dumps(data).encode())
    if result is not None:
        assert isinstance(result, Command)
        assert result.node_name == NODE
        assert result.job_name == data["jobName"]
        assert result.image.tag is None
        assert set(result.check_items) <= {"cpu", "mem", "disk"}
        assert 1 <= result.timeout_seconds <= 86400


@_FAST
@given(_envelopes())
def test_envelope_arbitrary_dicts_utf16(data: dict[str, Any]) -> None:
    """json.loads accepts UTF-16/32 bytes too; that path must not crash either."""
    result = _outcome(json.dumps(data).encode("utf-16"))
    assert result is None or isinstance(result, Command)


def test_envelope_image_outside_the_allow_list() -> None:
    registry = "registry.example.internal:5000"
    config = make_config(images={"allowed_registries": [registry],
                                 "allowed_repositories": [f"{registry}/kubeedge/*"]})
    ok = envelope(image="registry.example.internal:5000/kubeedge/installation-package")
    assert parse_envelope(ok, config, "test").image.registry == "registry.example.internal:5000"
    for image in ("kubeedge/installation-package", "registry.example.internal:5000/other/pkg",
                  "evil.example.com/kubeedge/installation-package"):
        with pytest.raises(InvalidCommand, match="not allowed"):
            parse_envelope(envelope(image=image), config, "test")
