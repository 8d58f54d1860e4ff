"""``device-sim build-fleet`` at a real factory station (swtpm station TPM, HQ entitlement),
then ``device-sim fleet`` on the result against ``registrar run``: the user story of a load
test without any benchmark code, through the real commands only.

HQ init → station init (``--unsafe-csr-only``: a load-test station) → enrol → entitle →
build-fleet (software keys) → export-audit → HQ ingest-audit (every device accounted for)
→ site init/enrol/bundle/commission → registrar run → device-sim fleet: all registered.
A station that attests device keys refuses software devices before any work, and a TPM
fleet is built through the same station path (one swtpm per device) and onboarded by
``device-sim fleet`` with every key, the TLS key included, in the devices' TPMs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from device_sim.cli import main as device_main
from device_sim.device import SimDevice, manufacture_tpm_template, vendor_ca_pem
from device_sim.swtpm import Swtpm
from factory_station.cli import main as station_main
from hq.cli import main as hq_main
from registrar.app import AppSettings, running
from registrar.cli import main as registrar_main
from registrar.site import SiteHome, SiteSecrets
from tests.fixtures.fleet import invoke, secret_file, station_with_entitlement
from trustcore.profiles import device_id_from_certificate

pytestmark = pytest.mark.tpm

BIN = Path(sys.executable).parent


async def onboard_fleet(
    tmp: Path, hq: Path, monkeypatch: pytest.MonkeyPatch, fleet: Path, *extra: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """Commission a site admitting ``station-01``, run its registrar, and run
    ``device-sim fleet`` on ``fleet``: its JSON summary and the store's counts."""
    site = tmp / "site"
    site_pass = secret_file(tmp / "site.pass", "site passphrase for the fleet test")
    monkeypatch.setenv("DEVTRUST_SITE_PASSPHRASE", "site passphrase for the fleet test")
    root = hq / "certs" / "root-ca.pem"
    invoke(registrar_main, "init", "--home", site, "--site-id", "site-01", "--root", root)
    invoke(hq_main, "site", "enrol", "--home", hq, next(site.glob("*enrol*")))
    bundle = tmp / "bundle.sealed"
    invoke(
        hq_main, "site", "bundle", "--home", hq, "--site", "site-01",
        "--admit-station", "station-01", "--out", bundle,
    )  # fmt: skip
    invoke(registrar_main, "commission", "--home", site, bundle)

    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(SiteHome.open(site), SiteSecrets(site_pass), settings) as app:
        reg = app.registration_endpoint
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "device-sim"), "fleet", str(fleet), "--host", reg.host,
            "--port", str(reg.port), "--root", str(root), *extra,
            "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, (out + err).decode()
        assert app.store is not None
        counts = await app.store.counts()
    return json.loads(out.decode().strip().splitlines()[-1]), counts


