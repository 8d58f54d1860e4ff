"""The few DER structures the certificate code writes and reads by hand.

Owns: TLV encoding and strict reading, OID bodies, X.509 times, single extensions, the RFC
4108 HardwareModuleName (the 802.1AR device-id SAN) and the issuer / subject names read
straight from a TBSCertificate. ``cryptography`` builds everything else; these exist where
its object model is either missing (hardwareModuleName) or too slow for the per-device path
(:mod:`trustcore.device_certs`, :func:`tbs_names_der` in :mod:`trustcore.verify`).
"""

from __future__ import annotations

import functools
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from trustcore.errors import EncodingError

__all__ = [
    "decode_hardware_module_name",
    "der_oid_body",
    "der_read",
    "der_time",
    "der_tlv",
    "encode_hardware_module_name",
    "extension_der",
    "tbs_names_der",
    "tbs_parts_der",
]


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:  # nearly every TLV of a certificate: no call, no list
        return bytes((tag, n)) + body
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF) if n > 0xFF else (tag, 0x81, n)) + body
    return bytes([tag]) + _der_length(n) + body


@functools.lru_cache(maxsize=64)
def der_oid_body(oid: ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


def encode_hardware_module_name(hw_type: ObjectIdentifier, hw_serial: bytes) -> bytes:
    """DER of ``HardwareModuleName ::= SEQUENCE { hwType OID, hwSerialNum OCTET STRING }``."""
    return der_tlv(0x30, der_tlv(0x06, der_oid_body(hw_type)) + der_tlv(0x04, hw_serial))


def der_read(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """Read one definite-length, minimally encoded TLV with ``tag`` at ``pos``."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise EncodingError(f"expected DER tag 0x{tag:02x}")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 2 or pos + n > len(data) or data[pos] == 0:
            raise EncodingError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        if length < 0x80:
            raise EncodingError("non-minimal DER length")
        pos += n
    if pos + length > len(data):
        raise EncodingError("truncated DER value")
    return data[pos : pos + length], pos + length


def tbs_names_der(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """(issuer, subject) of ``cert`` as the DER bytes it carries, read straight from its
    TBSCertificate (RFC 5280 §4.1) without building ``x509.Name`` objects (each access to
    ``cert.issuer``/``cert.subject`` builds a fresh one). Equal bytes are the same name;
    unequal bytes may still be equal names in another string encoding. Raises
    ``EncodingError`` on a TBS this reader does not follow."""
    body, _ = der_read(cert.tbs_certificate_bytes, 0, 0x30)
    issuer, subject, _ = _names_in_tbs(body)
    return issuer, subject


def _names_in_tbs(body: bytes) -> tuple[bytes, bytes, int]:
    """(issuer, subject, the position after the subject) in a TBSCertificate's body."""
    pos = 0
    if body[:1] == b"\xa0":  # [0] EXPLICIT version
        pos = der_read(body, pos, 0xA0)[1]
    pos = der_read(body, pos, 0x02)[1]  # serialNumber
    pos = der_read(body, pos, 0x30)[1]  # signature AlgorithmIdentifier
    start = pos
    pos = der_read(body, pos, 0x30)[1]
    issuer = body[start:pos]
    pos = der_read(body, pos, 0x30)[1]  # validity
    start = pos
    pos = der_read(body, pos, 0x30)[1]
    return issuer, body[start:pos], pos


def tbs_parts_der(cert: x509.Certificate) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    """(issuer, subject, extensions) of ``cert`` as it carries them, from one read of its
    TBSCertificate: :func:`tbs_names_der` plus each extension's extnValue by its OID's DER
    body. Raises ``EncodingError`` on a TBS this reader does not follow (including two
    extensions with one OID, which RFC 5280 forbids)."""
    tbs = cert.tbs_certificate_bytes
    body, end = der_read(tbs, 0, 0x30)
    if end != len(tbs):
        raise EncodingError("trailing bytes after TBSCertificate")
    issuer, subject, pos = _names_in_tbs(body)
    pos = der_read(body, pos, 0x30)[1]  # subjectPublicKeyInfo
    for tag in (0x81, 0x82):  # issuerUniqueID, subjectUniqueID
        if body[pos : pos + 1] == bytes((tag,)):
            pos = der_read(body, pos, tag)[1]
    extensions: dict[bytes, bytes] = {}
    if pos < len(body):
        wrapped, pos = der_read(body, pos, 0xA3)
        seq, end = der_read(wrapped, 0, 0x30)
        if end != len(wrapped):
            raise EncodingError("trailing bytes after extensions")
        at = 0
        while at < len(seq):
            ext, at = der_read(seq, at, 0x30)
            oid, i = der_read(ext, 0, 0x06)
            if ext[i : i + 1] == b"\x01":
                i = der_read(ext, i, 0x01)[1]
            value, i = der_read(ext, i, 0x04)
            if i != len(ext) or oid in extensions:
                raise EncodingError("malformed or repeated extension")
            extensions[oid] = value
    if pos != len(body):
        raise EncodingError("trailing bytes in TBSCertificate")
    return issuer, subject, extensions


def decode_hardware_module_name(der: bytes) -> tuple[ObjectIdentifier, bytes]:
    """Parse a HardwareModuleName strictly (no trailing bytes); return (hwType, hwSerialNum)."""
    seq, end = der_read(der, 0, 0x30)
    if end != len(der):
        raise EncodingError("trailing bytes after HardwareModuleName")
    oid_body, pos = der_read(seq, 0, 0x06)
    serial, pos = der_read(seq, pos, 0x04)
    if pos != len(seq) or not oid_body:
        raise EncodingError("malformed HardwareModuleName")
    return _oid_of_body(oid_body), serial


@functools.lru_cache(maxsize=64)
def _oid_of_body(oid_body: bytes) -> ObjectIdentifier:
    """The OID of a DER OID value (one hwType per product line: decoded once each)."""
    arcs: list[int] = []
    value = 0
    for i, byte in enumerate(oid_body):
        if value == 0 and byte == 0x80:
            raise EncodingError("non-minimal OID arc")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
        elif i == len(oid_body) - 1:
            raise EncodingError("truncated OID")
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ObjectIdentifier(".".join(str(a) for a in [*head, *arcs[1:]]))


def extension_der(oid_der: bytes, critical: bool, value: bytes) -> bytes:
    """``Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }``."""
    return der_tlv(0x30, oid_der + (b"\x01\x01\xff" if critical else b"") + der_tlv(0x04, value))


def der_time(moment: datetime) -> bytes:
    """RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (whole seconds,
    "Z")."""
    year = moment.year
    # Formatted by hand: strftime costs a few times more (one per certificate date).
    rest = (
        f"{moment.month:02d}{moment.day:02d}{moment.hour:02d}{moment.minute:02d}"
        f"{moment.second:02d}Z"
    )
    if 1950 <= year < 2050:
        return der_tlv(0x17, f"{year % 100:02d}{rest}".encode("ascii"))
    if year < 1000:  # strftime's own (platform) rendering of a short year, as before
        return der_tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))
    return der_tlv(0x18, f"{year}{rest}".encode("ascii"))
