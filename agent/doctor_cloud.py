"""The doctor's checks of edgecore's link to cloudcore: network, certificates, token.

What edgecore does when it registers (edge/pkg/edgehub/certificate/certmanager.go):
``GET <httpServer>/ca.crt`` over HTTPS without verification, check the CA's
sha256 against the token's first part, then ``GET <httpServer>/edge.crt``
verifying cloudcore's certificate against that CA and the address dialled. The
checks here walk the same steps and name each failure as KubeEdge prints it, so
an operator can match it with the seed lecture's list.

Imported only by ``agent.doctor.diagnose``: ``cryptography`` stays out of the
daemon's memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.doctor import (
    ERROR,
    OK,
    REJOIN,
    WARN,
    EdgeHub,
    Finding,
    keypair_problem,
    token_problem,
)

MAX_CA_BYTES = 64 * 1024
EXPIRY_WARN_DAYS = 30
STRONG_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
ADVERTISE = ("Check that {host} is one of cloudcore's advertise-address (`keadm init "
             "--advertise-address`); the node must use one of those addresses.")
CLOUD_LOGS = "`kubectl get pods -n kubeedge` and `kubectl logs -n kubeedge <cloudcore pod>`"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


# -- reaching cloudcore ------------------------------------------------------------


def dial_failure(name: str, exc: OSError, host: str, port: int, *, timeout: float,
                 prefix: str = "") -> Finding:
    """A failed TCP connect, worded as Go's net.Dial words it, with the seed's causes."""
    where = _hostport(host, port)
    lead = f"{prefix}: " if prefix else ""
    if isinstance(exc, socket.gaierror):
        return Finding(name, ERROR, f"{lead}dial tcp: lookup {host}: no such host",
                       f"The name {host} does not resolve on this node.",
                       "Fix DNS or /etc/hosts, or use an IP address. "
                       + ADVERTISE.format(host=host))
    if isinstance(exc, ConnectionRefusedError):
        return Finding(
            name, ERROR, f"{lead}dial tcp {where}: connect: connection refused",
            f"{host} answered, but nothing listens on port {port}: cloudcore is not running "
            "or not ready, it listens on another port, or this is not the cloudcore host "
            "(a node or load balancer with no cloudcore behind it).",
            f"On the cloud: {CLOUD_LOGS}; on the cloudcore host `ss -ltnp | grep :{port}`. "
            + ADVERTISE.format(host=host))
    if isinstance(exc, TimeoutError):
        return Finding(
            name, ERROR, f"{lead}dial tcp {where}: i/o timeout (no answer in {timeout:g}s)",
            "Nothing answered at all: a firewall or security group drops the packets, or "
            f"{host} cannot be reached from this node (e.g. a Kubernetes ClusterIP such as "
            "10.96.x.x, or a private address behind NAT).",
            "Use an address the edge can reach (the cloudcore host, a load balancer or a "
            "NodePort) that is in cloudcore's advertise-address; open 10000-10002/tcp in "
            f"firewalls and security groups; try `nc -vz {host} {port}` from the node.")
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        what = "no route to host" if exc.errno == errno.EHOSTUNREACH else "network is unreachable"
        return Finding(
            name, ERROR, f"{lead}dial tcp {where}: connect: {what}",
            f"The network has no path to {host}: a wrong address, a missing route, or a "
            "firewall on the cloud host rejecting the connection (firewalld answers "
            "icmp-host-prohibited, which reads as no route to host).",
            f"`ip route get {host}` and `ping {host}` from the node; on the cloud host open "
            "10000-10002/tcp (`firewall-cmd --permanent --add-port=10000-10002/tcp`, then "
            f"`firewall-cmd --reload`). {ADVERTISE.format(host=host)}")
    return Finding(name, ERROR, f"{lead}dial tcp {where}: {exc.strerror or exc}",
                   "The connection failed.", ADVERTISE.format(host=host))


def _eof(name: str, detail: str, host: str, port: int) -> Finding:
    return Finding(
        name, ERROR, detail,
        f"Something accepted the TCP connection on {_hostport(host, port)} and closed it "
        "without answering: a load balancer, NAT or port-forward with no healthy cloudcore "
        "behind it, a proxy or firewall that cuts TLS, or cloudcore still starting.",
        f"Check what listens there (load balancer backends, DNAT rules) and {CLOUD_LOGS}. "
        + ADVERTISE.format(host=host))


def _not_cloudcore(name: str, detail: str, host: str, port: int) -> Finding:
    return Finding(name, ERROR, detail,
                   f"What answers on {_hostport(host, port)} is not cloudcore's HTTPS server, "
                   "which hands /ca.crt to anyone.",
                   "Point modules.edgeHub.httpServer at cloudcore's HTTPS port "
                   "(cloudHub.https.port, 10002 by default).")


@dataclass(frozen=True)
class CaFetch:
    finding: Finding
    host: str | None = None
    peer_der: bytes | None = None  # cloudcore's own TLS certificate
    ca_der: bytes | None = None  # the body of /ca.crt: cloudcore's CA, DER


def fetch_ca(http_server: str, timeout: float) -> CaFetch:
    """edgecore's first registration step: ``GET <httpServer>/ca.crt``, unverified."""
    name = "cloudcore-https"
    url = f"{http_server}/ca.crt"
    lead = f'failed to get CA certificate, err: Get "{url}"'
    parts = urlsplit(http_server)
    try:
        host, port = parts.hostname, parts.port or 443
    except ValueError:  # a port that is not a number
        host, port = None, 0
    if host is None or parts.scheme != "https":
        return CaFetch(Finding(name, ERROR, f"modules.edgeHub.httpServer {http_server!r} is not "
                               "https://<host>:<port>", "A hand-edited edgecore.yaml.",
                               "Set it to https://<cloudcore address>:10002."))
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as exc:
        return CaFetch(dial_failure(name, exc, host, port, timeout=timeout, prefix=lead), host)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # as edgecore: the CA is checked by the token's hash
    try:
        with ctx.wrap_socket(sock, server_hostname=None if _is_ip(host) else host) as tls:
            peer = tls.getpeercert(binary_form=True)
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
            conn.sock = tls
            conn.request("GET", f"{parts.path}/ca.crt")
            resp = conn.getresponse()
            body = resp.read(MAX_CA_BYTES)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError,
            http.client.RemoteDisconnected):
        return CaFetch(_eof(name, f"{lead}: EOF", host, port), host)
    except TimeoutError:
        return CaFetch(_eof(name, f"{lead}: net/http: TLS handshake or response timeout "
                            f"({timeout:g}s)", host, port), host)
    except ssl.SSLError as exc:
        return CaFetch(_not_cloudcore(name, f"{lead}: tls: {exc.reason or exc}", host, port),
                       host)
    except (OSError, http.client.HTTPException) as exc:
        return CaFetch(_eof(name, f"{lead}: {exc}", host, port), host)
    finally:
        sock.close()
    if resp.status != 200:
        return CaFetch(_not_cloudcore(name, f"{url}: HTTP {resp.status} {resp.reason}", host,
                                      port), host, peer)
    try:
        ca = x509.load_der_x509_certificate(body)
    except ValueError:
        return CaFetch(_not_cloudcore(name, f"{url}: the answer is not a DER certificate",
                                      host, port), host, peer)
    digest = hashlib.sha256(body).hexdigest()
    return CaFetch(Finding(name, OK, f'{url}: CA "{ca.subject.rfc4514_string()}", sha256 '
                           f"{digest[:16]}…"), host, peer, body)


