"""The seeds' counterfeit story, end to end, through the real commands.

A station entitled to 10 devices provisions its 10 (real station, swtpm). An ATTACKER who
owns the station box loads the station CA key blob into the station's TPM (as
``signers.tpm`` lets anyone with the box do) and issues 5 more factory certificates outside
the station software: no audit records. The audit export reconciles clean (10 issued); a
site admitting the whole station registers all 15; ``registrar report`` → ``hq
ingest-report`` names exactly the 5 as counterfeit; ``hq revoke --from-report`` →
``registrar import-revocations`` cuts the 5 within 5 s and refuses them again, while the 10
genuine devices stay connected and publishing. Revoking the station CA itself needs the
HQ quorum.

What is simulated: a swtpm device's TLS layer uses a software certificate with the same
device id (see docs/registrar.md); the counterfeit devices use software keys (the attacker
made them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner
from cryptography import x509

from device_sim.cli import main as device_main
from device_sim.client import (
    DeviceClient,
    DeviceCredentials,
    DeviceRegistrationError,
    SoftwareKeys,
    TpmKeys,
)
from device_sim.device import SimDevice, vendor_ca_pem
from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.cli import main as station_main
from hq.approvals import REVOKE_STATION_CA, revoke_station_ca_params
from hq.cli import main as hq_main
from hq.home import HqHome
from registrar.app import AppSettings, running
from registrar.cli import main as registrar_main
from registrar.report import build_site_report, read_report_data
from registrar.site import SiteHome, SiteSecrets
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey
from tests.fixtures.hq import bootstrap_approvers, configure_quorum
from tests.fixtures.registrar_run import until_cut
from tests.hygiene import log_leaks, loose_state
from trustcore.identity import DeviceId
from trustcore.profiles import (
    crl_issuers_of,
    issue_factory_certificate,
)
from trustcore.quorum import encode_bundle
from trustcore.revocation import RevocationList

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

DAY = timedelta(days=1)
STATION = "station-01"
COUNTERFEITS = [f"TH-{n:06d}" for n in range(500, 505)]


def test_counterfeit_story(
    tmp_path: Path,
    swtpm_factory: Callable[..., Swtpm],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every log line of the run is scanned for secrets
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    monkeypatch.setenv("DEVTRUST_SITE_PASSPHRASE", "site passphrase")
    monkeypatch.setenv("TSS2_LOG", "all+NONE")
    product_secret = os.urandom(32)
    (tmp_path / "product.secret").write_bytes(product_secret)
    runner = CliRunner()

    def run(cli: object, *args: object, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        return result.output

    # --- HQ, the station, its entitlement to 10, and its 10 genuine devices -----------------
    hq, station = tmp_path / "hq", tmp_path / "station"
    run(hq_main, "init", "--home", hq, "--org", "Acme Devices")
    run(hq_main, "init-kms", "--home", hq)
    root_pem = hq / "certs" / "root-ca.pem"
    vendor = tmp_path / "vendor"
    provision_ek_certificate(tmp_path / "probe-tpm", ca_dir=vendor)
    (tmp_path / "vendor.pem").write_bytes(vendor_ca_pem(vendor))
    station_tpm = swtpm_factory(tmp_path / "station-tpm")
    enrolment = tmp_path / "enrolment.cbor"
    run(
        station_main, "init", "--home", station, "--station-id", STATION,
        "--tcti", station_tpm.tcti, "--root", root_pem,
        "--tpm-vendor-ca", tmp_path / "vendor.pem", "--enrolment-out", enrolment,
    )  # fmt: skip
    run(hq_main, "enrol-station", "--home", hq, enrolment)
    now = datetime.now(UTC)
    entitlement = tmp_path / "entitlement.sealed"
    run(
        hq_main, "entitle", "--home", hq, "--station", STATION, "--product", "thermostat",
        "--quota", "10", "--daily-limit", "10", "--timezone", "UTC",
        "--not-before", (now - timedelta(hours=1)).isoformat(),
        "--not-after", (now + timedelta(days=30)).isoformat(),
        "--id-prefix", "TH-", "--id-first", "0", "--id-last", "999", "--id-digits", "6",
        "--secret", f"firmware-key=@{tmp_path / 'product.secret'}", "--out", entitlement,
    )  # fmt: skip
    run(station_main, "import-entitlement", "--home", station, entitlement)
    fleet = tmp_path / "fleet"
    out = run(
        device_main, "build-fleet", "--station", station, "--keys", "tpm", "--count", "10",
        "--out", fleet, "--ek-ca-dir", vendor, "--workers", "2",
    )  # fmt: skip
    assert "built 10 of 10" in out
    device_dirs = sorted(p.parent for p in fleet.rglob("idevid.pem"))
    assert len(device_dirs) == 10
    station_ca = x509.load_pem_x509_certificate((device_dirs[0] / "chain.pem").read_bytes())
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())

    # --- the ATTACKER: the station's TPM and key blob, no station software ------------------
    attacker_tpm = Tpm(station_tpm.tcti)
    try:
        stolen = TpmKey.load(attacker_tpm, station / "station-ca.tss.pem")

        # A careful thief copies the CRL distribution point of a genuine IDevID (HQ's CRL
        # signer); a careless one leaves it out. Both are caught (see the end of the story).
        crl_issuer = crl_issuers_of(
            x509.load_pem_x509_certificate((device_dirs[0] / "idevid.pem").read_bytes())
        )[0]

        def sign_with_stolen_key(device_id: str, public: object) -> x509.Certificate:
            return issue_factory_certificate(
                station_ca,
                stolen.private_key(),
                public,  # type: ignore[arg-type]
                device_id=DeviceId(device_id),
                manufacturer="Acme Devices",
                not_before=max(station_ca.not_valid_before_utc, datetime.now(UTC) - DAY),
                crl_issuer=crl_issuer if device_id in COUNTERFEITS[:3] else None,
            )

        counterfeit_keys = {d: SoftwareKey.ephemeral() for d in COUNTERFEITS}
        counterfeit_certs = {
            d: sign_with_stolen_key(d, k.public_key()) for d, k in counterfeit_keys.items()
        }
        genuine_ids = [
            json.loads((d / "device.json").read_text())["device_id"] for d in device_dirs
        ]
    finally:
        attacker_tpm.close()

    # --- audit back to HQ: 10 issued, clean ------------------------------------------------
    export = tmp_path / "audit-1.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export)
    audit = json.loads(run(hq_main, "ingest-audit", "--home", hq, export, "--json"))
    assert audit["status"] == "clean" and audit["entitlements"][0]["issued"] == 10, audit

    # --- a site admitting the whole station -------------------------------------------------
    site_home = tmp_path / "site"
    run(registrar_main, "init", "--home", site_home, "--site-id", "building-7", "--root", root_pem)
    site = SiteHome.open(site_home)
    run(hq_main, "site", "enrol", "--home", hq, site.enrolment_path)
    bundle = tmp_path / "bundle.sealed"
    run(hq_main, "site", "bundle", "--home", hq, "--site", "building-7",
        "--admit-station", STATION, "--out", bundle)  # fmt: skip
    run(registrar_main, "commission", "--home", site_home, bundle)
    secrets = SiteSecrets()
    sims = [SimDevice(d).power_on() for d in device_dirs]
    try:
        genuine: list[DeviceClient] = []
        for sim, device_id in zip(sims, genuine_ids, strict=True):
            cert = sim.certificate()
            assert cert is not None and sim.tpm is not None
            creds = DeviceCredentials(DeviceId(device_id), cert, (station_ca,), sim.key(), (root,))
            genuine.append(DeviceClient(creds, TpmKeys(sim.tpm)))
        fakes = [
            DeviceClient(
                DeviceCredentials(
                    DeviceId(d), counterfeit_certs[d], (station_ca,), counterfeit_keys[d], (root,)
                ),
                SoftwareKeys(),
            )
            for d in COUNTERFEITS
        ]
        asyncio.run(_site_story(tmp_path, hq, site, secrets, genuine, fakes, run))
        payload_keys = {
            f"payload key {key_id.hex()}": payload.key
            for device in genuine
            if device.registered is not None
            for key_id, payload in device.registered.payload_keys.items()
        }
    finally:
        for sim in sims:
            sim.power_off()

    # --- revoking the whole station CA needs the HQ quorum ----------------------------------
    home = configure_quorum(hq, m=2)
    keys = bootstrap_approvers(home, 3)
    refused = runner.invoke(
        hq_main,
        ["revoke", "--home", str(hq), "--station-ca", STATION, "--out", str(tmp_path / "x")],
    )
    assert refused.exit_code == 2 and "insufficient" in refused.output, refused.output
    from hq.approvals import create_request
    from trustcore.quorum import sign_approval

    request = create_request(
        HqHome.open(hq), REVOKE_STATION_CA, revoke_station_ca_params(STATION), requested_by="ops"
    )
    evidence = tmp_path / "approvals.cbor"
    evidence.write_bytes(
        encode_bundle(request, [sign_approval(request, k, now=request.created) for k in keys[:2]])
    )
    out = run(hq_main, "revoke", "--home", hq, "--station-ca", STATION,
              "--approvals", evidence, "--out", tmp_path / "list-3.sealed")  # fmt: skip
    assert "on the root CRL" in out
    # the site takes list 3; list 2 can never replace it again (rollback refused)
    run(registrar_main, "import-revocations", "--home", site_home, tmp_path / "list-3.sealed")
    older = runner.invoke(
        registrar_main,
        ["import-revocations", "--home", str(site_home), str(tmp_path / "list-2.sealed")],
    )
    assert older.exit_code == 2 and "rollback" in older.output, older.output

    # --- what the run leaves behind: no secret in any log line, no readable state ----------
    assert payload_keys and len(caplog.records) > 100
    leaks = log_leaks(
        caplog.records,
        {
            "HQ passphrase": b"correct horse battery staple",
            "site passphrase": b"site passphrase",
            "entitlement secret": product_secret,
            **payload_keys,
        },
    )
    assert leaks == []
    assert loose_state(hq, station, site_home, fleet) == []


async def _site_story(
    tmp_path: Path,
    hq: Path,
    site: SiteHome,
    secrets: SiteSecrets,
    genuine: list[DeviceClient],
    fakes: list[DeviceClient],
    run: Callable[..., str],
) -> None:
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(site, secrets, settings) as app:
        reg = app.registration_endpoint
        await asyncio.gather(*(d.register(reg) for d in genuine + fakes))
        assert all(d.registered is not None for d in genuine + fakes)

        # the site report: sightings are queued writes; wait until the 15 are committed
        deadline = time.monotonic() + 5
        assert app.store is not None
        while True:
            data = await read_report_data(app.store)
            seen = build_site_report(site, data, sequence=1, now=0).seen
            if len(seen) >= 15:
                break
            assert time.monotonic() < deadline, f"only {len(seen)} sightings"
            await asyncio.sleep(0.05)
        report_file = tmp_path / "report-1.sealed"
        out = await asyncio.to_thread(
            run, registrar_main, "report", "--home", site.path, "--out", report_file
        )
        assert "site report 1: 15 factory certificate(s) seen, 15 registration(s)" in out
        result = await asyncio.to_thread(
            run, hq_main, "ingest-report", "--home", hq, report_file, "--json", code=1
        )
        findings = json.loads(result)
        assert findings["audited_clean"] == 10 and findings["seen"] == 15, findings
        assert {f["kind"] for f in findings["findings"]} == {"counterfeit"}
        assert sorted(f["device_id"] for f in findings["findings"]) == COUNTERFEITS
        assert all(f["site_id"] == "building-7" and f["registered"] for f in findings["findings"])
        findings_file = tmp_path / "findings.json"
        findings_file.write_text(result)
        # a replayed report is refused
        await asyncio.to_thread(run, hq_main, "ingest-report", "--home", hq, report_file, code=2)

        # HQ revokes the 5; the site imports the list while everyone is connected
        op = app.operational_endpoint
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(d.operational(op)) for d in genuine + fakes]
            good, bad = sessions[: len(genuine)], sessions[len(genuine) :]
            list_file = tmp_path / "list-2.sealed"
            out = await asyncio.to_thread(
                run, hq_main, "revoke", "--home", hq, "--from-report", findings_file,
                "--out", list_file,
            )  # fmt: skip
            assert "5 device(s) added" in out
            started = time.monotonic()
            imported = asyncio.create_task(
                asyncio.to_thread(
                    run, registrar_main, "import-revocations", "--home", site.path, list_file
                )
            )
            cut = await asyncio.gather(
                *(until_cut(partial(s.publish_telemetry, b"x")) for s in bad)
            )
            await imported
            assert max(cut) < 5 and time.monotonic() - started < 5
            for s in good:
                await s.publish_telemetry(b"genuine and still here")
        await asyncio.to_thread(_standard_tools_agree, tmp_path, hq, list_file, genuine, fakes)
        # refused on re-registration
        for fake in fakes:
            with pytest.raises((DeviceRegistrationError, aiomqtt.MqttError)):
                await fake.register(reg, timeout=1.0, resend_after=1.0, attempts=1)
        # and the genuine ones keep working after reconnecting
        async with genuine[0].operational(op) as s:
            await s.publish_telemetry(b"after revocation")


def _standard_tools_agree(
    tmp_path: Path,
    hq: Path,
    list_file: Path,
    genuine: list[DeviceClient],
    fakes: list[DeviceClient],
) -> None:
    """HQ's decision is visible to `openssl verify` through the indirect CRL the list
    carries (docs/pki.md): revoked with the CRL signer's distribution point, out of every
    CRL's scope (fails closed) without one; the genuine devices verify OK."""
    import subprocess

    from cryptography.hazmat.primitives import serialization

    from trustcore.revocation import open_revocation_list

    root = x509.load_pem_x509_certificate((hq / "certs" / "root-ca.pem").read_bytes())
    published: RevocationList = open_revocation_list(
        list_file.read_bytes(), root=root, now=datetime.now(UTC), root_crl=None,
        not_older_than=None,
    )  # fmt: skip
    assert published.hq_crl and published.root_crl and published.crl_signer
    pem = serialization.Encoding.PEM
    d = tmp_path / "openssl"
    d.mkdir()
    station_ca = genuine[0].credentials.chain[0]
    files = {
        "root.pem": root.public_bytes(pem),
        "station-ca.pem": station_ca.public_bytes(pem),
        "crl-signer.pem": x509.load_der_x509_certificate(published.crl_signer).public_bytes(pem),
        "root-crl.pem": x509.load_der_x509_crl(published.root_crl).public_bytes(pem),
        "hq-indirect-crl.pem": x509.load_der_x509_crl(published.hq_crl).public_bytes(pem),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)

    def verify(device: DeviceClient) -> str:
        leaf = d / f"{device.device_id}.pem"
        leaf.write_bytes(device.credentials.idevid.public_bytes(pem))
        done = subprocess.run(
            [
                "openssl", "verify", "-extended_crl", "-crl_check_all",
                "-CAfile", d / "root.pem", "-untrusted", d / "station-ca.pem",
                "-untrusted", d / "crl-signer.pem", "-CRLfile", d / "root-crl.pem",
                "-CRLfile", d / "hq-indirect-crl.pem", leaf,
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return done.stdout + done.stderr

    for fake in fakes:
        expected = (
            "certificate revoked" if fake.device_id.value in COUNTERFEITS[:3]
            else "different CRL scope"
        )  # fmt: skip
        assert expected in verify(fake), fake.device_id
    for device in genuine:
        assert ": OK" in verify(device), device.device_id
