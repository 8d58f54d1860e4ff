"""Pure tests of the entitlement policy, the station's issuance checks and HQ reconciliation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, QuorumRule
from trustcore.errors import EncodingError, InvalidValueError, PolicyError
from trustcore.issuance import IssuanceRequest, IssuanceState, check_issuance
from trustcore.reconcile import Reconciler

T0 = 1_800_000_000  # 2027-01-15T08:00:00Z


def policy(**kw: object) -> EntitlementPolicy:
    base: dict[str, object] = dict(
        entitlement_id="ent-1",
        station_id="station-a",
        sequence=1,
        product="thermostat",
        total_quota=20,
        daily_limit=10,
        day_timezone="Asia/Shanghai",
        not_before=T0 - 3600,
        not_after=T0 + 30 * 86400,
        id_rule=DeviceIdRule("TH-", 0, 999, 6),
        quorum=(QuorumRule("exceed_daily_limit", 2, (b"a" * 32, b"b" * 32, b"c" * 32)),),
    )
    base.update(kw)
    return EntitlementPolicy(**base)  # type: ignore[arg-type]


def state(**kw: object) -> IssuanceState:
    base: dict[str, object] = dict(
        issued_total=0,
        issued_today=0,
        latest_time=T0 - 60,
        device_already_issued=False,
        trusted_time=T0,
    )
    base.update(kw)
    return IssuanceState(**base)  # type: ignore[arg-type]


def req(
    device_id: str = "TH-000001", now: int = T0, product: str = "thermostat"
) -> IssuanceRequest:
    return IssuanceRequest(device_id=device_id, product=product, now=now)


def test_map_round_trip() -> None:
    p = policy()
    assert EntitlementPolicy.from_map(p.to_map()) == p


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("daily_limit"),
        lambda m: m.update(extra=1),
        lambda m: m.update(total_quota="20"),
        lambda m: m.update(total_quota=True),
        lambda m: m.update(day_timezone="Mars/Olympus"),
        lambda m: m["id_rule"].update(first=5, last=4),
        lambda m: m.update(quorum=[{"operation": "launch", "m": 1, "approvers": [b"a" * 32]}]),
        lambda m: m.update(
            quorum=[{"operation": "exceed_daily_limit", "m": 3, "approvers": [b"a" * 32]}]
        ),
    ],
)
def test_from_map_is_strict(mutate: object) -> None:
    m = policy().to_map()
    mutate(m)  # type: ignore[operator]
    with pytest.raises(EncodingError):
        EntitlementPolicy.from_map(m)


def test_value_objects_refuse_bad_values() -> None:
    with pytest.raises(InvalidValueError):
        policy(daily_limit=30)
    with pytest.raises(InvalidValueError):
        policy(not_after=T0 - 3600)
    with pytest.raises(InvalidValueError):
        DeviceIdRule("bad/prefix", 0, 9, 1)


@given(st.text(max_size=12))
def test_id_rule_only_accepts_its_canonical_ids(text: str) -> None:
    rule = DeviceIdRule("TH-", 10, 500, 4)
    if rule.contains(text):
        n = int(text[3:])
        assert rule.device_id(n) == text and 10 <= n <= 500


def test_id_rule_rejects_other_spellings() -> None:
    rule = DeviceIdRule("TH-", 0, 999, 6)
    assert rule.contains("TH-000007")
    for bad in [
        "TH-7",
        "TH-0000007",
        "th-000007",
        "TH-00000\u0667",
        "TH-001000",
        "XX-000007",
        "TH-+00007",
    ]:
        assert not rule.contains(bad), bad


def test_allows_a_good_issuance() -> None:
    check_issuance(policy(), state(), req())


@pytest.mark.parametrize(
    ("st_kw", "req_kw", "reason"),
    [
        ({"latest_time": T0 + 3600}, {}, "clock_rollback"),
        ({"latest_time": T0 - 8000}, {"now": T0 - 7200}, "not_yet_valid"),
        ({"trusted_time": T0 + 31 * 86400}, {"now": T0 + 31 * 86400}, "window_expired"),
        ({"trusted_time": T0 - 301}, {}, "clock_ahead"),
        ({"trusted_time": T0 - 86400}, {"now": T0 + 86400}, "clock_ahead"),
        ({"trusted_time": None}, {}, "no_time_anchor"),
        ({}, {"product": "doorbell"}, "wrong_product"),
        ({}, {"device_id": "TH-001000"}, "id_out_of_range"),
        ({"device_already_issued": True}, {}, "duplicate_device"),
        ({"issued_total": 20}, {}, "over_quota"),
        ({"issued_today": 10}, {}, "over_daily_limit"),
    ],
)
def test_each_refusal(st_kw: dict[str, object], req_kw: dict[str, object], reason: str) -> None:
    with pytest.raises(PolicyError) as e:
        check_issuance(policy(), state(**st_kw), req(**req_kw))  # type: ignore[arg-type]
    assert e.value.reason == reason


def test_clock_rollback_cannot_reopen_an_expired_window() -> None:
    p = policy()
    late = p.not_after + 10
    with pytest.raises(PolicyError) as e:
        check_issuance(
            p, state(latest_time=late, trusted_time=late), req(now=p.not_after - 100_000)
        )
    assert e.value.reason in {"clock_rollback", "window_expired"}
    # Even within the skew tolerance, the window is judged by the latest recorded time.
    with pytest.raises(PolicyError) as e:
        check_issuance(p, state(latest_time=late, trusted_time=late), req(now=late - 60))
    assert e.value.reason == "window_expired"


def test_approved_quorum_lifts_daily_limit_only() -> None:
    s = state(issued_today=10, approved_operations=frozenset({"exceed_daily_limit"}))
    check_issuance(policy(), s, req())
    with pytest.raises(PolicyError):
        check_issuance(policy(), dataclasses.replace(s, issued_total=20), req())


def test_empty_check_list_refuses() -> None:
    with pytest.raises(PolicyError) as e:
        check_issuance(policy(), state(), req(), checks=())
    assert e.value.reason == "empty_policy"


def test_daily_limit_counts_local_days() -> None:
    p = policy()  # Asia/Shanghai = UTC+8: 16:00Z is local midnight
    start, end, day = p.day_bounds(T0)
    assert end - start == 86400 and day == p.day_of(T0) and start <= T0 < end
    assert p.day_of(start - 1) != day and p.day_of(end) != day


def test_reconciler_clean_and_violations() -> None:
    p = policy(total_quota=13, daily_limit=10)
    r = Reconciler(p)
    for i in range(10):
        r.add_issued(i, T0 + i, f"TH-{i:06d}", bytes([i]) * 32, "thermostat")
    assert r.report().clean
    r.add_issued(10, T0 + 10, "TH-000010", b"\x10" * 32, "thermostat")  # 11th today
    r.add_issued(11, T0 + 86400, "TH-000003", b"\x03" * 32, "doorbell")
    r.add_issued(12, T0 + 86401, "TH-002000", b"\x20" * 32, "thermostat")
    r.add_issued(13, p.not_after + 5, "TH-000014", b"\x21" * 32, "thermostat")
    counts = r.report().counts()
    assert counts == {
        "over_quota": 1,
        "over_daily_limit": 1,
        "outside_window": 1,
        "id_out_of_range": 1,
        "wrong_product": 1,
        "duplicate_device": 1,
        "duplicate_key": 1,
        "secret_outside_policy": 0,
    }
    assert r.report().to_map()["issued"] == 14
