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
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import MAX_CSR_SIZE, check_csr, validate_csr
from trustcore.errors import (
    CsrError,
    EncodingError,
    InvalidValueError,
    ProfileError,
    SealedPackageError,
    TrustCoreError,
    VerificationError,
)
from trustcore.hpke import open_, seal
from trustcore.identity import DeviceId, StationId
from trustcore.keys import KeyAgreement, Signer, load_canonical_p256_spki, spki_der
from trustcore.payload import KEY_ID_LENGTH, PayloadKey
from trustcore.policy_chain import CHAIN_REASONS, Decision, NamedPlugin, Verdict, run_chain
from trustcore.profiles import (
    device_id_from_certificate,
    issue_secondary_certificate,
    require_p256_public_key,
    station_id_from_certificate,
)
from trustcore.verify import ChainVerifier, VerifiedIdentity, load_certificate

__all__ = [
    "FRESHNESS_SECONDS",
    "MAX_REQUEST_SIZE",
    "MAX_RESPONSE_SIZE",
    "PROTOCOL_VERSION",
    "REASONS",
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
    "sign_envelope",
    "tls_bound_request",
    "verify_request",
    "wrap_payload_key",
]

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
#: What ``cryptography`` may raise on hostile DER: InvalidVersion and UnsupportedAlgorithm
#: are not ValueErrors.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
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
#: renders it; ``tests/test_registration.py`` checks the rendering against it.
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

#: ChainVerifier reasons -> public reason (finer certificate defects collapse into one code:
#: the device's action is the same, and the log keeps the detail).
_VERIFY_TO_PUBLIC = {
    "untrusted": "untrusted",
    "expired": "expired",
    "not_yet_valid": "not_yet_valid",
    "revoked": "revoked",
    "crl_missing": "revocation_unavailable",
    "crl_stale": "revocation_unavailable",
}

_CSR_TO_PUBLIC = {
    "malformed": "csr_malformed",
    "bad_signature": "csr_bad_signature",
    "wrong_key_type": "csr_malformed",
    "wrong_name": "csr_wrong_name",
    "forbidden_extension": "csr_wrong_name",
}


class RegistrationError(TrustCoreError):
    """A registration message was refused. ``reason`` is a key of :data:`REASONS`; the
    message is internal detail for the log, :func:`public_message` is what the device sees."""

    reason = "malformed"


def public_message(reason: str) -> str:
    """What the device is told for ``reason`` (never internal detail)."""
    info = REASONS.get(reason)
    return "registration refused" if info is None else info.message


# ------------------------------------------------------------------------ signed envelope


def sign_envelope(domain: str, body: dict[str, Any], signer: Signer) -> bytes:
    """``{"body", "sig"}`` for ``body`` under ``domain`` (every message of this protocol
    family, including :mod:`trustcore.renewal`, uses this one envelope)."""
    return _envelope(domain, body, signer)


def open_envelope(data: bytes, max_size: int, what: str) -> tuple[bytes, bytes, dict[Any, Any]]:
    """Decode an envelope: (body bytes, signature, body map). Signatures are the caller's
    job (:func:`envelope_signature_valid`). Raises ``RegistrationError``."""
    return _open_envelope(data, max_size, what)


def envelope_signature_valid(
    public: ec.EllipticCurvePublicKey, sig: bytes, domain: str, body: bytes
) -> bool:
    return _verify_sig(public, sig, domain, body)


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


def _envelope(domain: str, body: dict[str, Any], signer: Signer) -> bytes:
    return _signed_envelope(domain, cbor.encode(body), signer)


def _signed_envelope(domain: str, body_bytes: bytes, signer: Signer) -> bytes:
    """The envelope of an already encoded body."""
    return _envelope_bytes(body_bytes, signer.sign(_signed_input(domain, body_bytes)))


@functools.cache
def _text_key(key: str) -> bytes:
    return cbor.encode(key)


def _byte_string(value: bytes) -> bytes:
    """``cbor.encode(value)`` for ``bytes``."""
    return cbor.bytes_head(len(value)) + value


def _text_keyed_map(fields: Sequence[tuple[str, bytes]]) -> bytes:
    """``cbor.encode`` of a map with (fewer than 24) text keys whose values are given
    already encoded: the keys sorted by their encodings (RFC 8949 §4.2.1). For the fixed
    shape of an ``ok`` response, whose large byte strings (LDevID, site CA) then go through
    no encoder; tests/test_registration_fastpath.py compares it with :func:`cbor.encode`."""
    items = sorted((_text_key(key), value) for key, value in fields)
    return bytes((0xA0 | len(items),)) + b"".join(key + value for key, value in items)


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


