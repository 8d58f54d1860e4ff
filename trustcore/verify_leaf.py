"""Step 1 of chain verification: the end-entity checks, and loading what a client presents.

Owns :func:`check_leaf`, the leaf pre-checks :class:`trustcore.verify.ChainVerifier` runs
before any path building, each with its own ``VerificationError`` reason (``wrong_key_type``,
``untrusted`` for a self-signed leaf, ``ca_leaf``, ``not_yet_valid``, ``expired``,
``wrong_eku``, ``wrong_key_usage``, ``missing_san``, ``malformed`` device identity), and
:func:`load_certificate` (re-exported by :mod:`trustcore.verify`, where callers import it).
"""

from __future__ import annotations

import warnings
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier

from trustcore.errors import X509_PARSE_ERRORS, ProfileError, VerificationError
from trustcore.identity import SERIAL_LIMIT, DeviceId
from trustcore.profiles import (
    OID_EKU_AUDIT_RECEIVER,
    OID_EKU_ENTITLEMENT_SIGNER,
    OID_EKU_REVOCATION_SIGNER,
    OID_HARDWARE_MODULE_NAME,
    device_id_from_certificate,
)
from trustcore.x509parse import parsed_certificate

__all__ = [
    "MAX_CERTIFICATE_SIZE",
    "SAN_REQUIRED_FOR",
    "check_leaf",
    "extensions_by_oid",
    "load_certificate",
]

#: Key usage bit an end entity needs for what its EKU lets it do.
_REQUIRED_KEY_USAGE: dict[ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "digital_signature",
    ExtendedKeyUsageOID.SERVER_AUTH: "digital_signature",
    OID_EKU_ENTITLEMENT_SIGNER: "digital_signature",
    OID_EKU_REVOCATION_SIGNER: "digital_signature",
    OID_EKU_AUDIT_RECEIVER: "key_agreement",
}
#: EKUs whose certificates must carry a subjectAltName (unless the verifier says otherwise).
SAN_REQUIRED_FOR = frozenset({ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH})
#: Upper bound on certificate size accepted by :func:`load_certificate`.
MAX_CERTIFICATE_SIZE = 16 * 1024

_LOAD_ERRORS: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, CryptographyDeprecationWarning)


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse a PEM or DER certificate, refusing junk and oversized input (``malformed``)."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_CERTIFICATE_SIZE:
        raise VerificationError("certificate is not bytes or too large", reason="malformed")
    try:
        # A certificate cryptography only warns about (e.g. a negative serial) is refused.
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            if bytes(data).lstrip().startswith(b"-----BEGIN"):
                return parsed_certificate(x509.load_pem_x509_certificate(bytes(data)))
            return parsed_certificate(x509.load_der_x509_certificate(bytes(data)))
    except _LOAD_ERRORS as exc:
        raise VerificationError(f"certificate does not parse: {exc}", reason="malformed") from exc


def extensions_by_oid(cert: x509.Certificate) -> dict[ObjectIdentifier, x509.ExtensionType]:
    """Every extension value of ``cert`` by OID, in one pass (``cryptography`` refuses a
    certificate with a duplicate extension, reported as ``malformed``)."""
    try:
        return {ext.oid: ext.value for ext in cert.extensions}
    except X509_PARSE_ERRORS as exc:
        raise VerificationError(
            f"certificate extensions are malformed: {exc}", reason="malformed"
        ) from exc


def check_leaf(
    leaf: x509.Certificate,
    names: tuple[bytes, bytes],
    now: datetime,
    *,
    required_eku: ObjectIdentifier,
    require_san: bool,
    require_device_id: bool,
) -> tuple[DeviceId | None, ec.EllipticCurvePublicKey]:
    """Step 1 of :class:`trustcore.verify.ChainVerifier`: the end-entity checks, first
    failure wins (``VerificationError`` with its reason). ``names``: the leaf's (issuer,
    subject) as encoded in its TBSCertificate; ``now`` is aware UTC. Returns the device id
    (when the leaf carries a hardwareModuleName) and the leaf's P-256 key."""
    try:
        key = leaf.public_key()
    except (ValueError, TypeError) as exc:
        raise VerificationError("leaf key does not parse", reason="wrong_key_type") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VerificationError(
            f"leaf key is {type(key).__name__}"
            f"{' ' + key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else ''}"
            ", only ECDSA P-256 is accepted",
            reason="wrong_key_type",
        )
    if not 0 < leaf.serial_number < SERIAL_LIMIT:
        # RFC 5280 §4.1.2.2: positive, at most 20 octets; the store keeps it as a CertSerial.
        raise VerificationError(
            "certificate serial is not positive or too long", reason="malformed"
        )
    # A self-signed leaf vouches for itself only: say so rather than "unknown issuer".
    # (Compared as encoded: a self-signed leaf with its names encoded two ways is
    # refused as "untrusted" all the same, by the path check.)
    issuer_der, subject_der = names
    if issuer_der == subject_der:
        try:
            leaf.verify_directly_issued_by(leaf)
        except (ValueError, TypeError, InvalidSignature):
            pass
        else:
            raise VerificationError("self-signed end-entity certificate", reason="untrusted")
    exts = extensions_by_oid(leaf)
    bc = exts.get(ExtensionOID.BASIC_CONSTRAINTS)
    ku = exts.get(ExtensionOID.KEY_USAGE)
    if (isinstance(bc, x509.BasicConstraints) and bc.ca) or (
        isinstance(ku, x509.KeyUsage) and ku.key_cert_sign
    ):
        # A CA certificate as a client identity would let its holder mint more identities.
        raise VerificationError("a CA certificate is not an end-entity identity", reason="ca_leaf")
    if now < leaf.not_valid_before_utc:
        raise VerificationError(
            f"certificate is valid from {leaf.not_valid_before_utc.isoformat()}",
            reason="not_yet_valid",
        )
    if now > leaf.not_valid_after_utc:
        raise VerificationError(
            f"certificate expired at {leaf.not_valid_after_utc.isoformat()}", reason="expired"
        )
    eku = exts.get(ExtensionOID.EXTENDED_KEY_USAGE)
    # No EKU would mean "any purpose" to RFC 5280; we require the purpose to be explicit.
    if not isinstance(eku, x509.ExtendedKeyUsage) or required_eku not in eku:
        raise VerificationError(
            f"certificate lacks extended key usage {required_eku.dotted_string}",
            reason="wrong_eku",
        )
    needed = _REQUIRED_KEY_USAGE.get(required_eku)
    if needed is not None and (not isinstance(ku, x509.KeyUsage) or not getattr(ku, needed)):
        raise VerificationError(f"key usage lacks {needed}", reason="wrong_key_usage")
    san = exts.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    if require_san and not isinstance(san, x509.SubjectAlternativeName):
        raise VerificationError("certificate has no subjectAltName", reason="missing_san")
    device_id: DeviceId | None = None
    has_hw_name = isinstance(san, x509.SubjectAlternativeName) and any(
        o.type_id == OID_HARDWARE_MODULE_NAME for o in san.get_values_for_type(x509.OtherName)
    )
    if has_hw_name:
        try:
            device_id = device_id_from_certificate(leaf)
        except ProfileError as exc:
            raise VerificationError(f"device identity: {exc.message}", reason="malformed") from exc
    elif require_device_id:
        raise VerificationError("no hardwareModuleName device id", reason="missing_san")
    return device_id, key
