"""SQLite backend of the registrar store: one writer connection on a thread of its own, one
reader connection (aiosqlite) and a probe connection for point reads on the loop; WAL with
``synchronous=FULL``; schema versions in ``meta`` (key ``schema``).

The writer is a plain ``sqlite3`` connection that lives on a thread of its own
(:class:`_WriterThread`): every use of it runs there, one at a time, and a group commit is
one call on that thread. (It used to be an aiosqlite connection driven through aiosqlite's
private ``_execute``/``_conn``: aiosqlite has no public way to run one function on its
connection's thread, and statement by statement each one cost a thread hop.)

Schema versions (each step one transaction, applied in order at open):

1. the initial tables;
2. ``certificates`` (filled from ``devices`` and ``superseded``; times not known then stay
   NULL);
3. ``crl_number`` (the site CRL counter) and the indexes a large registry needs
   (devices by factory certificate, superseded by device, nonces and requests by time).

A database newer than this code is refused. The change feed is local: only this process's
own changes (one SQLite file has no cross-process notification).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from registrar.errors import StoreError
from registrar.store import statements as q
from registrar.store.records import Change

__all__ = ["SCHEMA_VERSION", "SqliteBackend"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION = 4
#: Page cache of the writer connection during a bulk load (KiB).
_BULK_CACHE_KIB = 262_144
#: The registration path's reads: a handful of primary-key probes, answered in a few µs.
#: They run on the event loop through a plain sqlite3 connection: through aiosqlite's
#: thread each one cost a queue hop, a thread wake-up and a loop wake-up (~25 µs of CPU
#: against ~7 µs for the probe). Every other read (pages, counts, listings) may be long
#: and keeps the reader thread.
_POINT_READS = frozenset({q.LOOKUP, q.LOOKUP_DEVICE})

_SCHEMA_1 = """
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
CREATE TABLE IF NOT EXISTS factory_certs (
    station_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    device_id TEXT NOT NULL,
    der BLOB NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (station_id, serial)
);
"""

_SCHEMA_2 = """
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
"""

_SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS crl_number (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    number INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_idevid ON devices (station_id, idevid_serial);
CREATE INDEX IF NOT EXISTS superseded_by_device ON superseded (device_id);
CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (time);
CREATE INDEX IF NOT EXISTS requests_by_created ON requests (created);
"""

_SCHEMA_4 = """
CREATE INDEX IF NOT EXISTS devices_by_key_and_id ON devices (status, payload_key_id, device_id);
DROP INDEX IF EXISTS devices_by_payload_key;
"""

#: Payload-key rotation (``registrar.key_distribution``): created at open, in any version.
_KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS payload_key_periods (
    key_id BLOB PRIMARY KEY,
    current_from INTEGER NOT NULL,
    superseded_at INTEGER
);
-- registrar status counts devices per acknowledged key: a covering index; also the
-- revoked devices' range, and the devices still on an older key in device-id order
-- (Store.device_pages(not_key=...): the payload-key catch-up at every start)
CREATE INDEX IF NOT EXISTS devices_by_key_and_id ON devices (status, payload_key_id, device_id);
CREATE TABLE IF NOT EXISTS key_offers (
    device_id TEXT PRIMARY KEY,
    key_id BLOB NOT NULL,
    issued INTEGER NOT NULL,
    offered_at INTEGER NOT NULL
);
"""


def _fill_certificates(db: sqlite3.Connection) -> None:
    """Schema 2: fill ``certificates`` from what schema 1 kept."""
    from cryptography import x509

    rows = db.execute(
        "SELECT device_id, ldevid_serial, ldevid_der, registered_at, status FROM devices"
    ).fetchall()
    for device_id, serial, der, at, status in rows:
        try:
            not_after: int | None = int(
                x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
            )
        except ValueError:
            not_after = None
        db.execute(
            "INSERT OR IGNORE INTO certificates (serial, device_id, kind, issued_at, "
            "not_after, revoked_at) VALUES (?, ?, 'registration', ?, ?, ?)",
            (serial, device_id, at, not_after, at if status == "revoked" else None),
        )
    db.execute(
        "INSERT OR IGNORE INTO certificates (serial, device_id, kind, superseded_at) "
        "SELECT ldevid_serial, device_id, 'registration', superseded_at FROM superseded"
    )


def _script(db: sqlite3.Connection, script: str) -> None:
    """Run DDL inside the current transaction (``executescript`` would commit first)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


