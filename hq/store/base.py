"""What every part of :class:`hq.store.HqStore` shares: the one connection of a command and
its transactions. The tables are read and written by area (:mod:`.stations`,
:mod:`.audit`, :mod:`.sites`), each a class built on :class:`StoreBase`; :mod:`.core`
puts them together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hq.store.engine import Connection

__all__ = ["StoreBase"]


class StoreBase:
    """The connection and transactions of the HQ database."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._in_tx = False

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._conn.engine

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One atomic unit: everything inside commits together or not at all. Writers are
        serialised (SQLite ``BEGIN IMMEDIATE``; PostgreSQL an advisory lock)."""
        if self._in_tx:
            raise RuntimeError("nested transaction")
        self._conn.begin()
        self._in_tx = True
        try:
            yield self._conn
        except BaseException:
            self._conn.rollback()
            raise
        else:
            self._conn.commit()
        finally:
            self._in_tx = False
