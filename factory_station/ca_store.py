"""The station's ``ca_certificates`` table (part of the station store).

Every station CA certificate the station used or imported (DER, key id), so the station
always knows which certificate goes with which key. This module owns the table and every
SQL statement on it; which certificate is current is decided in
:mod:`factory_station.ca_renewal`. :class:`CaCertificateStore` shares the station
database's connection (``StationStore.ca_certificates``), so its writes join the caller's
open transaction.
"""

from __future__ import annotations

import sqlite3
from typing import Final

__all__ = ["CaCertificateStore"]

_TABLE: Final = """CREATE TABLE IF NOT EXISTS ca_certificates (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL UNIQUE,
    key_id BLOB NOT NULL,
    cert_der BLOB NOT NULL,
    kind TEXT NOT NULL,
    imported_at INTEGER NOT NULL
)"""


class CaCertificateStore:
    """SQL on ``ca_certificates`` over the station database's connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def ensure_table(self) -> None:
        self.db.execute(_TABLE)

    def record(self, *, serial: str, key_id: bytes, cert_der: bytes, kind: str, now: int) -> bool:
        """Remember a certificate (inside the caller's transaction); False if it was known."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO ca_certificates (serial, key_id, cert_der, kind, imported_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (serial, key_id, cert_der, kind, now),
        )
        return cur.rowcount == 1

    def certificates_der(self, key_id: bytes) -> list[bytes]:
        """The certificates recorded for the key ``key_id``, oldest record first."""
        rows = self.db.execute(
            "SELECT cert_der FROM ca_certificates WHERE key_id = ? ORDER BY id", (key_id,)
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def rekey_recorded(self, key_id: bytes) -> bool:
        """Whether a re-key certificate for the key ``key_id`` was recorded."""
        row = self.db.execute(
            "SELECT 1 FROM ca_certificates WHERE key_id = ? AND kind = 'rekey'", (key_id,)
        ).fetchone()
        return row is not None
