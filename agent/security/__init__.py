"""Authenticity of commands: Ed25519 signatures over canonical JSON."""
