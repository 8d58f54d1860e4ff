"""The quorum's tables: HQ's approvers, the approval requests HQ wrote, the approvals
received for them and the requests already used. Every statement runs on the caller's
connection (``HqStore.transaction()``), so a gated operation and the consumption of its
approvals commit together, or neither does.
"""

from __future__ import annotations

from hq.store.engine import Connection
from hq.store.records import ApproverRow

__all__ = [
    "add_approver",
    "approval_blobs",
    "approvers",
    "consume_request",
    "open_requests",
    "put_approval",
    "put_request",
    "request_blob",
    "request_consumed",
]


def approvers(conn: Connection) -> list[ApproverRow]:
    """The HQ approver set, oldest first."""
    return [
        ApproverRow(bytes(r[0]), str(r[1]), bytes(r[2]), int(r[3]))
        for r in conn.execute(
            "SELECT key_id, name, public_der, added_at FROM quorum_approvers ORDER BY added_at"
        )
    ]


def add_approver(conn: Connection, row: ApproverRow, request_id: bytes | None) -> None:
    """Add ``row`` (``request_id``: the consumed request that authorised it, if any)."""
    conn.execute(
        "INSERT INTO quorum_approvers (key_id, name, public_der, added_at, request_id) "
        "VALUES (?, ?, ?, ?, ?)",
        (row.key_id, row.name, row.public_der, row.added_at, request_id),
    )


def request_consumed(conn: Connection, request_id: bytes) -> bool:
    row = conn.execute(
        "SELECT 1 FROM quorum_consumed WHERE request_id = ?", (request_id,)
    ).fetchone()
    return row is not None


def consume_request(
    conn: Connection, request_id: bytes, operation: str, approvers: str, now: int
) -> None:
    """Mark the request used; a second use raises ``StoreConflict`` (primary key)."""
    conn.execute(
        "INSERT INTO quorum_consumed (request_id, operation, approvers, consumed_at) "
        "VALUES (?, ?, ?, ?)",
        (request_id, operation, approvers, now),
    )


def put_request(
    conn: Connection, request_id: bytes, operation: str, blob: bytes, created: int, expires: int
) -> None:
    conn.execute(
        "INSERT INTO quorum_requests (request_id, operation, request_cbor, created, "
        "expires) VALUES (?, ?, ?, ?, ?)",
        (request_id, operation, blob, created, expires),
    )


def request_blob(conn: Connection, request_id: bytes) -> bytes | None:
    """The stored request (CBOR) HQ wrote under ``request_id``, if any."""
    row = conn.execute(
        "SELECT request_cbor FROM quorum_requests WHERE request_id = ?", (request_id,)
    ).fetchone()
    return None if row is None else bytes(row[0])


def put_approval(
    conn: Connection, request_id: bytes, approver: bytes, blob: bytes, received_at: int
) -> int:
    """Store one approval (the same approver again replaces theirs); returns how many
    distinct approvals the request now has."""
    conn.execute(
        "INSERT INTO quorum_received (request_id, approver, approval_cbor, received_at) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (request_id, approver) DO UPDATE SET "
        "approval_cbor = excluded.approval_cbor, received_at = excluded.received_at",
        (request_id, approver, blob, received_at),
    )
    count = conn.execute(
        "SELECT count(*) FROM quorum_received WHERE request_id = ?", (request_id,)
    ).fetchone()[0]
    return int(count)


def open_requests(conn: Connection, now: int) -> list[tuple[bytes, int]]:
    """Requests unexpired at ``now`` and unused, oldest first, with their approval counts."""
    rows = conn.execute(
        "SELECT r.request_id, (SELECT count(*) FROM quorum_received a "
        "WHERE a.request_id = r.request_id) FROM quorum_requests r "
        "WHERE r.expires > ? AND r.request_id NOT IN (SELECT request_id FROM quorum_consumed) "
        "ORDER BY r.created",
        (now,),
    ).fetchall()
    return [(bytes(rid), int(count)) for rid, count in rows]


def approval_blobs(conn: Connection, request_id: bytes) -> list[bytes]:
    """Every approval (CBOR) received for ``request_id``, by approver."""
    return [
        bytes(r[0])
        for r in conn.execute(
            "SELECT approval_cbor FROM quorum_received WHERE request_id = ? ORDER BY approver",
            (request_id,),
        )
    ]
