"""Certificate profiles of the device-trust PKI and the functions that issue them.

Hierarchy (see ``docs/pki.md``)::

    manufacturer root CA (pathLen 1, HQ, offline)
    ├── factory station CA (pathLen 0, key in the station TPM)
    │   └── device factory certificate: IEEE 802.1AR IDevID
    ├── site CA (pathLen 0, one per building registrar)
    │   ├── device secondary certificate: LDevID
    │   ├── MQTT broker server certificate
    │   └── site service client certificate (the registrar's own MQTT identity)
    └── HQ role certificates: entitlement signer, audit receiver, revocation signer

Every certificate is ECDSA P-256 / SHA-256 with a random 159-bit serial, SKI and AKI; any
other key type is refused with :class:`ProfileError` so that a weak or unexpected key can
never be certified by mistake. Profiles are immutable data (:class:`CertificateProfile`);
the ``issue_*`` functions are the only way the project builds certificates. The signing key
is an ``ec.EllipticCurvePrivateKey``; it may forward to a TPM or token, so it is only ever
used through ``builder.sign``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from trustcore.errors import X509_PARSE_ERRORS, EncodingError, InvalidValueError, ProfileError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import spki_der

__all__ = [
    "IDEVID_NO_EXPIRY",
    "OID_EKU_AUDIT_RECEIVER",
    "OID_EKU_CRL_SIGNER",
    "OID_EKU_ENTITLEMENT_SIGNER",
    "OID_EKU_REVOCATION_SIGNER",
    "OID_HARDWARE_MODULE_NAME",
    "OID_HW_TYPE_DEVICE",
    "PROFILES",
    "PROJECT_ARC",
    "CertificateProfile",
    "HqRole",
    "crl_distribution_point",
    "crl_issuers_of",
    "decode_hardware_module_name",
    "device_id_from_certificate",
    "encode_hardware_module_name",
    "hardware_module_name",
    "issue_broker_certificate",
    "issue_factory_certificate",
    "issue_role_certificate",
    "issue_root_ca",
    "issue_secondary_certificate",
    "issue_service_client_certificate",
    "issue_site_ca",
    "issue_station_ca",
    "require_p256_public_key",
    "site_id_from_certificate",
    "station_id_from_certificate",
]

#: Project private arc. PLACEHOLDER private enterprise number: replace 55555 by the
#: manufacturer's own IANA PEN before production (the OIDs below move with it).
PROJECT_ARC = "1.3.6.1.4.1.55555"
#: hwType of the RFC 4108 hardwareModuleName in device certificates ("devtrust TPM device").
OID_HW_TYPE_DEVICE = ObjectIdentifier(f"{PROJECT_ARC}.1.1")
#: Extended key usages of the HQ role certificates.
OID_EKU_ENTITLEMENT_SIGNER = ObjectIdentifier(f"{PROJECT_ARC}.1.3.1")
OID_EKU_AUDIT_RECEIVER = ObjectIdentifier(f"{PROJECT_ARC}.1.3.2")
OID_EKU_REVOCATION_SIGNER = ObjectIdentifier(f"{PROJECT_ARC}.1.3.3")
#: The delegated HQ CRL signer: signs the HQ indirect CRL of factory certificates
#: (docs/pki.md "Revocation of factory certificates"), so the root key stays offline.
OID_EKU_CRL_SIGNER = ObjectIdentifier(f"{PROJECT_ARC}.1.3.4")
#: id-on-hardwareModuleName (RFC 4108 §5), the SAN form IEEE 802.1AR uses for device ids.
OID_HARDWARE_MODULE_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.4")
#: IEEE 802.1AR §8.5 / RFC 5280 §4.1.2.5: "no well-defined expiration date".
IDEVID_NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


class HqRole(enum.Enum):
    """HQ end-entity roles, each with its own EKU so one role's key cannot act as another."""

    ENTITLEMENT_SIGNER = "entitlement-signer"
    AUDIT_RECEIVER = "audit-receiver"
    REVOCATION_SIGNER = "revocation-signer"
    CRL_SIGNER = "crl-signer"

    @property
    def eku(self) -> ObjectIdentifier:
        return _ROLE_EKU[self]


