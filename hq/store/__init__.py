"""HQ's durable record on SQLite (the default) or PostgreSQL.

Layout: :mod:`.records` (values), :mod:`.location` (``hq init --store URL``, pure),
:mod:`.schema` (versioned migrations per engine, pure), :mod:`.engine` (one connection API
over ``sqlite3`` and psycopg 3), :mod:`.core` (:class:`HqStore`, the only SQL HQ runs
besides the quorum's and its callers' statements through :meth:`HqStore.transaction`).
"""

from __future__ import annotations

from hq.store.core import HqStore
from hq.store.engine import Connection, Cursor
from hq.store.location import StoreLocation, parse_store_location
from hq.store.records import (
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
