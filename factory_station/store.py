"""The station's durable state (SQLite) and the rule that ties it to the TPM counter.

Why a TPM counter: the station's files can be copied and restored. If the quota were
counted only in this database, restoring yesterday's copy would hand back yesterday's
quota. So every issuance consumes one value of a TPM NV counter (monotonic: it can only
go up, and it lives in the TPM, not in any file), and the database records which counter
value each issuance used. At start-up:

* TPM counter == highest value recorded here → consistent;
* TPM counter  > highest value recorded here → these files are older than the TPM:
  restored from a copy (or tampered with) → refuse to issue anything (fail closed);
* TPM counter  < highest value recorded here → not this TPM, or it was cleared → refuse.

The order of one issuance makes a crash safe at every point:

1. record an *intent* (counter value n+1, status ``pending``) and commit;
2. increment the TPM counter to n+1;
3. sign the certificate, append the audit record, mark the row ``issued``; commit;
4. only then release the certificate to the device.

A crash after 1 leaves a pending row with the counter still at n: the row is dropped
(``aborted``). A crash after 2 leaves the counter at n+1 with the row pending: the slot is
``burned`` — it counts against the quota and the audit log says so — because the station
cannot know whether a certificate escaped. Either way no crash can yield one certificate
more than the quota.

Every database read and write of the station goes through :class:`StationStore`; the
quorum grants and the station CA certificates are tables of their own, reached through it
(``StationStore.grants``: :mod:`factory_station.grant_store`; ``StationStore.ca_certificates``:
:mod:`factory_station.ca_store`) on the same connection, so they share its transactions.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from factory_station.ca_store import CaCertificateStore
from factory_station.errors import StationStateError
from factory_station.grant_store import GrantStore
from trustcore.errors import InvalidValueError
from trustcore.stationtime import TimeAnchor, TpmLedger

#: ``superseded``: a certificate replaced by a quorum-approved re-issue for the same device
#: id. The partial unique index keeps at most one ``issued`` row per device, so a re-issue
#: must retire the old row in the same transaction that completes the new one.
_ISSUANCE_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    counter INTEGER PRIMARY KEY,
    entitlement_seq INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    day TEXT NOT NULL,
    time INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'issued', 'burned', 'superseded')),
    serial TEXT,
    key_id BLOB,
    certificate BLOB
) STRICT;"""
_ISSUANCE_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS issued_device ON issuance(device_id) WHERE status = 'issued';
CREATE INDEX IF NOT EXISTS issuance_day ON issuance(entitlement_seq, day);
CREATE INDEX IF NOT EXISTS issuance_device ON issuance(device_id);
"""
#: Rebuild of a pre-re-issue ``issuance`` table (see ``StationStore._migrate_superseded``).
_MIGRATE_SUPERSEDED = "".join(
    (
        "BEGIN IMMEDIATE;",
        _ISSUANCE_TABLE.format(name="issuance_v2"),
        "INSERT INTO issuance_v2 SELECT counter, entitlement_seq, device_id, day, time, "
        "status, serial, key_id, certificate FROM issuance;",
        "DROP TABLE issuance;",
        "ALTER TABLE issuance_v2 RENAME TO issuance;",
        _ISSUANCE_INDEXES,
        "COMMIT;",
    )
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE IF NOT EXISTS entitlement (
    sequence INTEGER PRIMARY KEY,
    entitlement_id TEXT NOT NULL,
    policy BLOB NOT NULL,
    package BLOB NOT NULL,
    imported_at INTEGER NOT NULL,
    counter_base INTEGER NOT NULL
) STRICT;
{issuance}
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    record BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audit_export (
    number INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    created INTEGER NOT NULL
) STRICT;
""".replace("{issuance}", _ISSUANCE_TABLE.format(name="issuance") + _ISSUANCE_INDEXES)


class MonotonicCounter(Protocol):
    """A counter that only goes up and survives power loss (a TPM NV counter)."""

    def read(self) -> int: ...

    def increment(self) -> int: ...


