"""The registrar's durable record (SQLite through aiosqlite), with group commit.

Durability before reply: a registration's response is published only after the transaction
that records the device, its certified key, its nonce and the request→response pair has
committed with ``synchronous=FULL`` in WAL mode (the commit is fsynced). A crash after the
commit and before the publish is harmless: the device retries the identical request and gets
the stored response.

Group commit: one fsync costs milliseconds, so one transaction per registration would cap the
registrar at a few hundred registrations per second on a good disk and far fewer on a slow
one. A single writer task collects every write queued within ``batch_window`` seconds (or up
to ``max_batch``) and commits them in ONE transaction; each caller awaits its own future,
which resolves only after that commit. If the batch fails (a constraint), it is retried one
write per transaction so one bad write cannot sink the others.

Reads (idempotency, nonce, key-owner look-ups) use a second connection: in WAL mode they do
not wait for the writer's fsync. They cannot see writes that are still queued; the service
covers that window with in-memory reservations.

Tables: ``devices`` (one row per registered device: current LDevID, its key, the wrap key
used for payload-key rotation), ``certified_keys`` (every key ever certified, for
``csr_foreign_key``), ``requests`` (request digest → stored response: idempotency),
``nonces`` (every nonce accepted), ``superseded`` (LDevIDs replaced by a re-registration:
input to the site CRL), ``events`` (audit trail for ``registrar status``), ``pending_approvals`` /
``approvals`` (devices an admission plugin held, and the installer's approvals), ``factory_certs``
(every chain-valid factory certificate seen in a registration request, first sighting kept:
the evidence of ``registrar report``), ``certificates`` (schema 2: every LDevID ever issued,
per device, with its kind — registration or renewal — and its issued, notAfter, superseded
and revoked times: the chain that ``registrar devices --certificates`` shows),
``payload_key_periods`` (when each payload key was current here: the grace period counts
from there) and ``key_offers`` (the last payload-key update sent to each device;
``devices.payload_key_id`` is the key the device *acknowledged*, see
:mod:`registrar.key_distribution`; both tables are created at open, in any schema version).

Schema versions: 1 (initial); 2 adds ``certificates``. Opening a version-1 database migrates
it in one transaction (the table is filled from ``devices`` and ``superseded``; times not
known then stay NULL). A database newer than this code is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiosqlite

from registrar.errors import StoreError
from trustcore.identity import DeviceId

__all__ = [
    "CertificateRecord",
    "DeviceRecord",
    "Event",
    "Lookup",
    "PendingApproval",
    "Registration",
    "RenewalLookup",
    "Store",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    station_id TEXT,
    idevid_serial TEXT NOT NULL,
    ldevid_serial TEXT NOT NULL,
    ldevid_der BLOB NOT NULL,
    ldevid_key_id BLOB NOT NULL,
    wrap_key BLOB NOT NULL,
    payload_key_id BLOB NOT NULL,
    registered_at INTEGER NOT NULL,
    registrations INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'registered'
);
CREATE TABLE IF NOT EXISTS certified_keys (
    key_id BLOB PRIMARY KEY,
    device_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    digest BLOB PRIMARY KEY,
    device_id TEXT NOT NULL,
    response BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BLOB PRIMARY KEY,
    device_id TEXT NOT NULL,
    time INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS superseded (
    ldevid_serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    superseded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    device_id TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_approvals (
    device_id TEXT PRIMARY KEY,
    station_id TEXT,
    idevid_serial TEXT NOT NULL,
    plugin TEXT NOT NULL,
    reason TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS approvals (
    device_id TEXT PRIMARY KEY,
    approved_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    issued_at INTEGER,
    not_after INTEGER,
    superseded_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id);
CREATE TABLE IF NOT EXISTS factory_certs (
    station_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    device_id TEXT NOT NULL,
    der BLOB NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (station_id, serial)
);
"""

