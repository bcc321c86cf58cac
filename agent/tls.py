"""Mutual-TLS material for the broker connection: strength checks and contexts.

Keys weaker than RSA 2048 or P-256 are refused when the configuration is
loaded, not at the first handshake, so an operator learns it from
``config validate`` instead of from a node that never connects. Building the
SSLContext reads files and parses keys, so the daemon does it in a thread.

Only Python's ``ssl`` (OpenSSL, which the connection loads anyway) is used:
``cryptography`` would add about 8 MiB of resident memory to an idle daemon
(docs/performance.md, "Idle memory"). OpenSSL parses the files and checks
that the key matches the certificate; the key types and sizes, which ``ssl``
does not expose, are read from each certificate's SubjectPublicKeyInfo by the
small DER reader below. A key that matches its certificate has the
certificate's type and size, so the certificate's public key stands for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

MIN_RSA_BITS = 2048

# Object identifiers, as the DER contents of an OBJECT IDENTIFIER (RFC 5480, 8410, 8017).
_RSA = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption
_RSA_PSS = bytes.fromhex("2a864886f70d01010a")  # 1.2.840.113549.1.1.10 id-RSASSA-PSS
_EC = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1 id-ecPublicKey
_ED25519 = bytes.fromhex("2b6570")  # 1.3.101.112
_ED448 = bytes.fromhex("2b6571")  # 1.3.101.113
STRONG_CURVES = {
    bytes.fromhex("2a8648ce3d030107"): "secp256r1",  # P-256
    bytes.fromhex("2b81040022"): "secp384r1",  # P-384
    bytes.fromhex("2b81040023"): "secp521r1",  # P-521
}
# Names of some weak curves for the error message (others print as an OID).
_CURVE_NAMES = {
    bytes.fromhex("2a8648ce3d030101"): "secp192r1",
    bytes.fromhex("2b81040021"): "secp224r1",
    bytes.fromhex("2b8104000a"): "secp256k1",
    bytes.fromhex("2b2403030208010107"): "brainpoolP256r1",
    bytes.fromhex("2b240303020801010b"): "brainpoolP384r1",
    bytes.fromhex("2b240303020801010d"): "brainpoolP512r1",
}
_KEY_TYPES = {
    bytes.fromhex("2a8648ce380401"): "DSA",
    bytes.fromhex("2b656e"): "X25519",
    bytes.fromhex("2b656f"): "X448",
}

_SEQUENCE, _INTEGER, _BIT_STRING, _OID, _VERSION = 0x30, 0x02, 0x03, 0x06, 0xA0
# The labels OpenSSL reads a certificate from (PEM_X509_INFO_read_bio).
_PEM_CERT = re.compile(
    rb"^-----BEGIN ((?:X509 |TRUSTED )?CERTIFICATE)-----[ \t\r]*\n(.*?)^-----END \1-----",
    re.MULTILINE | re.DOTALL,
)
# OpenSSL's reasons for a key that is not the certificate's (another type: no certificate
# sits in the key's slot).
_MISMATCH = {"KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH", "NO_CERTIFICATE_ASSIGNED"}
_PEM_ENCRYPTED = re.compile(rb"^(-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED)",
                            re.MULTILINE)


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


class _BadDer(ValueError):
    pass


def _element(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, first byte of the contents, end of the contents) of the element at ``pos``."""
    if pos + 2 > end:
        raise _BadDer("truncated")
    tag, length = der[pos], der[pos + 1]
    if tag & 0x1F == 0x1F:
        raise _BadDer("high tag number")  # none on the path we walk
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > end:
            raise _BadDer("bad length")
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise _BadDer("truncated")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        element = _element(der, start, end)
        out.append(element)
        start = element[2]
    return out


def _expect(element: tuple[int, int, int], tag: int) -> tuple[int, int]:
    if element[0] != tag:
        raise _BadDer(f"expected tag {tag:#x}, found {element[0]:#x}")
    return element[1], element[2]


