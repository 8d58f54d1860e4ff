"""``registrar commission``: a real HQ bundle commissions a real site home; every refusal
leaves the site exactly as it was; payload keys never appear in clear in any file."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from hq.cli import main as hq_main
from hq.kms import kms_key, site_payload_keys
from hq.store import HqStore
from registrar.broker import REGISTRAR_IDENTITY
from registrar.cli import main as registrar_main
from registrar.errors import CommissionError
from registrar.site import (
    SiteHome,
    broker_settings,
    commission_site,
    load_commissioned_site,
    reissue_site_crl,
)
from signers.software import SoftwareKey
from tests.fixtures.pki import p256
from tests.fixtures.site import SITE, STATION, World, make_world, world, world_template
from trustcore.crl import RevokedEntry
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.profiles import HqRole, issue_role_certificate, issue_root_ca
from trustcore.sealed import seal_package
from trustcore.site_bundle import CT_SITE_BUNDLE, SiteBundlePayload
from trustcore.topics import TELEMETRY_LEVEL, device_topic, every_device_filter

__all__ = ["world", "world_template"]  # fixtures (tests/fixtures/site.py)

DAY = timedelta(days=1)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file (and symlink target) under ``root``: proof that nothing changed."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"->" + str(p.readlink()).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


def refused(world: World, package: bytes, *, now: datetime | None = None) -> str:
    before = snapshot(world.site.path)
    with pytest.raises(CommissionError) as e:
        commission_site(world.site, package, world.site_secrets, now=now)
    assert snapshot(world.site.path) == before
    return e.value.reason


# ------------------------------------------------------------------------------ success


def test_commission_writes_a_working_site(world: World) -> None:
    result = commission_site(world.site, world.bundle(), world.site_secrets)
    assert result.sequence == 1 and result.manifest_devices == 2
    assert result.station_ids == (STATION,) and result.warnings == ()
    site = load_commissioned_site(world.site, world.site_secrets)
    assert site.admission.devices == {DeviceId("TH-000001"), DeviceId("TH-000002")}
    assert site.admission.admits(DeviceId("TH-000001"), None)
    assert not site.admission.admits(DeviceId("TH-000003"), StationId(STATION))
    assert site.revocations.sequence == 1
    assert [c.subject for c in site.station_cas] == [
        c.subject
        for c in x509.load_pem_x509_certificates(
            (world.site.current / "registration-cas.pem").read_bytes()
        )[1:]
    ]
    assert len(site.crls) == 3  # root, station, site CA
    site.chain_verifier()  # every CRL verifies against its CA
    # the payload keys the site holds are HQ's keys for this site
    store = HqStore.open(world.hq.db_path)
    hq_keys, current = site_payload_keys(store, kms_key(world.hq, world.hq_secrets), SITE)
    store.close()
    ring = site.payload_keys.load()
    assert ring.current.key_id == current and ring.current.key == hq_keys[0].key
    # registrar client certificate: CN registrar@site, issued by the site CA, clientAuth
    client = x509.load_pem_x509_certificates(site.client_cert.read_bytes())
    assert client[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        REGISTRAR_IDENTITY
    )
    client[0].verify_directly_issued_by(site.site_ca_cert)
    # the broker's files load into real TLS contexts, CRLs included
    settings = broker_settings(world.site, world.site_secrets, workdir=world.base / "run")
    tls = settings.tls
    for cafile in (tls.registration_cas, tls.operational_cas):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls.server_cert, tls.server_key, password=tls.server_key_passphrase)
        ctx.load_verify_locations(cafile=cafile)
        ctx.load_verify_locations(cafile=tls.crl_file)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(
        site.client_cert, site.client_key, password=tls.server_key_passphrase
    )
    assert b"ENCRYPTED PRIVATE KEY" in tls.server_key.read_bytes()


def test_recommission_keeps_local_revocations_and_rotated_keys(world: World) -> None:
    commission_site(world.site, world.bundle(), world.site_secrets)
    site = load_commissioned_site(world.site, world.site_secrets)
    local = site.payload_keys.rotate().current.key_id  # the registrar rotated on its own
    serial = CertSerial.random()
    reissue_site_crl(
        world.site,
        world.site_secrets,
        revoke=(RevokedEntry(serial, datetime.now(UTC) - DAY),),
    )
    result = commission_site(world.site, world.bundle(), world.site_secrets)
    assert result.sequence == 2
    again = load_commissioned_site(world.site, world.site_secrets)
    ring = again.payload_keys.load()
    assert local in ring.keys and ring.current.key_id != local  # HQ's current key wins
    site_crl = x509.load_pem_x509_crl((world.site.current / "site-crl.pem").read_bytes())
    assert site_crl.get_revoked_certificate_by_serial_number(serial.value) is not None
    assert sorted(p.name for p in world.site.path.glob("state-*")) == [
        "state-000001",
        "state-000002",
    ]


def test_site_crl_lists_a_serial_once_whoever_queued_it(world: World) -> None:
    """Two callers (a renewal's hook and the registrar's reconcile tick) can queue the same
    superseded serial in one batch, or one already listed: the CRL lists it once (found by
    the ten-year test: 'serial ... listed twice' made the whole batch fail)."""
    commission_site(world.site, world.bundle(), world.site_secrets)
    serial, other = CertSerial.random(), CertSerial.random()
    when = datetime.now(UTC) - DAY
    twice = (RevokedEntry(serial, when), RevokedEntry(other, when), RevokedEntry(serial, when))
    crl = reissue_site_crl(world.site, world.site_secrets, revoke=twice)
    assert sorted(e.serial_number for e in crl) == sorted((serial.value, other.value))
    again = reissue_site_crl(world.site, world.site_secrets, revoke=(RevokedEntry(other, when),))
    assert sorted(e.serial_number for e in again) == sorted((serial.value, other.value))


# ------------------------------------------------------------------------------ refusals


def test_bundle_for_another_site_is_refused(world: World) -> None:
    world.add_site("site-2")
    assert refused(world, world.bundle(site_id="site-2")) == "wrong_site"


def test_bundle_naming_another_site_inside_is_refused(world: World) -> None:
    """Encrypted to this site's key but naming another site: still refused."""
    other = world.add_site("site-2")
    package = world.bundle(site_id="site-2")
    # re-home the refused site: give site-1's home site-2's keys but keep its id
    for name in ("site-ca", "transport"):
        (world.site.key_path(name)).write_bytes(other.key_path(name).read_bytes())
    assert refused(world, package) == "wrong_site"


