"""EST (RFC 7030) as a second transport of the one registration service, without I/O.

The registrar's EST server (:mod:`registrar.est`) turns an HTTPS request into the service's
request shape and the service's signed CBOR answer back into HTTP; everything that decides
is :func:`trustcore.registration.verify_request` / :func:`trustcore.renewal.verify_renewal`,
exactly as for MQTT. This module holds what is EST-specific and pure:

* the bodies: base64 DER PKCS#10 in (:func:`decode_csr_body`), a certs-only PKCS#7
  ("CMC Simple PKI Response") out, base64 on ONE line (:func:`certs_only`): strongSwan's
  ``pki --est`` refuses line-wrapped base64 ("signerInfos length invalid");
* ``/csrattrs`` (:data:`CSR_ATTRS_DER`): P-256, ECDSA with SHA-256, a subject serialNumber;
* the answer of the service as HTTP (:func:`answer_from_response`): the issued LDevID, or a
  refusal with the RFC's status codes and the public reason (``docs/est.md`` has the table).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from trustcore import cbor
from trustcore.csr import MAX_CSR_SIZE
from trustcore.errors import EncodingError
from trustcore.registration import (
    MAX_RESPONSE_SIZE,
    REASONS,
    RegistrationError,
    open_envelope,
    public_message,
)

__all__ = [
    "CERTS_ONLY_TYPE",
    "CSR_ATTRS_DER",
    "CSR_ATTRS_TYPE",
    "EST_PREFIX",
    "MAX_BODY_SIZE",
    "EstAnswer",
    "answer_from_response",
    "certs_only",
    "decode_csr_body",
    "refusal",
]

#: Every operation lives under this path (no CA labels: one site CA per registrar).
EST_PREFIX = "/.well-known/est"
CERTS_ONLY_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CSR_ATTRS_TYPE = "application/csrattrs"
#: A base64 CSR of a P-256 key is about 600 bytes; line breaks and padding included.
MAX_BODY_SIZE = 2 * MAX_CSR_SIZE


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (definite length; contents here are far below 64 KiB)."""
    size = len(content)
    if size < 0x80:
        head = bytes([size])
    elif size < 0x100:
        head = bytes([0x81, size])
    else:
        head = bytes([0x82, size >> 8, size & 0xFF])
    return bytes([tag]) + head + content


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    out = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


#: ``CsrAttrs`` (RFC 7030 §4.5.2): the key is P-256 (``id-ecPublicKey`` with the
#: ``secp256r1`` parameter, the RFC's own example form), signed with ``ecdsa-with-SHA256``,
#: and the subject carries ``serialNumber`` (= CN = the device id, checked by the service).
CSR_ATTRS_DER = _tlv(
    0x30,
    _oid("1.2.840.10045.4.3.2")  # ecdsa-with-SHA256
    + _tlv(0x30, _oid("1.2.840.10045.2.1") + _tlv(0x31, _oid("1.2.840.10045.3.1.7")))
    + _oid("2.5.4.5"),  # serialNumber
)


def decode_csr_body(body: bytes) -> bytes:
    """The DER PKCS#10 of an EST request body: base64 (RFC 7030 §4.2.1), line breaks and
    other whitespace allowed. Raises ``RegistrationError`` (``oversized``, ``malformed``)."""
    if len(body) > MAX_BODY_SIZE:
        raise RegistrationError(f"EST body of {len(body)} bytes", reason="oversized")
    compact = b"".join(body.split())
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RegistrationError("EST body is not base64", reason="csr_malformed") from exc
    if not der:
        raise RegistrationError("EST body is empty", reason="csr_malformed")
    return der


def certs_only(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 (degenerate SignedData), DER, base64 on one line."""
    der = pkcs7.serialize_certificates(certificates, serialization.Encoding.DER)
    return base64.b64encode(der)


@dataclass(frozen=True, slots=True)
class EstAnswer:
    """An HTTP answer: status, body, content type, and ``Retry-After`` seconds (202/503)."""

    status: int
    body: bytes
    content_type: str
    retry_after: int | None = None
    #: The registration protocol's public reason of a refusal (logged, and the body's head).
    reason: str | None = None


#: Refusals by HTTP status (RFC 7030 §4.2.3: 202 + Retry-After while a person decides,
#: 4xx for a request that will not succeed as it is, 503 + Retry-After for "try later").
_STATUS: dict[str, int] = {
    "held_for_approval": 202,
    "malformed": 400,
    "unsupported_version": 400,
    "csr_malformed": 400,
    "csr_bad_signature": 400,
    "csr_wrong_name": 400,
    "csr_idevid_key": 400,
    "csr_reused_key": 400,
    "stale_request": 400,
    "replayed_nonce": 400,
    "bad_wrap_key": 400,
    "oversized": 413,
    "revocation_unavailable": 503,
    "policy_unavailable": 503,
    "busy": 503,
    "internal_error": 503,
    "too_early": 503,
}
#: ``Retry-After`` (seconds) per status that asks for one.
_RETRY_AFTER = {202: 60, 503: 30}


def refusal(reason: str) -> EstAnswer:
    """The HTTP answer to a refusal with public ``reason`` (a key of ``REASONS``; anything
    else becomes ``internal_error``): ``<reason>: <public message>`` as text. Certificate,
    identity and admission refusals are 403."""
    if reason not in REASONS:
        reason = "internal_error"
    status = _STATUS.get(reason, 403)
    text = f"{reason}: {public_message(reason)}\n".encode()
    return EstAnswer(status, text, "text/plain; charset=utf-8", _RETRY_AFTER.get(status), reason)


def answer_from_response(response: bytes) -> EstAnswer:
    """The service's signed CBOR answer (``ok`` or ``error``) as EST: the issued LDevID as
    certs-only PKCS#7, or :func:`refusal`. The bytes come from this registrar's own
    service, in process: their signature is not re-checked here."""
    try:
        _, _, body = open_envelope(response, MAX_RESPONSE_SIZE, "registration response")
        status = cbor.field(body, "status", str)
        if status == "ok":
            ldevid = x509.load_der_x509_certificate(cbor.field(body, "ldevid", bytes))
            return EstAnswer(200, certs_only([ldevid]), CERTS_ONLY_TYPE)
        return refusal(cbor.field(body, "reason", str))
    except (EncodingError, RegistrationError, ValueError) as exc:
        raise RegistrationError(
            f"the service's answer does not decode: {exc}", reason="internal_error"
        ) from exc
