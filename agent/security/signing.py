"""Signed commands: an Ed25519 signature over the canonical JSON of a command.

Wire format (docs/protocol.md)::

    {"signed": {<command>, "commandId": ..., "issuedAt": ..., "expiresAt": ...},
     "keyId": "<key id>", "alg": "Ed25519", "signature": "<base64 of 64 bytes>"}

The signature covers everything the agent acts on, including the id and the
validity window, so a captured command can neither be altered nor stretched.
Replay within the window is the journal's job: it records seen command ids
until their ``expiresAt``.

``cryptography`` (about 8 MiB of resident memory) is imported only when a key
is loaded or a signature checked: a daemon that requires no signatures and
has no trusted keys never loads it (docs/performance.md, "Idle memory").
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, InvalidCommand

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ALG = "Ed25519"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
COMMAND_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
RESERVED = ("commandId", "issuedAt", "expiresAt")
_FIELDS = frozenset({"signed", "keyId", "alg", "signature"})
# Timestamps must be representable as dates (reasons print them in ISO 8601).
_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True)
class Verified:
    payload: dict[str, Any]  # `signed` minus commandId/issuedAt/expiresAt: the command itself
    command_id: str
    key_id: str
    issued_at: float
    expires_at: float


def canonical_json(obj: Any) -> bytes:
    """The exact bytes that get signed.

    The verifier never sees the signer's bytes: it re-serialises the object it
    parsed. So a signer in any language must reproduce Python's output: keys
    sorted by code point, no whitespace, raw UTF-8, and numbers that round-trip
    identically (an int stays digits, a float prints as Python's repr: a signer
    writing ``1`` for the float ``1.0`` produces a different text). issuedAt
    and expiresAt are signed as the numbers given; whole seconds as ints are
    the portable choice. A mismatch only ever fails closed, as a bad signature.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def is_signed(data: Mapping[str, Any]) -> bool:
    return isinstance(data, Mapping) and "signed" in data and "signature" in data


def _number(value: float) -> float:
    return int(value) if float(value).is_integer() else value


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _timestamp(value: Any) -> float:
    # bool is an int subclass; the range test is also false for NaN.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value <= _MAX_TIMESTAMP:
        raise InvalidCommand("malformed signature")
    return float(value)