#: version -> (DDL, data step), applied in one transaction each.
_MIGRATIONS: dict[int, tuple[str, Callable[[sqlite3.Connection], Any] | None]] = {
    2: (_SCHEMA_2, _fill_certificates),
    3: (_SCHEMA_3, None),
    4: (_SCHEMA_4, None),
}


def _migrate(db: sqlite3.Connection, path: object) -> None:
    db.executescript(_SCHEMA_1)
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
    )
    rows = db.execute("SELECT value FROM meta WHERE key='schema'").fetchall()
    found = int(next(iter(rows))[0])
    if found > SCHEMA_VERSION:
        raise StoreError(f"database schema {found}, this registrar knows {SCHEMA_VERSION}")
    if found == SCHEMA_VERSION:
        # a new file: every step's tables (each is IF NOT EXISTS)
        for ddl, _ in _MIGRATIONS.values():
            db.executescript(ddl)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        ddl, step = _MIGRATIONS[version]
        with _immediate(db):
            _script(db, ddl)
            if step is not None:
                step(db)
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(version),))
        log.info("registrar database %s migrated to schema %d", path, version)
    db.executescript(_KEY_SCHEMA)


class _WriterThread:
    """The writer connection and the one thread it lives on: :meth:`run` calls a function
    with the connection there, one call at a time, in order. The connection is made on
    that thread and never leaves it. (The same design as aiosqlite's connection thread,
    whose only way to run a function there is private.)"""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="registrar-db-writer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._calls.get()) is not None:
            future, fn = job
            try:
                outcome: tuple[Callable[..., None], Any] = (_set_result, fn())
            except BaseException as exc:  # handed to the awaiting caller
                outcome = (_set_exception, exc)
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                future.get_loop().call_soon_threadsafe(outcome[0], future, outcome[1])

    async def _submit(self, fn: Callable[[], _T]) -> _T:
        if not self._thread.is_alive():  # closed: nothing would ever answer
            raise sqlite3.ProgrammingError("the registrar database writer is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._calls.put_nowait((future, fn))
        return await future

    def _connect(self, path: Path) -> None:
        self._conn = sqlite3.connect(str(path), isolation_level=None)

    async def open(self, path: Path) -> None:
        await self._submit(partial(self._connect, path))

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(connection)`` on the writer thread (the hot path: one hop per commit)."""
        conn = self._conn
        if conn is None or self._closing:
            raise sqlite3.ProgrammingError("the registrar database writer is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._calls.put_nowait((future, partial(fn, conn)))
        return await future

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection and end the thread; a second call does nothing."""
        if self._closing:
            return
        self._closing = True
        try:
            await self._submit(self._close)
        finally:
            self._calls.put_nowait(None)  # the thread ends once the queue is drained


#: A call for the writer thread: the caller's future and the function.
_Job = tuple["asyncio.Future[Any]", Callable[[], Any]]


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the caller was cancelled meanwhile
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class SqliteBackend:
    """See the module docstring."""

    name = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    unavailable: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
    certificate_order = "rowid"
    local_feed = True

    def __init__(
        self,
        writer: _WriterThread,
        reader: aiosqlite.Connection,
        probe: sqlite3.Connection | None = None,
    ) -> None:
        self._db = writer
        self._reader = reader
        #: Point reads on the loop (``_POINT_READS``); WAL: a reader sees the last commit
        #: and never waits for the writer.
        self._probe = probe

    @classmethod
    async def open(cls, path: Path) -> Self:
        try:
            writer = _WriterThread()
            try:
                await writer.open(path)
                await writer.run(partial(_prepare, path=path))
            except BaseException:
                await writer.close()
                raise
            reader = await aiosqlite.connect(str(path), isolation_level=None)
            await reader.execute("PRAGMA query_only=ON")
            # No busy wait on the loop: a busy probe (WAL recovery after a crash, rare)
            # falls back to the reader thread.
            probe = sqlite3.connect(str(path), isolation_level=None, timeout=0)
            probe.execute("PRAGMA query_only=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open registrar database {path}: {exc}") from exc
        return cls(writer, reader, probe)

    async def transaction(
        self,
        groups: Sequence[dict[str, list[tuple[Any, ...]]]],
        *,
        devices: Sequence[str],
        changes: Sequence[Change],
    ) -> None:
        # One writer connection and BEGIN IMMEDIATE: writers are serialised already. The
        # whole transaction is one call on the writer's thread: statement by statement,
        # each one was a thread hop and a loop wake-up (~10 per registration).
        await self._db.run(partial(_transaction, groups=groups))

    async def call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await self._db.run(partial(_call, sql=sql, params=params))

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._probe is not None and sql in _POINT_READS:
            try:
                return self._probe.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                # busy (WAL recovery), locked, closed: the reader thread waits and retries,
                # and a real error comes back from there
                log.debug("point read on the reader thread: %s", exc)
        return [tuple(r) for r in await self._reader.execute_fetchall(sql, params)]

    async def estimated_rows(self, tables: Sequence[str]) -> dict[str, int]:
        # rowid range: two index-end look-ups per table; exact where rows are only added
        parts = ", ".join(
            f"COALESCE((SELECT MAX(rowid) FROM {t}) - (SELECT MIN(rowid) FROM {t}) + 1, 0)"  # noqa: S608 - fixed names
            for t in tables
        )
        rows = await self._reader.execute_fetchall(f"SELECT {parts}")
        return dict(zip(tables, (int(v) for v in next(iter(rows))), strict=True))

    async def after_bulk_load(self, tables: Sequence[str]) -> None:
        await self._db.run(partial(_analyze, tables=tables))

    async def bulk_load(
        self, tables: Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]
    ) -> None:
        await self._db.run(partial(_bulk_load, tables=tables))

    async def listen(self, deliver: Callable[[Change], None]) -> None:
        raise NotImplementedError("SQLite has no cross-process change feed")

    async def listening(self) -> None:
        return None

    def is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        await self._reader.close()
        await self._db.close()