_ROLE_EKU = {
    HqRole.ENTITLEMENT_SIGNER: OID_EKU_ENTITLEMENT_SIGNER,
    HqRole.AUDIT_RECEIVER: OID_EKU_AUDIT_RECEIVER,
    HqRole.REVOCATION_SIGNER: OID_EKU_REVOCATION_SIGNER,
    HqRole.CRL_SIGNER: OID_EKU_CRL_SIGNER,
}


@dataclass(frozen=True, slots=True)
class CertificateProfile:
    """What one kind of certificate contains. ``key_usage`` names KeyUsage fields."""

    name: str
    ca: bool
    path_length: int | None
    key_usage: frozenset[str]
    eku: tuple[ObjectIdentifier, ...]


def _profile(
    name: str, *, ca: bool, path_length: int | None, ku: set[str], eku: Sequence[ObjectIdentifier]
) -> CertificateProfile:
    return CertificateProfile(name, ca, path_length, frozenset(ku), tuple(eku))


_CA_KU = {"key_cert_sign", "crl_sign"}
#: Every profile, by name. Tests and docs/pki.md read this table.
PROFILES: dict[str, CertificateProfile] = {
    p.name: p
    for p in (
        # pathLen 1: the root signs station/site CAs, which themselves sign only end entities.
        _profile("root_ca", ca=True, path_length=1, ku=_CA_KU, eku=()),
        _profile("station_ca", ca=True, path_length=0, ku=_CA_KU, eku=()),
        _profile("site_ca", ca=True, path_length=0, ku=_CA_KU, eku=()),
        _profile(
            "entitlement_signer",
            ca=False,
            path_length=None,
            ku={"digital_signature"},
            eku=(OID_EKU_ENTITLEMENT_SIGNER,),
        ),
        # keyAgreement only: the audit receiver key opens ECDH/HPKE-sealed audit exports and
        # must not be usable to sign anything.
        _profile(
            "audit_receiver",
            ca=False,
            path_length=None,
            ku={"key_agreement"},
            eku=(OID_EKU_AUDIT_RECEIVER,),
        ),
        _profile(
            "revocation_signer",
            ca=False,
            path_length=None,
            ku={"digital_signature"},
            eku=(OID_EKU_REVOCATION_SIGNER,),
        ),
        # cRLSign only: an end entity (not a CA) that signs the HQ indirect CRL; OpenSSL
        # needs nothing else of a CRL issuer (checked with openssl verify -extended_crl).
        _profile(
            "crl_signer",
            ca=False,
            path_length=None,
            ku={"crl_sign"},
            eku=(OID_EKU_CRL_SIGNER,),
        ),
        _profile(
            "idevid",
            ca=False,
            path_length=None,
            ku={"digital_signature"},
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        ),
        # keyAgreement is set but unused: payload keys are wrapped to the device's separate
        # ECDH key (the request's wrap_key), never to the LDevID key (docs/pki.md).
        _profile(
            "ldevid",
            ca=False,
            path_length=None,
            ku={"digital_signature", "key_agreement"},
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        ),
        _profile(
            "broker_server",
            ca=False,
            path_length=None,
            ku={"digital_signature"},
            eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
        ),
        # A site service (the registrar itself) as an MQTT client: clientAuth, no device id.
        _profile(
            "service_client",
            ca=False,
            path_length=None,
            ku={"digital_signature"},
            eku=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        ),
    )
}

_KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


# ---------------------------------------------------------------------------- key checks


