"""Property tests for every parser of outside input, over ``testkit.strategies``.

Each parser either returns a frozen, valid value or raises the agent's own
error for it (``InvalidCommand``, ``ConfigError``) with a non-empty, bounded
reason; any other exception is a bug. Accepted values round-trip, and those
that reach an argv or a path hold only characters no shell or path join can
misread. About 10,000 examples in all, derandomized; ``EDGE_FUZZ_EXAMPLES``
multiplies every count (``bench/fuzz.py`` runs these same properties with
more), ``EDGE_FUZZ_RANDOM=1`` draws new examples each run. The strategies are
``testkit.strategies`` (values, commands) and ``testkit.raw_strategies``
(bytes on the wire, the YAML file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.adapters.keadm import InstallSpec, custom_argv, keadm_argv
from agent.config import CHECK_ITEMS, Config, load_config, parse_config
from agent.errors import MAX_REASON, AgentError, ConfigError, InstallError, InvalidCommand
from agent.intake import Parser
from agent.messages.commands import (
    HISTORY_ID_RE,
    JOB_KEY_RE,
    Command,
    load_json_object,
    parse_envelope_dict,
    peek_job_name,
)
from agent.messages.kubeedge import parse_kubeedge
from agent.security.signing import RESERVED, verify
from agent.versions import (
    DIGEST_RE,
    IMAGE_RE,
    NAME_RE,
    VERSION_RE,
    ImageRef,
    Version,
    check_digest,
    check_name,
    parse_image,
    version_from_kubelet,
)
from testkit import raw_strategies as rs
from testkit import strategies as s

SCALE = float(os.environ.get("EDGE_FUZZ_EXAMPLES", "1"))
RANDOM = os.environ.get("EDGE_FUZZ_RANDOM") == "1"
CONFIG = s.fuzz_config()
KEY = Ed25519PrivateKey.generate()
PARSER = Parser(CONFIG)
PARSER.keys = {s.KEY_ID: KEY.public_key()}
LIMIT = CONFIG.transport.max_message_bytes
# What may reach an argv element or a path component: no shell metacharacter,
# no whitespace, no NUL, nothing outside ASCII. "=" only comes from templates.
ARGV_SAFE = re.compile(r"[A-Za-z0-9._:/@+=-]+", re.ASCII)
VALUE_SAFE = re.compile(r"[A-Za-z0-9._:/@+-]*", re.ASCII)
CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")

RUNS: Counter[str] = Counter()  # examples run per property, for bench/fuzz.py
PROPERTIES: dict[str, tuple[int, Callable[[], None]]] = {}  # name -> (examples, test)


def fuzz(examples: int, *, found: tuple[dict[str, Any], ...] = (),
         **strategies: st.SearchStrategy[Any]
         ) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """``given(**strategies)`` with ``examples`` (times EDGE_FUZZ_EXAMPLES), counted.

    ``found``: inputs that once broke the property, run first on every run
    whatever the strategies draw.
    """
    def wrap(check: Callable[..., None]) -> Callable[[], None]:
        def run(**drawn: Any) -> None:
            RUNS[check.__name__] += 1
            check(**drawn)

        run.__name__ = run.__qualname__ = check.__name__
        run.__doc__ = check.__doc__
        test = given(**strategies)(run)
        for case in found:
            test = example(**case)(test)
        test = settings(
            max_examples=max(1, round(examples * SCALE)), deadline=None, database=None,
            derandomize=not RANDOM, suppress_health_check=list(HealthCheck),
        )(test)
        PROPERTIES[check.__name__] = (examples, test)
        return test
    return wrap


def frozen(value: object) -> bool:
    params = getattr(type(value), "__dataclass_params__", None)
    return dataclasses.is_dataclass(value) and params is not None and bool(params.frozen)


def refused(exc: AgentError) -> None:
    """A refusal a report, a log line and an operator can take."""
    assert isinstance(exc.reason, str) and exc.reason.strip(), repr(exc.reason)
    assert len(exc.reason) <= exc.max_reason <= MAX_REASON
    assert str(exc) == exc.reason
    exc.reason.encode("utf-8")  # a lone surrogate would break the report's JSON and the log
    if isinstance(exc, InvalidCommand):
        # It quotes the sender's input: one line, control characters escaped.
        assert not CONTROL.search(exc.reason), repr(exc.reason)


def safe_value(value: str) -> None:
    assert VALUE_SAFE.fullmatch(value) and not value.startswith("-"), repr(value)


def accepted_version(version: Version) -> None:
    assert frozen(version)
    text = str(version)
    assert VERSION_RE.fullmatch(text) and Version.parse(text) == version
    safe_value(text)


def accepted_command(cmd: Command, config: Config = CONFIG) -> None:
    """Everything past the gate: valid, frozen, storable, and safe where it is used."""
    assert frozen(cmd) and frozen(cmd.image)
    assert check_name("job name", cmd.job_name) and cmd.node_name == config.node_name
    assert cmd.image.tag is None and cmd.image.digest is None
    assert IMAGE_RE.fullmatch(cmd.image.repo)
    assert config.images.allows(cmd.image.registry, cmd.image.repo)
    assert cmd.image_digest is None or DIGEST_RE.fullmatch(cmd.image_digest)
    assert cmd.history_id == "" or HISTORY_ID_RE.fullmatch(cmd.history_id)
    assert cmd.resolves == "" or JOB_KEY_RE.fullmatch(cmd.resolves)
    assert 1 <= cmd.timeout_seconds <= 86400 and set(cmd.check_items) <= set(CHECK_ITEMS)
    assert cmd.upgrade_tool in ("", s.INSTALLER)
    for value in (cmd.job_name, cmd.image.repo, cmd.image_digest or "", cmd.history_id,
                  cmd.resolves):
        safe_value(value)
    assert Command.from_json(cmd.to_json()) == cmd  # what the journal stores, it reloads
    if cmd.version is not None:
        accepted_version(cmd.version)
        installer_argv_is_safe(cmd, config)


def installer_argv_is_safe(cmd: Command, config: Config) -> None:
    """The values reach keadm's or the custom installer's argv whole, and paths stay put."""
    assert cmd.version is not None
    staging = config.state_dir / "staging"
    for parent in (staging, config.backup_root):
        joined = Path(os.path.normpath(parent / str(cmd.version)))
        assert joined.parent == parent, joined
    spec = InstallSpec(keadm=staging / str(cmd.version) / "keadm",
                       from_version=Version(1, 12, 1), to_version=cmd.version,
                       image=cmd.image, edgecore_config=Path("/etc/kubeedge/config/edgecore.yaml"),
                       upgrade_id=cmd.job_name, history_id=cmd.history_id,
                       image_digest=cmd.image_digest)
    template = config.installer(s.INSTALLER)
    assert template is not None
    argvs = [custom_argv(template, spec)]
    assert len(argvs[0]) == len(template)  # a value never splits into two arguments
    try:
        argvs.append(keadm_argv(spec))
    except InstallError as exc:  # an era no keadm was checked for: refused, not guessed
        refused(exc)
    for argv in argvs:
        for arg in argv:
            assert ARGV_SAFE.fullmatch(arg), (arg, argv)


# ------------------------------------------------------------------ versions, names, images


@fuzz(900, text=st.one_of(s.versions(), s.near(s.versions()), st.text(max_size=30),
                          s.wrong_types()))
def test_version_strings(text: Any) -> None:
    try:
        version = Version.parse(text)
    except InvalidCommand as exc:
        refused(exc)
        return
    accepted_version(version)


@st.composite
def _version_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two versions, often one digit or a zero apart: where an order can go wrong."""
    a = draw(s.versions())
    edit = draw(st.sampled_from(("other", "zero", "digit", "pre")))
    if edit == "other":
        return a, draw(s.versions())
    at = draw(st.integers(0, len(a)))
    if edit == "zero":
        b = a[:at] + "0" + a[at:]
    elif edit == "digit":
        b = a[:at] + draw(st.sampled_from("0123456789")) + a[at + 1:]
    else:
        pres = st.sampled_from(("rc.1", "rc.01", "rc.001", "rc.10", "rc.a", "1", "01", "0",
                                "rc.1.0", "rc", "rc.-1", "rc..1", "rc.0a"))
        a = a.split("-")[0]
        a, b = a + "-" + draw(pres), a + "-" + draw(pres)
    return a, b


