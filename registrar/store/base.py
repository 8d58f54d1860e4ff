"""The :class:`Store` API and its group-commit writer, over a :class:`Backend` (SQLite or
PostgreSQL). Callers never know which backend runs; see the package docstring."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

from registrar.errors import StoreConflict, StoreError
from registrar.store import statements as q
from registrar.store.records import (
    CertificateRecord,
    Change,
    DeviceRecord,
    Event,
    FactorySighting,
    Lookup,
    PendingApproval,
    Registration,
    RenewalLookup,
    Statements,
)
from trustcore.identity import DeviceId
from trustcore.registration import FRESHNESS_SECONDS

__all__ = ["Backend", "Store"]

log = logging.getLogger(__name__)
_I = TypeVar("_I")

#: Changes a subscriber may fall behind by before it gets a ``resync`` instead.
_FEED_LIMIT = 10_000
#: Replay records (nonces, stored responses) older than the newest one by more than this are
#: pruned. Safe: a request is accepted only within ``FRESHNESS_SECONDS`` of the registrar's
#: clock, so the newest request time is at most that far ahead of the clock, and a request
#: older than the clock by more than that is refused as stale before its nonce is looked at.
REPLAY_RETENTION = 2 * FRESHNESS_SECONDS + 60
_PRUNE_EVERY = 60.0
_PRUNE_BATCH = 2_000
#: :meth:`Store.counts` counts tables smaller than this exactly, larger ones by estimate.
EXACT_COUNT_BELOW = 20_000


class Backend(Protocol):
    """What one database engine provides to :class:`Store` (``registrar.store.sqlite`` and
    ``registrar.store.postgres``). ``errors``: the engine's exceptions the store turns into
    :class:`StoreError`."""

    name: str
    errors: tuple[type[Exception], ...]
    #: Among ``errors``: the database cannot be reached or used right now (retry later).
    unavailable: tuple[type[Exception], ...]
    #: ORDER BY of a device's certificate chain (insertion order is engine-specific).
    certificate_order: str
    #: True: the store delivers its own changes after commit (no cross-process feed).
    local_feed: bool

    async def transaction(
        self,
        groups: Sequence[dict[str, list[tuple[Any, ...]]]],
        *,
        devices: Sequence[str],
        changes: Sequence[Change],
    ) -> None:
        """One transaction: each group's statements with ``executemany``, in order; the
        engine serialises writers of the same ``devices`` and publishes ``changes`` with
        the commit (when it has a feed)."""
        ...

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...

    async def estimated_rows(self, tables: Sequence[str]) -> dict[str, int]:
        """The engine's cheap row-count estimate per table (no table scan)."""
        ...

    async def call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """One statement that writes and returns rows, in its own transaction (from the
        writer task only)."""
        ...

    async def bulk_load(
        self, tables: Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]
    ) -> None:
        """One transaction: each (table, columns, rows) loaded in order (COPY on PostgreSQL;
        on the writer connection, never concurrently with :meth:`transaction`)."""
        ...

    async def after_bulk_load(self, tables: Sequence[str]) -> None:
        """Planner statistics (and, PostgreSQL, the visibility map: index-only scans) for
        tables that just grew by a bulk load."""
        ...

    async def listen(self, deliver: Callable[[Change], None]) -> None:
        """Deliver every change other connections commit, until cancelled (reconnecting
        on its own; a ``resync`` change after each reconnection)."""
        ...

    async def listening(self) -> None:
        """Return once :meth:`listen` is subscribed."""
        ...

    def is_conflict(self, exc: BaseException) -> bool: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Write:
    item: q.Item
    future: asyncio.Future[None] | None
    changes: tuple[Change, ...] = ()


@dataclass(slots=True)
class _Call:
    """A write that returns rows, run alone in its own transaction by the writer task."""

    sql: str
    params: tuple[Any, ...]
    future: asyncio.Future[list[tuple[Any, ...]]]


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


