"""One HQ database connection on SQLite (``sqlite3``) or PostgreSQL (psycopg 3), behind one
small API: the store's SQL is written once, with ``?`` placeholders and the ``INSERT … ON
CONFLICT`` forms both engines share; the PostgreSQL connection turns ``?`` into ``%s`` (no
statement of the store has a ``?`` or ``%`` inside a literal).

Transactions: :meth:`Connection.begin` serialises writers on both engines, as SQLite's
``BEGIN IMMEDIATE`` always did (PostgreSQL: a transaction-scoped advisory lock), so two HQ
commands running at once apply their read-check-write steps one after the other. Outside a
transaction every statement commits on its own (autocommit).

Errors: every driver error leaves as :class:`hq.errors.StoreError` (a unique or foreign key
violation as :class:`hq.errors.StoreConflict`), chained to the driver's exception and
without the URL's password, so no traceback reaches an HQ user.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg

from hq.errors import StoreConflict, StoreError
from hq.store.location import StoreLocation, safe_url
from hq.store.schema import (
    POSTGRES_MIGRATIONS,
    POSTGRES_VERSION,
    SCHEMA_VERSION,
    SQLITE_MIGRATIONS,
)
from trustcore.store_location import PG_CONNECT, pg_placeholders

__all__ = ["Connection", "Cursor", "connect"]

#: pg_advisory_xact_lock key of HQ writers ("HQ" in ASCII, then a 1).
_WRITER_LOCK = 0x4851_0001
#: pg_advisory_lock key held while a PostgreSQL HQ database is migrated.
_MIGRATION_LOCK = 0x4851_0002
#: Rows per transaction when SQLite bulk-loads (one fsync per chunk, bounded WAL).
_SQLITE_CHUNK = 200_000
#: SQLite page cache while bulk-loading (KiB): the registry's indexes stay mostly cached.
_SQLITE_BULK_CACHE_KIB = 256 * 1024


class Cursor(Protocol):
    """What a statement returns on either engine."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(ABC):
    """The engine-neutral API; see :class:`_Sqlite` and :class:`_Postgres`."""

    engine: str
    where: str

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        ...

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        ...

    @abstractmethod
    def script(self, sql: str) -> None:
        """Run several statements (schema text; no parameters)."""
        ...

    def probe(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a join of a batch (a :meth:`temp_table`) with an indexed registry
        table, run as one index probe per batch row whatever the planner estimates."""
        return self.execute(sql, params).fetchall()

    @abstractmethod
    def temp_table(
        self, name: str, columns: str, names: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> int:
        """A session-private table holding exactly ``rows`` (a batch to join with the
        registry); ``columns`` is its DDL in ``TEXT``/``BLOB``/``INTEGER`` terms."""
        ...

    @abstractmethod
    def copy_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk-insert ``rows`` (inside or outside a transaction); returns the count."""
        ...

    @abstractmethod
    def analyze(self, table: str) -> None:
        """Refresh the planner's statistics of ``table`` after a bulk load."""
        ...

    @abstractmethod
    def begin(self) -> None:
        ...

    @abstractmethod
    def commit(self) -> None:
        ...

    @abstractmethod
    def rollback(self) -> None:
        ...

    @abstractmethod
    def close(self) -> None:
        ...

    def _error(self, exc: Exception) -> StoreError:
        if isinstance(exc, sqlite3.IntegrityError | psycopg.errors.IntegrityError):
            return StoreConflict(f"HQ database {self.where}: {exc}")
        return StoreError(f"HQ database {self.where}: {exc}")


def _version_record(version: int) -> str:
    """The statement that records schema ``version`` (an int: nothing to inject)."""
    if version == 1:
        return "INSERT INTO meta (key, value) VALUES ('schema_version', '1')"
    return f"UPDATE meta SET value = '{version:d}' WHERE key = 'schema_version'"  # noqa: S608


# ------------------------------------------------------------------------------ SQLite


class _Sqlite(Connection):
    """One ``sqlite3`` connection: WAL, ``synchronous = FULL`` (a head reported as stored
    survives a power cut), foreign keys on, autocommit except inside :meth:`begin`."""

    engine = "sqlite"

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            self._conn = sqlite3.connect(path, isolation_level=None)
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        self._in_tx = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        try:
            return self._conn.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def script(self, sql: str) -> None:
        # executescript commits an open transaction first, so the script carries its own.
        try:
            self._conn.executescript(f"BEGIN IMMEDIATE;{sql};COMMIT;")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise self._error(exc) from exc

    def temp_table(
        self, name: str, columns: str, names: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> int:
        self.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns})")
        self.execute(f"DELETE FROM {name}")  # noqa: S608 (a constant name)
        return self.copy_rows(name, names, rows)

    def copy_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 (constant names)
            f"VALUES ({', '.join('?' * len(columns))})"
        )
        own_tx = not self._in_tx
        count = 0
        chunk: list[Sequence[Any]] = []

        def flush() -> None:
            nonlocal count
            if own_tx:
                self.begin()
            try:
                self._conn.executemany(sql, chunk)
            except sqlite3.Error as exc:
                if own_tx:
                    self.rollback()
                raise self._error(exc) from exc
            if own_tx:
                self.commit()
            count += len(chunk)
            chunk.clear()
            if progress is not None:
                progress(count)

        # A bulk load (outside a transaction) inserts into every index of the table at
        # random places: with SQLite's 2 MiB default page cache most of those inserts miss
        # it. A larger cache for the load only (given back after).
        cache = self._conn.execute("PRAGMA cache_size").fetchone()[0] if own_tx else None
        if cache is not None:
            self._conn.execute(f"PRAGMA cache_size = {-_SQLITE_BULK_CACHE_KIB:d}")
        try:
            for row in rows:
                chunk.append(row)
                if len(chunk) >= _SQLITE_CHUNK:
                    flush()
            if chunk:
                flush()
        finally:
            if cache is not None:
                self._conn.execute(f"PRAGMA cache_size = {int(cache):d}")
        return count

    def analyze(self, table: str) -> None:
        # SQLite plans the registry joins on their indexes without statistics, and its
        # ANALYZE reads the whole table: nothing to do.
        return

    def begin(self) -> None:
        self.execute("BEGIN IMMEDIATE")
        self._in_tx = True

    def commit(self) -> None:
        self._in_tx = False
        self.execute("COMMIT")

    def rollback(self) -> None:
        self._in_tx = False
        if self._conn.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()

    def migrate(self, *, create: bool) -> None:
        found = self._version()
        if create:
            if found is not None:
                raise StoreError(f"database {self.where} already exists")
            found = 0
        elif found is None:
            raise StoreError(f"database {self.where} is not an HQ database")
        if found > SCHEMA_VERSION:
            raise StoreError(f"database {self.where} has an unknown schema version {found}")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            record = _version_record(version)
            self.script(f"{SQLITE_MIGRATIONS[version]};{record}")

    def _version(self) -> int | None:
        table = self.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if table is None:
            return None
        row = self.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit():
            raise StoreError(f"database {self.where} has an unknown schema version")
        return int(row[0])