def require_p256_public_key(key: object) -> ec.EllipticCurvePublicKey:
    """Return ``key`` if it is a P-256 public key, else raise :class:`ProfileError`."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProfileError(
            f"only ECDSA P-256 keys are certified, got {_describe_key(key)}",
            reason="wrong_key_type",
        )
    return key


def _require_p256_private_key(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProfileError(
            f"signing key must be ECDSA P-256, got {_describe_key(key)}",
            reason="wrong_key_type",
        )
    return key


def _describe_key(key: object) -> str:
    curve = getattr(key, "curve", None)
    return type(key).__name__ + (f" ({curve.name})" if curve is not None else "")


# ---------------------------------------------------------------- hardwareModuleName DER


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:  # nearly every TLV of a certificate: no call, no list
        return bytes((tag, n)) + body
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF) if n > 0xFF else (tag, 0x81, n)) + body
    return bytes([tag]) + _der_length(n) + body


@functools.lru_cache(maxsize=64)
def _der_oid_body(oid: ObjectIdentifier) -> bytes:
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
    return _der_tlv(0x30, _der_tlv(0x06, _der_oid_body(hw_type)) + _der_tlv(0x04, hw_serial))


def _der_read(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
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
    tbs = cert.tbs_certificate_bytes
    body, _ = _der_read(tbs, 0, 0x30)
    pos = 0
    if body[:1] == b"\xa0":  # [0] EXPLICIT version
        pos = _der_read(body, pos, 0xA0)[1]
    pos = _der_read(body, pos, 0x02)[1]  # serialNumber
    pos = _der_read(body, pos, 0x30)[1]  # signature AlgorithmIdentifier
    start = pos
    pos = _der_read(body, pos, 0x30)[1]
    issuer = body[start:pos]
    pos = _der_read(body, pos, 0x30)[1]  # validity
    start = pos
    pos = _der_read(body, pos, 0x30)[1]
    return issuer, body[start:pos]


def decode_hardware_module_name(der: bytes) -> tuple[ObjectIdentifier, bytes]:
    """Parse a HardwareModuleName strictly (no trailing bytes); return (hwType, hwSerialNum)."""
    seq, end = _der_read(der, 0, 0x30)
    if end != len(der):
        raise EncodingError("trailing bytes after HardwareModuleName")
    oid_body, pos = _der_read(seq, 0, 0x06)
    serial, pos = _der_read(seq, pos, 0x04)
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


def hardware_module_name(
    device_id: DeviceId, hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE
) -> x509.OtherName:
    """The SAN entry carrying ``device_id`` as an 802.1AR hardwareModuleName."""
    return x509.OtherName(
        OID_HARDWARE_MODULE_NAME,
        encode_hardware_module_name(hw_type, device_id.value.encode("ascii")),
    )


# ------------------------------------------------------------------------------- builders


def _utc(name: str, moment: datetime) -> datetime:
    """X.509 times are UTC seconds; refuse naive datetimes (local-time bugs) outright."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ProfileError(f"{name} must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0)


