"""The registrar's durable record, on SQLite (aiosqlite, the default) or PostgreSQL
(psycopg 3, several registrar instances sharing one database), with group commit.

Layout: :mod:`.records` (values), :mod:`.statements` (the SQL, once for both engines),
:mod:`.base` (the :class:`Store` API: writes, change feed, open/close), :mod:`.reads` (every
read query), :mod:`.writer` (the group-commit writer task), :mod:`.imports` (bulk-import
rows), :mod:`.backend` (the engine protocol), :mod:`.sqlite` and :mod:`.postgres`
(connections, schema versions and migrations, the change feed), :mod:`.location`
(``--store URL``).

Durability before reply: a registration's response is published only after the transaction
that records the device, its certified key, its nonce and the request→response pair has
committed (SQLite: WAL with ``synchronous=FULL``; PostgreSQL: ``synchronous_commit = on``).
A crash after the commit and before the publish is harmless: the device retries the
identical request and gets the stored response.

Group commit: one fsync costs milliseconds, so one transaction per registration would cap the
registrar at a few hundred registrations per second on a good disk and far fewer on a slow
one. A single writer task collects every write queued within ``batch_window`` seconds (or up
to ``max_batch``) and commits them in ONE transaction; each caller awaits its own future,
which resolves only after that commit. If the batch fails (a constraint), it is retried one
write per transaction so one bad write cannot sink the others; a write refused as a
duplicate raises :class:`registrar.errors.StoreConflict`.

Reads (idempotency, nonce, key-owner look-ups) use other connections: they do not wait for
the writer's commit. They cannot see writes that are still queued; the service covers that
window with in-memory reservations (and, across instances, the unique keys do).

Tables: ``devices`` (one row per registered device: current LDevID, its key, the wrap key
used for payload-key rotation), ``certified_keys`` (every key ever certified, for
``csr_foreign_key``), ``requests`` (request digest → stored response: idempotency),
``nonces`` (every nonce accepted; both pruned by the writer itself once no request that
old can be fresh, see :meth:`Store.prune_expired_replay_records`),
``superseded`` (LDevIDs replaced by a re-registration: input to the site CRL), ``events``
(audit trail for ``registrar status``), ``pending_approvals`` / ``approvals`` (devices an
admission plugin held, and the installer's approvals), ``factory_certs`` (every chain-valid
factory certificate seen in a registration request, first sighting kept: the evidence of
``registrar report``), ``certificates`` (every LDevID ever issued, per device, with its
kind — registration or renewal — and its issued, notAfter, superseded and revoked times:
the chain that ``registrar devices --certificates`` shows; the serial is the primary key),
``payload_key_periods`` and ``key_offers`` (payload-key rotation, see
:mod:`registrar.key_distribution`) and ``crl_number`` (the site CRL counter, one row).

Large registries: nothing the running registrar does reads the registry whole. Status
counts come from the engine's estimates above 20,000 rows, devices per payload key from
an index scan reused for 50x its cost, devices pending a payload key from an index per key;
operator listings page (:meth:`Store.device_pages`). :meth:`Store.import_registrations`
bulk-loads (COPY / big transactions) in bounded chunks. ``bench/registry_scale.py``
measures it.

Change feed: :meth:`Store.changes` yields :class:`Change` values (revocations, status
changes, registrations and renewals — which supersede —, approvals, payload-key changes)
once committed: on PostgreSQL those of every instance on the database within milliseconds
(LISTEN/NOTIFY), on SQLite this process's own only.
"""

from __future__ import annotations

from registrar.store.base import Store
from registrar.store.location import StoreLocation, parse_store_location
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
)

__all__ = [
    "CertificateRecord",
    "Change",
    "DeviceRecord",
    "Event",
    "FactorySighting",
    "Lookup",
    "PendingApproval",
    "Registration",
    "RenewalLookup",
    "Store",
    "StoreLocation",
    "parse_store_location",
]
