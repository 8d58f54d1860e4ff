"""The HQ store's record of buildings and revocation: enrolled sites, their bundles and
reports (sightings), the site payload keys (sealed to the HQ KMS key), the root CRL and its
revocations, HQ's indirect CRLs and the revocation lists sent to the field.
"""

from __future__ import annotations

from collections.abc import Iterable

from hq.store.base import StoreBase
from hq.store.records import (
    SiteRow,
    StoredPayloadKey,
)

__all__ = ["SiteTables"]


class SiteTables(StoreBase):
    """Sites, payload keys, root CRL, HQ CRLs and revocation lists."""

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
