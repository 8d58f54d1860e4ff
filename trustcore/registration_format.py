"""The registration protocol's constants and its refusal reasons (no I/O).

The numbers every side of ``docs/registration.md`` shares (protocol version, signature
domains, size limits, freshness window) and :data:`REASONS`, the table of public refusal
reasons: what the device is told, whether it should retry and which MQTT v5 reason code
each corresponds to. :class:`RegistrationError` carries one of those reasons; its message is
internal detail for the log. :mod:`trustcore.registration` re-exports all of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from trustcore.errors import X509_PARSE_ERRORS, TrustCoreError

PROTOCOL_VERSION = 1
REQUEST_DOMAIN = "devtrust/registration-request/v1"
RESPONSE_DOMAIN = "devtrust/registration-response/v1"
KEY_UPDATE_DOMAIN = "devtrust/payload-key-update/v1"
PAYLOAD_KEY_INFO = "devtrust/payload-key/v1"
#: Largest request accepted, checked before any parsing. A real request is about 2 KiB
#: (IDevID ~700 B, station CA ~650 B, CSR ~420 B, wrap key 91 B, signature 72 B).
MAX_REQUEST_SIZE = 8 * 1024
MAX_RESPONSE_SIZE = 16 * 1024
MAX_CHAIN_LENGTH = 2
MAX_CERT_SIZE = 4 * 1024
#: |registrar time - request time| allowed; beyond it the request is ``stale_request``.
FRESHNESS_SECONDS = 300
NONCE_MIN, NONCE_MAX = 16, 64
MAX_MESSAGE_CHARS = 200
#: What ``cryptography`` may raise on hostile DER (InvalidVersion and UnsupportedAlgorithm
#: are not ValueErrors): the one tuple of :mod:`trustcore.errors`, under its protocol name.
PARSE_ERRORS = X509_PARSE_ERRORS
#: ``CsrError`` reasons -> the public refusal reason, for a registration's and a renewal's CSR
#: alike (anything else is ``csr_malformed``).
CSR_TO_PUBLIC: Mapping[str, str] = MappingProxyType(
    {
        "malformed": "csr_malformed",
        "bad_signature": "csr_bad_signature",
        "wrong_key_type": "csr_malformed",
        "wrong_name": "csr_wrong_name",
        "forbidden_extension": "csr_wrong_name",
    }
)


# ------------------------------------------------------------------------- reason table


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    """Everything one public reason code means, in one row: whether the device should
    retry (with a NEW request, after a back-off) or stop and wait for a person, the matching
    MQTT v5 reason code, the action the device takes, and the public ``message`` the device
    is sent. The internal detail of a refusal (which check failed on what) is the
    :class:`RegistrationError`'s own message, for the log only."""

    retry: bool
    mqtt_reason: int
    action: str
    message: str


_NOT_AUTHORIZED = 0x87
_BAD_FORMAT = 0x99  # payload format invalid
_TOO_LARGE = 0x95  # packet too large
_UNSPECIFIED = 0x80
_QUOTA_EXCEEDED = 0x97
_STOP = "stop: needs the installer or the manufacturer"
_BUG = "stop: device software bug"
_NEW_KEY = "stop: make a new TPM key"
_REREGISTER = "register again with the factory certificate (IDevID)"

