"""The registration request: built by the device, parsed strictly by the registrar.

:func:`build_request` is the device side (signed by the factory key); :func:`parse_request`
decodes the bytes a broker delivered (size first, deterministic CBOR, exact field set) and
parses the CSR once; :func:`tls_bound_request` makes the same request for a transport that
authenticated the IDevID holder itself (EST over mutual TLS). Nothing here decides: that is
:func:`trustcore.registration_decision.verify_request`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import MAX_CSR_SIZE
from trustcore.errors import (
    EncodingError,
    InvalidValueError,
    ProfileError,
)
from trustcore.identity import DeviceId
from trustcore.keys import Signer, spki_der
from trustcore.profiles import require_p256_public_key
from trustcore.registration_format import (
    MAX_CERT_SIZE,
    MAX_CHAIN_LENGTH,
    MAX_REQUEST_SIZE,
    PARSE_ERRORS,
    PROTOCOL_VERSION,
    REQUEST_DOMAIN,
    RegistrationError,
)
from trustcore.signed_envelope import (
    open_device_request,
    sign_envelope,
)

# -------------------------------------------------------------------------------- request


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """A decoded (not yet verified) request. ``digest`` = SHA-256 of the exact bytes received:
    the idempotency key. ``csr_key_id`` (``key_id`` of the CSR's key, ``None`` if the CSR
    does not parse) lets the store look up the key's owner before the decision."""

    device_id: DeviceId
    nonce: bytes
    time: int
    csr_der: bytes
    wrap_key_der: bytes
    idevid_der: bytes
    chain_der: tuple[bytes, ...]
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    csr_key_id: bytes | None = field(repr=False, default=None)
    #: The CSR as parsed once here (None if it does not parse as DER), and its SPKI:
    #: :func:`verify_request` checks this object rather than parsing the bytes again.
    csr: x509.CertificateSigningRequest | None = field(repr=False, compare=False, default=None)
    csr_key: ec.EllipticCurvePublicKey | None = field(repr=False, compare=False, default=None)
    csr_spki: bytes | None = field(repr=False, compare=False, default=None)
    #: True only for a request made by a transport that authenticated the holder of the
    #: IDevID key itself (:func:`tls_bound_request`: EST over mutual TLS, the IDevID is the
    #: TLS peer certificate): there is no envelope signature to check, the handshake was
    #: the proof of possession. Never set by :func:`parse_request` (bytes from a broker).
    transport_authenticated: bool = field(repr=False, default=False)


def build_request(
    *,
    device_id: DeviceId,
    nonce: bytes,
    time: int,
    csr_der: bytes,
    wrap_key: ec.EllipticCurvePublicKey,
    idevid_der: bytes,
    chain_der: Sequence[bytes],
    factory_key: Signer,
) -> bytes:
    """The device side: a request signed by the factory (IDevID) key, e.g. in the TPM."""
    body = {
        "v": PROTOCOL_VERSION,
        "device_id": device_id.value,
        "nonce": nonce,
        "time": time,
        "csr": csr_der,
        "wrap_key": spki_der(wrap_key),
        "idevid": idevid_der,
        "chain": list(chain_der),
    }
    return sign_envelope(REQUEST_DOMAIN, body, factory_key)


_REQUEST_FIELDS = {"v", "device_id", "nonce", "time", "csr", "wrap_key", "idevid", "chain"}


