"""Fleet mode against the real registrar (``registrar run``'s composition root, embedded
broker, SQLite) on a site commissioned from an HQ bundle: software-key devices and swtpm
devices onboard concurrently; a device the site does not admit is refused without
disturbing the others; load fleets round-trip through their on-disk form."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from bench.site_fixture import BenchSite, SitePki, build_commissioned_site, build_site_pki
from device_sim.cli import main
from device_sim.client import DeviceClient, DeviceCredentials, TpmKeys
from device_sim.fleet import (
    PASSPHRASE_ENV,
    FleetError,
    fleet_kind,
    load_fleet,
    onboard,
    software_device,
    tpm_fleet,
    write_load_device,
)
from registrar.app import AppSettings, RegistrarApp, running
from registrar.site import SiteHome
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey, TpmKeyUsage
from tests.fixtures.swtpm import SwtpmFactory
from trustcore.identity import DeviceId

FLEET_PASS = b"load-test fleet passphrase"


@pytest.fixture(scope="module")
def site_pki() -> SitePki:
    return build_site_pki()


@pytest.fixture
def bench_site(tmp_path: Path) -> BenchSite:
    """Admits every device of its station whose id starts with "dev-" ("zz-…" is refused)."""
    return build_commissioned_site(tmp_path / "world", id_prefix="dev-")


@pytest.fixture
async def site(bench_site: BenchSite) -> AsyncIterator[RegistrarApp]:
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(SiteHome.open(bench_site.home), bench_site.secrets(), settings) as app:
        yield app


def tpm_device(pki: BenchSite, tpm: Tpm, name: str) -> DeviceClient:
    """A swtpm device: factory key made in its TPM, which also signs its TLS handshakes."""
    device_id = DeviceId(name)
    factory_key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
    idevid = pki.issue_idevid(device_id, factory_key.public_key())
    credentials = DeviceCredentials(device_id, idevid, (pki.station_ca,), factory_key, (pki.root,))
    return DeviceClient(credentials, TpmKeys(tpm))


@pytest.mark.tpm
async def test_mixed_fleet_onboards_and_refusal_is_isolated(
    site: RegistrarApp, bench_site: BenchSite, swtpm_factory: SwtpmFactory
) -> None:
    software = [software_device(d.credentials()) for d in bench_site.factory_devices(5)]
    tpms = [Tpm(swtpm_factory().tcti) for _ in range(2)]
    try:
        hardware = [tpm_device(bench_site, tpm, f"dev-tpm-{i}") for i, tpm in enumerate(tpms)]
        stranger = software_device(bench_site.factory_device("zz-000001").credentials())
        fleet = [*software, *hardware, stranger]
        report = await onboard(
            fleet, site.registration_endpoint, timeout=15, attempts=1, progress=False
        )
    finally:
        for tpm in tpms:
            tpm.close()

    by_id = {r.device_id: r for r in report.results}
    assert len(by_id) == 8
    assert by_id["zz-000001"].ok is False
    assert by_id["zz-000001"].reason == "not_in_manifest"
    assert report.registered == 7 and report.failures == 1
    assert report.reasons() == {"not_in_manifest": 1}
    assert all(by_id[d.device_id.value].ok for d in [*software, *hardware])
    assert all(r.latency_ms > 0 for r in report.results)
    summary = report.summary()
    assert summary["registered"] == 7 and summary["p50_ms"] is not None

    for device in [*software, *hardware]:
        reg = device.registered
        assert reg is not None
        assert site.keyring is not None and site.site is not None
        assert reg.current_key == site.keyring.current  # unwrapped with the device's own key
        assert reg.ldevid.public_key() == reg.ldevid_key.public_key()
        assert reg.ldevid.issuer == site.site.site_ca_cert.subject
    for device in hardware:  # the LDevID key and wrap key were made inside the TPM
        assert device.registered is not None
        assert isinstance(device.registered.ldevid_key, TpmKey)
        assert isinstance(device.registered.wrap_key, TpmKey)
    assert stranger.registered is None

    assert site.store is not None
    await site.store.record_event(None, "flush", "")
    assert (await site.store.counts())["devices"] == 7
    for device in [*software, *hardware]:
        record = await site.store.device(device.device_id)
        assert record is not None and record.status == "registered"
    assert await site.store.device(stranger.device_id) is None


async def test_load_fleet_on_disk_round_trip(
    site: RegistrarApp, bench_site: BenchSite, tmp_path: Path
) -> None:
    fleet_dir = tmp_path / "fleet"
    made = bench_site.factory_devices(3, prefix="dev-disk-")
    for d in made:
        write_load_device(
            fleet_dir,
            d.idevid,
            (d.station_ca,),
            d.factory_key.private_key(),
            passphrase=FLEET_PASS,
        )
    key_file = fleet_dir / made[0].device_id.value / "factory.key.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    # Only ciphertext on disk: an encrypted keystore that opens with the passphrase alone.
    stored = key_file.read_bytes()
    assert stored.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"-----BEGIN PRIVATE KEY-----" not in stored
    assert SoftwareKey.load(key_file, FLEET_PASS).public_key() == made[0].idevid.public_key()

    devices = load_fleet(fleet_dir, (bench_site.root,), passphrase=FLEET_PASS, count=2)
    assert [d.device_id for d in devices] == [m.device_id for m in made[:2]]
    report = await onboard(devices, site.registration_endpoint, concurrency=1, progress=False)
    assert report.registered == 2 and report.failures == 0

    with pytest.raises(FleetError, match="holds 3 devices"):
        load_fleet(fleet_dir, (bench_site.root,), passphrase=FLEET_PASS, count=4)
    with pytest.raises(FleetError, match="wrong passphrase"):
        load_fleet(fleet_dir, (bench_site.root,), passphrase=b"not the passphrase", count=1)
    # A key that does not match its certificate is refused before any connection.
    other = bench_site.factory_device("dev-disk-other")
    victim = fleet_dir / made[2].device_id.value
    (victim / "factory.key.pem").unlink()
    write_load_device(
        tmp_path / "other",
        other.idevid,
        (other.station_ca,),
        other.factory_key.private_key(),
        passphrase=FLEET_PASS,
    )
    (tmp_path / "other" / other.device_id.value / "factory.key.pem").rename(
        victim / "factory.key.pem"
    )
    with pytest.raises(FleetError, match="does not match"):
        load_fleet(fleet_dir, (bench_site.root,), passphrase=FLEET_PASS)


def test_load_fleet_refuses_plaintext_key(site_pki: SitePki, tmp_path: Path) -> None:
    """A plaintext factory key (an old fleet, or one made by hand) is refused, not used."""
    device = site_pki.factory_device("dev-plain-000001")
    target = write_load_device(
        tmp_path,
        device.idevid,
        (device.station_ca,),
        device.factory_key.private_key(),
        passphrase=FLEET_PASS,
    )
    (target / "factory.key.pem").write_bytes(
        device.factory_key.private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(FleetError, match="not an encrypted PKCS#8 keystore"):
        load_fleet(tmp_path, (site_pki.root,), passphrase=FLEET_PASS)


def test_fleet_cli_takes_the_passphrase_from_env_or_file_only(
    site_pki: SitePki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device-sim fleet`` has no passphrase argument; without the variable or a file it
    stops before touching the keys, and a wrong passphrase is reported as such."""
    fleet_dir = tmp_path / "fleet"
    device = site_pki.factory_device("dev-cli-000001")
    write_load_device(
        fleet_dir,
        device.idevid,
        (device.station_ca,),
        device.factory_key.private_key(),
        passphrase=FLEET_PASS,
    )
    root = tmp_path / "root.pem"
    root.write_bytes(site_pki.root.public_bytes(serialization.Encoding.PEM))
    args = ["fleet", str(fleet_dir), "--port", "1", "--root", str(root)]
    runner = CliRunner()

    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    assert f"{PASSPHRASE_ENV} is not set" in result.output

    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    assert "wrong passphrase" in result.output

    pw = tmp_path / "pw"
    pw.write_bytes(b"also wrong\n")
    pw.chmod(0o644)  # readable by others: refused before use
    result = runner.invoke(main, [*args, "--passphrase-file", str(pw)])
    assert result.exit_code != 0
    assert "accessible by other users" in result.output

    result = runner.invoke(main, [*args, "--passphrase", "x"])
    assert result.exit_code != 0
    assert "No such option" in result.output


def test_fleet_layouts_are_told_apart_and_never_mixed(tmp_path: Path) -> None:
    """Software-key device directories (idevid.pem) and swtpm ones (tpm/) are the two
    layouts; a directory holding both is refused, as is a TPM device no station provisioned."""
    (tmp_path / "soft" / "TH-000001").mkdir(parents=True)
    (tmp_path / "soft" / "TH-000001" / "idevid.pem").write_bytes(b"")
    assert fleet_kind(tmp_path / "soft") == "software"
    (tmp_path / "tpm" / "dev-00000" / "tpm").mkdir(parents=True)
    assert fleet_kind(tmp_path / "tpm") == "tpm"
    with (
        pytest.raises(FleetError, match="not provisioned by a station"),
        tpm_fleet(tmp_path / "tpm", []),
    ):
        pass
    with pytest.raises(FleetError, match="2 asked for"), tpm_fleet(tmp_path / "tpm", [], count=2):
        pass
    (tmp_path / "tpm" / "TH-000001").mkdir()
    (tmp_path / "tpm" / "TH-000001" / "idevid.pem").write_bytes(b"")
    with pytest.raises(FleetError, match="mixes TPM and software-key devices"):
        fleet_kind(tmp_path / "tpm")