@fuzz(400, pair=_version_pairs(), found=(
    {"pair": ("v1.16.0-rc.1", "v1.16.0-rc.01")},  # each compared greater than the other
))
def test_version_order_is_total_and_agrees_with_equality(pair: tuple[str, str]) -> None:
    try:
        a, b = Version.parse(pair[0]), Version.parse(pair[1])
    except InvalidCommand as exc:
        refused(exc)
        return
    # Each operator on its own: total_ordering derives > from < and ==, so only the
    # mirrored pair (a < b, b < a) shows an order that equality disagrees with.
    assert [a < b, a == b, b < a].count(True) == 1, (a, b)
    assert (a > b) == (b < a) and (a <= b) == (b >= a), (a, b)
    assert (a == b) == (str(a) == str(b))
    assert a != b or hash(a) == hash(b)


@fuzz(300, text=st.one_of(
    s.versions().map("v1.22.17-kubeedge-".__add__),
    s.near(s.versions()).map("v1.22.17-kubeedge-".__add__),
    st.sampled_from(("v1.22.17-kubeedge-v1.13.0-" + "x" * 80, " v1.22.17-kubeedge-v1.13.0\n")),
    st.text(max_size=40),
), found=({"text": "v1.22.17-kubeedge-v99999.0.0"},))  # raised InvalidCommand from detection
def test_kubelet_versions(text: str) -> None:
    """The metaserver's kubeletVersion: a version or None, never an error (detection)."""
    version = version_from_kubelet(text)
    if version is not None:
        accepted_version(version)


