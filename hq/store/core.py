"""The HQ store: enrolled stations, issued entitlements, audit heads, reconciliation state
and the devices every audit export reported; sites, their (KMS-sealed) payload keys and
bundles, the latest CRL of each station, the root CRL and its revocations, the HQ revocation
lists, the quorum and the site reports — on SQLite (the default, a file in the HQ directory)
or PostgreSQL (``hq init --store postgresql://…``, for a registry of tens of millions of
devices). The SQL is written once (:mod:`hq.store.engine`).

One connection per command: every change that belongs together runs in one transaction
(:meth:`HqStore.transaction`), so an ingest either moves the audit head *and* stores its
devices and counters, or changes nothing.

Fleet scale: nothing here loads the device registry into Python. The counterfeit
cross-check (:meth:`HqStore.audited_certificates`) and the duplicate checks of an ingest
put the batch's keys into a temporary table and join it with the indexed registry;
:meth:`HqStore.bulk_put_devices` loads with ``COPY`` on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from hq.store.audit import AuditTables
from hq.store.engine import connect
from hq.store.location import StoreLocation
from hq.store.sites import SiteTables
from hq.store.stations import StationTables

__all__ = ["HqStore"]


def _location(where: StoreLocation | Path) -> StoreLocation:
    return where if isinstance(where, StoreLocation) else StoreLocation("sqlite", path=where)


class HqStore(StationTables, AuditTables, SiteTables):
    """The HQ database. ``create`` makes a new one; ``open`` refuses a missing one and
    migrates an older one forward (see :mod:`hq.store.schema`).

    Its tables are read and written by area: :class:`StationTables`, :class:`AuditTables`,
    :class:`SiteTables`, on the connection of :class:`hq.store.base.StoreBase`."""

    @classmethod
    def create(cls, where: StoreLocation | Path) -> HqStore:
        return cls(connect(_location(where), create=True))

    @classmethod
    def open(cls, where: StoreLocation | Path) -> HqStore:
        return cls(connect(_location(where), create=False))
