"""Mutual-TLS material for the broker connection: strength checks and contexts.

Keys weaker than RSA 2048 or P-256 are refused when the configuration is
loaded, not at the first handshake, so an operator learns it from
``config validate`` instead of from a node that never connects. Building the
SSLContext reads files and parses keys, so the daemon does it in a thread.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from agent.errors import ConfigError

STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def fingerprint(self) -> str:
        """Changes whenever any of the files changes (certificate rotation)."""
        h = hashlib.sha256()
        for path in (self.ca_file, self.cert_file, self.key_file):
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(b"<missing>")
        return h.hexdigest()


def _key_strength(key: object, what: str) -> None:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{what}: RSA key of {key.key_size} bits is too weak "
                              f"(at least {MIN_RSA_BITS})")
    elif isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, STRONG_CURVES):
            raise ConfigError(f"{what}: EC curve {key.curve.name} is too weak "
                              "(P-256, P-384 or P-521)")
    elif not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey |
                        ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise ConfigError(f"{what}: unsupported key type {type(key).__name__}")


def check_tls_files(files: TlsFiles, where: str) -> None:
    """Readable PEM files, a key that matches the certificate, and strong keys."""
    try:
        ca = x509.load_pem_x509_certificates(files.ca_file.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        key = load_pem_private_key(files.key_file.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not a usable PEM certificate or key: {exc}") from None
    _key_strength(key, f"{where}.key_file")
    _key_strength(cert.public_key(), f"{where}.cert_file")
    for c in ca:
        _key_strength(c.public_key(), f"{where}.ca_file")
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"{where}: key_file does not match cert_file")


def client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    return ctx