#: Payload-key rotation (``registrar.key_distribution``): created at open, also in old files.
_KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS payload_key_periods (
    key_id BLOB PRIMARY KEY,
    current_from INTEGER NOT NULL,
    superseded_at INTEGER
);
-- registrar status counts devices per acknowledged key every 0.5 s: a covering index
-- (100,000 devices: about 10 ms instead of 50 ms)
CREATE INDEX IF NOT EXISTS devices_by_payload_key ON devices (status, payload_key_id);
CREATE TABLE IF NOT EXISTS key_offers (
    device_id TEXT PRIMARY KEY,
    key_id BLOB NOT NULL,
    issued INTEGER NOT NULL,
    offered_at INTEGER NOT NULL
);
"""

_SUPERSEDE = (
    "INSERT OR IGNORE INTO superseded (ldevid_serial, device_id, superseded_at) "
    "SELECT ldevid_serial, device_id, ? FROM devices WHERE device_id = ? AND ldevid_serial != ?"
)
_UPSERT_DEVICE = (
    "INSERT INTO devices (device_id, station_id, idevid_serial, ldevid_serial, ldevid_der, "
    "ldevid_key_id, wrap_key, payload_key_id, registered_at) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(device_id) DO UPDATE SET station_id=excluded.station_id, "
    "idevid_serial=excluded.idevid_serial, ldevid_serial=excluded.ldevid_serial, "
    "ldevid_der=excluded.ldevid_der, ldevid_key_id=excluded.ldevid_key_id, "
    "wrap_key=excluded.wrap_key, payload_key_id=excluded.payload_key_id, "
    "registered_at=excluded.registered_at, registrations=devices.registrations+1, "
    "status='registered'"
)
_RENEW_DEVICE = (
    "UPDATE devices SET ldevid_serial = ?, ldevid_der = ?, ldevid_key_id = ?, "
    "payload_key_id = ? WHERE device_id = ?"
)
_SUPERSEDE_CERTS = (
    "UPDATE certificates SET superseded_at = ? WHERE device_id = ? AND serial != ? "
    "AND superseded_at IS NULL"
)
_INSERT_CERT = (
    "INSERT OR IGNORE INTO certificates (serial, device_id, kind, issued_at, not_after) "
    "VALUES (?, ?, ?, ?, ?)"
)
_INSERT_KEY = "INSERT OR IGNORE INTO certified_keys (key_id, device_id) VALUES (?, ?)"
_INSERT_REQUEST = "INSERT INTO requests (digest, device_id, response, created) VALUES (?,?,?,?)"
_INSERT_NONCE = "INSERT INTO nonces (nonce, device_id, time) VALUES (?, ?, ?)"
_INSERT_EVENT = "INSERT INTO events (time, device_id, kind, detail) VALUES (?, ?, ?, ?)"
_LOOKUP = (
    "SELECT (SELECT response FROM requests WHERE digest = ?), "
    "EXISTS(SELECT 1 FROM nonces WHERE nonce = ?), "
    "(SELECT device_id FROM certified_keys WHERE key_id = ?)"
)
#: The same plus the device's current LDevID (serial, status, DER): a re-registration must
#: supersede it, and the expired-LDevID policy looks at it; still one round trip.
_LOOKUP_DEVICE = (
    "SELECT (SELECT response FROM requests WHERE digest = ?), "
    "EXISTS(SELECT 1 FROM nonces WHERE nonce = ?), "
    "(SELECT device_id FROM certified_keys WHERE key_id = ?), "
    "(SELECT ldevid_serial FROM devices WHERE device_id = ?), "
    "(SELECT status FROM devices WHERE device_id = ?), "
    "(SELECT ldevid_der FROM devices WHERE device_id = ?)"
)


@dataclass(frozen=True, slots=True)
class Registration:
    """Everything one successful registration writes, in one transaction."""

    device_id: DeviceId
    station_id: str | None
    idevid_serial: str
    ldevid_serial: str
    ldevid_der: bytes
    ldevid_key_id: bytes
    wrap_key_der: bytes
    payload_key_id: bytes
    request_digest: bytes
    response: bytes
    nonce: bytes
    request_time: int
    at: int
    #: "registration" (IDevID, ``registrations`` + 1) or "renewal" (LDevID, same device row).
    kind: str = "registration"
    ldevid_not_after: int | None = None


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One LDevID in a device's chain of certificates (times: unix seconds or None)."""

    serial: str
    device_id: str
    kind: str
    issued_at: int | None
    not_after: int | None
    superseded_at: int | None
    revoked_at: int | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "superseded" if self.superseded_at is not None else "current"


