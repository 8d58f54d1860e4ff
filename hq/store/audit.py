"""The HQ store's audit ledger: each station's audit head and trusted-time replay, the
reconciliation state per entitlement (counters, per-day tallies, quorum allowances and
re-issue grants), the device registry every accepted export added to, and the ingests.
Fleet scale: duplicate and counterfeit look-ups join a temporary table with the indexed
registry; bulk loads use ``COPY`` on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence

from hq.errors import HomeError
from hq.store.base import StoreBase
from hq.store.records import (
    AuditHead,
    DeviceRow,
    ReconState,
)
from trustcore.errors import InvalidValueError
from trustcore.stationtime import TimeAudit

__all__ = ["AuditTables"]

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


class AuditTables(StoreBase):
    """Audit heads, reconciliation state, the device registry and the ingests."""

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
