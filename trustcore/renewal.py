"""LDevID renewal between a device and the site registrar, without I/O.

A registered device renews its secondary certificate (LDevID) over MQTT on the OPERATIONAL
listener, before it expires, with a CSR for a NEW key made in its TPM. The request travels in
the registration protocol's signed envelope (``trustcore.registration``):

* request (domain ``devtrust/renewal-request/v1``), signed by the device's CURRENT LDevID
  key: the registrar does not trust the broker alone for the identity (broker identity =
  certificate CN = device id is a second, independent check);
* response: exactly a registration response (domain ``devtrust/registration-response/v1``,
  signed by the site CA key, bound to the SHA-256 of the request bytes), so the device
  verifies it with :func:`trustcore.registration.parse_response` and the registrar issues
  through the one :func:`trustcore.registration.issue_ldevid`. The payload key is wrapped to
  the device's registered ECDH key (unchanged by a renewal).

The decision is :func:`verify_renewal`: a pure function of the parsed request, the site's
issuing CA certificates, what the store knows about the device (:class:`RenewalFacts`), the
time and the site's :class:`LdevidPolicy`. Refusals are ``RegistrationError`` with a reason
of :data:`trustcore.registration.REASONS`.

Why a renewal before ``renew_from`` is *allowed* (rate-limited by ``min_interval``) rather
than refused: a site CA rollover moves devices at their next renewal or "all at once", and a
device that suspects its key needs a new one now; a hard "not before 2/3 of the life" rule
would block both. The rate limit bounds what a stolen current key can do (no certificate
churn); each renewal supersedes the previous certificate, so a thief who renews locks out
only the certificate it stole, and the real device comes back with its IDevID
(re-registration), which supersedes the thief's.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.csr import MAX_CSR_SIZE, validate_csr
from trustcore.errors import (
    X509_PARSE_ERRORS,
    CsrError,
    EncodingError,
    InvalidValueError,
    ProfileError,
)
from trustcore.identity import DeviceId
from trustcore.keys import Signer, key_id, spki_der
from trustcore.profiles import device_id_from_certificate, require_p256_public_key
from trustcore.registration import (
    FRESHNESS_SECONDS,
    MAX_CERT_SIZE,
    PROTOCOL_VERSION,
    RegistrationError,
    envelope_signature_valid,
    sign_envelope,
)
from trustcore.registration_format import CSR_TO_PUBLIC
from trustcore.signed_envelope import open_device_request
from trustcore.utctime import to_unix
from trustcore.x509parse import parsed_certificate, x509_warnings_ignored

__all__ = [
    "MAX_RENEWAL_SIZE",
    "RENEWAL_REQUEST_DOMAIN",
    "LdevidPolicy",
    "RenewalFacts",
    "RenewalRequest",
    "VerifiedRenewal",
    "build_renewal_request",
    "issued_by",
    "parse_renewal_request",
    "renew_from",
    "renewal_due",
    "tls_bound_renewal",
    "verify_renewal",
]

RENEWAL_REQUEST_DOMAIN = "devtrust/renewal-request/v1"
#: A real renewal request is about 1.3 KiB (LDevID ~600 B, CSR ~420 B, signature 72 B).
MAX_RENEWAL_SIZE = 4 * 1024
_FIELDS = {"v", "device_id", "nonce", "time", "csr", "ldevid"}
_UNUSABLE_CSR: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, ProfileError)
_NOT_ISSUED: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, InvalidSignature)


# ------------------------------------------------------------------------------- policy


ExpiredReregistration = Literal["allow", "approval"]


@dataclass(frozen=True, slots=True)
class LdevidPolicy:
    """The site's LDevID life cycle (``SITE/ldevid.json``, ``registrar ldevid-policy``).

    * ``validity`` of a new LDevID (capped by the issuing CA's notAfter);
    * ``renew_from``: the fraction of its life after which a device renews (devices read it
      from their own configuration; the registrar reports it and uses it for status);
    * ``min_interval``: the registrar refuses (``too_early``, retry) a renewal of a
      certificate issued less than this ago;
    * ``handover_seconds``: after a renewal or re-registration answer, how long the device
      has to reconnect with the new certificate before a live session still using the old
      one is cut;
    * ``supersede_window_seconds``: the LDevIDs that renewals supersede go on the site CRL
      (a re-signed CRL and a broker reload) at most once per this window: the first
      renewal after a quiet window does it before its answer leaves, later ones join the
      next batch and are answered at once (0: every renewal before its answer). Each
      reload costs Mosquitto memory for as long as a connection made after it lives
      (``docs/broker.md``, "Reloads and Mosquitto's memory"); re-registrations and
      revocations never wait;
    * ``expired_reregistration``: a device whose LDevID expired (e.g. switched off for
      longer than its life) re-registers with its IDevID: ``allow`` (default) or
      ``approval`` (held for ``registrar approve``, like an unlisted device).
    """

    validity: timedelta = timedelta(days=365)
    renew_from: float = 2 / 3
    min_interval: timedelta = timedelta(hours=1)
    handover_seconds: float = 10.0
    supersede_window_seconds: float = 60.0
    expired_reregistration: ExpiredReregistration = "allow"

    def __post_init__(self) -> None:
        if not timedelta(minutes=10) <= self.validity <= timedelta(days=3650):
            raise InvalidValueError("LDevID validity must be 10 minutes to 10 years")
        if not 0.0 < self.renew_from < 1.0:
            raise InvalidValueError("renew_from must be a fraction strictly between 0 and 1")
        if not timedelta(0) <= self.min_interval <= self.validity / 2:
            raise InvalidValueError("min_interval must be 0 to half the validity")
        if not 0.0 <= self.handover_seconds <= 3600.0:
            raise InvalidValueError("handover_seconds must be 0 to 3600")
        if not 0.0 <= self.supersede_window_seconds <= 3600.0:
            raise InvalidValueError("supersede_window_seconds must be 0 to 3600")
        if self.expired_reregistration not in ("allow", "approval"):
            raise InvalidValueError("expired_reregistration must be 'allow' or 'approval'")


def renew_from(certificate: x509.Certificate, fraction: float) -> datetime:
    """The moment from which a device renews ``certificate`` (``fraction`` of its life)."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) * fraction


def renewal_due(certificate: x509.Certificate, now: datetime, fraction: float = 2 / 3) -> bool:
    return now >= renew_from(certificate, fraction)


# ------------------------------------------------------------------------------ request


@dataclass(frozen=True, slots=True)
class RenewalRequest:
    """A decoded (not yet verified) renewal request; ``digest`` = SHA-256 of the exact
    bytes (the idempotency key, shared with registration requests)."""

    device_id: DeviceId
    nonce: bytes
    time: int
    csr_der: bytes
    ldevid_der: bytes
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    csr_key_id: bytes | None = field(repr=False, default=None)
    #: True only for :func:`tls_bound_renewal` (EST ``simplereenroll``: the current LDevID is
    #: the TLS peer certificate, the handshake proved its key): no envelope signature.
    transport_authenticated: bool = field(repr=False, default=False)


#: Domain of the idempotency key of a transport-authenticated renewal (EST).
TLS_BOUND_RENEWAL_DOMAIN = "devtrust/est-simplereenroll/v1"


def tls_bound_renewal(
    *, device_id: DeviceId, ldevid_der: bytes, csr_der: bytes, nonce: bytes, time: int
) -> RenewalRequest:
    """A renewal whose sender a transport authenticated with its current LDevID (EST
    ``simplereenroll`` over mutual TLS): ``ldevid_der`` MUST be the TLS peer certificate.
    :func:`verify_renewal` runs every check except the envelope signature."""
    if len(csr_der) > MAX_CSR_SIZE or not 0 < len(ldevid_der) <= MAX_CERT_SIZE:
        raise RegistrationError("EST request: CSR or certificate too large", reason="oversized")
    return RenewalRequest(
        device_id=device_id,
        nonce=nonce,
        time=time,
        csr_der=csr_der,
        ldevid_der=ldevid_der,
        body=b"",
        signature=b"",
        digest=hashlib.sha256(
            cbor.encode([TLS_BOUND_RENEWAL_DOMAIN, ldevid_der, csr_der])
        ).digest(),
        csr_key_id=_csr_key_id(csr_der),
        transport_authenticated=True,
    )


def _csr_key_id(csr: bytes) -> bytes | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return key_id(require_p256_public_key(x509.load_der_x509_csr(csr).public_key()))
    except _UNUSABLE_CSR:
        return None  # refused by verify_renewal with the precise CSR reason


def build_renewal_request(
    *,
    device_id: DeviceId,
    nonce: bytes,
    time: int,
    csr_der: bytes,
    ldevid_der: bytes,
    ldevid_key: Signer,
) -> bytes:
    """The device side: signed by the CURRENT LDevID key (in the TPM); ``csr_der`` is
    signed by the NEW key."""
    body = {
        "v": PROTOCOL_VERSION,
        "device_id": device_id.value,
        "nonce": nonce,
        "time": time,
        "csr": csr_der,
        "ldevid": ldevid_der,
    }
    return sign_envelope(RENEWAL_REQUEST_DOMAIN, body, ldevid_key)


def parse_renewal_request(data: bytes) -> RenewalRequest:
    """Strict decode (size first; exact field set; types; lengths). ``RegistrationError``
    ``oversized`` / ``malformed`` / ``unsupported_version``."""
    opened = open_device_request(
        data, MAX_RENEWAL_SIZE, "renewal request", "renewal request", _FIELDS
    )
    body = opened.body
    try:
        csr = cbor.field(body, "csr", bytes)
        ldevid = cbor.field(body, "ldevid", bytes)
        if len(csr) > MAX_CSR_SIZE or not 0 < len(ldevid) <= MAX_CERT_SIZE:
            raise EncodingError("a field is too long")
    except (EncodingError, InvalidValueError) as exc:
        raise RegistrationError(f"renewal request: {exc.message}") from exc
    csr_key = _csr_key_id(csr)
    return RenewalRequest(
        device_id=opened.device_id,
        nonce=opened.nonce,
        time=opened.time,
        csr_der=csr,
        ldevid_der=ldevid,
        body=opened.body_bytes,
        signature=opened.signature,
        digest=hashlib.sha256(opened.data).digest(),
        csr_key_id=csr_key,
    )


# ----------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class RenewalFacts:
    """What the registrar's store says about the device, looked up before the decision.

    ``current_serial`` None: the device is not registered here. ``superseded_serials``:
    its earlier LDevIDs. ``issued_at``: when the current LDevID was issued."""

    current_serial: int | None
    status: str
    superseded_serials: frozenset[int]
    issued_at: datetime | None
    nonce_seen: bool
    key_owner: DeviceId | None


@dataclass(frozen=True, slots=True)
class VerifiedRenewal:
    request: RenewalRequest
    current: x509.Certificate
    new_public_key: ec.EllipticCurvePublicKey
    new_key_id: bytes


def _refuse(reason: str, detail: str) -> RegistrationError:
    return RegistrationError(detail, reason=reason)


def issued_by(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    """True if one of ``cas`` signed ``cert`` (name and signature; no other check)."""
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except _NOT_ISSUED:
            continue
        return True
    return False


@x509_warnings_ignored
def verify_renewal(
    request: RenewalRequest,
    *,
    topic_device_id: DeviceId,
    site_cas: Sequence[x509.Certificate],
    facts: RenewalFacts,
    now: datetime,
    policy: LdevidPolicy,
) -> VerifiedRenewal:
    """The registrar's decision, in a fixed order (the first failure is the reason):

    1. device id in the request == id in the topic (``device_mismatch``);
    2. the presented LDevID parses and is issued by one of ``site_cas`` (``ldevid_unknown``)
       and names the device (``device_mismatch``);
    3. request signature by that LDevID's key (``bad_signature``): from here on the sender
       holds the certificate's key;
    4. freshness and nonce (``stale_request``, ``replayed_nonce``);
    5. the store: the device is registered (``ldevid_unknown``), not revoked
       (``ldevid_revoked``), and this is its CURRENT certificate (``ldevid_superseded`` for
       an earlier one, ``ldevid_unknown`` otherwise);
    6. validity now (``ldevid_expired``: register again with the IDevID; ``not_yet_valid``);
    7. rate limit: the current certificate is at least ``policy.min_interval`` old
       (``too_early``, retry later) — unless it comes from a retiring site CA (not
       ``site_cas[0]``, the issuing one): a site CA rollover moves it at once, and it can
       happen only once per certificate (the new one is from the issuing CA);
    8. CSR: parses, self-signature, P-256, names the device (``csr_*``); a key never
       certified before, for any device (``csr_reused_key`` for its own, ``csr_foreign_key``
       for another's).
    """
    device = request.device_id
    if device != topic_device_id:
        raise _refuse("device_mismatch", f"request names {device}, topic {topic_device_id}")
    try:
        # parsed completely here: a bad issuer or key must not raise in _issued_by
        current = parsed_certificate(x509.load_der_x509_certificate(request.ldevid_der))
    except X509_PARSE_ERRORS as exc:
        raise _refuse("ldevid_unknown", f"LDevID does not parse: {exc}") from exc
    if not issued_by(current, site_cas):
        raise _refuse("ldevid_unknown", "LDevID is not issued by this site's CA")
    try:
        named = device_id_from_certificate(current)
    except ProfileError as exc:
        raise _refuse("ldevid_unknown", f"LDevID names no device: {exc.message}") from exc
    if named != device:
        raise _refuse("device_mismatch", f"LDevID names {named}, request {device}")
    public = current.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise _refuse("bad_signature", "the LDevID key is not an EC key")
    # EST (tls_bound_renewal): the TLS handshake proved possession of this LDevID's key.
    if not request.transport_authenticated and not envelope_signature_valid(
        public, request.signature, RENEWAL_REQUEST_DOMAIN, request.body
    ):
        raise _refuse("bad_signature", "renewal request signature does not verify with the LDevID")
    now_s = to_unix(now)
    if abs(now_s - request.time) > FRESHNESS_SECONDS:
        raise _refuse("stale_request", f"request time {request.time}, registrar time {now_s}")
    if facts.nonce_seen:
        raise _refuse("replayed_nonce", f"nonce {request.nonce.hex()} already used")
    serial = current.serial_number
    if facts.current_serial is None:
        raise _refuse("ldevid_unknown", f"{device} is not registered here")
    if facts.status == "revoked":
        raise _refuse("ldevid_revoked", f"{device} is revoked")
    if serial != facts.current_serial:
        if serial in facts.superseded_serials:
            raise _refuse("ldevid_superseded", f"LDevID {serial:x} of {device} was superseded")
        raise _refuse("ldevid_unknown", f"LDevID {serial:x} is not {device}'s current one")
    if now > current.not_valid_after_utc:
        raise _refuse("ldevid_expired", f"LDevID {serial:x} expired {current.not_valid_after_utc}")
    if now < current.not_valid_before_utc:
        raise _refuse("not_yet_valid", f"LDevID {serial:x} not valid before its notBefore")
    if (
        facts.issued_at is not None
        and now - facts.issued_at < policy.min_interval
        and issued_by(current, site_cas[:1])  # a retiring CA's LDevID moves at once
    ):
        raise _refuse(
            "too_early",
            f"LDevID {serial:x} issued {facts.issued_at}, minimum interval {policy.min_interval}",
        )
    try:
        csr = validate_csr(request.csr_der, expected_device_id=device)
    except CsrError as exc:
        raise _refuse(CSR_TO_PUBLIC.get(exc.reason, "csr_malformed"), exc.message) from exc
    except X509_PARSE_ERRORS as exc:  # hostile DER escaping trustcore.csr
        raise _refuse("csr_malformed", f"CSR does not parse: {exc}") from exc
    new_id = key_id(csr.public_key)
    if spki_der(csr.public_key) == spki_der(public):
        raise _refuse("csr_reused_key", "CSR key is the current LDevID key")
    if facts.key_owner is not None:
        reason = "csr_reused_key" if facts.key_owner == device else "csr_foreign_key"
        raise _refuse(reason, f"CSR key already certified for {facts.key_owner}")
    if request.csr_key_id is not None and request.csr_key_id != new_id:
        raise _refuse("csr_malformed", "CSR key id changed between parse and verify")
    return VerifiedRenewal(request, current, csr.public_key, new_id)
