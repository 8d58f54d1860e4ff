"""The signed envelope of the registration protocol family (no I/O).

Every message (registration request and response, payload-key update, LDevID renewal, wrap
key) travels as ``{"body": bstr, "sig": bstr}``: ``body`` is the deterministic CBOR of the
message map, ``sig`` the ECDSA-P256-SHA256 signature over ``CBOR[domain, body]``, so one
format's signature can never pass as another's and a receiver verifies the exact bytes it
decodes. This module signs, opens and checks envelopes, and assembles the fixed shapes (the
envelope itself, the signed input) without copying the body through the encoder, and reads
the envelope's one deterministic shape directly; tests/test_registration_fastpath.py
compares both with :mod:`trustcore.cbor`. :func:`open_device_request` is the common start of
every request a device signs (registration, renewal): size, envelope, version, field set,
``device_id``, ``nonce``, ``time``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.identity import DeviceId
from trustcore.keys import Signer
from trustcore.registration_format import (
    NONCE_MAX,
    NONCE_MIN,
    PROTOCOL_VERSION,
    RegistrationError,
)

# ------------------------------------------------------------------------ signed envelope


@functools.cache
def _domain_head(domain: str) -> bytes:
    return b"\x82" + cbor.encode(domain)  # array of 2, then the domain text


#: ``{"body": …, "sig": …}`` in deterministic order: "sig" (63 …) sorts before "body" (64 …).
_ENVELOPE_SIG_KEY = b"\xa2" + cbor.encode("sig")
_ENVELOPE_BODY_KEY = cbor.encode("body")


def _signed_input(domain: str, body: bytes) -> bytes:
    """``cbor.encode([domain, body])``, assembled without copying ``body`` through the
    encoder (tests/test_registration_fastpath.py compares the bytes)."""
    return _domain_head(domain) + cbor.bytes_head(len(body)) + body


def _envelope_bytes(body: bytes, sig: bytes) -> bytes:
    """``cbor.encode({"body": body, "sig": sig})``, assembled (same test)."""
    return (
        _ENVELOPE_SIG_KEY
        + cbor.bytes_head(len(sig))
        + sig
        + _ENVELOPE_BODY_KEY
        + cbor.bytes_head(len(body))
        + body
    )


def sign_envelope(domain: str, body: dict[str, Any], signer: Signer) -> bytes:
    """``{"body", "sig"}`` for ``body`` under ``domain`` (every message of this protocol
    family, including :mod:`trustcore.renewal`, uses this one envelope)."""
    return sign_encoded_envelope(domain, cbor.encode(body), signer)


def sign_encoded_envelope(domain: str, body_bytes: bytes, signer: Signer) -> bytes:
    """The envelope of an already encoded body."""
    return _envelope_bytes(body_bytes, signer.sign(_signed_input(domain, body_bytes)))


#: Signature lengths an envelope may carry (a DER ECDSA P-256 signature is 8..72 bytes).
_SIG_MIN, _SIG_MAX = 8, 80


def _byte_string_at(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """The byte string whose head is at ``pos`` and the position after it, or None unless
    that head is the shortest one for its length (RFC 8949 §4.2.1) and the string fits."""
    if pos >= len(data):
        return None
    first = data[pos]
    if 0x40 <= first <= 0x57:
        length, start = first - 0x40, pos + 1
    elif first == 0x58:
        length, start = int.from_bytes(data[pos + 1 : pos + 2], "big"), pos + 2
    elif first == 0x59:
        length, start = int.from_bytes(data[pos + 1 : pos + 3], "big"), pos + 3
    else:
        return None  # (larger heads: longer than any envelope's size limit)
    end = start + length
    if end > len(data) or data[pos:start] != cbor.bytes_head(length):
        return None
    return data[start:end], end


def _split_envelope(data: bytes, max_size: int) -> tuple[bytes, bytes] | None:
    """(body bytes, signature) when ``data`` (at most ``max_size`` bytes) is exactly the
    deterministic encoding of ``{"body": bstr, "sig": bstr}`` (what :func:`_envelope_bytes`
    writes) with a signature of an allowed length; None for anything else, which the
    general decoder then refuses with its precise reason. Reading the fixed shape directly
    gives the same answer as decoding and re-encoding the map (tests/test_registration_
    fastpath.py compares them) without copying the body through the decoder and the encoder
    twice."""
    if type(data) is not bytes or len(data) > max_size or not data.startswith(_ENVELOPE_SIG_KEY):
        return None
    sig_at = _byte_string_at(data, len(_ENVELOPE_SIG_KEY))
    if sig_at is None:
        return None
    sig, pos = sig_at
    if not _SIG_MIN <= len(sig) <= _SIG_MAX:
        return None
    if data[pos : pos + len(_ENVELOPE_BODY_KEY)] != _ENVELOPE_BODY_KEY:
        return None
    body_at = _byte_string_at(data, pos + len(_ENVELOPE_BODY_KEY))
    if body_at is None or body_at[1] != len(data):
        return None
    return body_at[0], sig


def open_envelope(data: bytes, max_size: int, what: str) -> tuple[bytes, bytes, dict[Any, Any]]:
    """Decode ``{"body", "sig"}`` and the body map; signatures are checked by the caller."""
    try:
        split = _split_envelope(data, max_size)
        if split is not None:
            body_bytes, sig = split
        else:
            outer = cbor.map_of(cbor.decode(data, max_size=max_size), what)
            cbor.expect_keys(outer, {"body", "sig"}, what=what)
            body_bytes = cbor.field(outer, "body", bytes)
            sig = cbor.field(outer, "sig", bytes)
            if not _SIG_MIN <= len(sig) <= _SIG_MAX:
                raise EncodingError(f"{what}: signature length {len(sig)}")
        body = cbor.map_of(cbor.decode(body_bytes, max_size=max_size), f"{what} body")
    except EncodingError as exc:
        reason = "oversized" if exc.reason == "oversized" else "malformed"
        raise RegistrationError(f"{what}: {exc.message}", reason=reason) from exc
    return body_bytes, sig, body


@dataclass(frozen=True, slots=True)
class OpenedRequest:
    """A device request whose envelope and common fields decoded; the signature and the
    fields of its kind are for the caller."""

    data: bytes
    body_bytes: bytes
    signature: bytes
    body: dict[Any, Any]
    device_id: DeviceId
    nonce: bytes
    time: int


def open_device_request(
    data: bytes, max_size: int, noun: str, what: str, fields: set[str]
) -> OpenedRequest:
    """Size first, then the envelope, then ``v`` (must be :data:`PROTOCOL_VERSION`), the
    exact field set ``fields``, ``device_id``, ``nonce`` and ``time``, in that order. Raises
    ``RegistrationError``: ``oversized``, ``malformed`` (``"<what>: …"``) or
    ``unsupported_version``. ``noun`` names the message in the two refusals made before it
    is decoded."""
    if not isinstance(data, bytes | bytearray):
        raise RegistrationError(f"{noun} is not bytes")
    if len(data) > max_size:
        raise RegistrationError(f"{noun} of {len(data)} bytes", reason="oversized")
    data = bytes(data)
    body_bytes, sig, body = open_envelope(data, max_size, what)
    try:
        version = cbor.field(body, "v", int)
        if version != PROTOCOL_VERSION:
            raise RegistrationError(f"version {version}", reason="unsupported_version")
        cbor.expect_keys(body, fields, what=what)
        device_id = DeviceId(cbor.field(body, "device_id", str))
        nonce = cbor.field(body, "nonce", bytes)
        if not NONCE_MIN <= len(nonce) <= NONCE_MAX:
            raise EncodingError(f"nonce must be {NONCE_MIN}..{NONCE_MAX} bytes")
        time = cbor.field(body, "time", int)
        if not 0 <= time < 2**40:
            raise EncodingError("time out of range")
    except (EncodingError, InvalidValueError) as exc:
        raise RegistrationError(f"{what}: {exc.message}") from exc
    return OpenedRequest(data, body_bytes, sig, body, device_id, nonce, time)


def envelope_signature_valid(
    public: ec.EllipticCurvePublicKey, sig: bytes, domain: str, body: bytes
) -> bool:
    try:
        public.verify(sig, _signed_input(domain, body), _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
