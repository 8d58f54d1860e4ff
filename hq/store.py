"""HQ's SQLite database: enrolled stations, issued entitlements, audit heads, reconciliation
state and the devices every audit export reported; since schema 2 also sites, their
(KMS-sealed) payload keys and bundles, the latest CRL of each station, the root CRL and its
revocations, and the HQ revocation lists.

One connection per command, autocommit off by hand: every change that belongs together runs
in one ``BEGIN IMMEDIATE`` … ``COMMIT`` (:meth:`HqStore.transaction`), so an ingest either
moves the audit head *and* stores its devices and counters, or changes nothing. ``synchronous
= FULL`` because a head that was reported as stored must survive a power cut.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hq.errors import HomeError
from trustcore import cbor
from trustcore.audit import ZERO_HASH
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.stationtime import TimeAudit

__all__ = [
    "SCHEMA_VERSION",
    "AuditHead",
    "DeviceRow",
    "EntitlementRow",
    "HqStore",
    "ReconState",
    "SiteRow",
    "StationCrlRow",
    "StationRow",
    "StoredPayloadKey",
]

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stations (
    station_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    csr_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE enrolment_history (
    id INTEGER PRIMARY KEY,
    station_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    replaced_at INTEGER
);
CREATE TABLE entitlements (
    station_id TEXT NOT NULL REFERENCES stations(station_id),
    sequence INTEGER NOT NULL CHECK (sequence >= 1),
    entitlement_id TEXT NOT NULL UNIQUE,
    policy_cbor BLOB NOT NULL,
    station_ca_der BLOB NOT NULL,
    station_ca_serial TEXT NOT NULL,
    package_sha256 BLOB NOT NULL,
    issued_at INTEGER NOT NULL,
    PRIMARY KEY (station_id, sequence)
);
CREATE TABLE audit_heads (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    next_seq INTEGER NOT NULL,
    head_hash BLOB NOT NULL,
    last_export INTEGER NOT NULL,
    max_time INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE recon_state (
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    burned INTEGER NOT NULL,
    last_counter INTEGER NOT NULL,
    imported_at_seq INTEGER,
    PRIMARY KEY (station_id, entitlement_seq)
);
CREATE TABLE recon_days (
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    day TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (station_id, entitlement_seq, day)
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    key_id BLOB NOT NULL,
    audit_seq INTEGER NOT NULL,
    issued_time INTEGER NOT NULL,
    certificate BLOB
);
CREATE INDEX devices_device_id ON devices(device_id);
CREATE INDEX devices_key_id ON devices(key_id);
CREATE INDEX devices_entitlement ON devices(station_id, entitlement_seq);
CREATE TABLE ingests (
    id INTEGER PRIMARY KEY,
    station_id TEXT NOT NULL,
    export_number INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    next_seq INTEGER NOT NULL,
    records INTEGER NOT NULL,
    violations INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
"""


#: Verified ``reissue_device_certificate`` grants from station audit logs; ``used_seq`` is
#: the audit seq of the re-issue that consumed the grant (NULL while unused).
_RECON_REISSUES = """CREATE TABLE IF NOT EXISTS recon_reissues (
    request_id BLOB PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    used_seq INTEGER
)"""


#: Station CA certificates HQ issued outside an entitlement (``hq renew-station``: renewal
#: of the same key or re-key to a new one), and the CRLs of a station's retired CA keys
#: (a re-keyed station keeps signing an empty CRL with its old key so that the devices made
#: under it still have a current CRL at every site). Added without a schema version bump.
_STATION_CA_RENEWALS = (
    """CREATE TABLE IF NOT EXISTS station_ca_certs (
    serial TEXT PRIMARY KEY,
    station_id TEXT NOT NULL,
    cert_der BLOB NOT NULL,
    ca_public_der BLOB NOT NULL,
    previous_public_der BLOB NOT NULL,
    kind TEXT NOT NULL,
    request_id BLOB NOT NULL UNIQUE,
    issued_at INTEGER NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS station_retired_crls (
    station_id TEXT NOT NULL,
    issuer_key_id BLOB NOT NULL,
    crl_number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (station_id, issuer_key_id)
)""",
    # The CA key of the last export HQ accepted from each station: once a re-keyed station
    # signs with its new key, exports signed by an older key are refused.
    """CREATE TABLE IF NOT EXISTS station_export_keys (
    station_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL
)""",
)