def _key_usage(names: frozenset[str]) -> x509.KeyUsage:
    unknown = names - set(_KU_FIELDS)
    if unknown:
        raise ProfileError(f"unknown key usage {sorted(unknown)}")
    flags = {field: field in names for field in _KU_FIELDS}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def _name(*pairs: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def _check_issuer(
    issuer_cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, profile_is_ca: bool
) -> None:
    """The issuer must be a CA allowed to sign this kind of certificate, with this key."""
    try:
        bc = issuer_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = issuer_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise ProfileError("issuer certificate is not a CA certificate") from exc
    if not bc.ca or not ku.key_cert_sign:
        raise ProfileError("issuer certificate is not allowed to sign certificates")
    if profile_is_ca and bc.path_length == 0:
        raise ProfileError("issuer has pathLen 0 and cannot sign another CA", reason="path_length")
    if spki_der(require_p256_public_key(issuer_cert.public_key())) != spki_der(
        issuer_key.public_key()
    ):
        raise ProfileError("signing key does not match the issuer certificate")


def _build(
    profile: CertificateProfile,
    *,
    subject: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    san: Sequence[x509.GeneralName] = (),
    allow_beyond_issuer: bool = False,
    crl_issuer: x509.Name | None = None,
) -> x509.Certificate:
    issuer_key = _require_p256_private_key(issuer_key)
    subject_key = require_p256_public_key(subject_key)
    start, end = _utc("not_before", not_before), _utc("not_after", not_after)
    if start >= end:
        raise ProfileError("not_before must be earlier than not_after")
    if issuer_cert is None:
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(subject_key)
    else:
        _check_issuer(issuer_cert, issuer_key, profile.ca)
        issuer_name = issuer_cert.subject
        if start < issuer_cert.not_valid_before_utc or (
            end > issuer_cert.not_valid_after_utc and not allow_beyond_issuer
        ):
            raise ProfileError(f"{profile.name} validity must lie within the issuer's validity")
        aki = _authority_key_id(issuer_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(subject_key)
        .serial_number(CertSerial.random().value)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.BasicConstraints(ca=profile.ca, path_length=profile.path_length), critical=True
        )
        .add_extension(_key_usage(profile.key_usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(aki, critical=False)
    )
    if profile.eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(profile.eku)), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    if crl_issuer is not None:
        builder = builder.add_extension(crl_distribution_point(crl_issuer), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _authority_key_id(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of what ``issuer_cert`` signs: its SKI, else derived from its key."""
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            require_p256_public_key(issuer_cert.public_key())
        )


def crl_distribution_point(crl_issuer: x509.Name) -> x509.CRLDistributionPoints:
    """CRLDistributionPoints with one point naming only its cRLIssuer (RFC 5280 §4.2.1.13):
    the certificate's revocation is published in an indirect CRL signed by ``crl_issuer``
    (the HQ CRL signer), not by the CA that issued it. OpenSSL puts an indirect CRL in
    scope for a certificate only through this field (``crl_crldp_check``)."""
    if not isinstance(crl_issuer, x509.Name) or not len(crl_issuer):
        raise ProfileError("crl_issuer must be a non-empty x509.Name")
    point = x509.DistributionPoint(
        full_name=None,
        relative_name=None,
        reasons=None,
        crl_issuer=[x509.DirectoryName(crl_issuer)],
    )
    return x509.CRLDistributionPoints([point])


def crl_issuers_of(cert: x509.Certificate) -> tuple[x509.Name, ...]:
    """The cRLIssuer names of ``cert``'s CRLDistributionPoints (empty if none)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    names: list[x509.Name] = []
    for point in points:
        for general in point.crl_issuer or ():
            if isinstance(general, x509.DirectoryName):
                names.append(general.value)
    return tuple(names)


def issue_root_ca(
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Self-signed manufacturer root (CA, pathLen 1, keyCertSign + cRLSign)."""
    key = _require_p256_private_key(key)
    subject = _name((NameOID.COMMON_NAME, common_name), (NameOID.ORGANIZATION_NAME, organization))
    return _build(
        PROFILES["root_ca"],
        subject=subject,
        subject_key=key.public_key(),
        issuer_cert=None,
        issuer_key=key,
        not_before=not_before,
        not_after=not_after,
    )


def issue_station_ca(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    station_id: StationId,
    organization: str,
    not_before: datetime,
    not_after: datetime,
    max_not_after: datetime,
) -> x509.Certificate:
    """Factory station CA (pathLen 0). ``max_not_after`` is the bound HQ allows (the root's
    notAfter): the certificate must stay verifiable for the whole life of the devices it
    signs, so it does not end with the entitlement; the entitlement bounds *issuance*
    (``trustcore.issuance``, HQ's audit), not verification (docs/pki.md)."""
    if _utc("not_after", not_after) > _utc("max_not_after", max_not_after):
        raise ProfileError("station CA validity exceeds its bound (max_not_after)")
    subject = _name(
        (NameOID.COMMON_NAME, f"Factory Station CA {station_id}"),
        (NameOID.ORGANIZATION_NAME, organization),
        (NameOID.SERIAL_NUMBER, station_id.value),
    )
    return _build(
        PROFILES["station_ca"],
        subject=subject,
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
    )


def issue_site_ca(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    site_id: SiteId,
    organization: str,
    not_before: datetime,
    not_after: datetime,
    generation: int = 1,
) -> x509.Certificate:
    """Site (building registrar) CA, pathLen 0: signs LDevIDs and the broker certificate.

    ``generation`` > 1 (a CA rollover, ``trustcore.site_rollover``) gives the CN a
    ``G<n>`` suffix, so two CAs of one site never share a subject name: during the overlap
    OpenSSL, Mosquitto and the CRL files find each CA's CRL by issuer name."""
    if type(generation) is not int or not 1 <= generation <= 9999:
        raise ProfileError("site CA generation must be 1..9999")
    suffix = "" if generation == 1 else f" G{generation}"
    subject = _name(
        (NameOID.COMMON_NAME, f"Site CA {site_id}{suffix}"),
        (NameOID.ORGANIZATION_NAME, organization),
        (NameOID.SERIAL_NUMBER, site_id.value),
    )
    return _build(
        PROFILES["site_ca"],
        subject=subject,
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
    )


def issue_role_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    role: HqRole,
    common_name: str,
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """HQ role end entity (entitlement signer, audit receiver or revocation signer)."""
    if not isinstance(role, HqRole):
        raise ProfileError(f"unknown HQ role {role!r}")
    subject = _name(
        (NameOID.COMMON_NAME, common_name),
        (NameOID.ORGANIZATION_NAME, organization),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
    )
    return _build(
        PROFILES[role.value.replace("-", "_")],
        subject=subject,
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
    )


def _device_subject(device_id: DeviceId, organization: str) -> x509.Name:
    if not isinstance(device_id, DeviceId):
        raise ProfileError("device_id must be a DeviceId")
    return _name(
        (NameOID.COMMON_NAME, device_id.value),
        (NameOID.SERIAL_NUMBER, device_id.value),
        (NameOID.ORGANIZATION_NAME, organization),
    )


def issue_factory_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    device_id: DeviceId,
    manufacturer: str,
    not_before: datetime,
    not_after: datetime = IDEVID_NO_EXPIRY,
    hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE,
    crl_issuer: x509.Name | None = None,
) -> x509.Certificate:
    """Device factory certificate, an IEEE 802.1AR IDevID signed by a station CA.

    ``crl_issuer`` (the HQ CRL signer's name) adds a CRLDistributionPoints whose cRLIssuer
    names it: HQ, not the station, publishes this certificate's revocation (indirect CRL).

    The device id appears three times (CN for Mosquitto, serialNumber per 802.1AR, and the
    hardwareModuleName SAN that ``cryptography``'s verifier and pkilint accept); readers
    cross-check all three. ``not_after`` defaults to 99991231235959Z, which 802.1AR uses for a
    device identity meant to last the device's life; only that value may outlive the issuer.

    The same certificate :func:`_build` makes for the ``idevid`` profile (tests compare the
    bytes), with the issuer checked and its parts prepared once per station CA certificate,
    key object and CRL issuer.
    """
    issuer = _prepared_issuer("idevid", issuer_cert, issuer_key, crl_issuer)
    start, end = _utc("not_before", not_before), _utc("not_after", not_after)
    if start >= end:
        raise ProfileError("not_before must be earlier than not_after")
    if start < issuer.not_before or (end > issuer.not_after and end != IDEVID_NO_EXPIRY):
        raise ProfileError("idevid validity must lie within the issuer's validity")
    return _issue_device_certificate(
        issuer, subject_key, device_id, manufacturer, start, end, hw_type
    )


def issue_secondary_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    device_id: DeviceId,
    organization: str,
    not_before: datetime,
    not_after: datetime,
    hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE,
) -> x509.Certificate:
    """Device secondary certificate (LDevID) issued on site by the site CA.

    The same certificate :func:`_build` makes for the ``ldevid`` profile (tests compare the
    bytes), with what depends only on the issuer (its checks, name, AKI, the fixed
    extensions) prepared once per site CA and key: a registrar issues thousands."""
    issuer = _prepared_issuer("ldevid", issuer_cert, issuer_key)
    start, end = _utc("not_before", not_before), _utc("not_after", not_after)
    if start >= end:
        raise ProfileError("not_before must be earlier than not_after")
    if start < issuer.not_before or end > issuer.not_after:
        raise ProfileError("ldevid validity must lie within the issuer's validity")
    return _issue_device_certificate(
        issuer, subject_key, device_id, organization, start, end, hw_type
    )


def _issue_device_certificate(
    issuer: _PreparedIssuer,
    subject_key: ec.EllipticCurvePublicKey,
    device_id: DeviceId,
    organization: str,
    start: datetime,
    end: datetime,
    hw_type: ObjectIdentifier,
) -> x509.Certificate:
    """The IDevID or LDevID certificate :func:`_build` makes for ``issuer``'s profile, byte
    for byte (tests/test_ldevid_issuance.py compares them), assembled from parts prepared
    once per issuer: building it through ``CertificateBuilder`` cost about 65 µs per device
    beyond the signature (x509.Name and extension objects, then their encoding), and the
    issuer checks another 50 µs."""
    if not isinstance(device_id, DeviceId):
        raise ProfileError("device_id must be a DeviceId")
    subject_key = require_p256_public_key(subject_key)
    subject_spki = subject_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # = SubjectKeyIdentifier.from_public_key: SHA-1 of the subjectPublicKey BIT STRING's
    # content (RFC 5280 §4.2.1.2 method 1), the point after the SPKI's fixed 26-byte head.
    ski = hashlib.sha1(subject_spki[-65:], usedforsecurity=False).digest()
    san = _der_tlv(
        0x30,
        _der_tlv(
            0xA0,  # otherName [0]
            _HW_MODULE_NAME_OID_DER
            + _der_tlv(0xA0, encode_hardware_module_name(hw_type, device_id.value.encode("ascii"))),
        ),
    )
    extensions = (
        issuer.leading_der
        + _extension_der(_SKI_OID_DER, False, _der_tlv(0x04, ski))
        + issuer.trailing_der
        + _extension_der(_SAN_OID_DER, False, san)
        + issuer.closing_der
    )
    serial = CertSerial.random().value
    tbs = _der_tlv(
        0x30,
        b"\xa0\x03\x02\x01\x02"  # [0] version v3
        + _der_tlv(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))
        + _ECDSA_SHA256_ALGORITHM
        + issuer.name_der
        + _der_tlv(0x30, _der_time(start) + _der_time(end))
        + _device_subject_der(device_id, issuer, organization)
        + subject_spki
        + _der_tlv(0xA3, _der_tlv(0x30, extensions)),
    )
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(
        _der_tlv(0x30, tbs + _ECDSA_SHA256_ALGORITHM + _der_tlv(0x03, b"\x00" + signature))
    )


#: AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758 §3.2: no parameters).
_ECDSA_SHA256_ALGORITHM = bytes.fromhex("300a06082a8648ce3d040302")
_SKI_OID_DER = bytes.fromhex("0603551d0e")
_HW_MODULE_NAME_OID_DER = bytes.fromhex("06082b06010505070804")  # 1.3.6.1.5.5.7.8.4
_SAN_OID_DER = bytes.fromhex("0603551d11")


def _extension_der(oid_der: bytes, critical: bool, value: bytes) -> bytes:
    """``Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }``."""
    return _der_tlv(0x30, oid_der + (b"\x01\x01\xff" if critical else b"") + _der_tlv(0x04, value))


def _der_time(moment: datetime) -> bytes:
    """RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (whole seconds,
    "Z")."""
    if 1950 <= moment.year < 2050:
        return _der_tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _der_tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def _device_subject_der(device_id: DeviceId, issuer: _PreparedIssuer, organization: str) -> bytes:
    """DER of :func:`_device_subject` (CN UTF8String, serialNumber PrintableString, the
    organization as ``x509.Name`` encodes it, cached per issuer)."""
    org = issuer.organizations.get(organization)
    if org is None:
        org = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
        ).public_bytes()
        org = _der_read(org, 0, 0x30)[0]  # the RDN SET inside the one-RDN Name
        if len(issuer.organizations) < 16:
            issuer.organizations[organization] = org
    value = device_id.value.encode("ascii")
    return _der_tlv(
        0x30,
        _der_tlv(0x31, _der_tlv(0x30, _CN_OID_DER + _der_tlv(0x0C, value)))
        + _der_tlv(0x31, _der_tlv(0x30, _SERIAL_NUMBER_OID_DER + _der_tlv(0x13, value)))
        + org,
    )


_CN_OID_DER = bytes.fromhex("0603550403")
_SERIAL_NUMBER_OID_DER = bytes.fromhex("0603550405")


@dataclass(frozen=True, slots=True)
class _PreparedIssuer:
    """An IDevID or LDevID issuer after :func:`_check_issuer`: its name, validity, AKI and
    the fixed extensions of its profile, in :func:`_build`'s order (BC, KU | SKI | AKI, EKU |
    SAN | CRLDistributionPoints)."""

    profile: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    #: The issuer's subject as ``x509.Name`` encodes it (what ``_build`` writes).
    name_der: bytes
    not_before: datetime
    not_after: datetime
    #: DER of the extensions before the SKI (BC, KU) and between SKI and SAN (AKI, EKU).
    leading_der: bytes
    trailing_der: bytes
    #: DER of the extension after the SAN: the CRLDistributionPoints naming ``crl_issuer``.
    closing_der: bytes
    crl_issuer: x509.Name | None
    #: Organization name -> its encoded RDN (a site has one or two).
    organizations: dict[str, bytes] = field(default_factory=dict)


#: Recently prepared issuers; a key object is matched by identity (a TPM- or token-backed
#: key object that changes per call is simply prepared again).
_PREPARED: list[_PreparedIssuer] = []
_MAX_PREPARED = 8


def _prepared_issuer(
    profile_name: str,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    crl_issuer: x509.Name | None = None,
) -> _PreparedIssuer:
    for prepared in _PREPARED:
        if (
            prepared.profile == profile_name
            and prepared.key is issuer_key
            and prepared.certificate == issuer_cert
            and (prepared.crl_issuer is crl_issuer or prepared.crl_issuer == crl_issuer)
        ):
            return prepared
    profile = PROFILES[profile_name]
    issuer_key = _require_p256_private_key(issuer_key)
    _check_issuer(issuer_cert, issuer_key, profile.ca)
    ext = x509.oid.ExtensionOID
    leading: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(
            ext.BASIC_CONSTRAINTS,
            True,
            x509.BasicConstraints(ca=profile.ca, path_length=profile.path_length),
        ),
        x509.Extension(ext.KEY_USAGE, True, _key_usage(profile.key_usage)),
    ]
    trailing: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(ext.AUTHORITY_KEY_IDENTIFIER, False, _authority_key_id(issuer_cert))
    ]
    if profile.eku:
        trailing.append(
            x509.Extension(ext.EXTENDED_KEY_USAGE, False, x509.ExtendedKeyUsage(list(profile.eku)))
        )
    closing: list[x509.Extension[x509.ExtensionType]] = []
    if crl_issuer is not None:
        closing.append(
            x509.Extension(ext.CRL_DISTRIBUTION_POINTS, False, crl_distribution_point(crl_issuer))
        )
    prepared = _PreparedIssuer(
        profile=profile_name,
        certificate=issuer_cert,
        key=issuer_key,
        name_der=issuer_cert.subject.public_bytes(),
        not_before=issuer_cert.not_valid_before_utc,
        not_after=issuer_cert.not_valid_after_utc,
        leading_der=b"".join(_encoded_extension(e) for e in leading),
        trailing_der=b"".join(_encoded_extension(e) for e in trailing),
        closing_der=b"".join(_encoded_extension(e) for e in closing),
        crl_issuer=crl_issuer,
    )
    _PREPARED.insert(0, prepared)
    del _PREPARED[_MAX_PREPARED:]
    return prepared


