"""HQ's side of quorum approvals: the approver set, approval requests and the gates.

The decision itself is pure (:mod:`trustcore.quorum`); this module adds what needs I/O:

* the **approver set** and its history live in the HQ database (tables created here on
  first use, beside the schema of :mod:`hq.store`); adding an approver needs a quorum of the
  existing set once it is non-empty (the first approver bootstraps the set);
* **requests** HQ wrote are stored so the endpoint can list them and accept approvals for
  them only; approvals received online are verified on receipt and stored;
* **consumed request ids** are stored in the same transaction as the operation they
  authorised, so one quorum authorises one operation, once;
* the **gates** (:func:`authorize`, :func:`precheck`) that HQ operations call with the
  evidence files.

Beside it, by duty: :mod:`hq.approval_server` (the online endpoint, ``hq approval serve``)
and :mod:`hq.approver_tools` (the approver's own key and signing, run on the approver's
machine; HQ never sees the key); :mod:`hq.approval_cli` is the command group.
"""

from __future__ import annotations

import contextlib
import secrets as _random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import HomeError, HqError, StoreConflict
from hq.home import HqHome, HqQuorumConfig
from hq.store import ApproverRow, Connection, HqStore
from hq.store import quorum as quorum_tables
from trustcore.entitlement import QUORUM_OPERATIONS
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.keys import key_id
from trustcore.quorum import (
    Approval,
    ApprovalRequest,
    QuorumDecision,
    QuorumError,
    check_approval,
    encode_bundle,
    parse_evidence,
    verify_quorum,
)
from trustcore.utctime import now_unix

__all__ = [
    "ADD_APPROVER",
    "EXPORT_PAYLOAD_KEY",
    "HQ_OPERATIONS",
    "ISSUE_ENTITLEMENT",
    "REKEY_STATION_CA",
    "REVOKE_STATION_CA",
    "ApproverRow",
    "QuorumRefused",
    "add_approver",
    "add_approver_params",
    "approvers",
    "authorize",
    "authorize_station_ca_revocation",
    "bundle_from_db",
    "create_request",
    "entitlement_params",
    "gate_required",
    "pending_requests",
    "precheck",
    "read_file",
    "record_approval",
    "request_summary",
    "revoke_station_ca_params",
    "site_bundle_params",
    "stored_request",
]


ISSUE_ENTITLEMENT: Final = "issue_entitlement"
REVOKE_STATION_CA: Final = "revoke_station_ca"
EXPORT_PAYLOAD_KEY: Final = "export_payload_key"
ADD_APPROVER: Final = "add_approver"
#: A station CA re-key (``hq.station_ca``): a new root-certified signing key for a station.
REKEY_STATION_CA: Final = "rekey_station_ca"
#: Operations HQ itself gates (the station's are :data:`QUORUM_OPERATIONS`).
HQ_OPERATIONS: Final = frozenset(
    {ISSUE_ENTITLEMENT, REVOKE_STATION_CA, EXPORT_PAYLOAD_KEY, ADD_APPROVER, REKEY_STATION_CA}
)


class QuorumRefused(HqError):
    """A gated HQ operation was refused for want of a valid quorum (``reason`` from
    :data:`trustcore.quorum.QUORUM_REASONS`)."""

    reason = "quorum_refused"


@contextlib.contextmanager
def _db(home: HqHome) -> Iterator[HqStore]:
    store = HqStore.open(home.store_location)
    try:
        yield store
    finally:
        store.close()


def _config(home: HqHome) -> HqQuorumConfig:
    return home.config.quorum or HqQuorumConfig()


# ------------------------------------------------------------------------------ parameters


def entitlement_params(request: Any) -> dict[str, Any]:
    """What an ``issue_entitlement`` quorum approves (from a ``hq.entitlements``
    ``EntitlementRequest``): the station, product, quotas, window and id range."""
    return {
        "station_id": request.station_id,
        "product": request.product,
        "total_quota": request.total_quota,
        "daily_limit": request.daily_limit,
        "day_timezone": request.day_timezone,
        "not_before": int(request.not_before.timestamp()),
        "not_after": int(request.not_after.timestamp()),
        "id_prefix": request.id_rule.prefix,
        "id_first": request.id_rule.first,
        "id_last": request.id_rule.last,
        "id_digits": request.id_rule.digits,
    }


def revoke_station_ca_params(station_id: str) -> dict[str, Any]:
    return {"station_id": station_id}


def rekey_station_ca_params(station_id: str, key_id_hex: str) -> dict[str, Any]:
    """A re-key quorum approves one new key (hex SHA-256 of its SPKI) for one station."""
    return {"station_id": station_id, "key_id": key_id_hex}


