"""Station time the host cannot wind, on a real swtpm (docs/factory.md "Time").

* the issue's attack: a host clock moved forward a day at a time (limit 5, 15 attempts)
  issues 5, and the other 10 are refused ``clock_ahead`` and audited with the TPM reading;
* a clock moved back is refused ``clock_rollback``;
* a legitimate run over days, with the host clock and the swtpm's clock (libfaketime)
  moving together, keeps working; a power cycle is not counted as time (``clock_ahead``)
  until HQ vouches for a new time, here with a new entitlement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.swtpm import Swtpm
from factory_station.cli import main as station_main
from factory_station.errors import EntitlementImportError, IssuanceRefused
from factory_station.station import FactoryStation
from hq.cli import main as hq_main
from tests.fixtures.pki import Pki
from tests.fixtures.station import (
    StationEnv,
    Vendor,
    make_station,
)
from tests.fixtures.tpm_faketime import FakeTime
from trustcore.audit import decode_record
from trustcore.identity import DeviceId
from trustcore.profiles import HqRole
from trustcore.stationtime import unpack_tpm_field

DAY = 86400


def _try_issue(station: FactoryStation, number: int) -> str:
    """One issuance for a fresh key: ``issued`` or the refusal reason."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    try:
        station.issue(DeviceId(f"dev-{number:06d}"), key)
    except IssuanceRefused as exc:
        return exc.reason
    return "issued"


def _records(station: FactoryStation) -> list[tuple[str, dict[str, object], int]]:
    out = []
    for _, raw in station.store.audit_records(0):
        rec = decode_record(raw)
        out.append((rec.event, dict(rec.fields), rec.time))
    return out


def test_clock_moved_forward_day_by_day_issues_only_the_daily_limit(
    station_env: StationEnv,
) -> None:
    clock = FakeTime(station_env.home.parent / "host-clock")  # the host clock only
    with station_env.open(clock=clock.utc_now) as station:
        station.import_entitlement(station_env.hq.entitlement(quota=20, daily=5))
        outcomes = []
        for day in range(3):  # the issue's example: limit 5, 15 attempts on one real day
            for i in range(5):
                outcomes.append(_try_issue(station, day * 5 + i + 1))
            clock.advance(DAY)  # the operator moves the host clock to "tomorrow"
        assert outcomes == ["issued"] * 5 + ["clock_ahead"] * 10
        status = station.status()
        assert status.issued_total == 5
        assert status.time is not None and status.time["trusted_time"] < clock.now() - DAY
        refused = [f for e, f, _ in _records(station) if e == "refused"]
        assert [f["reason"] for f in refused] == ["clock_ahead"] * 10
        # Each refusal carries the TPM reading it was decided on, in order, for HQ.
        readings = [unpack_tpm_field(f["tpm"]) for f in refused]
        assert None not in readings and readings == sorted(readings)  # type: ignore[type-var]
        assert len({r[:2] for r in readings if r is not None}) == 1  # one TPM boot
        # Moving the clock back below what was recorded is refused as before.
        clock.advance(-clock.offset - 3600)  # an hour before the real time
        assert _try_issue(station, 99) == "clock_rollback"
        assert station.status().issued_total == 5


@pytest.fixture
def faked(tmp_path: Path) -> FakeTime:
    """Host and swtpm clocks at the next noon UTC, so that no test day crosses midnight."""
    clock = FakeTime(tmp_path / "faketime")
    now = clock.now()
    clock.advance((12 * 3600 - now % DAY) % DAY)
    return clock


def test_a_long_run_with_host_and_tpm_clocks_moving_together(
    pki: Pki,
    vendor: Vendor,
    tmp_path: Path,
    swtpm_factory: Callable[..., Swtpm],
    faked: FakeTime,
) -> None:
    env = make_station(pki, vendor, tmp_path, lambda d: swtpm_factory(d, env=faked.env))
    number = 0

    def issue_day(station: FactoryStation) -> list[str]:
        nonlocal number
        out = []
        for _ in range(4):
            number += 1
            out.append(_try_issue(station, number))
        return out

    with env.open(clock=faked.utc_now) as station:
        station.import_entitlement(env.hq.entitlement(quota=40, daily=3))
        for _ in range(5):  # five days: the TPM's clock moves with the host's
            assert issue_day(station) == ["issued"] * 3 + ["over_daily_limit"]
            faked.advance(DAY)
        assert station.status().issued_total == 15
    # A power cycle of the station's TPM over two days: the TPM's time restarts and the
    # time it was off cannot be vouched for, so the host clock is now "ahead".
    env.swtpm.stop()
    faked.advance(2 * DAY)
    env.swtpm.start()
    with env.open(clock=faked.utc_now) as station:
        assert issue_day(station) == ["clock_ahead"] * 4
        # HQ vouches for the date again: a new entitlement signed "now" re-anchors.
        station.import_entitlement(
            env.hq.entitlement(sequence=2, quota=40, daily=3, created=faked.now())
        )
        assert issue_day(station) == ["issued"] * 3 + ["over_daily_limit"]
        status = station.status()
        assert status.time is not None
        assert status.time["anchor"]["source"] == "entitlement 2"
        assert abs(status.time["trusted_time"] - faked.now()) <= 5
        anchored = [f for e, f, _ in _records(station) if e == "entitlement_imported"]
        boots = [unpack_tpm_field(f["tpm"]) for f in anchored]
        assert boots[-1] > boots[0]  # type: ignore[operator]  # the power cycle shows


