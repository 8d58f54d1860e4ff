"""PKCS#10 certificate signing requests: build them, and validate the ones we receive.

A CSR proves that its sender holds the private key (its self-signature) and says which names
it wants. Issuers never copy anything from a CSR except the public key: names and extensions
come from the profile. Validation still refuses a CSR that *asks* for more than policy
allows (a CA bit, certificate signing, foreign names, unknown extensions), because such a
request is a signal of misuse that should be seen, not silently trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustcore.errors import (
    X509_PARSE_ERRORS,
    CsrError,
    EncodingError,
    InvalidValueError,
    ProfileError,
)
from trustcore.identity import DeviceId
from trustcore.keys import Signer
from trustcore.profiles import (
    OID_HARDWARE_MODULE_NAME,
    OID_HW_TYPE_DEVICE,
    decode_hardware_module_name,
    hardware_module_name,
    require_p256_public_key,
)
from trustcore.x509parse import parsed_csr

__all__ = [
    "MAX_CSR_SIZE",
    "ValidatedCsr",
    "build_csr",
    "build_device_csr",
    "check_csr",
    "load_csr",
    "validate_csr",
]

#: A P-256 CSR is about 300 bytes; 8 KiB leaves room for PEM and a SAN, and stops a hostile
#: client from making us parse megabytes.
MAX_CSR_SIZE = 8 * 1024

_ALLOWED_EKU = frozenset({ExtendedKeyUsageOID.CLIENT_AUTH})


@dataclass(frozen=True, slots=True)
class ValidatedCsr:
    """A CSR that passed :func:`validate_csr`. ``device_id`` is set when the CN is one."""

    csr: x509.CertificateSigningRequest
    public_key: ec.EllipticCurvePublicKey
    subject: x509.Name
    common_name: str
    device_id: DeviceId | None


def _private_key(key: Signer | ec.EllipticCurvePrivateKey) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    if isinstance(key, Signer):
        return key.private_key()
    raise CsrError(f"cannot sign a CSR with {type(key).__name__}")


def build_csr(key: Signer | ec.EllipticCurvePrivateKey, subject: x509.Name) -> bytes:
    """A DER CSR for ``subject`` signed by ``key`` (software, TPM-backed or any Signer)."""
    private = _private_key(key)
    try:
        require_p256_public_key(private.public_key())
    except ProfileError as exc:
        raise CsrError("CSR key must be ECDSA P-256", reason="wrong_key_type") from exc
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(private, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def build_device_csr(key: Signer | ec.EllipticCurvePrivateKey, device_id: DeviceId) -> bytes:
    """A device CSR: CN and serialNumber = device id, plus the hardwareModuleName SAN."""
    private = _private_key(key)
    try:
        require_p256_public_key(private.public_key())
    except ProfileError as exc:
        raise CsrError("CSR key must be ECDSA P-256", reason="wrong_key_type") from exc
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id.value),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id.value),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName([hardware_module_name(device_id)]), critical=False
        )
        .sign(private, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _load(data: bytes) -> x509.CertificateSigningRequest:
    if not isinstance(data, bytes | bytearray):
        raise CsrError("CSR must be bytes", reason="malformed")
    if len(data) > MAX_CSR_SIZE:
        raise CsrError(f"CSR is larger than {MAX_CSR_SIZE} bytes", reason="malformed")
    try:
        if bytes(data).lstrip().startswith(b"-----BEGIN"):
            return parsed_csr(x509.load_pem_x509_csr(bytes(data)))
        return parsed_csr(x509.load_der_x509_csr(bytes(data)))
    except X509_PARSE_ERRORS as exc:
        raise CsrError(f"CSR does not parse: {exc}", reason="malformed") from exc


def _check_extensions(csr: x509.CertificateSigningRequest, cn: str) -> None:
    try:
        extensions = list(csr.extensions)
    except X509_PARSE_ERRORS as exc:
        raise CsrError(f"CSR extensions do not parse: {exc}", reason="malformed") from exc
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints):
            if value.ca:
                raise CsrError("CSR asks for a CA certificate", reason="forbidden_extension")
        elif isinstance(value, x509.KeyUsage):
            if value.key_cert_sign or value.crl_sign:
                raise CsrError("CSR asks for certificate signing", reason="forbidden_extension")
        elif isinstance(value, x509.ExtendedKeyUsage):
            if not set(value) <= _ALLOWED_EKU:
                raise CsrError("CSR asks for a forbidden EKU", reason="forbidden_extension")
        elif isinstance(value, x509.SubjectAlternativeName):
            _check_san(value, cn)
        else:
            raise CsrError(
                f"CSR carries an unexpected extension {ext.oid.dotted_string}",
                reason="forbidden_extension",
            )


def _check_san(san: x509.SubjectAlternativeName, cn: str) -> None:
    """Only a hardwareModuleName naming the CN is acceptable in a CSR."""
    for name in san:
        if not isinstance(name, x509.OtherName) or name.type_id != OID_HARDWARE_MODULE_NAME:
            raise CsrError("CSR asks for a name other than the device id", reason="wrong_name")
        try:
            hw_type, serial = decode_hardware_module_name(name.value)
        except EncodingError as exc:
            raise CsrError("CSR hardwareModuleName is malformed", reason="malformed") from exc
        if hw_type != OID_HW_TYPE_DEVICE or serial != cn.encode("ascii", "replace"):
            raise CsrError("CSR SAN names another device", reason="wrong_name")


def validate_csr(
    data: bytes,
    *,
    expected_device_id: DeviceId | None = None,
    expected_subject: x509.Name | None = None,
    max_size: int = MAX_CSR_SIZE,
) -> ValidatedCsr:
    """Check a PEM or DER CSR: size, parse, self-signature, P-256 key and requested names.

    With ``expected_device_id`` the CN (and serialNumber, if present) must equal it; with
    ``expected_subject`` the subject must equal it exactly (station CA enrolment). Reasons:
    ``malformed``, ``bad_signature``, ``wrong_key_type``, ``wrong_name``,
    ``forbidden_extension``.
    """
    if len(data) > max_size:
        raise CsrError(f"CSR is larger than {max_size} bytes", reason="malformed")
    return check_csr(
        _load(data), expected_device_id=expected_device_id, expected_subject=expected_subject
    )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR of at most :data:`MAX_CSR_SIZE` bytes (``malformed``), for a
    caller that parses once and checks later with :func:`check_csr`."""
    return _load(data)