def sign(
    payload: Mapping[str, Any],
    key: Ed25519PrivateKey,
    key_id: str,
    *,
    ttl_seconds: float = 3600,
    now: float | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    """Wrap ``payload`` into a signed command valid for ``ttl_seconds`` from ``now``."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise InvalidCommand(f"bad key id {key_id[:80]!r}")
    if is_signed(payload):
        raise InvalidCommand("command is already signed")
    for name in RESERVED:  # they would silently overwrite part of the command
        if name in payload:
            raise InvalidCommand(f"command already has the reserved field {name!r}")
    if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
        raise InvalidCommand(f"bad ttl {ttl_seconds!r}: expected a positive number of seconds")
    import secrets  # noqa: PLC0415 (signing is the controller's; an idle agent only verifies)

    # 16 random bytes → 22 url-safe characters: unguessable and within COMMAND_ID_RE.
    cid = secrets.token_urlsafe(16) if command_id is None else command_id
    if not COMMAND_ID_RE.fullmatch(cid):
        raise InvalidCommand("bad commandId")
    # By default whole seconds: an int serialises the same in every JSON library.
    issued = _number(int(time.time()) if now is None else now)
    signed = {
        **payload,
        "commandId": cid,
        "issuedAt": issued,
        "expiresAt": _number(issued + ttl_seconds),
    }
    try:
        message = canonical_json(signed)
    except (TypeError, ValueError) as exc:
        raise InvalidCommand(f"command is not canonical JSON: {str(exc)[:200]}") from None
    signature = base64.b64encode(key.sign(message)).decode("ascii")
    return {"signed": signed, "keyId": key_id, "alg": ALG, "signature": signature}


def verify(
    data: Mapping[str, Any],
    keys: Mapping[str, Ed25519PublicKey],
    *,
    now: float | None = None,
    max_skew_seconds: float = 300,
    max_ttl_seconds: float = 7 * 86400,
) -> Verified:
    """Check a signed command; the returned payload is the only part to act on."""
    if not is_signed(data):
        raise InvalidCommand("unsigned command (signatures are required)")
    signed, key_id, alg, sig = (data.get(k) for k in ("signed", "keyId", "alg", "signature"))
    # Unknown top-level fields are refused: nothing unsigned may ride along.
    if set(data) != _FIELDS or not isinstance(signed, dict) or not isinstance(alg, str):
        raise InvalidCommand("malformed signature")
    if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id) or not isinstance(sig, str):
        raise InvalidCommand("malformed signature")
    if alg != ALG:  # fixed, never negotiated: no downgrade to a weaker algorithm
        raise InvalidCommand(f"unsupported signature algorithm {alg[:40]!r}")
    public = keys.get(key_id)
    if public is None:
        raise InvalidCommand(f"unknown signing key id {key_id!r}")
    try:
        raw = base64.b64decode(sig, validate=True)
        message = canonical_json(signed)
    except (ValueError, TypeError, RecursionError):
        # binascii.Error and non-ASCII text are ValueErrors; so are NaN and
        # over-long ints, which json.loads accepts but canonical JSON refuses.
        raise InvalidCommand("malformed signature") from None
    if len(raw) != 64:
        raise InvalidCommand("malformed signature")
    # Lazy: a key in `keys` means cryptography is loaded already; this is its exception.
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    try:
        public.verify(raw, message)
    except InvalidSignature:
        raise InvalidCommand(f"bad signature (key id {key_id!r})") from None

    # Past this point the content is authentic, only possibly stale or odd.
    command_id = signed.get("commandId")
    if not isinstance(command_id, str) or not COMMAND_ID_RE.fullmatch(command_id):
        raise InvalidCommand("bad commandId")
    issued, expires = _timestamp(signed.get("issuedAt")), _timestamp(signed.get("expiresAt"))
    if expires <= issued:
        raise InvalidCommand("command expires before it is issued")
    if expires - issued > max_ttl_seconds:
        # A long-lived command is a standing order anyone who captured it can
        # replay once the journal has forgotten its id.
        raise InvalidCommand(f"command lifetime exceeds {_number(max_ttl_seconds)}s")
    current = time.time() if now is None else now
    if issued > current + max_skew_seconds:
        raise InvalidCommand(f"command issued in the future ({_iso(issued)})")
    # No skew on expiry: a clock running ahead only shortens the window.
    if current >= expires:
        raise InvalidCommand(f"command expired at {_iso(expires)}")
    payload = {k: v for k, v in signed.items() if k not in RESERVED}
    return Verified(payload, command_id, key_id, issued, expires)


def load_public_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``<keyId>.pub`` (SubjectPublicKeyInfo PEM) in ``directory``; others are ignored."""
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(".pub"))
    except OSError as exc:
        raise ConfigError(
            f"{directory}: cannot read trusted keys directory: {exc.strerror}"
        ) from None
    keys: dict[str, Ed25519PublicKey] = {}
    if not paths:
        return keys  # an empty directory: nothing to parse, so cryptography stays unloaded
    # Lazy (module docstring): only a directory with keys in it needs cryptography.
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

    for path in paths:
        key_id = path.name[: -len(".pub")]
        if not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"{path}: bad key id {key_id!r}: expected [A-Za-z0-9._-]{{1,64}}")
        try:
            key = load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{path}: not a PEM SubjectPublicKeyInfo public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        keys[key_id] = key
    return keys


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted PKCS8 PEM Ed25519 private key."""
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 (lazy)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )
    from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except TypeError:  # cryptography's signal for an encrypted key without a password
        raise ConfigError(f"{path}: encrypted private keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM PKCS8 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key
