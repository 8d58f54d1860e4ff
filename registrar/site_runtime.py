"""A running site registrar: its state and the duties that act on it.

:class:`SiteRuntime` owns what a started registrar holds (the commissioned site, store,
broker, registration service, MQTT session, payload keys, revocation state) and what it
does with it while it runs: the live operations the spool and in-process callers ask for
(revoke, import a revocation list, rotate the payload key, site CA rollover steps, send a
command, approve a held device), the handlers of the site channel's traffic
(registrations, renewals, telemetry, wrap keys), the watcher tick (Mosquitto revival,
re-commission, spool requests) and the CRL tick (service certificates, site CRL,
superseded sessions, alerts).

How it is built, started and stopped is the composition root's business
(:class:`registrar.app.RegistrarApp`, which extends this class); what it reports lives in
:mod:`registrar.site_status`, the decisions of the CRL tick in :mod:`registrar.crl_watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from registrar.broker import Broker, Endpoint
from registrar.channel import RequestSource
from registrar.connections import client_context, est_context, site_authority
from registrar.crl_watch import (
    check_crls,
    refresh_service_certificates_if_due,
    refresh_site_crl_if_due,
)
from registrar.device_events import TelemetryLog, record_wrap_key
from registrar.errors import BrokerError, ConfigError, RegistrarError
from registrar.est import EstServer
from registrar.key_distribution import KeyDistributor
from registrar.metrics import CrlReading, Health, RegistrarMetrics
from registrar.ops_server import OpsServer
from registrar.payload_keys import PayloadKeyring
from registrar.revocation import (
    ImportResult,
    RevocationAwareVerifier,
    RevokeResult,
    crl_numbers,
    enforce_revocation_list,
    import_revocation_list,
    revoke_device,
)
from registrar.rollover import (
    RolloverError,
    dependents,
    note_migration,
    retire_site_ca,
)
from registrar.run_dir import spool_dir
from registrar.service import FactorySighting, RegistrationService
from registrar.settings import AppSettings
from registrar.site import (
    CommissionedSite,
    SiteHome,
    SiteSecrets,
    load_commissioned_site,
    revocation_lock,
)
from registrar.site_status import StatusWriter, health, readings
from registrar.spool import (
    BESIDE_LONG,
    LONG_COMMANDS,
    RotationResult,
    apply_request,
    request_command,
)
from registrar.store import Store
from registrar.supersede import SupersededCertificates
from trustcore.identity import DeviceId
from trustcore.payload import seal_payload
from trustcore.registration import RegistrationRequest
from trustcore.renewal import RenewalRequest
from trustcore.revocation import RevocationList
from trustcore.site_rollover import build_renew_now
from trustcore.topics import COMMAND_LEVEL, ROLLOVER_LEVEL, device_topic
from trustcore.utctime import Clock, system_clock, to_unix

if TYPE_CHECKING:
    from registrar.broker.mosquitto import MosquittoBroker

__all__ = ["SiteRuntime"]

log = logging.getLogger(__name__)
#: See :meth:`SiteRuntime._spool_requests` (one second, in ns).
_SPOOL_RELIST_NS = 1_000_000_000

_T = TypeVar("_T")


class SiteRuntime:
    """The state and duties of one running site registrar (built and started by
    :class:`registrar.app.RegistrarApp`)."""

    def __init__(
        self,
        home: SiteHome,
        secrets: SiteSecrets,
        settings: AppSettings | None = None,
        *,
        clock: Clock = system_clock,
    ) -> None:
        self.home = home
        #: The registrar's clock for payload-key rotation (the grace period); tests move it.
        self.clock: Clock = clock
        self.keys: KeyDistributor | None = None
        #: The Mosquitto process this registrar owns (restarted by the watcher if it dies).
        self._mosquitto: MosquittoBroker | None = None
        self.broker_restarts = 0
        self.secrets = secrets
        self.settings = settings or AppSettings()
        self.telemetry = TelemetryLog()
        self.alerts: tuple[str, ...] = ()
        self.started = 0.0
        self._state_target = ""
        self.site: CommissionedSite | None = None
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.service: RegistrationService | None = None
        self.channel: RequestSource | None = None
        self.est: EstServer | None = None
        self.keyring: PayloadKeyring | None = None
        self.revocations: RevocationList | None = None
        self.revoked: set[DeviceId] = set()
        self.superseded: SupersededCertificates | None = None
        self._background: set[asyncio.Task[None]] = set()
        #: The long spool command running in the background (its request, its task).
        self._long_command: tuple[Path, asyncio.Task[None]] | None = None
        #: Prometheus registry of this app (``--metrics-port``; docs/operations.md).
        self.metrics = RegistrarMetrics(lambda: readings(self))
        self.ops: OpsServer | None = None
        #: The enforced CRLs' dates, refreshed by :meth:`check_crls` (metrics, health).
        self.crl_readings: tuple[CrlReading, ...] = ()
        self._status = StatusWriter()
        #: The spool directory, its stat when last listed empty and when (wall clock, ns),
        #: see :meth:`_spool_requests`.
        self._spool: Path | None = None
        self._spool_seen: tuple[tuple[int, int, int], int] | None = None

    # -- what it serves ---------------------------------------------------------------------

    @property
    def registration_endpoint(self) -> Endpoint:
        return self._require(self.broker).registration_endpoint

    @property
    def metrics_endpoint(self) -> Endpoint | None:
        """Where ``/metrics`` and ``/healthz`` are served (None: not enabled)."""
        return None if self.ops is None else self.ops.endpoint

    @property
    def operational_endpoint(self) -> Endpoint:
        return self._require(self.broker).operational_endpoint

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise ConfigError("the registrar is not running")
        return value

    def _verifier(self, site: CommissionedSite) -> RevocationAwareVerifier:
        assert self.revocations is not None
        return RevocationAwareVerifier(
            [site.root],
            site.station_cas,
            site.crls,
            hq_revocations=self.revocations,
            locally_revoked=self.revoked,
            max_offline_days=site.max_offline_days,
        )

    @property
    def broker_pid(self) -> int | None:
        """The Mosquitto process this registrar owns, else this process (the embedded
        broker runs in it; RabbitMQ is the operator's)."""
        return self._mosquitto.pid if self._mosquitto is not None else os.getpid()

    async def health(self) -> Health:
        """``/healthz`` (:func:`registrar.site_status.health`)."""
        return await health(self)

    # -- other instances (registrar.instances) ----------------------------------------------

    async def _reload_payload_key(self) -> None:
        site, service = self._require(self.site), self._require(self.service)
        self.keyring = await asyncio.to_thread(site.payload_keys.load)
        service.use_payload_key(self.keyring.current)
        log.info(
            "payload key %s in use (rotated by another instance)", self.keyring.current.key_id.hex()
        )

    # -- operations (spool commands and in-process callers) ---------------------------------

    async def approve(self, device_id: DeviceId) -> bool:
        """Let a device held by an admission plugin register; True if it was pending."""
        return await self._require(self.store).approve(device_id, at=to_unix(self.clock()))

    async def revoke(self, device_id: DeviceId, reason: str = "unspecified") -> RevokeResult:
        result = await revoke_device(
            home=self.home,
            secrets=self.secrets,
            store=self._require(self.store),
            device_id=device_id,
            reason=reason,
            broker=self._require(self.broker),
        )
        self.revoked.add(device_id)
        return result

    async def import_revocations(self, package: bytes) -> ImportResult:
        result, revocations = await import_revocation_list(
            home=self.home,
            secrets=self.secrets,
            store=self._require(self.store),
            package=package,
            broker=self._require(self.broker),
        )
        self._set_revocations(revocations)
        self.revoked.update(DeviceId(r.device_id) for r in result.revoked)
        return result

    def _set_revocations(self, revocations: RevocationList) -> None:
        self.revocations = revocations
        service = self._require(self.service)
        service.update_trust(verifier=self._verifier(self._require(self.site)))

    async def _enforce_list(self) -> None:
        assert self.revocations is not None
        done = await enforce_revocation_list(
            home=self.home,
            secrets=self.secrets,
            store=self._require(self.store),
            revocations=self.revocations,
            broker=self.broker,
        )
        self.revoked.update(DeviceId(r.device_id) for r in done)

    async def rotate_payload_key(self) -> RotationResult:
        """New current payload key (sealed at rest), then a signed update wrapped to each
        registered device, published retained on ``devices/<id>/keys``; new registrations
        get the new key from now on. A device counts as on the new key only once it has
        acknowledged it (:mod:`registrar.key_distribution`); the previous key is accepted
        for the site's grace period."""
        site = self._require(self.site)

        def rotate() -> PayloadKeyring:
            with revocation_lock(self.home):
                return site.payload_keys.rotate()

        self.keyring = await asyncio.to_thread(rotate)
        service = self._require(self.service)
        service.use_payload_key(self.keyring.current)
        keys = self._require(self.keys)
        await keys.use_keyring(self.keyring)
        sent = await keys.push_pending()
        kid = self.keyring.current.key_id.hex()
        await self._require(self.store).record_event(
            None, "payload-key", f"rotated to {kid}; {sent} update(s) published"
        )
        log.info("payload key rotated to %s: %d device update(s) published", kid, sent)
        return RotationResult(kid, sent)

    async def _publish_retained(self, topic: str, message: bytes) -> None:
        await self._require(self.channel).publish(topic, message, retain=True)

    async def _catch_up_key_updates(self) -> None:
        """Devices not yet on the current key (rotated offline or while they were away, a
        bundle brought a new key, an update lost with a broker restart) get it (again).
        Runs at every (re)connection of the site channel; if the session drops meanwhile,
        the next reconnection sends what is still pending."""
        keys = self._require(self.keys)
        try:
            await keys.use_keyring(self._require(self.keyring))
            await keys.push_pending()
        except RegistrarError as exc:
            log.warning("pending payload-key updates not all sent (%s): sent again later", exc)

    # -- site CA rollover (registrar.rollover) -----------------------------------------

    async def migrate_ca(self) -> int:
        """Ask every registered device whose live LDevID comes from the retiring site CA to
        renew now: a "renew now" signed by that CA, retained on ``devices/<id>/rollover`` (an
        offline device gets it when it reconnects). Returns how many were published.

        The request is recorded (``SITE/rollover-migrate.json``): the brokers keep retained
        messages in memory only, so a restarted registrar publishes them again."""
        site, store = self._require(self.site), self._require(self.store)
        retiring, key = site.retiring_ca_cert, site.retiring_ca_key
        if retiring is None or key is None:
            raise RolloverError("no site CA is retiring", reason="nothing_to_retire")
        await asyncio.to_thread(note_migration, self.home)
        channel = self._require(self.channel)
        issued = time.time_ns() // 1000  # microseconds: two commands in one second differ
        sent = 0
        moment = self.clock()
        # page by page: this runs at start-up too, and must not read the registry at once
        async for page in store.device_pages(status="registered"):
            for record in dependents(page, retiring, moment):
                device = record.device_id
                message = build_renew_now(
                    device_id=device, issued=issued, issuing_ca=site.site_ca_cert, signer=key
                )
                await channel.publish(device_topic(device, ROLLOVER_LEVEL), message, retain=True)
                sent += 1
        await store.record_event(None, "rollover", f"renew-now published to {sent} device(s)")
        log.info("site CA rollover: renew-now published to %d device(s)", sent)
        return sent

    async def retire_ca(self, *, now: datetime | None = None) -> dict[str, Any]:
        """``registrar.rollover.retire_site_ca`` live: then reload (brokers stop trusting the
        retired CA) and clear the retained renew commands."""
        store = self._require(self.store)
        records = await store.devices()
        result = await asyncio.to_thread(retire_site_ca, self.home, records, now=now)
        await self._recommissioned(str(self.home.current.readlink()))
        channel = self._require(self.channel)
        for record in records:
            if record.status == "registered":
                topic = device_topic(record.device_id, ROLLOVER_LEVEL)
                await channel.publish(topic, b"", retain=True)
        await store.record_event(None, "rollover", f"retired {result.retired}")
        return {"retired": result.retired, "key": result.key_name, "state": result.state_dir.name}

    async def send_command(self, device_id: DeviceId, data: bytes) -> str:
        """Seal ``data`` with the payload key the device holds (the current one, or an older
        one it has not yet replaced while that is in its grace period) and publish it."""
        key = await self._require(self.keys).key_for(device_id)
        topic = device_topic(device_id, COMMAND_LEVEL)
        await self._require(self.channel).publish(topic, seal_payload(key, topic, data))
        return topic

    # -- the site channel's traffic ------------------------------------------------------------

    async def _register(self, device: DeviceId, payload: bytes) -> bytes:
        """One registration: the service parses and verifies it once and hands back the
        verified factory certificate, recorded here for ``registrar report``."""
        started = time.perf_counter()
        answer = await self._require(self.service).handle(
            device, payload, seen=self._factory_certificate_seen
        )
        self.metrics.registration_latency.observe(time.perf_counter() - started)
        return answer

    async def _register_request(self, device: DeviceId, request: RegistrationRequest) -> bytes:
        """The same for a request a transport authenticated (EST, :mod:`registrar.est`)."""
        started = time.perf_counter()
        answer = await self._require(self.service).handle_request(
            device, request, seen=self._factory_certificate_seen
        )
        self.metrics.registration_latency.observe(time.perf_counter() - started)
        return answer

    async def _renew(self, device: DeviceId, payload: bytes) -> bytes:
        started = time.perf_counter()
        answer = await self._require(self.service).handle_renewal(device, payload)
        self.metrics.renewal_latency.observe(time.perf_counter() - started)
        return answer

    async def _renew_request(self, device: DeviceId, request: RenewalRequest) -> bytes:
        started = time.perf_counter()
        answer = await self._require(self.service).handle_renewal_request(device, request)
        self.metrics.renewal_latency.observe(time.perf_counter() - started)
        return answer

    def _wrap_key_received(self, device: DeviceId, payload: bytes) -> None:
        task = asyncio.create_task(self._record_wrap_key(device, payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record_wrap_key(self, device: DeviceId, payload: bytes) -> None:
        """:func:`registrar.device_events.record_wrap_key` once the site runs."""
        store, keys, service = self.store, self.keys, self.service
        if store is None or keys is None or service is None:
            return
        await record_wrap_key(store, keys, service, device, payload, self.clock)

    def _factory_certificate_seen(self, sighting: FactorySighting) -> None:
        """Record a factory certificate whose chain the service verified (junk cannot
        fill the table), at the moment on the service's clock."""
        store = self.store
        if store is None:
            return
        store.note_factory_certificate(
            station_id=sighting.station_id,
            serial=sighting.serial,
            device_id=sighting.device_id,
            der=sighting.der,
            at=int(sighting.at.timestamp()),
        )

    def _telemetry_received(
        self, device: DeviceId, topic: str, payload: bytes, retained: bool = False
    ) -> None:
        keyring, keys = self.keyring, self.keys
        if keyring is None or keys is None:
            return
        self.telemetry.received(keyring, keys, device, topic, payload, retained)

    # -- background duties --------------------------------------------------------------------

    async def _watch_broker(self) -> None:
        """Restart a Mosquitto that died. Its own loop: nothing the spool runs (a long
        payload-key push) delays it."""
        mosquitto = self._mosquitto
        if mosquitto is not None and mosquitto.exited:
            # Same ports and blocks; the site channel reconnects by itself and re-sends the
            # payload-key updates the dead broker's retained messages held. A failed restart
            # is retried at the next tick; spool commands are still answered meanwhile.
            try:
                if await mosquitto.revive():
                    self.broker_restarts += 1
            except (BrokerError, OSError) as exc:
                log.error("could not restart mosquitto: %s", exc)

    async def _watch(self) -> None:
        """A re-commissioned site, then the spool's requests in order. A long command
        (:data:`registrar.spool.LONG_COMMANDS`) runs in the background; while it runs,
        the requests behind it are applied as long as they are in
        :data:`registrar.spool.BESIDE_LONG` (a revocation is not held up by a payload-key
        push), and the first other one waits, with everything behind it and any
        re-commission, until it is done."""
        running = self._long_command
        if running is not None and running[1].done():
            running = self._long_command = None
        if running is None:
            target = str(self.home.current.readlink())
            if target != self._state_target:
                await self._recommissioned(target)
        for request in self._spool_requests():
            if running is not None and request == running[0]:
                continue
            command = request_command(request)
            if running is not None:
                if command not in BESIDE_LONG:
                    break
            elif command in LONG_COMMANDS:
                task = asyncio.create_task(self._apply_request(request), name=f"spool {command}")
                running = self._long_command = (request, task)
                continue
            await self._apply_request(request)

    async def _stop_long_command(self) -> None:
        """At stop: a long command still running is cancelled; its request stays in the
        spool and is applied again at the next start (as before it ran in the
        background)."""
        running, self._long_command = self._long_command, None
        if running is not None and not running[1].done():
            running[1].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running[1]

    def _spool_requests(self) -> list[Path]:
        """The requests in the spool, in order. The directory is not listed again while
        its stat is the one of a listing (less than a second ago) that found none and its
        mtime was over a second older than that listing: a file created since (the kernel
        stamps it at most a clock tick early) would have changed the mtime."""
        spool = self._spool or spool_dir(self.home)
        try:
            st = spool.stat()  # before listing: a request written after it changes the mtime
        except FileNotFoundError:  # removed while running: made again, as at start
            spool = spool_dir(self.home)
            st = spool.stat()
        self._spool = spool
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        now = time.time_ns()
        seen = self._spool_seen
        if (
            seen is not None
            and seen[0] == key
            and now - seen[1] < _SPOOL_RELIST_NS
            and seen[1] - st.st_mtime_ns > _SPOOL_RELIST_NS
        ):
            return []
        requests = sorted(spool.glob("*.request.json"))
        self._spool_seen = None if requests else (key, now)
        return requests

    async def _recommissioned(self, target: str) -> None:
        """A new bundle was commissioned while running: new anchors, CRLs, manifest, HQ
        list and payload keys for the registrar; the brokers re-read their certificate, CA
        bundles and CRLs; a site CA rollover (activated or retired) switches the issuing
        CA and the registrar's client certificate (used from its next reconnect)."""
        log.warning("site re-commissioned (%s -> %s): reloading", self._state_target, target)
        self._state_target = target
        site = await asyncio.to_thread(load_commissioned_site, self.home, self.secrets)
        self.site = site
        self.keyring = await asyncio.to_thread(site.payload_keys.load)
        self.revocations = site.revocations
        service = self._require(self.service)
        service.update_trust(verifier=self._verifier(site), admission=site.admission)
        service.use_payload_key(self.keyring.current)
        # A site CA rollover activated or retired: new issuer, new client certificate.
        validity = service.site_authority.ldevid_validity  # the site's LDevID policy
        service.use_site_authority(site_authority(site, validity))
        if self.channel is not None:
            self.channel.use_tls(client_context(site, self.secrets.passphrase()))
        await self._require(self.broker).reload_crls()
        await self._reload_est()
        await self._enforce_list()
        await self._catch_up_key_updates()
        self.check_crls()

    async def _apply_request(self, request: Path) -> None:
        await apply_request(request, self)

    def refresh_site_crl_if_due(
        self, *, now: datetime | None = None, crl_number: Callable[[int], int] | None = None
    ) -> bool:
        """:func:`registrar.crl_watch.refresh_site_crl_if_due` for this site."""
        return refresh_site_crl_if_due(self.home, self.secrets, now=now, crl_number=crl_number)

    def refresh_service_certificates_if_due(self, *, now: datetime | None = None) -> bool:
        """:func:`registrar.crl_watch.refresh_service_certificates_if_due` for this site."""
        return refresh_service_certificates_if_due(self.home, self.secrets, now=now)

    async def _renew_service_certificates(self) -> bool:
        """The live half of :meth:`refresh_service_certificates_if_due`: the registrar's
        own MQTT session uses the new client certificate from its next connect; the caller
        reloads the brokers (new handshakes get the new server certificate; a reload drops
        no session). True if they were re-issued."""
        if not await asyncio.to_thread(self.refresh_service_certificates_if_due):
            return False
        if self.channel is not None and self.site is not None:
            ctx = await asyncio.to_thread(client_context, self.site, self.secrets.passphrase())
            self.channel.use_tls(ctx)
        await self._reload_est()
        return True

    async def _crl_tick(self) -> None:
        await self.retire_expired_ca()
        # One reload for both: after a long gap (a registrar that was down, a clock that
        # jumped) the service certificates and the site CRL are due together, and a
        # handshake between two reloads would meet the new certificate with a stale CRL.
        renewed = await self._renew_service_certificates()
        numbers = None if self.store is None else crl_numbers(self.store)
        refreshed = await asyncio.to_thread(self.refresh_site_crl_if_due, crl_number=numbers)
        if (renewed or refreshed) and self.broker is not None:
            await self.broker.reload_crls()
        if self.superseded is not None and self.store is not None:
            await self.superseded.reconcile(self.store)
        self.check_crls()

    async def retire_expired_ca(self, *, now: datetime | None = None) -> bool:
        """A retiring site CA that has expired can have no live LDevID left (an LDevID
        never outlives its CA): it is retired automatically, so nobody has to remember the
        last step of a rollover before its CRL can no longer be signed."""
        site = self.site
        moment = self.clock() if now is None else now
        if site is None or site.retiring_ca_cert is None:
            return False
        if moment < site.retiring_ca_cert.not_valid_after_utc:
            return False
        log.warning("the retiring site CA has expired: retiring it now")
        await self.retire_ca(now=moment)
        return True

    def check_crls(self, *, now: datetime | None = None) -> list[str]:
        """:func:`registrar.crl_watch.check_crls` (said in the log); the alerts and CRL dates
        are kept for status, metrics and health."""
        check = check_crls(self.home, self.site, self.revocations, now=now)
        self.crl_readings = check.readings
        self.alerts = check.alerts
        return list(check.alerts)

    async def _reload_est(self) -> None:
        if self.est is not None:
            self.est.use_tls(await asyncio.to_thread(est_context, self.home, self.secrets))

    async def _write_status(self) -> None:
        await self._status.write(self)
