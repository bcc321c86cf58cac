"""``edge-upgrade-agent doctor`` against real local servers reproducing each failure.

Every cloudcore problem of the seed lecture is made for real on 127.0.0.1: a
closed port, a server that accepts and closes (EOF), a full accept queue (i/o
timeout), a TLS server whose certificate lacks the IP SAN; the node's files are
certificates generated here (expired, weak) and tokens (malformed, well-formed).
"""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Sandbox
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import Config, load_config, parse_config
from agent.doctor import (
    EXIT_DOCTOR_ERROR,
    EXIT_DOCTOR_WARN,
    Finding,
    diagnose,
    doomed,
    read_edgehub,
    to_text,
    token_problem,
)
from agent.doctor_cloud import cloud_findings, dial_failure
from agent.doctor_node import keadm_findings
from agent.node import build_node
from testkit.pki import Pki, issue_client, make_pki

CONFIG = Path("etc/kubeedge/config/edgecore.yaml")
T = 1.0  # seconds per network check: everything here is local


# -- material ------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(ca_der: bytes, *, expires_in: float = 3600) -> str:
    """A KubeEdge token as cloudcore makes it: <sha256(CA DER)>.<HS256 JWT>."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"exp": int(time.time() + expires_in)}).encode())
    sig = b64url(hmac.new(b"ca-key", f"{head}.{body}".encode(), hashlib.sha256).digest())
    return ".".join([hashlib.sha256(ca_der).hexdigest(), head, body, sig])


def ca_der(pki: Pki) -> bytes:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def cloudcore_cert(pki: Pki, directory: Path, *, ips: tuple[str, ...] = (),
                   dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """cloudcore's server certificate, naming only ``ips`` and ``dns`` (its advertise-address)."""
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KubeEdge")]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30)))
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    crt, pem_key = directory / "cloudcore.crt", directory / "cloudcore.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return crt, pem_key


# -- servers ---------------------------------------------------------------------------


