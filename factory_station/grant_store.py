"""The station's ``quorum_grant`` table: durable quorum grants (part of the station store).

This module owns the table and every SQL statement on it; what a grant allows is decided in
:mod:`factory_station.quorum`. :class:`GrantStore` shares the station database's connection
(``StationStore.grants``), so its writes join the caller's open transaction.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from trustcore.quorum import QuorumError

__all__ = ["GrantStore"]

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS quorum_grant (
        request_id BLOB PRIMARY KEY,
        operation TEXT NOT NULL,
        entitlement_seq INTEGER NOT NULL,
        day TEXT,
        extra INTEGER,
        device_id TEXT,
        approvers TEXT NOT NULL,
        accepted_at INTEGER NOT NULL,
        used_counter INTEGER
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS quorum_grant_day ON quorum_grant(entitlement_seq, day)",
)


class GrantStore:
    """SQL on ``quorum_grant`` over the station database's connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def ensure_tables(self) -> None:
        for statement in _SCHEMA:
            self.db.execute(statement)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(quorum_grant)")}
        if "used_counter" not in columns:  # a table made before re-issues were supported
            self.db.execute("ALTER TABLE quorum_grant ADD COLUMN used_counter INTEGER")

    def used(self, request_id: bytes) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM quorum_grant WHERE request_id = ?", (request_id,)
        ).fetchone()
        return row is not None

    def insert(
        self,
        *,
        request_id: bytes,
        operation: str,
        entitlement_seq: int,
        day: str | None,
        extra: int | None,
        device_id: str | None,
        approvers: tuple[bytes, ...],
        accepted_at: int,
    ) -> None:
        """Insert a grant (inside the caller's transaction); a second use is ``replayed``."""
        try:
            self.db.execute(
                "INSERT INTO quorum_grant (request_id, operation, entitlement_seq, day, extra, "
                "device_id, approvers, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request_id,
                    operation,
                    entitlement_seq,
                    day,
                    extra,
                    device_id,
                    ",".join(a.hex() for a in approvers),
                    accepted_at,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise QuorumError(
                f"request {request_id.hex()} was already used at this station",
                reason="replayed",
            ) from exc

    def oldest_unused(self, operation: str, entitlement_seq: int, device_id: str) -> bytes | None:
        """The request id of the oldest unconsumed ``operation`` grant naming ``device_id``."""
        row = self.db.execute(
            "SELECT request_id FROM quorum_grant WHERE operation = ? AND entitlement_seq = ? "
            "AND device_id = ? AND used_counter IS NULL ORDER BY accepted_at, rowid LIMIT 1",
            (operation, entitlement_seq, device_id),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def consume(self, request_id: bytes, counter: int) -> None:
        """Mark a grant used by the issuance with this counter value (inside the
        transaction that completes it): one grant, one certificate."""
        cur = self.db.execute(
            "UPDATE quorum_grant SET used_counter = ? WHERE request_id = ? "
            "AND used_counter IS NULL",
            (counter, request_id),
        )
        if cur.rowcount != 1:
            raise QuorumError(f"grant {request_id.hex()} is already used", reason="replayed")

    def extra_granted(self, operation: str, entitlement_seq: int, day: str) -> int:
        """The sum of ``extra`` over the ``operation`` grants for ``day``."""
        row = self.db.execute(
            "SELECT coalesce(sum(extra), 0) FROM quorum_grant "
            "WHERE operation = ? AND entitlement_seq = ? AND day = ?",
            (operation, entitlement_seq, day),
        ).fetchone()
        return int(row[0])