def _transaction(
    db: sqlite3.Connection, *, groups: Sequence[dict[str, list[tuple[Any, ...]]]]
) -> None:
    """One group commit, on the writer connection's thread."""
    with _immediate(db):
        for grouped in groups:
            for sql, rows in grouped.items():
                db.executemany(sql, rows)


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """The block as one ``BEGIN IMMEDIATE`` transaction: committed at its end, rolled back
    (quietly: the block's own error is the one to report) if anything raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _prepare(db: sqlite3.Connection, *, path: Path) -> None:
    """Writer settings, then the schema (created or migrated)."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    _migrate(db, path)


def _call(db: sqlite3.Connection, *, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One statement that writes and returns rows, in its own transaction."""
    with _immediate(db):
        rows = db.execute(sql, params).fetchall()
    return [tuple(r) for r in rows]


def _analyze(db: sqlite3.Connection, *, tables: Sequence[str]) -> None:
    # approximate statistics: a bounded sample per index, seconds not minutes
    db.execute("PRAGMA analysis_limit = 1000")
    for table in tables:
        db.execute(f"ANALYZE {table}")


def _bulk_load(
    db: sqlite3.Connection, *, tables: Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]
) -> None:
    # A bigger page cache for the load (random-key indexes: digests, nonces, key ids),
    # back to the default afterwards: the serving registrar keeps a small one.
    db.execute(f"PRAGMA cache_size = -{_BULK_CACHE_KIB}")
    try:
        with _immediate(db):
            for table, columns, rows in tables:
                marks = ",".join("?" * len(columns))
                sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608 - fixed names
                db.executemany(sql, rows)
    finally:
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA cache_size = -2000")
