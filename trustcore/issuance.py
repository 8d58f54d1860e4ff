"""Whether a factory station may issue one more device certificate, decided without I/O.

The station gathers the facts (``IssuanceState``: counters read from its TPM and its
database, the highest time it has ever recorded) and this module decides. The checks run
as one fixed, ordered list; the first refusal wins, and an empty list refuses, so a
mistake in composing the checks can never turn into "allow". Each refusal is a
``PolicyError`` whose ``reason`` the station shows to the operator and writes to the audit
log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import PolicyError


@dataclass(frozen=True)
class IssuanceState:
    """What the station knows before one issuance.

    ``issued_total`` counts every counter slot consumed under this entitlement (including
    slots burned by a crash between counter increment and certificate release, so a crash
    can never yield one more certificate). ``latest_time`` is the highest clock reading the
    station has ever recorded: a wall clock set back below it is a clock rollback.
    ``trusted_time`` is the ceiling the host clock may not pass by more than the policy's
    skew (HQ-vouched anchor + TPM-powered time since, :mod:`trustcore.stationtime`); None
    when the station has no anchor, which refuses (fail closed).
    """

    issued_total: int
    issued_today: int
    latest_time: int
    device_already_issued: bool
    approved_operations: frozenset[str] = frozenset()
    trusted_time: int | None = None


@dataclass(frozen=True)
class IssuanceRequest:
    device_id: str
    product: str
    now: int


Check = Callable[[EntitlementPolicy, IssuanceState, IssuanceRequest], None]


def check_clock(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if r.now + p.clock_skew_s < s.latest_time:
        raise PolicyError(
            f"the clock reads {r.now}, earlier than time {s.latest_time} already recorded: "
            "clock rollback",
            reason="clock_rollback",
        )


def check_trusted_time(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    # A host clock moved forward (a day at a time, say) must not open a new day's allowance
    # or reach past the window: it may not run ahead of the TPM-measured trusted time.
    if s.trusted_time is None:
        raise PolicyError(
            "the station has no trusted time: import an entitlement or an HQ time statement",
            reason="no_time_anchor",
        )
    if r.now > s.trusted_time + p.clock_skew_s:
        raise PolicyError(
            f"the clock reads {r.now}, {r.now - s.trusted_time} s ahead of the time the TPM "
            f"vouches for ({s.trusted_time}; tolerance {p.clock_skew_s} s): clock moved "
            "forward, or the station was off; import an HQ time statement or a new entitlement",
            reason="clock_ahead",
        )


def check_window(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    # Judge the window by the latest trustworthy time, so setting the clock back cannot
    # reopen an expired window.
    now = max(r.now, s.latest_time)
    if now < p.not_before:
        raise PolicyError(
            "the entitlement's key-use window has not started", reason="not_yet_valid"
        )
    if now >= p.not_after:
        raise PolicyError("the entitlement's key-use window has ended", reason="window_expired")


def check_product(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if r.product != p.product:
        raise PolicyError(
            f"product {r.product!r} is not {p.product!r} of this entitlement",
            reason="wrong_product",
        )


def check_device_id(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if not p.id_rule.contains(r.device_id):
        rule = p.id_rule
        raise PolicyError(
            f"device id {r.device_id!r} is outside {rule.prefix}"
            f"{rule.first:0{rule.digits}d}..{rule.prefix}{rule.last:0{rule.digits}d}",
            reason="id_out_of_range",
        )


def check_duplicate(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if s.device_already_issued and "reissue_device_certificate" not in s.approved_operations:
        raise PolicyError(
            f"device {r.device_id} already has a certificate", reason="duplicate_device"
        )


def check_quota(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if s.issued_total >= p.total_quota:
        raise PolicyError(
            f"total quota of {p.total_quota} reached ({s.issued_total} used)", reason="over_quota"
        )


def check_daily_limit(p: EntitlementPolicy, s: IssuanceState, r: IssuanceRequest) -> None:
    if s.issued_today >= p.daily_limit and "exceed_daily_limit" not in s.approved_operations:
        raise PolicyError(
            f"daily limit of {p.daily_limit} reached for {p.day_of(max(r.now, s.latest_time))} "
            f"({p.day_timezone})",
            reason="over_daily_limit",
        )


#: The station's checks, in the order they run.
DEFAULT_CHECKS: tuple[Check, ...] = (
    check_clock,
    check_trusted_time,
    check_window,
    check_product,
    check_device_id,
    check_duplicate,
    check_quota,
    check_daily_limit,
)


def check_issuance(
    policy: EntitlementPolicy,
    state: IssuanceState,
    request: IssuanceRequest,
    checks: Sequence[Check] = DEFAULT_CHECKS,
) -> None:
    """Raise ``PolicyError`` unless every check allows the issuance."""
    if not checks:
        raise PolicyError("no issuance checks configured", reason="empty_policy")
    for check in checks:
        check(policy, state, request)
