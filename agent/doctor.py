"""``edge-upgrade-agent doctor``: the common installation problems, diagnosed.

The seed lecture's list (../shared/seed/): leftover files, ``failed to get CA
certificate … refused / EOF / no route to host / i/o timeout`` on port 10002,
image pulls, ``Invalid authorization token`` and ``token credentials are in
the wrong format``, ``x509: certificate is valid for A, not B`` and
``doesn't contain any IP SANs``. Each check returns a :class:`Finding` with
the cause and the fix in plain words. Everything is read-only and bounded
by short timeouts; edgecore is never executed.

This module stays light (no ``cryptography``): :func:`doomed` runs inside
the upgrade precheck of the daemon, whose idle memory must not grow. The
network and certificate checks live in ``agent.doctor_cloud``, imported
only when the doctor runs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import ssl
import textwrap
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.adapters.edgecore import YAML_LOADER
from agent.config import Config
from agent.errors import InvalidCommand
from agent.node import Node
from agent.versions import Version

Severity = Literal["ok", "warn", "error"]
OK: Severity = "ok"
WARN: Severity = "warn"
ERROR: Severity = "error"
_RANK = {OK: 0, WARN: 1, ERROR: 2}
# Distinct from the job exit codes 1-6 (docs/operations.md, "Exit codes"):
# a doctor that finds problems has not failed, and scripts must tell the two apart.
EXIT_DOCTOR_WARN, EXIT_DOCTOR_ERROR = 10, 11
EXIT_CODES = {OK: 0, WARN: EXIT_DOCTOR_WARN, ERROR: EXIT_DOCTOR_ERROR}

# KubeEdge's defaults (pkg/apis/componentconfig/edgecore/v1alpha2/default.go,
# common/constants/default.go).
DEFAULT_CA = "/etc/kubeedge/ca/rootCA.crt"
DEFAULT_CERT = "/etc/kubeedge/certs/server.crt"
DEFAULT_KEY = "/etc/kubeedge/certs/server.key"
BOOTSTRAP_FILE = "/etc/kubeedge/bootstrap-edgecore.conf"  # keadm join's token; read first
KEADM_STAGING = "/etc/kubeedge/upgrade"
KEADM_REPORT = "/etc/kubeedge/upgrade_report.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
REJOIN = ("Remove the certificate pair (tlsCertFile and tlsPrivateKeyFile: by default "
          "/etc/kubeedge/certs/server.crt and server.key), put the token `keadm gettoken` "
          "prints on the cloud into modules.edgeHub.token and restart edgecore: it requests a "
          "new certificate (or `keadm reset` and `keadm join` again).")


@dataclass(frozen=True)
class Finding:
    name: str
    severity: Severity
    detail: str
    cause: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def worst(findings: Iterable[Finding]) -> Severity:
    return max((f.severity for f in findings), key=_RANK.__getitem__, default=OK)


# -- edgecore.yaml ---------------------------------------------------------------


@dataclass(frozen=True)
class EdgeHub:
    """What edgecore.yaml's ``modules.edgeHub`` says, with KubeEdge's defaults."""

    path: Path
    problem: str | None  # why edgecore.yaml cannot be used; None: it was read
    present: bool  # modules.edgeHub is in the file (keadm always writes it)
    enabled: bool
    http_server: str | None
    websocket: str | None  # host:port, when enabled
    quic: str | None
    token: str
    token_source: str
    ca_file: Path
    cert_file: Path
    key_file: Path


def _node_path(config: Config, value: str) -> Path:
    """A path from edgecore.yaml on the node; in a sandbox it may already be inside."""
    path = Path(value)
    root = config.paths.root
    if root != Path("/") and path.is_relative_to(root):
        return path
    return config.paths.node(value)


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def read_edgehub(config: Config) -> EdgeHub:
    path = config.paths.node(config.paths.edgecore_config)
    data: Any = {}
    problem = None
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER)  # noqa: S506
        if not isinstance(data, dict):
            problem = "is not a YAML mapping"
    except FileNotFoundError:
        problem = "is missing"
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror}"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except yaml.YAMLError as exc:
        problem = f"is not valid YAML: {' '.join(str(exc).split())}"
    hub = _get(data, "modules", "edgeHub") if problem is None else None
    present = isinstance(hub, dict)
    hub = hub if isinstance(hub, dict) else {}

    def text(*keys: str) -> str | None:
        value = _get(hub, *keys)
        return value if isinstance(value, str) and value else None

    def server(kind: str, default: bool) -> str | None:
        enable = _get(hub, kind, "enable")
        return text(kind, "server") if (default if enable is None else enable is True) else None

    token, source = text("token") or "", "modules.edgeHub.token"
    bootstrap = config.paths.node(BOOTSTRAP_FILE)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        # edgecore takes the file as it is, trailing newline and all (edgecore's server.go).
        token, source = bootstrap.read_text(encoding="utf-8"), BOOTSTRAP_FILE
    return EdgeHub(
        path, problem, present, _get(hub, "enable") is not False, text("httpServer"),
        server("websocket", True), server("quic", False), token, source,
        _node_path(config, text("tlsCaFile") or DEFAULT_CA),
        _node_path(config, text("tlsCertFile") or DEFAULT_CERT),
        _node_path(config, text("tlsPrivateKeyFile") or DEFAULT_KEY))


def config_finding(hub: EdgeHub) -> Finding:
    if hub.problem == "is missing":
        return Finding("edgecore-config", ERROR, f"{hub.path} is missing",
                       "edgecore cannot start without its configuration, and an upgrade's "
                       "backup needs it.",
                       "Restore it from a backup (`edge-upgrade-agent status` lists the "
                       "agent's; keadm's are in /etc/kubeedge/backup/<version>/), or join the "
                       "node again with `keadm join`.")
    if hub.problem is not None:
        return Finding("edgecore-config", ERROR, f"{hub.path} {hub.problem}",
                       "edgecore exits at start when it cannot parse its configuration; an "
                       "upgrade's rollback would restore the same file and fail the same way.",
                       "Correct the file (the message gives the line and column) or restore "
                       "it from a backup.")
    if not hub.present:
        return Finding("edgecore-config", WARN, f"{hub.path} has no modules.edgeHub section",
                       "edgecore then uses its built-in defaults: cloudcore at this node's own "
                       "address, which is never right.",
                       "Restore the edgeHub section that `keadm join` wrote (httpServer, "
                       "websocket.server, token, tls* files).")
    if not hub.enabled:
        return Finding("edgecore-config", WARN, "modules.edgeHub.enable is false",
                       "edgecore never connects to cloudcore, so the node stays NotReady.",
                       "Set modules.edgeHub.enable: true and restart edgecore.")
    return Finding("edgecore-config", OK,
                   f"{hub.path}: httpServer {hub.http_server or '(none)'}, websocket "
                   f"{hub.websocket or 'off'}, quic {hub.quic or 'off'}")


# -- the token and the certificate pair, without cryptography --------------------


@dataclass(frozen=True)
class TokenProblem:
    kubeedge_says: str  # the message edgecore or cloudcore gives for it
    why: str
    local: bool  # a format error: certain without asking cloudcore


def _b64json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError):
        return None


def token_problem(token: str, now: float | None = None) -> TokenProblem | None:
    """KubeEdge's token is ``<sha256 of the CA, hex>.<JWT header>.<payload>.<signature>``.

    edgecore splits it on ``.`` and wants 4 parts ("token credentials are in the
    wrong format", certmanager.go), compares the first with the CA it fetched, and
    sends the rest to cloudcore, which answers "Invalid authorization token" unless
    it is an HMAC-signed, unexpired JWT (cloudhub httpserver, pkg/security/token).
    """
    if not token:
        return TokenProblem("token credentials are in the wrong format", "there is no token",
                            True)
    parts = token.split(".")
    if len(parts) != 4:
        return TokenProblem("token credentials are in the wrong format",
                            f"it has {len(parts)} dot-separated parts, not 4", True)
    ca_hash, header, payload, signature = parts
    if not _HEX64.fullmatch(ca_hash):
        return TokenProblem("failed to validate CA certificate. tokenCAhash: …",
                            "its first part is not a sha256 in lowercase hex (64 characters)",
                            True)
    if any(not _B64URL.fullmatch(p) for p in parts[1:]):
        if re.search(r"[\r\n]", token):  # Go's HTTP client refuses it in the header
            return TokenProblem('net/http: invalid header field value for "Authorization"',
                                "it contains a line break", True)
        spaces = " (it contains white space)" if re.search(r"\s", token) else ""
        return TokenProblem("Invalid authorization token",
                            f"its JWT part is not base64url text{spaces}", True)
    head, claims = _b64json(header), _b64json(payload)
    if not isinstance(head, dict) or not isinstance(claims, dict) or not signature:
        return TokenProblem("Invalid authorization token",
                            "its JWT header or payload is not base64url-encoded JSON", True)
    if not str(head.get("alg", "")).startswith("HS"):
        return TokenProblem("Invalid authorization token",
                            f"its JWT is signed with {head.get('alg')!r}; cloudcore accepts "
                            "only HMAC (HS256)", True)
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp < (time.time() if now is None else now):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exp))
        return TokenProblem("Invalid authorization token", f"it expired at {stamp}", False)
    return None


def keypair_problem(cert: Path, key: Path) -> str | None:
    """Why edgecore's ``tls.LoadX509KeyPair(cert, key)`` would fail; None: it loads.

    OpenSSL at security level 0 accepts what Go accepts (a 1024-bit RSA key too);
    the strength is judged elsewhere.
    """
    for path in (cert, key):
        if not path.is_file():
            return f"{path} is missing"
    try:
        if b"ENCRYPTED" in key.read_bytes():
            return f"{key} is encrypted (edgecore cannot ask for a pass phrase)"
    except OSError as exc:
        return f"cannot read {key}: {exc.strerror}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    try:
        ctx.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason in ("KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            return f"{key} does not match {cert} (tls: private key does not match public key)"
        return f"{cert} and {key} are not a usable PEM certificate and key ({exc.reason})"
    except OSError as exc:
        return f"cannot read {cert} or {key}: {exc.strerror}"
    return None


def doomed(node: Node | Config) -> list[Finding]:
    """The error-level findings that make an upgrade certainly fail, from local files only.

    - edgecore.yaml missing or unparseable: edgecore cannot start; the backup fails,
      or the upgrade's health gate and then its rollback's fail (rollback_failed).
    - no usable certificate pair and a token that cannot get one (missing or
      malformed): every edgecore start exits in its certificate manager
      (``klog.Exitf``), the new one and the restored one alike.

    Network state never counts: an offline node may still upgrade. A file without
    ``modules.edgeHub`` (a test stand-in) is left alone.
    """
    config = node.config if isinstance(node, Node) else node
    hub = read_edgehub(config)
    if hub.problem is not None:
        return [config_finding(hub)]
    if not hub.present or not hub.enabled:
        return []
    pair = keypair_problem(hub.cert_file, hub.key_file)
    token = token_problem(hub.token)
    if pair is None or token is None or not token.local:
        return []
    return [Finding(
        "edgecore-start", ERROR,
        f"edgecore cannot start: {pair}, and the token ({hub.token_source}) cannot get a "
        f"certificate: {token.why} ({token.kubeedge_says})",
        "Without a certificate pair edgecore asks cloudcore for one with the token and "
        "exits when that fails; the upgraded edgecore would exit, and so would the one a "
        "rollback restores.", REJOIN)]


# -- the whole run, and its output -------------------------------------------------


async def diagnose(node: Node, *, timeout: float = 3.0,
                   to_version: str | None = None) -> list[Finding]:
    # cryptography is loaded only when the doctor runs, never in the daemon.
    from agent.doctor_cloud import cloud_findings  # noqa: PLC0415
    from agent.doctor_node import (  # noqa: PLC0415 (it imports Finding from here)
        image_finding,
        keadm_findings,
        resource_findings,
        service_finding,
        version_finding,
    )

    hub = read_edgehub(node.config)
    findings = [config_finding(hub)]
    if hub.problem is None and hub.present and hub.enabled:
        findings += await cloud_findings(hub, timeout)
    findings.append(await service_finding(node))
    version_found, version = await version_finding(node)
    findings.append(version_found)
    findings.append(await image_finding(node, to_version or version, max(timeout, 15.0)))
    findings += keadm_findings(node.config)
    findings += resource_findings(node.config)
    return findings


def to_json(findings: list[Finding]) -> dict[str, Any]:
    return {"findings": [f.to_dict() for f in findings], "worst": worst(findings)}


def to_text(findings: list[Finding]) -> str:
    width = max([len("CHECK"), *(len(f.name) for f in findings)])
    indent = " " * (width + 10)
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    for f in findings:
        lines.append(f"{f.name:<{width}}  {f.severity.upper():<6}  {f.detail}")
        if f.severity != OK:
            for label, text in (("cause", f.cause), ("fix", f.fix)):
                lines.append(textwrap.fill(f"{label}: {text}", 100, initial_indent=indent,
                                           subsequent_indent=indent + "     ",
                                           break_on_hyphens=False, break_long_words=False))
    lines.append(f"worst: {worst(findings)}")
    return "\n".join(lines)


async def run(node: Node, *, timeout: float = 3.0,
              to_version: str | None = None) -> tuple[dict[str, Any], str, int]:
    """What the CLI prints (JSON data, text) and its exit code."""
    if not 0.1 <= timeout <= 60:
        raise InvalidCommand(f"--timeout {timeout:g}: expected 0.1..60 seconds")
    if to_version is not None:
        to_version = str(Version.parse(to_version))
    findings = await diagnose(node, timeout=timeout, to_version=to_version)
    return to_json(findings), to_text(findings), EXIT_CODES[worst(findings)]