def test_an_hq_time_statement_re_anchors_after_a_power_cycle(
    pki: Pki,
    vendor: Vendor,
    tmp_path: Path,
    swtpm_factory: Callable[..., Swtpm],
    faked: FakeTime,
) -> None:
    env = make_station(pki, vendor, tmp_path, lambda d: swtpm_factory(d, env=faked.env))
    with env.open(clock=faked.utc_now) as station:
        station.import_entitlement(env.hq.entitlement(quota=40, daily=10))
        assert _try_issue(station, 1) == "issued"
    env.swtpm.stop()  # a long weekend, switched off
    faked.advance(3 * DAY)
    env.swtpm.start()
    with env.open(clock=faked.utc_now) as station:
        assert _try_issue(station, 2) == "clock_ahead"
        before = _records(station)
        # Refused without a change: another station's, a replay, a wrong signer, tampered.
        for package, reason in (
            (env.hq.time_statement(faked.now(), station_id="station-other"), "foreign_station"),
            (env.hq.time_statement(faked.now(), role=HqRole.AUDIT_RECEIVER), "untrusted_sender"),
            (env.hq.time_statement(faked.now())[:-3] + b"\x00\x00\x00", "tampered"),
            (b"\xa1junk", "malformed"),
        ):
            with pytest.raises(EntitlementImportError) as info:
                station.import_time_statement(package)
            assert info.value.reason == reason, str(info.value)
        assert _records(station) == before
        signed_at = faked.now() - 600  # signed ten minutes ago, carried over on a USB stick
        statement = env.hq.time_statement(signed_at)
        anchor = station.import_time_statement(statement)
        assert abs(anchor.time - faked.now()) <= 1 and anchor.source.startswith("time statement")
        assert _try_issue(station, 2) == "issued"
        with pytest.raises(EntitlementImportError) as info:
            station.import_time_statement(statement)
        assert info.value.reason == "replayed"
        event, fields, when = _records(station)[-2]
        assert event == "time_anchored" and fields["anchor_time"] == when
        assert fields["signed_time"] == signed_at
        assert unpack_tpm_field(fields["tpm"])[:2] == (2, 0)  # type: ignore[index]
    # The anchor survives a restart of the station process.
    with env.open(clock=faked.utc_now) as station:
        assert station.status().time["anchor"]["source"].startswith("time statement")  # type: ignore[index]
        assert _try_issue(station, 3) == "issued"


def test_import_time_statement_command(station_env: StationEnv, tmp_path: Path) -> None:
    runner = CliRunner()
    home = str(station_env.home)
    with station_env.open() as station:
        station.import_entitlement(station_env.hq.entitlement())
    good, junk = tmp_path / "time.sealed", tmp_path / "junk.sealed"
    good.write_bytes(station_env.hq.time_statement(int(time.time())))
    junk.write_bytes(b"\x00" * 40)
    out = runner.invoke(station_main, ["import-time-statement", "--home", home, str(good)])
    assert out.exit_code == 0 and "trusted time anchored at" in out.output, out.output
    for path, reason in ((junk, "malformed"), (good, "replayed")):
        out = runner.invoke(station_main, ["import-time-statement", "--home", home, str(path)])
        assert out.exit_code == 2 and reason in out.output, out.output
        assert "Traceback" not in out.output
    status = json.loads(runner.invoke(station_main, ["status", "--home", home, "--json"]).output)
    assert status["time"]["anchor"]["source"].startswith("time statement")
    assert status["time"]["problem"] is None


def test_hq_and_station_commands_agree_on_time(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real commands: ``hq entitle`` and ``hq time-statement`` anchor the station, whose
    audit export HQ then replays clean (the anchors are the ones HQ signed and recorded)."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    runner = CliRunner()

    def run(cli: object, *args: object, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        return result.output

    hq, station = tmp_path / "hq", tmp_path / "station"
    run(hq_main, "init", "--home", hq, "--org", "Acme Devices")
    tpm = swtpm_factory(tmp_path / "station-tpm")
    enrolment = tmp_path / "enrolment.cbor"
    run(
        station_main, "init", "--home", station, "--station-id", "station-01",
        "--tcti", tpm.tcti, "--root", hq / "certs" / "root-ca.pem", "--unsafe-csr-only",
        "--enrolment-out", enrolment,
    )  # fmt: skip
    run(hq_main, "enrol-station", "--home", hq, enrolment)
    now = datetime.now(UTC)
    entitlement = tmp_path / "entitlement.sealed"
    run(
        hq_main, "entitle", "--home", hq, "--station", "station-01", "--product", "thermostat",
        "--quota", "20", "--daily-limit", "10", "--timezone", "UTC",
        "--not-before", (now - timedelta(hours=1)).isoformat(),
        "--not-after", (now + timedelta(days=30)).isoformat(),
        "--id-prefix", "TH-", "--id-first", "0", "--id-last", "999", "--id-digits", "6",
        "--out", entitlement,
    )  # fmt: skip
    run(station_main, "import-entitlement", "--home", station, entitlement)
    statement = tmp_path / "time.sealed"
    run(hq_main, "time-statement", "--home", hq, "--station", "station-01", "--out", statement)
    assert "trusted time anchored" in run(
        station_main, "import-time-statement", "--home", station, statement
    )
    # The same statement again is refused by the station, clearly (exit 2, one reason).
    again = run(station_main, "import-time-statement", "--home", station, statement, code=2)
    assert "replayed" in again
    export = tmp_path / "audit-1.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export, "--json"))
    assert report["status"] == "clean", report
    assert report["events"] == {"entitlement_imported": 1, "time_anchored": 1}