def parse_request(data: bytes) -> RegistrationRequest:
    """Decode a request strictly (size first, deterministic CBOR, exact field set, types,
    lengths). Raises ``RegistrationError`` (``oversized``, ``malformed``,
    ``unsupported_version``)."""
    opened = open_device_request(
        data, MAX_REQUEST_SIZE, "request", "registration request", _REQUEST_FIELDS
    )
    body = opened.body
    try:
        csr = cbor.field(body, "csr", bytes)
        wrap_key = cbor.field(body, "wrap_key", bytes)
        idevid = cbor.field(body, "idevid", bytes)
        chain = cbor.field(body, "chain", list)
        if len(csr) > MAX_CSR_SIZE or len(wrap_key) > 256 or len(idevid) > MAX_CERT_SIZE:
            raise EncodingError("a field is too long")
        if len(chain) > MAX_CHAIN_LENGTH or not all(
            isinstance(c, bytes) and 0 < len(c) <= MAX_CERT_SIZE for c in chain
        ):
            raise EncodingError(f"chain must be at most {MAX_CHAIN_LENGTH} DER certificates")
    except (EncodingError, InvalidValueError) as exc:
        raise RegistrationError(f"registration request: {exc.message}") from exc
    csr_object, csr_public, csr_spki, csr_key = parsed_csr(csr)
    return RegistrationRequest(
        device_id=opened.device_id,
        nonce=opened.nonce,
        time=opened.time,
        csr_der=csr,
        wrap_key_der=wrap_key,
        idevid_der=idevid,
        chain_der=tuple(chain),
        body=opened.body_bytes,
        signature=opened.signature,
        digest=hashlib.sha256(opened.data).digest(),
        csr_key_id=csr_key,
        csr=csr_object,
        csr_key=csr_public,
        csr_spki=csr_spki,
    )


def parsed_csr(
    csr_der: bytes,
) -> tuple[
    x509.CertificateSigningRequest | None,
    ec.EllipticCurvePublicKey | None,
    bytes | None,
    bytes | None,
]:
    """The CSR parsed once (object, P-256 key, SPKI, key id), or four Nones if it does not
    parse: :func:`verify_request` then refuses it with the precise ``csr_*`` reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csr_object = x509.load_der_x509_csr(csr_der)
            csr_public = require_p256_public_key(csr_object.public_key())
            csr_spki = spki_der(csr_public)
    except (*PARSE_ERRORS, ProfileError):
        return None, None, None, None
    return csr_object, csr_public, csr_spki, hashlib.sha256(csr_spki).digest()  # = keys.key_id


#: Domain of the idempotency key of a transport-authenticated registration (EST).
TLS_BOUND_DOMAIN = "devtrust/est-simpleenroll/v1"


def tls_bound_request(
    *,
    device_id: DeviceId,
    idevid_der: bytes,
    csr_der: bytes,
    chain_der: Sequence[bytes],
    nonce: bytes,
    time: int,
) -> RegistrationRequest:
    """A registration request whose sender a transport authenticated (EST ``simpleenroll``
    over mutual TLS): ``idevid_der`` MUST be the certificate the TLS peer proved it holds the
    key of, ``device_id`` the id that certificate names (the "topic" of this transport).
    :func:`verify_request` runs every check of a signed request on it except the envelope
    signature (the handshake replaced it); freshness and nonce are the transport's (a fresh
    handshake; ``nonce`` made by the server). No wrap key: the payload key is not part of
    an EST answer (``docs/est.md``). ``digest`` (the idempotency key) covers the IDevID and
    the CSR: the same CSR sent again by the same device gets the stored certificate."""
    if len(csr_der) > MAX_CSR_SIZE or not 0 < len(idevid_der) <= MAX_CERT_SIZE:
        raise RegistrationError("EST request: CSR or certificate too large", reason="oversized")
    if len(chain_der) > MAX_CHAIN_LENGTH:
        raise RegistrationError(f"chain must be at most {MAX_CHAIN_LENGTH} certificates")
    csr_object, csr_public, csr_spki, csr_key = parsed_csr(csr_der)
    return RegistrationRequest(
        device_id=device_id,
        nonce=nonce,
        time=time,
        csr_der=csr_der,
        wrap_key_der=b"",
        idevid_der=idevid_der,
        chain_der=tuple(chain_der),
        body=b"",
        signature=b"",
        digest=hashlib.sha256(cbor.encode([TLS_BOUND_DOMAIN, idevid_der, csr_der])).digest(),
        csr_key_id=csr_key,
        csr=csr_object,
        csr_key=csr_public,
        csr_spki=csr_spki,
        transport_authenticated=True,
    )
