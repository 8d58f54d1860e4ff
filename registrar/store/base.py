"""The :class:`Store` API: what the registrar writes (registrations, events, approvals,
revocations, payload-key rotation) as items for the group-commit writer
(:mod:`registrar.store.writer`), the change feed, and opening and closing over a
:class:`Backend` (SQLite or PostgreSQL). Reads are inherited from
:class:`registrar.store.reads.StoreReads`. Callers never know which backend runs; see the
package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, Self

from registrar.errors import StoreError
from registrar.store import statements as q
from registrar.store.backend import Backend
from registrar.store.imports import (
    IMPORTED_TABLES,
    chunks,
    registration_tables,
    sighting_tables,
)
from registrar.store.reads import EXACT_COUNT_BELOW, StoreReads
from registrar.store.records import (
    Change,
    DeviceRecord,
    Event,
    FactorySighting,
    Registration,
    Statements,
)
from registrar.store.writer import PRUNE_BATCH, REPLAY_RETENTION, GroupCommitWriter
from trustcore.identity import CertSerial, DeviceId
from trustcore.utctime import system_clock, to_unix

__all__ = ["EXACT_COUNT_BELOW", "REPLAY_RETENTION", "Backend", "ChangeFeed", "Store"]

#: Changes a subscriber may fall behind by before it gets a ``resync`` instead.
_FEED_LIMIT = 10_000


def default_instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ChangeFeed:
    """One subscription to :meth:`Store.changes`: subscribed when made, so nothing
    committed between making it and first reading it is missed."""

    def __init__(self, subscribers: set[asyncio.Queue[Change]]) -> None:
        self._subscribers = subscribers
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        subscribers.add(self._queue)

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> Change:
        if self._queue not in self._subscribers:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        self._subscribers.discard(self._queue)


class Store(StoreReads):
    """Open with :meth:`open` (``registrar.store.open_store``); close with :meth:`close`
    (or ``async with``)."""

    def __init__(
        self,
        backend: Backend,
        *,
        batch_window: float,
        max_batch: int,
        instance: str,
        where: str = "",
    ) -> None:
        super().__init__(backend)
        self.instance = instance
        self._closed = False
        self._subscribers: set[asyncio.Queue[Change]] = set()
        #: Named in write errors, so an operator knows which file or database (no secret:
        #: a PostgreSQL URL is shown without its password).
        self._writer = GroupCommitWriter(
            backend,
            batch_window=batch_window,
            max_batch=max_batch,
            instance=instance,
            what=f"registrar database {where}".rstrip(),
            deliver=self._deliver,
        )
        self._listener: asyncio.Task[None] | None = None

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._backend.name

    @property
    def commits(self) -> int:
        """Transactions committed (group-commit effectiveness: see :attr:`writes`)."""
        return self._writer.commits

    @property
    def writes(self) -> int:
        """Writes those transactions carried."""
        return self._writer.writes

    @classmethod
    async def open(
        cls,
        location: object,
        *,
        batch_window: float = 0.002,
        max_batch: int = 512,
        instance: str | None = None,
    ) -> Self:
        """``location``: a path (SQLite), ``sqlite:///abs/path`` or ``postgresql://…``
        (see :func:`registrar.store.location.parse_store_location`)."""
        from registrar.store.location import StoreLocation, parse_store_location

        where = location if isinstance(location, StoreLocation) else parse_store_location(location)
        backend: Backend
        if where.kind == "postgres":
            from registrar.store.postgres import PostgresBackend

            backend = await PostgresBackend.open(where.url)
        else:
            from registrar.store.sqlite import SqliteBackend

            backend = await SqliteBackend.open(where.path)
        store = cls(
            backend,
            batch_window=batch_window,
            max_batch=max_batch,
            instance=instance or default_instance_name(),
            where=str(where.path) if where.kind == "sqlite" else str(where),
        )
        store._writer.start()
        if not backend.local_feed:
            store._listener = asyncio.create_task(
                backend.listen(store._deliver), name="registrar-store-changes"
            )
            try:
                await asyncio.wait_for(backend.listening(), 10)
            except TimeoutError as exc:
                await store.close()
                raise StoreError("the store's change feed did not start in 10 s") from exc
        return store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Commit what is queued and close; closing a closed store does nothing (the
        registrar's stop closes it even when a health check or a test already did)."""
        if self._closed:
            return
        self._closed = True
        await self._writer.stop()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._backend.close()

    # -- change feed -------------------------------------------------------------------------

    def changes(self) -> ChangeFeed:
        """Every change committed from now on — from the moment this is called, not from
        the first iteration — by this instance and (PostgreSQL) by every other instance on
        the same database, in commit order per writer. A subscriber that falls more than
        10,000 changes behind gets one ``resync`` instead of the rest (re-read what matters
        from the store). ``aclose()`` ends the subscription."""
        return ChangeFeed(self._subscribers)

    def _deliver(self, change: Change) -> None:
        for feed in self._subscribers:
            if feed.qsize() >= _FEED_LIMIT:
                if change.kind == "resync":
                    continue
                while not feed.empty():
                    feed.get_nowait()
                feed.put_nowait(Change("resync", None, origin=self.instance))
            else:
                feed.put_nowait(change)

    # -- writes ------------------------------------------------------------------------------

    def _submit(
        self, item: q.Item, wait: bool, changes: tuple[Change, ...] = ()
    ) -> asyncio.Future[None] | None:
        return self._writer.submit(item, wait, changes)

    async def _write(
        self, sql: str, params: tuple[Any, ...], changes: tuple[Change, ...] = ()
    ) -> None:
        await self._writer.write((sql, params), changes)

    async def _call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await self._writer.call(sql, params)

    def _change(self, kind: str, device: DeviceId | None, **kw: Any) -> tuple[Change, ...]:
        return (Change(kind, device.value if device else None, origin=self.instance, **kw),)

    async def record_registration(self, registration: Registration) -> None:
        """Return once the registration is durably committed. ``StoreConflict`` when the
        same request, nonce or serial was committed already (another instance)."""
        future = self._submit(registration, True)
        assert future is not None
        await future

    async def record_event(self, device_id: DeviceId | None, kind: str, detail: str) -> None:
        future = self._submit(
            Event(to_unix(system_clock()), device_id.value if device_id else None, kind, detail),
            True,
        )
        assert future is not None
        await future

    def note_event(self, device_id: DeviceId | None, kind: str, detail: str) -> bool:
        """Queue an event without waiting (refusals): dropped, and False returned, when the
        writer is far behind, so a flood of junk cannot grow memory without bound."""
        if self._writer.backlog > 50 * self._writer.max_batch:
            return False
        self._submit(
            Event(to_unix(system_clock()), device_id.value if device_id else None, kind, detail),
            False,
        )
        return True

    def note_factory_certificate(
        self, *, station_id: str, serial: str, device_id: DeviceId, der: bytes, at: int
    ) -> bool:
        """Queue a sighting of a chain-valid factory certificate without waiting. The first
        sighting wins (``ON CONFLICT DO NOTHING``): HQ needs when the site first saw it.
        Dropped (False) when the writer is far behind, like :meth:`note_event`."""
        if self._writer.backlog > 50 * self._writer.max_batch:
            return False
        self._submit(
            (
                "INSERT INTO factory_certs (station_id, serial, device_id, der, first_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (station_id, serial, device_id.value, der, at),
            ),
            False,
        )
        return True

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
            "INSERT INTO approvals (device_id, approved_at) VALUES (?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET approved_at=excluded.approved_at",
            (device_id.value, at),
            self._change("approved", device_id),
        )
        await self._write("DELETE FROM pending_approvals WHERE device_id = ?", (device_id.value,))
        await self._write(
            q.INSERT_EVENT, (at, device_id.value, "approved", "admitted by the installer")
        )
        return was_pending

    async def set_status(self, device_id: DeviceId, status: str) -> None:
        kind = "revoked" if status == "revoked" else "status"
        await self._write(
            "UPDATE devices SET status = ? WHERE device_id = ?",
            (status, device_id.value),
            self._change(kind, device_id, detail=status),
        )

    async def record_revocation(self, device_id: DeviceId, *, at: int, detail: str) -> None:
        """A local revocation in one transaction: the device's status, ``revoked_at`` on
        each of its LDevIDs and the ``revoked`` event. A failure (a full disk) leaves
        none of them: the revocation is retried whole, never half recorded."""
        dev = device_id.value
        future = self._submit(
            Statements(
                (
                    (q.REVOKE_DEVICE, (dev,)),
                    (q.REVOKE_CERTS, (at, dev)),
                    (q.INSERT_EVENT, (to_unix(system_clock()), dev, "revoked", detail)),
                )
            ),
            True,
            self._change("revoked", device_id, detail="revoked"),
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
        await self._write(
            "UPDATE devices SET payload_key_id = ? WHERE device_id = ?",
            (payload_key_id, device_id.value),
            self._change("payload_key", device_id, detail=payload_key_id.hex()),
        )

    async def next_crl_number(self, at_least: int) -> int:
        """The site's next CRL number: larger than any number handed out before, by any
        instance on this database, and at least ``at_least`` (the number of the CRL file
        this instance last saw, plus one: a store younger than the site's CRLs)."""
        rows = await self._call(
            q.NEXT_CRL_NUMBER.format(greatest=self._greatest()), (int(at_least),)
        )
        return int(rows[0][0])

    def _greatest(self) -> str:
        return "MAX" if self._backend.name == "sqlite" else "GREATEST"

    async def prune_replay_records(self, before: int) -> None:
        """Forget nonces of requests made before ``before`` (unix seconds) and stored
        responses created before it. Safe once ``before`` is older than the freshness
        window (``trustcore.registration.FRESHNESS_SECONDS``) plus clock skew: an older
        request is refused as stale before its nonce or digest is looked at."""
        await self._write(q.PRUNE_NONCES, (int(before),))
        await self._write(q.PRUNE_REQUESTS, (int(before),))

    async def prune_expired_replay_records(self) -> int:
        """Prune nonces and stored responses that can no longer matter (see
        :data:`REPLAY_RETENTION`) now, in batches, through the writer; returns how many
        rows went. The writer also does this by itself after a commit, at most every
        minute, one batch per commit while a backlog remains: tables of nonces do not
        grow with the life of the site, only with the registrations of the last minutes."""
        total = 0
        while True:
            rows = await self._call(q.PRUNE_EXPIRED_NONCES, (REPLAY_RETENTION, PRUNE_BATCH))
            more = await self._call(q.PRUNE_EXPIRED_REQUESTS, (REPLAY_RETENTION, PRUNE_BATCH))
            total += len(rows) + len(more)
            if len(rows) < PRUNE_BATCH and len(more) < PRUNE_BATCH:
                return total

    async def import_registrations(
        self,
        registrations: Iterable[Registration],
        *,
        sightings: Iterable[FactorySighting] = (),
        chunk: int = 10_000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk-load registered devices (a registry migration; the scale benchmark's
        preload): per registration the rows a live registration writes — device,
        certificate, certified key, request→response, nonce, ``registered`` event — then
        the factory-certificate ``sightings``. COPY on PostgreSQL, ``executemany`` on
        SQLite; ``chunk`` registrations (or sightings) per transaction, so memory is
        bounded by one chunk whatever the size of the import. No change-feed entries.

        Each chunk commits on its own: an import that fails part-way (a device, serial,
        digest or nonce already present: ``StoreConflict``) keeps the chunks before it.
        ``progress`` is called with the running count after each chunk. Returns the
        number of registrations loaded."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        count = 0
        for part in chunks(registrations, chunk):
            await self._writer.bulk(registration_tables(part))
            count += len(part)
            if progress is not None:
                progress(count)
        for seen in chunks(sightings, chunk):
            await self._writer.bulk(sighting_tables(seen))
        if count:
            await self._writer.after_bulk_load(IMPORTED_TABLES)
        return count

    async def ping(self) -> None:
        """One trivial read, and the writer is alive: ``StoreError`` otherwise (health)."""
        if not self._writer.running:
            raise StoreError("registrar database writer is not running")
        await self._rows("SELECT 1")

    # -- payload-key rotation (registrar.key_distribution) -------------------------------

    async def save_key_period(
        self, key_id: bytes, current_from: int, superseded_at: int | None
    ) -> None:
        await self._write(
            "INSERT INTO payload_key_periods (key_id, current_from, superseded_at) "
            "VALUES (?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET "
            "current_from=excluded.current_from, superseded_at=excluded.superseded_at",
            (key_id, current_from, superseded_at),
            self._change("payload_key", None, detail=key_id.hex()),
        )

    async def record_key_offer(
        self, device_id: DeviceId, key_id: bytes, issued: int, at: int
    ) -> None:
        await self._write(
            "INSERT INTO key_offers (device_id, key_id, issued, offered_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET key_id=excluded.key_id, "
            "issued=excluded.issued, offered_at=excluded.offered_at",
            (device_id.value, key_id, issued, at),
        )

    async def set_wrap_key(
        self, device_id: DeviceId, ldevid_serial: CertSerial, wrap_key_der: bytes
    ) -> DeviceRecord | None:
        """Record the wrap key of a device enrolled without one (EST), while ``ldevid_serial``
        is still its current certificate. Set once: a device that has a wrap key keeps it.
        Returns the device's record as stored afterwards (None: not registered)."""
        await self._write(
            "UPDATE devices SET wrap_key = ? "
            "WHERE device_id = ? AND ldevid_serial = ? AND length(wrap_key) = 0",
            (wrap_key_der, device_id.value, ldevid_serial.hex),
        )
        return await self.device(device_id)
