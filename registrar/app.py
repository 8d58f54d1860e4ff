"""``registrar run``: the composition root of a site registrar.

:class:`RegistrarApp` wires the commissioned site (``registrar.site``), the durable store,
a broker backend (embedded amqtt or Mosquitto), the registration service and the
registrar's MQTT session, and runs four background duties until SIGINT/SIGTERM:

* **site channel** — the registrar's one MQTT session (:mod:`registrar.channel`; identity
  ``registrar@site``; a broker admits one live session per identity, so registration
  requests, telemetry, key updates and commands all share it): serves
  ``devtrust/register/+/request`` through :class:`~registrar.service.RegistrationService`
  (the only place requests are parsed and verified; it hands back the verified factory
  certificate, recorded for ``registrar report``), serves LDevID renewals on
  ``devices/+/renewal/request`` (answer on ``devices/<id>/renewal/response``), decrypts
  ``devices/+/telemetry`` with the site payload keys (counts and digests only, for
  ``registrar status``), publishes payload-key updates (retained) and commands, and reads
  the devices' key acknowledgements (:mod:`registrar.key_distribution`: a device is on a
  new payload key only once it proved it holds it; updates are re-sent at every start and
  reconnection until then);
* **command watcher** — the CLI talks to a running registrar through a spool directory
  (``SITE/run/commands``, :mod:`registrar.spool`): ``revoke``, ``import-revocations``,
  ``rotate-payload-key`` and ``send-command`` and ``approve`` are applied live (polled
  every ``watch_interval``, 0.2 s) and answered
  with a result file; it also notices a re-commission (``current`` switched) and reloads
  the trust material;
* **CRL timer** — re-issues the site CA CRL when less than half of its validity is left
  and reloads the broker; reports root/station CRLs that are stale (fail closed) or close
  to it, loudly, every check;
* **status** — ``SITE/run/status.json`` (atomic, every ``status_interval``): listeners,
  counts, telemetry, CRL dates, alerts; ``registrar status`` reads it.

Exactly one registrar runs a site's duties: it holds ``SITE/run/registrar.lock``
(``flock``) for its whole life, and an offline CLI command holds the same lock while it
works, so the two never write the site at the same time (see
:func:`registrar.run_dir.instance_lock`); with a PostgreSQL store it also holds the
site-duties advisory lock (:mod:`registrar.leadership`, ``--standby`` to take over).
Further instances (``--instance N --join HOST:PORT``, Mosquitto and PostgreSQL) only serve
registrations and renewals beside it and follow the others through the store's change feed
(:mod:`registrar.instances`).

This module is the wiring only: what the app holds and does while it runs is
:class:`registrar.site_runtime.SiteRuntime` (which :class:`RegistrarApp` extends), its
settings :mod:`registrar.settings`, its TLS identities :mod:`registrar.connections`, what
it reports :mod:`registrar.site_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from registrar.broker import Broker, BrokerSettings, Endpoint
from registrar.channel import MqttChannel, SiteTraffic
from registrar.connections import (
    amqp_source,
    channel_settings,
    client_context,
    est_context,
    instance_context,
    operational_tls,
    site_authority,
)
from registrar.errors import BrokerError, ConfigError, RegistrarError
from registrar.est import EstServer, EstTraffic
from registrar.instances import OtherInstances
from registrar.key_distribution import KeyDistributor
from registrar.ldevid_policy import read_ldevid_policy
from registrar.leadership import SiteDuties
from registrar.ops_server import OpsServer
from registrar.plugins import load_site_plugins, read_site_plugins
from registrar.rollover import migration_requested
from registrar.run_dir import instance_lock, run_dir, status_path, store_location
from registrar.service import RegistrationService, SiteAuthority
from registrar.settings import AppSettings
from registrar.site import CommissionedSite, SiteHome, SiteSecrets, load_commissioned_site
from registrar.site_runtime import SiteRuntime
from registrar.store import Store
from registrar.supersede import SupersededCertificates
from trustcore.errors import TrustCoreError
from trustcore.policy_chain import NamedPlugin
from trustcore.registration import AdmissionContext
from trustcore.renewal import LdevidPolicy
from trustcore.utctime import Clock, system_clock

__all__ = ["AppSettings", "RegistrarApp", "run_registrar", "running"]

if TYPE_CHECKING:
    from registrar.broker.rabbitmq_site import RabbitMQSite

log = logging.getLogger(__name__)


class RegistrarApp(SiteRuntime):
    """One running site registrar. Use :meth:`start` / :meth:`stop`, or :func:`run_registrar`."""

    def __init__(
        self,
        home: SiteHome,
        secrets: SiteSecrets,
        settings: AppSettings | None = None,
        *,
        workdir: Path | None = None,
        clock: Clock = system_clock,
    ) -> None:
        super().__init__(home, secrets, settings, clock=clock)
        self._workdir = workdir
        self._lock_cm: contextlib.AbstractContextManager[bool] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._duties: SiteDuties | None = None
        #: Set when this registrar must stop on its own (the site-duties lock was lost).
        self.halted = asyncio.Event()

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        join = self.settings.join
        if join is not None or (self.settings.broker == "rabbitmq" and self.settings.instance > 1):
            # Instance 1 holds the site lock (offline commands wait for it); a joining
            # instance may run on another machine and coordinates through the store only.
            try:
                await self._start_joined(join)
            except BaseException:
                await self.stop()
                raise
            return
        lock = instance_lock(self.home, wait=10.0)
        if not lock.__enter__():
            lock.__exit__(None, None, None)
            raise ConfigError(
                f"another registrar (or an offline registrar command) holds {self.home.path}"
            )
        self._lock_cm = lock
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _open_service(self) -> tuple[CommissionedSite, Store, LdevidPolicy]:
        """The commissioned site, the store and the registration service (every instance)."""
        site = await asyncio.to_thread(load_commissioned_site, self.home, self.secrets)
        self.site = site
        self._state_target = str(self.home.current.readlink())
        self.keyring = await asyncio.to_thread(site.payload_keys.load)
        self.revocations = site.revocations
        location = store_location(self.home, self.settings.store)
        several = self.settings.join is not None or self.settings.instance > 1
        if several and location.kind != "postgres":
            raise ConfigError(
                "several registrar instances share one PostgreSQL store "
                "(--store postgresql://…); a SQLite store serves one instance"
            )
        self.store = store = await Store.open(location)
        self.revoked.update(await store.revoked_device_ids())
        policy = read_ldevid_policy(self.home.path)
        self.service = RegistrationService(
            store=store,
            verifier=self._verifier(site),
            admission=site.admission,
            site=SiteAuthority(
                site.site_ca_cert, site.site_ca_key, site.organization, policy.validity
            ),
            payload_key=self.keyring.current,
            admission_plugins=self._admission_plugins(),
            policy=policy,
            clock=self.clock,
        )
        self.service.use_site_authority(site_authority(site, policy.validity))  # + retiring
        return site, store, policy

    async def _start_joined(self, join: Endpoint | None) -> None:
        """Instance 2..16: serve requests on the broker instance 1 runs. No broker, no
        spool, no CRL timer, no key distribution (instance 1's duties); it follows the
        other instances through the store's change feed (revocations, payload keys).
        On RabbitMQ it also serves the auth backend (every instance does)."""
        self.started = time.time()
        site, store, _policy = await self._open_service()
        others = self._follow_instances(site_duties=False)
        self._require(self.service).on_superseded = others.superseded_on_crl
        traffic = SiteTraffic(register=self._register, renew=self._renew)
        if join is None:
            rabbit = await self._start_rabbitmq(site, store)
            self.channel = amqp_source(rabbit, traffic, site_duties=False)
            join = rabbit.registration_endpoint
        else:
            tls = await asyncio.to_thread(
                instance_context, site, self.settings.instance, self.clock()
            )
            self.channel = MqttChannel(
                channel_settings(self.settings, join, site_duties=False), tls, traffic
            )
        self._tasks.append(asyncio.create_task(self.channel.run(self._stop), name="channel"))
        try:
            await asyncio.wait_for(self.channel.connected.wait(), 15)
        except TimeoutError as exc:
            raise BrokerError(f"instance {self.settings.instance} could not join {join}") from exc
        await self._start_ops()
        log.info(
            "registrar instance %d for site %s serving on %s:%d",
            self.settings.instance,
            self.home.site_id,
            join.host,
            join.port,
        )

    async def _channel_connected(self) -> None:
        """After every (re)connection of the site channel: the first time after a fresh
        start, Mosquitto saves the registrar's persistent session (so a crash of it loses
        no device message: ``MosquittoBroker.save_sessions``); then pending payload-key
        updates go out."""
        if self._mosquitto is not None and self._mosquitto.save_sessions():
            log.info("mosquitto saved the registrar's session (database written)")
        await self._catch_up_key_updates()

    async def _take_site_duties(self) -> None:
        """With a PostgreSQL store, the site duties are held through an advisory lock (one
        registrar per site runs them, wherever it runs; ``--standby`` waits to take over).
        Taken before anything of the site is written."""
        location = store_location(self.home, self.settings.store)
        if location.kind != "postgres":
            return
        duties = await SiteDuties.acquire(
            location.url, self.home.site_id.value, standby=self.settings.standby
        )
        assert duties is not None  # no stop event: a standby waits until it is cancelled
        self._duties = duties

        async def watch() -> None:
            await duties.lost.wait()
            self.halted.set()

        self._tasks.append(asyncio.create_task(watch(), name="duties"))

    async def _start_rabbitmq(self, site: CommissionedSite, store: Store) -> RabbitMQSite:
        """The registrar's part of an operator-run RabbitMQ cluster (the auth backend)."""
        from registrar.broker.rabbitmq_site import RabbitMQSite, admin_password

        rabbit = RabbitMQSite(
            self._require(self.settings.rabbitmq),
            store,
            admin_password(self.secrets.passphrase(), self.home.site_id.value),
            operational_tls(self.home, site, self.secrets.passphrase()).crl_file,
        )
        await rabbit.start()
        self.broker = rabbit
        return rabbit

    async def _start(self) -> None:
        self.started = time.time()
        await self._take_site_duties()
        passphrase = self.secrets.passphrase()
        await asyncio.to_thread(self.refresh_site_crl_if_due)
        await asyncio.to_thread(self.refresh_service_certificates_if_due)
        site, store, policy = await self._open_service()
        self.check_crls()
        workdir = self._workdir or run_dir(self.home) / f"broker-{self.settings.broker}"
        settings = BrokerSettings(
            tls=operational_tls(self.home, site, passphrase),
            workdir=workdir,
            host=self.settings.host,
            registration_port=self.settings.registration_port,
            operational_port=self.settings.operational_port,
        )
        broker: Broker
        rabbit: RabbitMQSite | None = None
        if self.settings.broker == "rabbitmq":
            broker = rabbit = await self._start_rabbitmq(site, store)
        elif self.settings.broker == "mosquitto":
            from registrar.broker.mosquitto import MosquittoBroker

            broker = MosquittoBroker(settings, executable=self.settings.mosquitto_executable)
            self._mosquitto = broker
        else:
            from registrar.broker.embedded import EmbeddedBroker

            broker = EmbeddedBroker(settings)
        if rabbit is None:
            await broker.start()
        self.broker = broker
        # Blocks live in the broker's memory: re-apply every revocation from the store.
        for device in sorted(self.revoked, key=lambda d: d.value):
            await broker.block(device.value)
        # A re-commission while we were down may have brought a newer HQ list.
        await self._enforce_list()
        self.superseded = SupersededCertificates(
            home=self.home,
            secrets=self.secrets,
            broker=broker,
            handover_seconds=policy.handover_seconds,
            window_seconds=policy.supersede_window_seconds,
            store=store,
        )
        self._require(self.service).on_superseded = self.superseded.supersede
        await self.superseded.reconcile(store)
        self.keys = KeyDistributor(
            store=store,
            signer_for=lambda record: self._require(self.service).site_authority.signer_for(
                record.ldevid_der
            ),
            publish=self._publish_retained,
            clock=self.clock,
            grace_s=self.home.config.payload_key_grace_s,
        )
        await self.keys.start(self._require(self.keyring))
        op = broker.operational_endpoint
        host = "127.0.0.1" if op.host in ("0.0.0.0", "", "::") else op.host  # noqa: S104
        traffic = SiteTraffic(
            register=self._register,
            renew=self._renew,
            telemetry=self._telemetry_received,
            key_ack=self.keys.ack_received,
            connected=self._channel_connected,
            wrap_key=self._wrap_key_received,
        )
        if rabbit is not None:
            self.channel = amqp_source(rabbit, traffic, site_duties=True)
        else:
            self.channel = MqttChannel(
                channel_settings(self.settings, Endpoint(host, op.port), site_duties=True),
                client_context(site, passphrase),
                traffic,
            )
        self._tasks.append(asyncio.create_task(self.channel.run(self._stop), name="channel"))
        try:
            await asyncio.wait_for(self.channel.connected.wait(), 15)
        except TimeoutError as exc:
            raise BrokerError("the registrar could not connect to its own broker") from exc
        if site.retiring_ca_cert is not None and migration_requested(self.home):
            await self.migrate_ca()  # the retained commands died with the previous broker
        if self.settings.est_port is not None:
            await self._start_est()
        self._tasks += [
            asyncio.create_task(self._loop(self.settings.watch_interval, self._watch), name="w"),
            asyncio.create_task(self._loop(self.settings.watch_interval, self._watch_broker)),
            asyncio.create_task(self._loop(self.settings.crl_check_interval, self._crl_tick)),
            asyncio.create_task(self._loop(self.settings.status_interval, self._write_status)),
        ]
        if store.backend == "postgres":  # SQLite: one instance, no one else's changes
            self._follow_instances(site_duties=True)
        await self._start_ops()
        await self._write_status()
        log.info(
            "registrar for site %s running: registration %s, operational %s (%s broker)",
            self.home.site_id,
            self.registration_endpoint,
            self.operational_endpoint,
            self.settings.broker,
        )

    async def _start_est(self) -> None:
        """The EST listener (:mod:`registrar.est`): the same service entry points as the
        MQTT channel."""
        tls = await asyncio.to_thread(est_context, self.home, self.secrets)
        service = self._require(self.service)

        def ca_certificates() -> list[x509.Certificate]:
            site = self._require(self.site)
            return [service.issuing_authority().certificate, site.root]

        est = EstServer(
            EstTraffic(
                register=self._register_request,
                renew=self._renew_request,
                ca_certificates=ca_certificates,
                clock=self.clock,
                ldevid_issuers=service.accepted_ldevid_issuers,
            ),
            tls,
        )
        port = self._require(self.settings.est_port)
        await est.start(self.settings.est_host or self.settings.host, port)
        self.est = est

    async def stop(self) -> None:
        """Graceful: stop taking requests, let in-flight registrations finish and commit,
        stop the broker, close the store, release the site."""
        self._stop.set()
        if self.est is not None:
            await self.est.stop()
            self.est = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        await self._stop_long_command()
        for task in self._tasks:
            if task.get_name() != "channel":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._tasks.clear()
        if self.keys is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.keys.wait_idle(), 10)
        if self.superseded is not None:
            await self.superseded.close()
            self.superseded = None
        if self.broker is not None:
            with contextlib.suppress(BrokerError):
                await self.broker.stop()
            self.broker = None
            self._mosquitto = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        with contextlib.suppress(OSError):
            status_path(self.home).unlink()
        if self._duties is not None:
            await self._duties.release()
            self._duties = None
        if self._lock_cm is not None:
            self._lock_cm.__exit__(None, None, None)
            self._lock_cm = None

    async def _start_ops(self) -> None:
        """The operations listener (``/metrics``, ``/healthz``; :mod:`registrar.ops_server`)."""
        if self.settings.metrics is None:
            return
        ops = OpsServer(self.metrics, self.health, self.settings.metrics)
        await ops.start()
        self.ops = ops

    async def _loop(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while not self._stop.is_set():
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except (RegistrarError, TrustCoreError) as exc:
                # A known failure (e.g. the broker did not confirm a CRL reload in time): one
                # line; the step runs again at the next tick and repairs what is missing.
                log.error("registrar background step %s failed: %s", step.__name__, exc)
            except Exception:
                log.exception("registrar background step %s failed", step.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    # -- other instances (registrar.instances) --------------------------------------------

    def _follow_instances(self, *, site_duties: bool) -> OtherInstances:
        """Other instances on the same PostgreSQL store (nothing to follow on SQLite)."""
        others = OtherInstances(
            store=self._require(self.store),
            revoked=self.revoked,
            site_crl=lambda: self.home.current / "site-crl.pem",
            reload_payload_key=self._reload_payload_key,
            superseded=self.superseded if site_duties else None,
        )
        self._tasks.append(asyncio.create_task(others.follow(), name="instances"))
        if site_duties:
            self._tasks.append(asyncio.create_task(others.reconcile_superseded(), name="crl"))
        return others

    def _admission_plugins(self) -> tuple[NamedPlugin[AdmissionContext], ...] | None:
        """The site's admission plugins (``SITE/plugins.json``); a listed plugin that is
        not installed or rejects its settings stops the start (fail closed, loudly)."""
        settings = read_site_plugins(self.home.path)
        if not settings:
            return None
        loaded = load_site_plugins(settings)
        if loaded.problems:
            raise ConfigError("admission plugins: " + "; ".join(loaded.problems))
        return loaded.plugins


async def run_registrar(
    home: SiteHome,
    secrets: SiteSecrets,
    settings: AppSettings,
    *,
    stop: asyncio.Event,
    ready: Callable[[RegistrarApp], None] | None = None,
) -> None:
    """Start (a standby waits for the site duties meanwhile), call ``ready``, run until
    ``stop`` is set, stop gracefully. ``RegistrarError`` when the registrar had to stop on
    its own (the site-duties lock was lost: another registrar may run them now)."""
    app = RegistrarApp(home, secrets, settings)
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # stopped while standing by (or starting)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()
    halted = asyncio.ensure_future(app.halted.wait())
    try:
        if ready is not None:
            ready(app)
        await asyncio.wait({stopping, halted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        halted.cancel()
        await app.stop()
    if app.halted.is_set() and not stop.is_set():
        raise ConfigError(
            "the site-duties lock was lost (store unreachable): stopped, so that the duties "
            "never run twice; start again when the store is back"
        )


@contextlib.asynccontextmanager
async def running(
    home: SiteHome, secrets: SiteSecrets, settings: AppSettings | None = None
) -> AsyncIterator[RegistrarApp]:
    """``async with running(home, secrets) as app:`` (tests, embedding)."""
    app = RegistrarApp(home, secrets, settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
