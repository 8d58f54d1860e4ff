"""The certificate profile table and the one generic certificate builder.

Owns: the project's OIDs, the HQ roles, :class:`CertificateProfile` and :data:`PROFILES`
(what each kind of certificate contains), the P-256 key checks, the issuer checks and
:func:`build_certificate`, which every ``issue_*`` function of :mod:`trustcore.profiles`
uses (the device fast path of :mod:`trustcore.device_certs` makes the same bytes). Users
import these names from :mod:`trustcore.profiles`, which re-exports them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from trustcore.der import encode_hardware_module_name
from trustcore.errors import ProfileError
from trustcore.identity import CertSerial, DeviceId
from trustcore.keys import spki_der
from trustcore.utctime import whole_seconds

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
    "authority_key_id",
    "build_certificate",
    "check_issuer",
    "crl_distribution_point",
    "crl_issuers_of",
    "device_subject",
    "hardware_module_name",
    "key_usage_extension",
    "require_p256_private_key",
    "require_p256_public_key",
    "x509_name",
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


def require_p256_private_key(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProfileError(
            f"signing key must be ECDSA P-256, got {_describe_key(key)}",
            reason="wrong_key_type",
        )
    return key


def _describe_key(key: object) -> str:
    curve = getattr(key, "curve", None)
    return type(key).__name__ + (f" ({curve.name})" if curve is not None else "")


def hardware_module_name(
    device_id: DeviceId, hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE
) -> x509.OtherName:
    """The SAN entry carrying ``device_id`` as an 802.1AR hardwareModuleName."""
    return x509.OtherName(
        OID_HARDWARE_MODULE_NAME,
        encode_hardware_module_name(hw_type, device_id.value.encode("ascii")),
    )


# ------------------------------------------------------------------------------- builders


def key_usage_extension(names: frozenset[str]) -> x509.KeyUsage:
    unknown = names - set(_KU_FIELDS)
    if unknown:
        raise ProfileError(f"unknown key usage {sorted(unknown)}")
    flags = {field: field in names for field in _KU_FIELDS}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def x509_name(*pairs: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def check_issuer(
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


def build_certificate(
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
    issuer_key = require_p256_private_key(issuer_key)
    subject_key = require_p256_public_key(subject_key)
    start = whole_seconds("not_before", not_before, ProfileError)
    end = whole_seconds("not_after", not_after, ProfileError)
    if start >= end:
        raise ProfileError("not_before must be earlier than not_after")
    if issuer_cert is None:
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(subject_key)
    else:
        check_issuer(issuer_cert, issuer_key, profile.ca)
        issuer_name = issuer_cert.subject
        if start < issuer_cert.not_valid_before_utc or (
            end > issuer_cert.not_valid_after_utc and not allow_beyond_issuer
        ):
            raise ProfileError(f"{profile.name} validity must lie within the issuer's validity")
        aki = authority_key_id(issuer_cert)
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
        .add_extension(key_usage_extension(profile.key_usage), critical=True)
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


def authority_key_id(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
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


def device_subject(device_id: DeviceId, organization: str) -> x509.Name:
    """The subject of an IDevID or LDevID: CN and serialNumber both the device id."""
    if not isinstance(device_id, DeviceId):
        raise ProfileError("device_id must be a DeviceId")
    return x509_name(
        (NameOID.COMMON_NAME, device_id.value),
        (NameOID.SERIAL_NUMBER, device_id.value),
        (NameOID.ORGANIZATION_NAME, organization),
    )
