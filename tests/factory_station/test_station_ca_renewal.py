"""Station CA renewal and re-key, end to end through the real commands, on swtpm.

HQ → station (entitlement) → 2 devices (A) → ``renew-ca`` → ``hq renew-station`` →
``import-ca`` → 1 device (B, same key, new certificate) → ``renew-ca --rekey`` → HQ →
``import-ca`` → 1 device (C, new key) → one audit export carrying devices under both keys
(checkpoint signed by the new key) ingests clean at HQ, the chain unbroken → every factory
certificate verifies with ``openssl verify`` (its own chain, and a CA file holding all the
station's CA certificates, as brokers get it) → a site admitting the station registers A
(old key) and C (new key) on the embedded broker and on Mosquitto.

Refusals: a replayed request, a request signed by the key the station re-keyed away from,
a request carrying a certificate another HQ issued, tampered bytes, a certificate for
another key at import, a station whose key the root revoked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

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
from factory_station.errors import StationStateError
from hq.cli import main as hq_main
from hq.store import HqStore
from registrar.app import AppSettings, running
from registrar.cli import main as registrar_main
from registrar.site import SiteHome, SiteSecrets
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey
from trustcore.csr import build_csr
from trustcore.identity import DeviceId, StationId
from trustcore.profiles import issue_factory_certificate
from trustcore.station_ca_request import StationCaRequest

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

STATION = "station-01"


def _subject() -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, STATION),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, STATION),
        ]
    )


def _openssl_verify(root: Path, chain: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient",
         "-CAfile", root, "-untrusted", chain, cert],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_station_ca_renewal_and_rekey(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    monkeypatch.setenv("DEVTRUST_SITE_PASSPHRASE", "site passphrase")
    monkeypatch.setenv("TSS2_LOG", "all+NONE")
    runner = CliRunner()

    def run(cli: object, *args: object, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        return result.output

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
        "--out", entitlement,
    )  # fmt: skip
    run(station_main, "import-entitlement", "--home", station, entitlement)

    def provision(count: int, into: Path) -> list[Path]:
        out = run(
            device_main, "build-fleet", "--station", station, "--keys", "tpm", "--count", count,
            "--out", into, "--ek-ca-dir", vendor, "--workers", "2",
        )  # fmt: skip
        assert f"built {count} of {count}" in out
        return sorted(p.parent for p in into.rglob("idevid.pem"))

    def chain_of(device: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate((device / "chain.pem").read_bytes())

    old_devices = provision(2, tmp_path / "fleet-a")
    first_ca = chain_of(old_devices[0])
    export1 = tmp_path / "audit-1.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export1)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export1, "--json"))
    assert report["status"] == "clean", report

    # --- renewal: same TPM key, new certificate -----------------------------------------------
    renew_req = tmp_path / "renew.req"
    out = run(station_main, "renew-ca", "--home", station, "--out", renew_req)
    assert "renewal of the current CA key" in out
    renewed_pem = tmp_path / "renewed.pem"
    out = run(hq_main, "renew-station", "--home", hq, renew_req, "--out", renewed_pem)
    assert "renew issued" in out
    # the same request again: a replay
    out = run(hq_main, "renew-station", "--home", hq, renew_req, "--out", tmp_path / "x.pem",
              code=2)  # fmt: skip
    assert "replayed" in out and not (tmp_path / "x.pem").exists()
    out = run(station_main, "import-ca", "--home", station, renewed_pem)
    assert "station CA renew: imported" in out
    renewed = x509.load_pem_x509_certificate(renewed_pem.read_bytes())
    assert renewed.public_key() == first_ca.public_key()
    assert renewed.serial_number != first_ca.serial_number
    # Not bounded by the entitlement (30 days): a manufacturer chain outlives its devices' stock.
    assert renewed.not_valid_after_utc > now + timedelta(days=5 * 365)
    # importing it twice is harmless
    assert "already imported" in run(station_main, "import-ca", "--home", station, renewed_pem)
    renewed_devices = provision(1, tmp_path / "fleet-b")
    assert chain_of(renewed_devices[0]) == renewed

    # --- re-key: a new key in the TPM, signed by both keys ------------------------------------
    rekey_req = tmp_path / "rekey.req"
    out = run(station_main, "renew-ca", "--home", station, "--rekey", "--out", rekey_req)
    assert "re-key" in out and (station / "station-ca.next.tss.pem").exists()
    # A certificate for another key is refused at import (the renewal one is for the old key,
    # still current, so try one made for a stranger's key by a foreign HQ instead).
    foreign_hq = tmp_path / "foreign-hq"
    run(hq_main, "init", "--home", foreign_hq, "--org", "Evil Corp")
    out = run(station_main, "import-ca", "--home", station, foreign_hq / "certs" / "root-ca.pem",
              code=2)  # fmt: skip
    assert "wrong_station_ca" in out
    rekeyed_pem = tmp_path / "rekeyed.pem"
    out = run(hq_main, "renew-station", "--home", hq, rekey_req, "--out", rekeyed_pem)
    assert "rekey issued" in out
    # An export signed by the old key, delivered after HQ moved the station to the new key:
    # still the station's own log (its re-key chain), ingested clean.
    export_old = tmp_path / "audit-2.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export_old)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export_old, "--json"))
    assert report["status"] == "clean" and report["entitlements"][0]["issued"] == 3, report
    # --rekey states the expectation: the renewal certificate is not a re-key
    out = run(station_main, "import-ca", "--home", station, "--rekey", renewed_pem, code=2)
    assert "key_mismatch" in out
    out = run(station_main, "import-ca", "--home", station, "--rekey", rekeyed_pem)
    assert "station CA rekey: imported" in out
    rekeyed = x509.load_pem_x509_certificate(rekeyed_pem.read_bytes())
    assert rekeyed.public_key() != first_ca.public_key() and rekeyed.subject == first_ca.subject
    assert not (station / "station-ca.next.tss.pem").exists()
    assert len(list(station.glob("station-ca.retired-*.tss.pem"))) == 1
    status = json.loads(run(station_main, "status", "--home", station, "--json"))
    assert status["station_ca"]["serial"] == f"{rekeyed.serial_number:x}"
    assert status["station_ca"]["retired_keys"] == 1 and not status["station_ca"]["rekey_pending"]
    new_devices = provision(1, tmp_path / "fleet-c")
    assert chain_of(new_devices[0]) == rekeyed

    # --- refusals at HQ -----------------------------------------------------------------------
    old_key_file = next(station.glob("station-ca.retired-*.tss.pem"))
    with Tpm(station_tpm.tcti) as tpm:
        old_key = TpmKey.load(tpm, old_key_file)
        # the old key asks for another re-key: it is no longer the station's key
        stale = StationCaRequest.create(
            station_id=StationId(STATION),
            csr_der=build_csr(SoftwareKey.ephemeral(), _subject()),
            current_cert_der=renewed.public_bytes(serialization.Encoding.DER),
            current_key=old_key,
            new_key=None,
            created=int(datetime.now(UTC).timestamp()),
        )
        old_key.unload()
    # a renewal whose CSR is a software key: refused as a key mismatch before anything else
    (tmp_path / "stale.req").write_bytes(stale.encode())
    out = run(hq_main, "renew-station", "--home", hq, tmp_path / "stale.req",
              "--out", tmp_path / "y.pem", code=2)  # fmt: skip
    assert "key_mismatch" in out
    with Tpm(station_tpm.tcti) as tpm:
        old_key = TpmKey.load(tpm, old_key_file)
        stale = StationCaRequest.create(
            station_id=StationId(STATION),
            csr_der=build_csr(old_key, _subject()),
            current_cert_der=renewed.public_bytes(serialization.Encoding.DER),
            current_key=old_key,
            new_key=None,
            created=int(datetime.now(UTC).timestamp()),
        )
        old_key.unload()
    (tmp_path / "stale.req").write_bytes(stale.encode())
    out = run(hq_main, "renew-station", "--home", hq, tmp_path / "stale.req",
              "--out", tmp_path / "y.pem", code=2)  # fmt: skip
    assert "superseded_key" in out
    # tampered bytes
    data = bytearray(rekey_req.read_bytes())
    data[-10] ^= 0x01
    (tmp_path / "tampered.req").write_bytes(bytes(data))
    out = run(hq_main, "renew-station", "--home", hq, tmp_path / "tampered.req",
              "--out", tmp_path / "y.pem", code=2)  # fmt: skip
    assert "bad_signature" in out or "malformed" in out
    assert not (tmp_path / "y.pem").exists()

    # --- audit: one export spanning the re-key ingests clean; the chain continues --------------
    export3 = tmp_path / "audit-3.sealed"
    run(station_main, "export-audit", "--home", station, "--out", export3)
    report = json.loads(run(hq_main, "ingest-audit", "--home", hq, export3, "--json"))
    assert report["status"] == "clean" and report["violations"] == [], report
    assert report["events"].get("station_ca_imported") == 1, report["events"]
    assert report["entitlements"][0]["issued"] == 4
    # Now that the station exports with its new key, the old key is closed for exports: a
    # thief of the old key cannot fork the log HQ holds.
    from hq.home import HqHome
    from trustcore.messages import CT_AUDIT_EXPORT
    from trustcore.profiles import HqRole
    from trustcore.sealed import seal_package

    receiver = HqHome.open(hq).role_certificate(HqRole.AUDIT_RECEIVER).public_key()
    with Tpm(station_tpm.tcti) as tpm:
        old_key = TpmKey.load(tpm, next(station.glob("station-ca.retired-*.tss.pem")))
        forged = seal_package(
            content_type=CT_AUDIT_EXPORT, payload=b"\xa0", sender=old_key, sender_cert=renewed,
            receiver_public=receiver, sequence=9, created=int(datetime.now(UTC).timestamp()),
        )  # type: ignore[arg-type]  # fmt: skip
        old_key.unload()
    (tmp_path / "forged.sealed").write_bytes(forged)
    out = run(hq_main, "ingest-audit", "--home", hq, tmp_path / "forged.sealed", code=2)
    assert "foreign_station" in out and "superseded" in out, out
    store = HqStore.open(hq / "hq.sqlite")
    try:
        assert len(store.station_ca_certificates(STATION)) == 3
        assert len(store.retired_station_crls()) == 1  # the old key's CRL, from export 3
        assert len(store.station_ca_keys(STATION)) == 2
    finally:
        store.close()

    history = json.loads(run(hq_main, "station-cas", "--home", hq, "--station", STATION, "--json"))
    assert [h["serial"] for h in history] == [
        f"{c.serial_number:x}" for c in (first_ca, renewed, rekeyed)
    ]
    assert [h["current_key"] for h in history] == [False, False, True]
    assert [h["exports_accepted"] for h in history] == [False, False, True]
    assert not any(h["revoked"] for h in history)

    # --- every factory certificate verifies with openssl ---------------------------------------
    all_cas = tmp_path / "station-cas.pem"
    all_cas.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (first_ca, renewed, rekeyed))
    )
    devices = old_devices + renewed_devices + new_devices
    for device in devices:
        for chain in (device / "chain.pem", all_cas):
            done = _openssl_verify(root_pem, chain, device / "idevid.pem")
            assert done.returncode == 0, done.stdout + done.stderr
    # and a device of the old key does not verify under the new key's certificate alone
    wrong = _openssl_verify(root_pem, tmp_path / "rekeyed.pem", old_devices[0] / "idevid.pem")
    assert wrong.returncode != 0

    # --- a site admitting the station registers old-key and new-key devices ---------------------
    site_home = tmp_path / "site"
    run(registrar_main, "init", "--home", site_home, "--site-id", "building-7", "--root", root_pem)
    site = SiteHome.open(site_home)
    run(hq_main, "site", "enrol", "--home", hq, site.enrolment_path)
    bundle = tmp_path / "bundle.sealed"
    run(hq_main, "site", "bundle", "--home", hq, "--site", "building-7",
        "--admit-station", STATION, "--out", bundle)  # fmt: skip
    run(registrar_main, "commission", "--home", site_home, bundle)
    # The broker's CA file holds every station CA certificate (same name, two keys), and its
    # CRL file a current CRL of each key: the old key's comes from the re-keyed station.
    held = x509.load_pem_x509_certificates((site.current / "registration-cas.pem").read_bytes())
    assert {first_ca, renewed, rekeyed} <= set(held)
    crls = (site.current / "crls.pem").read_bytes().split(b"-----END X509 CRL-----")
    station_crls = [
        x509.load_pem_x509_crl(c + b"-----END X509 CRL-----") for c in crls if b"BEGIN" in c
    ]
    station_crls = [c for c in station_crls if c.issuer == first_ca.subject]
    assert len(station_crls) == 2
    assert all(c.is_signature_valid(k.public_key()) for c, k in zip(
        sorted(station_crls, key=lambda c: c.is_signature_valid(rekeyed.public_key())),
        (first_ca, rekeyed), strict=True))  # fmt: skip

    # OpenSSL with the site's CRL file (root CRL + one CRL per station key): old-key and
    # new-key devices both pass the revocation check of their own issuer.
    for device in (old_devices[0], new_devices[0]):
        done = subprocess.run(
            ["openssl", "verify", "-crl_check_all", "-CAfile", root_pem, "-untrusted", all_cas,
             "-CRLfile", site.current / "crls.pem", device / "idevid.pem"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    # Without the retired key's CRL (what a site would get if the re-keyed station did not
    # sign one), the old-key device fails the check: that CRL is what keeps it registrable.
    pems = (site.current / "crls.pem").read_bytes().split(b"-----END X509 CRL-----")
    kept = [
        p + b"-----END X509 CRL-----"
        for p in pems
        if b"BEGIN" in p
        and not x509.load_pem_x509_crl(p + b"-----END X509 CRL-----").is_signature_valid(
            first_ca.public_key()  # type: ignore[arg-type]
        )
    ]
    partial = tmp_path / "crls-without-retired.pem"
    partial.write_bytes(b"\n".join(kept) + b"\n")
    done = subprocess.run(
        ["openssl", "verify", "-crl_check_all", "-CAfile", root_pem, "-untrusted", all_cas,
         "-CRLfile", partial, old_devices[0] / "idevid.pem"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "unable to get certificate CRL" in done.stdout + done.stderr

    # A thief with the NEW station key mints a device no audit log shows. The genuine
    # devices of both keys connect with their own IDevID and TPM-held factory key.
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())
    devices = [(old_devices[0], first_ca), (new_devices[0], rekeyed)]
    with Tpm(station_tpm.tcti) as tpm:
        key = TpmKey.load(tpm, station / "station-ca.tss.pem")
        fake_key = SoftwareKey.ephemeral()
        fake_cert = issue_factory_certificate(
            rekeyed, key.private_key(), fake_key.public_key(),
            device_id=DeviceId("TH-000500"), manufacturer="Acme Devices",
            not_before=rekeyed.not_valid_before_utc,
        )  # fmt: skip
        fake = DeviceClient(
            DeviceCredentials(DeviceId("TH-000500"), fake_cert, (rekeyed,), fake_key, (root,)),
            SoftwareKeys(),
        )
        key.unload()

    for broker in ("embedded", "mosquitto"):
        sims = [SimDevice(d).power_on() for d, _ in devices]
        try:
            clients = []
            for sim, (_, ca) in zip(sims, devices, strict=True):
                cert = sim.certificate()
                assert cert is not None and sim.tpm is not None
                device_id = DeviceId(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
                                     .value)  # type: ignore[arg-type]  # fmt: skip
                creds = DeviceCredentials(device_id, cert, (ca,), sim.key(), (root,))
                clients.append(DeviceClient(creds, TpmKeys(sim.tpm)))
            asyncio.run(_register_all(site, [*clients, fake], broker))
        finally:
            for sim in sims:
                sim.power_off()

    # Counterfeit detection still knows both keys' devices as genuine (site report → HQ).
    report_file = tmp_path / "report-1.sealed"
    out = run(registrar_main, "report", "--home", site_home, "--out", report_file)
    assert "3 factory certificate(s) seen" in out, out
    findings = json.loads(
        run(hq_main, "ingest-report", "--home", hq, report_file, "--json", code=1)
    )
    assert findings["seen"] == 3 and findings["audited_clean"] == 2, findings
    [finding] = findings["findings"]
    assert finding["kind"] == "counterfeit" and finding["device_id"] == "TH-000500", finding
    # HQ revokes it; the site takes the list; the fake is refused, genuine devices of both
    # keys still register.
    findings_file = tmp_path / "findings.json"
    findings_file.write_text(json.dumps(findings))
    out = run(hq_main, "revoke", "--home", hq, "--from-report", findings_file,
              "--out", tmp_path / "list-2.sealed")  # fmt: skip
    assert "1 device(s) added" in out
    run(registrar_main, "import-revocations", "--home", site_home, tmp_path / "list-2.sealed")
    sims = [SimDevice(d).power_on() for d, _ in devices]
    try:
        clients = []
        for sim, (_, ca) in zip(sims, devices, strict=True):
            cert = sim.certificate()
            assert cert is not None and sim.tpm is not None
            creds = DeviceCredentials(
                DeviceId(str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)),
                cert, (ca,), sim.key(), (root,),
            )  # fmt: skip
            clients.append(DeviceClient(creds, TpmKeys(sim.tpm)))
        asyncio.run(_register_all(site, clients, "embedded", refused=fake))
    finally:
        for sim in sims:
            sim.power_off()


async def _register_all(
    site: SiteHome, clients: list[DeviceClient], broker: str, refused: DeviceClient | None = None
) -> None:
    settings = AppSettings(broker=broker, registration_port=0, operational_port=0)  # type: ignore[arg-type]
    async with running(site, SiteSecrets(), settings) as app:
        await asyncio.gather(*(c.register(app.registration_endpoint) for c in clients))
        assert all(c.registered is not None for c in clients)
        if refused is not None:
            with pytest.raises((DeviceRegistrationError, aiomqtt.MqttError)) as err:
                await refused.register(
                    app.registration_endpoint, timeout=1.0, resend_after=1.0, attempts=1
                )
            # refused at connect (the registrar's broker plugin) or by the registrar
            assert isinstance(err.value, MqttConnectError) or (
                getattr(err.value, "reason", None) == "revoked"
            ), repr(err.value)


def test_foreign_stale_superseded_and_revoked_requests_are_refused(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hq.approvals import (
        REKEY_STATION_CA,
        REVOKE_STATION_CA,
        create_request,
        rekey_station_ca_params,
        revoke_station_ca_params,
    )
    from hq.home import HqHome
    from tests.fixtures.hq import bootstrap_approvers, configure_quorum
    from trustcore.profiles import issue_root_ca, issue_station_ca
    from trustcore.quorum import encode_bundle, sign_approval

    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    monkeypatch.setenv("TSS2_LOG", "all+NONE")
    runner = CliRunner()

    def run(cli: object, *args: object, code: int = 0) -> str:
        result = runner.invoke(cli, [str(a) for a in args])  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return result.output

    hq = tmp_path / "hq"
    run(hq_main, "init", "--home", hq, "--org", "Acme Devices")
    root_pem = hq / "certs" / "root-ca.pem"
    now = datetime.now(UTC)

    def entitled_station(station_id: str) -> Path:
        home = tmp_path / station_id
        tpm = swtpm_factory(tmp_path / f"{station_id}-tpm")
        enrolment = tmp_path / f"{station_id}.cbor"
        run(
            station_main, "init", "--home", home, "--station-id", station_id,
            "--tcti", tpm.tcti, "--root", root_pem, "--unsafe-csr-only",
            "--enrolment-out", enrolment,
        )  # fmt: skip
        run(hq_main, "enrol-station", "--home", hq, enrolment)
        entitlement = tmp_path / f"{station_id}.sealed"
        run(
            hq_main, "entitle", "--home", hq, "--station", station_id, "--product", "thermostat",
            "--quota", "10", "--daily-limit", "10", "--timezone", "UTC",
            "--not-before", (now - timedelta(hours=1)).isoformat(),
            "--not-after", (now + timedelta(days=30)).isoformat(),
            "--id-prefix", "TH-", "--id-first", "0", "--id-last", "999", "--id-digits", "6",
            "--allow-overlap",  # several stations, one id range: not what this test is about
            "--out", entitlement,
        )  # fmt: skip
        run(station_main, "import-entitlement", "--home", home, entitlement)
        return home

    station = entitled_station(STATION)

    def hq_refuses(request: bytes, reason: str) -> None:
        path = tmp_path / "request.req"
        path.write_bytes(request)
        out = run(hq_main, "renew-station", "--home", hq, path, "--out", tmp_path / "no.pem",
                  code=2)  # fmt: skip
        assert reason in out, out
        assert not (tmp_path / "no.pem").exists()

    # A station of another manufacturer (its certificate from a foreign root): foreign.
    evil_key, evil_station = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    evil_root = issue_root_ca(
        evil_key.private_key(), common_name="Evil Root", organization="Evil",
        not_before=now - timedelta(days=1), not_after=now + timedelta(days=3650),
    )  # fmt: skip
    evil_ca = issue_station_ca(
        evil_root, evil_key.private_key(), evil_station.public_key(),
        station_id=StationId(STATION), organization="Evil", not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3000), max_not_after=now + timedelta(days=3000),
    )  # fmt: skip

    def software_request(station_id: str, created: int) -> bytes:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, station_id),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, station_id),
            ]
        )
        return StationCaRequest.create(
            station_id=StationId(station_id),
            csr_der=build_csr(evil_station, subject),
            current_cert_der=evil_ca.public_bytes(serialization.Encoding.DER),
            current_key=evil_station,
            new_key=None,
            created=created,
        ).encode()

    hq_refuses(software_request(STATION, int(now.timestamp())), "foreign_station")
    hq_refuses(software_request("station-99", int(now.timestamp())), "unknown_station")
    hq_refuses(software_request(STATION, int((now - timedelta(days=40)).timestamp())),
               "stale_request")  # fmt: skip
    hq_refuses(b"\xa1\x01\x02", "malformed")
    hq_refuses(software_request(STATION, 2**62), "malformed")  # a time out of range
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    out = run(station_main, "import-ca", "--home", station, tmp_path / "junk.pem", code=2)
    assert "malformed" in out

    # Two re-key requests: the second replaces the pending key, so HQ's answer to the first
    # no longer matches anything the station holds.
    first, second = tmp_path / "rekey-1.req", tmp_path / "rekey-2.req"
    run(station_main, "renew-ca", "--home", station, "--rekey", "--out", first)
    run(station_main, "renew-ca", "--home", station, "--rekey", "--out", second)
    out = run(station_main, "renew-ca", "--home", station, "--out", second, code=2)
    assert "exists" in out
    answer = tmp_path / "answer-1.pem"
    run(hq_main, "renew-station", "--home", hq, first, "--out", answer)
    out = run(station_main, "import-ca", "--home", station, answer, code=2)
    assert "key_mismatch" in out
    # HQ moved to the first request's key; the second (signed by the old key) is superseded.
    hq_refuses(second.read_bytes(), "superseded_key")

    # A crash between recording a re-key and switching the key files: the next open
    # finishes the switch, and the station then signs with the new key.
    crashing = entitled_station("station-03")
    rekey3, answer3 = tmp_path / "rekey-3.req", tmp_path / "answer-3.pem"
    run(station_main, "renew-ca", "--home", crashing, "--rekey", "--out", rekey3)
    run(hq_main, "renew-station", "--home", hq, rekey3, "--out", answer3)

    def power_cut(*_: object) -> None:
        raise StationStateError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr("factory_station.ca_renewal.switch_keys", power_cut)
        out = run(station_main, "import-ca", "--home", crashing, answer3, code=2)
    assert "power cut" in out and (crashing / "station-ca.next.tss.pem").exists()
    run(station_main, "status", "--home", crashing)  # open: the switch completes
    assert not (crashing / "station-ca.next.tss.pem").exists()
    new3 = x509.load_pem_x509_certificate(answer3.read_bytes())
    renew3 = tmp_path / "renew-3.req"
    run(station_main, "renew-ca", "--home", crashing, "--out", renew3)
    sent = StationCaRequest.decode(renew3.read_bytes()).verify()
    assert sent.current_cert == new3 and sent.new_public == new3.public_key()
    run(hq_main, "renew-station", "--home", hq, renew3, "--out", tmp_path / "answer-3b.pem")
    assert "already imported" in run(station_main, "import-ca", "--home", crashing, answer3)

    # Another station's certificates are revoked (quorum): no renewal, no re-key way out.
    other = entitled_station("station-02")
    gated = entitled_station("station-04")
    home = configure_quorum(hq, m=2, station_rekey=True)
    keys = bootstrap_approvers(home, 2)

    # HQ's policy gates re-keys: without approvals refused (and told which key to approve);
    # approvals for another key do not count; approvals for this station and key do. A
    # renewal (same key) is not gated.
    rekey4 = tmp_path / "rekey-4.req"
    out = run(station_main, "renew-ca", "--home", gated, "--rekey", "--out", rekey4)
    new_key_id = out.split("key to certify: ")[1].split()[0]
    hq_refuses(rekey4.read_bytes(), "insufficient")
    assert f"key_id={new_key_id}" in run(
        hq_main, "renew-station", "--home", hq, rekey4, "--out", tmp_path / "no.pem", code=2
    )

    def approvals_for(params: dict[str, object]) -> Path:
        request = create_request(HqHome.open(hq), REKEY_STATION_CA, params, requested_by="ops")
        path = tmp_path / f"approvals-{request.request_id.hex()}.cbor"
        path.write_bytes(
            encode_bundle(request, [sign_approval(request, k, now=request.created) for k in keys])
        )
        return path

    wrong = approvals_for(rekey_station_ca_params("station-04", "00" * 32))
    out = run(hq_main, "renew-station", "--home", hq, rekey4, "--approvals", wrong,
              "--out", tmp_path / "no.pem", code=2)  # fmt: skip
    assert "rekey_station_ca refused" in out and not (tmp_path / "no.pem").exists()
    right = approvals_for(rekey_station_ca_params("station-04", new_key_id))
    answer4 = tmp_path / "answer-4.pem"
    run(hq_main, "renew-station", "--home", hq, rekey4, "--approvals", right, "--out", answer4)
    run(station_main, "import-ca", "--home", gated, "--rekey", answer4)
    renew4 = tmp_path / "renew-4.req"
    run(station_main, "renew-ca", "--home", gated, "--out", renew4)
    run(hq_main, "renew-station", "--home", hq, renew4, "--out", tmp_path / "answer-4b.pem")
    renew, rekey = tmp_path / "renew-2.req", tmp_path / "rekey-2b.req"
    run(station_main, "renew-ca", "--home", other, "--out", renew)
    run(station_main, "renew-ca", "--home", other, "--rekey", "--out", rekey)
    request = create_request(
        HqHome.open(hq), REVOKE_STATION_CA, revoke_station_ca_params("station-02"),
        requested_by="ops",
    )  # fmt: skip
    evidence = tmp_path / "approvals.cbor"
    evidence.write_bytes(
        encode_bundle(request, [sign_approval(request, k, now=request.created) for k in keys])
    )
    run(hq_main, "revoke", "--home", hq, "--station-ca", "station-02", "--approvals", evidence,
        "--out", tmp_path / "list.sealed")  # fmt: skip
    hq_refuses(renew.read_bytes(), "station_revoked")
    hq_refuses(rekey.read_bytes(), "station_revoked")
    store = HqStore.open(hq / "hq.sqlite")
    try:
        assert len(store.station_ca_keys(STATION)) == 2  # the re-key chain: new key, old key
        assert len(store.station_ca_keys("station-02")) == 1  # nothing issued after revocation
        assert len(store.station_ca_certificates("station-02")) == 1
    finally:
        store.close()


def test_year_two_renewal_after_the_entitlement_ended_then_more_devices(
    tmp_path: Path, swtpm_factory: Callable[..., Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ten-year story's year 2, with clocks injected at the composition roots: the
    first entitlement (30 days) ended long ago; the station renews its CA certificate, HQ
    issues a new entitlement, the station makes more devices; the year-0 device and the
    year-2 device both verify (openssl, at year 2 and at year 7)."""
    from factory_station.station import FactoryStation
    from hq.entitlements import EntitlementRequest, issue_entitlement
    from hq.home import HqHome, HqSecrets
    from hq.station_ca import renew_station_ca
    from trustcore.entitlement import DeviceIdRule

    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", "correct horse battery staple")
    monkeypatch.setenv("TSS2_LOG", "all+NONE")
    runner = CliRunner()
    hq, home = tmp_path / "hq", tmp_path / "station"
    t0 = datetime.now(UTC).replace(microsecond=0)
    year2 = t0 + timedelta(days=400)
    assert runner.invoke(hq_main, ["init", "--home", str(hq), "--org", "Acme"]).exit_code == 0
    tpm = swtpm_factory(tmp_path / "station-tpm")
    root_pem = (hq / "certs" / "root-ca.pem").read_bytes()
    enrolment = FactoryStation.init(
        home, station_id=StationId(STATION), tcti=tpm.tcti, root_pem=root_pem,
        attestation="unsafe-csr-only",
    )  # fmt: skip
    hq_home, secrets = HqHome.open(hq), HqSecrets()
    from hq.authority import enrol_station

    enrol_station(hq_home, enrolment.encode(), now=t0)

    def entitle(start: datetime) -> bytes:
        return issue_entitlement(
            hq_home,
            EntitlementRequest(
                station_id=STATION,
                product="thermostat",
                total_quota=10,
                daily_limit=10,
                day_timezone="UTC",
                not_before=start - timedelta(hours=1),
                not_after=start + timedelta(days=30),
                id_rule=DeviceIdRule("TH-", 0, 999, 6),
            ),
            secrets,
            now=start,
        ).package

    def make_device(station: FactoryStation, n: int) -> tuple[x509.Certificate, x509.Certificate]:
        issued = station.issue(DeviceId(f"TH-{n:06d}"), SoftwareKey.ephemeral().public_key())
        return issued.certificate, issued.station_ca

    clock = {"now": t0}
    with FactoryStation.open(home, clock=lambda: clock["now"]) as station:
        station.import_entitlement(entitle(t0))
        year0_device, year0_ca = make_device(station, 1)
        clock["now"] = year2
        request = station.make_ca_request(rekey=False)
        result = renew_station_ca(hq_home, request, secrets, now=year2)
        imported = station.import_ca_certificate(result.pem())
        assert imported.kind == "renew" and imported.status == "imported"
        station.import_entitlement(entitle(year2))
        year2_device, year2_ca = make_device(station, 2)
    assert year2_ca != year0_ca and year2_ca.public_key() == year0_ca.public_key()
    cas = tmp_path / "cas.pem"
    cas.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (year0_ca, year2_ca))
    )
    for device in (year0_device, year2_device):
        path = tmp_path / f"{device.serial_number:x}.pem"
        path.write_bytes(device.public_bytes(serialization.Encoding.PEM))
        for when in (year2, t0 + timedelta(days=7 * 365)):
            done = subprocess.run(
                ["openssl", "verify", "-attime", str(int(when.timestamp())),
                 "-CAfile", str(hq / "certs" / "root-ca.pem"), "-untrusted", str(cas), str(path)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert done.returncode == 0, (when, done.stdout + done.stderr)