def _oid_text(raw: bytes) -> str:
    """Dotted form of an OBJECT IDENTIFIER's contents, for messages."""
    arcs, value = [], 0
    for byte in raw:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return "?"
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _spki(cert_der: bytes) -> tuple[bytes, bytes | None, bytes]:
    """(algorithm OID, parameters OID or None, public key bits) of an X.509 certificate."""
    cert = _expect(_element(cert_der, 0, len(cert_der)), _SEQUENCE)
    tbs = _expect(_children(cert_der, *cert)[0], _SEQUENCE)
    fields = _children(cert_der, *tbs)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6:
        raise _BadDer("short TBSCertificate")
    spki = _children(cert_der, *_expect(fields[5], _SEQUENCE))
    if len(spki) != 2:
        raise _BadDer("bad SubjectPublicKeyInfo")
    algorithm = _children(cert_der, *_expect(spki[0], _SEQUENCE))
    if not algorithm:
        raise _BadDer("empty AlgorithmIdentifier")
    oid = cert_der[slice(*_expect(algorithm[0], _OID))]
    params = None
    if len(algorithm) > 1 and algorithm[1][0] == _OID:
        params = cert_der[algorithm[1][1]:algorithm[1][2]]
    bits = cert_der[slice(*_expect(spki[1], _BIT_STRING))]
    if not bits or bits[0] != 0:
        raise _BadDer("bad public key BIT STRING")
    return oid, params, bits[1:]


def _rsa_bits(key_der: bytes) -> int:
    """Modulus size of an RSAPublicKey (RFC 8017 A.1.1), as ``key_size`` counts it."""
    seq = _expect(_element(key_der, 0, len(key_der)), _SEQUENCE)
    integers = _children(key_der, *seq)
    if len(integers) != 2:
        raise _BadDer("bad RSAPublicKey")
    return int.from_bytes(key_der[slice(*_expect(integers[0], _INTEGER))], "big").bit_length()


def _key_strength(cert_der: bytes, what: str) -> None:
    """ConfigError unless the certificate's key is RSA >= 2048, P-256/384/521 or EdDSA."""
    try:
        oid, params, key = _spki(cert_der)
        if oid in (_RSA, _RSA_PSS):
            bits = _rsa_bits(key)
            if bits < MIN_RSA_BITS:
                raise ConfigError(f"{what}: RSA key of {bits} bits is too weak "
                                  f"(at least {MIN_RSA_BITS})")
            return
    except _BadDer as exc:
        raise ConfigError(f"{what}: not a usable certificate: {exc}") from None
    if oid == _EC:
        if params is None:
            raise ConfigError(f"{what}: EC key without a named curve is not supported")
        if params not in STRONG_CURVES:
            name = _CURVE_NAMES.get(params) or _oid_text(params)
            raise ConfigError(f"{what}: EC curve {name} is too weak "
                              "(P-256, P-384 or P-521)")
    elif oid not in (_ED25519, _ED448):
        kind = _KEY_TYPES.get(oid) or _oid_text(oid)
        raise ConfigError(f"{what}: unsupported key type {kind}")


def _certificates(pem: bytes, what: str) -> list[bytes]:
    """The DER of each PEM certificate in ``pem``; ConfigError if there is none."""
    out = []
    for match in _PEM_CERT.finditer(pem):
        body = b"".join(match.group(2).split())
        try:
            out.append(base64.b64decode(body, validate=True))
        except binascii.Error:
            raise ConfigError(f"{what}: not a usable PEM certificate (bad base64)") from None
    if not out:
        raise ConfigError(f"{what}: no PEM certificate in the file")
    return out


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a pass phrase.
    raise ConfigError("encrypted private keys are not supported")


def check_tls_files(files: TlsFiles, where: str) -> None:
    """Readable PEM files, a key that matches the certificate, and strong keys."""
    try:
        ca_pem, cert_pem = files.ca_file.read_bytes(), files.cert_file.read_bytes()
        key_pem = files.key_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {exc.filename}: {exc.strerror}") from None
    ca = _certificates(ca_pem, f"{where}.ca_file")
    leaf = _certificates(cert_pem, f"{where}.cert_file")[0]
    # Before OpenSSL sees the files: it refuses a weak key itself (security level 2),
    # with a vaguer message.
    _key_strength(leaf, f"{where}.cert_file")
    for der in ca:
        _key_strength(der, f"{where}.ca_file")
    if _PEM_ENCRYPTED.search(key_pem):
        raise ConfigError(f"{where}.key_file: encrypted private keys are not supported")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(files.ca_file))
        ctx.load_cert_chain(str(files.cert_file), str(files.key_file), password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"{where}.key_file: {exc.reason}") from None
    except ssl.SSLError as exc:
        if exc.reason in _MISMATCH:
            raise ConfigError(f"{where}: key_file does not match cert_file") from None
        raise ConfigError(f"{where}: not a usable PEM certificate or key: {exc}") from None
    except OSError as exc:  # replaced since we read it
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    # Every certificate OpenSSL trusts must have been checked above.
    if ctx.cert_store_stats()["x509"] > len(ca):
        raise ConfigError(f"{where}.ca_file: holds certificates this check cannot read")


def client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert_file), str(files.key_file))
    return ctx
