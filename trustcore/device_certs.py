"""Issuing device certificates: the IEEE 802.1AR IDevID (factory station) and LDevID (site).

Owns :func:`issue_factory_certificate` and :func:`issue_secondary_certificate` and their
fast path: a station or registrar issues thousands, so what depends only on the issuer (its
checks, name, AKI, the fixed extensions) is prepared once per CA certificate and key, and
each certificate is assembled from DER parts (:mod:`trustcore.der`). The result is byte for
byte what :func:`trustcore.cert_builder.build_certificate` makes for the ``idevid`` /
``ldevid`` profile (``tests/registrar/test_ldevid_issuance.py`` compares them). Users import these
from :mod:`trustcore.profiles`, which re-exports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from trustcore.cert_builder import (
    IDEVID_NO_EXPIRY,
    OID_HW_TYPE_DEVICE,
    PROFILES,
    authority_key_id,
    check_issuer,
    crl_distribution_point,
    key_usage_extension,
    require_p256_private_key,
    require_p256_public_key,
)
from trustcore.der import (
    der_oid_body,
    der_read,
    der_time,
    der_tlv,
    encode_hardware_module_name,
    extension_der,
)
from trustcore.errors import ProfileError
from trustcore.identity import CertSerial, DeviceId
from trustcore.utctime import whole_seconds

__all__ = ["issue_factory_certificate", "issue_secondary_certificate"]


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

    The same certificate ``build_certificate`` makes for the ``idevid`` profile (tests compare the
    bytes), with the issuer checked and its parts prepared once per station CA certificate,
    key object and CRL issuer.
    """
    issuer = _prepared_issuer("idevid", issuer_cert, issuer_key, crl_issuer)
    start = whole_seconds("not_before", not_before, ProfileError)
    end = whole_seconds("not_after", not_after, ProfileError)
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

    The same certificate ``build_certificate`` makes for the ``ldevid`` profile (tests compare the
    bytes), with what depends only on the issuer (its checks, name, AKI, the fixed
    extensions) prepared once per site CA and key: a registrar issues thousands."""
    issuer = _prepared_issuer("ldevid", issuer_cert, issuer_key)
    start = whole_seconds("not_before", not_before, ProfileError)
    end = whole_seconds("not_after", not_after, ProfileError)
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
    """The IDevID or LDevID certificate ``build_certificate`` makes for ``issuer``'s profile, byte
    for byte (tests/registrar/test_ldevid_issuance.py compares them), assembled from parts prepared
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
    san = der_tlv(
        0x30,
        der_tlv(
            0xA0,  # otherName [0]
            _HW_MODULE_NAME_OID_DER
            + der_tlv(0xA0, encode_hardware_module_name(hw_type, device_id.value.encode("ascii"))),
        ),
    )
    extensions = (
        issuer.leading_der
        + extension_der(_SKI_OID_DER, False, der_tlv(0x04, ski))
        + issuer.trailing_der
        + extension_der(_SAN_OID_DER, False, san)
        + issuer.closing_der
    )
    serial = CertSerial.random().value
    tbs = der_tlv(
        0x30,
        b"\xa0\x03\x02\x01\x02"  # [0] version v3
        + der_tlv(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))
        + _ECDSA_SHA256_ALGORITHM
        + issuer.name_der
        + der_tlv(0x30, der_time(start) + der_time(end))
        + _device_subject_der(device_id, issuer, organization)
        + subject_spki
        + der_tlv(0xA3, der_tlv(0x30, extensions)),
    )
    signature = issuer.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(
        der_tlv(0x30, tbs + _ECDSA_SHA256_ALGORITHM + der_tlv(0x03, b"\x00" + signature))
    )


#: AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758 §3.2: no parameters).
_ECDSA_SHA256_ALGORITHM = bytes.fromhex("300a06082a8648ce3d040302")
_SKI_OID_DER = bytes.fromhex("0603551d0e")
_HW_MODULE_NAME_OID_DER = bytes.fromhex("06082b06010505070804")  # 1.3.6.1.5.5.7.8.4
_SAN_OID_DER = bytes.fromhex("0603551d11")


def _device_subject_der(device_id: DeviceId, issuer: _PreparedIssuer, organization: str) -> bytes:
    """DER of ``device_subject`` (CN UTF8String, serialNumber PrintableString, the
    organization as ``x509.Name`` encodes it, cached per issuer)."""
    org = issuer.organizations.get(organization)
    if org is None:
        org = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
        ).public_bytes()
        org = der_read(org, 0, 0x30)[0]  # the RDN SET inside the one-RDN Name
        if len(issuer.organizations) < 16:
            issuer.organizations[organization] = org
    value = device_id.value.encode("ascii")
    return der_tlv(
        0x30,
        der_tlv(0x31, der_tlv(0x30, _CN_OID_DER + der_tlv(0x0C, value)))
        + der_tlv(0x31, der_tlv(0x30, _SERIAL_NUMBER_OID_DER + der_tlv(0x13, value)))
        + org,
    )


_CN_OID_DER = bytes.fromhex("0603550403")
_SERIAL_NUMBER_OID_DER = bytes.fromhex("0603550405")


@dataclass(frozen=True, slots=True)
class _PreparedIssuer:
    """An IDevID or LDevID issuer after :func:`check_issuer`: its name, validity, AKI and
    the fixed extensions of its profile, in ``build_certificate``'s order (BC, KU | SKI | AKI, EKU |
    SAN | CRLDistributionPoints)."""

    profile: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    #: The issuer's subject as ``x509.Name`` encodes it (what ``build_certificate`` writes).
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
    issuer_key = require_p256_private_key(issuer_key)
    check_issuer(issuer_cert, issuer_key, profile.ca)
    ext = x509.oid.ExtensionOID
    leading: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(
            ext.BASIC_CONSTRAINTS,
            True,
            x509.BasicConstraints(ca=profile.ca, path_length=profile.path_length),
        ),
        x509.Extension(ext.KEY_USAGE, True, key_usage_extension(profile.key_usage)),
    ]
    trailing: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(ext.AUTHORITY_KEY_IDENTIFIER, False, authority_key_id(issuer_cert))
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
    return extension_der(
        der_tlv(0x06, der_oid_body(extension.oid)),
        extension.critical,
        extension.value.public_bytes(),
    )
