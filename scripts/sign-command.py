#!/usr/bin/env python3
"""Sign an agent command, or generate an Ed25519 signing key pair.

    sign-command.py --key PRIVATE.pem --key-id ID [--ttl 3600] [--command-id X] [FILE|-]
    sign-command.py --generate-key DIR --key-id ID

Signing reads a command JSON object (our envelope or a KubeEdge message) from
FILE or stdin and writes the signed command to stdout. Key generation writes
DIR/ID.key (private, mode 0600, PKCS8 PEM) and DIR/ID.pub (SubjectPublicKeyInfo
PEM); only the .pub goes into the agent's trusted keys directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Run as `python scripts/sign-command.py` from a checkout, without installing
# the package: make the repository root importable before importing agent.*.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError, ConfigError, InvalidCommand
from agent.security.signing import KEY_ID_RE, load_private_key, sign


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite an existing key; the mode applies from creation,
    # so the private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def generate(directory: Path, key_id: str) -> None:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory / f"{key_id}.key", directory / f"{key_id}.pub"):
        if path.exists():
            raise ConfigError(f"{path} already exists")
    _write_new(directory / f"{key_id}.key", private, 0o600)
    _write_new(directory / f"{key_id}.pub", public, 0o644)
    print(f"wrote {directory / f'{key_id}.key'} and {directory / f'{key_id}.pub'}", file=sys.stderr)


def sign_file(args: argparse.Namespace) -> None:
    key = load_private_key(Path(args.key))
    text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        command: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidCommand(f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(command, dict):
        raise InvalidCommand("command must be a JSON object")
    signed = sign(command, key, args.key_id, ttl_seconds=args.ttl, command_id=args.command_id)
    sys.stdout.buffer.write(json.dumps(signed, ensure_ascii=False).encode("utf-8") + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--key-id", required=True, help="key id: [A-Za-z0-9._-]{1,64}")
    parser.add_argument("--key", help="Ed25519 private key (PKCS8 PEM, unencrypted)")
    parser.add_argument("--ttl", type=float, default=3600, help="validity in seconds")
    parser.add_argument("--command-id", help="16-64 chars [A-Za-z0-9_-]; random by default")
    parser.add_argument("--generate-key", metavar="DIR", help="write DIR/ID.key and DIR/ID.pub")
    parser.add_argument("file", nargs="?", default="-", help="command JSON file, - for stdin")
    args = parser.parse_args(argv)
    if not KEY_ID_RE.fullmatch(args.key_id):
        parser.error(f"bad --key-id {args.key_id!r}: expected [A-Za-z0-9._-]{{1,64}}")
    if args.generate_key is None and args.key is None:
        parser.error("either --key or --generate-key is required")
    try:
        if args.generate_key is not None:
            generate(Path(args.generate_key), args.key_id)
        else:
            sign_file(args)
    except AgentError as exc:
        print(f"sign-command: {exc.reason}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"sign-command: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