class _Quiet(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A probe that only connects (the websocket check) is no error here."""


class Cloudcore:
    """cloudcore's HTTPS server reduced to ``GET /ca.crt`` (the CA, DER), in a thread."""

    def __init__(self, cert: Path, key: Path, ca: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = ca if self.path == "/ca.crt" else b"404 page not found"
                self.send_response(200 if self.path == "/ca.crt" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server = _Quiet(("127.0.0.1", 0), Handler)
        # The handshake happens in the handler's thread, never in the accept loop.
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Closer:
    """Accepts every connection and closes it at once: Go reads EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a node ----------------------------------------------------------------------------


class Edge:
    """A sandbox root with an edgecore.yaml whose edgeHub points at local servers."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.root, self.pki = root, pki
        self.ca = root / "etc/kubeedge/ca/rootCA.crt"
        self.certs = root / "etc/kubeedge/certs"
        self.hub: dict[str, Any] = {}
        self.config_path = root / CONFIG

    def write(self, data: dict[str, Any] | None = None, **hub: Any) -> None:
        self.hub.update(hub)
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = yaml.safe_load(self.config_path.read_text())
        except FileNotFoundError:
            current = None
        base = data or current or {"apiVersion": "edgecore.config.kubeedge.io/v1alpha2",
                                   "kind": "EdgeCore", "modules": {}}
        base.setdefault("modules", {})["edgeHub"] = {
            "enable": True, "tlsCaFile": "/etc/kubeedge/ca/rootCA.crt",
            "tlsCertFile": "/etc/kubeedge/certs/server.crt",
            "tlsPrivateKeyFile": "/etc/kubeedge/certs/server.key", **self.hub}
        self.config_path.write_text(yaml.safe_dump(base))

    def point_at(self, port: int, *, host: str = "127.0.0.1", ws_port: int | None = None) -> None:
        self.write(httpServer=f"https://{host}:{port}",
                   websocket={"enable": True, "server": f"{host}:{ws_port or port}"})

    def register(self, **kw: Any) -> None:
        """What a successful registration leaves: rootCA.crt and the pair server.crt/key."""
        self.ca.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pki.ca_cert, self.ca)
        kw.setdefault("days", 365)  # cloudcore's edgeCertSigningDuration
        issue_client(self.pki, "node-1", directory=self.certs, name="server", **kw)

    def config(self) -> Config:
        return parse_config({"node_name": "node-1", "paths": {"root": str(self.root)},
                             "service": {"manager": "process"}})

    async def cloud(self) -> dict[str, Finding]:
        return {f.name: f for f in await cloud_findings(read_edgehub(self.config()), T)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ())


@pytest.fixture
def edge(tmp_path: Path, pki: Pki) -> Edge:
    box = Edge(tmp_path / "root", pki)
    box.write()
    return box


@pytest.fixture
def cloudcore(pki: Pki, tmp_path: Path) -> Iterator[Cloudcore]:
    """A cloudcore whose certificate names 127.0.0.1 and localhost: all is well."""
    server = Cloudcore(*cloudcore_cert(pki, tmp_path / "cc", ips=("127.0.0.1",),
                                       dns=("localhost",)), ca_der(pki))
    yield server
    server.close()


def assert_diagnosis(f: Finding, severity: str, *needles: str) -> None:
    text = " ".join([f.detail, f.cause, f.fix])
    assert f.severity == severity, f
    for needle in needles:
        assert needle in text, (needle, f)


# -- reaching cloudcore ----------------------------------------------------------------


async def test_closed_port_is_connection_refused(edge: Edge) -> None:
    port = closed_port()
    edge.point_at(port)
    found = await edge.cloud()
    assert_diagnosis(
        found["cloudcore-https"], "error",
        f'failed to get CA certificate, err: Get "https://127.0.0.1:{port}/ca.crt": dial tcp '
        f"127.0.0.1:{port}: connect: connection refused",
        "nothing listens on port", "cloudcore is not running", f"ss -ltnp | grep :{port}",
        "advertise-address")
    assert_diagnosis(found["cloudcore-websocket"], "error", "connect: connection refused")
    assert "cloudcore-certificate" not in found  # no handshake, nothing to judge


async def test_server_that_closes_the_connection_is_eof(edge: Edge) -> None:
    closer = Closer()
    try:
        edge.point_at(closer.port)
        found = await edge.cloud()
    finally:
        closer.close()
    assert_diagnosis(
        found["cloudcore-https"], "error",
        f'Get "https://127.0.0.1:{closer.port}/ca.crt": EOF',
        "accepted the TCP connection", "closed it without answering", "load balancer",
        "kubectl logs -n kubeedge")
    assert found["cloudcore-websocket"].severity == "ok"  # TCP itself works


async def test_full_accept_queue_is_an_io_timeout(edge: Edge) -> None:
    # A listener that never accepts, with its queue full: the kernel drops the SYN,
    # as a firewall that drops packets does.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        held = _fill_queue(port)
        try:
            edge.point_at(port)
            found = await edge.cloud()
        finally:
            for s in held:
                s.close()
    assert_diagnosis(found["cloudcore-https"], "error",
                     f"dial tcp 127.0.0.1:{port}: i/o timeout", "drops the packets",
                     "ClusterIP", "nc -vz 127.0.0.1")


def _fill_queue(port: int) -> list[socket.socket]:
    held = []
    for _ in range(8):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), 0.2))
        except TimeoutError:
            return held
    raise AssertionError("the accept queue never filled")


@pytest.mark.parametrize(("err", "words"), [
    (errno.EHOSTUNREACH, "connect: no route to host"),
    (errno.ENETUNREACH, "connect: network is unreachable"),
])
def test_no_route_to_host_is_classified(err: int, words: str) -> None:
    # Needs a route table to reproduce for real; the classification is what matters.
    f = dial_failure("cloudcore-https", OSError(err, os.strerror(err)), "10.19.28.176", 10002,
                     timeout=T, prefix='failed to get CA certificate, err: Get "…"')
    assert_diagnosis(f, "error", f"dial tcp 10.19.28.176:10002: {words}", "no path to",
                     "firewall-cmd", "ip route get 10.19.28.176")