@pytest.mark.parametrize("where", ["start", "header", "middle", "end"])
def test_tampered_bundle_is_refused(world: World, where: str) -> None:
    package = bytearray(world.bundle())
    index = {
        "start": 0,
        "header": bytes(package).index(b"devtrust/site-bundle/v1") + 3,
        "middle": len(package) // 2,
        "end": len(package) - 1,
    }[where]
    package[index] ^= 0x40
    reason = refused(world, bytes(package))
    assert reason in {"malformed", "bad_signature", "wrong_content_type", "untrusted_sender"}


def test_truncated_bundle_is_refused(world: World) -> None:
    assert refused(world, world.bundle()[:-10]) == "malformed"


def test_replayed_and_older_bundles_are_refused(world: World) -> None:
    first, second = world.bundle(), world.bundle()
    commission_site(world.site, first, world.site_secrets)
    assert refused(world, first) == "replayed"
    commission_site(world.site, second, world.site_secrets)
    assert refused(world, first) == "replayed"  # rollback to an older bundle


def _foreign_signed(world: World, *, same_root: bool) -> bytes:
    """The genuine payload re-sealed by a key that is not HQ's entitlement signer."""
    transport = world.site.key("transport", world.site_secrets)
    genuine = world.bundle()
    from trustcore.sealed import open_package, peek

    header = peek(genuine)
    cert = header.sender_certificate()
    payload = open_package(
        genuine,
        receiver=transport,
        expected_content_type=CT_SITE_BUNDLE,
        trusted_sender_public=cert.public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 24,
    ).payload
    SiteBundlePayload.decode(payload)
    now = datetime.now(UTC)
    if same_root:  # HQ's revocation signer: right root, wrong role
        signer = world.hq.role_key(HqRole.REVOCATION_SIGNER, world.hq_secrets)
        signer_cert = world.hq.role_certificate(HqRole.REVOCATION_SIGNER)
    else:
        rogue_key = p256("rogue-root-commission")
        rogue = issue_root_ca(
            rogue_key,
            common_name="Rogue",
            organization="Rogue",
            not_before=now - DAY,
            not_after=now + 365 * DAY,
        )
        key = SoftwareKey.ephemeral()
        signer_cert = issue_role_certificate(
            rogue,
            rogue_key,
            key.public_key(),
            role=HqRole.ENTITLEMENT_SIGNER,
            common_name="Rogue signer",
            organization="Rogue",
            not_before=now - DAY,
            not_after=now + 30 * DAY,
        )
        signer = key
    return seal_package(
        content_type=CT_SITE_BUNDLE,
        payload=payload,
        sender=signer,
        sender_cert=signer_cert,
        receiver_public=transport.public_key(),
        sequence=header.sequence + 1,
        created=int(now.timestamp()),
    )


@pytest.mark.parametrize("same_root", [False, True], ids=["foreign-root", "wrong-role"])
def test_bundle_signed_by_non_hq_key_is_refused(world: World, same_root: bool) -> None:
    assert refused(world, _foreign_signed(world, same_root=same_root)) == "untrusted_sender"


def test_stale_root_crl_is_refused(world: World) -> None:
    package = world.bundle()
    later = datetime.now(UTC) + timedelta(days=366)  # past the root CRL's nextUpdate (1 year)
    assert refused(world, package, now=later) == "crl_stale"
    commission_site(world.site, package, world.site_secrets)  # fresh: accepted