async def test_build_a_software_fleet_and_onboard_it(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "hq passphrase for the fleet test")
    station_tpm = swtpm_factory(tmp_path / "station-tpm")
    hq, station = station_with_entitlement(tmp_path, station_tpm, unsafe=True)
    device_pass = secret_file(tmp_path / "devices.pass", "load-test fleet passphrase")
    fleet = tmp_path / "fleet"

    line = invoke(
        device_main, "build-fleet", "--station", station, "--count", "4", "--keys", "software",
        "--out", fleet, "--passphrase-file", device_pass, "--json",
    )  # fmt: skip
    built = json.loads(line)
    assert built["built"] == 4 and built["refused"] == []
    assert built["device_ids"] == [f"TH-{i:06d}" for i in range(4)]
    for device_id in built["device_ids"]:
        key_file = fleet / device_id / "factory.key.pem"
        assert key_file.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        cert = x509.load_pem_x509_certificate((fleet / device_id / "idevid.pem").read_bytes())
        assert device_id_from_certificate(cert).value == device_id
    status = json.loads(invoke(station_main, "status", "--home", station, "--json"))
    assert status["issued_total"] == 4

    # HQ sees every one of them in the station's audit log.
    export = tmp_path / "audit-1.sealed"
    invoke(station_main, "export-audit", "--home", station, "--out", export)
    report = json.loads(invoke(hq_main, "ingest-audit", "--home", hq, export, "--json"))
    assert report["status"] == "clean" and report["entitlements"][0]["issued"] == 4

    # A site admitting the station; the registrar serves; the fleet onboards.
    summary, counts = await onboard_fleet(
        tmp_path, hq, monkeypatch, fleet, "--passphrase-file", str(device_pass)
    )
    assert summary["registered"] == 4 and summary["failures"] == 0
    assert sorted(r["device_id"] for r in summary["results"]) == built["device_ids"]
    assert counts["devices"] == 4

    # The entitlement still counts: 16 left; asking for 17 more builds 16 and is refused.
    out_text = invoke(
        device_main, "build-fleet", "--station", station, "--count", "17", "--keys",
        "software", "--out", fleet, "--passphrase-file", device_pass, code=2,
    )  # fmt: skip
    assert "built 16 of 17" in out_text and "over_quota" in out_text


async def test_software_devices_need_a_load_test_station(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A station that attests device keys refuses software keys up front (nothing issued,
    nothing written) and builds a TPM fleet through the same path, each key attested;
    ``device-sim fleet`` onboards it with every key in the devices' TPMs, TLS included."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "hq passphrase for the fleet test")
    monkeypatch.setenv("DEVTRUST_DEVICE_PASSPHRASE", "load-test fleet passphrase")
    vendor = tmp_path / "vendor"
    template = manufacture_tpm_template(tmp_path / "ek-template", ek_ca_dir=vendor)
    vendor_pem = tmp_path / "vendor.pem"
    vendor_pem.write_bytes(vendor_ca_pem(vendor))
    station_tpm = swtpm_factory(tmp_path / "station-tpm")
    _, station = station_with_entitlement(
        tmp_path, station_tpm, unsafe=False, vendor_pem=vendor_pem
    )

    refused = invoke(
        device_main, "build-fleet", "--station", station, "--count", "2", "--keys", "software",
        "--out", tmp_path / "soft", code=1,
    )  # fmt: skip
    assert "--unsafe-csr-only" in refused and "Traceback" not in refused
    assert not (tmp_path / "soft").exists()
    invoke(
        device_main, "build-fleet", "--station", station, "--count", "2", "--keys", "tpm",
        "--out", tmp_path / "soft", "--passphrase-file", vendor_pem, code=2,
    )  # fmt: skip

    fleet = tmp_path / "tpm-fleet"
    line = invoke(
        device_main, "build-fleet", "--station", station, "--count", "2", "--keys", "tpm",
        "--out", fleet, "--ek-template", template, "--json",
    )  # fmt: skip
    assert json.loads(line)["built"] == 2
    devices = [SimDevice(d) for d in sorted(fleet.iterdir())]
    assert sorted(d.info()["device_id"] for d in devices) == ["TH-000000", "TH-000001"]
    assert all((d.directory / "device-key.tss.pem").exists() for d in devices)
    status = json.loads(invoke(station_main, "status", "--home", station, "--json"))
    assert status["issued_total"] == 2
    # HQ takes the station's audit export (and with it the station's CRL, without which
    # the registration listener refuses every device of the station at the handshake).
    hq = tmp_path / "hq"
    export = tmp_path / "audit-1.sealed"
    invoke(station_main, "export-audit", "--home", station, "--out", export)
    invoke(hq_main, "ingest-audit", "--home", hq, export, "--json")
    summary, counts = await onboard_fleet(tmp_path, hq, monkeypatch, fleet)
    assert summary["registered"] == 2 and summary["failures"] == 0
    assert counts["devices"] == 2
