"""Site CA rollover without processes: the request and renew-now formats, HQ's checks, the
site's begin / activate (commission) / retire steps on real site homes, and what standard
tools (``openssl verify``) say about the certificates of each step.

The same flow with real ``registrar run`` processes on both brokers and devices that stay
online throughout: ``tests/registrar/test_site_rollover_live.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device_sim.agent import DeviceAgent
from device_sim.client import (
    DeviceClient,
    DeviceCredentials,
    DeviceRegistrationError,
    Registered,
    SoftwareKeys,
    TlsIdentity,
)
from hq.cli import main as hq_main
from hq.site import SiteError, rollover_site_ca
from registrar.app import AppSettings, running
from registrar.cli import main as registrar_main
from registrar.errors import CommissionError
from registrar.rollover import (
    REQUEST_FILE,
    RolloverError,
    begin_rollover,
    dependents,
    migration_requested,
    retire_site_ca,
    rollover_status,
)
from registrar.run_dir import store_path
from registrar.service import SiteAuthority
from registrar.site import commission_site, load_commissioned_site, reissue_site_crl
from registrar.store import DeviceRecord, Registration, Store
from signers.software import SoftwareKey
from tests.fixtures.pki import Pki
from tests.fixtures.renewal import Facts as RenewalFacts_
from tests.fixtures.renewal import ldevid as renewal_ldevid
from tests.fixtures.renewal import renewal as renewal_request
from tests.fixtures.site import SITE, World, world, world_template
from trustcore.crl import RevokedEntry
from trustcore.csr import build_csr
from trustcore.identity import CertSerial, DeviceId, SiteId
from trustcore.keys import key_id
from trustcore.messages import SiteEnrolment
from trustcore.profiles import issue_secondary_certificate, issue_site_ca
from trustcore.registration import RegistrationError
from trustcore.renewal import LdevidPolicy, parse_renewal_request, verify_renewal
from trustcore.site_rollover import (
    SiteCaRollover,
    SiteRolloverError,
    build_renew_now,
    parse_renew_now,
    renew_now_body,
    site_ca_generation,
)

__all__ = ["world", "world_template"]

PEM = serialization.Encoding.PEM
DAY = timedelta(days=1)


def _pem_file(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))
    return path


def openssl_verify(tmp: Path, root: x509.Certificate, ca: x509.Certificate, leaf: x509.Certificate,
                   *extra: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [
            "openssl", "verify", *extra,
            "-CAfile", str(_pem_file(tmp / "root.pem", root)),
            "-untrusted", str(_pem_file(tmp / "ca.pem", ca)),
            str(_pem_file(tmp / "leaf.pem", leaf)),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def ldevid(ca: x509.Certificate, key: SoftwareKey, device: str, days: int = 30) -> x509.Certificate:
    now = datetime.now(UTC)
    return issue_secondary_certificate(
        ca,
        key.private_key(),
        SoftwareKey.ephemeral().public_key(),
        device_id=DeviceId(device),
        organization="Acme Devices",
        not_before=max(now - DAY, ca.not_valid_before_utc),
        not_after=now + days * DAY,
    )


def record(device: str, cert: x509.Certificate, status: str = "registered") -> DeviceRecord:
    return DeviceRecord(
        DeviceId(device), None, CertSerial(0xA1), CertSerial(cert.serial_number),
        cert.public_bytes(serialization.Encoding.DER), b"", b"\0" * 8, 0, 1, status,
    )  # fmt: skip


def activated(world: World) -> tuple[x509.Certificate, x509.Certificate]:
    """Commission bundle 1, roll over (site request, HQ certificate, bundle 2, commission):
    returns (old CA, new CA)."""
    commission_site(world.site, world.bundle(), world.site_secrets)
    old = load_commissioned_site(world.site, world.site_secrets).site_ca_cert
    begun = begin_rollover(world.site, world.site_secrets)
    rollover_site_ca(world.hq, begun.request_path.read_bytes(), world.hq_secrets)
    result = commission_site(world.site, world.bundle(), world.site_secrets)
    assert "rolled over" in result.warnings[0]
    new = load_commissioned_site(world.site, world.site_secrets).site_ca_cert
    return old, new


# ------------------------------------------------------------------------------ formats


def test_rollover_request_round_trip_and_refusals() -> None:
    site, current, new, transport = (
        SiteId("site-1"), SoftwareKey.ephemeral(), SoftwareKey.ephemeral(),
        SoftwareKey.ephemeral(),
    )  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site.value)])
    enrolment = SiteEnrolment.create(site, build_csr(new, name), new, transport.public_key())
    request = SiteCaRollover.create(enrolment, current)
    decoded = SiteCaRollover.decode(request.encode())
    assert decoded == request
    enrolled = current.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert decoded.verify(enrolled).site_id == site
    # signed by someone else's key, or presented for another enrolled key: refused
    thief = SiteCaRollover.create(enrolment, SoftwareKey.ephemeral())
    with pytest.raises(SiteRolloverError) as e:
        thief.verify(enrolled)
    assert e.value.reason == "wrong_site_key"
    forged = SiteCaRollover(request.enrolment, request.previous_ca, thief.continuity_sig)
    with pytest.raises(SiteRolloverError) as e:
        forged.verify(enrolled)
    assert e.value.reason == "bad_signature"
    same = SiteEnrolment.create(site, build_csr(current, name), current, transport.public_key())
    with pytest.raises(SiteRolloverError) as e:
        SiteCaRollover.create(same, current).verify(enrolled)
    assert e.value.reason == "key_reuse"


def test_renew_now_is_verified_with_the_devices_site_ca(world: World) -> None:
    old, new = activated(world)
    site = load_commissioned_site(world.site, world.site_secrets)
    assert site.retiring_ca_key is not None
    device = DeviceId("TH-000001")
    message = build_renew_now(
        device_id=device, issued=7, issuing_ca=new, signer=site.retiring_ca_key
    )
    renew = parse_renew_now(message, device_id=device, site_ca=old)
    assert renew.issuing_ca == key_id(new.public_key())  # type: ignore[arg-type]
    for kw, reason in (
        ({"site_ca": new}, "bad_signature"),  # signed by the old CA, not the new one
        ({"device_id": DeviceId("TH-000002")}, "device_mismatch"),
        ({"newer_than": 7}, "replayed"),
    ):
        args = {"device_id": device, "site_ca": old, **kw}
        with pytest.raises(SiteRolloverError) as e:
            parse_renew_now(message, **args)  # type: ignore[arg-type]
        assert e.value.reason == reason
    with pytest.raises(SiteRolloverError) as e:
        parse_renew_now(b"\xa0" + message, device_id=device, site_ca=old)
    assert e.value.reason == "malformed"


# ------------------------------------------------------------------------ the whole flow


def test_rollover_flow_on_files(world: World, tmp_path: Path) -> None:
    old, new = activated(world)
    root = world.site.root_certificate()
    assert site_ca_generation(old) == 1 and site_ca_generation(new) == 2
    assert old.subject != new.subject and new.public_key() != old.public_key()
    state = world.site.current
    # both CAs trusted on the operational listener; both CRLs fresh, same entries
    ops = x509.load_pem_x509_certificates((state / "operational-cas.pem").read_bytes())
    assert [c.subject for c in ops] == [new.subject, old.subject]
    site = load_commissioned_site(world.site, world.site_secrets)
    assert site.site_ca_cert == new and site.retiring_ca_cert == old
    assert json.loads((state / "commission.json").read_text())["retiring_ca_key"] == "site-ca"
    assert not world.site.rollover_path.exists()  # the pending rollover was consumed
    # broker and registrar-client certificates moved to the new CA
    broker = x509.load_pem_x509_certificates((state / "broker.pem").read_bytes())
    assert broker[0].issuer == new.subject and broker[1] == new
    assert openssl_verify(tmp_path, root, new, broker[0]).returncode == 0
    # new LDevIDs (from the issuing CA) verify to the root through the new CA, old ones
    # through the old CA (overlap), and each CA's CRL covers a revoked serial
    fresh = ldevid(new, site.site_ca_key, "TH-000001")
    assert openssl_verify(tmp_path, root, new, fresh).stdout.strip().endswith("OK")
    assert site.retiring_ca_key is not None
    on_old = ldevid(old, site.retiring_ca_key, "TH-000002")
    assert openssl_verify(tmp_path, root, old, on_old).stdout.strip().endswith("OK")
    assert openssl_verify(tmp_path, root, new, on_old).returncode != 0
    serial = CertSerial.random()
    reissue_site_crl(
        world.site, world.site_secrets, revoke=(RevokedEntry(serial, datetime.now(UTC) - DAY),)
    )
    site_crl = x509.load_pem_x509_crl((state / "site-crl.pem").read_bytes())
    old_crl = x509.load_pem_x509_crl((state / "retiring-crl.pem").read_bytes())
    assert site_crl.issuer == new.subject and old_crl.issuer == old.subject
    for crl, ca in ((site_crl, new), (old_crl, old)):
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        assert crl.get_revoked_certificate_by_serial_number(serial.value) is not None
    load_commissioned_site(world.site, world.site_secrets).chain_verifier()
    # a later bundle keeps the overlap (both CAs, both CRLs carried forward)
    commission_site(world.site, world.bundle(), world.site_secrets)
    again = load_commissioned_site(world.site, world.site_secrets)
    assert again.site_ca_cert == new and again.retiring_ca_cert == old
    kept = x509.load_pem_x509_crl((world.site.current / "retiring-crl.pem").read_bytes())
    assert kept.get_revoked_certificate_by_serial_number(serial.value) is not None
    # no second rollover during the overlap
    with pytest.raises(RolloverError) as e:
        begin_rollover(world.site, world.site_secrets)
    assert e.value.reason == "rollover_in_progress"
    # retire: refused while a live LDevID of the old CA exists; then done, key destroyed
    live = ldevid(old, again.retiring_ca_key, "TH-000002")  # type: ignore[arg-type]
    records = [record("TH-000001", fresh), record("TH-000002", live)]
    assert [r.device_id.value for r in dependents(records, old, datetime.now(UTC))] == [
        "TH-000002"
    ]
    status = rollover_status(world.site, records)
    assert status["devices_on_retiring"] == 1 and status["retiring_dependents"] == ["TH-000002"]
    with pytest.raises(RolloverError) as e:
        retire_site_ca(world.site, records)
    assert e.value.reason == "ca_in_use" and "TH-000002" in str(e.value)
    assert world.site.key_path("site-ca").exists()
    # revoked or expired certificates do not hold the CA back
    expired = datetime.now(UTC) + 31 * DAY
    assert dependents(records, old, expired) == []
    assert dependents([record("TH-000002", live, "revoked")], old, datetime.now(UTC)) == []
    result = retire_site_ca(world.site, [record("TH-000001", fresh)])
    assert result.key_name == "site-ca" and not world.site.key_path("site-ca").exists()
    state = world.site.current
    assert not (state / "retiring-ca.pem").exists()
    assert [c.subject for c in x509.load_pem_x509_certificates(
        (state / "operational-cas.pem").read_bytes())] == [new.subject]  # fmt: skip
    assert old.subject.rfc4514_string() not in (state / "crls.pem").read_text()
    after = load_commissioned_site(world.site, world.site_secrets)
    assert after.retiring_ca_cert is None and after.site_ca_cert == new
    after.chain_verifier()
    # the site keeps working: CRL re-issue, later bundles, a next rollover
    reissue_site_crl(world.site, world.site_secrets)
    commission_site(world.site, world.bundle(), world.site_secrets)
    assert begin_rollover(world.site, world.site_secrets).key_name == "site-ca-g3"
    with pytest.raises(RolloverError) as e:
        retire_site_ca(world.site, [])
    assert e.value.reason == "nothing_to_retire"


def test_begin_is_idempotent_and_hq_checks_continuity(world: World) -> None:
    with pytest.raises(RolloverError) as e:
        begin_rollover(world.site, world.site_secrets)
    assert e.value.reason == "not_commissioned"
    commission_site(world.site, world.bundle(), world.site_secrets)
    first = begin_rollover(world.site, world.site_secrets)
    data = first.request_path.read_bytes()
    again = begin_rollover(world.site, world.site_secrets)
    assert (again.status, again.key_name, again.request_path.read_bytes()) == (
        "pending", first.key_name, data,
    )  # fmt: skip
    # HQ: a request not signed by the enrolled key is refused, the real one accepted once
    request = SiteCaRollover.decode(data)
    stranger = SiteCaRollover.create(request.site_enrolment(), SoftwareKey.ephemeral())
    with pytest.raises(SiteError) as hq_refusal:
        rollover_site_ca(world.hq, stranger.encode(), world.hq_secrets)
    assert hq_refusal.value.reason == "wrong_site_key"
    with pytest.raises(SiteError) as hq_refusal:
        rollover_site_ca(world.hq, b"\x00junk", world.hq_secrets)
    assert hq_refusal.value.reason == "malformed"
    done = rollover_site_ca(world.hq, data, world.hq_secrets)
    assert done.status == "rolled_over"
    assert rollover_site_ca(world.hq, data, world.hq_secrets).status == "already_rolled_over"
    assert done.site_ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        f"Site CA {SITE} G2"
    )
    # a site that lost its pending key cannot take the new CA: refused, nothing changed
    pending = world.site.rollover_path.read_bytes()
    world.site.rollover_path.unlink()
    with pytest.raises(CommissionError) as e2:
        commission_site(world.site, world.bundle(), world.site_secrets)
    assert e2.value.reason == "wrong_site_key"
    world.site.rollover_path.write_bytes(pending)
    commission_site(world.site, world.bundle(), world.site_secrets)
    assert load_commissioned_site(world.site, world.site_secrets).site_ca_cert == (
        done.site_ca_cert
    )


def test_rollover_cli_end_to_end(world: World, tmp_path: Path) -> None:
    """The exact operator commands: registrar rollover-ca, hq site rollover, hq site bundle,
    registrar commission, registrar rollover-ca --status / --retire."""
    commission_site(world.site, world.bundle(), world.site_secrets)
    runner = CliRunner()
    site = ["--home", str(world.site.path), "--passphrase-file", str(world.base / "site.pass")]
    hq = ["--home", str(world.hq.path), "--passphrase-file", str(world.base / "hq.pass")]

    def run(main: object, *args: str, code: int = 0) -> str:
        result = runner.invoke(main, list(args))  # type: ignore[arg-type]
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return result.output

    out = run(registrar_main, "rollover-ca", *site, "--out", str(tmp_path / "req.cbor"))
    assert "rollover begun" in out and (world.site.path / REQUEST_FILE).exists()
    # --out naming a file that exists: a one-line error, not a traceback; the file is kept
    before = (tmp_path / "req.cbor").read_bytes()
    again = runner.invoke(
        registrar_main, ["rollover-ca", *site, "--out", str(tmp_path / "req.cbor")]
    )
    assert isinstance(again.exception, SystemExit) and again.exit_code == 1, again.output
    assert "already exists" in again.output and (tmp_path / "req.cbor").read_bytes() == before
    out = run(
        hq_main,
        "site",
        "rollover",
        *hq,
        "--out",
        str(tmp_path / "g2.pem"),
        str(tmp_path / "req.cbor"),
    )
    assert "rolled over" in out and f"Site CA {SITE} G2" in out
    bundle = tmp_path / "b.bundle"
    run(
        hq_main,
        "site",
        "bundle",
        *hq,
        "--site",
        SITE,
        "--device",
        "TH-000001",
        "--out",
        str(bundle),
    )
    out = run(registrar_main, "commission", *site, str(bundle))
    assert "rolled over" in out
    doc = json.loads(run(registrar_main, "rollover-ca", *site, "--status", "--json"))
    assert doc["issuing"]["key"] == "site-ca-g2" and doc["retiring"]["key"] == "site-ca"
    assert doc["devices_on_retiring"] == 0
    out = run(registrar_main, "rollover-ca", *site, "--retire")
    assert "retired" in out and "destroyed" in out
    out = run(registrar_main, "rollover-ca", *site, "--retire", code=2)
    assert "nothing_to_retire" in out
    out = run(registrar_main, "rollover-ca", *site, "--migrate-all", code=1)
    assert "no registrar is running" in out
    # garbage at HQ: a clear one-line error, exit 1
    (tmp_path / "junk").write_bytes(b"junk")
    out = run(hq_main, "site", "rollover", *hq, str(tmp_path / "junk"), code=1)
    assert out.startswith("error: malformed")


def test_key_updates_are_signed_by_the_ca_the_device_knows(world: World) -> None:
    old, new = activated(world)
    site = load_commissioned_site(world.site, world.site_secrets)
    assert site.retiring_ca_key is not None
    authority = SiteAuthority(
        new, site.site_ca_key, "Acme", retiring=((old, site.retiring_ca_key),)
    )
    der = serialization.Encoding.DER
    on_old = ldevid(old, site.retiring_ca_key, "TH-000001").public_bytes(der)
    on_new = ldevid(new, site.site_ca_key, "TH-000002").public_bytes(der)
    assert authority.signer_for(on_old) is site.retiring_ca_key
    assert authority.signer_for(on_new) is site.site_ca_key
    assert authority.signer_for(b"junk") is site.site_ca_key


async def test_an_expired_retiring_ca_is_retired_automatically_and_expiry_is_announced(
    world: World,
) -> None:
    commission_site(world.site, world.bundle(), world.site_secrets)
    begun = begin_rollover(world.site, world.site_secrets)
    # HQ signs two seconds "later", so the new CA outlives the old one by that much
    later = datetime.now(UTC) + timedelta(seconds=2)
    rollover_site_ca(world.hq, begun.request_path.read_bytes(), world.hq_secrets, now=later)
    commission_site(world.site, world.bundle(), world.site_secrets)
    site = load_commissioned_site(world.site, world.site_secrets)
    old = site.retiring_ca_cert
    assert old is not None and site.site_ca_cert.not_valid_after_utc > old.not_valid_after_utc
    past_old = old.not_valid_after_utc + timedelta(seconds=1)
    # the site CRL can still be re-issued after the old CA expired (its CRL is kept as is)
    before = (world.site.current / "retiring-crl.pem").read_bytes()
    saved = {n: (world.site.current / n).read_bytes() for n in ("crls.pem", "site-crl.pem")}
    reissue_site_crl(world.site, world.site_secrets, now=past_old)
    assert (world.site.current / "retiring-crl.pem").read_bytes() == before
    for name, data in saved.items():  # back to today's CRLs (those are dated in year 5)
        (world.site.current / name).write_bytes(data)
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(world.site, world.site_secrets, settings) as app:
        assert not any("site CA expires" in a for a in app.check_crls())
        year_5 = site.site_ca_cert.not_valid_after_utc - timedelta(days=30)
        assert any(
            "site CA expires" in a and "rollover-ca" in a for a in app.check_crls(now=year_5)
        )
        assert not await app.retire_expired_ca()  # still valid now: nothing happens
        assert app.site is not None and app.site.retiring_ca_cert == old
        assert await app.retire_expired_ca(now=past_old)
        assert app.site.retiring_ca_cert is None
        assert app.service is not None and app.service.site_authority.retiring == ()
    assert not world.site.key_path("site-ca").exists()


def _doc_vector(name: str) -> bytes:
    text = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    match = re.search(rf"<!-- vector: {re.escape(name)} -->\s*```hex\n(.*?)```", text, re.S)
    assert match, name
    return bytes.fromhex("".join(match.group(1).split()))


def test_documented_vectors() -> None:
    request = SiteCaRollover(b"\x01\x02", b"\x03\x04", b"\x05\x06")
    assert request.encode() == _doc_vector("site-ca-rollover")
    assert SiteCaRollover.decode(_doc_vector("site-ca-rollover")) == request
    body = renew_now_body(DeviceId("TH-000001"), 1700000000, bytes(range(32)))
    assert body == _doc_vector("renew-now-body")


async def test_a_restarted_registrar_publishes_pending_renew_commands_again(
    world: World,
) -> None:
    """The brokers keep retained messages in memory: after `--migrate-all` and a restart, a
    device still on the old CA (offline during both) still finds its renew command."""
    old, new = activated(world)
    site = load_commissioned_site(world.site, world.site_secrets)
    assert site.retiring_ca_key is not None
    device, key = DeviceId("TH-000001"), SoftwareKey.ephemeral()
    now = datetime.now(UTC)
    cert = issue_secondary_certificate(
        old, site.retiring_ca_key.private_key(), key.public_key(), device_id=device,
        organization="Acme Devices", not_before=max(now - DAY, old.not_valid_before_utc),
        not_after=now + 30 * DAY,
    )  # fmt: skip
    store = await Store.open(store_path(world.site))
    wrap = (
        SoftwareKey.ephemeral()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    await store.record_registration(
        Registration(
            device,
            None,
            CertSerial(0xA1),
            CertSerial(cert.serial_number),
            cert.public_bytes(serialization.Encoding.DER),
            key_id(key.public_key()),
            wrap,
            b"\0" * 8,
            b"\1" * 32,
            b"",
            b"\2" * 32,
            int(now.timestamp()),
            int(now.timestamp()),
        )
    )
    await store.close()
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(world.site, world.site_secrets, settings) as app:
        assert await app.migrate_ca() == 1
    assert migration_requested(world.site)
    async with running(world.site, world.site_secrets, settings) as app:
        endpoint = app.operational_endpoint
        root_pem = world.site.root_certificate().public_bytes(PEM)
        tls = TlsIdentity((cert, old), key.private_key()).context(root_pem)
        async with aiomqtt.Client(
            endpoint.host, endpoint.port, identifier=device.value, tls_context=tls
        ) as client:
            await client.subscribe(f"devices/{device.value}/rollover", qos=1)
            message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
        assert isinstance(message.payload, bytes)
        renew = parse_renew_now(message.payload, device_id=device, site_ca=old)
        assert renew.issuing_ca == key_id(new.public_key())  # type: ignore[arg-type]
        # the simulated device obeys it; a renewal that fails leaves it in service on its
        # current LDevID and is retried only after a back-off
        assert app.keyring is not None
        payload_key = app.keyring.current
        sim = DeviceClient(
            DeviceCredentials(device, cert, (old,), key, (world.site.root_certificate(),)),
            SoftwareKeys(),
        )
        sim.registered = Registered(
            cert, old, key, SoftwareKey.ephemeral(), {payload_key.key_id: payload_key},
            payload_key.key_id,
        )  # fmt: skip
        attempts: list[float] = []

        async def failing(_: DeviceClient) -> None:
            attempts.append(time.monotonic())
            raise DeviceRegistrationError("registrar unreachable", reason="timeout", retry=True)

        agent = DeviceAgent(sim, endpoint, renew=failing, renew_backoff=30.0)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        deadline = time.monotonic() + 10
        while not (attempts and agent.connected.is_set() and agent.stats.telemetry >= 5):
            assert time.monotonic() < deadline, agent.stats
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert len(attempts) == 1 and agent.stats.renewals == 0
        # the device's error names its reason, as every ReasonedError does
        assert agent.stats.errors == ["renew: timeout: registrar unreachable"]
        # the device still depends on the old CA: it cannot retire yet (the request stays)
        with pytest.raises(RolloverError) as e:
            await app.retire_ca()
        assert e.value.reason == "ca_in_use"
    assert migration_requested(world.site)


def test_an_ldevid_of_a_retiring_site_ca_renews_without_the_rate_limit(pki: Pki) -> None:
    """Renewal's rate limit (``min_interval``) does not hold back a rollover migration: an
    LDevID of a retiring site CA renews at once; one of the issuing CA is still limited."""
    now = pki.now
    current = renewal_ldevid(pki, "dev-500001", start=now - timedelta(minutes=1))
    facts = RenewalFacts_(current.cert.serial_number, issued_at=now - timedelta(minutes=1))
    request = parse_renewal_request(renewal_request(pki, current)[0])
    next_ca = issue_site_ca(
        pki.root, pki.root_key, SoftwareKey.ephemeral().public_key(), site_id=pki.site_id,
        organization="Acme Devices", not_before=max(now - DAY, pki.root.not_valid_before_utc),
        not_after=now + 300 * DAY, generation=2,
    )  # fmt: skip

    def decide(site_cas: list[x509.Certificate]) -> None:
        verify_renewal(
            request, topic_device_id=DeviceId("dev-500001"), site_cas=site_cas,
            facts=facts.build(), now=now, policy=LdevidPolicy(),
        )  # fmt: skip

    with pytest.raises(RegistrationError) as e:
        decide([pki.site_ca])  # its CA still issues: rate-limited
    assert e.value.reason == "too_early"
    decide([next_ca, pki.site_ca])  # after a rollover: renewed at once