def test_garbage_is_refused(world: World) -> None:
    assert refused(world, b"\x00" * 64) == "malformed"


# ------------------------------------------------------------------- secrets stay sealed


def test_payload_keys_never_in_plaintext(world: World) -> None:
    bundle_file = world.base / "bundle.sealed"
    world.bundle()
    bundle_file.write_bytes(world.bundle(rotate_payload_key=True))
    commission_site(world.site, bundle_file.read_bytes(), world.site_secrets)
    store = HqStore.open(world.hq.db_path)
    keys, _ = site_payload_keys(store, kms_key(world.hq, world.hq_secrets), SITE)
    store.close()
    assert len(keys) == 2
    needles = []
    for k in keys:
        needles += [k.key, k.key.hex().encode(), k.key.hex().upper().encode()]
    files = [p for p in world.base.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "hq.sqlite" for p in files)
    assert any(p.name == "payload-keys.cbor" for p in files)
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"payload key in clear in {path}"


# ------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w")
    runner = CliRunner()
    hq_home = str(world.hq.path)
    hq_pass = ["--passphrase-file", str(world.base / "hq.pass")]
    site_pass = ["--passphrase-file", str(world.base / "site.pass")]
    site_home = tmp_path / "site-cli"
    r = runner.invoke(
        registrar_main,
        [
            "init",
            "--home",
            str(site_home),
            "--site-id",
            "site-cli",
            "--root",
            str(world.hq.certs_dir / "root-ca.pem"),
            *site_pass,
        ],
    )
    assert r.exit_code == 0, r.output
    root_der = world.hq.root_certificate().public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(root_der).hexdigest() in r.output
    r = runner.invoke(
        hq_main, ["site", "enrol", "--home", hq_home, str(site_home / "enrolment.cbor"), *hq_pass]
    )
    assert r.exit_code == 0 and "enrolled" in r.output, r.output
    bundle = tmp_path / "bundle.sealed"
    r = runner.invoke(
        hq_main,
        [
            "site",
            "bundle",
            "--home",
            hq_home,
            "--site",
            "site-cli",
            "--devices-from-station",
            STATION,
            "--admit-station",
            STATION,
            "--admit-product",
            "thermo",
            "--out",
            str(bundle),
            *hq_pass,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "3 device(s)" in r.output and bundle.exists()
    r = runner.invoke(
        registrar_main, ["commission", "--home", str(site_home), str(bundle), *site_pass]
    )
    assert r.exit_code == 0, r.output
    assert "commissioned" in r.output and "3 device(s)" in r.output
    before = snapshot(site_home)
    r = runner.invoke(
        registrar_main, ["commission", "--home", str(site_home), str(bundle), *site_pass]
    )
    assert r.exit_code == 2 and "REFUSED" in r.output and "replayed" in r.output
    assert snapshot(site_home) == before
    # a bundle for another site: refused with a clear message
    other = tmp_path / "other.sealed"
    r = runner.invoke(
        hq_main,
        [
            "site",
            "bundle",
            "--home",
            hq_home,
            "--site",
            SITE,
            "--out",
            str(other),
            "--device",
            "TH-000001",
            *hq_pass,
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        registrar_main, ["commission", "--home", str(site_home), str(other), *site_pass]
    )
    assert r.exit_code == 2 and "wrong_site" in r.output and "another site" in r.output
    assert SiteHome.open(site_home).commissioned


async def test_commissioned_site_serves_the_embedded_broker(world: World) -> None:
    """The files commissioning wrote are what the broker and the registrar client need:
    the registrar identity connects to the operational listener over mutual TLS, its
    subscription to every device's telemetry (the filter ``registrar run`` uses) is
    granted, and a reading published on a device's telemetry topic reaches it."""
    import aiomqtt
    from paho.mqtt.reasoncodes import ReasonCode

    from registrar.broker.embedded import EmbeddedBroker

    commission_site(world.site, world.bundle(), world.site_secrets)
    settings = broker_settings(world.site, world.site_secrets, workdir=world.base / "run")
    site = load_commissioned_site(world.site, world.site_secrets)
    broker = EmbeddedBroker(settings)
    await broker.start()
    try:
        ep = broker.operational_endpoint
        ctx = ssl.create_default_context(cafile=str(world.site.root_path))
        ctx.load_cert_chain(
            site.client_cert, site.client_key, password=settings.tls.server_key_passphrase
        )
        async with aiomqtt.Client(ep.host, ep.port, tls_context=ctx, identifier="r") as client:
            granted = await client.subscribe(every_device_filter(TELEMETRY_LEVEL), qos=1)
            assert [code.value if isinstance(code, ReasonCode) else code for code in granted] == [1]
            topic = device_topic(DeviceId("TH-000001"), TELEMETRY_LEVEL)
            await client.publish(topic, b"reading", qos=1)
            message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
            assert (message.topic.value, message.payload) == (topic, b"reading")
    finally:
        await broker.stop()
