"""Signed commands: the wire format, malformed envelopes, key files and the CLI.

The rejections that make the trust boundary (tampered, wrong or unknown key,
expired, unsigned, replayed) are in tests/test_security.py.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, InvalidCommand
from agent.security.signing import (
    RESERVED,
    Verified,
    canonical_json,
    is_signed,
    load_private_key,
    load_public_keys,
    sign,
    verify,
)

REPO = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
KEYS = {"ops-1": KEY.public_key()}
COMMAND: dict[str, Any] = {"operation": "upgrade", "jobName": "job-1", "version": "v1.13.0"}


def signed_command(**kwargs: Any) -> dict[str, Any]:
    return sign(COMMAND, KEY, "ops-1", now=NOW, **kwargs)


def resign(data: dict[str, Any], key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    """Re-sign ``data["signed"]`` as is: authentic, whatever its content."""
    data["signature"] = base64.b64encode(key.sign(canonical_json(data["signed"]))).decode()
    return data


def rejected(data: Any, reason: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidCommand) as info:
        verify(data, KEYS, **kwargs)
    assert info.value.reason == reason


def test_round_trip() -> None:
    data = json.loads(json.dumps(signed_command(command_id="c" * 16)))
    assert is_signed(data)
    assert set(data) == {"signed", "keyId", "alg", "signature"}
    assert data["alg"] == "Ed25519"
    assert len(base64.b64decode(data["signature"], validate=True)) == 64
    got = verify(data, KEYS, now=NOW + 10)
    assert got == Verified(COMMAND, "c" * 16, "ops-1", NOW, NOW + 3600)
    assert data["signed"]["issuedAt"] == NOW and isinstance(data["signed"]["issuedAt"], int)


def test_random_command_ids_are_distinct_and_valid() -> None:
    ids = {verify(signed_command(), KEYS, now=NOW).command_id for _ in range(20)}
    assert len(ids) == 20


def test_lifetime_cap() -> None:
    verify(signed_command(ttl_seconds=7 * 86400), KEYS, now=NOW)
    rejected(signed_command(ttl_seconds=7 * 86400 + 1), "command lifetime exceeds 604800s", now=NOW)
    rejected(signed_command(), "command lifetime exceeds 60s", now=NOW, max_ttl_seconds=60)


def test_inverted_window() -> None:
    data = signed_command()
    data["signed"]["expiresAt"] = NOW
    rejected(resign(data), "command expires before it is issued", now=NOW)


@pytest.mark.parametrize("command_id", [None, 42, "short", "x" * 65, "has space in it!!", "é" * 16])
def test_bad_command_id(command_id: Any) -> None:
    data = signed_command()
    data["signed"]["commandId"] = command_id
    rejected(resign(data), "bad commandId", now=NOW)


@pytest.mark.parametrize("value", [None, "1700000000", True, -1, 1e20, [NOW]])
def test_bad_timestamps_are_malformed(value: Any) -> None:
    data = signed_command()
    data["signed"]["issuedAt"] = value
    rejected(resign(data), "malformed signature", now=NOW)


def _mutations() -> list[tuple[str, Any]]:
    return [
        ("signature", "not base64!"),
        ("signature", "QUJD"),  # valid base64, 3 bytes
        ("signature", base64.b64encode(b"\0" * 63).decode()),
        ("signature", base64.b64encode(b"\0" * 65).decode()),
        ("signature", base64.b64encode(b"\0" * 64).decode().rstrip("=")),
        ("signature", 12),
        ("signed", "not an object"),
        ("signed", [1, 2]),
        ("keyId", None),
        ("keyId", ""),
        ("keyId", "a/b"),
        ("keyId", 7),
        ("alg", None),
        ("extra", "unsigned rider"),
    ]


@pytest.mark.parametrize(("field", "value"), _mutations())
def test_malformed(field: str, value: Any) -> None:
    data = signed_command()
    data[field] = value
    rejected(data, "malformed signature", now=NOW)


@pytest.mark.parametrize("field", ["keyId", "alg"])
def test_missing_fields_are_malformed(field: str) -> None:
    data = signed_command()
    del data[field]
    rejected(data, "malformed signature", now=NOW)


def test_unsupported_algorithm() -> None:
    data = signed_command()
    data["alg"] = "RS256"
    rejected(data, "unsupported signature algorithm 'RS256'", now=NOW)


def test_non_canonical_content_is_malformed() -> None:
    data = signed_command()
    data["signed"]["x"] = float("nan")  # json.loads accepts NaN, canonical JSON does not
    rejected(data, "malformed signature", now=NOW)


def test_canonical_json() -> None:
    a = {"b": 1, "a": [1.5, {"z": None, "é": "ü€😀"}], "c": True}
    b = {"c": True, "a": [1.5, {"é": "ü€😀", "z": None}], "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":[1.5,{"z":null,"é":"ü€😀"}],"b":1,"c":true}'.encode()
    assert canonical_json(json.loads(canonical_json(a))) == canonical_json(a)
    with pytest.raises(ValueError):
        canonical_json({"x": float("inf")})


def test_non_ascii_payload_round_trip() -> None:
    payload = {"jobName": "jöb", "note": "升级 😀"}
    wire = json.dumps(sign(payload, KEY, "ops-1", now=NOW), ensure_ascii=True)
    assert verify(json.loads(wire), KEYS, now=NOW).payload == payload


def test_sign_refuses_reserved_fields_and_bad_arguments() -> None:
    for bad in ({**COMMAND, "commandId": "x" * 16}, signed_command()):
        with pytest.raises(InvalidCommand):
            sign(bad, KEY, "ops-1")
    with pytest.raises(InvalidCommand):
        sign(COMMAND, KEY, "bad key id")
    with pytest.raises(InvalidCommand):
        sign(COMMAND, KEY, "ops-1", ttl_seconds=0)
    with pytest.raises(InvalidCommand, match="bad commandId"):
        sign(COMMAND, KEY, "ops-1", command_id="short")


def write_pub(path: Path, key: Any) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_load_public_keys(tmp_path: Path) -> None:
    write_pub(tmp_path / "ops-1.pub", KEY)
    write_pub(tmp_path / "ops.backup_2.pub", OTHER)
    (tmp_path / "README").write_text("not a key")
    keys = load_public_keys(tmp_path)
    assert sorted(keys) == ["ops-1", "ops.backup_2"]
    verify(sign(COMMAND, OTHER, "ops.backup_2", now=NOW), keys, now=NOW)

    write_pub(tmp_path / "ec.pub", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match=r"ec\.pub: not an Ed25519 key"):
        load_public_keys(tmp_path)


@pytest.mark.parametrize(("name", "content"), [("bad id!.pub", None), ("junk.pub", b"junk")])
def test_load_public_keys_rejects_bad_files(tmp_path: Path, name: str,
                                            content: bytes | None) -> None:
    if content is None:
        write_pub(tmp_path / name, KEY)
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_public_keys(tmp_path)


def test_load_public_keys_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted keys directory"):
        load_public_keys(tmp_path / "absent")


def test_load_private_key(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    pkcs8 = serialization.PrivateFormat.PKCS8
    path.write_bytes(
        KEY.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    )
    assert load_private_key(path).public_key() == KEY.public_key()
    path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM, pkcs8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        load_private_key(path)
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_private_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")


def run_script(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "scripts/sign-command.py", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_script_generates_keys_and_signs(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    done = run_script("--generate-key", str(keys_dir), "--key-id", "ops-1")
    assert done.returncode == 0, done.stderr
    assert (keys_dir / "ops-1.key").stat().st_mode & 0o777 == 0o600
    again = run_script("--generate-key", str(keys_dir), "--key-id", "ops-1")
    assert again.returncode != 0 and b"already exists" in again.stderr

    command = tmp_path / "command.json"
    command.write_text(json.dumps({**COMMAND, "note": "ü"}), encoding="utf-8")
    key_args = ("--key", str(keys_dir / "ops-1.key"), "--key-id", "ops-1")
    done = run_script(
        *key_args, "--ttl", "600", "--command-id", "cmd-0123456789abcdef", str(command)
    )
    assert done.returncode == 0, done.stderr
    got = verify(json.loads(done.stdout), load_public_keys(keys_dir))
    assert got.payload == {**COMMAND, "note": "ü"}
    assert got.command_id == "cmd-0123456789abcdef"
    assert got.expires_at - got.issued_at == 600

    done = run_script(*key_args, "-", stdin=json.dumps(COMMAND).encode())
    assert done.returncode == 0, done.stderr
    assert verify(json.loads(done.stdout), load_public_keys(keys_dir)).payload == COMMAND
    bad = run_script(*key_args, "-", stdin=b"[1]")
    assert bad.returncode != 0 and b"must be a JSON object" in bad.stderr


# ------------------------------------------------------------------ robustness

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually ``valid``, sometimes any JSON value: to get past the early checks."""
    return st.integers(0, 7).flatmap(lambda n: json_values if n == 0 else valid)