@fuzz(900, text=st.one_of(s.images(), s.near(s.images()), st.text(max_size=40),
                          s.wrong_types(), st.just("a" * 513)))
def test_image_references(text: Any) -> None:
    try:
        ref = parse_image(text)
    except InvalidCommand as exc:
        refused(exc)
        return
    assert frozen(ref) and isinstance(ref, ImageRef)
    assert str(ref) == text and parse_image(str(ref)) == ref  # exact round trip
    safe_value(text)
    assert ref.registry == "docker.io" or ref.repo.startswith(ref.registry + "/")
    assert ref.digest is None or check_digest(ref.digest) == ref.digest


@fuzz(600, text=st.one_of(s.names(), s.near(s.names()), s.digests(), s.near(s.digests()),
                          s.history_ids(), st.text(max_size=20), s.wrong_types()))
def test_names_and_digests(text: Any) -> None:
    for check, pattern in ((lambda v: check_name("job name", v), NAME_RE),
                           (check_digest, DIGEST_RE)):
        try:
            value = check(text)
        except InvalidCommand as exc:
            refused(exc)
            continue
        assert value == text and pattern.fullmatch(value) and len(value) <= 253
        safe_value(value)


# ------------------------------------------------------------------ messages


@fuzz(1000, raw=st.one_of(rs.wire(s.commands() | s.hostile(s.commands()) | s.json_values()),
                          st.binary(max_size=300)))
def test_json_decoding(raw: bytes) -> None:
    try:
        data = load_json_object(raw, LIMIT)
    except InvalidCommand as exc:
        refused(exc)
        return
    assert isinstance(data, dict)
    # What passes is JSON a strict peer can re-encode: no NaN, no lone surrogate.
    json.dumps(data, allow_nan=False, ensure_ascii=False).encode("utf-8")


def _envelope_or_refusal(data: Any, parse: Callable[[Any], Command | None]) -> None:
    try:
        cmd = parse(data)
    except InvalidCommand as exc:
        refused(exc)
        return
    if cmd is not None:
        accepted_command(cmd)


@fuzz(1400, data=s.envelopes() | s.hostile(s.envelopes()))
def test_envelopes(data: dict[str, Any]) -> None:
    _envelope_or_refusal(data, lambda d: parse_envelope_dict(d, CONFIG, "fuzz"))


_LOOSE = st.dictionaries(st.sampled_from(("route", "content", "UpgradeID")), s.json_values(),
                        max_size=3)
# Content as JSON text took the last of two keys, so the first, hostile one hid.
_HIDDEN = s.beehive("upgrade/job-1/node/node-1", "upgrade",
                    '{"UpgradeID": "job-1", "Version": "v1.13.0;id", "Version": "v1.13.0"}')


@fuzz(1400, data=st.one_of(s.kubeedge_messages(), s.hostile(s.kubeedge_messages()), _LOOSE),
      arch=st.sampled_from(("amd64", "arm64", "riscv64")),
      found=({"data": _HIDDEN, "arch": "amd64"},))