class Store:
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
        self._backend = backend
        #: Named in write errors, so an operator knows which file or database (no secret:
        #: a PostgreSQL URL is shown without its password).
        self._what = f"registrar database {where}".rstrip()
        self._window = batch_window
        self._max_batch = max_batch
        self.instance = instance
        self._queue: asyncio.Queue[_Write | _Call | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribers: set[asyncio.Queue[Change]] = set()
        #: The writer connection is one: the writer task and bulk loads take turns.
        self._exclusive = asyncio.Lock()
        #: Writes in the last group commit (1: no load, no batch window).
        self._last_batch = 0
        #: Replay-record pruning by the writer (monotonic time of the last pass).
        self._last_prune = -_PRUNE_EVERY
        self._prune_backlog = False
        #: (valid until, monotonic; result) of an expensive :meth:`devices_per_payload_key`.
        self._per_key: tuple[float, dict[bytes, int]] | None = None
        #: Transactions committed and writes they carried (group-commit effectiveness).
        self.commits = 0
        self.writes = 0

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._backend.name

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
        store._task = asyncio.create_task(store._writer(), name="registrar-store-writer")
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
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
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
        if self._task is None or self._task.done():
            raise StoreError("registrar database is closed")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Write(item, future, changes or q.changes_of(item, self.instance)))
        return future

    async def _write(
        self, sql: str, params: tuple[Any, ...], changes: tuple[Change, ...] = ()
    ) -> None:
        future = self._submit((sql, params), True, changes)
        assert future is not None
        await future

    async def _call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._task is None or self._task.done():
            raise StoreError("registrar database is closed")
        future: asyncio.Future[list[tuple[Any, ...]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Call(sql, params, future))
        return await future

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
        sighting wins (``ON CONFLICT DO NOTHING``): HQ needs when the site first saw it.
        Dropped (False) when the writer is far behind, like :meth:`note_event`."""
        if self._queue.qsize() > 50 * self._max_batch:
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
                    (q.INSERT_EVENT, (int(time.time()), dev, "revoked", detail)),
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
            rows = await self._call(q.PRUNE_EXPIRED_NONCES, (REPLAY_RETENTION, _PRUNE_BATCH))
            more = await self._call(q.PRUNE_EXPIRED_REQUESTS, (REPLAY_RETENTION, _PRUNE_BATCH))
            total += len(rows) + len(more)
            if len(rows) < _PRUNE_BATCH and len(more) < _PRUNE_BATCH:
                return total

    async def _prune_step(self) -> None:
        """From the writer task after a commit: one bounded batch when due."""
        now = time.monotonic()
        if not self._prune_backlog and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            async with self._exclusive:
                rows = await self._backend.call(
                    q.PRUNE_EXPIRED_NONCES, (REPLAY_RETENTION, _PRUNE_BATCH)
                )
                more = await self._backend.call(
                    q.PRUNE_EXPIRED_REQUESTS, (REPLAY_RETENTION, _PRUNE_BATCH)
                )
        except self._backend.errors as exc:
            log.warning("pruning expired nonces failed (next time again): %s", exc)
            return
        self._prune_backlog = max(len(rows), len(more)) >= _PRUNE_BATCH
        if rows or more:
            log.debug("pruned %d expired nonces and %d stored responses", len(rows), len(more))

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
        for part in _chunks(registrations, chunk):
            await self._bulk(_registration_tables(part))
            count += len(part)
            if progress is not None:
                progress(count)
        for seen in _chunks(sightings, chunk):
            await self._bulk(
                [
                    (
                        "factory_certs",
                        ("station_id", "serial", "device_id", "der", "first_seen"),
                        [(f.station_id, f.serial, f.device_id, f.der, f.first_seen) for f in seen],
                    )
                ]
            )
        if count:
            async with self._exclusive:
                try:
                    await self._backend.after_bulk_load(_IMPORTED_TABLES)
                except self._backend.errors as exc:
                    raise StoreError(f"registrar database bulk load failed: {exc}") from exc
        return count

    async def _bulk(
        self, tables: Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]
    ) -> None:
        if self._task is None or self._task.done():
            raise StoreError("registrar database is closed")
        async with self._exclusive:
            try:
                await self._backend.bulk_load(tables)
            except self._backend.errors as exc:
                if self._backend.is_conflict(exc):
                    raise StoreConflict(f"registrar database refused a duplicate: {exc}") from exc
                raise StoreError(f"registrar database bulk load failed: {exc}") from exc

    # -- the writer task --------------------------------------------------------------------

    async def _writer(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            if isinstance(first, _Call):
                await self._run_call(first)
                continue
            batch = [first]
            # Wait for companions only under load (the last batch had several writes): a
            # lone write after a quiet spell commits at once. A wave's first write goes
            # alone, and the writes that queue during its commit form the next batch.
            if self._window > 0 and self._last_batch > 1:
                await asyncio.sleep(self._window)
            held: _Call | None = None
            while len(batch) < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                if isinstance(nxt, _Call):
                    held = nxt
                    break
                batch.append(nxt)
            self._last_batch = len(batch)
            await self._commit_batch(batch)
            await self._prune_step()
            if held is not None:
                await self._run_call(held)

    async def _run_call(self, call: _Call) -> None:
        try:
            async with self._exclusive:
                rows = await self._backend.call(call.sql, call.params)
        except self._backend.errors as exc:
            if not call.future.done():
                call.future.set_exception(StoreError(f"{self._what}: write failed: {exc}"))
        else:
            if not call.future.done():
                call.future.set_result(rows)

    async def _commit_batch(self, batch: Sequence[_Write]) -> None:
        try:
            await self._apply(batch)
        except self._backend.errors as exc:
            if len(batch) == 1 or isinstance(exc, self._backend.unavailable):
                # one write, or the database is unreachable: nothing to gain one by one
                self._finish(batch, exc)
                return
            log.warning(
                "group commit of %d writes failed (%s); retrying one by one", len(batch), exc
            )
            for write in batch:
                try:
                    await self._apply([write])
                except self._backend.errors as one:
                    self._finish([write], one)
                else:
                    self._finish([write], None)
            return
        self._finish(batch, None)

    async def _apply(self, batch: Sequence[_Write]) -> None:
        # Statements are grouped by SQL text so a batch of N registrations costs a handful of
        # executemany calls, not 8N round trips. Grouping reorders statements across items,
        # which is safe only while items are independent: a second registration of the
        # same device, or an ad-hoc update, starts a new group (same transaction).
        groups: list[dict[str, list[tuple[Any, ...]]]] = [{}]
        devices: set[str] = set()
        registered: list[str] = []
        changes: list[Change] = []
        for write in batch:
            item = write.item
            if isinstance(item, tuple | Statements) or (
                isinstance(item, Registration) and item.device_id.value in devices
            ):
                groups.append({})
                devices.clear()
            if isinstance(item, Registration):
                devices.add(item.device_id.value)
                registered.append(item.device_id.value)
            for sql, params in q.statements_of(item):
                groups[-1].setdefault(sql, []).append(params)
            if isinstance(item, tuple | Statements):
                groups.append({})
            changes.extend(write.changes)
        async with self._exclusive:
            await self._backend.transaction(
                [g for g in groups if g], devices=registered, changes=changes
            )
        self.commits += 1
        self.writes += len(batch)
        if self._backend.local_feed:
            for change in changes:
                self._deliver(change)

    def _finish(self, batch: Sequence[_Write], exc: BaseException | None) -> None:
        dropped = sum(1 for write in batch if write.future is None)
        if exc is not None and dropped:
            log.warning("dropped %d queued event(s): %s", dropped, exc)
        for write in batch:
            fut = write.future
            if fut is None:
                continue
            if fut.done():
                continue
            if exc is None:
                fut.set_result(None)
            elif self._backend.is_conflict(exc):
                fut.set_exception(
                    StoreConflict(f"registrar database refused a duplicate write: {exc}")
                )
            else:
                fut.set_exception(StoreError(f"{self._what}: write failed: {exc}"))

    # -- reads -------------------------------------------------------------------------------

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return await self._backend.fetchall(sql, params)
        except self._backend.errors as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc

    async def lookup(
        self,
        digest: bytes,
        nonce: bytes,
        key_id: bytes | None,
        device_id: DeviceId | None = None,
    ) -> Lookup:
        """One round trip: stored response for ``digest``, nonce seen, owner of ``key_id``
        (and, with ``device_id``, that device's current LDevID)."""
        if device_id is None:
            rows = await self._rows(q.LOOKUP, (digest, nonce, key_id or b""))
        else:
            dev = device_id.value
            rows = await self._rows(q.LOOKUP_DEVICE, (digest, nonce, key_id or b"", dev, dev, dev))
        row = rows[0]
        response, seen, owner = row[:3]
        found = Lookup(_bytes(response), bool(seen), DeviceId(owner) if owner is not None else None)
        if device_id is None:
            return found
        serial, status, der = row[3:]
        return Lookup(
            found.response, found.nonce_seen, found.key_owner, serial, status, _bytes(der)
        )

    async def is_approved(self, device_id: DeviceId) -> bool:
        rows = await self._rows(
            "SELECT EXISTS(SELECT 1 FROM approvals WHERE device_id = ?)", (device_id.value,)
        )
        return bool(rows[0][0])

    async def is_pending(self, device_id: DeviceId) -> bool:
        rows = await self._rows(
            "SELECT EXISTS(SELECT 1 FROM pending_approvals WHERE device_id = ?)",
            (device_id.value,),
        )
        return bool(rows[0][0])

    async def pending(self) -> list[PendingApproval]:
        rows = await self._rows(
            "SELECT device_id, station_id, idevid_serial, plugin, reason, first_seen, "
            "last_seen, attempts FROM pending_approvals ORDER BY first_seen, device_id"
        )
        return [PendingApproval(*row) for row in rows]

    async def devices(self) -> list[DeviceRecord]:
        """Every device (operator commands; the running registrar pages with
        :meth:`device_pages` or asks bounded questions instead)."""
        rows = await self._rows(q.SELECT_DEVICES + " ORDER BY device_id")
        return [_device(row) for row in rows]

    async def device_pages(
        self, *, size: int = 1000, status: str | None = None, not_key: bytes | None = None
    ) -> AsyncIterator[list[DeviceRecord]]:
        """Devices in pages of at most ``size`` (keyset paging: memory bounded by one page),
        optionally only those with ``status``, and (with a ``status``) not on payload key
        ``not_key``. Each page costs index look-ups, never a scan of the registry: devices
        not on ``not_key`` come key by key (the few payload keys there are, found by a
        skip scan of the ``(status, payload_key_id, device_id)`` index), each key's in
        device-id order; the others in device-id order."""
        if not_key is not None:
            if status is None:
                raise ValueError("device_pages(not_key=...) needs a status")
            keys = await self._rows(q.PAYLOAD_KEYS_OF_STATUS, (status, status))
            for (key,) in keys:
                if bytes(key) == not_key:
                    continue
                async for page in self._pages(q.DEVICES_ON_KEY, (status, key), size):
                    yield page
            return
        async for page in self._pages(q.DEVICES_AFTER, (), size):
            if status is not None:
                page = [d for d in page if d.status == status]
            if page:
                yield page

    async def _pages(
        self, sql: str, head: tuple[Any, ...], size: int
    ) -> AsyncIterator[list[DeviceRecord]]:
        after = ""
        while True:
            rows = await self._rows(sql, (*head, after, size))
            if not rows:
                return
            yield [_device(row) for row in rows]
            if len(rows) < size:
                return
            after = rows[-1][0]

    async def device(self, device_id: DeviceId) -> DeviceRecord | None:
        rows = await self._rows(q.SELECT_DEVICES + " WHERE device_id = ?", (device_id.value,))
        return _device(rows[0]) if rows else None

    async def device_by_idevid(self, station_id: str, idevid_serial: str) -> DeviceRecord | None:
        """The device registered with that station's factory certificate serial."""
        rows = await self._rows(
            q.SELECT_DEVICES + " WHERE station_id = ? AND idevid_serial = ?",
            (station_id, idevid_serial),
        )
        return _device(rows[0]) if rows else None

    async def ping(self) -> None:
        """One trivial read, and the writer is alive: ``StoreError`` otherwise (health)."""
        if self._task is None or self._task.done():
            raise StoreError("registrar database writer is not running")
        await self._rows("SELECT 1")

    async def revoked_device_ids(self) -> set[DeviceId]:
        """Devices whose status is ``revoked`` (an index range, not a scan of the registry)."""
        rows = await self._rows("SELECT device_id FROM devices WHERE status = 'revoked'")
        return {DeviceId(r[0]) for r in rows}

    async def counts(self) -> dict[str, int]:
        """Rows per table, for ``registrar status`` (refreshed every half second while the
        registrar runs). Exact below :data:`EXACT_COUNT_BELOW` rows; above, the engine's
        own estimate — PostgreSQL's live-tuple statistics (may lag a few seconds),
        SQLite's rowid range (exact for tables nothing is deleted from) — because an exact
        count reads the whole table: about 250 ms for a million devices, twice a second."""
        names = ("devices", "requests", "nonces", "certified_keys", "superseded", "events")
        try:
            estimates = await self._backend.estimated_rows(names)
        except self._backend.errors as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        small = [n for n in names if estimates.get(n, 0) < EXACT_COUNT_BELOW]
        out = {n: max(0, int(estimates.get(n, 0))) for n in names}
        if small:
            counted = (f"(SELECT COUNT(*) FROM {n})" for n in small)  # noqa: S608 - fixed names
            sql = "SELECT " + ", ".join(counted)
            rows = await self._rows(sql)
            out.update(zip(small, (int(v) for v in rows[0]), strict=True))
        return out

    async def superseded_serials(
        self, device_id: DeviceId | None = None
    ) -> list[tuple[str, str, int]]:
        """(LDevID serial hex, device id, time) of certificates replaced by re-registration
        (one device's, or all)."""
        sql = "SELECT ldevid_serial, device_id, superseded_at FROM superseded"
        if device_id is None:
            rows = await self._rows(sql + " ORDER BY superseded_at")
        else:
            rows = await self._rows(
                sql + " WHERE device_id = ? ORDER BY superseded_at", (device_id.value,)
            )
        return [(r[0], r[1], int(r[2])) for r in rows]

    async def certificates(self, device_id: DeviceId | None = None) -> list[CertificateRecord]:
        """The chain of LDevIDs per device, oldest first (all devices when None)."""
        sql = (
            "SELECT serial, device_id, kind, issued_at, not_after, superseded_at, revoked_at "
            "FROM certificates"
        )
        order = (
            " ORDER BY device_id, COALESCE(issued_at, superseded_at), "
            + self._backend.certificate_order
        )
        if device_id is None:
            rows = await self._rows(sql + order)
        else:
            rows = await self._rows(sql + " WHERE device_id = ?" + order, (device_id.value,))
        return [CertificateRecord(*row) for row in rows]

    async def renewal_lookup(self, device_id: DeviceId) -> RenewalLookup:
        """Current serial, status, superseded serials and issue time of the current LDevID."""
        rows = await self._rows(
            "SELECT d.ldevid_serial, d.status, COALESCE(c.issued_at, d.registered_at) "
            "FROM devices d LEFT JOIN certificates c ON c.serial = d.ldevid_serial "
            "WHERE d.device_id = ?",
            (device_id.value,),
        )
        old = await self._rows(
            "SELECT ldevid_serial FROM superseded WHERE device_id = ?", (device_id.value,)
        )
        superseded = frozenset(str(r[0]) for r in old)
        if not rows:
            return RenewalLookup(None, "unregistered", superseded, None)
        serial, status, issued = rows[0]
        return RenewalLookup(str(serial), str(status), superseded, issued)

    async def approved_at(self, device_id: DeviceId) -> int | None:
        rows = await self._rows(
            "SELECT approved_at FROM approvals WHERE device_id = ?", (device_id.value,)
        )
        return int(rows[0][0]) if rows else None

    async def events(self, limit: int = 20, kind: str | None = None) -> list[Event]:
        if kind is None:
            rows = await self._rows(
                "SELECT time, device_id, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._rows(
                "SELECT time, device_id, kind, detail FROM events WHERE kind = ? "
                "ORDER BY id DESC LIMIT ?",
                (kind, limit),
            )
        return [Event(*row) for row in rows]

    async def factory_sightings(self) -> list[tuple[str, str, str, bytes, int]]:
        """(station, serial, device, DER, first seen) of every factory certificate seen in a
        registration request, first sighting first (``registrar report``)."""
        rows = await self._rows(
            "SELECT station_id, serial, device_id, der, first_seen FROM factory_certs "
            "ORDER BY first_seen, station_id, serial"
        )
        return [(r[0], r[1], r[2], bytes(r[3]), int(r[4])) for r in rows]

    # -- payload-key rotation (registrar.key_distribution) -------------------------------

    async def key_periods(self) -> list[tuple[bytes, int, int | None]]:
        """(key id, current from, superseded at or None) of every key current here once."""
        rows = await self._rows(
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
            self._change("payload_key", None, detail=key_id.hex()),
        )

    async def key_offers(
        self, device_ids: Sequence[str] | None = None
    ) -> dict[str, tuple[bytes, int, int]]:
        """device id -> (key id, issued, offered at) of the last update sent to it (those
        of ``device_ids`` only, when given)."""
        sql = "SELECT device_id, key_id, issued, offered_at FROM key_offers"
        if device_ids is None:
            rows = await self._rows(sql)
        elif not device_ids:
            return {}
        else:
            marks = ",".join("?" * len(device_ids))
            rows = await self._rows(sql + f" WHERE device_id IN ({marks})", tuple(device_ids))
        return {r[0]: (bytes(r[1]), r[2], r[3]) for r in rows}

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
        self, device_id: DeviceId, ldevid_serial: str, wrap_key_der: bytes
    ) -> DeviceRecord | None:
        """Record the wrap key of a device enrolled without one (EST), while ``ldevid_serial``
        is still its current certificate. Set once: a device that has a wrap key keeps it.
        Returns the device's record as stored afterwards (None: not registered)."""
        await self._write(
            "UPDATE devices SET wrap_key = ? "
            "WHERE device_id = ? AND ldevid_serial = ? AND length(wrap_key) = 0",
            (wrap_key_der, device_id.value, ldevid_serial),
        )
        return await self.device(device_id)

    async def devices_per_payload_key(self) -> dict[bytes, int]:
        """Registered devices per acknowledged payload key id (``registrar status``, every
        half second). The count reads every registered device's index entry (about 110 ms
        for a million on SQLite), so a result is reused for 50 times what it cost to
        compute (at most 2% of the database's time; a million devices: a few seconds
        stale); results that cost under 5 ms are not reused (a small site sees each
        acknowledgement at once)."""
        cached = self._per_key
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return dict(cached[1])
        rows = await self._rows(
            "SELECT payload_key_id, COUNT(*) FROM devices WHERE status = 'registered' "
            "GROUP BY payload_key_id"
        )
        result = {bytes(r[0]): int(r[1]) for r in rows}
        cost = time.monotonic() - now
        self._per_key = (now + 50 * cost, result) if cost >= 0.005 else None
        return dict(result)


_IMPORTED_TABLES = (
    "devices",
    "certificates",
    "certified_keys",
    "requests",
    "nonces",
    "events",
    "factory_certs",
)


def _chunks(items: Iterable[_I], size: int) -> Iterator[list[_I]]:
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


def _registration_tables(
    part: Sequence[Registration],
) -> list[tuple[str, Sequence[str], list[tuple[Any, ...]]]]:
    """The rows :func:`statements.statements_of` would write for each registration."""
    return [
        (
            "devices",
            (
                "device_id",
                "station_id",
                "idevid_serial",
                "ldevid_serial",
                "ldevid_der",
                "ldevid_key_id",
                "wrap_key",
                "payload_key_id",
                "registered_at",
            ),
            [
                (
                    r.device_id.value,
                    r.station_id,
                    r.idevid_serial,
                    r.ldevid_serial,
                    r.ldevid_der,
                    r.ldevid_key_id,
                    r.wrap_key_der,
                    r.payload_key_id,
                    r.at,
                )
                for r in part
            ],
        ),
        (
            "certificates",
            ("serial", "device_id", "kind", "issued_at", "not_after"),
            [(r.ldevid_serial, r.device_id.value, r.kind, r.at, r.ldevid_not_after) for r in part],
        ),
        (
            "certified_keys",
            ("key_id", "device_id"),
            [(r.ldevid_key_id, r.device_id.value) for r in part],
        ),
        (
            "requests",
            ("digest", "device_id", "response", "created"),
            [(r.request_digest, r.device_id.value, r.response, r.at) for r in part],
        ),
        (
            "nonces",
            ("nonce", "device_id", "time"),
            [(r.nonce, r.device_id.value, r.request_time) for r in part],
        ),
        (
            "events",
            ("time", "device_id", "kind", "detail"),
            [
                (
                    r.at,
                    r.device_id.value,
                    "renewed" if r.kind == "renewal" else "registered",
                    f"ldevid {r.ldevid_serial} idevid {r.idevid_serial}",
                )
                for r in part
            ],
        ),
    ]


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    dev, station, idevid, ldevid, der, wrap, key, at, count, status = row
    return DeviceRecord(
        dev, station, idevid, ldevid, bytes(der), bytes(wrap), bytes(key), at, count, status
    )
