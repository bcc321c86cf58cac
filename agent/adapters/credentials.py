"""Registry credentials, for every image backend that pulls: config first, then docker's file.

A password lives in a file (systemd's ``LoadCredential=`` provides one) read
at every lookup, so a rotated password needs no restart; it is returned to
the caller for one request's headers and never logged, reported or put on
a command line.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import FatalError

if TYPE_CHECKING:
    from agent.config import Images

HUB_KEYS = ("docker.io", "https://index.docker.io/v1/", "index.docker.io")


def registry_auth(images: Images, registry: str,
                  docker_config: str | None) -> dict[str, str] | None:
    """``{"username", "password"}`` for ``registry``, or None (anonymous)."""
    for cred in images.credentials:
        if cred.registry == registry:
            try:
                password = Path(cred.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise FatalError(f"cannot read the password file for {registry}: "
                                 f"{exc.strerror}") from None
            if password:  # an empty file (systemd's SetCredential default): no entry
                return {"username": cred.username, "password": password}
    return _from_docker_config(docker_config, registry) if docker_config else None


def _from_docker_config(path: str, registry: str) -> dict[str, str] | None:
    """``auths.<registry>.auth`` of docker's config.json (as `docker login` writes it)."""
    try:
        auths = json.loads(Path(path).read_text(encoding="utf-8")).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    keys = HUB_KEYS if registry == "docker.io" else (registry, f"https://{registry}")
    for key in keys:
        entry = auths.get(key) if isinstance(auths, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return {"username": user, "password": password}
    return None
