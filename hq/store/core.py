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

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hq.errors import HomeError
from hq.store.engine import Connection, connect
from hq.store.location import StoreLocation
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
from trustcore import cbor
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.stationtime import TimeAudit

__all__ = ["HqStore"]

_DEVICE_COLUMNS = (
    "device_id",
    "serial",
    "station_id",
    "entitlement_seq",
    "key_id",
    "audit_seq",
    "issued_time",
    "certificate",
)


def _device_tuple(r: DeviceRow) -> tuple[object, ...]:
    return (
        r.device_id,
        r.serial,
        r.station_id,
        r.entitlement_seq,
        r.key_id,
        r.audit_seq,
        r.issued_time,
        r.certificate,
    )


def _blob(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _policy_from_blob(blob: bytes) -> EntitlementPolicy:
    try:
        return EntitlementPolicy.from_map(cbor.decode(blob, max_size=1 << 20))
    except EncodingError as exc:
        raise HomeError(f"stored entitlement policy is corrupt: {exc.message}") from exc


def _location(where: StoreLocation | Path) -> StoreLocation:
    return where if isinstance(where, StoreLocation) else StoreLocation("sqlite", path=where)


class HqStore:
    """The HQ database. ``create`` makes a new one; ``open`` refuses a missing one and
    migrates an older one forward (see :mod:`hq.store.schema`)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._in_tx = False

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgres``."""
        return self._conn.engine

    @classmethod
    def create(cls, where: StoreLocation | Path) -> HqStore:
        return cls(connect(_location(where), create=True))

    @classmethod
    def open(cls, where: StoreLocation | Path) -> HqStore:
        return cls(connect(_location(where), create=False))

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

    # -- stations -----------------------------------------------------------------------------

    def station(self, station_id: str) -> StationRow | None:
        row = self._conn.execute(
            "SELECT station_id, ca_public_der, transport_public_der, csr_der, enrolled_at, "
            "generation FROM stations WHERE station_id = ?",
            (station_id,),
        ).fetchone()
        return None if row is None else StationRow(*row)

    def stations(self) -> list[StationRow]:
        rows = self._conn.execute(
            "SELECT station_id, ca_public_der, transport_public_der, csr_der, enrolled_at, "
            "generation FROM stations ORDER BY station_id"
        ).fetchall()
        return [StationRow(*r) for r in rows]

    def put_station(self, row: StationRow, *, replacing: StationRow | None, now: int) -> None:
        """Insert or replace a station (inside a transaction). A replacement starts a new
        audit log (the station's new key cannot continue the old chain), so its head is reset;
        devices and entitlements already recorded stay."""
        c = self._conn
        if replacing is None:
            c.execute(
                "INSERT INTO stations VALUES (?, ?, ?, ?, ?, ?)",
                (
                    row.station_id,
                    row.ca_public_der,
                    row.transport_public_der,
                    row.csr_der,
                    row.enrolled_at,
                    row.generation,
                ),
            )
        else:
            c.execute(
                "UPDATE enrolment_history SET replaced_at = ? "
                "WHERE station_id = ? AND replaced_at IS NULL",
                (now, row.station_id),
            )
            c.execute(
                "UPDATE stations SET ca_public_der = ?, transport_public_der = ?, csr_der = ?, "
                "enrolled_at = ?, generation = ? WHERE station_id = ?",
                (
                    row.ca_public_der,
                    row.transport_public_der,
                    row.csr_der,
                    row.enrolled_at,
                    row.generation,
                    row.station_id,
                ),
            )
            c.execute("DELETE FROM audit_heads WHERE station_id = ?", (row.station_id,))
        c.execute(
            "INSERT INTO enrolment_history (station_id, generation, ca_public_der, "
            "transport_public_der, enrolled_at) VALUES (?, ?, ?, ?, ?)",
            (
                row.station_id,
                row.generation,
                row.ca_public_der,
                row.transport_public_der,
                row.enrolled_at,
            ),
        )

    # -- entitlements -------------------------------------------------------------------------

    def last_entitlement_sequence(self, station_id: str) -> int:
        row = self._conn.execute(
            "SELECT MAX(sequence) FROM entitlements WHERE station_id = ?", (station_id,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def put_entitlement(self, row: EntitlementRow, package_sha256: bytes) -> None:
        self._conn.execute(
            "INSERT INTO entitlements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.station_id,
                row.sequence,
                row.entitlement_id,
                cbor.encode(row.policy.to_map()),
                row.station_ca_der,
                row.station_ca_serial,
                package_sha256,
                row.issued_at,
            ),
        )

    def other_stations_id_rules(self, station_id: str) -> list[tuple[str, int, DeviceIdRule]]:
        """(station, sequence, device-id rule) of every entitlement HQ issued to any other
        station: a new entitlement must not overlap them (``hq entitle``)."""
        rows = self._conn.execute(
            "SELECT station_id, sequence, policy_cbor FROM entitlements WHERE station_id <> ? "
            "ORDER BY station_id, sequence",
            (station_id,),
        ).fetchall()
        return [(r[0], int(r[1]), _policy_from_blob(r[2]).id_rule) for r in rows]

    def put_entitlement_override(
        self, station_id: str, sequence: int, kind: str, detail: str, recorded_at: int
    ) -> None:
        self._conn.execute(
            "INSERT INTO entitlement_overrides VALUES (?, ?, ?, ?, ?)",
            (station_id, sequence, kind, detail, recorded_at),
        )

    def entitlement_overrides(self) -> list[tuple[str, int, str, str, int]]:
        """Every overridden check: (station, sequence, kind, detail, recorded at)."""
        rows = self._conn.execute(
            "SELECT station_id, sequence, kind, detail, recorded_at FROM entitlement_overrides "
            "ORDER BY recorded_at, station_id, sequence"
        ).fetchall()
        return [(r[0], int(r[1]), r[2], r[3], int(r[4])) for r in rows]

    def entitlement(self, station_id: str, sequence: int) -> EntitlementRow | None:
        row = self._conn.execute(
            "SELECT station_id, sequence, entitlement_id, policy_cbor, station_ca_der, "
            "station_ca_serial, issued_at FROM entitlements WHERE station_id = ? AND sequence = ?",
            (station_id, sequence),
        ).fetchone()
        if row is None:
            return None
        return EntitlementRow(
            row[0], row[1], row[2], _policy_from_blob(row[3]), row[4], row[5], row[6]
        )

    def station_ca_issued(self, station_id: str, cert_der: bytes) -> bool:
        """Whether HQ issued exactly this station CA certificate to this station."""
        row = self._conn.execute(
            "SELECT 1 FROM entitlements WHERE station_id = ? AND station_ca_der = ? "
            "UNION ALL SELECT 1 FROM station_ca_certs WHERE station_id = ? AND cert_der = ?",
            (station_id, cert_der, station_id, cert_der),
        ).fetchone()
        return row is not None

    # -- station CA renewal and re-key (hq.station_ca) ----------------------------------------

    def station_ca_request_used(self, request_id: bytes) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM station_ca_certs WHERE request_id = ?", (request_id,)
        ).fetchone()
        return row is not None

    def put_station_ca_cert(
        self,
        *,
        station_id: str,
        serial: str,
        cert_der: bytes,
        ca_public_der: bytes,
        previous_public_der: bytes,
        kind: str,
        request_id: bytes,
        issued_at: int,
    ) -> None:
        """Record a renewed or re-keyed station CA certificate; a re-key also makes the new
        key the station's current CA key (future entitlements certify it). Call inside a
        transaction. The audit head is kept: a re-keyed station continues its chain."""
        c = self._conn
        c.execute(
            "INSERT INTO station_ca_certs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (serial, station_id, cert_der, ca_public_der, previous_public_der, kind,
             request_id, issued_at),
        )  # fmt: skip
        if ca_public_der != previous_public_der:
            c.execute(
                "UPDATE stations SET ca_public_der = ? WHERE station_id = ?",
                (ca_public_der, station_id),
            )

    def station_ca_keys(self, station_id: str) -> list[bytes]:
        """The SPKIs a station's exports may be signed with: its current CA key first, then
        the keys it re-keyed away from, newest first (a re-key chain; an enrolment with
        ``--replace`` starts a new chain, so keys before it do not count)."""
        station = self.station(station_id)
        if station is None:
            return []
        keys = [station.ca_public_der]
        while True:
            row = self._conn.execute(
                "SELECT previous_public_der FROM station_ca_certs WHERE station_id = ? AND "
                "ca_public_der = ? AND previous_public_der != ca_public_der "
                "ORDER BY issued_at DESC LIMIT 1",
                (station_id, keys[-1]),
            ).fetchone()
            if row is None or row[0] in keys:
                return keys
            keys.append(row[0])

    def station_export_keys(self, station_id: str) -> list[bytes]:
        """The keys an export of ``station_id`` may be signed with now: its re-key chain
        (:meth:`station_ca_keys`) down to the key of the last export HQ accepted. A key
        older than that one is closed for good (a stolen old key cannot fork the log)."""
        keys = self.station_ca_keys(station_id)
        row = self._conn.execute(
            "SELECT ca_public_der FROM station_export_keys WHERE station_id = ?", (station_id,)
        ).fetchone()
        if row is not None and row[0] in keys:
            keys = keys[: keys.index(row[0]) + 1]
        return keys

    def put_station_export_key(self, station_id: str, ca_public_der: bytes) -> None:
        self._conn.execute(
            "INSERT INTO station_export_keys VALUES (?, ?) ON CONFLICT(station_id) DO UPDATE "
            "SET ca_public_der = excluded.ca_public_der",
            (station_id, ca_public_der),
        )

    def retired_station_crls(self) -> list[StationCrlRow]:
        """The latest CRL of every retired station CA key (one row per station and key)."""
        rows = self._conn.execute(
            "SELECT station_id, crl_number, this_update, next_update, crl_der, recorded_at "
            "FROM station_retired_crls ORDER BY station_id, issuer_key_id"
        ).fetchall()
        return [StationCrlRow(*r) for r in rows]

    def put_retired_station_crl(self, issuer_key_id: bytes, row: StationCrlRow) -> None:
        """Keep ``row`` as the latest CRL of a retired key, unless a newer one is held."""
        self._conn.execute(
            "INSERT INTO station_retired_crls VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(station_id, issuer_key_id) DO UPDATE SET "
            "crl_number = excluded.crl_number, this_update = excluded.this_update, "
            "next_update = excluded.next_update, crl_der = excluded.crl_der, "
            "recorded_at = excluded.recorded_at "
            "WHERE excluded.crl_number > station_retired_crls.crl_number",
            (row.station_id, issuer_key_id, row.crl_number, row.this_update, row.next_update,
             row.crl_der, row.recorded_at),
        )  # fmt: skip

    # -- audit heads and reconciliation state -------------------------------------------------

    def audit_head(self, station_id: str) -> AuditHead:
        row = self._conn.execute(
            "SELECT next_seq, head_hash, last_export, max_time FROM audit_heads "
            "WHERE station_id = ?",
            (station_id,),
        ).fetchone()
        return AuditHead() if row is None else AuditHead(row[0], row[1], row[2], row[3])

    def put_audit_head(self, station_id: str, head: AuditHead, now: int) -> None:
        assert head.last_export is not None
        self._conn.execute(
            "INSERT INTO audit_heads VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(station_id) DO UPDATE "
            "SET next_seq = excluded.next_seq, head_hash = excluded.head_hash, "
            "last_export = excluded.last_export, max_time = excluded.max_time, "
            "updated_at = excluded.updated_at",
            (station_id, head.next_seq, head.head_hash, head.last_export, head.max_time, now),
        )

    def station_time_audit(self, station_id: str, tolerance_s: int) -> TimeAudit:
        """HQ's replay of the station's trusted time so far (a fresh one for a new station).
        Kept in ``meta`` as JSON under ``station_time:<id>``: no schema change."""
        row = self._conn.execute(
            "SELECT value FROM meta WHERE key = ?", (f"station_time:{station_id}",)
        ).fetchone()
        if row is None:
            return TimeAudit(tolerance_s)
        try:
            return TimeAudit.from_map(json.loads(row[0]), tolerance_s)
        except (ValueError, InvalidValueError) as exc:
            raise HomeError(f"stored station time of {station_id} is invalid: {exc}") from exc

    def record_time_statement(self, station_id: str, when: int) -> None:
        """HQ issued a time statement at ``when`` to the station (kept so that an audit's
        ``time_anchored`` record can be checked against it)."""
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, '1') ON CONFLICT DO NOTHING",
            (f"time_statement:{station_id}:{when}",),
        )

    def time_statement_issued(self, station_id: str, when: object) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM meta WHERE key = ?", (f"time_statement:{station_id}:{when}",)
        ).fetchone()
        return row is not None

    def put_station_time_audit(self, station_id: str, audit: TimeAudit) -> None:
        self._conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (f"station_time:{station_id}", json.dumps(audit.to_map(), sort_keys=True)),
        )

    def recon_state(self, station_id: str, sequence: int) -> ReconState:
        row = self._conn.execute(
            "SELECT issued, burned, last_counter, imported_at_seq FROM recon_state "
            "WHERE station_id = ? AND entitlement_seq = ?",
            (station_id, sequence),
        ).fetchone()
        return ReconState() if row is None else ReconState(*row)

    def recon_days(self, station_id: str, sequence: int) -> dict[str, int]:
        rows = self._conn.execute(
            "SELECT day, count FROM recon_days WHERE station_id = ? AND entitlement_seq = ?",
            (station_id, sequence),
        ).fetchall()
        return {day: count for day, count in rows}

    def recon_allowances(self, station_id: str, sequence: int) -> dict[str, int]:
        """Extra issuances per day that verified quorum approvals allowed."""
        rows = self._conn.execute(
            "SELECT day, sum(extra) FROM recon_allowances WHERE station_id = ? "
            "AND entitlement_seq = ? GROUP BY day",
            (station_id, sequence),
        ).fetchall()
        return {day: int(extra) for day, extra in rows}

    def allowance_used(self, request_id: bytes) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM recon_allowances WHERE request_id = ?", (request_id,)
        ).fetchone()
        return row is not None

    def put_allowance(
        self, request_id: bytes, station_id: str, sequence: int, day: str, extra: int
    ) -> None:
        self._conn.execute(
            "INSERT INTO recon_allowances VALUES (?, ?, ?, ?, ?)",
            (request_id, station_id, sequence, day, extra),
        )

    def reissue_grants(self, station_id: str, sequence: int) -> dict[str, list[bytes]]:
        """Unused verified re-issue grants of one entitlement: device id -> request ids."""
        out: dict[str, list[bytes]] = {}
        for device_id, request_id in self._conn.execute(
            "SELECT device_id, request_id FROM recon_reissues WHERE station_id = ? "
            "AND entitlement_seq = ? AND used_seq IS NULL ORDER BY rowid",
            (station_id, sequence),
        ):
            out.setdefault(device_id, []).append(bytes(request_id))
        return out

    def reissue_grant_known(self, request_id: bytes) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM recon_reissues WHERE request_id = ?", (request_id,)
        ).fetchone()
        return row is not None

    def put_reissue_grant(
        self, request_id: bytes, station_id: str, sequence: int, device_id: str
    ) -> None:
        self._conn.execute(
            "INSERT INTO recon_reissues VALUES (?, ?, ?, ?, NULL)",
            (request_id, station_id, sequence, device_id),
        )

    def use_reissue_grant(self, request_id: bytes, audit_seq: int) -> None:
        self._conn.execute(
            "UPDATE recon_reissues SET used_seq = ? WHERE request_id = ? AND used_seq IS NULL",
            (audit_seq, request_id),
        )

    def put_recon(
        self, station_id: str, sequence: int, state: ReconState, per_day: dict[str, int]
    ) -> None:
        c = self._conn
        c.execute(
            "INSERT INTO recon_state VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(station_id, entitlement_seq) DO UPDATE SET issued = excluded.issued, "
            "burned = excluded.burned, last_counter = excluded.last_counter, "
            "imported_at_seq = excluded.imported_at_seq",
            (
                station_id,
                sequence,
                state.issued,
                state.burned,
                state.last_counter,
                state.imported_at_seq,
            ),
        )
        c.executemany(
            "INSERT INTO recon_days VALUES (?, ?, ?, ?) ON CONFLICT(station_id, entitlement_seq, "
            "day) DO UPDATE SET count = excluded.count",
            [(station_id, sequence, day, n) for day, n in per_day.items()],
        )

    # -- devices ------------------------------------------------------------------------------

    def entitlement_devices(self, station_id: str, sequence: int) -> tuple[set[str], set[bytes]]:
        """Device ids and key ids already reported under one entitlement."""
        ids: set[str] = set()
        keys: set[bytes] = set()
        for device_id, key in self._conn.execute(
            "SELECT device_id, key_id FROM devices WHERE station_id = ? AND entitlement_seq = ?",
            (station_id, sequence),
        ):
            ids.add(device_id)
            keys.add(key)
        return ids, keys

    def devices_elsewhere(
        self, station_id: str, entries: Sequence[tuple[str, bytes, int]]
    ) -> tuple[dict[str, str], dict[bytes, str]]:
        """Which of ``entries`` (device id, key id, entitlement seq) HQ already saw under
        another entitlement or station: maps of device id / key id to where it was seen.
        One indexed join of the batch against the registry (never the registry in Python)."""
        c = self._conn
        c.temp_table(
            "new_devices",
            "device_id TEXT, key_id BLOB, entitlement_seq INTEGER",
            ("device_id", "key_id", "entitlement_seq"),
            entries,
        )
        by_id = {
            row[0]: f"{row[1]} entitlement {row[2]}"
            for row in c.probe(
                "SELECT n.device_id, d.station_id, d.entitlement_seq FROM new_devices n "
                "JOIN devices d ON d.device_id = n.device_id "
                "WHERE d.station_id != ? OR d.entitlement_seq != n.entitlement_seq",
                (station_id,),
            )
        }
        by_key = {
            bytes(row[0]): f"{row[1]} entitlement {row[2]}"
            for row in c.probe(
                "SELECT n.key_id, d.station_id, d.entitlement_seq FROM new_devices n "
                "JOIN devices d ON d.key_id = n.key_id "
                "WHERE d.station_id != ? OR d.entitlement_seq != n.entitlement_seq",
                (station_id,),
            )
        }
        c.execute("DELETE FROM new_devices")
        return by_id, by_key

    def audited_certificates(
        self, certificates: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
        """The audit records of the given factory certificates ((station id, serial hex)
        pairs, e.g. every sighting of a site report): (station, serial) -> [(device id, key
        id)] for those some audit export recorded. The pairs go into a temporary table (COPY
        on PostgreSQL) joined with the registry on its (station, serial) index, so the cost
        follows the report's size, not the registry's."""
        c = self._conn
        c.temp_table(
            "report_certs", "station_id TEXT, serial TEXT", ("station_id", "serial"), certificates
        )
        # No ORDER BY in SQL: ordering by the registry's id made SQLite scan the whole
        # registry in id order instead of probing its index once per reported certificate.
        rows = sorted(
            c.probe(
                "SELECT d.id, d.station_id, d.serial, d.device_id, d.key_id FROM report_certs r "
                "JOIN devices d ON d.station_id = r.station_id AND d.serial = r.serial"
            )
        )
        c.execute("DELETE FROM report_certs")
        out: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
        for _, station, serial, device, key in rows:
            out.setdefault((station, serial), []).append((device, bytes(key)))
        return out

    def devices_with_ids(self, device_ids: Iterable[str]) -> list[DeviceRow]:
        """The audit records of the given device ids, oldest first: one join of the ids
        with the registry's device-id index (a site bundle names a few of millions)."""
        c = self._conn
        c.temp_table("wanted_devices", "device_id TEXT", ("device_id",), ((d,) for d in device_ids))
        rows = sorted(  # sorted here, not in SQL: see audited_certificates
            c.probe(
                "SELECT d.id, d.device_id, d.serial, d.station_id, d.entitlement_seq, d.key_id, "
                "d.audit_seq, d.issued_time, d.certificate FROM wanted_devices w "
                "JOIN devices d ON d.device_id = w.device_id"
            )
        )
        c.execute("DELETE FROM wanted_devices")
        return [
            DeviceRow(r[1], r[2], r[3], r[4], bytes(r[5]), r[6], r[7], _blob(r[8])) for r in rows
        ]

    def put_devices(self, rows: Iterable[DeviceRow]) -> int:
        """Record devices an export reported (inside the ingest's transaction): ``COPY`` on
        PostgreSQL, ``executemany`` on SQLite."""
        return self._conn.copy_rows("devices", _DEVICE_COLUMNS, (_device_tuple(r) for r in rows))

    def bulk_put_devices(
        self, rows: Iterable[DeviceRow], progress: Callable[[int], None] | None = None
    ) -> int:
        """Load many audited devices at once (a migration from another registry, the scale
        benchmark): ``COPY`` on PostgreSQL, ``executemany`` in transactions of 200,000 rows
        on SQLite. Outside :meth:`transaction` each chunk commits on its own (a failure
        keeps the chunks already loaded); ``progress`` gets the running count. The planner's
        statistics are refreshed afterwards (PostgreSQL), so the next query plans with them."""
        count = self._conn.copy_rows(
            "devices", _DEVICE_COLUMNS, (_device_tuple(r) for r in rows), progress
        )
        self._conn.analyze("devices")
        return count

    def device_count(self) -> int:
        row = self._conn.execute("SELECT count(*) FROM devices").fetchone()
        return int(row[0])

    def devices(self, station_id: str | None = None) -> list[DeviceRow]:
        query = (
            "SELECT device_id, serial, station_id, entitlement_seq, key_id, audit_seq, "
            "issued_time, certificate FROM devices"
        )
        args: tuple[str, ...] = ()
        if station_id is not None:
            query += " WHERE station_id = ?"
            args = (station_id,)
        return [DeviceRow(*r) for r in self._conn.execute(query + " ORDER BY id", args)]

    def ingest_violations(self) -> list[tuple[str, str]]:
        """(station id, report JSON) of every stored audit ingest that found violations."""
        return [
            (str(station), str(text))
            for station, text in self._conn.execute(
                "SELECT station_id, report_json FROM ingests WHERE violations > 0 ORDER BY id"
            )
        ]

    def known_certificates(
        self, *, device_ids: Iterable[str] = (), certificates: Iterable[tuple[str, str]] = ()
    ) -> list[tuple[str, str, str]]:
        """(station, serial, device id) of the factory certificates HQ knows of — audited
        ones, then ones seen at sites — for the given device ids and (station, serial)
        pairs. Indexed look-ups, one per asked item (revocation asks for a few)."""
        out: list[tuple[str, str, str]] = []
        seen: set[tuple[str, str, str]] = set()

        def add(rows: Iterable[tuple[object, ...]]) -> None:
            for a, b, c in rows:
                key = (str(a), str(b), str(c))
                if key not in seen:
                    seen.add(key)
                    out.append(key)

        conn = self._conn
        for device in device_ids:
            add(
                conn.execute(
                    "SELECT station_id, serial, device_id FROM devices WHERE device_id = ?",
                    (device,),
                )
            )
            add(conn.execute(
                "SELECT station_id, serial, device_id FROM site_sightings WHERE device_id = ?",
                (device,),
            ))  # fmt: skip
        for station, serial in certificates:
            add(
                conn.execute(
                    "SELECT station_id, serial, device_id FROM devices "
                    "WHERE station_id = ? AND serial = ?",
                    (station, serial),
                )
            )
            add(conn.execute(
                "SELECT station_id, serial, device_id FROM site_sightings "
                "WHERE station_id = ? AND serial = ?",
                (station, serial),
            ))  # fmt: skip
        return out

    def put_ingest(
        self,
        *,
        station_id: str,
        export_number: int,
        now: int,
        first_seq: int,
        next_seq: int,
        records: int,
        violations: int,
        report_json: str,
    ) -> None:
        self._conn.execute(
            "INSERT INTO ingests (station_id, export_number, received_at, first_seq, next_seq, "
            "records, violations, report_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (station_id, export_number, now, first_seq, next_seq, records, violations, report_json),
        )

    # -- sites (schema 2) ----------------------------------------------------------------------

    def site(self, site_id: str) -> SiteRow | None:
        row = self._conn.execute(
            "SELECT site_id, ca_public_der, transport_public_der, csr_der, site_ca_der, "
            "enrolled_at FROM sites WHERE site_id = ?",
            (site_id,),
        ).fetchone()
        return None if row is None else SiteRow(*row)

    def sites(self) -> list[SiteRow]:
        rows = self._conn.execute(
            "SELECT site_id, ca_public_der, transport_public_der, csr_der, site_ca_der, "
            "enrolled_at FROM sites ORDER BY site_id"
        ).fetchall()
        return [SiteRow(*r) for r in rows]

    def put_site(self, row: SiteRow) -> None:
        """Insert or replace a site (inside a transaction)."""
        self._conn.execute(
            "INSERT INTO sites VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(site_id) DO UPDATE SET "
            "ca_public_der = excluded.ca_public_der, "
            "transport_public_der = excluded.transport_public_der, csr_der = excluded.csr_der, "
            "site_ca_der = excluded.site_ca_der, enrolled_at = excluded.enrolled_at",
            (
                row.site_id,
                row.ca_public_der,
                row.transport_public_der,
                row.csr_der,
                row.site_ca_der,
                row.enrolled_at,
            ),
        )

    def last_bundle_sequence(self, site_id: str) -> int:
        row = self._conn.execute(
            "SELECT MAX(sequence) FROM site_bundles WHERE site_id = ?", (site_id,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def put_bundle(
        self, site_id: str, sequence: int, package_sha256: bytes, issued_at: int, devices: int
    ) -> None:
        self._conn.execute(
            "INSERT INTO site_bundles VALUES (?, ?, ?, ?, ?)",
            (site_id, sequence, package_sha256, issued_at, devices),
        )

    # -- site reports and sightings (hq.counterfeit) -----------------------------------------

    def site_report_sequence(self, site_id: str) -> int | None:
        """The sequence of the last report HQ accepted from ``site_id`` (None: none yet)."""
        row = self._conn.execute(
            "SELECT sequence FROM site_reports WHERE site_id = ?", (site_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def put_site_report(
        self,
        site_id: str,
        sequence: int,
        now: int,
        sightings: Iterable[tuple[str, str, str, int, bool, bytes]],
    ) -> None:
        """Record an accepted report and its sightings ((station, serial, device id, first
        seen, registered, certificate DER)); inside a transaction."""
        c = self._conn
        c.execute(
            "INSERT INTO site_reports VALUES (?, ?, ?) ON CONFLICT(site_id) DO UPDATE SET "
            "sequence = excluded.sequence, received_at = excluded.received_at",
            (site_id, sequence, now),
        )
        c.executemany(
            "INSERT INTO site_sightings VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(site_id, station_id, serial) DO UPDATE SET "
            "registered = excluded.registered, report_seq = excluded.report_seq",
            (
                (site_id, station, serial, device, first, int(registered), der, sequence)
                for station, serial, device, first, registered, der in sightings
            ),
        )

    def registered_elsewhere(
        self, site_id: str, certificates: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[tuple[str, int]]]:
        """Which of the given factory certificates ((station, serial)) are registered at a
        site other than ``site_id``: (station, serial) -> [(site, first seen there)]. One
        join of the batch with the sightings' (station, serial) index."""
        c = self._conn
        c.temp_table(
            "report_certs", "station_id TEXT, serial TEXT", ("station_id", "serial"), certificates
        )
        out: dict[tuple[str, str], list[tuple[str, int]]] = {}
        rows = sorted(  # sorted here, not in SQL: see audited_certificates
            c.probe(
                "SELECT s.station_id, s.serial, s.site_id, s.first_seen FROM report_certs r "
                "JOIN site_sightings s ON s.station_id = r.station_id AND s.serial = r.serial "
                "WHERE s.site_id != ? AND s.registered = 1",
                (site_id,),
            )
        )
        for station, serial, other, first in rows:
            out.setdefault((station, serial), []).append((str(other), int(first)))
        c.execute("DELETE FROM report_certs")
        return out

    # -- payload keys (sealed to the HQ KMS key) -------------------------------------------------

    def payload_keys(self, site_id: str) -> list[StoredPayloadKey]:
        rows = self._conn.execute(
            "SELECT site_id, key_id, created, enc, ct, is_current FROM payload_keys "
            "WHERE site_id = ? ORDER BY created, key_id",
            (site_id,),
        ).fetchall()
        return [StoredPayloadKey(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    def put_payload_key(self, key: StoredPayloadKey) -> None:
        """Store a sealed key (inside a transaction); a current key demotes the others."""
        if key.current:
            self._conn.execute(
                "UPDATE payload_keys SET is_current = 0 WHERE site_id = ?", (key.site_id,)
            )
        self._conn.execute(
            "INSERT INTO payload_keys VALUES (?, ?, ?, ?, ?, ?)",
            (key.site_id, key.key_id, key.created, key.enc, key.ct, int(key.current)),
        )

    # -- station CRLs -------------------------------------------------------------------------

    def station_crl(self, station_id: str) -> StationCrlRow | None:
        row = self._conn.execute(
            "SELECT station_id, crl_number, this_update, next_update, crl_der, recorded_at "
            "FROM station_crls WHERE station_id = ?",
            (station_id,),
        ).fetchone()
        return None if row is None else StationCrlRow(*row)

    def station_crls(self) -> list[StationCrlRow]:
        rows = self._conn.execute(
            "SELECT station_id, crl_number, this_update, next_update, crl_der, recorded_at "
            "FROM station_crls ORDER BY station_id"
        ).fetchall()
        return [StationCrlRow(*r) for r in rows]

    def put_station_crl(self, row: StationCrlRow) -> None:
        """Keep ``row`` as the station's latest CRL (the caller checked it is newer)."""
        self._conn.execute(
            "INSERT INTO station_crls VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(station_id) DO "
            "UPDATE SET crl_number = excluded.crl_number, this_update = excluded.this_update, "
            "next_update = excluded.next_update, crl_der = excluded.crl_der, "
            "recorded_at = excluded.recorded_at",
            (
                row.station_id,
                row.crl_number,
                row.this_update,
                row.next_update,
                row.crl_der,
                row.recorded_at,
            ),
        )

    def station_ca_certificates(self, station_id: str | None = None) -> list[tuple[str, bytes]]:
        """(station id, DER) of every distinct station CA certificate HQ issued, newest last."""
        query = "SELECT station_id, station_ca_der FROM entitlements"
        args: tuple[str, ...] = ()
        if station_id is not None:
            query += " WHERE station_id = ?"
            args = (station_id,)
        seen: set[bytes] = set()
        out: list[tuple[str, bytes]] = []
        for sid, der in self._conn.execute(query + " ORDER BY station_id, sequence", args):
            if der not in seen:
                seen.add(der)
                out.append((sid, der))
        # Renewed and re-keyed certificates (hq.station_ca): every one HQ issued, so that
        # devices made under any of them keep verifying. rowid breaks ties: a renewal and a
        # re-key in the same second keep the order they were issued in.
        query = "SELECT station_id, cert_der FROM station_ca_certs"
        if station_id is not None:
            query += " WHERE station_id = ?"
        for sid, der in self._conn.execute(query + " ORDER BY issued_at, rowid", args):
            if der not in seen:
                seen.add(der)
                out.append((sid, der))
        return out

    # -- root CRL and revocation lists ------------------------------------------------------------

    def root_revocations(self) -> list[tuple[str, int, str]]:
        """(serial hex, revoked at, reason) of every CA or role certificate the root revoked."""
        rows = self._conn.execute(
            "SELECT serial, revoked_at, reason FROM root_revocations ORDER BY revoked_at, serial"
        ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def put_root_revocation(self, serial: str, revoked_at: int, reason: str, subject: str) -> None:
        self._conn.execute(
            "INSERT INTO root_revocations VALUES (?, ?, ?, ?) ON CONFLICT(serial) DO NOTHING",
            (serial, revoked_at, reason, subject),
        )

    def last_root_crl_number(self) -> int:
        row = self._conn.execute("SELECT MAX(crl_number) FROM root_crls").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def put_root_crl(self, number: int, this_update: int, next_update: int, der: bytes) -> None:
        self._conn.execute(
            "INSERT INTO root_crls VALUES (?, ?, ?, ?)", (number, this_update, next_update, der)
        )

    def latest_root_crl_der(self) -> bytes | None:
        """DER of the root CRL with the highest number (signed at the last root ceremony)."""
        row = self._conn.execute(
            "SELECT crl_der FROM root_crls ORDER BY crl_number DESC LIMIT 1"
        ).fetchone()
        return None if row is None else bytes(row[0])

    # -- HQ indirect CRLs (delegated CRL signer, hq/revocation_data.py) -------------------------

    def last_hq_crl_number(self) -> int:
        row = self._conn.execute("SELECT MAX(crl_number) FROM hq_crls").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def put_hq_crl(self, number: int, this_update: int, next_update: int, der: bytes) -> None:
        self._conn.execute(
            "INSERT INTO hq_crls VALUES (?, ?, ?, ?)", (number, this_update, next_update, der)
        )

    def latest_revocation_list(self) -> tuple[int, bytes] | None:
        row = self._conn.execute(
            "SELECT sequence, package FROM revocation_lists ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def put_revocation_list(self, sequence: int, issued: int, package: bytes) -> None:
        self._conn.execute(
            "INSERT INTO revocation_lists VALUES (?, ?, ?)", (sequence, issued, package)
        )
