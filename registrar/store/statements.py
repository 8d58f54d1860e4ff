"""The store's SQL, written once for both backends (pure: no connections here).

Statements use ``?`` placeholders and the ``INSERT … ON CONFLICT`` forms SQLite (3.24+)
and PostgreSQL share; the PostgreSQL backend turns ``?`` into ``%s`` (no statement has a
``?`` or ``%`` inside a literal). What differs per engine (types, identity columns,
``RETURNING`` support) lives in the backends' schema and migrations.
"""

from __future__ import annotations

from typing import Any

from registrar.store.records import Change, Event, Registration, Statements

__all__ = ["Item", "changes_of", "statements_of"]

#: A queued write: a registration or renewal, an event, one ad-hoc statement, or ad-hoc
#: statements that belong together.
Item = Registration | Event | Statements | tuple[str, tuple[Any, ...]]

SUPERSEDE = (
    "INSERT INTO superseded (ldevid_serial, device_id, superseded_at) "
    "SELECT ldevid_serial, device_id, ? FROM devices WHERE device_id = ? AND ldevid_serial != ? "
    "ON CONFLICT DO NOTHING"
)
UPSERT_DEVICE = (
    "INSERT INTO devices (device_id, station_id, idevid_serial, ldevid_serial, ldevid_der, "
    "ldevid_key_id, wrap_key, payload_key_id, registered_at) VALUES (?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(device_id) DO UPDATE SET station_id=excluded.station_id, "
    "idevid_serial=excluded.idevid_serial, ldevid_serial=excluded.ldevid_serial, "
    "ldevid_der=excluded.ldevid_der, ldevid_key_id=excluded.ldevid_key_id, "
    "wrap_key=excluded.wrap_key, payload_key_id=excluded.payload_key_id, "
    "registered_at=excluded.registered_at, registrations=devices.registrations+1, "
    "status='registered'"
)
RENEW_DEVICE = (
    "UPDATE devices SET ldevid_serial = ?, ldevid_der = ?, ldevid_key_id = ?, "
    "payload_key_id = ? WHERE device_id = ?"
)
SUPERSEDE_CERTS = (
    "UPDATE certificates SET superseded_at = ? WHERE device_id = ? AND serial != ? "
    "AND superseded_at IS NULL"
)
#: No ``ON CONFLICT``: a serial issued twice (two instances, one registration) must fail
#: the whole transaction — serials are unique by constraint, not by luck.
INSERT_CERT = (
    "INSERT INTO certificates (serial, device_id, kind, issued_at, not_after) "
    "VALUES (?, ?, ?, ?, ?)"
)
INSERT_KEY = "INSERT INTO certified_keys (key_id, device_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
#: Unique digest and unique nonce: the second of two instances committing the same
#: request (or a replayed nonce) fails as a whole (``StoreConflict``).
INSERT_REQUEST = "INSERT INTO requests (digest, device_id, response, created) VALUES (?,?,?,?)"
INSERT_NONCE = "INSERT INTO nonces (nonce, device_id, time) VALUES (?, ?, ?)"
INSERT_EVENT = "INSERT INTO events (time, device_id, kind, detail) VALUES (?, ?, ?, ?)"
REVOKE_DEVICE = "UPDATE devices SET status = 'revoked' WHERE device_id = ?"
REVOKE_CERTS = "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL"
LOOKUP = (
    "SELECT (SELECT response FROM requests WHERE digest = ?), "
    "EXISTS(SELECT 1 FROM nonces WHERE nonce = ?), "
    "(SELECT device_id FROM certified_keys WHERE key_id = ?)"
)
#: The same plus the device's current LDevID (serial, status, DER): a re-registration must
#: supersede it, and the expired-LDevID policy looks at it; still one round trip.
LOOKUP_DEVICE = (
    "SELECT (SELECT response FROM requests WHERE digest = ?), "
    "EXISTS(SELECT 1 FROM nonces WHERE nonce = ?), "
    "(SELECT device_id FROM certified_keys WHERE key_id = ?), "
    "(SELECT ldevid_serial FROM devices WHERE device_id = ?), "
    "(SELECT status FROM devices WHERE device_id = ?), "
    "(SELECT ldevid_der FROM devices WHERE device_id = ?)"
)
DEVICE_COLUMNS = (
    "device_id, station_id, idevid_serial, ldevid_serial, ldevid_der, wrap_key, "
    "payload_key_id, registered_at, registrations, status"
)
SELECT_DEVICES = f"SELECT {DEVICE_COLUMNS} FROM devices"  # noqa: S608 - constant text
#: Keyset pages of devices by id (the primary key), and of the devices on one payload key
#: with one status (the ``(status, payload_key_id, device_id)`` index); ``?`` last: after
#: this device id, at most this many.
DEVICES_AFTER = f"{SELECT_DEVICES} WHERE device_id > ? ORDER BY device_id LIMIT ?"
DEVICES_ON_KEY = (
    f"{SELECT_DEVICES} WHERE status = ? AND payload_key_id = ? AND device_id > ? "
    "ORDER BY device_id LIMIT ?"
)
#: The distinct payload keys of devices with a status (``?`` twice), by a skip scan: one
#: index look-up per key instead of a scan of every device.
PAYLOAD_KEYS_OF_STATUS = (
    "WITH RECURSIVE k(id) AS ("
    "SELECT (SELECT payload_key_id FROM devices WHERE status = ? "
    "ORDER BY payload_key_id LIMIT 1) "
    "UNION ALL SELECT (SELECT payload_key_id FROM devices WHERE status = ? "
    "AND payload_key_id > k.id ORDER BY payload_key_id LIMIT 1) FROM k WHERE k.id IS NOT NULL"
    ") SELECT id FROM k WHERE id IS NOT NULL"
)
#: Next site CRL number, never below ``?`` (the number of the CRL file already signed):
#: one statement under the counter row's lock, so two instances never get the same number.
NEXT_CRL_NUMBER = (
    "INSERT INTO crl_number (id, number) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET "
    "number = {greatest}(crl_number.number + 1, excluded.number) RETURNING number"
)
PRUNE_NONCES = "DELETE FROM nonces WHERE time < ?"
PRUNE_REQUESTS = "DELETE FROM requests WHERE created < ?"
#: At most ``?`` (second parameter) replay records older than the newest by more than ``?``
#: (first): bounded transactions, and the time comes from the committed data (a nonce's
#: request time was within the freshness window of the registrar's clock when accepted).
PRUNE_EXPIRED_NONCES = (
    "DELETE FROM nonces WHERE nonce IN (SELECT nonce FROM nonces WHERE "
    "time < (SELECT MAX(time) FROM nonces) - ? LIMIT ?) RETURNING 1"
)
PRUNE_EXPIRED_REQUESTS = (
    "DELETE FROM requests WHERE digest IN (SELECT digest FROM requests WHERE "
    "created < (SELECT MAX(created) FROM requests) - ? LIMIT ?) RETURNING 1"
)