#: Schema 2 (site commissioning). Applied on top of schema 1 by :meth:`HqStore.open`, so an
#: HQ database created before sites existed is upgraded in place (tables only, no data moves).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS recon_allowances (
    request_id BLOB PRIMARY KEY,
    station_id TEXT NOT NULL,
    entitlement_seq INTEGER NOT NULL,
    day TEXT NOT NULL,
    extra INTEGER NOT NULL
);
CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    ca_public_der BLOB NOT NULL,
    transport_public_der BLOB NOT NULL,
    csr_der BLOB NOT NULL,
    site_ca_der BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL
);
CREATE TABLE site_bundles (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    sequence INTEGER NOT NULL CHECK (sequence >= 1),
    package_sha256 BLOB NOT NULL,
    issued_at INTEGER NOT NULL,
    devices INTEGER NOT NULL,
    PRIMARY KEY (site_id, sequence)
);
CREATE TABLE payload_keys (
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    key_id BLOB NOT NULL,
    created INTEGER NOT NULL,
    enc BLOB NOT NULL,
    ct BLOB NOT NULL,
    is_current INTEGER NOT NULL,
    PRIMARY KEY (site_id, key_id)
);
CREATE TABLE station_crls (
    station_id TEXT PRIMARY KEY REFERENCES stations(station_id),
    crl_number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE root_revocations (
    serial TEXT PRIMARY KEY,
    revoked_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    subject TEXT NOT NULL
);
CREATE TABLE root_crls (
    crl_number INTEGER PRIMARY KEY,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    crl_der BLOB NOT NULL
);
CREATE TABLE revocation_lists (
    sequence INTEGER PRIMARY KEY,
    issued INTEGER NOT NULL,
    package BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    ca_public_der: bytes
    transport_public_der: bytes
    csr_der: bytes
    site_ca_der: bytes
    enrolled_at: int


@dataclass(frozen=True)
class StoredPayloadKey:
    """A site payload key as HQ stores it: HPKE-sealed to the HQ KMS key (never in clear)."""

    site_id: str
    key_id: bytes
    created: int
    enc: bytes
    ct: bytes
    current: bool


@dataclass(frozen=True)
class StationCrlRow:
    station_id: str
    crl_number: int
    this_update: int
    next_update: int
    crl_der: bytes
    recorded_at: int


@dataclass(frozen=True)
class StationRow:
    station_id: str
    ca_public_der: bytes
    transport_public_der: bytes
    csr_der: bytes
    enrolled_at: int
    generation: int


@dataclass(frozen=True)
class EntitlementRow:
    station_id: str
    sequence: int
    entitlement_id: str
    policy: EntitlementPolicy
    station_ca_der: bytes
    station_ca_serial: str
    issued_at: int


@dataclass(frozen=True)
class AuditHead:
    """What HQ accepted last from a station (a new station: seq 0, zero hash, no export)."""

    next_seq: int = 0
    head_hash: bytes = ZERO_HASH
    last_export: int | None = None
    max_time: int = 0


@dataclass
class ReconState:
    """Reconciliation state of one entitlement carried across exports."""

    issued: int = 0
    burned: int = 0
    last_counter: int = -1
    imported_at_seq: int | None = None


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    serial: str
    station_id: str
    entitlement_seq: int
    key_id: bytes
    audit_seq: int
    issued_time: int
    certificate: bytes | None


def _policy_from_blob(blob: bytes) -> EntitlementPolicy:
    try:
        return EntitlementPolicy.from_map(cbor.decode(blob, max_size=1 << 20))
    except EncodingError as exc:
        raise HomeError(f"stored entitlement policy is corrupt: {exc}") from exc


class HqStore:
    """The HQ database. ``create`` makes a new one; ``open`` refuses a missing one."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._in_tx = False

    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise HomeError(f"cannot open database {path}: {exc}") from exc
        return conn

    def _ensure_reissue_table(self) -> None:
        # Added without a schema version bump: one new table, created if missing.
        self._conn.execute(_RECON_REISSUES)
        for statement in _STATION_CA_RENEWALS:
            self._conn.execute(statement)

    @classmethod
    def create(cls, path: Path) -> HqStore:
        if path.exists():
            raise HomeError(f"database {path} already exists")
        store = cls(cls._connect(path))
        # executescript commits any open transaction first, so the script carries its own.
        store._conn.executescript(
            f"BEGIN IMMEDIATE;{_SCHEMA}{_SCHEMA_V2}"  # noqa: S608 (constants only)
            f"INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');COMMIT;"
        )
        store._ensure_reissue_table()
        return store

    @classmethod
    def open(cls, path: Path) -> HqStore:
        if not path.is_file():
            raise HomeError(f"database {path} is missing")
        store = cls(cls._connect(path))
        row = store._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] == "1":
            # Upgrade 1 -> 2: new tables only. One transaction: a crash leaves schema 1.
            store._conn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA_V2}"  # noqa: S608 (constants only)
                "UPDATE meta SET value = '2' WHERE key = 'schema_version';COMMIT;"
            )
            row = ("2",)
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise HomeError(f"database {path} has an unknown schema version")
        store._ensure_reissue_table()
        return store

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit: everything inside commits together or not at all."""
        if self._in_tx:
            raise RuntimeError("nested transaction")
        self._conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
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
            "recorded_at = excluded.recorded_at WHERE excluded.crl_number > crl_number",
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
            "INSERT OR IGNORE INTO meta(key, value) VALUES (?, '1')",
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
        another entitlement or station: maps of device id / key id to where it was seen."""
        c = self._conn
        c.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_devices "
            "(device_id TEXT, key_id BLOB, entitlement_seq INTEGER)"
        )
        c.execute("DELETE FROM new_devices")
        c.executemany("INSERT INTO new_devices VALUES (?, ?, ?)", entries)
        by_id = {
            row[0]: f"{row[1]} entitlement {row[2]}"
            for row in c.execute(
                "SELECT n.device_id, d.station_id, d.entitlement_seq FROM new_devices n "
                "JOIN devices d ON d.device_id = n.device_id "
                "WHERE d.station_id != ? OR d.entitlement_seq != n.entitlement_seq",
                (station_id,),
            )
        }
        by_key = {
            row[0]: f"{row[1]} entitlement {row[2]}"
            for row in c.execute(
                "SELECT n.key_id, d.station_id, d.entitlement_seq FROM new_devices n "
                "JOIN devices d ON d.key_id = n.key_id "
                "WHERE d.station_id != ? OR d.entitlement_seq != n.entitlement_seq",
                (station_id,),
            )
        }
        c.execute("DELETE FROM new_devices")
        return by_id, by_key

    def put_devices(self, rows: Iterable[DeviceRow]) -> int:
        cur = self._conn.executemany(
            "INSERT INTO devices (device_id, serial, station_id, entitlement_seq, key_id, "
            "audit_seq, issued_time, certificate) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    r.device_id,
                    r.serial,
                    r.station_id,
                    r.entitlement_seq,
                    r.key_id,
                    r.audit_seq,
                    r.issued_time,
                    r.certificate,
                )
                for r in rows
            ),
        )
        return cur.rowcount

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

    _HQ_CRLS = (
        "CREATE TABLE IF NOT EXISTS hq_crls (crl_number INTEGER PRIMARY KEY, "
        "this_update INTEGER NOT NULL, next_update INTEGER NOT NULL, crl_der BLOB NOT NULL)"
    )

    def last_hq_crl_number(self) -> int:
        self._conn.execute(self._HQ_CRLS)
        row = self._conn.execute("SELECT MAX(crl_number) FROM hq_crls").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def put_hq_crl(self, number: int, this_update: int, next_update: int, der: bytes) -> None:
        self._conn.execute(self._HQ_CRLS)
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