def tcp_finding(name: str, server: str, timeout: float) -> Finding:
    """The websocket server (``host:port``) must accept TCP connections."""
    parts = urlsplit(f"//{server}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if host is None or port is None:
        return Finding(name, ERROR, f"{server!r} is not <host>:<port>", "A hand-edited "
                       "edgecore.yaml.", "Set it to <cloudcore address>:10000.")
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as exc:
        return dial_failure(name, exc, host, port, timeout=timeout)
    return Finding(name, OK, f"{_hostport(host, port)} accepts connections")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def san_finding(peer_der: bytes, hosts: dict[str, str]) -> Finding:
    """cloudcore's certificate must name every address edgecore dials (Go's HostnameError)."""
    name = "cloudcore-certificate"
    cert = x509.load_der_x509_certificate(peer_der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        ips, names = [], []
    problems = []
    for where, host in hosts.items():
        if _is_ip(host):
            ok = ipaddress.ip_address(host) in {ipaddress.ip_address(i) for i in ips}
            msg = (f"x509: cannot validate certificate for {host} because it doesn't contain "
                   "any IP SANs" if not ips else f"x509: certificate is valid for "
                   f"{', '.join(ips)}, not {host}")
        else:
            ok = any(_dns_match(n, host) for n in names)
            msg = (f"x509: certificate is valid for {', '.join(names)}, not {host}" if names
                   else f"x509: certificate is not valid for any names, but wanted to match "
                   f"{host}")
        if not ok:
            problems.append(f"{where} {host}: {msg}")
    valid = ", ".join([*ips, *names]) or "no address"
    if problems:
        return Finding(
            name, ERROR, "; ".join(problems),
            "cloudcore's certificate names only the addresses in its advertise-address (and "
            "dnsNames). edgecore checks the address it dials against them when it fetches "
            "edge.crt and on every websocket connection, so it fails with `failed to get edge "
            "certificate from the cloudcore`.",
            f"Use an address the certificate names ({valid}) in modules.edgeHub.httpServer and "
            "websocket.server; or add the address to cloudcore's cloudHub.advertiseAddress "
            "(a name: cloudHub.dnsNames), delete the secret kubeedge/cloudcoresecret and "
            "restart cloudcore so it issues a new certificate.")
    until = cert.not_valid_after_utc
    start = cert.not_valid_before_utc
    if not start <= _now() <= until:
        return Finding(
            name, ERROR, f"cloudcore's certificate is valid {_day(start)} to {_day(until)}: "
            "x509: certificate has expired or is not yet valid",
            "cloudcore's server certificate has expired, or a clock is wrong.",
            "Check both clocks (NTP); delete the secret kubeedge/cloudcoresecret and restart "
            "cloudcore to renew the certificate.")
    return Finding(name, OK, f"covers {', '.join(sorted(set(hosts.values())))} (valid for "
                   f"{valid}), until {_day(until)}")


# -- the node's certificate files, and the token ---------------------------------------


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def ca_finding(hub: EdgeHub, cloud_ca: bytes | None,
               pair_ok: bool) -> tuple[Finding, list[x509.Certificate]]:
    name, path = "edge-ca", hub.ca_file
    if not path.is_file():
        if not pair_ok:
            return Finding(name, WARN, f"{path} is missing", "A node that has not registered "
                           "yet: edgecore saves cloudcore's CA there when it registers with the "
                           "token.", "See the token finding."), []
        return Finding(name, ERROR, f"{path} is missing", "edgecore reads the CA on every "
                       "connection to cloudcore and cannot connect without it.", REJOIN), []
    try:
        cas = _load_pem_certs(path)
    except (OSError, ValueError) as exc:
        return Finding(name, ERROR, f"{path}: cannot parse the certificates ({exc})",
                       "A damaged or non-PEM file.", REJOIN), []
    if cloud_ca is not None and all(
            c.public_bytes(serialization.Encoding.DER) != cloud_ca for c in cas):
        return Finding(
            name, ERROR, f"{path} is not the CA cloudcore serves at /ca.crt",
            "cloudcore's CA was regenerated (cloudcore reinstalled, secret kubeedge/casecret "
            "deleted), or httpServer points at another cluster's cloudcore. This node's files "
            "are from the old CA, so connections fail with `x509: certificate signed by unknown "
            "authority`.", REJOIN), cas
    same = ", the one cloudcore serves" if cloud_ca is not None else ""
    return Finding(name, OK, f'{path}: "{cas[0].subject.rfc4514_string()}"{same}'), cas


def cert_finding(hub: EdgeHub, cas: list[x509.Certificate], token_ok: bool) -> Finding:
    name, path = "edge-certificate", hub.cert_file
    if not path.is_file():
        if token_ok:
            return Finding(name, WARN, f"{path} is missing", "A node that has not registered "
                           "yet: edgecore requests its certificate with the token at start.",
                           "Start edgecore and watch its log.")
        return Finding(name, ERROR, f"{path} is missing, and the token cannot get one",
                       "edgecore exits at start: it has no certificate and no usable token to "
                       "request one.", REJOIN)
    try:
        cert = _load_pem_certs(path)[0]
    except (OSError, ValueError) as exc:
        return Finding(name, ERROR, f"{path}: cannot parse the certificate ({exc})",
                       "A damaged or non-PEM file.", REJOIN)
    start, until = cert.not_valid_before_utc, cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string()
    left = until - _now()
    if left.total_seconds() < 0:
        return Finding(
            name, ERROR, f'{path} ("{subject}") expired on {_day(until)} (x509: certificate '
            "has expired or is not yet valid)",
            "edgecore renews its certificate over port 10002 at 70-90% of its lifetime when "
            "modules.edgeHub.rotateCertificates is on; rotation was off or cloudcore was out "
            "of reach until it expired (cloudcore signs for edgeCertSigningDuration, 365 days "
            "by default). cloudcore refuses it on every connection.", REJOIN)
    if start > _now():
        return Finding(name, ERROR, f"{path} is valid only from {_day(start)}",
                       "This node's clock is behind cloudcore's.",
                       "Synchronise the clock (NTP: `timedatectl set-ntp true`).")
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (InvalidSignature, ValueError, TypeError):
            continue
    else:
        if cas:
            return Finding(name, ERROR, f"{path} was not issued by the CA in {hub.ca_file}",
                           "The certificate and the CA come from different registrations or "
                           "clusters (cloudcore's CA changed).", REJOIN)
    if left.days < EXPIRY_WARN_DAYS:
        return Finding(name, WARN, f'{path} ("{subject}") expires on {_day(until)}, in '
                       f"{left.days} days", "Rotation should have renewed it by now: "
                       "modules.edgeHub.rotateCertificates is off, or edgecore cannot reach "
                       "cloudcore's port 10002.",
                       "Check rotateCertificates: true and the cloudcore-https finding; "
                       f"otherwise: {REJOIN}")
    return Finding(name, OK, f'{path}: "{subject}", expires {_day(until)} ({left.days} days)')


def key_finding(hub: EdgeHub, pair: str | None, token_ok: bool) -> Finding:
    name, path = "edge-key", hub.key_file
    if not path.is_file():
        if token_ok:
            return Finding(name, WARN, f"{path} is missing", "A node that has not registered "
                           "yet: edgecore makes its key when it registers with the token.",
                           "Start edgecore and watch its log.")
        return Finding(name, ERROR, f"{path} is missing", "edgecore cannot load its "
                       "certificate pair, and has no usable token to request a new one.",
                       REJOIN)
    if pair is not None and str(path) in pair:
        return Finding(name, ERROR, pair, "The key is missing, unreadable, encrypted or from "
                       "another registration than the certificate; edgecore cannot load the "
                       "pair (tls.LoadX509KeyPair).", REJOIN)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return Finding(name, WARN if pair is None else ERROR, f"{path}: {exc}",
                       "The key cannot be read.", REJOIN)
    weak = ("A hand-made key: edgecore itself makes a P-256 key when it registers. Short "
            "keys can be broken and current TLS policies refuse them.")
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        if bits < 1024:
            return Finding(name, ERROR, f"{path}: RSA key of {bits} bits (at least 2048)",
                           weak + " Go's TLS refuses RSA keys under 1024 bits.", REJOIN)
        if bits < 2048:
            return Finding(name, WARN, f"{path}: RSA key of {bits} bits is too weak (at least "
                           "2048)", weak, REJOIN)
        return Finding(name, OK, f"{path}: RSA {bits} bits")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = key.curve.name
        if curve not in STRONG_CURVES:
            return Finding(name, WARN, f"{path}: EC curve {curve} is weak or unusual (P-256, "
                           "P-384 or P-521)", weak, REJOIN)
        return Finding(name, OK, f"{path}: EC {STRONG_CURVES[curve]}")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return Finding(name, OK, f"{path}: Ed25519")
    return Finding(name, WARN, f"{path}: unusual key type {type(key).__name__}", weak, REJOIN)


def token_finding(hub: EdgeHub, pair_ok: bool, cloud_ca: bytes | None) -> Finding:
    """Classify the token as edgecore and cloudcore would; the token itself is never shown."""
    name, source = "token", hub.token_source
    problem = token_problem(hub.token)
    if problem is None and cloud_ca is not None:
        ca_hash = hashlib.sha256(cloud_ca).hexdigest()
        token_hash = hub.token.split(".", 1)[0]
        if token_hash != ca_hash:
            return Finding(
                name, WARN if pair_ok else ERROR,
                f"{source}: failed to validate CA certificate. tokenCAhash: {token_hash}, "
                f"CAhash: {ca_hash}",
                "The token comes from another cloudcore (another cluster), cloudcore's CA was "
                "regenerated since the token was made, or httpServer points at the wrong "
                "cloudcore.", "Take a fresh token from this cluster (`keadm gettoken`) and put "
                "it in modules.edgeHub.token.")
    if problem is None:
        unused = "; unused while the certificate pair is in place" if pair_ok else ""
        return Finding(name, OK, f"{source}: well-formed (CA hash {hub.token[:12]}…, HMAC JWT)"
                       f"{unused}")
    if not hub.token and pair_ok:
        return Finding(name, OK, "no token; not needed: the certificate pair is in place "
                       "(edgecore removes the token once it has its certificate)")
    if "expired" in problem.why:
        cause = ("Tokens expire: cloudcore makes a new one every tokenRefreshDuration (12 h by "
                 "default), valid for twice that, and this one is older.")
        fix = "Run `keadm gettoken` on the cloud again and use the new token right away."
    elif not hub.token:
        cause = ("edgecore has no certificate pair and no token to request one, so it exits at "
                 "start.")
        fix = ("Put the token `keadm gettoken` prints on the cloud into modules.edgeHub.token "
               "and restart edgecore.")
    else:
        cause = ("The token is not <CA hash>.<JWT header>.<JWT payload>.<JWT signature>: it was "
                 "not copied whole (cut at a line break or by the terminal), or it is not a "
                 "KubeEdge token.")
        fix = ("Copy the whole single line `keadm gettoken` prints on the cloud into "
               "modules.edgeHub.token (or `keadm join --token …`), then restart edgecore.")
    if pair_ok:
        cause += " It is unused while the certificate pair is in place, but a re-registration "
        cause += "would fail."
    return Finding(name, WARN if pair_ok else ERROR,
                   f"{source}: {problem.why} (KubeEdge: {problem.kubeedge_says})", cause, fix)


async def cloud_findings(hub: EdgeHub, timeout: float) -> list[Finding]:
    """Reachability (in threads, concurrently), then what the node's files say."""
    fetch = (asyncio.ensure_future(asyncio.to_thread(fetch_ca, hub.http_server, timeout))
             if hub.http_server else None)
    ws = (asyncio.ensure_future(asyncio.to_thread(tcp_finding, "cloudcore-websocket",
                                                  hub.websocket, timeout))
          if hub.websocket else None)
    got = await fetch if fetch is not None else None
    ws_found = await ws if ws is not None else None
    findings: list[Finding] = []
    if got is None:
        findings.append(Finding("cloudcore-https", ERROR, "modules.edgeHub.httpServer is not set",
                                "edgecore fetches its CA and certificate from it.",
                                "Set it to https://<cloudcore address>:10002."))
    else:
        findings.append(got.finding)
    if ws_found is not None:
        findings.append(ws_found)
    if got is not None and got.peer_der is not None and got.host is not None:
        hosts = {"httpServer": got.host}
        for where, server in (("websocket.server", hub.websocket), ("quic.server", hub.quic)):
            host = urlsplit(f"//{server}").hostname if server else None
            if host:
                hosts[where] = host
        findings.append(san_finding(got.peer_der, hosts))
    cloud_ca = got.ca_der if got is not None else None
    pair = keypair_problem(hub.cert_file, hub.key_file)
    token = token_finding(hub, pair is None, cloud_ca)
    ca, cas = ca_finding(hub, cloud_ca, pair is None)
    token_ok = token.severity == OK
    findings += [ca, cert_finding(hub, cas, token_ok), key_finding(hub, pair, token_ok), token]
    return findings