def statements_of(item: Item) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements one queued write runs (in this order, in one transaction)."""
    if isinstance(item, Event):
        return [(INSERT_EVENT, (item.time, item.device_id, item.kind, item.detail))]
    if isinstance(item, tuple):
        return [item]
    if isinstance(item, Statements):
        return list(item.statements)
    dev = item.device_id.value
    ldevid = item.ldevid_serial.hex
    renewal = item.kind == "renewal"
    device_row = (
        (
            RENEW_DEVICE,
            (ldevid, item.ldevid_der, item.ldevid_key_id, item.payload_key_id, dev),
        )
        if renewal
        else (
            UPSERT_DEVICE,
            (
                dev,
                None if item.station_id is None else item.station_id.value,
                item.idevid_serial.hex,
                ldevid,
                item.ldevid_der,
                item.ldevid_key_id,
                item.wrap_key_der,
                item.payload_key_id,
                item.at,
            ),
        )
    )
    detail = f"ldevid {item.ldevid_serial} idevid {item.idevid_serial}"
    return [
        (SUPERSEDE, (item.at, dev, ldevid)),
        device_row,
        (SUPERSEDE_CERTS, (item.at, dev, ldevid)),
        (INSERT_CERT, (ldevid, dev, item.kind, item.at, item.ldevid_not_after)),
        (INSERT_KEY, (item.ldevid_key_id, dev)),
        (INSERT_REQUEST, (item.request_digest, dev, item.response, item.at)),
        (INSERT_NONCE, (item.nonce, dev, item.request_time)),
        (INSERT_EVENT, (item.at, dev, "renewed" if renewal else "registered", detail)),
    ]


def changes_of(item: Item, origin: str) -> tuple[Change, ...]:
    """What other instances hear about a registration or renewal once it commits."""
    if not isinstance(item, Registration):
        return ()
    kind = "renewed" if item.kind == "renewal" else "registered"
    return (Change(kind, item.device_id.value, item.ldevid_serial.hex, origin=origin),)