async def test_cloudcore_certificate_without_ip_sans(edge: Edge, pki: Pki,
                                                     tmp_path: Path) -> None:
    server = Cloudcore(*cloudcore_cert(pki, tmp_path / "cc", dns=("cloudcore.example",)),
                       ca_der(pki))
    try:
        edge.point_at(server.port)
        found = await edge.cloud()
    finally:
        server.close()
    assert found["cloudcore-https"].severity == "ok"  # /ca.crt is fetched unverified
    assert_diagnosis(
        found["cloudcore-certificate"], "error",
        "x509: cannot validate certificate for 127.0.0.1 because it doesn't contain any IP "
        "SANs", "advertise-address", "cloudcoresecret", "cloudcore.example")


async def test_cloudcore_certificate_for_another_address(edge: Edge, pki: Pki,
                                                         tmp_path: Path) -> None:
    server = Cloudcore(*cloudcore_cert(pki, tmp_path / "cc", ips=("10.176.122.1",)),
                       ca_der(pki))
    try:
        edge.point_at(server.port, host="localhost")  # a name: checked against DNS SANs
        edge.write(httpServer=f"https://127.0.0.1:{server.port}")
        found = await edge.cloud()
    finally:
        server.close()
    f = found["cloudcore-certificate"]
    assert_diagnosis(f, "error",
                     "httpServer 127.0.0.1: x509: certificate is valid for 10.176.122.1, not "
                     "127.0.0.1",
                     "websocket.server localhost: x509: certificate is not valid for any names",
                     "Use an address the certificate names (10.176.122.1)")


async def test_healthy_node(edge: Edge, cloudcore: Cloudcore, pki: Pki) -> None:
    edge.point_at(cloudcore.port)
    edge.register()
    found = await edge.cloud()
    assert {n: f.severity for n, f in found.items()} == {
        "cloudcore-https": "ok", "cloudcore-websocket": "ok", "cloudcore-certificate": "ok",
        "edge-ca": "ok", "edge-certificate": "ok", "edge-key": "ok", "token": "ok"}
    assert "the one cloudcore serves" in found["edge-ca"].detail
    assert "P-256" in found["edge-key"].detail
    assert "not needed: the certificate pair is in place" in found["token"].detail


# -- the node's certificate files ------------------------------------------------------


async def test_expired_edge_certificate(edge: Edge, cloudcore: Cloudcore) -> None:
    edge.point_at(cloudcore.port)
    edge.register(not_before_offset_s=-3 * 86400, days=1)
    f = (await edge.cloud())["edge-certificate"]
    assert_diagnosis(f, "error", "expired on", "x509: certificate has expired or is not yet "
                     "valid", "rotateCertificates", "Remove the certificate pair",
                     "keadm gettoken")


async def test_edge_certificate_expiring_soon(edge: Edge, cloudcore: Cloudcore) -> None:
    edge.point_at(cloudcore.port)
    edge.register(days=10)
    f = (await edge.cloud())["edge-certificate"]
    assert_diagnosis(f, "warn", "in 9 days", "Rotation should have renewed it")


async def test_weak_rsa_key(edge: Edge, cloudcore: Cloudcore) -> None:
    edge.point_at(cloudcore.port)
    edge.register(key="rsa1024")
    found = await edge.cloud()
    assert found["edge-certificate"].severity == "ok"
    assert_diagnosis(found["edge-key"], "warn", "RSA key of 1024 bits is too weak (at least "
                     "2048)", "edgecore itself makes a P-256 key", "Remove the certificate pair")


async def test_key_of_another_pair(edge: Edge, cloudcore: Cloudcore, pki: Pki,
                                   tmp_path: Path) -> None:
    edge.point_at(cloudcore.port)
    edge.register()
    _, other_key = issue_client(pki, "other", directory=tmp_path / "other")
    shutil.copy(other_key, edge.certs / "server.key")
    found = await edge.cloud()
    assert_diagnosis(found["edge-key"], "error", "tls: private key does not match public key",
                     "another registration")


