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
  (``SITE/run/commands``): ``revoke``, ``import-revocations``, ``rotate-payload-key`` and
  ``send-command`` and ``approve`` are applied live (polled every ``watch_interval``,
  0.2 s) and answered
  with a result file; it also notices a re-commission (``current`` switched) and reloads
  the trust material;
* **CRL timer** — re-issues the site CA CRL when less than half of its validity is left
  and reloads the broker; reports root/station CRLs that are stale (fail closed) or close
  to it, loudly, every check;
* **status** — ``SITE/run/status.json`` (atomic, every ``status_interval``): listeners,
  counts, telemetry, CRL dates, alerts; ``registrar status`` reads it.

Exactly one registrar runs a site's duties: it holds ``SITE/run/registrar.lock``
(``flock``) for its whole life, and an offline CLI command holds the same lock while it
works, so the two never write the site at the same time (see :func:`instance_lock`); with
a PostgreSQL store it also holds the site-duties advisory lock (:mod:`registrar.leadership`,
``--standby`` to take over). Further instances (``--instance N --join HOST:PORT``, Mosquitto
and PostgreSQL) only serve registrations and renewals beside it and follow the others
through the store's change feed (:mod:`registrar.instances`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets as _random
import ssl
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_config.render import MAX_REGISTRAR_INSTANCES, instance_identity
from registrar.broker import REGISTRAR_IDENTITY, Broker, BrokerSettings, BrokerTls, Endpoint
from registrar.channel import (
    MqttChannel,
    MqttChannelSettings,
    RequestSource,
    SiteTraffic,
)
from registrar.errors import BrokerError, ConfigError, RegistrarError, StoreError
from registrar.est import EstServer, EstTraffic, est_server_context
from registrar.instances import OtherInstances
from registrar.key_distribution import KeyDistributor
from registrar.ldevid_policy import policy_json, read_ldevid_policy
from registrar.leadership import SiteDuties
from registrar.metrics import (
    CrlReading,
    Health,
    HealthInputs,
    Readings,
    RegistrarMetrics,
    decide_health,
)
from registrar.ops_server import OpsServer
from registrar.payload_keys import PayloadKeyring
from registrar.plugins import load_site_plugins, read_site_plugins
from registrar.revocation import (
    ImportResult,
    RevocationAwareVerifier,
    RevokeResult,
    crl_numbers,
    enforce_revocation_list,
    hq_data_freshness,
    import_revocation_list,
    revoke_device,
)
from registrar.rollover import (
    RolloverError,
    dependents,
    migration_requested,
    note_migration,
    retire_site_ca,
)
from registrar.service import FactorySighting, RegistrationService, SiteAuthority
from registrar.site import (
    SITE_CRL_VALIDITY,
    CommissionedSite,
    SiteHome,
    SiteSecrets,
    load_commissioned_site,
    reissue_service_certificates,
    reissue_site_crl,
    revocation_lock,
)
from registrar.store import Store, StoreLocation, parse_store_location
from registrar.supersede import SupersededCertificates
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import load_ssl_identity
from trustcore.errors import InvalidValueError, TrustCoreError
from trustcore.identity import DeviceId
from trustcore.keys import Signer, spki_der
from trustcore.payload import PayloadError, envelope_key_id, open_payload, seal_payload
from trustcore.policy_chain import NamedPlugin
from trustcore.profiles import issue_service_client_certificate
from trustcore.registration import AdmissionContext, RegistrationError, RegistrationRequest
from trustcore.renewal import LdevidPolicy, RenewalRequest
from trustcore.revocation import RevocationList
from trustcore.site_rollover import build_renew_now
from trustcore.topics import COMMAND_LEVEL, ROLLOVER_LEVEL, device_topic
from trustcore.wrap_key import parse_wrap_key_registration, verify_wrap_key

__all__ = [
    "AppSettings",
    "RegistrarApp",
    "RotationResult",
    "import_json",
    "instance_context",
    "instance_lock",
    "read_status",
    "registrar_running",
    "revoke_json",
    "run_registrar",
    "running",
    "spool_dir",
    "status_path",
    "store_location",
    "store_path",
    "submit_command",
]

if TYPE_CHECKING:
    from registrar.broker.mosquitto import MosquittoBroker
    from registrar.broker.rabbitmq_site import RabbitMQSite, RabbitMQSiteSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Re-issue the site CRL when less than this is left before its nextUpdate.
SITE_CRL_REFRESH_MARGIN = SITE_CRL_VALIDITY / 2
#: Root/station CRLs closer than this to nextUpdate are reported (warning) in status/logs.
CRL_WARNING_MARGIN = timedelta(days=1)
#: A site CA closer than this to its end is reported: time to `registrar rollover-ca`
#: (LDevIDs are cut at the CA's end, so they get shorter and shorter after this point).
SITE_CA_WARNING_MARGIN = timedelta(days=365)
_RECENT = 50
#: The shared-subscription group of a site's registrar instances (Mosquitto).
SHARED_GROUP = "registrars"
#: Validity of a joining instance's in-memory client certificate.
INSTANCE_CERT_VALIDITY = timedelta(days=7)
_SPOOL_COMMANDS = (
    "revoke",
    "import-revocations",
    "rotate-payload-key",
    "send-command",
    "approve",
    "migrate-ca",
    "retire-ca",
)