@dataclass(frozen=True, slots=True)
class RenewalLookup:
    """What the store knows about a device for a renewal decision."""

    current_serial: str | None
    status: str
    superseded: frozenset[str]
    issued_at: int | None


@dataclass(frozen=True, slots=True)
class Event:
    time: int
    device_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the store knows about a request before the decision."""

    response: bytes | None
    nonce_seen: bool
    key_owner: DeviceId | None
    #: The device's record before this request (``lookup(..., device_id=...)`` only).
    previous_serial: str | None = None
    previous_status: str | None = None
    previous_ldevid_der: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """A device an admission plugin held for the installer (``registrar pending``)."""

    device_id: str
    station_id: str | None
    idevid_serial: str
    plugin: str
    reason: str
    first_seen: int
    last_seen: int
    attempts: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    station_id: str | None
    idevid_serial: str
    ldevid_serial: str
    ldevid_der: bytes = field(repr=False)
    wrap_key_der: bytes = field(repr=False)
    payload_key_id: bytes
    registered_at: int
    registrations: int
    status: str


@dataclass(slots=True)
class _Write:
    item: Registration | Event | tuple[str, tuple[Any, ...]]
    future: asyncio.Future[None] | None


def _statements(
    item: Registration | Event | tuple[str, tuple[Any, ...]],
) -> list[tuple[str, tuple[Any, ...]]]:
    if isinstance(item, Event):
        return [(_INSERT_EVENT, (item.time, item.device_id, item.kind, item.detail))]
    if isinstance(item, tuple):
        return [item]
    dev = item.device_id.value
    renewal = item.kind == "renewal"
    device_row = (
        (
            _RENEW_DEVICE,
            (item.ldevid_serial, item.ldevid_der, item.ldevid_key_id, item.payload_key_id, dev),
        )
        if renewal
        else (
            _UPSERT_DEVICE,
            (
                dev,
                item.station_id,
                item.idevid_serial,
                item.ldevid_serial,
                item.ldevid_der,
                item.ldevid_key_id,
                item.wrap_key_der,
                item.payload_key_id,
                item.at,
            ),
        )
    )
    detail = f"ldevid {item.ldevid_serial} idevid {item.idevid_serial}"
    return [
        (_SUPERSEDE, (item.at, dev, item.ldevid_serial)),
        device_row,
        (_SUPERSEDE_CERTS, (item.at, dev, item.ldevid_serial)),
        (_INSERT_CERT, (item.ldevid_serial, dev, item.kind, item.at, item.ldevid_not_after)),
        (_INSERT_KEY, (item.ldevid_key_id, dev)),
        (_INSERT_REQUEST, (item.request_digest, dev, item.response, item.at)),
        (_INSERT_NONCE, (item.nonce, dev, item.request_time)),
        (_INSERT_EVENT, (item.at, dev, "renewed" if renewal else "registered", detail)),
    ]


async def _migrate_1_to_2(db: aiosqlite.Connection) -> None:
    """Fill ``certificates`` from what schema 1 kept (one transaction)."""
    from cryptography import x509

    await db.execute("BEGIN IMMEDIATE")
    try:
        rows = await db.execute_fetchall(
            "SELECT device_id, ldevid_serial, ldevid_der, registered_at, status FROM devices"
        )
        for device_id, serial, der, at, status in rows:
            try:
                not_after: int | None = int(
                    x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
                )
            except ValueError:
                not_after = None
            await db.execute(
                "INSERT OR IGNORE INTO certificates (serial, device_id, kind, issued_at, "
                "not_after, revoked_at) VALUES (?, ?, 'registration', ?, ?, ?)",
                (serial, device_id, at, not_after, at if status == "revoked" else None),
            )
        await db.execute(
            "INSERT OR IGNORE INTO certificates (serial, device_id, kind, superseded_at) "
            "SELECT ldevid_serial, device_id, 'registration', superseded_at FROM superseded"
        )
        await db.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
        await db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            await db.execute("ROLLBACK")
        raise


class Store:
    """Open with :meth:`open`; close with :meth:`close` (or ``async with``)."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        *,
        batch_window: float,
        max_batch: int,
    ) -> None:
        self._db = writer
        self._reader = reader
        self._window = batch_window
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        #: Transactions committed and writes they carried (group-commit effectiveness).
        self.commits = 0
        self.writes = 0

    @classmethod
    async def open(
        cls, path: Path | str, *, batch_window: float = 0.002, max_batch: int = 512
    ) -> Self:
        try:
            writer = await aiosqlite.connect(str(path), isolation_level=None)
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.execute("PRAGMA synchronous=FULL")
            await writer.execute("PRAGMA foreign_keys=ON")
            await writer.executescript(_SCHEMA)
            await writer.executescript(_KEY_SCHEMA)
            await writer.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            rows = await writer.execute_fetchall("SELECT value FROM meta WHERE key='schema'")
            found = next(iter(rows))[0]
            if found == "1":
                await _migrate_1_to_2(writer)
                found = "2"
                log.info("registrar database %s migrated to schema 2", path)
            if found != str(SCHEMA_VERSION):
                await writer.close()
                raise StoreError(f"database schema {found}, this registrar knows {SCHEMA_VERSION}")
            reader = await aiosqlite.connect(str(path), isolation_level=None)
            await reader.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open registrar database {path}: {exc}") from exc
        store = cls(writer, reader, batch_window=batch_window, max_batch=max_batch)
        store._task = asyncio.create_task(store._writer(), name="registrar-store-writer")
        return store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._reader.close()
        await self._db.close()

    # -- writes ------------------------------------------------------------------------------

    def _submit(
        self, item: Registration | Event | tuple[str, tuple[Any, ...]], wait: bool
    ) -> asyncio.Future[None] | None:
        if self._task is None or self._task.done():
            raise StoreError("registrar database is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Write(item, future))
        return future

    async def record_registration(self, registration: Registration) -> None:
        """Return once the registration is durably committed (raises ``StoreError``)."""
        future = self._submit(registration, True)
        assert future is not None
        await future

    async def record_event(self, device_id: DeviceId | None, kind: str, detail: str) -> None:
        future = self._submit(
            Event(int(time.time()), device_id.value if device_id else None, kind, detail), True
        )
        assert future is not None
        await future

    def note_event(self, device_id: DeviceId | None, kind: str, detail: str) -> bool:
        """Queue an event without waiting (refusals): dropped, and False returned, when the
        writer is far behind, so a flood of junk cannot grow memory without bound."""
        if self._queue.qsize() > 50 * self._max_batch:
            return False
        self._submit(
            Event(int(time.time()), device_id.value if device_id else None, kind, detail), False
        )
        return True

    def note_factory_certificate(
        self, *, station_id: str, serial: str, device_id: DeviceId, der: bytes, at: int
    ) -> bool:
        """Queue a sighting of a chain-valid factory certificate without waiting. The first
        sighting wins (``INSERT OR IGNORE``): HQ needs when the site first saw it. Dropped
        (False) when the writer is far behind, like :meth:`note_event`."""
        if self._queue.qsize() > 50 * self._max_batch:
            return False
        self._submit(
            (
                "INSERT OR IGNORE INTO factory_certs (station_id, serial, device_id, der, "
                "first_seen) VALUES (?, ?, ?, ?, ?)",
                (station_id, serial, device_id.value, der, at),
            ),
            False,
        )
        return True

    async def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        future = self._submit((sql, params), True)
        assert future is not None
        await future

    async def record_hold(
        self,
        device_id: DeviceId,
        *,
        station_id: str | None,
        idevid_serial: str,
        plugin: str,
        reason: str,
        at: int,
    ) -> None:
        """Durably note that ``device_id`` waits for the installer (first sighting kept)."""
        await self._write(
            "INSERT INTO pending_approvals (device_id, station_id, idevid_serial, plugin, "
            "reason, first_seen, last_seen) VALUES (?,?,?,?,?,?,?) ON CONFLICT(device_id) DO "
            "UPDATE SET last_seen=excluded.last_seen, attempts=pending_approvals.attempts+1, "
            "station_id=excluded.station_id, idevid_serial=excluded.idevid_serial, "
            "plugin=excluded.plugin, reason=excluded.reason",
            (device_id.value, station_id, idevid_serial, plugin, reason, at, at),
        )

    async def approve(self, device_id: DeviceId, *, at: int) -> bool:
        """Record the installer's approval (durable, then live: the service reads it on the
        device's next request) and drop the pending entry. True if the device was pending."""
        was_pending = await self.is_pending(device_id)
        await self._write(
            "INSERT OR REPLACE INTO approvals (device_id, approved_at) VALUES (?, ?)",
            (device_id.value, at),
        )
        await self._write("DELETE FROM pending_approvals WHERE device_id = ?", (device_id.value,))
        await self._write(
            _INSERT_EVENT, (at, device_id.value, "approved", "admitted by the installer")
        )
        return was_pending

    async def set_status(self, device_id: DeviceId, status: str) -> None:
        future = self._submit(
            ("UPDATE devices SET status = ? WHERE device_id = ?", (status, device_id.value)), True
        )
        assert future is not None
        await future

    async def mark_revoked(self, device_id: DeviceId, *, at: int) -> None:
        """Every LDevID of ``device_id`` not revoked yet gets ``revoked_at`` (chain record)."""
        await self._write(
            "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
            (at, device_id.value),
        )

    async def set_payload_key(self, device_id: DeviceId, payload_key_id: bytes) -> None:
        future = self._submit(
            (
                "UPDATE devices SET payload_key_id = ? WHERE device_id = ?",
                (payload_key_id, device_id.value),
            ),
            True,
        )
        assert future is not None
        await future

    async def _writer(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            if self._window > 0:
                await asyncio.sleep(self._window)
            while len(batch) < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: Sequence[_Write]) -> None:
        try:
            await self._apply([w.item for w in batch])
        except sqlite3.Error as exc:
            if len(batch) == 1:
                self._finish(batch, exc)
                return
            log.warning(
                "group commit of %d writes failed (%s); retrying one by one", len(batch), exc
            )
            for write in batch:
                try:
                    await self._apply([write.item])
                except sqlite3.Error as one:
                    self._finish([write], one)
                else:
                    self._finish([write], None)
            return
        self._finish(batch, None)

    async def _apply(
        self, items: Sequence[Registration | Event | tuple[str, tuple[Any, ...]]]
    ) -> None:
        # Statements are grouped by SQL text so a batch of N registrations costs a handful of
        # executemany calls, not 6N thread round trips. Grouping reorders statements across
        # items, which is safe only while items are independent: a second registration of
        # the same device, or an ad-hoc update, starts a new group (same transaction).
        groups: list[dict[str, list[tuple[Any, ...]]]] = [{}]
        devices: set[str] = set()
        for item in items:
            if isinstance(item, tuple) or (
                isinstance(item, Registration) and item.device_id.value in devices
            ):
                groups.append({})
                devices.clear()
            if isinstance(item, Registration):
                devices.add(item.device_id.value)
            for sql, params in _statements(item):
                groups[-1].setdefault(sql, []).append(params)
            if isinstance(item, tuple):
                groups.append({})
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            for grouped in groups:
                for sql, rows in grouped.items():
                    await db.executemany(sql, rows)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.writes += len(items)

    @staticmethod
    def _finish(batch: Sequence[_Write], exc: BaseException | None) -> None:
        for write in batch:
            fut = write.future
            if fut is None:
                if exc is not None:
                    log.warning("dropped a queued event: %s", exc)
                continue
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(StoreError(f"registrar database write failed: {exc}"))

    # -- reads -------------------------------------------------------------------------------

    async def lookup(
        self,
        digest: bytes,
        nonce: bytes,
        key_id: bytes | None,
        device_id: DeviceId | None = None,
    ) -> Lookup:
        """One round trip: stored response for ``digest``, nonce seen, owner of ``key_id``
        (and, with ``device_id``, that device's current LDevID)."""
        try:
            if device_id is None:
                rows = await self._reader.execute_fetchall(_LOOKUP, (digest, nonce, key_id or b""))
            else:
                dev = device_id.value
                rows = await self._reader.execute_fetchall(
                    _LOOKUP_DEVICE, (digest, nonce, key_id or b"", dev, dev, dev)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        row = next(iter(rows))
        response, seen, owner = row[:3]
        found = Lookup(response, bool(seen), DeviceId(owner) if owner is not None else None)
        if device_id is None:
            return found
        serial, status, der = row[3:]
        return Lookup(found.response, found.nonce_seen, found.key_owner, serial, status, der)

    async def is_approved(self, device_id: DeviceId) -> bool:
        try:
            rows = await self._reader.execute_fetchall(
                "SELECT EXISTS(SELECT 1 FROM approvals WHERE device_id = ?)", (device_id.value,)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        return bool(next(iter(rows))[0])

    async def is_pending(self, device_id: DeviceId) -> bool:
        rows = await self._reader.execute_fetchall(
            "SELECT EXISTS(SELECT 1 FROM pending_approvals WHERE device_id = ?)",
            (device_id.value,),
        )
        return bool(next(iter(rows))[0])

    async def pending(self) -> list[PendingApproval]:
        rows = await self._reader.execute_fetchall(
            "SELECT device_id, station_id, idevid_serial, plugin, reason, first_seen, "
            "last_seen, attempts FROM pending_approvals ORDER BY first_seen, device_id"
        )
        return [PendingApproval(*row) for row in rows]

    async def devices(self) -> list[DeviceRecord]:
        rows = await self._reader.execute_fetchall(
            "SELECT device_id, station_id, idevid_serial, ldevid_serial, ldevid_der, wrap_key, "
            "payload_key_id, registered_at, registrations, status FROM devices ORDER BY device_id"
        )
        return [DeviceRecord(*row) for row in rows]

    async def device(self, device_id: DeviceId) -> DeviceRecord | None:
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT device_id, station_id, idevid_serial, ldevid_serial, ldevid_der, "
                "wrap_key, payload_key_id, registered_at, registrations, status FROM devices "
                "WHERE device_id = ?",
                (device_id.value,),
            )
        )
        return DeviceRecord(*rows[0]) if rows else None

    async def counts(self) -> dict[str, int]:
        rows = await self._reader.execute_fetchall(
            "SELECT (SELECT COUNT(*) FROM devices), (SELECT COUNT(*) FROM requests), "
            "(SELECT COUNT(*) FROM nonces), (SELECT COUNT(*) FROM certified_keys), "
            "(SELECT COUNT(*) FROM superseded), (SELECT COUNT(*) FROM events)"
        )
        names = ("devices", "requests", "nonces", "certified_keys", "superseded", "events")
        return dict(zip(names, next(iter(rows)), strict=True))

    async def superseded_serials(self) -> list[tuple[str, str, int]]:
        """(LDevID serial hex, device id, time) of certificates replaced by re-registration."""
        rows = await self._reader.execute_fetchall(
            "SELECT ldevid_serial, device_id, superseded_at FROM superseded ORDER BY superseded_at"
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def certificates(self, device_id: DeviceId | None = None) -> list[CertificateRecord]:
        """The chain of LDevIDs per device, oldest first (all devices when None)."""
        sql = (
            "SELECT serial, device_id, kind, issued_at, not_after, superseded_at, revoked_at "
            "FROM certificates"
        )
        order = " ORDER BY device_id, COALESCE(issued_at, superseded_at), rowid"
        try:
            if device_id is None:
                rows = await self._reader.execute_fetchall(sql + order)
            else:
                rows = await self._reader.execute_fetchall(
                    sql + " WHERE device_id = ?" + order, (device_id.value,)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        return [CertificateRecord(*row) for row in rows]

    async def renewal_lookup(self, device_id: DeviceId) -> RenewalLookup:
        """Current serial, status, superseded serials and issue time of the current LDevID."""
        try:
            rows = list(
                await self._reader.execute_fetchall(
                    "SELECT d.ldevid_serial, d.status, COALESCE(c.issued_at, d.registered_at) "
                    "FROM devices d LEFT JOIN certificates c ON c.serial = d.ldevid_serial "
                    "WHERE d.device_id = ?",
                    (device_id.value,),
                )
            )
            old = await self._reader.execute_fetchall(
                "SELECT ldevid_serial FROM superseded WHERE device_id = ?", (device_id.value,)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        superseded = frozenset(str(r[0]) for r in old)
        if not rows:
            return RenewalLookup(None, "unregistered", superseded, None)
        serial, status, issued = rows[0]
        return RenewalLookup(str(serial), str(status), superseded, issued)

    async def approved_at(self, device_id: DeviceId) -> int | None:
        rows = list(
            await self._reader.execute_fetchall(
                "SELECT approved_at FROM approvals WHERE device_id = ?", (device_id.value,)
            )
        )
        return int(rows[0][0]) if rows else None

    async def events(self, limit: int = 20, kind: str | None = None) -> list[Event]:
        if kind is None:
            rows = await self._reader.execute_fetchall(
                "SELECT time, device_id, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._reader.execute_fetchall(
                "SELECT time, device_id, kind, detail FROM events WHERE kind = ? "
                "ORDER BY id DESC LIMIT ?",
                (kind, limit),
            )
        return [Event(*row) for row in rows]

    # -- payload-key rotation (registrar.key_distribution) -------------------------------

    async def key_periods(self) -> list[tuple[bytes, int, int | None]]:
        """(key id, current from, superseded at or None) of every key current here once."""
        rows = await self._reader.execute_fetchall(
            "SELECT key_id, current_from, superseded_at FROM payload_key_periods "
            "ORDER BY current_from, key_id"
        )
        return [(bytes(r[0]), r[1], r[2]) for r in rows]

    async def save_key_period(
        self, key_id: bytes, current_from: int, superseded_at: int | None
    ) -> None:
        await self._write(
            "INSERT INTO payload_key_periods (key_id, current_from, superseded_at) "
            "VALUES (?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET "
            "current_from=excluded.current_from, superseded_at=excluded.superseded_at",
            (key_id, current_from, superseded_at),
        )

    async def key_offers(self) -> dict[str, tuple[bytes, int, int]]:
        """device id -> (key id, issued, offered at) of the last update sent to it."""
        rows = await self._reader.execute_fetchall(
            "SELECT device_id, key_id, issued, offered_at FROM key_offers"
        )
        return {r[0]: (bytes(r[1]), r[2], r[3]) for r in rows}

    async def record_key_offer(
        self, device_id: DeviceId, key_id: bytes, issued: int, at: int
    ) -> None:
        await self._write(
            "INSERT OR REPLACE INTO key_offers (device_id, key_id, issued, offered_at) "
            "VALUES (?, ?, ?, ?)",
            (device_id.value, key_id, issued, at),
        )

    async def devices_per_payload_key(self) -> dict[bytes, int]:
        """Registered devices per acknowledged payload key id."""
        rows = await self._reader.execute_fetchall(
            "SELECT payload_key_id, COUNT(*) FROM devices WHERE status = 'registered' "
            "GROUP BY payload_key_id"
        )
        return {bytes(r[0]): r[1] for r in rows}