# ------------------------------------------------------------------------------ PostgreSQL



class _Postgres(Connection):
    """One psycopg connection in autocommit mode; :meth:`begin` opens a transaction that
    first takes HQ's writer lock."""

    engine = "postgres"

    def __init__(self, url: str) -> None:
        self.where = safe_url(url)
        try:
            self._conn = psycopg.connect(url, **PG_CONNECT)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open HQ database {self.where}: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self._conn.execute(pg_placeholders(sql).encode(), params)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        try:
            with self._conn.cursor() as cur:
                cur.executemany(pg_placeholders(sql).encode(), rows)
                return cur.rowcount
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def script(self, sql: str) -> None:
        try:
            with self._conn.transaction():
                self._conn.execute(sql.encode())
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def probe(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # Measured on a 1,000,000-device registry: PostgreSQL estimated 50 matches for a
        # 10,000-row batch and chose to hash the whole registry (a sequential scan, 0.4 s,
        # growing with the registry). Hash and merge joins are off for this statement
        # only, so the join probes the index once per batch row. (In a transaction that
        # failed, the rollback reverts the SETs.)
        self.execute("SET enable_hashjoin = off")
        self.execute("SET enable_mergejoin = off")
        try:
            return self.execute(sql, params).fetchall()
        finally:
            if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
                self.execute("RESET enable_hashjoin")
                self.execute("RESET enable_mergejoin")

    def temp_table(
        self, name: str, columns: str, names: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> int:
        columns = columns.replace("BLOB", "BYTEA").replace("INTEGER", "BIGINT")
        self.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} ({columns})")
        self.execute(f"TRUNCATE {name}")
        count = self.copy_rows(name, names, rows)
        # A temp table has no statistics: without them the planner may hash the whole
        # registry instead of probing its index once per row of the (small) batch.
        self.execute(f"ANALYZE {name}")
        return count

    def copy_rows(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        count = 0
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        try:
            with self._conn.cursor() as cur, cur.copy(statement.encode()) as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
                    if progress is not None and count % _SQLITE_CHUNK == 0:
                        progress(count)
        except psycopg.Error as exc:
            raise self._error(exc) from exc
        if progress is not None:
            progress(count)
        return count

    def analyze(self, table: str) -> None:
        self.execute(f"ANALYZE {table}")

    def begin(self) -> None:
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", (_WRITER_LOCK,))

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                self._conn.execute(b"ROLLBACK")
            except psycopg.Error:
                # A broken connection has no transaction left to roll back.
                if not self._conn.broken:
                    raise

    def close(self) -> None:
        self._conn.close()

    def migrate(self, *, create: bool) -> None:
        self.execute("SELECT pg_advisory_lock(?)", (_MIGRATION_LOCK,))
        try:
            found = self._version()
            if create:
                if found is not None:
                    raise StoreError(f"database {self.where} already holds an HQ")
                found = 0
            elif found is None:
                raise StoreError(
                    f"database {self.where} is not an HQ database (create it with hq init)"
                )
            if found > POSTGRES_VERSION:
                raise StoreError(f"database {self.where} has an unknown schema version {found}")
            for version in range(found + 1, POSTGRES_VERSION + 1):
                record = _version_record(version)
                self.script(f"{POSTGRES_MIGRATIONS[version]};{record}")
        finally:
            self.execute("SELECT pg_advisory_unlock(?)", (_MIGRATION_LOCK,))

    def _version(self) -> int | None:
        if self.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
            return None
        row = self.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit():
            raise StoreError(f"database {self.where} has an unknown schema version")
        return int(row[0])


def connect(location: StoreLocation, *, create: bool) -> Connection:
    """Open (``create``: make) the HQ database at ``location``, migrated to this code's
    schema. A missing SQLite file is refused unless ``create``; an existing one is refused
    if ``create``."""
    conn: _Sqlite | _Postgres
    if location.kind == "sqlite":
        path = location.path
        if create and path.exists():
            raise StoreError(f"database {path} already exists")
        if not create and not path.is_file():
            raise StoreError(f"database {path} is missing")
        conn = _Sqlite(path)
    else:
        conn = _Postgres(location.url)
    try:
        conn.migrate(create=create)
    except BaseException:
        conn.close()
        raise
    return conn
