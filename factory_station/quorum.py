"""Quorum-gated operations at the factory station: what an approval bundle grants.

The entitlement names, per operation, the approver keys and ``m`` (``QuorumRule``). An
approval bundle brought to the station (``device-sim provision --approvals FILE...``)
is verified offline against that rule by :func:`trustcore.quorum.verify_quorum`, then
turned into a durable **grant** in the station database, in the same transaction as its
``quorum_approved`` audit record (which carries the evidence itself, so HQ can re-verify
it). The request id is the grant's primary key: the same approvals never grant twice.
This module takes a bundle in (:func:`accept_approvals`) and decides what grants allow; the
``quorum_grant`` table and its SQL are :mod:`factory_station.grant_store`.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from factory_station.core import StationCore
from factory_station.errors import IssuanceRefused
from factory_station.grant_store import GrantStore
from trustcore.audit import FieldValue
from trustcore.entitlement import EntitlementPolicy
from trustcore.quorum import (
    ParamValue,
    QuorumDecision,
    QuorumError,
    encode_bundle,
    parse_evidence,
    verify_quorum_rule,
)

__all__ = [
    "EXCEED_DAILY_LIMIT",
    "REISSUE",
    "QuorumGrant",
    "accept_approvals",
    "approved_operations",
    "check_station_params",
    "consume_grant",
    "grant_used",
    "record_grant",
    "unused_reissue_grant",
]

EXCEED_DAILY_LIMIT: Final = "exceed_daily_limit"
REISSUE: Final = "reissue_device_certificate"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class QuorumGrant:
    request_id: bytes
    operation: str
    approvers: tuple[bytes, ...]
    day: str | None = None
    extra: int | None = None
    device_id: str | None = None


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


def grant_used(grants: GrantStore, request_id: bytes) -> bool:
    return grants.used(request_id)


def record_grant(
    grants: GrantStore, decision: QuorumDecision, entitlement_seq: int, now: int
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
    grants.insert(
        request_id=grant.request_id,
        operation=grant.operation,
        entitlement_seq=entitlement_seq,
        day=grant.day,
        extra=grant.extra,
        device_id=grant.device_id,
        approvers=grant.approvers,
        accepted_at=now,
    )
    return grant


def unused_reissue_grant(grants: GrantStore, entitlement_seq: int, device_id: str) -> bytes | None:
    """The oldest ``reissue_device_certificate`` grant for this device under this
    entitlement that no issuance has consumed yet (its request id), if any."""
    return grants.oldest_unused(REISSUE, entitlement_seq, device_id)


def consume_grant(grants: GrantStore, request_id: bytes, counter: int) -> None:
    """Mark a re-issue grant used by the issuance with this counter value (inside the
    transaction that completes it): one grant, one certificate."""
    grants.consume(request_id, counter)


def approved_operations(
    grants: GrantStore,
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
    if device_id and unused_reissue_grant(grants, entitlement_seq, device_id) is not None:
        ops.add(REISSUE)
    extra = grants.extra_granted(EXCEED_DAILY_LIMIT, entitlement_seq, day)
    if issued_today < policy.daily_limit + extra:
        ops.add(EXCEED_DAILY_LIMIT)
    return frozenset(ops)


def accept_approvals(core: StationCore, evidence: Sequence[bytes]) -> QuorumGrant:
    """Verify a quorum bundle for an operation the entitlement gates and store the
    grant durably with its ``quorum_approved`` audit record (which carries the evidence
    for HQ). Refusals raise :class:`IssuanceRefused` with the quorum reason."""
    with core.lock:
        active = core.require_entitlement()
        policy = active.policy
        now = core.now()
        day = policy.day_of(max(now, core.store.latest_time()))
        try:
            bundle = parse_evidence(evidence)
            operation = bundle.request.operation
            params = check_station_params(policy, operation, bundle.request.params, day)
            decision = verify_quorum_rule(
                bundle,
                policy.quorum_rule(operation),
                params=params,
                now=now,
                used_request_ids=(
                    {bundle.request.request_id}
                    if grant_used(core.store.grants, bundle.request.request_id)
                    else set()
                ),
                clock_skew_s=policy.clock_skew_s,
            )
        except QuorumError as exc:
            core.audit_refusal("", f"quorum_{exc.reason}")
            raise IssuanceRefused(f"approvals refused: {exc.message}", reason=exc.reason) from exc
        counted = set(decision.approvers)
        carried = encode_bundle(
            bundle.request, [a for a in bundle.approvals if a.approver in counted]
        )
        fields: dict[str, FieldValue] = {
            "operation": operation,
            "request_id": decision.request_id,
            "approvers": ",".join(a.hex() for a in decision.approvers),
            "entitlement_seq": active.row.sequence,
            "evidence": carried,
        }
        for name in ("day", "extra", "device_id"):
            if name in params:
                fields[name] = params[name]
        record = core.next_record("quorum_approved", fields, now)
        try:
            with core.store.transaction():
                grant = record_grant(core.store.grants, decision, active.row.sequence, now)
                core.store.insert_audit([record])
        except QuorumError as exc:
            core.reload_audit()
            raise IssuanceRefused(f"approvals refused: {exc.message}", reason=exc.reason) from exc
        except BaseException:
            core.reload_audit()
            raise
        return grant
