"""Every read of the registrar's registry: the queries behind :class:`registrar.store.Store`'s
look-ups, listings and counts (the registration path's point reads, operator listings in
pages, ``registrar status`` counts and estimates).

Reads use the backend's reader connections: they never wait for the group-commit writer and
cannot see writes still queued there (see the package docstring, "Reads").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from registrar.errors import StoreError
from registrar.store import statements as q
from registrar.store.backend import Backend
from registrar.store.records import (
    CertificateRecord,
    DeviceRecord,
    Event,
    FactorySighting,
    Lookup,
    PendingApproval,
    RenewalLookup,
)
from trustcore.errors import InvalidValueError
from trustcore.identity import CertSerial, DeviceId, StationId

__all__ = ["EXACT_COUNT_BELOW", "StoreReads"]

#: :meth:`StoreReads.counts` counts tables smaller than this exactly, larger ones by estimate.
EXACT_COUNT_BELOW = 20_000


class StoreReads:
    """The read half of :class:`registrar.store.Store` (its base class): queries over
    ``backend``'s reader connections, with engine errors raised as :class:`StoreError`."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        #: (valid until, monotonic; result) of an expensive :meth:`devices_per_payload_key`.
        self._per_key: tuple[float, dict[bytes, int]] | None = None

    async def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return await self._backend.fetchall(sql, params)
        except self._backend.errors as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc

    async def lookup(
        self,
        digest: bytes,
        nonce: bytes,
        key_id: bytes | None,
        device_id: DeviceId | None = None,
    ) -> Lookup:
        """One round trip: stored response for ``digest``, nonce seen, owner of ``key_id``
        (and, with ``device_id``, that device's current LDevID)."""
        if device_id is None:
            rows = await self._rows(q.LOOKUP, (digest, nonce, key_id or b""))
        else:
            dev = device_id.value
            rows = await self._rows(q.LOOKUP_DEVICE, (digest, nonce, key_id or b"", dev, dev, dev))
        row = rows[0]
        response, seen, owner = row[:3]
        found = Lookup(_bytes(response), bool(seen), DeviceId(owner) if owner is not None else None)
        if device_id is None:
            return found
        serial, status, der = row[3:]
        with _stored_values():
            previous = None if serial is None else CertSerial.from_hex(serial)
        return Lookup(
            found.response, found.nonce_seen, found.key_owner, previous, status, _bytes(der)
        )

    async def is_approved(self, device_id: DeviceId) -> bool:
        rows = await self._rows(
            "SELECT EXISTS(SELECT 1 FROM approvals WHERE device_id = ?)", (device_id.value,)
        )
        return bool(rows[0][0])

    async def is_pending(self, device_id: DeviceId) -> bool:
        rows = await self._rows(
            "SELECT EXISTS(SELECT 1 FROM pending_approvals WHERE device_id = ?)",
            (device_id.value,),
        )
        return bool(rows[0][0])

    async def pending(self) -> list[PendingApproval]:
        rows = await self._rows(
            "SELECT device_id, station_id, idevid_serial, plugin, reason, first_seen, "
            "last_seen, attempts FROM pending_approvals ORDER BY first_seen, device_id"
        )
        with _stored_values():
            return [
                PendingApproval(
                    DeviceId(dev), _station(station), CertSerial.from_hex(idevid), *rest
                )
                for dev, station, idevid, *rest in rows
            ]

    async def devices(self) -> list[DeviceRecord]:
        """Every device (operator commands; the running registrar pages with
        :meth:`device_pages` or asks bounded questions instead)."""
        rows = await self._rows(q.SELECT_DEVICES + " ORDER BY device_id")
        return [_device(row) for row in rows]

    async def device_pages(
        self, *, size: int = 1000, status: str | None = None, not_key: bytes | None = None
    ) -> AsyncIterator[list[DeviceRecord]]:
        """Devices in pages of at most ``size`` (keyset paging: memory bounded by one page),
        optionally only those with ``status``, and (with a ``status``) not on payload key
        ``not_key``. Each page costs index look-ups, never a scan of the registry: devices
        not on ``not_key`` come key by key (the few payload keys there are, found by a
        skip scan of the ``(status, payload_key_id, device_id)`` index), each key's in
        device-id order; the others in device-id order."""
        if not_key is not None:
            if status is None:
                raise ValueError("device_pages(not_key=...) needs a status")
            keys = await self._rows(q.PAYLOAD_KEYS_OF_STATUS, (status, status))
            for (key,) in keys:
                if bytes(key) == not_key:
                    continue
                async for page in self._pages(q.DEVICES_ON_KEY, (status, key), size):
                    yield page
            return
        async for page in self._pages(q.DEVICES_AFTER, (), size):
            if status is not None:
                page = [d for d in page if d.status == status]
            if page:
                yield page

    async def _pages(
        self, sql: str, head: tuple[Any, ...], size: int
    ) -> AsyncIterator[list[DeviceRecord]]:
        after = ""
        while True:
            rows = await self._rows(sql, (*head, after, size))
            if not rows:
                return
            yield [_device(row) for row in rows]
            if len(rows) < size:
                return
            after = rows[-1][0]

    async def device(self, device_id: DeviceId) -> DeviceRecord | None:
        rows = await self._rows(q.SELECT_DEVICES + " WHERE device_id = ?", (device_id.value,))
        return _device(rows[0]) if rows else None

    async def device_by_idevid(
        self, station_id: StationId, idevid_serial: CertSerial
    ) -> DeviceRecord | None:
        """The device registered with that station's factory certificate serial."""
        rows = await self._rows(
            q.SELECT_DEVICES + " WHERE station_id = ? AND idevid_serial = ?",
            (station_id.value, idevid_serial.hex),
        )
        return _device(rows[0]) if rows else None

    async def revoked_device_ids(self) -> set[DeviceId]:
        """Devices whose status is ``revoked`` (an index range, not a scan of the registry)."""
        rows = await self._rows("SELECT device_id FROM devices WHERE status = 'revoked'")
        return {DeviceId(r[0]) for r in rows}

    async def counts(self) -> dict[str, int]:
        """Rows per table, for ``registrar status`` (refreshed every half second while the
        registrar runs). Exact below :data:`EXACT_COUNT_BELOW` rows; above, the engine's
        own estimate — PostgreSQL's live-tuple statistics (may lag a few seconds),
        SQLite's rowid range (exact for tables nothing is deleted from) — because an exact
        count reads the whole table: about 250 ms for a million devices, twice a second."""
        names = ("devices", "requests", "nonces", "certified_keys", "superseded", "events")
        try:
            estimates = await self._backend.estimated_rows(names)
        except self._backend.errors as exc:
            raise StoreError(f"registrar database read failed: {exc}") from exc
        small = [n for n in names if estimates.get(n, 0) < EXACT_COUNT_BELOW]
        out = {n: max(0, int(estimates.get(n, 0))) for n in names}
        if small:
            counted = (f"(SELECT COUNT(*) FROM {n})" for n in small)  # noqa: S608 - fixed names
            sql = "SELECT " + ", ".join(counted)
            rows = await self._rows(sql)
            out.update(zip(small, (int(v) for v in rows[0]), strict=True))
        return out

    async def superseded_serials(
        self, device_id: DeviceId | None = None
    ) -> list[tuple[str, str, int]]:
        """(LDevID serial hex, device id, time) of certificates replaced by re-registration
        (one device's, or all)."""
        sql = "SELECT ldevid_serial, device_id, superseded_at FROM superseded"
        if device_id is None:
            rows = await self._rows(sql + " ORDER BY superseded_at")
        else:
            rows = await self._rows(
                sql + " WHERE device_id = ? ORDER BY superseded_at", (device_id.value,)
            )
        return [(r[0], r[1], int(r[2])) for r in rows]

    async def certificates(self, device_id: DeviceId | None = None) -> list[CertificateRecord]:
        """The chain of LDevIDs per device, oldest first (all devices when None)."""
        sql = (
            "SELECT serial, device_id, kind, issued_at, not_after, superseded_at, revoked_at "
            "FROM certificates"
        )
        order = (
            " ORDER BY device_id, COALESCE(issued_at, superseded_at), "
            + self._backend.certificate_order
        )
        if device_id is None:
            rows = await self._rows(sql + order)
        else:
            rows = await self._rows(sql + " WHERE device_id = ?" + order, (device_id.value,))
        with _stored_values():
            return [
                CertificateRecord(CertSerial.from_hex(serial), DeviceId(dev), *rest)
                for serial, dev, *rest in rows
            ]

    async def renewal_lookup(self, device_id: DeviceId) -> RenewalLookup:
        """Current serial, status, superseded serials and issue time of the current LDevID."""
        rows = await self._rows(
            "SELECT d.ldevid_serial, d.status, COALESCE(c.issued_at, d.registered_at) "
            "FROM devices d LEFT JOIN certificates c ON c.serial = d.ldevid_serial "
            "WHERE d.device_id = ?",
            (device_id.value,),
        )
        old = await self._rows(
            "SELECT ldevid_serial FROM superseded WHERE device_id = ?", (device_id.value,)
        )
        with _stored_values():
            superseded = frozenset(CertSerial.from_hex(str(r[0])) for r in old)
            current = None if not rows else CertSerial.from_hex(str(rows[0][0]))
        if not rows:
            return RenewalLookup(None, "unregistered", superseded, None)
        _serial, status, issued = rows[0]
        return RenewalLookup(current, str(status), superseded, issued)

    async def approved_at(self, device_id: DeviceId) -> int | None:
        rows = await self._rows(
            "SELECT approved_at FROM approvals WHERE device_id = ?", (device_id.value,)
        )
        return int(rows[0][0]) if rows else None

    async def events(self, limit: int = 20, kind: str | None = None) -> list[Event]:
        if kind is None:
            rows = await self._rows(
                "SELECT time, device_id, kind, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._rows(
                "SELECT time, device_id, kind, detail FROM events WHERE kind = ? "
                "ORDER BY id DESC LIMIT ?",
                (kind, limit),
            )
        return [Event(*row) for row in rows]

    async def factory_sightings(self) -> list[FactorySighting]:
        """Every factory certificate seen in a registration request, first sighting first
        (``registrar report``). A stored value that is no valid identifier or serial is a
        :class:`StoreError`."""
        rows = await self._rows(
            "SELECT station_id, serial, device_id, der, first_seen FROM factory_certs "
            "ORDER BY first_seen, station_id, serial"
        )
        with _stored_values():
            return [
                FactorySighting(
                    StationId(r[0]),
                    CertSerial.from_hex(r[1]),
                    DeviceId(r[2]),
                    bytes(r[3]),
                    int(r[4]),
                )
                for r in rows
            ]

    async def key_periods(self) -> list[tuple[bytes, int, int | None]]:
        """(key id, current from, superseded at or None) of every key current here once."""
        rows = await self._rows(
            "SELECT key_id, current_from, superseded_at FROM payload_key_periods "
            "ORDER BY current_from, key_id"
        )
        return [(bytes(r[0]), r[1], r[2]) for r in rows]

    async def key_offers(
        self, device_ids: Sequence[str] | None = None
    ) -> dict[str, tuple[bytes, int, int]]:
        """device id -> (key id, issued, offered at) of the last update sent to it (those
        of ``device_ids`` only, when given)."""
        sql = "SELECT device_id, key_id, issued, offered_at FROM key_offers"
        if device_ids is None:
            rows = await self._rows(sql)
        elif not device_ids:
            return {}
        else:
            marks = ",".join("?" * len(device_ids))
            rows = await self._rows(sql + f" WHERE device_id IN ({marks})", tuple(device_ids))
        return {r[0]: (bytes(r[1]), r[2], r[3]) for r in rows}

    async def devices_per_payload_key(self) -> dict[bytes, int]:
        """Registered devices per acknowledged payload key id (``registrar status``, every
        half second). The count reads every registered device's index entry (about 110 ms
        for a million on SQLite), so a result is reused for 50 times what it cost to
        compute (at most 2% of the database's time; a million devices: a few seconds
        stale); results that cost under 5 ms are not reused (a small site sees each
        acknowledgement at once)."""
        cached = self._per_key
        now = time.monotonic()
        if cached is not None and now < cached[0]:
            return dict(cached[1])
        rows = await self._rows(
            "SELECT payload_key_id, COUNT(*) FROM devices WHERE status = 'registered' "
            "GROUP BY payload_key_id"
        )
        result = {bytes(r[0]): int(r[1]) for r in rows}
        cost = time.monotonic() - now
        self._per_key = (now + 50 * cost, result) if cost >= 0.005 else None
        return dict(result)


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    dev, station, idevid, ldevid, der, wrap, key, at, count, status = row
    with _stored_values():
        return DeviceRecord(
            DeviceId(dev),
            _station(station),
            CertSerial.from_hex(idevid),
            CertSerial.from_hex(ldevid),
            bytes(der),
            bytes(wrap),
            bytes(key),
            at,
            count,
            status,
        )


@contextlib.contextmanager
def _stored_values() -> Iterator[None]:
    """Stored ids and serials become value objects; one that is not valid is a
    :class:`StoreError` (a damaged or hand-edited database), never a crash."""
    try:
        yield
    except InvalidValueError as exc:
        raise StoreError(f"registrar database holds a bad value: {exc.message}") from exc


def _station(value: str | None) -> StationId | None:
    return None if value is None else StationId(value)
