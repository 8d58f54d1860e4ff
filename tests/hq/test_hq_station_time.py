"""HQ's time findings in ``hq ingest-audit`` (docs/hq.md): records dated after HQ received
the export, out of order, ahead of what the station's TPM vouches for, TPM readings that
go back, and anchors the station's rule cannot give. Accepted with findings: exit 1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hq.home import HqHome, HqSecrets
from hq.station_time import issue_time_statement
from hq.store import HqStore
from tests.fixtures.hq import (
    PASSPHRASE,
    World,
    home_copy,
    ingest,
    ingest_json,
    run_hq,
    world_on_each_store,
)
from trustcore.messages import CT_TIME_STATEMENT, TimeStatement
from trustcore.profiles import HqRole
from trustcore.sealed import open_package
from trustcore.stationtime import MAX_SIGNED_TIME_AGE_S, TpmClockReading

DAY = 86400


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    yield from world_on_each_store(request, tmp_path_factory, "hq-time-world")


@pytest.fixture
def home(world: World, tmp_path: Path) -> Path:
    return home_copy(world, tmp_path)


def tpm(time_ms: int, reset: int = 1, restart: int = 0) -> dict[str, object]:
    """The TPM field of a record, as a station writes it."""
    return dict(TpmClockReading(time_ms, time_ms, reset, restart, True).audit_fields())


def kinds(report: dict[str, object]) -> dict[str, int]:
    counts = report["violation_counts"]
    assert isinstance(counts, dict)
    return counts


def vouch(home: Path, tmp_path: Path, when: int, station_id: str = "station-a") -> int:
    """HQ issues a time statement at ``when`` (as ``hq time-statement`` does then)."""
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    pw.chmod(0o600)
    secrets = HqSecrets(passphrase_file=pw)
    _, moment = issue_time_statement(
        HqHome.open(home), station_id, secrets, now=datetime.fromtimestamp(when, UTC)
    )
    return moment


def hq_signed(home: Path, station_id: str) -> int:
    store = HqStore.open(HqHome.open(home).store_location)
    try:
        row = store.entitlement(station_id, 1)
    finally:
        store.close()
    assert row is not None
    return row.issued_at


def test_a_station_that_follows_its_tpm_is_clean_across_exports(
    world: World, home: Path, tmp_path: Path
) -> None:
    signed = hq_signed(home, "station-a")
    slog = world.a.new_log()
    slog.imported(signed + 60, {"signed_time": signed, "anchor_time": signed + 60, **tpm(1_000)})
    slog.issue("dev-0001", signed + 70, extra=tpm(11_000))
    code, report = ingest_json(home, slog.export(signed + 80), tmp_path)
    assert (code, report["status"]) == (0, "clean"), report
    # The replay continues across exports (state kept at HQ): a power cycle (new boot, the
    # off time not counted) and a record within what the TPM vouches for stays clean.
    slog.issue("dev-0002", signed + 75, extra=tpm(5_000, reset=2))
    code, report = ingest_json(home, slog.export(signed + 90), tmp_path)
    assert (code, report["status"]) == (0, "clean"), report


def test_a_power_cycle_then_a_time_statement_is_clean(
    world: World, home: Path, tmp_path: Path
) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    vouch(home, tmp_path, world.t0)
    anchor = {"signed_time": world.t0, "anchor_time": world.t0}
    slog.record("time_anchored", {**anchor, **tpm(1_000)}, world.t0)
    slog.issue("dev-0001", world.t0 + 10, extra=tpm(11_000))
    # Off for a day: the station re-anchors on HQ's word before it issues again.
    later = world.t0 + DAY
    vouch(home, tmp_path, later - 60)
    anchor = {"signed_time": later - 60, "anchor_time": later}
    slog.record("time_anchored", {**anchor, **tpm(500, reset=2)}, later)
    slog.issue("dev-0002", later + 5, extra=tpm(5_500, reset=2))
    code, report = ingest_json(home, slog.export(later + 60), tmp_path)
    assert (code, report["status"]) == (0, "clean"), report


def test_a_time_statement_hq_never_issued_does_not_re_anchor(
    world: World, home: Path, tmp_path: Path
) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    vouch(home, tmp_path, world.t0)
    slog.record(
        "time_anchored", {"signed_time": world.t0, "anchor_time": world.t0, **tpm(1_000)}, world.t0
    )
    # A station "re-anchors" a day later on a statement HQ never made, then issues.
    later = world.t0 + DAY
    slog.record("time_anchored", {"signed_time": later, "anchor_time": later, **tpm(2_000)}, later)
    slog.issue("dev-0001", later + 5, extra=tpm(7_000))
    code, report = ingest_json(home, slog.export(later + 60), tmp_path)
    assert code == 1, report
    assert kinds(report) == {"bad_time_anchor": 1, "clock_ahead_of_tpm": 1}
    bad = next(v for v in report["violations"] if v["kind"] == "bad_time_anchor")
    assert "no time statement" in bad["detail"] and bad["seq"] == 2


def test_future_dated_and_out_of_order_table(world: World, home: Path, tmp_path: Path) -> None:
    now = int(time.time())
    slog = world.a.new_log()
    slog.imported(world.t0)
    slog.issue("dev-0001", now + 2 * DAY)  # dated two days after HQ receives it
    slog.issue("dev-0002", now + 2 * DAY)  # the same future time again: still reported
    slog.issue("dev-0003", world.t0 + 60)  # and then back: out of order
    r = ingest(home, slog.export(world.t0 + 100), tmp_path)
    assert r.exit_code == 1, r.output  # accepted with findings
    assert "future_dated" in r.output and "clock_rollback" in r.output
    store = HqStore.open(HqHome.open(home).store_location)
    try:
        devices = [d.device_id for d in store.devices("station-a")]
    finally:
        store.close()
    assert devices == ["dev-0001", "dev-0002", "dev-0003"]  # evidence kept, head moved on


def test_future_dated_json(world: World, home: Path, tmp_path: Path) -> None:
    now = int(time.time())
    slog = world.a.new_log()
    slog.imported(world.t0)
    slog.issue("dev-0001", now + 2 * DAY)
    slog.issue("dev-0002", now + 2 * DAY)
    slog.issue("dev-0003", world.t0 + 60)
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 1 and report["status"] == "violations"
    assert kinds(report) == {"future_dated": 2, "clock_rollback": 1}
    flagged = [v for v in report["violations"] if v["kind"] == "future_dated"]
    assert [v["seq"] for v in flagged] == [1, 2]
    # A checkpoint signed "in the future" is reported too (here with its record).
    slog.issue("dev-0004", now + 2 * DAY)
    code, report = ingest_json(home, slog.export(now + 3 * DAY), tmp_path)
    assert code == 1 and kinds(report) == {"future_dated": 2}, report
    assert any("3600" in v["detail"] for v in report["violations"])


def test_clock_moved_forward_day_by_day_is_ahead_of_the_tpm(
    world: World, home: Path, tmp_path: Path
) -> None:
    """A station that did not enforce its TPM clock (old software, or tampered): each day
    forward on the host clock is a few seconds of TPM time. The HQ-vouched anchor is a time
    statement at t0 so that nothing here is dated after HQ receives it."""
    slog = world.a.new_log()
    slog.imported(world.t0)
    vouch(home, tmp_path, world.t0)
    slog.record(
        "time_anchored",
        {"signed_time": world.t0, "anchor_time": world.t0, **tpm(1_000)},
        world.t0,
    )
    number = 0
    for day in range(3):
        for i in range(5):
            number += 1
            when = world.t0 + day * DAY + i
            slog.issue(f"dev-{number:04d}", when, extra=tpm(2_000 + day * 5_000 + i * 1_000))
    # A station that enforces its TPM clock refuses instead: counted, not a finding.
    refusal = {"device_id": "dev-0099", "reason": "clock_ahead", **tpm(30_000)}
    slog.record("refused", refusal, world.t0 + 2 * DAY + 30)
    code, report = ingest_json(home, slog.export(world.t0 + 2 * DAY + 60), tmp_path)
    assert code == 1, report
    assert kinds(report) == {"clock_ahead_of_tpm": 10}
    assert report["refused_at_station"] == {"clock_ahead": 1}
    first = next(v for v in report["violations"] if v["kind"] == "clock_ahead_of_tpm")
    assert (
        first["device_id"] == "dev-0006" and "ahead of what the TPM vouches for" in first["detail"]
    )


def test_tpm_readings_that_go_back_and_bad_anchors(
    world: World, home: Path, tmp_path: Path
) -> None:
    signed = hq_signed(home, "station-a")
    slog = world.a.new_log()
    # The station claims an anchor far past what HQ's signing time allows.
    late = signed + MAX_SIGNED_TIME_AGE_S + DAY
    slog.imported(signed, {"signed_time": signed, "anchor_time": late, **tpm(1_000, reset=5)})
    slog.issue("dev-0001", signed + 10, extra=tpm(9_000, reset=5))
    slog.issue("dev-0002", signed + 20, extra=tpm(4_000, reset=5))  # time went back
    slog.issue("dev-0003", signed + 30, extra=tpm(8_000, reset=4))  # boot counters went back
    code, report = ingest_json(home, slog.export(signed + 100), tmp_path)
    assert code == 1, report
    assert kinds(report) == {"bad_time_anchor": 1, "tpm_clock_inconsistent": 2}
    # A signed time that is not the one HQ put on the entitlement is reported too.
    slog2 = world.b.new_log()
    slog2.imported(signed, {"signed_time": signed - DAY, "anchor_time": signed, **tpm(1_000)})
    code, report = ingest_json(home, slog2.export(signed + 100), tmp_path)
    assert code == 1 and kinds(report) == {"bad_time_anchor": 1}, report


def test_hq_time_statement_command(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "time.statement"
    r = run_hq("time-statement", "--home", str(home), "--station", "station-a", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "time statement for station-a" in r.output
    signer = HqHome.open(home).role_certificate(HqRole.ENTITLEMENT_SIGNER)
    opened = open_package(
        out.read_bytes(),
        receiver=None,
        expected_content_type=CT_TIME_STATEMENT,
        trusted_sender_public=signer.public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 16,
    )
    statement = TimeStatement.decode(opened.payload)
    assert statement.station_id == "station-a"
    assert abs(statement.time - time.time()) < 60
    assert opened.header.created == opened.header.sequence == statement.time
    store = HqStore.open(HqHome.open(home).store_location)
    try:  # recorded: the station's time_anchored record will be checked against it
        assert store.time_statement_issued("station-a", statement.time)
        assert not store.time_statement_issued("station-b", statement.time)
    finally:
        store.close()
    # An unknown station: one clear line, no traceback; an existing file is never replaced.
    r = run_hq(
        "time-statement", "--home", str(home), "--station", "nobody", "--out", str(tmp_path / "x")
    )
    assert r.exit_code == 1 and "not enrolled" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()
    r = run_hq("time-statement", "--home", str(home), "--station", "station-a", "--out", str(out))
    assert r.exit_code == 2 and "exists" in r.output