async def test_edge_ca_not_the_one_cloudcore_serves(edge: Edge, cloudcore: Cloudcore,
                                                    tmp_path: Path) -> None:
    edge.point_at(cloudcore.port)
    edge.register()
    other = make_pki(tmp_path / "old-ca", ())
    shutil.copy(other.ca_cert, edge.ca)
    found = await edge.cloud()
    assert_diagnosis(found["edge-ca"], "error", "is not the CA cloudcore serves",
                     "signed by unknown authority")
    assert_diagnosis(found["edge-certificate"], "error", "was not issued by the CA")


# -- the token -------------------------------------------------------------------------


async def test_malformed_token(edge: Edge, cloudcore: Cloudcore, pki: Pki) -> None:
    token = make_token(ca_der(pki))
    edge.point_at(cloudcore.port)
    edge.write(token=token.rsplit(".", 1)[0])  # cut off: the signature is missing
    found = await edge.cloud()
    f = found["token"]
    assert_diagnosis(f, "error", "it has 3 dot-separated parts, not 4",
                     "token credentials are in the wrong format", "not copied whole",
                     "keadm gettoken")
    assert token[:20] not in to_text([f])  # the token is a secret: never printed
    assert_diagnosis(found["edge-certificate"], "error", "the token cannot get one")


async def test_well_formed_token(edge: Edge, cloudcore: Cloudcore, pki: Pki) -> None:
    edge.point_at(cloudcore.port)
    edge.write(token=make_token(ca_der(pki)))
    found = await edge.cloud()
    assert_diagnosis(found["token"], "ok", "well-formed", "HMAC JWT")
    # Not registered yet, but the token can get a certificate at the next start.
    assert_diagnosis(found["edge-certificate"], "warn", "has not registered yet")
    assert found["edge-ca"].severity == "warn"


async def test_token_of_another_cluster(edge: Edge, cloudcore: Cloudcore,
                                        tmp_path: Path) -> None:
    edge.point_at(cloudcore.port)
    edge.write(token=make_token(ca_der(make_pki(tmp_path / "other", ()))))
    f = (await edge.cloud())["token"]
    assert_diagnosis(f, "error", "failed to validate CA certificate. tokenCAhash:",
                     "another cloudcore")


def test_token_classification() -> None:
    good = make_token(b"ca")
    assert token_problem(good) is None
    cases = {
        "": "token credentials are in the wrong format",
        good.replace(".", "", 1): "token credentials are in the wrong format",
        "ABC" + good[3:]: "failed to validate CA certificate",
        good[:-3] + " x": "Invalid authorization token",
        good + "\n": "net/http: invalid header field value",
        make_token(b"ca", expires_in=-60): "Invalid authorization token",
    }
    for token, says in cases.items():
        problem = token_problem(token)
        assert problem is not None and problem.kubeedge_says.startswith(says), (token, problem)
    expired = token_problem(make_token(b"ca", expires_in=-60))
    assert expired is not None and "expired at" in expired.why and not expired.local
    spaced = token_problem(good[:-3] + " x")
    assert spaced is not None and "white space" in spaced.why


# -- leftovers and the precheck's subset -------------------------------------------------


def test_leftover_keadm_files(edge: Edge) -> None:
    config = edge.config()
    kubeedge = edge.root / "etc/kubeedge"
    marker = kubeedge / "idempotency_record"
    marker.write_text("")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    (kubeedge / "upgrade/v1.13.0").mkdir(parents=True)
    (kubeedge / "upgrade_report.json").write_text(json.dumps(
        {"event": "Upgrade", "success": False, "fromVersion": "v1.12.1",
         "toVersion": "v1.13.0", "errorMessage": "failed to start edgecore"}))
    found = {f.name: f for f in keadm_findings(config)}
    assert_diagnosis(found["keadm-lock"], "warn", "idempotency_record stale (age 3600s)",
                     "crashed or was killed", "pgrep -a keadm", "rm ")
    assert_diagnosis(found["keadm-staging"], "warn", "holds v1.13.0", "failed or was interrupted")
    assert_diagnosis(found["keadm-report"], "warn",
                     "Upgrade v1.12.1 -> v1.13.0, success False, failed to start edgecore",
                     "never relayed")
    for path in (marker, kubeedge / "upgrade_report.json"):
        path.unlink()
    shutil.rmtree(kubeedge / "upgrade")
    assert {f.severity for f in keadm_findings(config)} == {"ok"}