#: Every public reason code, the one table of them (read-only). ``docs/registration.md``
#: renders it; ``tests/trustcore/test_registration.py`` checks the rendering against it.
# fmt: off
REASONS: Mapping[str, ReasonInfo] = MappingProxyType({
    # reason: ReasonInfo(retry, MQTT v5 reason code, device action,
    #                    public message)
    "malformed": ReasonInfo(False, _BAD_FORMAT, _BUG,
        "request is not a valid registration request"),
    "oversized": ReasonInfo(False, _TOO_LARGE, _BUG,
        "request is too large"),
    "unsupported_version": ReasonInfo(False, _BAD_FORMAT, "stop: update firmware",
        "protocol version not supported"),
    "device_mismatch": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "device id differs between topic, request and certificate"),
    "untrusted": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "factory certificate is not trusted here"),
    "expired": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "factory certificate (or its issuer) has expired"),
    "not_yet_valid": ReasonInfo(True, _NOT_AUTHORIZED, "retry after checking the clock",
        "factory certificate is not valid yet"),
    "revoked": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "factory certificate (or its issuer) is revoked"),
    "bad_certificate": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "factory certificate does not fit the device profile"),
    "revocation_unavailable": ReasonInfo(True, _UNSPECIFIED, "retry later (site CRL problem)",
        "revocation status cannot be checked now"),
    "bad_signature": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "request signature does not verify with the factory certificate"),
    "stale_request": ReasonInfo(True, _NOT_AUTHORIZED, "retry with current time, new nonce",
        "request time is outside the accepted window"),
    "replayed_nonce": ReasonInfo(True, _NOT_AUTHORIZED, "retry with a new nonce",
        "nonce was already used"),
    "not_in_manifest": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "device is not admitted at this site"),
    "held_for_approval": ReasonInfo(True, _NOT_AUTHORIZED,
        "wait; retry after the installer approves (`registrar approve`)",
        "device is held for the installer's approval"),
    "policy_refused": ReasonInfo(False, _NOT_AUTHORIZED, "stop: needs the installer",
        "a site admission policy refused the device"),
    "policy_unavailable": ReasonInfo(True, _UNSPECIFIED,
        "retry later (site policy plugin missing or failing: fail closed)",
        "the site admission policy cannot decide now"),
    "csr_malformed": ReasonInfo(False, _BAD_FORMAT, _BUG,
        "CSR is malformed"),
    "csr_bad_signature": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "CSR signature does not verify"),
    "csr_wrong_name": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "CSR names another subject or asks for forbidden extensions"),
    "csr_idevid_key": ReasonInfo(False, _NOT_AUTHORIZED, _NEW_KEY,
        "CSR reuses the factory key"),
    "csr_foreign_key": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "CSR key belongs to another device"),
    # LDevID renewal (trustcore.renewal): the device falls back to registering again
    # with its factory certificate (IDevID) on the registration listener.
    "ldevid_expired": ReasonInfo(False, _NOT_AUTHORIZED, _REREGISTER,
        "the secondary certificate has expired: register again"),
    "ldevid_superseded": ReasonInfo(False, _NOT_AUTHORIZED, _REREGISTER,
        "the secondary certificate was replaced: register again"),
    "ldevid_revoked": ReasonInfo(False, _NOT_AUTHORIZED, _STOP,
        "the secondary certificate is revoked"),
    "ldevid_unknown": ReasonInfo(False, _NOT_AUTHORIZED, _REREGISTER,
        "the secondary certificate is not known here: register again"),
    "too_early": ReasonInfo(True, _QUOTA_EXCEEDED, "retry after the renewal interval",
        "renewed too recently: retry later"),
    "csr_reused_key": ReasonInfo(False, _NOT_AUTHORIZED, _NEW_KEY,
        "CSR reuses the current secondary key"),
    "bad_wrap_key": ReasonInfo(False, _NOT_AUTHORIZED, _BUG,
        "wrap key is not a distinct P-256 public key"),
    "busy": ReasonInfo(True, _QUOTA_EXCEEDED, "retry later with a new request",
        "registrar is busy"),
    "internal_error": ReasonInfo(True, _UNSPECIFIED, "retry later with a new request",
        "registrar could not complete the registration"),
})
# fmt: on


class RegistrationError(TrustCoreError):
    """A registration message was refused. ``reason`` is a key of :data:`REASONS`; the
    message is internal detail for the log, :func:`public_message` is what the device sees."""

    reason = "malformed"


def public_message(reason: str) -> str:
    """What the device is told for ``reason`` (never internal detail)."""
    info = REASONS.get(reason)
    return "registration refused" if info is None else info.message