def check_csr(
    csr: x509.CertificateSigningRequest,
    *,
    expected_device_id: DeviceId | None = None,
    expected_subject: x509.Name | None = None,
    public_key: PublicKeyTypes | None = None,
) -> ValidatedCsr:
    """The checks of :func:`validate_csr` on a CSR already parsed by :func:`load_csr`;
    ``public_key``: the key the caller already took from this very CSR object."""
    if public_key is None:
        try:
            public_key = csr.public_key()
        except X509_PARSE_ERRORS as exc:
            raise CsrError("CSR public key is not usable", reason="wrong_key_type") from exc
    try:
        key = require_p256_public_key(public_key)
    except ProfileError as exc:
        raise CsrError("CSR key must be ECDSA P-256", reason="wrong_key_type") from exc
    try:
        # Also for a CSR parsed elsewhere: an unknown signature OID or a bad subject raises
        # here, on first access (trustcore.x509parse).
        parsed_csr(csr)
        if not isinstance(csr.signature_hash_algorithm, hashes.SHA256):
            raise CsrError("CSR must be signed with ECDSA-SHA256", reason="bad_signature")
        signature_valid = csr.is_signature_valid
    except X509_PARSE_ERRORS as exc:
        raise CsrError(f"CSR does not parse: {exc}", reason="malformed") from exc
    if not signature_valid:
        # The requester does not hold the private key of the public key it asks us to certify.
        raise CsrError("CSR signature does not verify", reason="bad_signature")
    subject = csr.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str) or not cns[0].value:
        raise CsrError("CSR subject must hold exactly one CN", reason="wrong_name")
    cn = cns[0].value
    try:
        device_id: DeviceId | None = DeviceId(cn)
    except InvalidValueError:
        device_id = None
    if expected_device_id is not None:
        if device_id != expected_device_id:
            raise CsrError(
                f"CSR CN {cn!r} is not the expected device {expected_device_id}",
                reason="wrong_name",
            )
        serials = subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        if any(attr.value != cn for attr in serials):
            raise CsrError("CSR serialNumber differs from its CN", reason="wrong_name")
    if expected_subject is not None and subject != expected_subject:
        raise CsrError("CSR subject is not the expected subject", reason="wrong_name")
    _check_extensions(csr, cn)
    return ValidatedCsr(
        csr=csr, public_key=key, subject=subject, common_name=cn, device_id=device_id
    )
