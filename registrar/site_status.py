"""What a running registrar says about itself: ``SITE/run/status.json`` (for ``registrar
status``), the Prometheus readings behind ``/metrics`` and the ``/healthz`` decision.

Owns the shape of the status document (:func:`write_status`), the metrics snapshot
(:func:`readings`) and the inputs of the health decision (:func:`health`; the decision
itself is :func:`registrar.metrics.decide_health`). Everything is read from a
:class:`RunningSite` (the running :class:`registrar.app.RegistrarApp`); nothing here
changes it.

Each tick is cheap (the registrar writes status twice a second under load): the PEM files
it reports dates of are parsed again only when their ``stat`` changes
(:func:`pem_not_after`), and the document is written only when something other than its
clock fields (``updated``, ``now``) changed, or :data:`STATUS_HEARTBEAT` after the last
write (so ``updated`` still says the registrar is alive).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from registrar.broker import Broker, Endpoint
from registrar.channel import RequestSource
from registrar.crl_watch import iso
from registrar.device_events import TelemetryLog
from registrar.errors import RegistrarError
from registrar.est import EstServer
from registrar.key_distribution import KeyDistributor
from registrar.ldevid_policy import policy_json
from registrar.metrics import CrlReading, Health, HealthInputs, Readings, decide_health
from registrar.ops_server import OpsServer
from registrar.payload_keys import PayloadKeyring
from registrar.revocation import hq_data_freshness
from registrar.run_dir import status_path, write_json
from registrar.service import RegistrationService
from registrar.settings import AppSettings
from registrar.site import CommissionedSite, SiteHome
from registrar.store import Store
from registrar.supersede import SupersededCertificates
from trustcore.identity import DeviceId
from trustcore.revocation import RevocationList
from trustcore.utctime import Clock

__all__ = [
    "STATUS_HEARTBEAT",
    "RunningSite",
    "StatusWriter",
    "health",
    "pem_not_after",
    "readings",
    "status_document",
]

#: An unchanged status document is rewritten this often (seconds), for its ``updated``.
STATUS_HEARTBEAT = 2.0
#: Fields of the status document that change at every tick by themselves.
_CLOCK_FIELDS = ("updated", "now")
#: path -> (stat identity, the end of validity it holds), see :func:`pem_not_after`.
_PEM_DATES: dict[Path, tuple[tuple[int, int, int, int], datetime | None]] = {}


class RunningSite(Protocol):
    """The parts of a running registrar that its reports read."""

    @property
    def home(self) -> SiteHome: ...
    @property
    def settings(self) -> AppSettings: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def site(self) -> CommissionedSite | None: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def broker(self) -> Broker | None: ...
    @property
    def service(self) -> RegistrationService | None: ...
    @property
    def channel(self) -> RequestSource | None: ...
    @property
    def est(self) -> EstServer | None: ...
    @property
    def ops(self) -> OpsServer | None: ...
    @property
    def keys(self) -> KeyDistributor | None: ...
    @property
    def keyring(self) -> PayloadKeyring | None: ...
    @property
    def revocations(self) -> RevocationList | None: ...
    @property
    def revoked(self) -> set[DeviceId]: ...
    @property
    def superseded(self) -> SupersededCertificates | None: ...
    @property
    def telemetry(self) -> TelemetryLog: ...
    @property
    def alerts(self) -> tuple[str, ...]: ...
    @property
    def crl_readings(self) -> tuple[CrlReading, ...]: ...
    @property
    def started(self) -> float: ...
    @property
    def broker_restarts(self) -> int: ...
    @property
    def broker_pid(self) -> int | None: ...


def revocation_data_expires(app: RunningSite) -> float | None:
    """When HQ's newest revocation data passes the site's offline tolerance (epoch s)."""
    if app.revocations is None or app.site is None:
        return None
    return app.revocations.issued + app.site.max_offline_days * 86_400.0


def readings(app: RunningSite) -> Readings:
    """A snapshot for the Prometheus collector (scrape time, in the event loop)."""
    service, broker, keys, channel = app.service, app.broker, app.keys, app.channel
    return Readings(
        now=app.clock().timestamp(),
        answers=dict(service.stats) if service is not None else {},
        connected_devices=broker.connected_devices() if broker is not None else 0,
        broker_connected=channel is not None and channel.connected.is_set(),
        broker_restarts=app.broker_restarts,
        crls=app.crl_readings,
        revocation_data_expires=revocation_data_expires(app),
        key_updates_sent=keys.updates_sent if keys is not None else 0,
        key_updates_acknowledged=keys.acks if keys is not None else 0,
        telemetry_messages=app.telemetry.messages,
        telemetry_rejected=app.telemetry.rejected,
    )


async def health(app: RunningSite) -> Health:
    """``/healthz``: the store answers (2 s), the registrar's MQTT session is up, the
    HQ revocation data and HQ-signed CRLs are not expired (on the app's clock)."""
    store_error: str | None = None
    if app.store is None:
        store_error = "not open"
    else:
        try:
            await asyncio.wait_for(app.store.ping(), 2.0)
        except TimeoutError:
            store_error = "no answer in 2 s"
        except RegistrarError as exc:
            store_error = str(exc)
    now = app.clock().timestamp()
    expires = revocation_data_expires(app)
    own = set()
    if app.site is not None:
        own.add(app.site.site_ca_cert.subject.rfc4514_string())
        if app.site.retiring_ca_cert is not None:
            own.add(app.site.retiring_ca_cert.subject.rfc4514_string())
    stale = tuple(
        crl.issuer
        for crl in app.crl_readings
        if crl.issuer not in own and (crl.next_update is None or crl.next_update < now)
    )
    return decide_health(
        HealthInputs(
            store_error=store_error,
            broker_connected=app.channel is not None and app.channel.connected.is_set(),
            revocation_data_left=None if expires is None else expires - now,
            stale_crls=stale,
        )
    )


def hq_data_status(app: RunningSite) -> dict[str, object] | None:
    """The status.json metric for the age of the newest HQ revocation data (the alert
    and the log line come from :func:`registrar.crl_watch.check_crls`)."""
    if app.revocations is None or app.site is None:
        return None
    fresh = hq_data_freshness(app.revocations, app.site.max_offline_days, app.clock())
    return fresh.to_json()


def pem_not_after(path: Path, *, crl: bool = False) -> datetime | None:
    """The end of validity of the certificate (``crl``: nextUpdate of the CRL) in the PEM
    file at ``path``, parsed again only when the file's stat (device, inode, size,
    mtime) changes: files are replaced by rename, which gives a new inode."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    known = _PEM_DATES.get(path)
    if known is not None and known[0] == key:
        return known[1]
    data = path.read_bytes()
    end = (
        x509.load_pem_x509_crl(data).next_update_utc
        if crl
        else x509.load_pem_x509_certificate(data).not_valid_after_utc
    )
    _PEM_DATES[path] = (key, end)
    return end


async def status_document(app: RunningSite) -> dict[str, Any] | None:
    """The content of ``SITE/run/status.json`` (None before the registrar is started)."""
    broker, store, service = app.broker, app.store, app.service
    if broker is None or store is None or service is None:
        return None
    counts = await store.counts()
    current = app.home.current
    doc: dict[str, Any] = {
        "v": 1,
        "running": True,
        "pid": os.getpid(),
        "site_id": app.home.site_id.value,
        "started": round(app.started, 3),
        "updated": round(time.time(), 3),
        "broker": app.settings.broker,
        "broker_pid": app.broker_pid,
        "broker_restarts": app.broker_restarts,
        "listeners": {
            "registration": endpoint_json(broker.registration_endpoint),
            "operational": endpoint_json(broker.operational_endpoint),
            **({} if app.est is None else {"est": endpoint_json(app.est.endpoint)}),
        },
        "est_answers": {} if app.est is None else {str(k): v for k, v in app.est.answered.items()},
        "connected": app.channel is not None and app.channel.connected.is_set(),
        "metrics": None if app.ops is None else endpoint_json(app.ops.endpoint),
        "counts": counts,
        "registrations": dict(service.stats),
        "ldevid_policy": policy_json(service.policy),
        "superseded_sessions_cut": app.superseded.cut_sessions if app.superseded else 0,
        # superseded LDevIDs waiting for the next batch's CRL (supersede_window_seconds), and
        # the CRLs (each one broker reload) signed for superseded LDevIDs since the start
        "superseded_waiting": app.superseded.pending if app.superseded else 0,
        "superseded_crls_signed": app.superseded.crls_signed if app.superseded else 0,
        "revoked_devices": sorted(d.value for d in app.revoked),
        "payload_key": app.keyring.current.key_id.hex() if app.keyring else None,
        "revocation_list_sequence": app.revocations.sequence if app.revocations else None,
        "hq_revocation_data": hq_data_status(app),
        "site_crl_next_update": iso(pem_not_after(current / "site-crl.pem", crl=True)),
        # re-issued by this registrar at half life ("Service certificates")
        "service_certificates": {
            name: iso(pem_not_after(current / f"{name}.pem"))
            for name in ("broker", "registrar-client")
        },
        "site_ca": {
            "issuing": app.site.site_ca_cert.subject.rfc4514_string() if app.site else None,
            "retiring": (
                app.site.retiring_ca_cert.subject.rfc4514_string()
                if app.site is not None and app.site.retiring_ca_cert is not None
                else None
            ),
        },
        "payload_keys": await app.keys.rows() if app.keys is not None else [],
        "payload_key_grace_s": app.home.config.payload_key_grace_s,
        "key_updates": {
            "sent": app.keys.updates_sent if app.keys is not None else 0,
            "acks": app.keys.acks if app.keys is not None else 0,
        },
        "now": round(app.clock().timestamp(), 3),
        "telemetry": {
            "messages": app.telemetry.messages,
            "rejected": app.telemetry.rejected,
            "retired_key": app.telemetry.retired_key,
            "recent": list(app.telemetry.recent),
        },
        "alerts": list(app.alerts),
    }
    return doc


class StatusWriter:
    """Writes ``SITE/run/status.json`` (atomic; a snapshot, not synced to disk) when its
    content changed, or :data:`STATUS_HEARTBEAT` after the last write."""

    def __init__(self) -> None:
        self._last: dict[str, Any] | None = None
        self._written = 0.0  # monotonic

    async def write(self, app: RunningSite) -> None:
        doc = await status_document(app)
        if doc is None:
            return
        content = {k: v for k, v in doc.items() if k not in _CLOCK_FIELDS}
        if content == self._last and time.monotonic() - self._written < STATUS_HEARTBEAT:
            return
        await asyncio.to_thread(write_json, status_path(app.home), doc, sync=False)
        self._last = content
        self._written = time.monotonic()


def endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {"host": endpoint.host, "port": endpoint.port}
