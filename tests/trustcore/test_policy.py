"""Pure tests of the entitlement policy, the station's issuance checks and HQ reconciliation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given, settings
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


def _mixed_log(p: EntitlementPolicy) -> list[tuple[int, int, str, bytes, str]]:
    """Issued records that hit every rule, across two local days and past the quota."""
    out = [(i, T0 + i, f"TH-{i:06d}", bytes([i]) * 32, "thermostat") for i in range(12)]
    out += [
        (12, T0 + 86400, "TH-000003", b"\x03" * 32, "doorbell"),  # dup id + key, product
        (13, T0 + 86401, "TH-002000", b"\x20" * 32, "thermostat"),  # id out of range
        (14, T0 + 86402, "th-000015", b"\x22" * 32, "thermostat"),  # wrong prefix
        (15, T0 + 86403, "TH-00016", b"\x23" * 32, "thermostat"),  # too few digits
        (16, T0 + 86404, "TH-00001\u0667", b"\x24" * 32, "thermostat"),  # non-ASCII digit
        (17, p.not_after + 5, "TH-000017", b"\x25" * 32, "thermostat"),  # window, quota
    ]
    return out


def test_reconciler_batch_equals_one_by_one() -> None:
    """HQ's path (runs of records through ``add_issued_batch``, split wherever another
    record interrupts) reports exactly what one call per record reports."""
    p = policy(total_quota=16, daily_limit=10)
    log = _mixed_log(p)
    single = Reconciler(p)
    for item in log:
        single.add_issued(*item)
    for cut in (0, 5, 11, 13, len(log)):
        batched = Reconciler(p)
        batched.add_issued_batch(log[:cut])
        batched.add_issued_batch(iter(log[cut:]))  # any iterable
        assert batched.report() == single.report()
    report = single.report()
    assert report.issued == 18
    assert report.per_day == {p.day_of(T0): 12, p.day_of(T0 + 86400): 5, p.day_of(p.not_after): 1}
    counts = report.counts()
    assert counts["over_daily_limit"] == 2  # records 10 and 11
    assert counts["id_out_of_range"] == 4
    assert counts["over_quota"] == 2 and counts["outside_window"] == 1
    assert counts["duplicate_device"] == counts["duplicate_key"] == counts["wrong_product"] == 1
    assert [v.seq for v in report.violations if v.kind == "id_out_of_range"] == [13, 14, 15, 16]


@given(
    st.one_of(
        st.builds(lambda n, w: f"TH-{n:0{w}d}", st.integers(0, 10**7), st.integers(1, 8)),
        st.builds(lambda s: "TH-" + s, st.text(alphabet="0123456789:/ -\u0667\u00b2", max_size=7)),
        st.text(max_size=10),
    ),
    st.integers(0, 10**6 - 1),
    st.integers(0, 10**6 - 1),
)
@example("TH-000500", 0, 999)  # inside
@example("TH-001000", 0, 999)  # just above
@example("TH-000009", 10, 999)  # just below
def test_reconciler_id_range_is_the_rule(device_id: str, a: int, b: int) -> None:
    """The batch loop tests the id range with string bounds (no call, no int() per record):
    it flags exactly the ids ``DeviceIdRule.contains`` refuses."""
    rule = DeviceIdRule("TH-", min(a, b), max(a, b), 6)
    r = Reconciler(policy(id_rule=rule))
    r.add_issued_batch([(0, T0, device_id, b"k" * 32, "thermostat")])
    flagged = [v.kind for v in r.violations] == ["id_out_of_range"]
    assert flagged == (not rule.contains(device_id)) and len(r.violations) == int(flagged)


def test_reconciler_batch_sees_allowance_burn_and_reissue_between_runs() -> None:
    """What happens between two runs (a quorum allowance, a burned slot, a re-issue
    grant) applies to the next run, exactly as HQ interleaves them."""
    p = policy(total_quota=14, daily_limit=5)
    r = Reconciler(p)
    r.add_issued_batch((i, T0 + i, f"TH-{i:06d}", bytes([i]) * 32, "thermostat") for i in range(5))
    day = p.day_of(T0)
    r.allow_extra(day, 2)
    r.allow_reissue("TH-000001", b"req-1")
    r.add_burned(5, "TH-000099")
    r.add_issued_batch(
        [
            (6, T0 + 6, "TH-000006", b"\x06" * 32, "thermostat"),  # 6th: allowed by the quorum
            (7, T0 + 7, "TH-000001", b"\x41" * 32, "thermostat"),  # 7th, granted re-issue
            (8, T0 + 8, "TH-000001", b"\x42" * 32, "thermostat"),  # 8th: over, grant used up
        ]
    )
    assert r.reissues_used == [(b"req-1", 7)]
    assert [(v.kind, v.seq) for v in r.violations] == [
        ("over_daily_limit", 8),
        ("duplicate_device", 8),
    ]
    r.add_issued_batch([(i, T0 + i, f"TH-{i:06d}", bytes([i]) * 32, "thermostat") for i in (20,)])
    r2 = Reconciler(p, issued=13, burned=1)
    r2.add_issued_batch([(30, T0 + 86400, "TH-000030", b"\x30" * 32, "thermostat")])
    assert [v.kind for v in r2.violations] == ["over_quota"]  # slot 15 of 14: burned counts
    assert r.issued == 9 and r.burned == 1


def _state(r: Reconciler) -> tuple[object, ...]:
    """Everything a reconciler carries into the next record."""
    return (
        r.report(),
        r.device_ids,
        r.key_ids,
        r.per_day,
        r.issued,
        r.reissues_used,
        (r._day_start, r._day_end, r._day),  # the cached day is state too
    )


def _run_by_column(r: Reconciler, log: list[tuple[int, int, str, bytes, str]]) -> None:
    """``log`` (consecutive seqs) through ``add_issued_run``, the product folded when shared."""
    if not log:
        r.add_issued_run(0, (), (), (), "thermostat")
        return
    seqs, whens, ids, keys, products = zip(*log, strict=True)
    assert list(seqs) == list(range(seqs[0], seqs[0] + len(log)))
    shared = products[0] if products.count(products[0]) == len(products) else products
    r.add_issued_run(seqs[0], whens, ids, keys, shared)


def test_reconciler_run_by_column_equals_batch() -> None:
    """HQ's column path reports and leaves exactly what ``add_issued_batch`` does, on the
    log that hits every rule, cut anywhere."""
    p = policy(total_quota=16, daily_limit=10)
    log = _mixed_log(p)
    for cut in range(len(log) + 1):
        batched, columns = Reconciler(p), Reconciler(p)
        batched.add_issued_batch(log[:cut])
        batched.add_issued_batch(log[cut:])
        _run_by_column(columns, log[:cut])
        _run_by_column(columns, log[cut:])
        assert _state(columns) == _state(batched)


def test_a_clean_run_by_column_needs_no_record_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that breaks no rule is proven clean by whole-column tests; one that breaks a
    rule goes record by record (which names it)."""
    p = policy(total_quota=1000, daily_limit=500)
    r = Reconciler(p, per_day={p.day_of(T0): 3}, device_ids={"TH-000999"}, key_ids={b"x" * 32})
    midnight = T0 + 8 * 3600  # T0 is 16:00 in Shanghai
    run = [
        (i, midnight - 1200 + 60 * i, f"TH-{i:06d}", bytes([i]) * 32, "thermostat")
        for i in range(40)
    ]

    def no_loop(batch: object) -> None:
        raise AssertionError("a clean run went record by record")

    with monkeypatch.context() as m:
        m.setattr(r, "add_issued_batch", no_loop)
        _run_by_column(r, run)  # 20 minutes before local midnight, 20 after
    assert r.issued == 40 and not r.violations and "TH-000039" in r.device_ids
    assert r.per_day == {p.day_of(T0): 3 + 20, p.day_of(midnight): 20}
    _run_by_column(r, [(40, midnight + 1300, "TH-000999", b"y" * 32, "thermostat")])
    assert [v.kind for v in r.violations] == ["duplicate_device"]


