"""The registrar's decision on a parsed registration request (pure).

:func:`verify_request` is a function of the request, the topic it came on, a
:class:`~trustcore.verify.ChainVerifier`, the site's :class:`Admission` rule, the time, and
two facts the store looked up (was this nonce seen; which device already owns the CSR key).
It runs every check in a fixed order and refuses with a :class:`~trustcore.
registration_format.RegistrationError` whose reason is public. The site's admission plugins
(:func:`decide_admission`) run after every built-in check and can refuse or hold, never
admit.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore.csr import check_csr, validate_csr
from trustcore.errors import (
    CsrError,
    ProfileError,
    VerificationError,
)
from trustcore.identity import DeviceId, StationId
from trustcore.keys import load_canonical_p256_spki, spki_der
from trustcore.policy_chain import CHAIN_REASONS, Decision, NamedPlugin, Verdict, run_chain
from trustcore.profiles import station_id_from_certificate
from trustcore.registration_format import (
    CSR_TO_PUBLIC,
    FRESHNESS_SECONDS,
    PARSE_ERRORS,
    REQUEST_DOMAIN,
    RegistrationError,
)
from trustcore.registration_request import RegistrationRequest
from trustcore.signed_envelope import envelope_signature_valid
from trustcore.verify import ChainVerifier, VerifiedIdentity
from trustcore.x509parse import x509_warnings_ignored

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


@x509_warnings_ignored
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

    ``defer_manifest``: a device absent from the manifest is not refused here but returned
    with ``in_manifest=False``, so the site's admission plugins can see it after every other
    check passed; the caller must then run :func:`decide_admission`, which still refuses it
    unless the installer approved it. ``cryptography``'s warnings are silenced
    (:func:`~trustcore.x509parse.x509_warnings_ignored`).
    """
    if request.device_id != topic_device_id:
        raise _refuse(
            "device_mismatch", f"request names {request.device_id}, topic {topic_device_id}"
        )
    try:
        leaf = x509.load_der_x509_certificate(request.idevid_der)
        chain = verifier.load_intermediates(request.chain_der)
        identity = verifier.verify(leaf, now=now, intermediates=chain, require_device_id=True)
    except PARSE_ERRORS as exc:
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
    if not request.transport_authenticated and not envelope_signature_valid(
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
        raise _refuse(CSR_TO_PUBLIC.get(exc.reason, "csr_malformed"), exc.message) from exc
    except PARSE_ERRORS as exc:  # escape trustcore.csr (InvalidVersion, UnsupportedAlgorithm)
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
