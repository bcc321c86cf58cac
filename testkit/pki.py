"""A throw-away test PKI built with ``cryptography`` (no openssl CLI).

Layout written by :func:`make_pki` under ``directory``::

    ca.crt  ca.key            self-signed P-256 CA (pathlen 0)
    server.crt  server.key    localhost / 127.0.0.1, EKU serverAuth
    <cn>.crt  <cn>.key        one per client, CN=<cn>, EKU clientAuth

Everything is PEM; keys are unencrypted PKCS#8. Files are 0644 and the
directory 0755 on purpose: a root-started mosquitto may drop to the
``mosquitto`` user and must still read them. Test material only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_CLIENTS",
    "KeyKind",
    "Pki",
    "UnsupportedKey",
    "issue_client",
    "make_other_ca",
    "make_pki",
]

KeyKind = Literal["p256", "p192", "rsa2048", "rsa1024"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_CLIENTS: tuple[str, ...] = ("node-1", "node-2", "cloud-controller")
FILE_MODE = 0o644
DIR_MODE = 0o755


class UnsupportedKey(RuntimeError):
    """The installed cryptography/OpenSSL refuses to make this kind of key."""


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def client(self, cn: str) -> tuple[Path, Path]:
        """(cert, key) of a client issued earlier; FileNotFoundError if there is none."""
        cert, key = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        for path in (cert, key):
            if not path.is_file():
                raise FileNotFoundError(f"no client material for {cn!r}: {path}")
        return cert, key


def _new_key(kind: KeyKind) -> PrivateKey:
    try:
        if kind == "p256":
            return ec.generate_private_key(ec.SECP256R1())
        if kind == "p192":
            return ec.generate_private_key(ec.SECP192R1())
        if kind == "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa1024":
            # Weak on purpose: the agent must refuse it.
            return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    except (ValueError, TypeError) as exc:  # e.g. a FIPS/OpenSSL build without the curve
        raise UnsupportedKey(f"cannot generate a {kind} key: {exc}") from exc
    raise ValueError(f"unknown key kind {kind!r}")


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, FILE_MODE)


def _write_key(path: Path, key: PrivateKey) -> None:
    _write(path, key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM))


def _prepare_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, DIR_MODE)
    return directory


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
             | rsa.RSAPublicKey, issuer_key: PrivateKey, *, days: int,
             not_before_offset_s: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    not_before = now + dt.timedelta(seconds=not_before_offset_s)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )


def _load_ca(pki: Pki) -> tuple[x509.Certificate, PrivateKey]:
    cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unexpected CA key type {type(key).__name__}")
    return cert, key


def _make_ca(directory: Path, cn: str
             ) -> tuple[Path, Path, x509.Certificate, PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key.public_key(), key, days=365, not_before_offset_s=-300)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path, cert, key


def _make_server(directory: Path, ca_cert: x509.Certificate, ca_key: PrivateKey
                 ) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("localhost", ca_cert.subject, key.public_key(), ca_key, days=30,
                 not_before_offset_s=-300)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def issue_client(pki: Pki, cn: str, *, key: KeyKind = "p256", days: int = 30,
                 not_before_offset_s: int = -300, directory: Path | None = None,
                 name: str | None = None) -> tuple[Path, Path]:
    """Issue a client certificate CN=<cn> signed by ``pki``'s CA.

    Writes ``<name or cn>.crt`` / ``.key`` under ``directory`` (default
    ``pki.dir``) and returns (cert, key). ``days`` counts from the start of
    validity, so ``not_before_offset_s=-2 * 86400, days=1`` gives an expired
    certificate and a positive offset a not-yet-valid one. ``key="rsa1024"``
    and ``"p192"`` make deliberately weak keys; :class:`UnsupportedKey` is
    raised where the local OpenSSL refuses to generate one (tests should skip).
    """
    ca_cert, ca_key = _load_ca(pki)
    client_key = _new_key(key)
    cert = (
        _builder(cn, ca_cert.subject, client_key.public_key(), ca_key, days=days,
                 not_before_offset_s=not_before_offset_s)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = _prepare_dir(directory) if directory is not None else pki.dir
    stem = name or cn
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, client_key)
    return cert_path, key_path


def make_pki(directory: Path, clients: Sequence[str] = DEFAULT_CLIENTS, *,
             ca_name: str = "edge-upgrade test CA") -> Pki:
    """Create a CA, a server certificate and one certificate per client CN."""
    _prepare_dir(directory)
    ca_cert_path, ca_key_path, ca_cert, ca_key = _make_ca(directory, ca_name)
    server_cert, server_key = _make_server(directory, ca_cert, ca_key)
    pki = Pki(directory, ca_cert_path, ca_key_path, server_cert, server_key)
    for cn in clients:
        issue_client(pki, cn)
    return pki


def make_other_ca(directory: Path) -> Pki:
    """An unrelated CA (own server cert, client ``node-1``): its certs must be refused."""
    return make_pki(directory, ("node-1",), ca_name="unrelated test CA")