def _open_envelope(data: bytes, max_size: int, what: str) -> tuple[bytes, bytes, dict[Any, Any]]:
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


def _verify_sig(public: ec.EllipticCurvePublicKey, sig: bytes, domain: str, body: bytes) -> bool:
    try:
        public.verify(sig, _signed_input(domain, body), _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


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
    return _envelope(REQUEST_DOMAIN, body, factory_key)


_REQUEST_FIELDS = {"v", "device_id", "nonce", "time", "csr", "wrap_key", "idevid", "chain"}


def parse_request(data: bytes) -> RegistrationRequest:
    """Decode a request strictly (size first, deterministic CBOR, exact field set, types,
    lengths). Raises ``RegistrationError`` (``oversized``, ``malformed``,
    ``unsupported_version``)."""
    if not isinstance(data, bytes | bytearray):
        raise RegistrationError("request is not bytes")
    if len(data) > MAX_REQUEST_SIZE:
        raise RegistrationError(f"request of {len(data)} bytes", reason="oversized")
    data = bytes(data)
    body_bytes, sig, body = _open_envelope(data, MAX_REQUEST_SIZE, "registration request")
    try:
        version = cbor.field(body, "v", int)
        if version != PROTOCOL_VERSION:
            raise RegistrationError(f"version {version}", reason="unsupported_version")
        cbor.expect_keys(body, _REQUEST_FIELDS, what="registration request")
        device_id = DeviceId(cbor.field(body, "device_id", str))
        nonce = cbor.field(body, "nonce", bytes)
        if not NONCE_MIN <= len(nonce) <= NONCE_MAX:
            raise EncodingError(f"nonce must be {NONCE_MIN}..{NONCE_MAX} bytes")
        time = cbor.field(body, "time", int)
        if not 0 <= time < 2**40:
            raise EncodingError("time out of range")
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
        device_id=device_id,
        nonce=nonce,
        time=time,
        csr_der=csr,
        wrap_key_der=wrap_key,
        idevid_der=idevid,
        chain_der=tuple(chain),
        body=body_bytes,
        signature=sig,
        digest=hashlib.sha256(data).digest(),
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
    except (*_PARSE_ERRORS, ProfileError):
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


# ------------------------------------------------------------------------------ admission


@dataclass(frozen=True, slots=True)
class AdmissionRule:
    """Admit any device made by ``station`` whose id starts with ``id_prefix``. Products map
    to device-id ranges in the entitlements (``DeviceIdRule`` prefix), so a prefix rule is how
    "any device of product P from station S" is written. A rule needs a station: a rule
    matching every station would admit anything any station CA ever signs."""

    station: StationId
    id_prefix: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    """The site manifest: devices listed by id, plus rules. Empty admits nothing."""

    devices: frozenset[DeviceId] = frozenset()
    rules: tuple[AdmissionRule, ...] = ()

    def admits(self, device_id: DeviceId, station: StationId | None) -> bool:
        if device_id in self.devices:
            return True
        return station is not None and any(
            r.station == station and device_id.value.startswith(r.id_prefix) for r in self.rules
        )


# ----------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class VerifiedRegistration:
    """A request that passed every check; what issuance needs."""

    request: RegistrationRequest
    identity: VerifiedIdentity
    station_id: StationId | None
    ldevid_public_key: ec.EllipticCurvePublicKey
    ldevid_key_id: bytes
    #: None only for a transport-authenticated (EST) request: no payload key in its answer.
    wrap_public_key: ec.EllipticCurvePublicKey | None
    #: In the site manifest. False only with ``defer_manifest``: then the admission plugins
    #: and :func:`decide_admission` must still decide (never issue on this alone).
    in_manifest: bool = True


@functools.lru_cache(maxsize=256)
def _station_of(ca: x509.Certificate) -> StationId | None:
    """The station id of the CA that issued an IDevID (None: not a station CA's name); a
    site sees few station CAs and every registration asks."""
    try:
        return station_id_from_certificate(ca)
    except ProfileError:
        return None


def _refuse(reason: str, detail: str) -> RegistrationError:
    return RegistrationError(detail, reason=reason)


def verify_request(
    request: RegistrationRequest,
    *,
    topic_device_id: DeviceId,
    verifier: ChainVerifier,
    admission: Admission,
    now: datetime,
    nonce_seen: bool,
    key_owner: DeviceId | None,
    defer_manifest: bool = False,
) -> VerifiedRegistration:
    """See :func:`_verify_request` for the checks. ``defer_manifest``: a device absent from
    the manifest is not refused here but returned with ``in_manifest=False``, so the site's
    admission plugins can see it after every other check passed; the caller must then run
    :func:`decide_admission`, which still refuses it unless the installer approved it.
    ``cryptography`` emits warnings (not errors) for some odd encodings (e.g. a 10-letter
    country name); for hostile input they are noise, the checks decide, so they are
    silenced here rather than printed per request."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _verify_request(
            request,
            topic_device_id=topic_device_id,
            verifier=verifier,
            admission=admission,
            now=now,
            nonce_seen=nonce_seen,
            key_owner=key_owner,
            defer_manifest=defer_manifest,
        )


def _verify_request(
    request: RegistrationRequest,
    *,
    topic_device_id: DeviceId,
    verifier: ChainVerifier,
    admission: Admission,
    now: datetime,
    nonce_seen: bool,
    key_owner: DeviceId | None,
    defer_manifest: bool = False,
) -> VerifiedRegistration:
    """The registrar's decision, in a fixed order (the first failure decides the reason):

    1. device id in the request == id in the topic (``device_mismatch``);
    2. IDevID chain to the root through the station CA, with CRLs (verifier reasons mapped
       by ``_VERIFY_TO_PUBLIC``; other certificate defects are ``bad_certificate``);
    3. device id in the certificate == request device id (``device_mismatch``);
    4. request signature by the IDevID key (``bad_signature``): from here on the request is
       known to come from the device, so the following answers reveal nothing to a forger;
    5. freshness ``|now - time| <= 300 s`` (``stale_request``) and nonce unseen
       (``replayed_nonce``);
    6. admission by the site manifest (``not_in_manifest``);
    7. CSR: parses, self-signature (a CSR for a key the device does not hold fails here),
       P-256, CN/serialNumber/SAN = device id (``csr_*``); its key is not the IDevID key
       (``csr_idevid_key``) nor another device's certified key (``csr_foreign_key``);
    8. wrap key: a P-256 SPKI distinct from the IDevID and CSR keys (``bad_wrap_key``).
    """
    if request.device_id != topic_device_id:
        raise _refuse(
            "device_mismatch", f"request names {request.device_id}, topic {topic_device_id}"
        )
    try:
        leaf = x509.load_der_x509_certificate(request.idevid_der)
        chain = verifier.load_intermediates(request.chain_der)
        identity = verifier.verify(leaf, now=now, intermediates=chain, require_device_id=True)
    except _PARSE_ERRORS as exc:
        raise _refuse("untrusted", f"a certificate does not parse: {exc}") from exc
    except VerificationError as exc:
        raise _refuse(_VERIFY_TO_PUBLIC.get(exc.reason, "bad_certificate"), exc.message) from exc
    if identity.device_id != request.device_id:
        raise _refuse(
            "device_mismatch",
            f"certificate names {identity.device_id}, request {request.device_id}",
        )
    idevid_key = identity.leaf_key or identity.leaf.public_key()
    if not isinstance(idevid_key, ec.EllipticCurvePublicKey):
        raise _refuse("bad_signature", "the IDevID key is not an EC key")
    # A transport-authenticated request (EST, tls_bound_request): the TLS handshake proved
    # possession of this very key; every other request carries the envelope signature.
    if not request.transport_authenticated and not _verify_sig(
        idevid_key, request.signature, REQUEST_DOMAIN, request.body
    ):
        raise _refuse("bad_signature", "request signature does not verify with the IDevID key")
    now_s = int(now.timestamp())
    if abs(now_s - request.time) > FRESHNESS_SECONDS:
        raise _refuse("stale_request", f"request time {request.time}, registrar time {now_s}")
    if nonce_seen:
        raise _refuse("replayed_nonce", f"nonce {request.nonce.hex()} already used")
    station = _station_of(identity.issuer)
    in_manifest = admission.admits(request.device_id, station)
    if not in_manifest and not defer_manifest:
        raise _refuse("not_in_manifest", f"{request.device_id} (station {station}) not admitted")
    try:
        if request.csr is not None:
            csr = check_csr(
                request.csr, expected_device_id=request.device_id, public_key=request.csr_key
            )
        else:
            csr = validate_csr(request.csr_der, expected_device_id=request.device_id)
    except CsrError as exc:
        raise _refuse(_CSR_TO_PUBLIC.get(exc.reason, "csr_malformed"), exc.message) from exc
    except _PARSE_ERRORS as exc:  # escape trustcore.csr (InvalidVersion, UnsupportedAlgorithm)
        raise _refuse("csr_malformed", f"CSR does not parse: {exc}") from exc
    if request.csr is csr.csr and request.csr_spki is not None:
        csr_spki = request.csr_spki  # the SPKI of this very CSR object, taken at parse time
    else:
        csr_spki = spki_der(csr.public_key)
    idevid_spki = spki_der(idevid_key)
    if csr_spki == idevid_spki:
        raise _refuse("csr_idevid_key", "CSR key is the IDevID key")
    ldevid_key_id = hashlib.sha256(csr_spki).digest()  # = keys.key_id(csr.public_key)
    if key_owner is not None and key_owner != request.device_id:
        raise _refuse("csr_foreign_key", f"CSR key already certified for {key_owner}")
    # Fail closed: the key-owner look-up was made with request.csr_key_id; a CSR that
    # parsed only now (e.g. PEM) was never looked up.
    if request.csr_key_id != ldevid_key_id:
        raise _refuse("csr_malformed", "CSR key id changed between parse and verify")
    wrap: ec.EllipticCurvePublicKey | None = None
    if not (request.transport_authenticated and request.wrap_key_der == b""):
        wrap = load_canonical_p256_spki(request.wrap_key_der)
        if wrap is None:
            raise _refuse("bad_wrap_key", "wrap key is not a canonical P-256 SPKI")
        if request.wrap_key_der in (csr_spki, idevid_spki):
            raise _refuse("bad_wrap_key", "wrap key must be a separate ECDH key")
    return VerifiedRegistration(
        request=request,
        identity=identity,
        station_id=station,
        ldevid_public_key=csr.public_key,
        ldevid_key_id=ldevid_key_id,
        wrap_public_key=wrap,
        in_manifest=in_manifest,
    )


# ------------------------------------------------------------------- admission plugins


@dataclass(frozen=True, slots=True)
class AdmissionContext:
    """What a site admission plugin sees: a request that passed every built-in check
    (chain, revocation, signature, freshness, nonce, CSR, wrap key), whether the manifest
    lists it, and whether the installer approved it (a held device, approved later)."""

    device_id: DeviceId
    station_id: StationId | None
    idevid_serial: str
    in_manifest: bool
    approved: bool
    now: datetime

    @property
    def admitted(self) -> bool:
        return self.in_manifest or self.approved

    @classmethod
    def of(cls, verified: VerifiedRegistration, *, approved: bool, now: datetime) -> Self:
        return cls(
            device_id=verified.request.device_id,
            station_id=verified.station_id,
            idevid_serial=format(verified.identity.leaf.serial_number, "x"),
            in_manifest=verified.in_manifest,
            approved=approved,
            now=now,
        )


class AdmissionHeld(RegistrationError):
    """A plugin held the device for a person (``held_for_approval``); ``decision`` says
    which plugin and why, for the pending-approval record."""

    reason = "held_for_approval"

    def __init__(self, message: str, decision: Decision) -> None:
        super().__init__(message)
        self.decision = decision


def decide_admission(
    plugins: Sequence[NamedPlugin[AdmissionContext]], context: AdmissionContext
) -> None:
    """Run the site's admission plugins (:func:`trustcore.policy_chain.run_chain`, fail
    closed) and raise :class:`RegistrationError` unless the device may register.

    Plugins can refuse (``policy_refused``; a broken, silent or missing plugin or an empty
    chain: ``policy_unavailable``) or hold (``held_for_approval``) but never admit: a device
    neither in the manifest nor approved by the installer is still ``not_in_manifest`` when
    every plugin allows it."""
    decision = run_chain(plugins, context)
    detail = f"plugin {decision.plugin or '(none)'}: {decision.reason}: {decision.message}"
    if decision.verdict is Verdict.REFUSE:
        public = "policy_unavailable" if decision.reason in CHAIN_REASONS else "policy_refused"
        raise _refuse(public, detail)
    if decision.verdict is Verdict.HOLD:
        raise AdmissionHeld(detail, decision)
    if not context.admitted:
        raise _refuse(
            "not_in_manifest",
            f"{context.device_id} (station {context.station_id}) not admitted nor approved",
        )


# ------------------------------------------------------------------------------ issuance


def _payload_key_info(device_id: str, kid: bytes) -> bytes:
    """``cbor.encode([PAYLOAD_KEY_INFO, device_id, kid])``, assembled."""
    return _PAYLOAD_KEY_INFO_HEAD + cbor.encode(device_id) + _byte_string(kid)


_PAYLOAD_KEY_INFO_HEAD = cbor.array_head(3) + cbor.encode(PAYLOAD_KEY_INFO)


def wrap_payload_key(
    payload_key: PayloadKey, device_id: DeviceId, wrap_key: ec.EllipticCurvePublicKey
) -> dict[str, bytes]:
    """HPKE-seal the payload key to the device's TPM ECDH key; ``info`` binds device + key id
    so a wrapped key cannot be presented to another device or as another key id."""
    enc, ct = _sealed_payload_key(payload_key, device_id, wrap_key)
    return {"key_id": payload_key.key_id, "enc": enc, "ct": ct}


def _sealed_payload_key(
    payload_key: PayloadKey, device_id: DeviceId, wrap_key: ec.EllipticCurvePublicKey
) -> tuple[bytes, bytes]:
    return seal(
        wrap_key,
        payload_key.key,
        info=_payload_key_info(device_id.value, payload_key.key_id),
        aad=b"",
    )


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
        response=_signed_envelope(
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


_VERSION_VALUE = cbor.encode(PROTOCOL_VERSION)
_OK_VALUE = cbor.encode("ok")


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
    fields = [
        ("v", _VERSION_VALUE),
        ("status", _OK_VALUE),
        ("device_id", cbor.encode(device_id.value)),
        ("nonce", _byte_string(nonce)),
        ("request", _byte_string(request_digest)),
        ("ldevid", _byte_string(ldevid_der)),
        ("site_ca", _byte_string(site_ca_der)),
    ]
    if wrap_public_key is not None:
        enc, ct = _sealed_payload_key(payload_key, device_id, wrap_public_key)
        sealed = (("key_id", payload_key.key_id), ("enc", enc), ("ct", ct))
        fields.append(("payload_key", _text_keyed_map([(k, _byte_string(v)) for k, v in sealed])))
    return _text_keyed_map(fields)


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
    return _envelope(RESPONSE_DOMAIN, body, site_signer)


# -------------------------------------------------------------------- device-side parsing


@dataclass(frozen=True, slots=True)
class WrappedKey:
    key_id: bytes
    enc: bytes
    ct: bytes


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
    except (*_PARSE_ERRORS, x509.ExtensionNotFound, VerificationError) as exc:
        raise RegistrationError("site CA certificate is malformed", reason="untrusted") from exc
    if not bc.ca or not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise RegistrationError("site CA is not a valid CA now", reason="untrusted")
    for root in roots:
        if root.subject != ca.issuer:
            continue
        try:
            ca.verify_directly_issued_by(root)
        except (*_PARSE_ERRORS, InvalidSignature):
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
    body_bytes, sig, body = _open_envelope(data, MAX_RESPONSE_SIZE, "registration response")
    try:
        if cbor.field(body, "v", int) != PROTOCOL_VERSION:
            raise RegistrationError("response version", reason="unsupported_version")
        status = cbor.field(body, "status", str)
        site_ca = _check_site_ca(cbor.field(body, "site_ca", bytes), roots, now)
        site_key = site_ca.public_key()
        if not isinstance(site_key, ec.EllipticCurvePublicKey) or not _verify_sig(
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
    except (*_PARSE_ERRORS, InvalidSignature, ProfileError) as exc:
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
    return _envelope(KEY_UPDATE_DOMAIN, body, site_signer)


def parse_key_update(
    data: bytes, *, device_id: DeviceId, site_ca: x509.Certificate, newer_than: int
) -> KeyUpdate:
    body_bytes, sig, body = _open_envelope(data, MAX_RESPONSE_SIZE, "payload-key update")
    site_key = site_ca.public_key()
    if not isinstance(site_key, ec.EllipticCurvePublicKey) or not _verify_sig(
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
