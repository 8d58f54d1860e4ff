"""The registration service: one request in, one signed response out.

:class:`RegistrationService` is broker-agnostic: ``handle(topic_device_id, payload)`` returns
the response bytes to publish on the device's response topic. It is driven directly by the
tests (no broker) and, in production, by ``registrar run`` (:mod:`registrar.app`) through
the site channel (:mod:`registrar.channel`). The request is parsed and its chain verified
here only, once: a caller that needs the verified factory certificate (``registrar
report``'s sightings) passes ``seen`` and gets a :class:`FactorySighting`.

Per request, in order:

1. parse (size-limited, strict); junk gets a signed ``malformed``/``oversized`` refusal;
2. idempotency: the SHA-256 of the exact request bytes is looked up; a stored response is
   returned as is (a retry of a request that succeeded), and an identical request already
   being processed waits for that one's answer (no duplicate issuance, no duplicate rows);
3. one store round trip gives "nonce seen" and "owner of the CSR key"; requests still in
   the group-commit queue are covered by in-memory reservations;
4. the pure decision :func:`trustcore.registration.verify_request`;
5. issuance (LDevID, payload key wrapped to the device's ECDH key, signed response);
6. durable record (group commit), THEN the response is returned. Refusals are logged with
   their internal detail; the device only gets the public reason code and message.

Re-registration of an already registered device (new nonce, new CSR) is allowed: the device
may have lost its LDevID or been reset. The new LDevID replaces the old one, whose serial is
recorded in ``superseded`` for the site CRL, and an event is written. The CSR key may be the
device's own previous key (a retry after a lost response) but never another device's key.
A device whose LDevID has expired re-registers the same way; the site's
:class:`~trustcore.renewal.LdevidPolicy` may require the installer's approval for that
(``expired_reregistration = "approval"``: held like an unlisted device, ``registrar approve``).

LDevID renewal (:meth:`RegistrationService.handle_renewal`, ``trustcore.renewal``) runs
through the same pipeline: parse, idempotency by request digest (same bytes, same answer, no
second certificate), one store look-up, the pure decision, the one issuance
(:func:`trustcore.registration.issue_ldevid` with :meth:`RegistrationService.issuing_authority`),
the durable record, then the answer. Whenever a certificate replaces another (renewal or
re-registration), ``on_superseded`` is awaited after the commit and BEFORE the answer is
returned: the registrar puts the old serial on the site CRL and reloads the broker there, so
the old certificate is refused at connect from the moment the new one exists -- except a
renewal within the LDevID policy's ``supersede_window_seconds`` of the last such CRL, whose
old serial joins the next batch (at most one CRL and broker reload per window,
:mod:`registrar.supersede`).

What both paths share (state, configuration, deduplication, reservations, refusals) is
:class:`registrar.service_pipeline.ServicePipeline`, the base class of the service.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registrar.errors import StoreError
from registrar.service_pipeline import ANSWERED, ServicePipeline, SiteAuthority
from registrar.store import DeviceRecord, Lookup, Registration
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.registration import (
    AdmissionContext,
    AdmissionHeld,
    Issued,
    RegistrationError,
    RegistrationRequest,
    VerifiedRegistration,
    decide_admission,
    issue_ldevid,
    parse_request,
    verify_request,
)
from trustcore.renewal import (
    RenewalFacts,
    RenewalRequest,
    parse_renewal_request,
    verify_renewal,
)

__all__ = [
    "ANSWERED",
    "FactorySighting",
    "RegistrationService",
    "SightingSink",
    "SiteAuthority",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FactorySighting:
    """A factory certificate whose chain the service verified while serving a request: the
    evidence ``registrar report`` sends to HQ (station, serial in hex, device, DER, and the
    moment on the service's clock). Made from the one verification of the request."""

    station_id: str
    serial: str
    device_id: DeviceId
    der: bytes
    at: datetime


#: Receives the sighting of a request whose factory certificate verified (see ``handle``).
SightingSink = Callable[[FactorySighting], None]


class RegistrationService(ServicePipeline):
    """Handles registration requests. One instance per registrar process; all state that
    must survive is in the :class:`~registrar.store.Store`."""

    # -- the request path ------------------------------------------------------------------

    async def handle(
        self, topic_device_id: DeviceId, payload: bytes, *, seen: SightingSink | None = None
    ) -> bytes:
        """The response to publish on ``topic_device_id``'s response topic. ``seen`` is
        called with the :class:`FactorySighting` of a request whose factory certificate
        verified (before the answer is returned; not for a retry answered from the store)."""
        try:
            request = parse_request(payload)
        except RegistrationError as exc:
            return self._refusal(topic_device_id, b"", hashlib.sha256(payload).digest(), exc)
        return await self.handle_request(topic_device_id, request, seen=seen)

    async def handle_request(
        self,
        topic_device_id: DeviceId,
        request: RegistrationRequest,
        *,
        seen: SightingSink | None = None,
    ) -> bytes:
        """The one registration path of every transport, from the parsed request on: MQTT
        and AMQP through :meth:`handle` (bytes signed by the factory key), EST through
        :func:`trustcore.registration.tls_bound_request` (the TLS peer's factory
        certificate; :mod:`registrar.est`). ``topic_device_id`` is the identity the
        transport names (topic, or the TLS peer certificate)."""
        digest = request.digest
        if request.device_id != topic_device_id:
            # Before the idempotency shortcuts: a stored (or in-flight) answer is keyed by the
            # request bytes only and must never be handed out on another device's topic.
            return self._refusal(
                topic_device_id,
                request.nonce,
                digest,
                RegistrationError(
                    f"request names {request.device_id}, topic {topic_device_id}",
                    reason="device_mismatch",
                ),
                request=request,
            )
        return await self._deduplicated(
            topic_device_id, request, lambda: self._process(topic_device_id, request, seen)
        )

    async def handle_renewal(self, topic_device_id: DeviceId, payload: bytes) -> bytes:
        """The answer to a renewal request received on ``devices/<id>/renewal/request``."""
        try:
            request = parse_renewal_request(payload)
        except RegistrationError as exc:
            return self._refusal(topic_device_id, b"", hashlib.sha256(payload).digest(), exc)
        return await self.handle_renewal_request(topic_device_id, request)

    async def handle_renewal_request(
        self, topic_device_id: DeviceId, request: RenewalRequest
    ) -> bytes:
        """The one renewal path of every transport from the parsed request on (MQTT through
        :meth:`handle_renewal`, EST ``simplereenroll`` through
        :func:`trustcore.renewal.tls_bound_renewal`)."""
        if request.device_id != topic_device_id:
            return self._refusal(
                topic_device_id,
                request.nonce,
                request.digest,
                RegistrationError(
                    f"request names {request.device_id}, topic {topic_device_id}",
                    reason="device_mismatch",
                ),
                request=request,
            )
        return await self._deduplicated(
            topic_device_id, request, lambda: self._process_renewal(request)
        )

    async def _process(
        self,
        topic_device_id: DeviceId,
        request: RegistrationRequest,
        seen: SightingSink | None = None,
    ) -> bytes:
        digest = request.digest
        try:
            found = await self._store.lookup(
                digest, request.nonce, request.csr_key_id, request.device_id
            )
        except StoreError as exc:
            return self._store_failed(topic_device_id, request, exc)
        if found.response is not None:
            self.stats["idempotent"] += 1
            return found.response
        key_owner = found.key_owner
        if key_owner is None and request.csr_key_id is not None:
            key_owner = self._reserved_keys.get(request.csr_key_id)
        now = self._clock()
        try:
            verified = verify_request(
                request,
                topic_device_id=topic_device_id,
                verifier=self.verifier,
                admission=self.admission,
                now=now,
                nonce_seen=found.nonce_seen or request.nonce in self._reserved_nonces,
                key_owner=key_owner,
                defer_manifest=self.admission_plugins is not None,
            )
            if seen is not None:
                self._sighted(verified, now, seen)
            await self._admit(verified, now)
            await self._expired_policy(found, verified, now)
            issued = self._issue(
                verified.request,
                verified.ldevid_public_key,
                verified.wrap_public_key,
                now,
            )
        except RegistrationError as exc:
            return self._refusal(topic_device_id, request.nonce, digest, exc, request=request)
        record = _issued_record(
            request,
            issued,
            now,
            station_id=verified.station_id,
            idevid_serial=CertSerial(verified.identity.leaf.serial_number),
            ldevid_key_id=verified.ldevid_key_id,
            wrap_key_der=request.wrap_key_der,
        )
        # Reserve until committed: a second request with this nonce or this key, arriving
        # while the first sits in the group-commit queue, must be refused too.
        answer = await self._commit_issued(topic_device_id, request, record)
        if answer is not None:
            return answer
        self.stats["ok"] += 1
        # DEBUG, not INFO: the registration is already an event row of the same commit
        # (``registrar status``), and a formatted log line per device cost about 25 µs of
        # the registrar's CPU per registration (bench/registration_cpu.py).
        log.debug(
            "registered %s (idevid %s, ldevid %s)",
            request.device_id,
            record.idevid_serial,
            record.ldevid_serial,
        )
        previous = found.previous_serial
        if previous is not None and previous != record.ldevid_serial:
            await self._superseded(request.device_id, (previous.hex,), renewal=False)
        return issued.response

    @staticmethod
    def _sighted(verified: VerifiedRegistration, now: datetime, seen: SightingSink) -> None:
        identity, station = verified.identity, verified.station_id
        if identity.device_id is None or station is None:
            return
        seen(
            FactorySighting(
                station_id=station.value,
                serial=format(identity.leaf.serial_number, "x"),
                device_id=identity.device_id,
                der=verified.request.idevid_der,
                at=now,
            )
        )

    async def _expired_policy(
        self, found: Lookup, verified: VerifiedRegistration, now: datetime
    ) -> None:
        """A re-registration whose LDevID expired, under ``expired_reregistration =
        "approval"``, is held until the installer approves (an approval given after the
        certificate expired). Awaits nothing on the common path (no expired LDevID): the
        nonce and key reservations after the decision must follow it without a gap."""
        device = verified.request.device_id
        if (
            found.previous_ldevid_der is None
            or found.previous_status != "registered"
            or self.policy.expired_reregistration != "approval"
        ):
            return
        expired_at = x509.load_der_x509_certificate(found.previous_ldevid_der).not_valid_after_utc
        if now <= expired_at:
            return
        try:
            approved = await self._store.approved_at(device)
            if approved is not None and approved >= int(expired_at.timestamp()):
                return
            await self._store.record_hold(
                device,
                station_id=verified.station_id.value if verified.station_id else None,
                idevid_serial=format(verified.identity.leaf.serial_number, "x"),
                plugin="ldevid_policy",
                reason="ldevid_expired",
                at=int(now.timestamp()),
            )
        except StoreError as exc:
            raise RegistrationError(exc.message, reason="internal_error") from exc
        raise RegistrationError(
            f"{device}: LDevID expired {expired_at}; site policy: re-registration needs "
            f"`registrar approve {device}`",
            reason="held_for_approval",
        )

    async def _process_renewal(self, request: RenewalRequest) -> bytes:
        device, digest = request.device_id, request.digest
        try:
            found = await self._store.lookup(digest, request.nonce, request.csr_key_id)
            known = await self._store.renewal_lookup(device)
            current = await self._store.device(device)
        except StoreError as exc:
            return self._store_failed(device, request, exc)
        if found.response is not None:
            self.stats["idempotent"] += 1
            return found.response
        if device in self._renewing:
            # Two different renewals of one device at once: one wins, the other retries.
            return self._refusal(
                device,
                request.nonce,
                digest,
                RegistrationError(f"{device} is renewing already", reason="busy"),
                request=request,
            )
        key_owner = found.key_owner
        if key_owner is None and request.csr_key_id is not None:
            key_owner = self._reserved_keys.get(request.csr_key_id)
        now = self._clock()
        facts = RenewalFacts(
            current_serial=None if known.current_serial is None else known.current_serial.value,
            status=known.status,
            superseded_serials=frozenset(s.value for s in known.superseded),
            issued_at=(
                None if known.issued_at is None else datetime.fromtimestamp(known.issued_at, UTC)
            ),
            nonce_seen=found.nonce_seen or request.nonce in self._reserved_nonces,
            key_owner=key_owner,
        )
        self._renewing.add(device)
        try:
            return await self._renew(request, facts, current, now)
        finally:
            self._renewing.discard(device)

    async def _renew(
        self,
        request: RenewalRequest,
        facts: RenewalFacts,
        current: DeviceRecord | None,
        now: datetime,
    ) -> bytes:
        device, digest = request.device_id, request.digest
        try:
            verified = verify_renewal(
                request,
                topic_device_id=device,
                site_cas=self.accepted_ldevid_issuers(),
                facts=facts,
                now=now,
                policy=self.policy,
            )
            if current is None:  # verify_renewal refuses an unregistered device first
                raise RegistrationError(f"{device} is not registered", reason="ldevid_unknown")
            wrap = _wrap_key(current)
            issued = self._issue(request, verified.new_public_key, wrap, now)
        except RegistrationError as exc:
            return self._refusal(device, request.nonce, digest, exc, request=request)
        record = _issued_record(
            request,
            issued,
            now,
            station_id=current.station_id,
            idevid_serial=current.idevid_serial,
            ldevid_key_id=verified.new_key_id,
            wrap_key_der=current.wrap_key_der,
            kind="renewal",
        )
        answer = await self._commit_issued(device, request, record)
        if answer is not None:
            return answer
        self.stats["renewed"] += 1
        log.info(
            "renewed %s: ldevid %s replaces %s", device, record.ldevid_serial, current.ldevid_serial
        )
        await self._superseded(device, (current.ldevid_serial.hex,), renewal=True)
        return issued.response

    def _issue(
        self,
        request: RegistrationRequest | RenewalRequest,
        ldevid_public_key: ec.EllipticCurvePublicKey,
        wrap_public_key: ec.EllipticCurvePublicKey | None,
        now: datetime,
    ) -> Issued:
        """The one LDevID issuance of registration and renewal, by the current issuing
        authority (the new site CA once a rollover is active)."""
        authority = self.issuing_authority()
        return issue_ldevid(
            device_id=request.device_id,
            nonce=request.nonce,
            request_digest=request.digest,
            ldevid_public_key=ldevid_public_key,
            wrap_public_key=wrap_public_key,
            site_ca=authority.certificate,
            site_ca_der=authority.der,
            site_signer=authority.signer,
            organization=authority.organization,
            payload_key=self.payload_key,
            now=now,
            validity=self.policy.validity,
        )

    def _store_failed(
        self, device: DeviceId, request: RegistrationRequest | RenewalRequest, exc: StoreError
    ) -> bytes:
        """The answer when the store could not be read: ``internal_error`` (retry later)."""
        return self._refusal(
            device,
            request.nonce,
            request.digest,
            RegistrationError(exc.message, reason="internal_error"),
            request=request,
        )

    async def _commit_issued(
        self,
        device: DeviceId,
        request: RegistrationRequest | RenewalRequest,
        record: Registration,
    ) -> bytes | None:
        """Commit ``record`` with its nonce and new key reserved; None once committed,
        otherwise the answer to send instead: the one another instance committed for the
        same request bytes, or a refusal."""
        failed = await self._record_reserved(record, request.nonce, record.ldevid_key_id)
        if failed is None:
            return None
        if (stored := await self._answered_elsewhere(request.digest)) is not None:
            return stored
        return self._refusal(device, request.nonce, request.digest, failed, request=request)

    async def _admit(self, verified: VerifiedRegistration, now: datetime) -> None:
        """The site's admission plugins (when configured); a hold is recorded durably as a
        pending approval before the device is told to retry later."""
        plugins = self.admission_plugins
        if plugins is None:
            return
        device = verified.request.device_id
        try:
            approved = not verified.in_manifest and await self._store.is_approved(device)
            decide_admission(plugins, AdmissionContext.of(verified, approved=approved, now=now))
        except AdmissionHeld as held:
            try:
                await self._store.record_hold(
                    device,
                    station_id=verified.station_id.value if verified.station_id else None,
                    idevid_serial=format(verified.identity.leaf.serial_number, "x"),
                    plugin=held.decision.plugin,
                    reason=held.decision.reason,
                    at=int(now.timestamp()),
                )
            except StoreError as exc:
                raise RegistrationError(exc.message, reason="internal_error") from exc
            raise
        except StoreError as exc:
            raise RegistrationError(exc.message, reason="internal_error") from exc


def _wrap_key(record: DeviceRecord) -> ec.EllipticCurvePublicKey | None:
    """The device's registered ECDH wrap key; None for a device enrolled over EST (it has
    none: its answers carry no payload key, ``docs/est.md``)."""
    if not record.wrap_key_der:
        return None
    wrap = serialization.load_der_public_key(record.wrap_key_der)
    if not isinstance(wrap, ec.EllipticCurvePublicKey):
        raise RegistrationError(
            f"{record.device_id}: stored wrap key is not EC", reason="internal_error"
        )
    return wrap


def _issued_record(
    request: RegistrationRequest | RenewalRequest,
    issued: Issued,
    now: datetime,
    *,
    station_id: StationId | None,
    idevid_serial: CertSerial,
    ldevid_key_id: bytes,
    wrap_key_der: bytes,
    kind: str = "registration",
) -> Registration:
    """What one issuance writes: the request and the issued LDevID, plus what the caller
    knows about the device (from the verified IDevID, or from its record for a renewal)."""
    return Registration(
        device_id=request.device_id,
        station_id=station_id,
        idevid_serial=idevid_serial,
        ldevid_serial=CertSerial(issued.ldevid.serial_number),
        ldevid_der=issued.ldevid_der,
        ldevid_key_id=ldevid_key_id,
        wrap_key_der=wrap_key_der,
        payload_key_id=issued.payload_key_id,
        request_digest=request.digest,
        response=issued.response,
        nonce=request.nonce,
        request_time=request.time,
        at=int(now.timestamp()),
        kind=kind,
        ldevid_not_after=int(issued.ldevid.not_valid_after_utc.timestamp()),
    )