def _encoded_extension(extension: x509.Extension[x509.ExtensionType]) -> bytes:
    return _extension_der(
        _der_tlv(0x06, _der_oid_body(extension.oid)),
        extension.critical,
        extension.value.public_bytes(),
    )


def issue_broker_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """MQTT broker TLS server certificate (serverAuth, SAN dNSName / iPAddress)."""
    names: list[x509.GeneralName] = []
    for dns in dns_names:
        if not isinstance(dns, str) or not dns or not dns.isascii() or " " in dns:
            raise ProfileError(f"bad DNS name {dns!r}")
        names.append(x509.DNSName(dns.lower()))
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise ProfileError(f"bad IP address {ip!r}") from exc
    if not names:
        raise ProfileError("a broker certificate needs at least one DNS name or IP address")
    common_name = dns_names[0] if dns_names else str(ip_addresses[0])
    return _build(
        PROFILES["broker_server"],
        subject=_name(
            (NameOID.COMMON_NAME, common_name), (NameOID.ORGANIZATION_NAME, organization)
        ),
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
        san=names,
    )


#: A service identity: ``name@site``, never a valid DeviceId (no ``@`` there), so a
#: service certificate can never be mistaken for a device's (nor reach its topics).
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,30}@[a-z0-9][a-z0-9._-]{0,30}")