def store_path(home: SiteHome) -> Path:
    """The registrar database (devices, requests, nonces, events)."""
    return home.path / "registrar.db"


def store_location(home: SiteHome, store: str | None = None) -> StoreLocation:
    """``--store URL`` (``postgresql://…``, ``sqlite:///path`` or a path), or the site
    home's SQLite file when None."""
    return parse_store_location(store) if store else parse_store_location(store_path(home))


def run_dir(home: SiteHome) -> Path:
    path = home.path / "run"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def status_path(home: SiteHome) -> Path:
    return home.path / "run" / "status.json"


def spool_dir(home: SiteHome) -> Path:
    path = run_dir(home) / "commands"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


# ------------------------------------------------------------------------ single instance


@contextlib.contextmanager
def instance_lock(home: SiteHome, *, wait: float = 0.0) -> Iterator[bool]:
    """Try to take ``SITE/run/registrar.lock``; yield True if this process now holds it
    (no registrar runs: the caller may work offline), False if a running registrar (or
    another offline command, for longer than ``wait`` seconds) holds it."""
    fd = os.open(run_dir(home) / "registrar.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def registrar_running(home: SiteHome) -> bool:
    with instance_lock(home) as free:
        return not free


def read_status(home: SiteHome) -> dict[str, Any] | None:
    """The running registrar's status document, or None when none runs."""
    if not registrar_running(home):
        return None
    try:
        data = json.loads(status_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any], *, sync: bool = True) -> None:
    """Atomically (a reader polls these files), 0600; ``sync=False`` for status snapshots."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        write_private_file(path, text.encode(), overwrite=True, sync=sync)
    except SignerError as exc:
        raise RegistrarError(exc.message, reason="io_error") from exc


# -------------------------------------------------------------------------- command spool


def submit_command(
    home: SiteHome,
    command: str,
    args: dict[str, Any],
    *,
    data: bytes | None = None,
    timeout: float = 10.0,
) -> dict[str, Any] | None:
    """Hand ``command`` to the running registrar and wait for its answer (the result
    document: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error", "reason"}``).
    None if no answer came within ``timeout`` (the request stays queued: a registrar
    applies pending requests when it starts)."""
    if command not in _SPOOL_COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    spool = spool_dir(home)
    ident = f"{time.time_ns():020d}-{_random.token_hex(4)}"
    if data is not None:
        data_path = spool / f"{ident}.data"
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        args = {**args, "data": data_path.name}
    _write_json(spool / f"{ident}.request.json", {"v": 1, "command": command, "args": args})
    result_path = spool / f"{ident}.result.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text(encoding="utf-8"))
            except ValueError:
                time.sleep(0.02)  # being written (renamed into place, so rare)
                continue
            result_path.unlink(missing_ok=True)
            return result if isinstance(result, dict) else None
        time.sleep(0.05)
    return None


#: Largest spool file read (a revocation list or a command payload is far smaller).
MAX_SPOOL_FILE = 16 * 1024 * 1024


def _read_spool_file(path: Path) -> bytes:
    """Read a spool file that this user wrote: never through a symlink (which could make
    the registrar read, and send-command send, any file it can read), only a regular file
    owned by the registrar's own user, and bounded. Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise PermissionError(f"{path.name} is not a regular file of this user")
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            data = handle.read(MAX_SPOOL_FILE + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_SPOOL_FILE:
        raise OSError(f"{path.name} is larger than {MAX_SPOOL_FILE} bytes")
    return data


# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class AppSettings:
    """How ``registrar run`` runs (CLI options; validated here)."""

    broker: Literal["embedded", "mosquitto", "rabbitmq"] = "embedded"
    host: str = "127.0.0.1"
    registration_port: int = 8883
    operational_port: int = 8884
    #: ``--est-port``: the EST (RFC 7030) listener (:mod:`registrar.est`); None: none.
    #: Served by the instance that runs the site duties.
    est_port: int | None = None
    #: ``--est-host``; None: :attr:`host`.
    est_host: str | None = None
    watch_interval: float = 0.2
    status_interval: float = 0.5
    crl_check_interval: float = 60.0
    mosquitto_executable: str = "mosquitto"
    concurrency: int = 512
    #: ``--store URL``; None: the site home's SQLite file (:func:`store_location`).
    store: str | None = None
    #: ``--instance N``: this registrar's number among the site's instances (1: the one
    #: that runs the broker and the site duties; 2..16 join it, see :attr:`join`).
    instance: int = 1
    #: ``--join HOST:PORT``: the operational listener of the Mosquitto broker that instance
    #: 1 runs; this instance serves requests there and starts no broker of its own.
    join: Endpoint | None = None
    #: ``--standby`` (PostgreSQL store): wait for the site duties while another registrar
    #: of the site holds them, and take over when it stops (:mod:`registrar.leadership`).
    standby: bool = False
    #: ``--broker rabbitmq``: the operator's cluster (nodes, auth backend port, CRL dirs).
    #: Every instance consumes the one quorum queue (no --join); instance 1 runs the site
    #: duties (:mod:`registrar.broker.rabbitmq_site`).
    rabbitmq: RabbitMQSiteSettings | None = None
    #: ``--metrics-port`` / ``--metrics-host``: serve ``/metrics`` and ``/healthz`` there
    #: (:mod:`registrar.ops_server`); None: no operations listener.
    metrics: Endpoint | None = None

    def __post_init__(self) -> None:
        if self.broker not in ("embedded", "mosquitto", "rabbitmq"):
            raise ConfigError(f"unknown broker {self.broker!r}")
        if not 1 <= self.instance <= MAX_REGISTRAR_INSTANCES:
            raise ConfigError(f"--instance must be 1..{MAX_REGISTRAR_INSTANCES}")
        if (self.broker == "rabbitmq") != (self.rabbitmq is not None):
            raise ConfigError("--broker rabbitmq needs the cluster's nodes, and only it")
        if self.broker == "rabbitmq":
            if self.join is not None:
                raise ConfigError("on RabbitMQ every instance consumes the queue: no --join")
        elif self.instance > 1 or self.join is not None:
            if self.broker != "mosquitto":
                raise ConfigError(
                    "the embedded broker serves one registrar instance (MQTT 3.1.1 has no "
                    "shared subscriptions): several instances need --broker mosquitto"
                )
            if self.join is None or self.instance == 1:
                raise ConfigError(
                    "instance 1 runs the broker; instances 2..16 join it with "
                    "--instance N --join HOST:PORT (its operational listener)"
                )
            if self.standby:
                raise ConfigError(
                    "--standby is for a registrar that runs the site duties, not --join"
                )
        if self.est_port is not None and (self.join is not None or self.instance > 1):
            raise ConfigError("--est-port is served by instance 1 (the site duties)")
        ports = [self.registration_port, self.operational_port, self.est_port or 0]
        if self.metrics is not None:
            ports.append(self.metrics.port)
        for port in ports:
            if not 0 <= port <= 65535:
                raise ConfigError(f"bad port {port}")
        if min(self.watch_interval, self.status_interval, self.crl_check_interval) <= 0:
            raise ConfigError("intervals must be positive")


@dataclass(frozen=True)
class RotationResult:
    key_id: str
    updates_published: int


@dataclass
class _Telemetry:
    messages: int = 0
    rejected: int = 0
    #: Refused because their payload key is past its grace period (also in ``rejected``).
    retired_key: int = 0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_RECENT))