def site_bundle_params(site_id: str) -> dict[str, Any]:
    """A site bundle exports the site's payload keys to the site's transport key."""
    return {"site_id": site_id}


def add_approver_params(name: str, public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {"name": name, "key_id": key_id(public_key).hex(), "public_key": der}


# ------------------------------------------------------------------------------ approvers


def approvers(home: HqHome) -> list[ApproverRow]:
    with _db(home) as store, store.transaction() as conn:
        return quorum_tables.approvers(conn)


def _threshold(home: HqHome, operation: str, set_size: int) -> int:
    m = _config(home).m
    # Bootstrap: with fewer approvers than m, adding one needs all of them (never zero).
    return min(m, set_size) if operation == ADD_APPROVER else m


def gate_required(
    home: HqHome,
    operation: str,
    params: Mapping[str, Any],
    conn: Connection | None = None,
) -> bool:
    """Whether HQ's policy puts ``operation`` behind the quorum (``docs/quorum.md``). Pass
    ``conn`` when inside a transaction (a second connection would wait on its lock)."""
    cfg = _config(home)
    if operation == REVOKE_STATION_CA:
        return True
    if operation == ISSUE_ENTITLEMENT:
        limit = cfg.entitlement_quota_above
        return limit is not None and int(params["total_quota"]) > limit
    if operation == EXPORT_PAYLOAD_KEY:
        return cfg.export_payload_key
    if operation == REKEY_STATION_CA:
        return cfg.station_rekey
    if operation == ADD_APPROVER:
        if conn is not None:
            return bool(quorum_tables.approvers(conn))
        with _db(home) as store, store.transaction() as tx:
            return bool(quorum_tables.approvers(tx))
    raise QuorumRefused(f"unknown HQ operation {operation!r}", reason="no_quorum")


def _used(conn: Connection, request_id: bytes) -> set[bytes]:
    return {request_id} if quorum_tables.request_consumed(conn, request_id) else set()


def verify_hq_quorum(
    home: HqHome,
    conn: Connection,
    operation: str,
    params: Mapping[str, Any],
    evidence: Sequence[bytes],
    now: int,
) -> QuorumDecision:
    """Verify evidence for an HQ operation against the HQ approver set (no consumption)."""
    try:
        if not evidence:
            raise QuorumError(
                f"{operation} needs a quorum of approvers and no approvals were given",
                reason="insufficient",
            )
        bundle = parse_evidence(evidence)
        # Approvals answer a request this HQ wrote (hq approval request): a request made at
        # another HQ, even one that shares approvers, authorises nothing here.
        stored = _stored_request(conn, bundle.request.request_id)
        if stored is None or stored.digest != bundle.request.digest:
            raise QuorumError(
                f"request {bundle.request.request_id.hex()} was not written by this HQ",
                reason="foreign_request",
            )
        rows = quorum_tables.approvers(conn)
        return verify_quorum(
            bundle.request,
            bundle.approvals,
            operation=operation,
            params=params,
            approvers=[r.key_id for r in rows],
            m=_threshold(home, operation, len(rows)),
            now=now,
            used_request_ids=_used(conn, bundle.request.request_id),
        )
    except QuorumError as exc:
        raise QuorumRefused(f"{operation} refused: {exc.args[0]}", reason=exc.reason) from exc


def consume(conn: Connection, decision: QuorumDecision, now: int) -> None:
    """Record ``decision`` as used, inside the caller's transaction (so the operation and
    the consumption commit together). A concurrent use of the same request loses here."""
    try:
        quorum_tables.consume_request(
            conn,
            decision.request_id,
            decision.operation,
            ",".join(a.hex() for a in decision.approvers),
            now,
        )
    except StoreConflict as exc:
        raise QuorumRefused(
            f"request {decision.request_id.hex()} was already used", reason="replayed"
        ) from exc


def authorize(
    home: HqHome,
    operation: str,
    params: Mapping[str, Any],
    evidence: Sequence[bytes],
    *,
    conn: Connection | None = None,
    now: int | None = None,
) -> QuorumDecision | None:
    """The gate every quorum-gated HQ operation calls before it acts.

    Returns ``None`` when HQ's policy does not gate this operation, the verified and
    consumed decision when the evidence holds, and raises :class:`QuorumRefused`
    otherwise. Pass ``conn`` (from ``HqStore.transaction()``) to consume the request id in
    the operation's own transaction; without it the consumption commits at once (an
    operation that then fails has used up its approvals: fail closed).
    """
    moment = now_unix(now)
    if not gate_required(home, operation, params, conn):
        return None
    if conn is not None:
        decision = verify_hq_quorum(home, conn, operation, params, evidence, moment)
        consume(conn, decision, moment)
        return decision
    with _db(home) as store, store.transaction() as tx:
        decision = verify_hq_quorum(home, tx, operation, params, evidence, moment)
        consume(tx, decision, moment)
        return decision


def add_approver(
    home: HqHome,
    name: str,
    public_key: ec.EllipticCurvePublicKey,
    evidence: Sequence[bytes] = (),
    *,
    now: int | None = None,
) -> ApproverRow:
    """Add an approver to the HQ set. The first one needs no quorum (bootstrap); every
    later one needs ``min(m, current set size)`` approvals of the current set."""
    moment = now_unix(now)
    if not name or len(name) > 64 or not name.isprintable():
        raise HqError("approver name must be 1..64 printable characters", reason="bad_request")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise HqError("approver keys are P-256 keys", reason="bad_request")
    params = add_approver_params(name, public_key)
    with _db(home) as store, store.transaction() as conn:
        rows = quorum_tables.approvers(conn)
        kid = key_id(public_key)
        if any(r.key_id == kid for r in rows):
            raise HqError(f"key {kid.hex()} is already an approver", reason="already_approver")
        if any(r.name == name for r in rows):
            raise HqError(f"an approver is already named {name!r}", reason="already_approver")
        request_id: bytes | None = None
        if rows:
            decision = verify_hq_quorum(home, conn, ADD_APPROVER, params, evidence, moment)
            consume(conn, decision, moment)
            request_id = decision.request_id
        row = ApproverRow(kid, name, params["public_key"], moment)
        quorum_tables.add_approver(conn, row, request_id)
    return row


# -------------------------------------------------------------------------------- requests


def _station_rule(store: HqStore, station_id: str, operation: str) -> tuple[Any, Any]:
    last = store.last_entitlement_sequence(station_id)
    row = store.entitlement(station_id, last) if last else None
    if row is None:
        raise HqError(f"station {station_id!r} has no entitlement", reason="unknown_station")
    rule = row.policy.quorum_rule(operation)
    if rule is None:
        raise HqError(
            f"the entitlement of {station_id} names no quorum for {operation}",
            reason="no_quorum",
        )
    return row.policy, rule


def create_request(
    home: HqHome,
    operation: str,
    params: Mapping[str, Any],
    *,
    requested_by: str,
    station_id: str | None = None,
    lifetime_s: int | None = None,
    now: int | None = None,
) -> ApprovalRequest:
    """Write and store an approval request for ``operation``.

    HQ operations name the HQ approver set and HQ's ``m``. Station operations
    (:data:`QUORUM_OPERATIONS`) need ``station_id``: the approvers, ``m``, the station id and
    the entitlement id come from that station's current entitlement, so the approvals are
    only good for it.
    """
    moment = now_unix(now)
    lifetime = _config(home).request_lifetime_s if lifetime_s is None else lifetime_s
    full = dict(params)
    with _db(home) as store:
        if operation in QUORUM_OPERATIONS:
            if station_id is None:
                raise HqError(f"{operation} is a station operation: name the station")
            policy, rule = _station_rule(store, station_id, operation)
            full.update({"station_id": policy.station_id, "entitlement_id": policy.entitlement_id})
            named, m = tuple(rule.approvers), rule.m
        elif operation in HQ_OPERATIONS:
            with store.transaction() as conn:
                rows = quorum_tables.approvers(conn)
            if not rows:
                raise HqError("the HQ approver set is empty", reason="no_quorum")
            named = tuple(r.key_id for r in rows)
            m = _threshold(home, operation, len(rows))
            if m > len(named):
                raise HqError(
                    f"the HQ quorum needs {m} approvers, the set has {len(named)}",
                    reason="no_quorum",
                )
        else:
            raise HqError(f"unknown operation {operation!r}", reason="bad_request")
        try:
            request = ApprovalRequest(
                request_id=_random.token_bytes(16),
                operation=operation,
                params=full,
                approvers=named,
                m=m,
                created=moment,
                expires=moment + lifetime,
                requested_by=requested_by,
            )
        except InvalidValueError as exc:
            raise HqError(f"invalid approval request: {exc.message}", reason="bad_request") from exc
        with store.transaction() as conn:
            quorum_tables.put_request(
                conn,
                request.request_id,
                operation,
                request.encode(),
                request.created,
                request.expires,
            )
    return request


def _stored_request(conn: Connection, request_id: bytes) -> ApprovalRequest | None:
    blob = quorum_tables.request_blob(conn, request_id)
    if blob is None:
        return None
    try:
        return ApprovalRequest.decode(blob)
    except EncodingError as exc:
        raise HomeError(f"stored approval request is corrupt: {exc.message}") from exc


def stored_request(home: HqHome, request_id: bytes) -> ApprovalRequest | None:
    """A request this HQ wrote, as stored (an approver reviews it before signing), or None."""
    with _db(home) as store, store.transaction() as conn:
        return _stored_request(conn, request_id)


def record_approval(
    home: HqHome, data: bytes, *, now: int | None = None
) -> tuple[ApprovalRequest, int]:
    """Verify one approval on receipt and store it: the request must be one HQ wrote, still
    open (unexpired, not consumed), the approver named by it, the signature valid. The
    signature is the authentication. Returns the request and how many distinct approvals
    it now has. The same approver again replaces their earlier approval."""
    moment = now_unix(now)
    try:
        approval = Approval.decode(data)
    except EncodingError as exc:
        raise QuorumRefused(f"approval does not decode: {exc.message}", reason="malformed") from exc
    with _db(home) as store, store.transaction() as conn:
        request = _stored_request(conn, approval.request_id)
        if request is None:
            raise QuorumRefused(
                f"no request {approval.request_id.hex()} at this HQ", reason="unknown_request"
            )
        if _used(conn, request.request_id):
            raise QuorumRefused("that request was already used", reason="replayed")
        try:
            check_approval(request, approval, now=moment)
        except QuorumError as exc:
            raise QuorumRefused(f"approval refused: {exc.args[0]}", reason=exc.reason) from exc
        count = quorum_tables.put_approval(
            conn, request.request_id, approval.approver, approval.encode(), moment
        )
    return request, count


def pending_requests(home: HqHome, *, now: int | None = None) -> list[tuple[ApprovalRequest, int]]:
    """Requests still open (unexpired, unconsumed), with their number of approvals."""
    moment = now_unix(now)
    out = []
    with _db(home) as store, store.transaction() as conn:
        for rid, count in quorum_tables.open_requests(conn, moment):
            request = _stored_request(conn, rid)
            assert request is not None
            out.append((request, count))
    return out


def bundle_from_db(home: HqHome, request_id: bytes) -> bytes:
    """The request and every approval received for it, as one bundle file."""
    with _db(home) as store, store.transaction() as conn:
        request = _stored_request(conn, request_id)
        if request is None:
            raise HqError(f"no request {request_id.hex()}", reason="unknown_request")
        approvals = [Approval.decode(b) for b in quorum_tables.approval_blobs(conn, request_id)]
    return encode_bundle(request, approvals)


def request_summary(request: ApprovalRequest, approvals: int | None = None) -> dict[str, Any]:
    """A JSON-able view of a request (bytes as hex) for listings and the endpoint."""
    view: dict[str, Any] = {
        "request_id": request.request_id.hex(),
        "operation": request.operation,
        "params": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in request.params.items()},
        "approvers": [a.hex() for a in request.approvers],
        "m": request.m,
        "created": request.created,
        "expires": request.expires,
        "requested_by": request.requested_by,
        "digest": request.digest.hex(),
    }
    if approvals is not None:
        view["approvals"] = approvals
    return view


