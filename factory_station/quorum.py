"""Quorum-gated operations at the factory station: what an approval bundle grants.

The entitlement names, per operation, the approver keys and ``m`` (``QuorumRule``). An
approval bundle brought to the station (``device-sim provision --approvals FILE...``)
is verified offline against that rule by :func:`trustcore.quorum.verify_quorum`, then
turned into a durable **grant** in the station database, in the same transaction as its
``quorum_approved`` audit record (which carries the evidence itself, so HQ can re-verify
it). The request id is the grant's primary key: the same approvals never grant twice.

Operations and their parameters (the request must carry exactly these)::

    exceed_daily_limit          station_id, entitlement_id, day (YYYY-MM-DD), extra (>= 1)
        up to ``extra`` issuances beyond the daily limit, on that one day
    reissue_device_certificate  station_id, entitlement_id, device_id
        one more certificate (for a new key) for a device that already has one; the old
        certificate becomes ``superseded``. Consumed by that one issuance (``used_counter``)

``station_id`` and ``entitlement_id`` bind the approvals to this station and this
entitlement: the same bundle is ``wrong_operation`` anywhere else.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from trustcore.entitlement import EntitlementPolicy
from trustcore.quorum import ParamValue, QuorumDecision, QuorumError

__all__ = [
    "EXCEED_DAILY_LIMIT",
    "REISSUE",
    "QuorumGrant",
    "approved_operations",
    "check_station_params",
    "consume_grant",
    "ensure_tables",
    "grant_used",
    "record_grant",
    "unused_reissue_grant",
]

EXCEED_DAILY_LIMIT: Final = "exceed_daily_limit"
REISSUE: Final = "reissue_device_certificate"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

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


@dataclass(frozen=True)
class QuorumGrant:
    request_id: bytes
    operation: str
    approvers: tuple[bytes, ...]
    day: str | None = None
    extra: int | None = None
    device_id: str | None = None


def ensure_tables(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        db.execute(statement)
    columns = {row[1] for row in db.execute("PRAGMA table_info(quorum_grant)")}
    if "used_counter" not in columns:  # a table made before re-issues were supported
        db.execute("ALTER TABLE quorum_grant ADD COLUMN used_counter INTEGER")


def check_station_params(
    policy: EntitlementPolicy, operation: str, params: Mapping[str, ParamValue], today: str
) -> dict[str, Any]:
    """The request's parameters must name this station, this entitlement and a sensible
    target; anything else is ``wrong_operation`` (approved for something else) or
    ``expired`` (a day already past)."""
    expected = {"station_id", "entitlement_id"} | (
        {"day", "extra"} if operation == EXCEED_DAILY_LIMIT else {"device_id"}
    )
    if operation not in (EXCEED_DAILY_LIMIT, REISSUE) or set(params) != expected:
        raise QuorumError(
            f"{operation} needs exactly the parameters {sorted(expected)}", reason="wrong_operation"
        )
    if params["station_id"] != policy.station_id:
        raise QuorumError(
            f"the approvals are for station {params['station_id']!r}", reason="wrong_operation"
        )
    if params["entitlement_id"] != policy.entitlement_id:
        raise QuorumError(
            f"the approvals are for entitlement {params['entitlement_id']!r}, the active one is "
            f"{policy.entitlement_id!r}",
            reason="wrong_operation",
        )
    if operation == EXCEED_DAILY_LIMIT:
        day, extra = params["day"], params["extra"]
        if not isinstance(day, str) or not _DAY.fullmatch(day):
            raise QuorumError("day must be YYYY-MM-DD", reason="malformed")
        if isinstance(extra, bool) or not isinstance(extra, int) or not 1 <= extra <= 1_000_000:
            raise QuorumError("extra must be a positive integer", reason="malformed")
        if day < today:
            raise QuorumError(f"the approval is for {day}, already past", reason="expired")
    else:
        device_id = params["device_id"]
        if not isinstance(device_id, str) or not policy.id_rule.contains(device_id):
            raise QuorumError(
                f"device {device_id!r} is outside the entitlement's id range",
                reason="wrong_operation",
            )
    return dict(params)


def grant_used(db: sqlite3.Connection, request_id: bytes) -> bool:
    row = db.execute("SELECT 1 FROM quorum_grant WHERE request_id = ?", (request_id,)).fetchone()
    return row is not None


def record_grant(
    db: sqlite3.Connection, decision: QuorumDecision, entitlement_seq: int, now: int
) -> QuorumGrant:
    """Insert the grant (inside the caller's transaction); a second use is ``replayed``."""
    p = decision.params
    grant = QuorumGrant(
        request_id=decision.request_id,
        operation=decision.operation,
        approvers=decision.approvers,
        day=p.get("day") if decision.operation == EXCEED_DAILY_LIMIT else None,  # type: ignore[arg-type]
        extra=p.get("extra") if decision.operation == EXCEED_DAILY_LIMIT else None,  # type: ignore[arg-type]
        device_id=p.get("device_id") if decision.operation == REISSUE else None,  # type: ignore[arg-type]
    )
    try:
        db.execute(
            "INSERT INTO quorum_grant (request_id, operation, entitlement_seq, day, extra, "
            "device_id, approvers, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                grant.request_id,
                grant.operation,
                entitlement_seq,
                grant.day,
                grant.extra,
                grant.device_id,
                ",".join(a.hex() for a in grant.approvers),
                now,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise QuorumError(
            f"request {decision.request_id.hex()} was already used at this station",
            reason="replayed",
        ) from exc
    return grant


def unused_reissue_grant(
    db: sqlite3.Connection, entitlement_seq: int, device_id: str
) -> bytes | None:
    """The oldest ``reissue_device_certificate`` grant for this device under this
    entitlement that no issuance has consumed yet (its request id), if any."""
    row = db.execute(
        "SELECT request_id FROM quorum_grant WHERE operation = ? AND entitlement_seq = ? "
        "AND device_id = ? AND used_counter IS NULL ORDER BY accepted_at, rowid LIMIT 1",
        (REISSUE, entitlement_seq, device_id),
    ).fetchone()
    return None if row is None else bytes(row[0])


def consume_grant(db: sqlite3.Connection, request_id: bytes, counter: int) -> None:
    """Mark a re-issue grant used by the issuance with this counter value (inside the
    transaction that completes it): one grant, one certificate."""
    cur = db.execute(
        "UPDATE quorum_grant SET used_counter = ? WHERE request_id = ? AND used_counter IS NULL",
        (counter, request_id),
    )
    if cur.rowcount != 1:
        raise QuorumError(f"grant {request_id.hex()} is already used", reason="replayed")


def approved_operations(
    db: sqlite3.Connection,
    policy: EntitlementPolicy,
    entitlement_seq: int,
    day: str,
    issued_today: int,
    device_id: str = "",
) -> frozenset[str]:
    """Which gated operations the durable grants allow for this one issuance:
    ``exceed_daily_limit`` while today's issuances stay below the daily limit plus the sum
    of today's grants (so a grant of ``extra`` allows exactly ``extra`` more, that day);
    ``reissue_device_certificate`` while an unused grant names ``device_id``.
    """
    ops: set[str] = set()
    if device_id and unused_reissue_grant(db, entitlement_seq, device_id) is not None:
        ops.add(REISSUE)
    row = db.execute(
        "SELECT coalesce(sum(extra), 0) FROM quorum_grant "
        "WHERE operation = ? AND entitlement_seq = ? AND day = ?",
        (EXCEED_DAILY_LIMIT, entitlement_seq, day),
    ).fetchone()
    if issued_today < policy.daily_limit + int(row[0]):
        ops.add(EXCEED_DAILY_LIMIT)
    return frozenset(ops)