def test_doomed_only_for_certain_local_failures(edge: Edge, pki: Pki, tmp_path: Path) -> None:
    config = edge.config()
    # No usable pair, and a token that cannot get one: every edgecore start exits.
    edge.write(token="not-a-token")
    (f,) = doomed(config)
    assert_diagnosis(f, "error", "edgecore cannot start", "server.crt is missing",
                     "token credentials are in the wrong format", "rollback restores")
    edge.write(token=make_token(ca_der(pki)))
    assert doomed(config) == []  # the token may get a certificate: not certain
    edge.write(token="")
    edge.register()
    assert doomed(config) == []  # registered: the token is not needed
    edge.register(key="rsa1024")
    assert doomed(config) == []  # weak, but edgecore loads it
    # A stand-in edgecore.yaml without modules.edgeHub is left alone.
    edge.config_path.write_text(yaml.safe_dump({"kind": "EdgeCore", "modules": {}}))
    assert doomed(config) == []
    edge.config_path.write_text("modules: {edgeHub: [\n")
    (f,) = doomed(config)
    assert_diagnosis(f, "error", "is not valid YAML", "rollback would restore the same file")
    edge.config_path.unlink()
    (f,) = doomed(config)
    assert_diagnosis(f, "error", "edgecore.yaml is missing")


# -- the whole doctor, through the CLI ---------------------------------------------------


async def test_diagnose_a_running_node(sandbox: Sandbox, cloudcore: Cloudcore, pki: Pki) -> None:
    edge = Edge(sandbox.root, pki)
    edge.point_at(cloudcore.port)
    edge.register()
    assert sandbox.running_version() == "v1.12.1"  # it has logged its Version: line
    node = build_node(load_config(sandbox.config))
    try:
        found = {f.name: f for f in await diagnose(node, timeout=T)}
    finally:
        node.close()
    assert_diagnosis(found["edgecore-service"], "ok", "edgecore.service active, main pid")
    assert_diagnosis(found["edgecore-version"], "ok", "v1.12.1 (log: v1.12.1", "binary: v1.12.1")
    # The current version's package is not in the local image dir (only v1.13.0 is).
    assert_diagnosis(found["image"], "warn", "kubeedge/installation-package:v1.12.1",
                     "not found", "a mirror without this release")


def test_cli_exit_codes_and_output(sandbox: Sandbox, cloudcore: Cloudcore, pki: Pki) -> None:
    sandbox.configure(precheck={"disk_max_percent": 100, "mem_max_percent": 100})
    edge = Edge(sandbox.root, pki)
    edge.point_at(cloudcore.port)
    edge.register()

    rc, out = sandbox.cli_json("doctor", "--to-version", "v1.13.0", "--timeout", str(T))
    assert (rc, out["worst"]) == (0, "ok"), out
    assert {f["severity"] for f in out["findings"]} == {"ok"}
    assert set(out["findings"][0]) == {"name", "severity", "detail", "cause", "fix"}

    marker = sandbox.root / "etc/kubeedge/idempotency_record"
    marker.write_text("")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    rc, out = sandbox.cli_json("doctor", "--to-version", "v1.13.0", "--timeout", str(T))
    assert (rc, out["worst"]) == (EXIT_DOCTOR_WARN, "warn")

    edge.point_at(closed_port())
    proc = sandbox.cli("doctor", "--to-version", "v1.13.0", "--timeout", str(T))
    assert proc.returncode == EXIT_DOCTOR_ERROR, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    (row,) = [i for i, line in enumerate(lines) if line.startswith("cloudcore-https ")]
    assert "ERROR" in lines[row] and "connection refused" in lines[row]
    assert lines[row + 1].strip().startswith("cause: ")
    assert any(line.strip().startswith("fix: ") for line in lines[row + 1:row + 8])
    assert lines[-1] == "worst: error"

    proc = sandbox.cli("doctor", "--to-version", "1.13")
    assert proc.returncode == 2 and "bad version string" in proc.stderr