def read_file(path: Path, limit: int) -> bytes:
    """Read an evidence file with a size bound (a USB stick can carry anything)."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise HqError(f"{path} is larger than {limit} bytes", reason="oversized")
        return path.read_bytes()
    except OSError as exc:
        raise HqError(f"cannot read {path}: {exc}", reason="io_error") from exc


def precheck(
    home: HqHome,
    operation: str,
    params: Mapping[str, Any],
    evidence: Sequence[bytes],
    *,
    now: int | None = None,
) -> None:
    """Verify the quorum of a gated operation *without* consuming it, so an operation
    refuses before it does any work (signs with the root, seals keys). The operation then
    calls :func:`authorize` inside its own transaction, which verifies again and consumes."""
    if not gate_required(home, operation, params):
        return
    with _db(home) as store, store.transaction() as conn:
        verify_hq_quorum(home, conn, operation, params, evidence, now_unix(now))


def authorize_station_ca_revocation(
    home: HqHome,
    station_id: str,
    evidence: Sequence[bytes],
    *,
    conn: Connection | None = None,
    now: int | None = None,
) -> QuorumDecision:
    """The gate of ``hq revoke --station-ca``: always needs the HQ quorum. Call it inside
    the transaction that records the revocation (``conn``) so both commit together."""
    decision = authorize(
        home, REVOKE_STATION_CA, revoke_station_ca_params(station_id), evidence, conn=conn, now=now
    )
    assert decision is not None  # always gated
    return decision