@dataclass(frozen=True)
class Recovery:
    """What start-up found and repaired: a pending row dropped or a slot burned."""

    aborted: tuple[int, ...] = ()
    burned: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class ActiveEntitlement:
    sequence: int
    entitlement_id: str
    policy_cbor: bytes
    package: bytes
    counter_base: int


class StationStore:
    """SQLite state of one station. Synchronous: the station is one process at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            self._migrate_superseded()
        except sqlite3.DatabaseError as exc:
            raise StationStateError(f"cannot open station database {path}: {exc}") from exc
        self.grants = GrantStore(self.db)
        self.ca_certificates = CaCertificateStore(self.db)

    def close(self) -> None:
        self.db.close()

    def _migrate_superseded(self) -> None:
        """Databases made before re-issues have a status CHECK without ``superseded``;
        SQLite cannot alter a CHECK, so the table is rebuilt (rows copied as they are) in
        one transaction: a crash leaves the old table intact."""
        row = self.db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'issuance'"
        ).fetchone()
        if row is None or "superseded" in row[0]:
            return
        self.db.executescript(_MIGRATE_SUPERSEDED)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A database that cannot be written (disk full, I/O error,
        damaged file) raises :class:`StationStateError` naming the file; whatever the
        transaction wrote is rolled back (SQLite never applies half a commit)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    with suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError:
            raise  # a constraint the caller maps to its own refusal
        except sqlite3.DatabaseError as exc:
            raise StationStateError(f"cannot write station database {self.path}: {exc}") from exc

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> object | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: object, conn: sqlite3.Connection | None = None) -> None:
        (conn or self.db).execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def latest_time(self) -> int:
        v = self.get_meta("latest_time")
        return int(v) if isinstance(v, int) else 0

    # -- entitlements ---------------------------------------------------------------------
    def active_entitlement(self) -> ActiveEntitlement | None:
        row = self.db.execute(
            "SELECT sequence, entitlement_id, policy, package, counter_base FROM entitlement "
            "ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        return None if row is None else ActiveEntitlement(*row)

    def record_entitlement(
        self,
        *,
        sequence: int,
        entitlement_id: str,
        policy_cbor: bytes,
        package: bytes,
        imported_at: int,
        counter_base: int,
        audit_records: list[tuple[int, bytes]],
        meta: dict[str, object] | None = None,
    ) -> None:
        """Store an accepted entitlement and its audit record in one transaction (with
        ``meta`` values that must change with it: the station's new time anchor)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO entitlement(sequence, entitlement_id, policy, package, imported_at, "
                "counter_base) VALUES (?, ?, ?, ?, ?, ?)",
                (sequence, entitlement_id, policy_cbor, package, imported_at, counter_base),
            )
            db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", audit_records)
            for key, value in (meta or {}).items():
                self.set_meta(key, value, db)

    def last_entitlement_sequence(self) -> int:
        row = self.db.execute("SELECT max(sequence) FROM entitlement").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # -- counter consistency --------------------------------------------------------------
    def highest_counter(self) -> int | None:
        """The highest TPM counter value this database knows of (issuances, entitlement
        bases, or the value at ``init``: without that floor, a copy of the files taken
        right after ``init`` would know no value at all and could not be told apart)."""
        row = self.db.execute(
            "SELECT max(v) FROM (SELECT max(counter) AS v FROM issuance "
            "UNION ALL SELECT max(counter_base) FROM entitlement "
            "UNION ALL SELECT value FROM meta WHERE key = 'counter_floor')"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def check_counter(self, counter_value: int) -> Recovery:
        """Compare the TPM counter with this database, repairing a crash (see module doc)
        and refusing a rollback. Returns what was repaired; the caller audits it."""
        known = self.highest_counter()
        if known is None:
            return Recovery()
        pending = self.db.execute(
            "SELECT counter, device_id FROM issuance WHERE status = 'pending'"
        ).fetchall()
        if len(pending) > 1:
            raise StationStateError("more than one pending issuance: corrupt state")
        if pending:
            p_counter, p_device = pending[0]
            if p_counter != known:
                raise StationStateError("a pending issuance is not the latest: corrupt state")
            if counter_value == p_counter - 1:
                self.db.execute("DELETE FROM issuance WHERE counter = ?", (p_counter,))
                return Recovery(aborted=(p_counter,))
            if counter_value == p_counter:
                self.db.execute(
                    "UPDATE issuance SET status = 'burned' WHERE counter = ?", (p_counter,)
                )
                return Recovery(burned=((p_counter, p_device),))
        if counter_value > known:
            raise StationStateError(
                f"the TPM counter is at {counter_value} but these files only know {known}: "
                "the station's files are older than its TPM (restored from a copy?). "
                "Refusing to issue; ask HQ for a new entitlement.",
                reason="state_rollback",
            )
        if counter_value < known:
            raise StationStateError(
                f"the TPM counter ({counter_value}) is behind these files ({known}): "
                "this is not the TPM these files belong to, or it was cleared",
                reason="counter_mismatch",
            )
        return Recovery()

    # -- issuance -------------------------------------------------------------------------
    def counts(self, entitlement_seq: int, day: str) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM issuance WHERE entitlement_seq = ? AND day = ? "
            "AND status IN ('issued', 'burned', 'pending', 'superseded')",
            (entitlement_seq, day),
        ).fetchone()
        return int(row[0])

    def device_issued(self, device_id: str) -> bool:
        return self.issued_serial(device_id) is not None

    def issued_serial(self, device_id: str) -> str | None:
        """The serial (hex) of the device's current certificate, if it has one."""
        row = self.db.execute(
            "SELECT serial FROM issuance WHERE device_id = ? AND status = 'issued'", (device_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def key_used(self, key_id: bytes) -> bool:
        """Whether any certificate of this station (current or superseded) has this key."""
        row = self.db.execute("SELECT 1 FROM issuance WHERE key_id = ?", (key_id,)).fetchone()
        return row is not None

    def record_intent(
        self,
        counter: int,
        entitlement_seq: int,
        device_id: str,
        day: str,
        when: int,
        meta: dict[str, object] | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO issuance(counter, entitlement_seq, device_id, day, time, status) "
                "VALUES (?, ?, ?, ?, ?, 'pending')",
                (counter, entitlement_seq, device_id, day, when),
            )
            if when > self.latest_time():
                self.set_meta("latest_time", when, db)
            for key, value in (meta or {}).items():
                self.set_meta(key, value, db)

    # -- trusted time (trustcore.stationtime) ------------------------------------------
    def time_state(self) -> tuple[TpmLedger | None, TimeAnchor | None]:
        """The stored TPM ledger and time anchor (None before the first of each)."""
        out: list[object] = []
        for key, kind in (("tpm_ledger", TpmLedger), ("time_anchor", TimeAnchor)):
            raw = self.get_meta(key)
            if raw is None:
                out.append(None)
                continue
            try:
                out.append(kind.from_map(json.loads(str(raw))))
            except (ValueError, InvalidValueError) as exc:
                raise StationStateError(f"stored {key} is invalid: {exc}") from exc
        return out[0], out[1]  # type: ignore[return-value]

    def burn(self, counter: int, audit_records: list[tuple[int, bytes]]) -> None:
        """Mark a pending issuance whose counter slot is consumed but whose certificate was
        never made (signing failed after the increment) as burned, with its audit record."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE issuance SET status = 'burned' WHERE counter = ? AND status = 'pending'",
                (counter,),
            )
            if cur.rowcount != 1:
                raise StationStateError(f"no pending issuance for counter {counter}")
            db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", audit_records)

    def entitlement_seq_of(self, counter: int) -> int:
        row = self.db.execute(
            "SELECT entitlement_seq FROM issuance WHERE counter = ?", (counter,)
        ).fetchone()
        if row is None:
            raise StationStateError(f"no issuance row for counter {counter}")
        return int(row[0])

    def burned_count(self, entitlement_seq: int) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM issuance WHERE entitlement_seq = ? AND status = 'burned'",
            (entitlement_seq,),
        ).fetchone()
        return int(row[0])

    def device_id_used(self, device_id: str) -> bool:
        """Whether ``device_id`` has a row (issued, burned, superseded or pending): one
        indexed lookup, not a read of every id (``allocate_device_id`` runs per device)."""
        row = self.db.execute(
            "SELECT 1 FROM issuance WHERE device_id = ? LIMIT 1", (device_id,)
        ).fetchone()
        return row is not None

    def certificates_by_serial(self, serials: list[str]) -> list[bytes]:
        out: list[bytes] = []
        for serial in serials:
            row = self.db.execute(
                "SELECT certificate FROM issuance WHERE serial = ? "
                "AND status IN ('issued', 'superseded')",
                (serial,),
            ).fetchone()
            if row is None or row[0] is None:
                raise StationStateError(f"audit names certificate {serial} the database lacks")
            out.append(bytes(row[0]))
        return out

    def last_export(self) -> tuple[int, int] | None:
        """(number, last audit seq) of the latest export, if any."""
        row = self.db.execute(
            "SELECT number, last_seq FROM audit_export ORDER BY number DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def record_export(self, number: int, last_seq: int, created: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO audit_export(number, last_seq, created) VALUES (?, ?, ?)",
                (number, last_seq, created),
            )

    def audit_count(self) -> int:
        row = self.db.execute("SELECT count(*) FROM audit").fetchone()
        return int(row[0])

    def drop_intent(self, counter: int) -> None:
        """Forget an intent whose counter increment never happened."""
        self.db.execute("DELETE FROM issuance WHERE counter = ? AND status = 'pending'", (counter,))

    def complete(
        self,
        counter: int,
        serial: str,
        key_id: bytes,
        certificate: bytes,
        audit_records: list[tuple[int, bytes]],
        *,
        supersedes: str | None = None,
        also: Callable[[], None] | None = None,
    ) -> None:
        """Mark the intent ``issued`` with its audit record. A re-issue names the serial it
        ``supersedes`` (retired in the same transaction, so the device never has two current
        certificates nor none); ``also`` runs inside it too (consuming the quorum grant)."""
        with self.transaction() as db:
            if supersedes is not None:
                cur = db.execute(
                    "UPDATE issuance SET status = 'superseded' "
                    "WHERE serial = ? AND status = 'issued'",
                    (supersedes,),
                )
                if cur.rowcount != 1:
                    raise StationStateError(f"no current certificate {supersedes} to supersede")
            if also is not None:
                also()
            cur = db.execute(
                "UPDATE issuance SET status = 'issued', serial = ?, key_id = ?, certificate = ? "
                "WHERE counter = ? AND status = 'pending'",
                (serial, key_id, certificate, counter),
            )
            if cur.rowcount != 1:
                raise StationStateError(f"no pending issuance for counter {counter}")
            db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", audit_records)

    # -- audit ----------------------------------------------------------------------------
    def append_audit(
        self, records: list[tuple[int, bytes]], meta: dict[str, object] | None = None
    ) -> None:
        """Commit audit records (with ``meta`` values that must change with them: a new
        time anchor) in one transaction."""
        with self.transaction() as db:
            db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", records)
            for key, value in (meta or {}).items():
                self.set_meta(key, value, db)

    def insert_audit(self, records: list[tuple[int, bytes]]) -> None:
        """Audit records written inside the caller's open :meth:`transaction`."""
        self.db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", records)

    def audit_head(self) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT seq, record FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def audit_records(self, from_seq: int) -> Iterator[tuple[int, bytes]]:
        cur = self.db.execute(
            "SELECT seq, record FROM audit WHERE seq >= ? ORDER BY seq", (from_seq,)
        )
        for seq, record in cur:
            yield int(seq), bytes(record)

    def issued_certificates(self) -> list[bytes]:
        return [
            bytes(r[0])
            for r in self.db.execute(
                "SELECT certificate FROM issuance WHERE status = 'issued' ORDER BY counter"
            )
        ]
