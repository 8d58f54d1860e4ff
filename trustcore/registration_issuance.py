"""What the registrar sends a registered device (site side, pure): the LDevID issued by
the site CA, the payload key sealed (HPKE) to the device's ECDH wrap key, the signed ``ok``
answer or signed refusal, and payload-key updates. The device's unwrapping of the payload
key (:func:`open_payload_key`) sits beside its wrapping so the two ``info`` bindings cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.errors import (
    ProfileError,
    SealedPackageError,
)
from trustcore.hpke import open_, seal
from trustcore.identity import DeviceId
from trustcore.keys import KeyAgreement, Signer
from trustcore.payload import PayloadKey
from trustcore.profiles import issue_secondary_certificate
from trustcore.registration_decision import VerifiedRegistration
from trustcore.registration_format import (
    KEY_UPDATE_DOMAIN,
    PAYLOAD_KEY_INFO,
    PROTOCOL_VERSION,
    REASONS,
    RESPONSE_DOMAIN,
    RegistrationError,
    public_message,
)
from trustcore.signed_envelope import (
    sign_encoded_envelope,
    sign_envelope,
)

# ------------------------------------------------------------------------------ issuance


def _payload_key_info(device_id: str, kid: bytes) -> bytes:
    return cbor.encode([PAYLOAD_KEY_INFO, device_id, kid])


def wrap_payload_key(
    payload_key: PayloadKey, device_id: DeviceId, wrap_key: ec.EllipticCurvePublicKey
) -> dict[str, bytes]:
    """HPKE-seal the payload key to the device's TPM ECDH key; ``info`` binds device + key id
    so a wrapped key cannot be presented to another device or as another key id."""
    enc, ct = seal(
        wrap_key,
        payload_key.key,
        info=_payload_key_info(device_id.value, payload_key.key_id),
        aad=b"",
    )
    return {"key_id": payload_key.key_id, "enc": enc, "ct": ct}


def open_payload_key(
    wrap_key: KeyAgreement, device_id: DeviceId, wrapped: WrappedKey
) -> PayloadKey:
    """The device side: unwrap with its TPM ECDH key (``decrypt_failed`` on any defect)."""
    try:
        key = open_(
            wrap_key,
            wrapped.enc,
            wrapped.ct,
            info=_payload_key_info(device_id.value, wrapped.key_id),
            aad=b"",
        )
    except SealedPackageError as exc:
        raise RegistrationError("payload key does not unwrap", reason="decrypt_failed") from exc
    return PayloadKey(wrapped.key_id, key)


@dataclass(frozen=True, slots=True)
class Issued:
    """What the registrar records and sends: the signed response and the new certificate."""

    response: bytes
    ldevid: x509.Certificate
    ldevid_der: bytes
    payload_key_id: bytes


def issue_registration(
    verified: VerifiedRegistration,
    *,
    site_ca: x509.Certificate,
    site_ca_der: bytes,
    site_signer: Signer,
    organization: str,
    payload_key: PayloadKey,
    now: datetime,
    validity: timedelta = timedelta(days=365),
) -> Issued:
    """Issue the LDevID (site CA), wrap the payload key, sign the ``ok`` response."""
    return issue_ldevid(
        device_id=verified.request.device_id,
        nonce=verified.request.nonce,
        request_digest=verified.request.digest,
        ldevid_public_key=verified.ldevid_public_key,
        wrap_public_key=verified.wrap_public_key,
        site_ca=site_ca,
        site_ca_der=site_ca_der,
        site_signer=site_signer,
        organization=organization,
        payload_key=payload_key,
        now=now,
        validity=validity,
    )


def issue_ldevid(
    *,
    device_id: DeviceId,
    nonce: bytes,
    request_digest: bytes,
    ldevid_public_key: ec.EllipticCurvePublicKey,
    wrap_public_key: ec.EllipticCurvePublicKey | None,
    site_ca: x509.Certificate,
    site_ca_der: bytes,
    site_signer: Signer,
    organization: str,
    payload_key: PayloadKey,
    now: datetime,
    validity: timedelta = timedelta(days=365),
) -> Issued:
    """The one issuance of an LDevID, for registration and renewal alike: certificate
    (validity ``now - 5 min ... min(now + validity, site CA notAfter)``), payload key
    wrapped to the device's ECDH key, signed ``ok`` response bound to the request. A device
    without a wrap key (enrolled over EST) gets an ``ok`` answer without ``payload_key``."""
    start = max(now - timedelta(minutes=5), site_ca.not_valid_before_utc)
    end = min(now + validity, site_ca.not_valid_after_utc)
    try:
        ldevid = issue_secondary_certificate(
            site_ca,
            site_signer.private_key(),
            ldevid_public_key,
            device_id=device_id,
            organization=organization,
            not_before=start,
            not_after=end,
        )
    except ProfileError as exc:
        raise RegistrationError(
            f"LDevID issuance failed: {exc.message}", reason="internal_error"
        ) from exc
    ldevid_der = ldevid.public_bytes(serialization.Encoding.DER)
    return Issued(
        response=sign_encoded_envelope(
            RESPONSE_DOMAIN,
            ok_response_body(
                device_id=device_id,
                nonce=nonce,
                request_digest=request_digest,
                ldevid_der=ldevid_der,
                site_ca_der=site_ca_der,
                payload_key=payload_key,
                wrap_public_key=wrap_public_key,
            ),
            site_signer,
        ),
        ldevid=ldevid,
        ldevid_der=ldevid_der,
        payload_key_id=payload_key.key_id,
    )


def ok_response_body(
    *,
    device_id: DeviceId,
    nonce: bytes,
    request_digest: bytes,
    ldevid_der: bytes,
    site_ca_der: bytes,
    payload_key: PayloadKey,
    wrap_public_key: ec.EllipticCurvePublicKey | None,
) -> bytes:
    """The encoded body of an ``ok`` response: ``v``, ``status``, ``device_id``, ``nonce``,
    ``request`` (the request's digest), ``ldevid``, ``site_ca`` and, for a device with a
    wrap key, ``payload_key`` (``key_id``, ``enc``, ``ct``: the payload key sealed to it)."""
    body: dict[str, object] = {
        "v": PROTOCOL_VERSION,
        "status": "ok",
        "device_id": device_id.value,
        "nonce": nonce,
        "request": request_digest,
        "ldevid": ldevid_der,
        "site_ca": site_ca_der,
    }
    if wrap_public_key is not None:
        body["payload_key"] = wrap_payload_key(payload_key, device_id, wrap_public_key)
    return cbor.encode(body)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    key_id: bytes
    enc: bytes
    ct: bytes


def build_error_response(
    *,
    device_id: DeviceId,
    nonce: bytes,
    request_digest: bytes,
    reason: str,
    site_ca_der: bytes,
    site_signer: Signer,
) -> bytes:
    """A signed refusal: public reason, public message and retry advice from :data:`REASONS`
    (an unknown reason becomes ``internal_error``: never leak an internal code)."""
    if reason not in REASONS:
        reason = "internal_error"
    body = {
        "v": PROTOCOL_VERSION,
        "status": "error",
        "device_id": device_id.value,
        "nonce": nonce,
        "request": request_digest,
        "reason": reason,
        "message": public_message(reason),
        "retry": REASONS[reason].retry,
        "site_ca": site_ca_der,
    }
    return sign_envelope(RESPONSE_DOMAIN, body, site_signer)


def build_key_update(
    *,
    device_id: DeviceId,
    wrap_key: ec.EllipticCurvePublicKey,
    payload_key: PayloadKey,
    issued: int,
    site_signer: Signer,
) -> bytes:
    """A new payload key for one registered device, wrapped to its ECDH key and signed by
    the site CA. ``issued`` (unix s) only grows: the device refuses an older update, so a
    replayed update cannot roll it back to a retired key."""
    body = {
        "v": PROTOCOL_VERSION,
        "device_id": device_id.value,
        "issued": issued,
        "payload_key": wrap_payload_key(payload_key, device_id, wrap_key),
    }
    return sign_envelope(KEY_UPDATE_DOMAIN, body, site_signer)
