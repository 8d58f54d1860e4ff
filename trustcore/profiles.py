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

Where the parts live (every public name is importable from here, as callers always have):
the profile table, OIDs and the generic builder in :mod:`trustcore.cert_builder`; device
certificates (IDevID, LDevID) in :mod:`trustcore.device_certs`; reading ids back in
:mod:`trustcore.cert_identity`; hand-written DER in :mod:`trustcore.der`. This module owns
the CA, HQ role, broker and site service certificates.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from trustcore.cert_builder import (
    IDEVID_NO_EXPIRY,
    OID_EKU_AUDIT_RECEIVER,
    OID_EKU_CRL_SIGNER,
    OID_EKU_ENTITLEMENT_SIGNER,
    OID_EKU_REVOCATION_SIGNER,
    OID_HARDWARE_MODULE_NAME,
    OID_HW_TYPE_DEVICE,
    PROFILES,
    PROJECT_ARC,
    CertificateProfile,
    HqRole,
    build_certificate,
    crl_distribution_point,
    crl_issuers_of,
    hardware_module_name,
    require_p256_private_key,
    require_p256_public_key,
    x509_name,
)
from trustcore.cert_identity import (
    device_id_from_certificate,
    site_id_from_certificate,
    station_id_from_certificate,
)
from trustcore.der import (
    decode_hardware_module_name,
    encode_hardware_module_name,
)
from trustcore.device_certs import issue_factory_certificate, issue_secondary_certificate
from trustcore.errors import ProfileError
from trustcore.identity import SiteId, StationId
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


def _subject(common_name: str, organization: str, *more: tuple[ObjectIdentifier, str]) -> x509.Name:
    """CN, O and then ``more``, in that order (the order is part of the certificate bytes)."""
    return x509_name(
        (NameOID.COMMON_NAME, common_name), (NameOID.ORGANIZATION_NAME, organization), *more
    )


def _issue(
    profile: str,
    subject: x509.Name,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    subject_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
    san: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """One certificate of ``PROFILES[profile]``: the shared tail of every ``issue_*`` here."""
    return build_certificate(
        PROFILES[profile],
        subject=subject,
        subject_key=subject_key,
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before,
        not_after=not_after,
        san=san,
    )


def issue_root_ca(
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    organization: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """Self-signed manufacturer root (CA, pathLen 1, keyCertSign + cRLSign)."""
    key = require_p256_private_key(key)
    name = _subject(common_name, organization)
    return _issue("root_ca", name, None, key, key.public_key(), not_before, not_after)


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
    bound = whole_seconds("max_not_after", max_not_after, ProfileError)
    if whole_seconds("not_after", not_after, ProfileError) > bound:
        raise ProfileError("station CA validity exceeds its bound (max_not_after)")
    name = _subject(
        f"Factory Station CA {station_id}", organization, (NameOID.SERIAL_NUMBER, station_id.value)
    )
    return _issue("station_ca", name, issuer_cert, issuer_key, subject_key, not_before, not_after)


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
    name = _subject(
        f"Site CA {site_id}{suffix}", organization, (NameOID.SERIAL_NUMBER, site_id.value)
    )
    return _issue("site_ca", name, issuer_cert, issuer_key, subject_key, not_before, not_after)


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
    name = _subject(common_name, organization, (NameOID.ORGANIZATIONAL_UNIT_NAME, role.value))
    profile = role.value.replace("-", "_")
    return _issue(profile, name, issuer_cert, issuer_key, subject_key, not_before, not_after)


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
    name = _subject(common_name, organization)
    return _issue(
        "broker_server", name, issuer_cert, issuer_key, subject_key, not_before, not_after, names
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
    name = _subject(service_name, organization)
    profile = "service_client"
    return _issue(profile, name, issuer_cert, issuer_key, subject_key, not_before, not_after)