_ID = st.one_of(
    st.builds(lambda n: f"TH-{n:06d}", st.integers(0, 1200)),
    st.sampled_from(["TH-00001", "th-000001", "TH-00001\u0667", "TH-0000\u00b21", "TH-00:001"]),
)


@settings(max_examples=300, deadline=None)
@given(
    prior_ids=st.sets(st.builds(lambda n: f"TH-{n:06d}", st.integers(0, 1200)), max_size=3),
    prior_issued=st.integers(0, 18),
    burned=st.integers(0, 2),
    allowance=st.integers(-2, 3),
    records=st.lists(
        st.tuples(
            st.integers(-2, 2 * 86400),  # time after T0 (some before the window)
            _ID,
            st.integers(0, 40),  # key
            st.sampled_from(["thermostat"] * 6 + ["doorbell"]),
        ),
        max_size=25,
    ),
    in_order=st.booleans(),
)
def test_reconciler_run_by_column_is_the_batch(
    prior_ids: set[str],
    prior_issued: int,
    burned: int,
    allowance: int,
    records: list[tuple[int, str, int, str]],
    in_order: bool,
) -> None:
    """Any run, any prior state: the column path and the record loop agree on every
    finding and on the state after (ids, keys, counts, days, the cached day)."""
    p = policy(total_quota=20, daily_limit=6, not_before=T0)
    if in_order:
        records = sorted(records)
    log = [
        (i, T0 + t, device_id, bytes([k]) * 32, product)
        for i, (t, device_id, k, product) in enumerate(records)
    ]
    pair = []
    for _ in range(2):
        r = Reconciler(
            p,
            issued=prior_issued,
            burned=burned,
            per_day={p.day_of(T0): 4},
            device_ids=set(prior_ids),
            key_ids={b"\x01" * 32},
            day_allowance={p.day_of(T0 + 86400): allowance},
        )
        pair.append(r)
    batched, columns = pair
    batched.add_issued_batch(log)
    _run_by_column(columns, log)
    assert _state(columns) == _state(batched)


