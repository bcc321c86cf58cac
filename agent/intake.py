"""Intake: raw bytes from a transport to a validated, authenticated Command.

Order matters: the size cap and JSON decoding first, then the signature
(when present, or required), then whichever of the accepted shapes the
payload has: KubeEdge's own messages, or our envelope.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Config
from agent.errors import InvalidCommand
from agent.messages.commands import Command, load_json_object, parse_envelope_dict
from agent.messages.kubeedge import parse_kubeedge
from agent.security.signing import is_signed, load_public_keys, verify


@dataclass(frozen=True)
class Accepted:
    command: Command
    command_id: str | None = None  # signed commands only: for replay detection
    expires_at: float | None = None


class Intake:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys: Mapping[str, Ed25519PublicKey] = {}
        keys_dir = Path(config.security.trusted_keys_dir)
        if config.security.require_signed_commands or keys_dir.is_dir():
            self.keys = load_public_keys(keys_dir)

    def parse(self, raw: bytes, source: str) -> Accepted:
        data = load_json_object(raw, self.config.transport.max_message_bytes)
        command_id = expires_at = None
        if is_signed(data):
            verified = verify(data, self.keys, now=time.time(),
                              max_skew_seconds=self.config.security.max_clock_skew_seconds)
            data, command_id, expires_at = (verified.payload, verified.command_id,
                                            verified.expires_at)
        elif self.config.security.require_signed_commands:
            raise InvalidCommand("unsigned command (signatures are required)")
        command = parse_kubeedge(data, self.config, source)
        if command is None:
            command = parse_envelope_dict(data, self.config, source)
        return Accepted(command, command_id, expires_at)
