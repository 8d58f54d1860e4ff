"""The registration protocol between a device and the site registrar, without I/O.

Messages (all deterministic CBOR, described with vectors in ``docs/registration.md``) travel
as a *signed envelope* ``{"body": bstr, "sig": bstr}``; the signature is ECDSA-P256-SHA256
over ``CBOR[domain, body]``, so one format's signature can never pass as another's, and the
receiver verifies the exact bytes it decodes (no re-encoding):

* request  (domain ``devtrust/registration-request/v1``), signed by the device FACTORY key;
* response (domain ``devtrust/registration-response/v1``), signed by the SITE CA key;
* payload-key update (domain ``devtrust/payload-key-update/v1``), signed by the site CA key.

Why the site CA key signs responses rather than a separate registrar key: the device must
already accept that key's authority for its LDevID, the site CA certificate chains to the
manufacturer root the device was given at the factory, and a second key would add one more
certificate to check and one more key to protect for no gain. Domain separation keeps the
response signatures apart from certificate and CRL signatures.

The registrar's decision is :func:`verify_request`: a pure function of the parsed request,
the topic it came on, a :class:`~trustcore.verify.ChainVerifier`, the site's
:class:`Admission` rule, the time, and two facts the store looked up (was this nonce seen;
which device already owns the CSR key). Every refusal is a :class:`RegistrationError` whose
``reason`` is one of :data:`REASONS`; the table also says whether the device should retry
and which MQTT v5 reason code the refusal corresponds to.

The protocol is split by duty; this module is its front door (everything public is
re-exported here, and callers import from here) and holds the device side of the answer:

* :mod:`trustcore.registration_format`: constants and the refusal reasons;
* :mod:`trustcore.signed_envelope`: the signed envelope every message travels in;
* :mod:`trustcore.registration_request`: building and parsing the request;
* :mod:`trustcore.registration_decision`: the registrar's decision and admission plugins;
* :mod:`trustcore.registration_issuance`: LDevID, payload-key wrap, signed answers;
* here: the device's parsing of the response and of payload-key updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.errors import (
    EncodingError,
    ProfileError,
    VerificationError,
)
from trustcore.identity import DeviceId
from trustcore.keys import spki_der
from trustcore.payload import KEY_ID_LENGTH
from trustcore.profiles import device_id_from_certificate
from trustcore.registration_decision import (
    Admission,
    AdmissionContext,
    AdmissionHeld,
    AdmissionRule,
    VerifiedRegistration,
    decide_admission,
    verify_request,
)
from trustcore.registration_format import (
    FRESHNESS_SECONDS,
    KEY_UPDATE_DOMAIN,
    MAX_CERT_SIZE,
    MAX_CHAIN_LENGTH,
    MAX_MESSAGE_CHARS,
    MAX_REQUEST_SIZE,
    MAX_RESPONSE_SIZE,
    NONCE_MAX,
    NONCE_MIN,
    PARSE_ERRORS,
    PAYLOAD_KEY_INFO,
    PROTOCOL_VERSION,
    REASONS,
    REQUEST_DOMAIN,
    RESPONSE_DOMAIN,
    ReasonInfo,
    RegistrationError,
    public_message,
)
from trustcore.registration_issuance import (
    Issued,
    WrappedKey,
    build_error_response,
    build_key_update,
    issue_ldevid,
    issue_registration,
    ok_response_body,
    open_payload_key,
    wrap_payload_key,
)
from trustcore.registration_request import (
    TLS_BOUND_DOMAIN,
    RegistrationRequest,
    build_request,
    parse_request,
    parsed_csr,
    tls_bound_request,
)
from trustcore.signed_envelope import (
    envelope_signature_valid,
    open_envelope,
    sign_encoded_envelope,
    sign_envelope,
)
from trustcore.verify import load_certificate

__all__ = [
    "FRESHNESS_SECONDS",
    "KEY_UPDATE_DOMAIN",
    "MAX_CERT_SIZE",
    "MAX_CHAIN_LENGTH",
    "MAX_MESSAGE_CHARS",
    "MAX_REQUEST_SIZE",
    "MAX_RESPONSE_SIZE",
    "NONCE_MAX",
    "NONCE_MIN",
    "PARSE_ERRORS",
    "PAYLOAD_KEY_INFO",
    "PROTOCOL_VERSION",
    "REASONS",
    "REQUEST_DOMAIN",
    "RESPONSE_DOMAIN",
    "TLS_BOUND_DOMAIN",
    "Admission",
    "AdmissionContext",
    "AdmissionHeld",
    "AdmissionRule",
    "Issued",
    "KeyUpdate",
    "ReasonInfo",
    "RegistrationDenied",
    "RegistrationError",
    "RegistrationGranted",
    "RegistrationRequest",
    "VerifiedRegistration",
    "WrappedKey",
    "build_error_response",
    "build_key_update",
    "build_request",
    "decide_admission",
    "envelope_signature_valid",
    "issue_ldevid",
    "issue_registration",
    "ok_response_body",
    "open_envelope",
    "open_payload_key",
    "parse_key_update",
    "parse_request",
    "parse_response",
    "parsed_csr",
    "public_message",
    "sign_encoded_envelope",
    "sign_envelope",
    "tls_bound_request",
    "verify_request",
    "wrap_payload_key",
]


# -------------------------------------------------------------------- device-side parsing


@dataclass(frozen=True, slots=True)
class RegistrationGranted:
    ldevid: x509.Certificate
    ldevid_der: bytes
    site_ca: x509.Certificate
    payload_key: WrappedKey


@dataclass(frozen=True, slots=True)
class RegistrationDenied:
    reason: str
    message: str
    retry: bool


def _wrapped(m: object) -> WrappedKey:
    w = cbor.map_of(m, "payload_key")
    cbor.expect_keys(w, {"key_id", "enc", "ct"}, what="payload_key")
    return WrappedKey(
        cbor.field(w, "key_id", bytes, size=KEY_ID_LENGTH),
        cbor.field(w, "enc", bytes),
        cbor.field(w, "ct", bytes),
    )


def _check_site_ca(
    der: bytes, roots: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate:
    """The site CA must be a CA certificate issued directly by a manufacturer root, valid
    now: that is what lets the device trust a registrar it has never seen."""
    try:
        ca = load_certificate(der)  # parsed completely; a deprecated encoding is refused
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (*PARSE_ERRORS, x509.ExtensionNotFound, VerificationError) as exc:
        raise RegistrationError("site CA certificate is malformed", reason="untrusted") from exc
    if not bc.ca or not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise RegistrationError("site CA is not a valid CA now", reason="untrusted")
    for root in roots:
        if root.subject != ca.issuer:
            continue
        try:
            ca.verify_directly_issued_by(root)
        except (*PARSE_ERRORS, InvalidSignature):
            continue
        return ca
    raise RegistrationError("site CA is not issued by a known root", reason="untrusted")


def parse_response(
    data: bytes,
    *,
    device_id: DeviceId,
    nonce: bytes,
    request_digest: bytes,
    ldevid_public_key: ec.EllipticCurvePublicKey,
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> RegistrationGranted | RegistrationDenied:
    """The device side: verify a response to *its* request (device id, nonce, request hash),
    signed by a site CA that a manufacturer root issued. Any failure raises
    ``RegistrationError`` and the device should keep waiting or retry: an unauthenticated
    "refused" must not make a device give up. For ``ok`` the LDevID must certify exactly the
    key the device asked for, issued by that site CA."""
    now = now.astimezone(UTC)
    body_bytes, sig, body = open_envelope(data, MAX_RESPONSE_SIZE, "registration response")
    try:
        if cbor.field(body, "v", int) != PROTOCOL_VERSION:
            raise RegistrationError("response version", reason="unsupported_version")
        status = cbor.field(body, "status", str)
        site_ca = _check_site_ca(cbor.field(body, "site_ca", bytes), roots, now)
        site_key = site_ca.public_key()
        if not isinstance(site_key, ec.EllipticCurvePublicKey) or not envelope_signature_valid(
            site_key, sig, RESPONSE_DOMAIN, body_bytes
        ):
            raise RegistrationError("response signature does not verify", reason="bad_signature")
        if (
            cbor.field(body, "device_id", str) != device_id.value
            or cbor.field(body, "nonce", bytes) != nonce
            or cbor.field(body, "request", bytes) != request_digest
        ):
            raise RegistrationError("response is for another request", reason="device_mismatch")
        if status == "error":
            cbor.expect_keys(
                body,
                {
                    "v",
                    "status",
                    "device_id",
                    "nonce",
                    "request",
                    "reason",
                    "message",
                    "retry",
                    "site_ca",
                },
                what="error response",
            )
            return RegistrationDenied(
                cbor.field(body, "reason", str)[:64],
                cbor.field(body, "message", str)[:MAX_MESSAGE_CHARS],
                cbor.field(body, "retry", bool),
            )
        if status != "ok":
            raise EncodingError(f"unknown status {status[:20]!r}")
        cbor.expect_keys(
            body,
            {"v", "status", "device_id", "nonce", "request", "ldevid", "site_ca", "payload_key"},
            what="ok response",
        )
        ldevid_der = cbor.field(body, "ldevid", bytes)
        wrapped = _wrapped(body["payload_key"])
    except EncodingError as exc:
        raise RegistrationError(f"response: {exc.message}") from exc
    try:
        ldevid = x509.load_der_x509_certificate(ldevid_der)
        ldevid.verify_directly_issued_by(site_ca)
        if device_id_from_certificate(ldevid) != device_id:
            raise RegistrationError("LDevID names another device", reason="device_mismatch")
        got = ldevid.public_key()
    except (*PARSE_ERRORS, InvalidSignature, ProfileError) as exc:
        raise RegistrationError("LDevID is not issued by the site CA", reason="untrusted") from exc
    if not isinstance(got, ec.EllipticCurvePublicKey) or spki_der(got) != spki_der(
        ldevid_public_key
    ):
        raise RegistrationError("LDevID certifies another key", reason="csr_foreign_key")
    return RegistrationGranted(ldevid, ldevid_der, site_ca, wrapped)


# ------------------------------------------------------------------ payload-key rotation


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    device_id: DeviceId
    issued: int
    payload_key: WrappedKey


def parse_key_update(
    data: bytes, *, device_id: DeviceId, site_ca: x509.Certificate, newer_than: int
) -> KeyUpdate:
    body_bytes, sig, body = open_envelope(data, MAX_RESPONSE_SIZE, "payload-key update")
    site_key = site_ca.public_key()
    if not isinstance(site_key, ec.EllipticCurvePublicKey) or not envelope_signature_valid(
        site_key, sig, KEY_UPDATE_DOMAIN, body_bytes
    ):
        raise RegistrationError("key update signature does not verify", reason="bad_signature")
    try:
        cbor.expect_keys(body, {"v", "device_id", "issued", "payload_key"}, what="key update")
        if cbor.field(body, "v", int) != PROTOCOL_VERSION:
            raise EncodingError("version")
        if cbor.field(body, "device_id", str) != device_id.value:
            raise RegistrationError("key update for another device", reason="device_mismatch")
        issued = cbor.field(body, "issued", int)
        wrapped = _wrapped(body["payload_key"])
    except EncodingError as exc:
        raise RegistrationError(f"key update: {exc.message}") from exc
    if issued <= newer_than:
        raise RegistrationError("key update is not newer than the current one", reason="replayed")
    return KeyUpdate(device_id, issued, wrapped)
