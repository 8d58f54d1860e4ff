"""The HQ store's record of factory stations: enrolments, issued entitlements (and their
overrides), the station CA certificates HQ issued (renewals and re-keys) and the keys a
station exports with, and the station CRLs HQ holds.
"""

from __future__ import annotations

from hq.errors import HomeError
from hq.store.base import StoreBase
from hq.store.records import (
    EntitlementRow,
    StationCrlRow,
    StationRow,
)
from trustcore import cbor
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy
from trustcore.errors import EncodingError

__all__ = ["StationTables"]


def _policy_from_blob(blob: bytes) -> EntitlementPolicy:
    try:
        return EntitlementPolicy.from_map(cbor.decode(blob, max_size=1 << 20))
    except EncodingError as exc:
        raise HomeError(f"stored entitlement policy is corrupt: {exc.message}") from exc


class StationTables(StoreBase):
    """Stations, their entitlements, CA certificates and CRLs."""

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
