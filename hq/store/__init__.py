"""HQ's durable record on SQLite (the default) or PostgreSQL.

Layout: :mod:`.records` (values), :mod:`.location` (``hq init --store URL``, pure),
:mod:`.schema` (versioned migrations per engine, pure), :mod:`.engine` (one connection API
over ``sqlite3`` and psycopg 3), :mod:`.core` (:class:`HqStore`: the tables of
:mod:`.stations`, :mod:`.audit` and :mod:`.sites` on the connection of :mod:`.base`) and
:mod:`.quorum` (the quorum's tables, on the caller's :meth:`HqStore.transaction`
connection): the only SQL HQ runs.
"""

from __future__ import annotations

from hq.store.core import HqStore
from hq.store.engine import Connection, Cursor
from hq.store.location import StoreLocation, parse_store_location
from hq.store.records import (
    ApproverRow,
    AuditHead,
    DeviceRow,
    EntitlementRow,
    ReconState,
    SiteRow,
    StationCrlRow,
    StationRow,
    StoredPayloadKey,
)
from hq.store.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "ApproverRow",
    "AuditHead",
    "Connection",
    "Cursor",
    "DeviceRow",
    "EntitlementRow",
    "HqStore",
    "ReconState",
    "SiteRow",
    "StationCrlRow",
    "StationRow",
    "StoreLocation",
    "StoredPayloadKey",
    "parse_store_location",
]
