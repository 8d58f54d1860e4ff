"""End to end, HQ → factory → HQ, through the real commands, with swtpm for the station and
one swtpm (with its own EK certificate) per device.

HQ init → station init → enrol → entitle (quota 20, daily limit 10) → provision 10 devices →
the 11th the same day is refused → export audit → HQ ingests, reconciles, reports clean →
``openssl verify`` accepts every factory certificate against the root and station CA.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from device_sim.cli import main as device_main
from device_sim.device import vendor_ca_pem
from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.cli import main as station_main
from hq.cli import main as hq_main
from hq.store import HqStore
from trustcore.sealed import peek

pytestmark = [pytest.mark.tpm, pytest.mark.slow]


def test_hq_to_factory_to_hq(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    runner = CliRunner()

    def run(cli: object, *args: str, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        return result.output

    hq, station = tmp_path / "hq", tmp_path / "station"
    run(hq_main, "init", "--home", hq, "--org", "Acme Devices")
    root_pem = hq / "certs" / "root-ca.pem"

    # The TPM vendor: one CA; every device TPM gets its own EK certificate from it.
    vendor = tmp_path / "vendor"
    provision_ek_certificate(tmp_path / "probe-tpm", ca_dir=vendor)
    (tmp_path / "vendor.pem").write_bytes(vendor_ca_pem(vendor))

    station_tpm = swtpm_factory(tmp_path / "station-tpm")
    enrolment = tmp_path / "enrolment.cbor"
    run(
        station_main, "init", "--home", station, "--station-id", "station-01",
        "--tcti", station_tpm.tcti, "--root", root_pem,
        "--tpm-vendor-ca", tmp_path / "vendor.pem", "--enrolment-out", enrolment,
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
    assert peek(entitlement.read_bytes()).encrypted
    run(station_main, "import-entitlement", "--home", station, entitlement)

    fleet = tmp_path / "fleet"
    out = run(
        device_main, "build-fleet", "--station", station, "--keys", "tpm", "--count", "10",
        "--out", fleet, "--ek-ca-dir", vendor, "--workers", "2",
    )  # fmt: skip
    assert "built 10 of 10" in out

    # The 11th device on the same day: refused, clearly, and no counter slot consumed.
    out = run(
        device_main, "build-fleet", "--station", station, "--keys", "tpm", "--count", "1",
        "--out", fleet, "--ek-ca-dir", vendor, code=2,
    )  # fmt: skip
    assert "over_daily_limit" in out and "daily limit of 10" in out
    status = json.loads(run(station_main, "status", "--home", station, "--json"))
    assert status["issued_total"] == 10 and status["remaining"] == 10

    export = tmp_path / "audit-1.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export, "--json"))
    assert report["status"] == "clean" and report["violations"] == [], report
    [ent] = report["entitlements"]
    assert ent["issued"] == 10 and ent["per_day"] == {now.date().isoformat(): 10}
    assert report["refused_at_station"] == {"over_daily_limit": 1}
    # The export carried the station CA's CRL, signed in its TPM; HQ keeps it for sites.
    store = HqStore.open(hq / "hq.sqlite")
    try:
        held = store.station_crl("station-01")
    finally:
        store.close()
    assert held is not None and held.crl_number == 1 and held.next_update > now.timestamp()

    # Every factory certificate verifies with OpenSSL against the root and the station CA.
    certs = sorted(fleet.rglob("idevid.pem"))
    assert len(certs) == 10
    ids = set()
    for cert in certs:
        station_ca = cert.parent / "chain.pem"
        done = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", "sslclient",
             "-CAfile", root_pem, "-untrusted", station_ca, cert],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        ids.add(x509.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string())
    assert len(ids) == 10

    # Ingesting the same export again is a replay; HQ's state does not move.
    again = runner.invoke(hq_main, ["ingest-audit", "--home", str(hq), str(export), "--json"])
    assert again.exit_code == 2, again.output
