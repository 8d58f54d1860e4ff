"""SQLite backend of the registrar store (aiosqlite): one writer and one reader connection,
WAL with ``synchronous=FULL``; schema versions in ``meta`` (key ``schema``).

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

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite

from registrar.errors import StoreError
from registrar.store import statements as q
from registrar.store.records import Change

__all__ = ["SCHEMA_VERSION", "SqliteBackend"]

log = logging.getLogger(__name__)

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


async def _fill_certificates(db: aiosqlite.Connection) -> None:
    """Schema 2: fill ``certificates`` from what schema 1 kept."""
    from cryptography import x509

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


async def _script(db: aiosqlite.Connection, script: str) -> None:
    """Run DDL inside the current transaction (``executescript`` would commit first)."""
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)


#: version -> (DDL, data step), applied in one transaction each.
_MIGRATIONS: dict[int, tuple[str, Callable[[aiosqlite.Connection], Any] | None]] = {
    2: (_SCHEMA_2, _fill_certificates),
    3: (_SCHEMA_3, None),
    4: (_SCHEMA_4, None),
}


async def _migrate(db: aiosqlite.Connection, path: object) -> None:
    await db.executescript(_SCHEMA_1)
    await db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
    )
    rows = await db.execute_fetchall("SELECT value FROM meta WHERE key='schema'")
    found = int(next(iter(rows))[0])
    if found > SCHEMA_VERSION:
        raise StoreError(f"database schema {found}, this registrar knows {SCHEMA_VERSION}")
    if found == SCHEMA_VERSION:
        # a new file: every step's tables (each is IF NOT EXISTS)
        for ddl, _ in _MIGRATIONS.values():
            await db.executescript(ddl)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        ddl, step = _MIGRATIONS[version]
        await db.execute("BEGIN IMMEDIATE")
        try:
            await _script(db, ddl)
            if step is not None:
                await step(db)
            await db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(version),))
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        log.info("registrar database %s migrated to schema %d", path, version)
    await db.executescript(_KEY_SCHEMA)


class SqliteBackend:
    """See the module docstring."""

    name = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    unavailable: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
    certificate_order = "rowid"
    local_feed = True

    def __init__(
        self,
        writer: aiosqlite.Connection,
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
            writer = await aiosqlite.connect(str(path), isolation_level=None)
            try:
                await writer.execute("PRAGMA journal_mode=WAL")
                await writer.execute("PRAGMA synchronous=FULL")
                await writer.execute("PRAGMA foreign_keys=ON")
                await _migrate(writer, path)
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
        db = self._db
        await db._execute(_transaction, db._conn, groups)  # type: ignore[no-untyped-call]

    async def call(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            rows = list(await db.execute_fetchall(sql, params))
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        return [tuple(r) for r in rows]

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
        # approximate statistics: a bounded sample per index, seconds not minutes
        await self._db.execute("PRAGMA analysis_limit = 1000")
        for table in tables:
            await self._db.execute(f"ANALYZE {table}")

    async def bulk_load(
        self, tables: Sequence[tuple[str, Sequence[str], list[tuple[Any, ...]]]]
    ) -> None:
        db = self._db
        # A bigger page cache for the load (random-key indexes: digests, nonces, key ids),
        # back to the default afterwards: the serving registrar keeps a small one.
        await db.execute(f"PRAGMA cache_size = -{_BULK_CACHE_KIB}")
        await db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns, rows in tables:
                marks = ",".join("?" * len(columns))
                sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608 - fixed names
                await db.executemany(sql, rows)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("PRAGMA cache_size = -2000")

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
    db: sqlite3.Connection, groups: Sequence[dict[str, list[tuple[Any, ...]]]]
) -> None:
    """One group commit, on the writer connection's thread."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for grouped in groups:
            for sql, rows in grouped.items():
                db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