@st.composite
def windows(draw: st.DrawFn) -> tuple[Any, Any]:
    """issuedAt/expiresAt: mostly a plausible window around NOW, sometimes junk."""
    issued = draw(mostly(st.integers(NOW - 10**6, NOW + 10**6) | st.floats(0, 3e11) | st.just(NOW)))
    lifetime = draw(st.integers(-100, 8 * 86400) | st.floats(-1e3, 1e6) | st.just(3600))
    expires = issued + lifetime if isinstance(issued, (int, float)) else issued
    return issued, draw(mostly(st.just(expires)))


@st.composite
def signed_parts(draw: st.DrawFn) -> dict[str, Any]:
    issued, expires = draw(windows())
    extra = draw(st.dictionaries(st.sampled_from(["jobName", "version", "x"]), json_values))
    cid = draw(mostly(st.from_regex(r"[A-Za-z0-9_-]{14,66}", fullmatch=True)))
    fields = {"commandId": cid, "issuedAt": issued, "expiresAt": expires}
    # Each reserved field is sometimes missing.
    return {**extra, **{k: v for k, v in fields.items() if draw(mostly(st.just(True)))}}


envelopes = st.fixed_dictionaries(
    {
        "signed": mostly(signed_parts()),
        "keyId": mostly(st.sampled_from(["ops-1", "ops-2"])),
        "alg": mostly(st.just("Ed25519")),
        "signature": mostly(
            st.binary(min_size=63, max_size=65).map(lambda b: base64.b64encode(b).decode())
        ),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(envelopes, st.dictionaries(st.text(max_size=10), json_values)),
    authentic=st.booleans(),
    now=st.floats(NOW - 10**6, NOW + 10**6) | st.floats(0, 3e11) | st.just(NOW),
)
def test_verify_only_ever_raises_invalid_command(
    data: dict[str, Any], authentic: bool, now: float
) -> None:
    data = copy.deepcopy(data)
    if authentic and isinstance(data.get("signed"), dict):
        # A real signature, to reach the checks that follow it; NaN and
        # infinities are not canonical JSON and cannot be signed.
        with contextlib.suppress(ValueError):
            resign(data)
    try:
        got = verify(data, KEYS, now=now)
    except InvalidCommand as exc:
        assert exc.reason
    else:
        assert got.issued_at <= now + 300 and now < got.expires_at
        assert got.payload == {k: v for k, v in data["signed"].items() if k not in RESERVED}