def test_kubeedge_messages(data: dict[str, Any], arch: str) -> None:
    def parse(d: dict[str, Any]) -> Command | None:
        cmd = parse_kubeedge(d, CONFIG, "fuzz", arch=arch)
        assert cmd is not None or not ({"route", "content"} <= set(d) or "UpgradeID" in d)
        return cmd
    _envelope_or_refusal(data, parse)
    if isinstance(data.get("content"), str) and isinstance(data.get("route"), dict):
        _content_text_as_strict_as_a_message(data, parse)


def _content_text_as_strict_as_a_message(data: dict[str, Any],
                                         parse: Callable[[dict[str, Any]], Command | None]
                                         ) -> None:
    """Content sent as JSON text obeys the message's own JSON rules (no duplicate keys,
    NaN or over-long numbers) and means what the same content as an object means."""
    def outcome(d: dict[str, Any]) -> Command | str:
        try:
            cmd = parse(d)
        except InvalidCommand:
            return "refused"
        assert cmd is not None
        return dataclasses.replace(cmd, issued_at=0)

    try:
        inner = load_json_object(data["content"].encode("utf-8", "surrogatepass"), 2**31)
    except InvalidCommand:
        assert outcome(data) == "refused", data["content"]
        return
    assert outcome(data) == outcome({**data, "content": inner})


@fuzz(700, data=s.signed(s.commands() | s.hostile(s.commands()), KEY))
def test_signed_commands(data: Any) -> None:
    try:
        verified = verify(data, PARSER.keys)
    except InvalidCommand as exc:
        refused(exc)
        return
    assert frozen(verified) and not set(RESERVED) & set(verified.payload)
    assert verified.issued_at < verified.expires_at


@fuzz(1300, raw=rs.any_command_bytes(KEY))
def test_parser_any_bytes(raw: bytes) -> None:
    """The whole gate (size, JSON, signature, shape, values): Accepted or InvalidCommand."""
    try:
        accepted = PARSER.parse(raw, "fuzz")
    except InvalidCommand as exc:
        refused(exc)
        return
    assert frozen(accepted)
    assert (accepted.command_id is None) == (accepted.expires_at is None)
    accepted_command(accepted.command)


@fuzz(300, raw=st.one_of(rs.wire(s.commands() | s.hostile(s.commands())),
                         st.binary(max_size=64)))
def test_peek_job_name(raw: bytes) -> None:
    """The name a rejection is filed under: a valid job name or None."""
    name = peek_job_name(raw)
    assert name is None or check_name("job name", name) == name


# ------------------------------------------------------------------ configuration


def _config_or_refusal(make: Callable[[], Config]) -> None:
    try:
        config = make()
    except ConfigError as exc:
        refused(exc)
        return
    assert frozen(config) and frozen(config.paths) and frozen(config.images)
    assert NAME_RE.fullmatch(config.node_name)
    for path in (config.paths.state_dir, config.paths.edgecore_binary, config.paths.run_dir):
        assert path.startswith("/") and "\x00" not in path
    assert "\x00" not in str(config.paths.root)


@fuzz(600, data=rs.configs(), found=(
    {"data": {"precheck": {"cpu_max_percent": 10**400}}},  # OverflowError in float()
    {"data": {"paths": {"root": "/srv/\x00"}}},  # ValueError at the first path call
))
def test_config_documents(data: Any) -> None:
    _config_or_refusal(lambda: parse_config(data))


def test_config_document_nested_past_any_copy() -> None:
    """Once a RecursionError in copy.deepcopy; not an explicit example above, since
    Hypothesis prints those, and its printer recurses deeper still."""
    _config_or_refusal(lambda: parse_config({"labels": s.nested(2000, "x")}))


# Removed at exit; a fixture would tie the property to pytest, and bench/fuzz.py runs it too.
_CONFIG_DIR = tempfile.TemporaryDirectory(prefix="eua-fuzz-config-")


@fuzz(300, raw=rs.config_files(), found=(
    {"raw": b"precheck: {reserve_bytes: " + b"9" * 5000 + b"}\n"},  # ValueError from PyYAML
    {"raw": b"labels: " + b"[" * 1000 + b"]" * 1000 + b"\n"},  # RecursionError from PyYAML
    {"raw": rs.billion_laughs(9).encode()},  # a repr of 387 million strings for the reason
))
def test_config_files(raw: bytes) -> None:
    path = Path(_CONFIG_DIR.name) / "agent.yaml"
    path.write_bytes(raw)
    _config_or_refusal(lambda: load_config(path))
