"""What one database engine must provide to the registrar store: the :class:`Backend`
protocol that :mod:`registrar.store.sqlite` and :mod:`registrar.store.postgres` implement
and :class:`registrar.store.base.Store` drives (no I/O here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from registrar.store.records import Change

__all__ = ["Backend"]


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