_FAULTS = {
    "id": lambda rec: (rec[0], rec[1], rec[2].replace("0", "\u0660", 1), rec[3], rec[4]),
    "prefix": lambda rec: (rec[0], rec[1], "th" + rec[2][2:], rec[3], rec[4]),
    "above": lambda rec: (rec[0], rec[1], "TH-001000", rec[3], rec[4]),
    "dup_id": lambda rec: (rec[0], rec[1], "TH-000100", rec[3], rec[4]),
    "prior_id": lambda rec: (rec[0], rec[1], "TH-000007", rec[3], rec[4]),
    "dup_key": lambda rec: (rec[0], rec[1], rec[2], bytes([100]) * 32, rec[4]),
    "product": lambda rec: (rec[0], rec[1], rec[2], rec[3], "doorbell"),
    "early": lambda rec: (rec[0], T0 - 1, rec[2], rec[3], rec[4]),
    "late": lambda rec: (rec[0], T0 + 31 * 86400, rec[2], rec[3], rec[4]),
    "back": lambda rec: (rec[0], rec[1] - 7200, rec[2], rec[3], rec[4]),
}


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 30),
    step=st.integers(0, 4000),
    start=st.integers(0, 2 * 86400),
    prior_issued=st.integers(0, 25),
    daily=st.integers(5, 40),
    allowance=st.integers(-2, 10),
    fault=st.none() | st.tuples(st.sampled_from(sorted(_FAULTS)), st.integers(0, 29)),
)
def test_reconciler_run_by_column_is_the_batch_near_clean(
    n: int,
    step: int,
    start: int,
    prior_issued: int,
    daily: int,
    allowance: int,
    fault: tuple[str, int] | None,
) -> None:
    """Runs that are clean, or break exactly one rule (one record, anywhere), against a
    prior state near the quota and the daily limit: the column path proves the clean ones
    and agrees with the record loop on all."""
    p = policy(total_quota=50, daily_limit=daily, not_before=T0)
    log = [
        (i, T0 + start + step * i, f"TH-{100 + i:06d}", bytes([100 + i]) * 32, "thermostat")
        for i in range(n)
    ]
    if fault is not None:
        kind, at = fault
        log[at % n] = _FAULTS[kind](log[at % n])
    pair = [
        Reconciler(
            p,
            issued=prior_issued,
            per_day={p.day_of(T0 + start): daily // 2},
            device_ids={"TH-000007"},
            key_ids={b"\x07" * 32},
            day_allowance={p.day_of(T0 + start + step * n): allowance},
        )
        for _ in range(2)
    ]
    batched, columns = pair
    batched.add_issued_batch(log)
    _run_by_column(columns, log)
    assert _state(columns) == _state(batched)