# ------------------------------------------------------------------------------ the app


def _operational_tls(home: SiteHome, site: CommissionedSite, passphrase: bytes) -> BrokerTls:
    """Broker files through the ``current`` symlink, NOT resolved: every reload re-reads
    the state that is current then (a re-commission, a re-issued CRL)."""
    current = home.current
    return BrokerTls(
        server_cert=current / "broker.pem",
        server_key=home.key_path("broker"),
        server_key_passphrase=passphrase,
        registration_cas=current / "registration-cas.pem",
        operational_cas=current / "operational-cas.pem",
        crl_file=current / "crls.pem",
    )


def _client_context(site: CommissionedSite, passphrase: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cadata=site.root.public_bytes(serialization.Encoding.PEM).decode("ascii")
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(site.client_cert, site.client_key, password=passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the registrar client certificate: {exc}") from exc
    return ctx


def instance_context(site: CommissionedSite, instance: int, now: datetime) -> ssl.SSLContext:
    """The client identity of registrar instance ``instance`` (2..16): a fresh key made in
    memory and a certificate for ``registrar.<n>@site`` from the site CA, valid for a week
    from ``now`` (an instance restarts with a new one). The key never leaves this process."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + INSTANCE_CERT_VALIDITY, site.site_ca_cert.not_valid_after_utc)
    cert = issue_service_client_certificate(
        site.site_ca_cert,
        site.site_ca_key.private_key(),
        key.public_key(),
        service_name=instance_identity(REGISTRAR_IDENTITY, instance),
        organization=site.organization,
        not_before=now - timedelta(minutes=5),
        not_after=not_after,
    )
    pem = serialization.Encoding.PEM
    ctx = ssl.create_default_context(cadata=site.root.public_bytes(pem).decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_ssl_identity(ctx, cert.public_bytes(pem) + site.site_ca_cert.public_bytes(pem), key)
    return ctx


def _amqp_source(rabbit: RabbitMQSite, traffic: SiteTraffic, *, site_duties: bool) -> RequestSource:
    """RabbitMQ: requests from the quorum queue (competing consumers: every instance is
    equal); the site-duty holder also reads telemetry and key acknowledgements."""
    from registrar.channel_amqp import AmqpRequestSource, SiteEvents

    events = None
    if site_duties and traffic.telemetry is not None and traffic.key_ack is not None:
        events = SiteEvents(traffic.telemetry, traffic.key_ack)
    return AmqpRequestSource(
        rabbit.amqp,
        traffic.register,
        renew=traffic.renew,
        site_events=events,
        on_connected=traffic.connected,
        retain_as_plain=True,
    )


def _site_authority(
    site: CommissionedSite, ldevid_validity: timedelta = timedelta(days=365)
) -> SiteAuthority:
    """The issuing site CA (and, during a rollover overlap, the retiring one)."""
    retiring: tuple[tuple[x509.Certificate, Signer], ...] = ()
    if site.retiring_ca_cert is not None and site.retiring_ca_key is not None:
        retiring = ((site.retiring_ca_cert, site.retiring_ca_key),)
    return SiteAuthority(
        site.site_ca_cert, site.site_ca_key, site.organization, ldevid_validity, retiring=retiring
    )


def _crl_dates(path: Path) -> list[x509.CertificateRevocationList]:
    data = path.read_bytes()
    end = b"-----END X509 CRL-----"
    return [
        x509.load_pem_x509_crl(block.strip() + b"\n" + end + b"\n")
        for block in data.split(end)[:-1]
    ]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


class RegistrarApp:
    """One running site registrar. Use :meth:`start` / :meth:`stop`, or :func:`run_registrar`."""

    def __init__(
        self,
        home: SiteHome,
        secrets: SiteSecrets,
        settings: AppSettings | None = None,
        *,
        workdir: Path | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.home = home
        #: The registrar's clock for payload-key rotation (the grace period); tests move it.
        self._clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.keys: KeyDistributor | None = None
        #: The Mosquitto process this registrar owns (restarted by the watcher if it dies).
        self._mosquitto: MosquittoBroker | None = None
        self._broker_restarts = 0
        self.secrets = secrets
        self.settings = settings or AppSettings()
        self._workdir = workdir
        self._lock_cm: contextlib.AbstractContextManager[bool] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._telemetry = _Telemetry()
        self._alerts: list[str] = []
        self._started = 0.0
        self._state_target = ""
        self.site: CommissionedSite | None = None
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.service: RegistrationService | None = None
        self.channel: RequestSource | None = None
        self.est: EstServer | None = None
        self.keyring: PayloadKeyring | None = None
        self.revocations: RevocationList | None = None
        self._revoked: set[DeviceId] = set()
        self.superseded: SupersededCertificates | None = None
        self._duties: SiteDuties | None = None
        self._background: set[asyncio.Task[None]] = set()
        #: Set when this registrar must stop on its own (the site-duties lock was lost).
        self.halted = asyncio.Event()
        #: Prometheus registry of this app (``--metrics-port``; docs/operations.md).
        self.metrics = RegistrarMetrics(self._readings)
        self.ops: OpsServer | None = None
        #: The enforced CRLs' dates, refreshed by :meth:`check_crls` (metrics, health).
        self._crl_readings: tuple[CrlReading, ...] = ()

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
        self._revoked.update(await store.revoked_device_ids())
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
            clock=self._clock,
        )
        self.service.use_site_authority(_site_authority(site, policy.validity))  # + retiring
        return site, store, policy

    def _channel_settings(self, endpoint: Endpoint, *, site_duties: bool) -> MqttChannelSettings:
        """Mosquitto: MQTT v5, requests through ``$share/registrars/…`` (one instance or
        several, the same path); amqtt: MQTT 3.1.1, one instance."""
        mosquitto = self.settings.broker == "mosquitto"
        return MqttChannelSettings(
            endpoint=endpoint,
            client_id=instance_identity(REGISTRAR_IDENTITY, self.settings.instance),
            protocol="5" if mosquitto else "3.1.1",
            shared_group=SHARED_GROUP if mosquitto else None,
            site_duties=site_duties,
            workers=self.settings.concurrency,
        )

    async def _start_joined(self, join: Endpoint | None) -> None:
        """Instance 2..16: serve requests on the broker instance 1 runs. No broker, no
        spool, no CRL timer, no key distribution (instance 1's duties); it follows the
        other instances through the store's change feed (revocations, payload keys).
        On RabbitMQ it also serves the auth backend (every instance does)."""
        self._started = time.time()
        site, store, _policy = await self._open_service()
        others = self._follow_instances(site_duties=False)
        self._require(self.service).on_superseded = others.superseded_on_crl
        traffic = SiteTraffic(register=self._register, renew=self._renew)
        if join is None:
            rabbit = await self._start_rabbitmq(site, store)
            self.channel = _amqp_source(rabbit, traffic, site_duties=False)
            join = rabbit.registration_endpoint
        else:
            tls = await asyncio.to_thread(
                instance_context, site, self.settings.instance, self._clock()
            )
            self.channel = MqttChannel(
                self._channel_settings(join, site_duties=False), tls, traffic
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
            _operational_tls(self.home, site, self.secrets.passphrase()).crl_file,
        )
        await rabbit.start()
        self.broker = rabbit
        return rabbit

    async def _start(self) -> None:
        self._started = time.time()
        await self._take_site_duties()
        passphrase = self.secrets.passphrase()
        await asyncio.to_thread(self.refresh_site_crl_if_due)
        await asyncio.to_thread(self.refresh_service_certificates_if_due)
        site, store, policy = await self._open_service()
        self.check_crls()
        workdir = self._workdir or run_dir(self.home) / f"broker-{self.settings.broker}"
        settings = BrokerSettings(
            tls=_operational_tls(self.home, site, passphrase),
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
        for device in sorted(self._revoked, key=lambda d: d.value):
            await broker.block(device.value)
        # A re-commission while we were down may have brought a newer HQ list.
        await self._enforce_list()
        self.superseded = SupersededCertificates(
            home=self.home,
            secrets=self.secrets,
            broker=broker,
            handover_seconds=policy.handover_seconds,
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
            clock=self._clock,
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
            connected=self._catch_up_key_updates,
            wrap_key=self._wrap_key_received,
        )
        if rabbit is not None:
            self.channel = _amqp_source(rabbit, traffic, site_duties=True)
        else:
            self.channel = MqttChannel(
                self._channel_settings(Endpoint(host, op.port), site_duties=True),
                _client_context(site, passphrase),
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

    def _est_context(self) -> ssl.SSLContext:
        """The EST listener's TLS from the current files: the broker's server certificate,
        the client CAs of both listeners (re-read after a re-commission or re-issue)."""
        current = self.home.current
        return est_server_context(
            current / "broker.pem",
            self.home.key_path("broker"),
            self.secrets.passphrase(),
            (current / "registration-cas.pem", current / "operational-cas.pem"),
        )

    async def _reload_est(self) -> None:
        if self.est is not None:
            self.est.use_tls(await asyncio.to_thread(self._est_context))

    async def _start_est(self) -> None:
        """The EST listener (:mod:`registrar.est`): the same service entry points as the
        MQTT channel."""
        tls = await asyncio.to_thread(self._est_context)
        service = self._require(self.service)

        def ca_certificates() -> list[x509.Certificate]:
            site = self._require(self.site)
            return [service.issuing_authority().certificate, site.root]

        est = EstServer(
            EstTraffic(
                register=self._register_request,
                renew=self._renew_request,
                ca_certificates=ca_certificates,
                clock=self._clock,
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

    @property
    def registration_endpoint(self) -> Endpoint:
        return self._require(self.broker).registration_endpoint

    @property
    def metrics_endpoint(self) -> Endpoint | None:
        """Where ``/metrics`` and ``/healthz`` are served (None: not enabled)."""
        return None if self.ops is None else self.ops.endpoint

    # -- operations: metrics and health (registrar.metrics, registrar.ops_server) -------------

    async def _start_ops(self) -> None:
        if self.settings.metrics is None:
            return
        ops = OpsServer(self.metrics, self.health, self.settings.metrics)
        await ops.start()
        self.ops = ops

    def _revocation_data_expires(self) -> float | None:
        if self.revocations is None or self.site is None:
            return None
        return self.revocations.issued + self.site.max_offline_days * 86_400.0

    def _readings(self) -> Readings:
        """A snapshot for the Prometheus collector (scrape time, in the event loop)."""
        service, broker, keys, channel = self.service, self.broker, self.keys, self.channel
        return Readings(
            now=self._clock().timestamp(),
            answers=dict(service.stats) if service is not None else {},
            connected_devices=broker.connected_devices() if broker is not None else 0,
            broker_connected=channel is not None and channel.connected.is_set(),
            broker_restarts=self._broker_restarts,
            crls=self._crl_readings,
            revocation_data_expires=self._revocation_data_expires(),
            key_updates_sent=keys.updates_sent if keys is not None else 0,
            key_updates_acknowledged=keys.acks if keys is not None else 0,
            telemetry_messages=self._telemetry.messages,
            telemetry_rejected=self._telemetry.rejected,
        )

    async def health(self) -> Health:
        """``/healthz``: the store answers (2 s), the registrar's MQTT session is up, the
        HQ revocation data and HQ-signed CRLs are not expired (on the app's clock)."""
        store_error: str | None = None
        if self.store is None:
            store_error = "not open"
        else:
            try:
                await asyncio.wait_for(self.store.ping(), 2.0)
            except TimeoutError:
                store_error = "no answer in 2 s"
            except RegistrarError as exc:
                store_error = str(exc)
        now = self._clock().timestamp()
        expires = self._revocation_data_expires()
        own = set()
        if self.site is not None:
            own.add(self.site.site_ca_cert.subject.rfc4514_string())
            if self.site.retiring_ca_cert is not None:
                own.add(self.site.retiring_ca_cert.subject.rfc4514_string())
        stale = tuple(
            crl.issuer
            for crl in self._crl_readings
            if crl.issuer not in own and (crl.next_update is None or crl.next_update < now)
        )
        return decide_health(
            HealthInputs(
                store_error=store_error,
                broker_connected=self.channel is not None and self.channel.connected.is_set(),
                revocation_data_left=None if expires is None else expires - now,
                stale_crls=stale,
            )
        )

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
            locally_revoked=self._revoked,
            max_offline_days=site.max_offline_days,
        )

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
            revoked=self._revoked,
            site_crl=lambda: self.home.current / "site-crl.pem",
            reload_payload_key=self._reload_payload_key,
            superseded=self.superseded if site_duties else None,
        )
        self._tasks.append(asyncio.create_task(others.follow(), name="instances"))
        if site_duties:
            self._tasks.append(asyncio.create_task(others.reconcile_superseded(), name="crl"))
        return others

    async def _reload_payload_key(self) -> None:
        site, service = self._require(self.site), self._require(self.service)
        self.keyring = await asyncio.to_thread(site.payload_keys.load)
        service.use_payload_key(self.keyring.current)
        log.info(
            "payload key %s in use (rotated by another instance)", self.keyring.current.key_id.hex()
        )

    # -- operations (spool commands and in-process callers) ---------------------------------

    async def revoke(self, device_id: DeviceId, reason: str = "unspecified") -> RevokeResult:
        result = await revoke_device(
            home=self.home,
            secrets=self.secrets,
            store=self._require(self.store),
            device_id=device_id,
            reason=reason,
            broker=self._require(self.broker),
        )
        self._revoked.add(device_id)
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
        self._revoked.update(DeviceId(r.device_id) for r in result.revoked)
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
        self._revoked.update(DeviceId(r.device_id) for r in done)

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
        moment = datetime.now(UTC)
        # page by page: this runs at start-up too, and must not read the registry at once
        async for page in store.device_pages(status="registered"):
            for record in dependents(page, retiring, moment):
                device = DeviceId(record.device_id)
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
                topic = device_topic(DeviceId(record.device_id), ROLLOVER_LEVEL)
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

    # -- telemetry ----------------------------------------------------------------------------

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
        """The wrap key of a device enrolled over EST (:mod:`trustcore.wrap_key`): verified,
        recorded once, then the current payload key goes to the device as a payload-key
        update. A refusal is logged and written as an event; the device gets no answer
        (it keeps waiting for the update, as for a lost message)."""
        store, keys, service = self.store, self.keys, self.service
        if store is None or keys is None or service is None:
            return
        try:
            message = parse_wrap_key_registration(payload)
            record = await store.device(device)
            registered = record is not None and record.status == "registered"
            wrap = verify_wrap_key(
                message,
                topic_device_id=device,
                site_cas=service.accepted_ldevid_issuers(),
                current_serial=int(record.ldevid_serial, 16) if registered and record else None,
                now=self._clock(),
            )
            assert record is not None
            der = spki_der(wrap)
            stored = await store.set_wrap_key(device, record.ldevid_serial, der)
            if stored is None or stored.wrap_key_der != der:
                raise RegistrationError(f"{device} has a wrap key already", reason="bad_wrap_key")
            await keys.offer(stored)
            log.info("recorded the wrap key of %s; payload key sent", device)
        except RegistrationError as exc:
            log.info("refused the wrap key of %s: %s", device, exc)
            store.note_event(device, "refused", f"wrap key: {exc}"[:500])
        except (StoreError, BrokerError) as exc:
            log.warning("wrap key of %s not recorded now: %s", device, exc)

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
        try:
            plaintext = open_payload(keyring.keys, topic, payload)
            key_id = envelope_key_id(payload)
        except PayloadError as exc:
            self._telemetry.rejected += 1
            log.info("telemetry of %s does not open: %s", device, exc)
            return
        kid = key_id.hex()
        if not keys.check_telemetry(device, key_id, retained=retained):
            self._telemetry.rejected += 1
            self._telemetry.retired_key += 1
            log.warning(
                "telemetry of %s under retired payload key %s refused (grace period over)",
                device,
                kid,
            )
            return
        self._telemetry.messages += 1
        self._telemetry.recent.append(
            {
                "device_id": device.value,
                "key_id": kid,
                "size": len(plaintext),
                "sha256": hashlib.sha256(plaintext).hexdigest(),
                "time": round(time.time(), 3),
            }
        )

    # -- background duties --------------------------------------------------------------------

    async def _watch(self) -> None:
        mosquitto = self._mosquitto
        if mosquitto is not None and mosquitto.exited:
            # Same ports and blocks; the site channel reconnects by itself and re-sends the
            # payload-key updates the dead broker's retained messages held. A failed restart
            # is retried at the next tick; spool commands are still answered meanwhile.
            try:
                if await mosquitto.revive():
                    self._broker_restarts += 1
            except (BrokerError, OSError) as exc:
                log.error("could not restart mosquitto: %s", exc)
        target = str(self.home.current.readlink())
        if target != self._state_target:
            await self._recommissioned(target)
        spool = spool_dir(self.home)
        for request in sorted(spool.glob("*.request.json")):
            await self._apply_request(request)

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
        service.use_site_authority(_site_authority(site, validity))
        if self.channel is not None:
            self.channel.use_tls(_client_context(site, self.secrets.passphrase()))
        await self._require(self.broker).reload_crls()
        await self._reload_est()
        await self._enforce_list()
        await self._catch_up_key_updates()
        self.check_crls()

    async def _apply_request(self, request: Path) -> None:
        ident = request.name.removesuffix(".request.json")
        result_path = request.with_name(f"{ident}.result.json")
        data_path: Path | None = None
        try:
            doc = json.loads(_read_spool_file(request).decode("utf-8"))
            command, args = doc["command"], doc["args"]
            if "data" in args:
                data_path = request.with_name(Path(str(args["data"])).name)
            result = await self._dispatch(command, args, data_path)
            answer: dict[str, Any] = {"ok": True, "result": result}
        except (RegistrarError, InvalidValueError) as exc:
            answer = {"ok": False, "error": str(exc.args[0]), "reason": exc.reason}
        except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc!r}", "reason": "bad_request"}
        except Exception as exc:
            # Whatever else goes wrong, the request is answered and removed: a request left
            # in the spool would fail first on every tick and block every later command
            # (revocations included), even across restarts.
            log.exception("spool request %s failed", request.name)
            answer = {"ok": False, "error": f"failed: {exc!r}", "reason": "internal_error"}
        _write_json(result_path, answer)
        request.unlink(missing_ok=True)
        if data_path is not None:
            data_path.unlink(missing_ok=True)

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

    async def _dispatch(self, command: str, args: dict[str, Any], data: Path | None) -> Any:
        if command == "approve":
            device = DeviceId(args["device_id"])
            pending = await self._require(self.store).approve(device, at=int(time.time()))
            return {"device_id": device.value, "was_pending": pending}
        if command == "revoke":
            result = await self.revoke(
                DeviceId(args["device_id"]), args.get("reason", "unspecified")
            )
            return revoke_json(result)
        if command == "import-revocations":
            if data is None:
                raise ValueError("no list")
            imported = await self.import_revocations(_read_spool_file(data))
            return import_json(imported)
        if command == "rotate-payload-key":
            rotation = await self.rotate_payload_key()
            return {"key_id": rotation.key_id, "updates_published": rotation.updates_published}
        if command == "migrate-ca":
            return {"published": await self.migrate_ca()}
        if command == "retire-ca":
            return await self.retire_ca()
        if command == "send-command":
            if data is None:
                raise ValueError("no command payload")
            topic = await self.send_command(DeviceId(args["device_id"]), _read_spool_file(data))
            return {"topic": topic}
        raise ValueError(f"unknown command {command!r}")

    def refresh_site_crl_if_due(
        self, *, now: datetime | None = None, crl_number: Callable[[int], int] | None = None
    ) -> bool:
        """Re-issue the site CA CRL when less than half of its validity is left (so a
        registrar that is down for a few days still finds a valid one); True if it did.
        ``crl_number``: the store's sequence (:func:`registrar.revocation.crl_numbers`)."""
        moment = datetime.now(UTC) if now is None else now
        with revocation_lock(self.home):
            crl = x509.load_pem_x509_crl((self.home.current / "site-crl.pem").read_bytes())
            next_update = crl.next_update_utc
            if next_update is not None and next_update - moment > SITE_CRL_REFRESH_MARGIN:
                return False
            fresh = reissue_site_crl(self.home, self.secrets, now=moment, crl_number=crl_number)
        log.info(
            "site CRL re-issued (was valid until %s, now until %s)",
            _iso(next_update),
            _iso(fresh.next_update_utc),
        )
        return True

    def refresh_service_certificates_if_due(self, *, now: datetime | None = None) -> bool:
        """Re-issue the broker server certificate and the registrar client certificate from
        the site CA key once they pass half of their life (docs/site.md, "A year without
        HQ"): an HQ bundle is not needed for them, so a site cut off from HQ keeps its
        operational listener. True if it did (reload the brokers, use the new client
        certificate)."""
        moment = datetime.now(UTC) if now is None else now
        with revocation_lock(self.home):
            end = reissue_service_certificates(self.home, self.secrets, now=moment)
        if end is None:
            return False
        log.info("broker and registrar service certificates re-issued (valid until %s)", _iso(end))
        return True

    async def _renew_service_certificates(self) -> bool:
        """The live half of :meth:`refresh_service_certificates_if_due`: the registrar's
        own MQTT session uses the new client certificate from its next connect; the caller
        reloads the brokers (new handshakes get the new server certificate; a reload drops
        no session). True if they were re-issued."""
        if not await asyncio.to_thread(self.refresh_service_certificates_if_due):
            return False
        if self.channel is not None and self.site is not None:
            ctx = await asyncio.to_thread(_client_context, self.site, self.secrets.passphrase())
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
        moment = datetime.now(UTC) if now is None else now
        if site is None or site.retiring_ca_cert is None:
            return False
        if moment < site.retiring_ca_cert.not_valid_after_utc:
            return False
        log.warning("the retiring site CA has expired: retiring it now")
        await self.retire_ca(now=moment)
        return True

    def check_crls(self, *, now: datetime | None = None) -> list[str]:
        """Root and station CRLs come from HQ only (the registrar cannot re-sign them):
        stale ones make every factory certificate under them fail (fail closed) until a
        new site bundle is commissioned. Said loudly, every check."""
        now = datetime.now(UTC) if now is None else now
        alerts: list[str] = []
        own = set()
        if self.site is not None:
            own.add(self.site.site_ca_cert.subject)
            if self.site.retiring_ca_cert is not None:
                own.add(self.site.retiring_ca_cert.subject)
        try:
            crls = _crl_dates(self.home.current / "crls.pem")
        except (OSError, ValueError) as exc:
            alerts.append(f"CRL file unreadable: {exc}")
            crls = []
        self._crl_readings = tuple(
            CrlReading(
                crl.issuer.rfc4514_string(),
                crl.last_update_utc.timestamp(),
                None if crl.next_update_utc is None else crl.next_update_utc.timestamp(),
            )
            for crl in crls
        )
        for crl in crls:
            if crl.issuer in own:  # the site's own CRLs: re-issued by this registrar
                continue
            issuer = crl.issuer.rfc4514_string()
            next_update = crl.next_update_utc
            if next_update is None or next_update < now:
                alerts.append(
                    f"STALE CRL of {issuer} (nextUpdate {_iso(next_update)}): registrations "
                    "of devices under it are REFUSED (fail closed) until a new site bundle "
                    "from HQ is commissioned"
                )
            elif next_update - now < CRL_WARNING_MARGIN:
                alerts.append(
                    f"CRL of {issuer} runs out at {_iso(next_update)}: commission a new "
                    "site bundle from HQ before then"
                )
        if self.site is not None:
            end = self.site.site_ca_cert.not_valid_after_utc
            if end - now < SITE_CA_WARNING_MARGIN:
                alerts.append(
                    f"the site CA expires at {_iso(end)}: roll it over now (`registrar "
                    "rollover-ca`, docs/site.md); new LDevIDs end with it"
                )
        if self.revocations is not None and self.site is not None:
            # Offline tolerance (docs/site.md): warn from 2/3 of HQ's limit for this site,
            # refuse new registrations past it (the verifier); devices already registered
            # keep working (their LDevIDs and the site CRL are the registrar's own).
            fresh = hq_data_freshness(self.revocations, self.site.max_offline_days, now)
            if fresh.state == "refusing":
                alerts.append("STALE " + fresh.message())
            elif fresh.state == "warning":
                alerts.append(fresh.message())
        for alert in alerts:
            (log.error if "STALE" in alert else log.warning)("%s", alert)
        self._alerts = alerts
        return alerts

    def _hq_data_status(self) -> dict[str, object] | None:
        """The status.json metric for the age of the newest HQ revocation data (the alert
        and the log line come from :meth:`check_crls`)."""
        if self.revocations is None or self.site is None:
            return None
        fresh = hq_data_freshness(self.revocations, self.site.max_offline_days, datetime.now(UTC))
        return fresh.to_json()

    async def _write_status(self) -> None:
        broker, store, service = self.broker, self.store, self.service
        if broker is None or store is None or service is None:
            return
        counts = await store.counts()
        site_crl = x509.load_pem_x509_crl((self.home.current / "site-crl.pem").read_bytes())
        doc: dict[str, Any] = {
            "v": 1,
            "running": True,
            "pid": os.getpid(),
            "site_id": self.home.site_id.value,
            "started": round(self._started, 3),
            "updated": round(time.time(), 3),
            "broker": self.settings.broker,
            "broker_pid": self._mosquitto.pid if self._mosquitto is not None else os.getpid(),
            "broker_restarts": self._broker_restarts,
            "listeners": {
                "registration": _endpoint_json(broker.registration_endpoint),
                "operational": _endpoint_json(broker.operational_endpoint),
                **({} if self.est is None else {"est": _endpoint_json(self.est.endpoint)}),
            },
            "est_answers": {}
            if self.est is None
            else {str(k): v for k, v in self.est.answered.items()},
            "connected": self.channel is not None and self.channel.connected.is_set(),
            "metrics": None if self.ops is None else _endpoint_json(self.ops.endpoint),
            "counts": counts,
            "registrations": dict(service.stats),
            "ldevid_policy": policy_json(service.policy),
            "superseded_sessions_cut": self.superseded.cut_sessions if self.superseded else 0,
            "revoked_devices": sorted(d.value for d in self._revoked),
            "payload_key": self.keyring.current.key_id.hex() if self.keyring else None,
            "revocation_list_sequence": self.revocations.sequence if self.revocations else None,
            "hq_revocation_data": self._hq_data_status(),
            "site_crl_next_update": _iso(site_crl.next_update_utc),
            # re-issued by this registrar at half life ("Service certificates")
            "service_certificates": {
                name: _iso(
                    x509.load_pem_x509_certificate(
                        (self.home.current / f"{name}.pem").read_bytes()
                    ).not_valid_after_utc
                )
                for name in ("broker", "registrar-client")
            },
            "site_ca": {
                "issuing": self.site.site_ca_cert.subject.rfc4514_string() if self.site else None,
                "retiring": (
                    self.site.retiring_ca_cert.subject.rfc4514_string()
                    if self.site is not None and self.site.retiring_ca_cert is not None
                    else None
                ),
            },
            "payload_keys": await self.keys.rows() if self.keys is not None else [],
            "payload_key_grace_s": self.home.config.payload_key_grace_s,
            "key_updates": {
                "sent": self.keys.updates_sent if self.keys is not None else 0,
                "acks": self.keys.acks if self.keys is not None else 0,
            },
            "now": round(self._clock().timestamp(), 3),
            "telemetry": {
                "messages": self._telemetry.messages,
                "rejected": self._telemetry.rejected,
                "retired_key": self._telemetry.retired_key,
                "recent": list(self._telemetry.recent),
            },
            "alerts": list(self._alerts),
        }
        await asyncio.to_thread(_write_json, status_path(self.home), doc, sync=False)


def _endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {"host": endpoint.host, "port": endpoint.port}


def revoke_json(result: RevokeResult) -> dict[str, Any]:
    return {
        "device_id": result.device_id,
        "reason": result.reason,
        "serials": list(result.serials),
        "crl_number": result.crl_number,
        "already_revoked": result.already_revoked,
        "sessions_cut": result.sessions_cut,
    }


def import_json(result: ImportResult) -> dict[str, Any]:
    return {
        "sequence": result.sequence,
        "previous": result.previous,
        "status": result.status,
        "entries": result.entries,
        "revoked": [revoke_json(r) for r in result.revoked],
    }


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