def issue_service_client_certificate(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    *,
    service_name: str,
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """MQTT client certificate of a site service (e.g. the registrar, CN ``registrar@site``),
    issued by the site CA: clientAuth, digitalSignature, no SAN.

    Why no SAN: brokers take the identity from the CN, and the only SAN forms that would fit
    (a device's hardwareModuleName, a URI) would either make it look like a device or fail
    pkilint. The ``@`` the name must contain is what keeps it apart from every DeviceId."""
    if not isinstance(service_name, str) or _SERVICE_NAME.fullmatch(service_name) is None:
        raise ProfileError(f"service name {service_name!r} must look like name@site ([a-z0-9._-])")
    return _build(
        PROFILES["service_client"],
        subject=_name(
            (NameOID.COMMON_NAME, service_name), (NameOID.ORGANIZATION_NAME, organization)
        ),
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
    )


# -------------------------------------------------------------------------------- readers


def _single_attribute(name: x509.Name, oid: ObjectIdentifier, label: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise ProfileError(f"subject must hold exactly one {label}")
    return values[0].value


#: A name that is not a valid id, or a subject / SAN that does not parse at all (hostile DER
#: raises only when the field is first read).
_IDENTITY_ERRORS: tuple[type[Exception], ...] = (
    EncodingError,
    InvalidValueError,
    *X509_PARSE_ERRORS,
)


def device_id_from_certificate(
    cert: x509.Certificate, *, hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE
) -> DeviceId:
    """The device id of an IDevID/LDevID, after cross-checking CN, serialNumber and SAN.

    All three must name the same device: a certificate whose CN (what Mosquitto uses) says
    one device and whose SAN (what the registrar may log) says another is refused.
    """
    try:
        subject = cert.subject  # each access builds the Name anew
        cn = _single_attribute(subject, NameOID.COMMON_NAME, "CN")
        serial = _single_attribute(subject, NameOID.SERIAL_NUMBER, "serialNumber")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise ProfileError("device certificate has no SAN", reason="missing_san") from exc
        others = [
            o
            for o in san.get_values_for_type(x509.OtherName)
            if o.type_id == OID_HARDWARE_MODULE_NAME
        ]
        if len(others) != 1:
            raise ProfileError(
                "device certificate needs exactly one hardwareModuleName SAN", reason="missing_san"
            )
        found_type, hw_serial = decode_hardware_module_name(others[0].value)
        if found_type != hw_type:
            raise ProfileError(f"unexpected hwType {found_type.dotted_string}")
        try:
            san_id = hw_serial.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProfileError("hwSerialNum is not ASCII") from exc
        device_id = DeviceId(cn)
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"device identity is malformed: {exc}") from exc
    if not cn == serial == san_id:
        raise ProfileError(
            f"device identity mismatch: CN={cn!r} serialNumber={serial!r} SAN={san_id!r}"
        )
    return device_id


def station_id_from_certificate(cert: x509.Certificate) -> StationId:
    """The station id of a station CA certificate (subject serialNumber)."""
    try:
        return StationId(_single_attribute(cert.subject, NameOID.SERIAL_NUMBER, "serialNumber"))
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"station id is malformed: {exc}") from exc


def site_id_from_certificate(cert: x509.Certificate) -> SiteId:
    """The site id of a site CA certificate (subject serialNumber)."""
    try:
        return SiteId(_single_attribute(cert.subject, NameOID.SERIAL_NUMBER, "serialNumber"))
    except _IDENTITY_ERRORS as exc:
        raise ProfileError(f"site id is malformed: {exc}") from exc
