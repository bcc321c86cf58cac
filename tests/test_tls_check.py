"""The TLS check without ``cryptography`` (issue 10): ``agent.tls`` reads key
types and sizes from DER itself and lets OpenSSL (``ssl``) parse the files. Its
verdicts are compared here with what ``cryptography`` says about the same
certificates, and its DER reader is fuzzed."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.tls import TlsFiles, _key_strength, check_tls_files
from testkit.pki import Pki, make_pki

PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
              | ed448.Ed448PrivateKey | dsa.DSAPrivateKey)
ISSUER = ec.generate_private_key(ec.SECP256R1())

KEYS: dict[str, Callable[[], PrivateKey]] = {
    "rsa1024": lambda: rsa.generate_private_key(65537, 1024),  # weak on purpose
    "rsa2047": lambda: rsa.generate_private_key(65537, 2047),
    "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
    "rsa3072": lambda: rsa.generate_private_key(65537, 3072),
    "p192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "p224": lambda: ec.generate_private_key(ec.SECP224R1()),
    "k256": lambda: ec.generate_private_key(ec.SECP256K1()),
    "brainpool256": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "dsa2048": lambda: dsa.generate_private_key(2048),
}
_made: dict[str, PrivateKey] = {}


def _key(kind: str) -> PrivateKey:
    if kind not in _made:
        _made[kind] = KEYS[kind]()
    return _made[kind]


def _cert(key: PrivateKey, cn: str = "node-1") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ISSUER, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey, fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
             password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, fmt, enc)


def _reference_refuses(key: object) -> bool:
    """The check as it was written with cryptography (before issue 10)."""
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size < 2048
    if isinstance(key, ec.EllipticCurvePublicKey):
        return not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1)
    return not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_key_strength_agrees_with_cryptography(kind: str) -> None:
    cert = _cert(_key(kind))
    der = cert.public_bytes(serialization.Encoding.DER)
    try:
        _key_strength(der, "x.cert_file")
        refused = None
    except ConfigError as exc:
        refused = exc.reason
    public = cert.public_key()
    assert (refused is not None) == _reference_refuses(public), refused
    if isinstance(public, rsa.RSAPublicKey) and refused:
        assert f"RSA key of {public.key_size} bits is too weak" in refused
    if kind == "p192":
        assert refused == "x.cert_file: EC curve secp192r1 is too weak (P-256, P-384 or P-521)"
    if kind == "dsa2048":
        assert refused == "x.cert_file: unsupported key type DSA"


def _files(tmp_path: Path, cert: bytes, key: bytes, ca: bytes | None = None) -> TlsFiles:
    files = TlsFiles(tmp_path / "ca.crt", tmp_path / "node.crt", tmp_path / "node.key")
    files.ca_file.write_bytes(ca if ca is not None else _pem(_cert(_key("p256"), "ca")))
    files.cert_file.write_bytes(cert)
    files.key_file.write_bytes(key)
    return files


def _refusal(files: TlsFiles) -> str:
    with pytest.raises(ConfigError) as info:
        check_tls_files(files, "transport.mqtt")
    return info.value.reason


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048", "ed25519"])
def test_good_files_pass(tmp_path: Path, kind: str) -> None:
    key = _key(kind)
    check_tls_files(_files(tmp_path, _pem(_cert(key)), _key_pem(key)), "transport.mqtt")
    # The traditional (PKCS#1 / SEC 1) key format OpenSSL writes is accepted too.
    if kind in ("p256", "rsa2048"):
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
        check_tls_files(_files(tmp_path, _pem(_cert(key)), _key_pem(key, fmt)), "t")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("node-1",))


def test_the_testkit_pki_passes(pki: Pki) -> None:
    cert, key = pki.client("node-1")
    check_tls_files(TlsFiles(pki.ca_cert, cert, key), "transport.mqtt")


def test_weak_keys_are_refused(tmp_path: Path) -> None:
    weak = _key("rsa1024")
    assert _refusal(_files(tmp_path, _pem(_cert(weak)), _key_pem(weak))) == (
        "transport.mqtt.cert_file: RSA key of 1024 bits is too weak (at least 2048)")
    p192 = _key("p192")
    assert "EC curve secp192r1 is too weak" in _refusal(
        _files(tmp_path, _pem(_cert(p192)), _key_pem(p192)))
    good = _key("p256")
    weak_ca = _pem(_cert(_key("p256"), "ca")) + _pem(_cert(weak, "old-ca"))
    assert _refusal(_files(tmp_path, _pem(_cert(good)), _key_pem(good), weak_ca)) == (
        "transport.mqtt.ca_file: RSA key of 1024 bits is too weak (at least 2048)")


def test_key_must_match_the_certificate(tmp_path: Path) -> None:
    cert = _pem(_cert(_key("p256")))
    other_ec = ec.generate_private_key(ec.SECP256R1())
    expected = "transport.mqtt: key_file does not match cert_file"
    assert _refusal(_files(tmp_path, cert, _key_pem(other_ec))) == expected
    assert _refusal(_files(tmp_path, cert, _key_pem(_key("rsa2048")))) == expected


def test_encrypted_keys_are_refused_without_a_prompt(tmp_path: Path) -> None:
    key = _key("p256")
    cert = _pem(_cert(key))
    expected = "transport.mqtt.key_file: encrypted private keys are not supported"
    assert _refusal(_files(tmp_path, cert, _key_pem(key, password=b"secret"))) == expected
    legacy = _key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL, b"secret")
    assert b"Proc-Type: 4,ENCRYPTED" in legacy
    assert _refusal(_files(tmp_path, cert, legacy)) == expected


def test_unreadable_or_garbled_files(tmp_path: Path) -> None:
    key = _key("p256")
    cert, key_pem = _pem(_cert(key)), _key_pem(key)
    files = _files(tmp_path, cert, key_pem)
    files.key_file.unlink()
    assert _refusal(files).startswith(f"transport.mqtt: cannot read {files.key_file}:")
    assert _refusal(_files(tmp_path, b"not a certificate\n", key_pem)) == (
        "transport.mqtt.cert_file: no PEM certificate in the file")
    assert _refusal(_files(tmp_path, cert, key_pem, b"")) == (
        "transport.mqtt.ca_file: no PEM certificate in the file")
    assert "not a usable PEM certificate or key" in _refusal(
        _files(tmp_path, cert, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
    garbage = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(b"\x30\x82\xff\xff" + b"x" * 40)
    garbage += b"-----END CERTIFICATE-----\n"
    assert _refusal(_files(tmp_path, garbage, key_pem)).startswith(
        "transport.mqtt.cert_file: not a usable certificate")
    bad_base64 = b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n"
    assert "bad base64" in _refusal(_files(tmp_path, bad_base64, key_pem))


CERT_DER = _cert(_key("p256")).public_bytes(serialization.Encoding.DER)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, len(CERT_DER) - 1), st.integers(0, 255)).map(
        lambda p: CERT_DER[:p[0]] + bytes([p[1]]) + CERT_DER[p[0] + 1:]),
    st.integers(0, len(CERT_DER)).map(lambda n: CERT_DER[:n]),
))
def test_der_reader_never_crashes(der: bytes) -> None:
    """Any bytes: either a verdict or a ConfigError, never an IndexError or the like."""
    with contextlib.suppress(ConfigError):
        _key_strength(der, "x")

