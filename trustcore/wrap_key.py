"""A device's payload-key wrap key, registered after an enrolment that had no room for it.

An MQTT registration request carries the device's ECDH wrap key (``wrap_key``), and its
answer the payload key wrapped to it. EST (RFC 7030) carries a CSR only: a device enrolled
over EST holds an LDevID but no payload key. It gets one over MQTT, on the operational
listener with that LDevID, by publishing its wrap key once on its own topic
``devices/<id>/keys/wrap`` (:data:`trustcore.topics.WRAP_KEY_LEVELS`); the registrar records
it and sends the payload key as an ordinary payload-key update on ``devices/<id>/keys`` (retained,
acknowledged on ``devices/<id>/keys/ack``, ``docs/registration.md``).

Message — domain ``devtrust/wrap-key/v1``, signed by the device's CURRENT LDevID key, in the
registration protocol's envelope: ``{v: 1, device_id, time, wrap_key (SPKI DER), ldevid
(DER)}``. The registrar does not trust the broker alone for the identity (the broker's is a
second, independent check), as for renewals.

Decision (:func:`verify_wrap_key`, fixed order, reasons of
:data:`trustcore.registration.REASONS`): device id = topic (``device_mismatch``); the LDevID
is issued by a site CA (``ldevid_unknown``) and names the device (``device_mismatch``);
signature (``bad_signature``); ``|now - time| <= 300 s`` (``stale_request``); the LDevID is
the device's current one (``ldevid_superseded`` / ``ldevid_unknown``) and valid now
(``ldevid_expired``); the wrap key is a canonical P-256 SPKI other than the LDevID key
(``bad_wrap_key``). Set once: a device that has a wrap key keeps it (a stolen LDevID key
cannot redirect the payload key); the same key again is accepted (a retry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.errors import X509_PARSE_ERRORS, EncodingError, InvalidValueError, ProfileError
from trustcore.identity import DeviceId
from trustcore.keys import Signer, load_canonical_p256_spki, spki_der
from trustcore.profiles import device_id_from_certificate
from trustcore.registration import (
    FRESHNESS_SECONDS,
    MAX_CERT_SIZE,
    PROTOCOL_VERSION,
    RegistrationError,
    envelope_signature_valid,
    open_envelope,
    sign_envelope,
)
from trustcore.renewal import issued_by
from trustcore.utctime import to_unix
from trustcore.x509parse import x509_warnings_ignored

__all__ = [
    "MAX_WRAP_KEY_SIZE",
    "WRAP_KEY_DOMAIN",
    "WrapKeyRegistration",
    "build_wrap_key_registration",
    "parse_wrap_key_registration",
    "verify_wrap_key",
    "wrap_key_body",
]

WRAP_KEY_DOMAIN = "devtrust/wrap-key/v1"
#: A real message is about 0.8 KiB (LDevID ~600 B, SPKI 91 B, signature 72 B).
MAX_WRAP_KEY_SIZE = 2 * 1024
_FIELDS = {"v", "device_id", "time", "wrap_key", "ldevid"}
_UNUSABLE: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, ProfileError)


@dataclass(frozen=True, slots=True)
class WrapKeyRegistration:
    device_id: DeviceId
    time: int
    wrap_key_der: bytes
    ldevid_der: bytes
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def build_wrap_key_registration(
    *,
    device_id: DeviceId,
    time: int,
    wrap_key: ec.EllipticCurvePublicKey,
    ldevid_der: bytes,
    ldevid_key: Signer,
) -> bytes:
    """The device side: signed by its current LDevID key (in its TPM)."""
    body = wrap_key_body(device_id, time, spki_der(wrap_key), ldevid_der)
    return sign_envelope(WRAP_KEY_DOMAIN, body, ldevid_key)


def wrap_key_body(
    device_id: DeviceId, time: int, wrap_key_der: bytes, ldevid_der: bytes
) -> dict[str, object]:
    """The signed body (``docs/formats.md``, "Wrap key after an EST enrolment")."""
    return {
        "v": PROTOCOL_VERSION,
        "device_id": device_id.value,
        "time": time,
        "wrap_key": wrap_key_der,
        "ldevid": ldevid_der,
    }


def parse_wrap_key_registration(data: bytes) -> WrapKeyRegistration:
    """Strict decode (size first, exact fields). ``RegistrationError`` (``oversized``,
    ``malformed``, ``unsupported_version``)."""
    if len(data) > MAX_WRAP_KEY_SIZE:
        raise RegistrationError(f"wrap-key message of {len(data)} bytes", reason="oversized")
    body_bytes, sig, body = open_envelope(bytes(data), MAX_WRAP_KEY_SIZE, "wrap-key message")
    try:
        if cbor.field(body, "v", int) != PROTOCOL_VERSION:
            raise RegistrationError("wrap-key message version", reason="unsupported_version")
        cbor.expect_keys(body, _FIELDS, what="wrap-key message")
        device_id = DeviceId(cbor.field(body, "device_id", str))
        time = cbor.field(body, "time", int)
        wrap_key = cbor.field(body, "wrap_key", bytes)
        ldevid = cbor.field(body, "ldevid", bytes)
        if not 0 <= time < 2**40 or len(wrap_key) > 256 or not 0 < len(ldevid) <= MAX_CERT_SIZE:
            raise EncodingError("a field is out of range")
    except (EncodingError, InvalidValueError) as exc:
        raise RegistrationError(f"wrap-key message: {exc}") from exc
    return WrapKeyRegistration(device_id, time, wrap_key, ldevid, body_bytes, sig)


def _refuse(reason: str, detail: str) -> RegistrationError:
    return RegistrationError(detail, reason=reason)


@x509_warnings_ignored
def verify_wrap_key(
    message: WrapKeyRegistration,
    *,
    topic_device_id: DeviceId,
    site_cas: Sequence[x509.Certificate],
    current_serial: int | None,
    now: datetime,
) -> ec.EllipticCurvePublicKey:
    """The wrap key to record (see the module docstring for the checks and their order).
    ``current_serial``: the device's current LDevID serial in the store (None: unknown)."""
    device = message.device_id
    if device != topic_device_id:
        raise _refuse("device_mismatch", f"message names {device}, topic {topic_device_id}")
    try:
        ldevid = x509.load_der_x509_certificate(message.ldevid_der)
        issued = issued_by(ldevid, site_cas)
        named = device_id_from_certificate(ldevid) if issued else None
    except _UNUSABLE as exc:
        raise _refuse("ldevid_unknown", f"LDevID does not parse or names no device: {exc}") from exc
    if not issued:
        raise _refuse("ldevid_unknown", "LDevID is not issued by this site's CA")
    if named != device:
        raise _refuse("device_mismatch", f"LDevID names {named}, message {device}")
    public = ldevid.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not envelope_signature_valid(
        public, message.signature, WRAP_KEY_DOMAIN, message.body
    ):
        raise _refuse("bad_signature", "wrap-key message does not verify with the LDevID")
    now_s = to_unix(now)
    if abs(now_s - message.time) > FRESHNESS_SECONDS:
        raise _refuse("stale_request", f"message time {message.time}, registrar time {now_s}")
    if current_serial is None:
        raise _refuse("ldevid_unknown", f"{device} is not registered here")
    if ldevid.serial_number != current_serial:
        raise _refuse("ldevid_superseded", f"LDevID {ldevid.serial_number:x} is not current")
    if not ldevid.not_valid_before_utc <= now <= ldevid.not_valid_after_utc:
        raise _refuse("ldevid_expired", f"LDevID {ldevid.serial_number:x} is not valid now")
    wrap = load_canonical_p256_spki(message.wrap_key_der)
    if wrap is None or message.wrap_key_der == spki_der(public):
        raise _refuse("bad_wrap_key", "wrap key is not a separate canonical P-256 key")
    return wrap
