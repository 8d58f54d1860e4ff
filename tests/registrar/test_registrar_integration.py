"""``registrar run`` end to end, on BOTH brokers (embedded amqtt, Mosquitto), as a real
process on a site commissioned from a real HQ bundle, with swtpm devices.

Each broker gets one registrar process for the whole module (its own copy of the site and
its own database); devices are built once. What is real: the HQ bundle, commissioning,
the CLI (``registrar run / status / devices / revoke / import-revocations /
rotate-payload-key / send-command``), the brokers, mTLS, the registration protocol, the
device keys in swtpm (factory key, LDevID key, payload-key unwrap). A swtpm device's TLS
identities are its IDevID and LDevID with their TPM keys (``signers.tpm_tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from device_sim.client import (
    DeviceClient,
    DeviceCredentials,
    DeviceRegistrationError,
    SoftwareKeys,
    TlsIdentity,
)
from registrar.app import AppSettings, RegistrarApp, running
from registrar.broker import Endpoint
from registrar.cli import main as registrar_main
from registrar.revocation import RevocationAwareVerifier
from registrar.site import SITE_CRL_VALIDITY, SiteHome, SiteSecrets
from signers.software import SoftwareKey
from signers.tpm import TpmKey
from tests.fixtures.mosquitto_site import FOREIGN_FILTERS
from tests.fixtures.readiness import (
    LINE_BUFFERED,
    mosquitto_sub_subscribed,
    without_debug_lines,
)
from tests.fixtures.registrar_run import (
    DAY,
    Base,
    Running,
    base,
    factory_certificate,
    handshake_refused,
    refused_at_tls,
    registrar,
    software_device,
    tpm_device,
    until_cut,
    write_tls_files,
)
from tests.fixtures.site import STATION
from trustcore.csr import build_device_csr
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.keys import Signer
from trustcore.payload import seal_payload
from trustcore.profiles import HqRole
from trustcore.registration import (
    RegistrationDenied,
    RegistrationGranted,
    build_request,
    parse_response,
)
from trustcore.revocation import RevocationList, RevokedDevice, seal_revocation_list
from trustcore.topics import registration_request_topic, registration_response_topic

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

__all__ = ["base", "registrar"]  # fixtures (tests/fixtures/registrar_run.py)


# ---------------------------------------------------------------------------- the world


# ------------------------------------------------------------------------- the registrar


# ---------------------------------------------------------------------------------- helpers


async def exchange(
    endpoint: Endpoint, tls: ssl.SSLContext, device_id: DeviceId, payload: bytes
) -> bytes:
    """Publish raw bytes on a device's request topic; return the first response."""
    async with aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=device_id.value,
        tls_context=tls,
        protocol=aiomqtt.ProtocolVersion.V311,
    ) as client:
        await client.subscribe(registration_response_topic(device_id), qos=1)
        await client.publish(registration_request_topic(device_id), payload, qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
        assert isinstance(message.payload, bytes)
        return message.payload


def request_for(
    device: DeviceClient,
    *,
    nonce: bytes | None = None,
    csr_key: Signer | None = None,
    signer: Signer | None = None,
    when: int | None = None,
) -> tuple[bytes, Signer]:
    """A registration request with chosen defects (defaults: a correct one)."""
    creds = device.credentials
    ldevid_key = device.keys.new_signing_key()
    wrap = device.keys.new_ecdh_key()
    request = build_request(
        device_id=creds.device_id,
        nonce=nonce or os.urandom(32),
        time=when or int(time.time()),
        csr_der=build_device_csr(csr_key or ldevid_key, creds.device_id),
        wrap_key=wrap.public_key(),
        idevid_der=creds.idevid.public_bytes(serialization.Encoding.DER),
        chain_der=[c.public_bytes(serialization.Encoding.DER) for c in creds.chain],
        factory_key=signer or creds.factory_key,
    )
    return request, csr_key or ldevid_key


async def decide(
    run: Running, base: Base, device: DeviceClient, request: bytes, ldevid_key: Signer
) -> RegistrationGranted | RegistrationDenied:
    response = await exchange(
        run.registration, device.registration_context(), device.device_id, request
    )
    parsed_nonce, digest = _nonce_digest(request)
    return parse_response(
        response,
        device_id=device.device_id,
        nonce=parsed_nonce,
        request_digest=digest,
        ldevid_public_key=ldevid_key.public_key(),
        roots=[x509.load_pem_x509_certificate(base.root_pem)],
        now=datetime.now(UTC),
    )


def _nonce_digest(request: bytes) -> tuple[bytes, bytes]:
    from trustcore.registration import parse_request

    parsed = parse_request(request)
    return parsed.nonce, parsed.digest


# ------------------------------------------------------------------------------------ tests


async def test_register_reconnect_telemetry_and_command(base: Base, registrar: Running) -> None:
    """Two swtpm devices register at once, reconnect with their secondary certificates,
    send encrypted telemetry that the registrar decrypts, and get an encrypted command."""
    a = tpm_device(base, "TH-000001", base.tpms[0])  # listed in the manifest
    b = tpm_device(base, "TH-000102", base.tpms[1])  # admitted by the station rule
    reg_a, reg_b = await asyncio.gather(
        a.register(registrar.registration), b.register(registrar.registration)
    )
    assert reg_a.ldevid.issuer == base.site_ca.subject
    assert reg_a.ldevid.public_key() == reg_a.ldevid_key.public_key()
    assert isinstance(reg_a.ldevid_key, TpmKey) and isinstance(reg_a.wrap_key, TpmKey)
    current = (await registrar.status())["instance"]["payload_key"]
    assert reg_a.current_key_id.hex() == current == reg_b.current_key_id.hex()
    async with (
        a.operational(registrar.operational) as sa,
        b.operational(registrar.operational) as sb,
    ):
        reading = b"temperature=21.5;t=" + str(time.time()).encode()
        await sa.publish_telemetry(reading)
        assert await registrar.telemetry_seen("TH-000001", reading) == current
        await registrar.acli("send-command", "TH-000001", "set-point 19", passphrase=False)
        assert await asyncio.wait_for(sa.commands.get(), 5) == b"set-point 19"
        # b never sees a's command: the registrar's next command, to b, is the first b gets
        # (one publisher, one subscriber session: delivered in order)
        await registrar.acli("send-command", "TH-000102", "marker", passphrase=False)
        assert await asyncio.wait_for(sb.commands.get(), 5) == b"marker"
        assert sb.commands.empty()
    devices = json.loads(await registrar.acli("devices", "--json", passphrase=False))
    by_id = {d["device_id"]: d for d in devices}
    assert by_id["TH-000001"]["status"] == by_id["TH-000102"]["status"] == "registered"
    assert by_id["TH-000001"]["ldevid_serial"] == format(reg_a.ldevid.serial_number, "x")
    status = await registrar.status()
    assert status["running"] and status["instance"]["listeners"]["operational"]["port"] == (
        registrar.operational.port
    )
    recent = {e["device_id"] for e in status["last_registrations"]}
    assert {"TH-000001", "TH-000102"} <= recent


async def test_every_refusal_and_the_registrar_keeps_serving(
    base: Base, registrar: Running
) -> None:
    run = registrar
    ghost_ca_key = SoftwareKey.ephemeral()
    # unknown issuer: a CA that looks like the station's, not in the bundle
    rogue_ca = (
        x509.CertificateBuilder()
        .subject_name(base.world.station_ca.subject)
        .issuer_name(base.world.station_ca.issuer)
        .public_key(ghost_ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - DAY)
        .not_valid_after(datetime.now(UTC) + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ghost_ca_key.public_key()), critical=False
        )
        .sign(ghost_ca_key.private_key(), hashes.SHA256())
    )

    def with_idevid(device_id: str, cert_key: SoftwareKey, cert: x509.Certificate) -> DeviceClient:
        """A device whose TLS identity is genuine but whose request carries ``cert``."""
        genuine = software_device(base, device_id)
        creds = DeviceCredentials(
            DeviceId(device_id), cert, (base.world.station_ca,), cert_key, genuine.credentials.roots
        )
        tls = TlsIdentity.from_signer(
            (genuine.credentials.idevid, base.world.station_ca), genuine.credentials.factory_key
        )
        return DeviceClient(creds, SoftwareKeys(), registration_tls=tls)

    async def reason(device: DeviceClient, **kw: Any) -> str:
        request, key = request_for(device, **kw)
        result = await decide(run, base, device, request, key)
        assert isinstance(result, RegistrationDenied), result
        return result.reason

    k1 = SoftwareKey.ephemeral()
    rogue = factory_certificate(
        base, "TH-000201", k1, issuer=(rogue_ca, ghost_ca_key.private_key())
    )
    assert await reason(with_idevid("TH-000201", k1, rogue)) == "untrusted"

    k2 = SoftwareKey.ephemeral()
    station_start = base.world.station_ca.not_valid_before_utc
    assert station_start < datetime.now(UTC) - timedelta(seconds=2)
    old = factory_certificate(base, "TH-000202", k2, not_after=station_start + timedelta(seconds=1))
    assert await reason(with_idevid("TH-000202", k2, old)) == "expired"

    outsider = software_device(base, "XX-000203")  # station-1, but no rule admits XX-
    assert await reason(outsider) == "not_in_manifest"

    impostor = software_device(base, "TH-000204")
    assert await reason(impostor, signer=SoftwareKey.ephemeral()) == "bad_signature"

    first = software_device(base, "TH-000205")
    nonce = os.urandom(32)
    request, key = request_for(first, nonce=nonce)
    granted = await decide(run, base, first, request, key)
    assert isinstance(granted, RegistrationGranted)
    assert await reason(first, nonce=nonce, when=int(time.time()) + 1) == "replayed_nonce"

    thief = software_device(base, "TH-000206")  # presents TH-000205's certified key
    assert await reason(thief, csr_key=key) == "csr_foreign_key"

    # HQ revokes a factory certificate: import the signed list through the CLI (live).
    listed = software_device(base, "TH-000207")
    hq, secrets = base.world.hq, base.world.hq_secrets
    package = seal_revocation_list(
        RevocationList(
            2,
            int(time.time()),
            (
                RevokedDevice(
                    StationId(STATION),
                    CertSerial(listed.credentials.idevid.serial_number),
                    listed.device_id,
                    "counterfeit",
                    int(time.time()),
                ),
                RevokedDevice(  # registered above: revoked by the import
                    StationId(STATION),
                    CertSerial(first.credentials.idevid.serial_number),
                    first.device_id,
                    "cloned",
                    int(time.time()),
                ),
            ),
        ),
        signer=hq.role_key(HqRole.REVOCATION_SIGNER, secrets),
        signer_cert=hq.role_certificate(HqRole.REVOCATION_SIGNER),
    )
    list_file = run.home.parent / "revocations-2.sealed"
    list_file.write_bytes(package)
    out = json.loads(await run.acli("import-revocations", str(list_file), "--json"))
    assert (out["sequence"], out["status"], out["live"]) == (2, "imported", True)
    assert [(r["device_id"], r["reason"]) for r in out["revoked"]] == [("TH-000205", "cloned")]
    assert await reason(listed) == "revoked"
    again = json.loads(await run.acli("import-revocations", str(list_file), "--json"))
    assert again["status"] == "unchanged"
    conflicting = run.home.parent / "revocations-2-other.sealed"
    conflicting.write_bytes(
        seal_revocation_list(
            RevocationList(2, int(time.time()), ()),
            signer=hq.role_key(HqRole.REVOCATION_SIGNER, secrets),
            signer_cert=hq.role_certificate(HqRole.REVOCATION_SIGNER),
        )
    )
    assert "conflicting_list" in await run.acli("import-revocations", str(conflicting), code=2)
    older = run.home.parent / "revocations-1.sealed"
    older.write_bytes((base.world.site.current / "revocation-list.sealed").read_bytes())
    rollback = await run.acli("import-revocations", str(older), code=2)
    assert "rollback" in rollback

    # junk on the request topic: signed refusals, and nothing is lost
    victim = software_device(base, "TH-000208")
    ctx = victim.registration_context()
    before = (await run.status())["counts"]
    for junk, expected in (
        (b"", "malformed"),
        (os.urandom(300), "malformed"),
        (request[:-7], "malformed"),
        (os.urandom(9000), "oversized"),
        (b"\xa1\x61v\x19\xff\xff" * 100, "malformed"),
    ):
        response = await exchange(run.registration, ctx, victim.device_id, junk)
        answer = parse_response(
            response,
            device_id=victim.device_id,
            nonce=b"",
            request_digest=hashlib.sha256(junk).digest(),
            ldevid_public_key=SoftwareKey.ephemeral().public_key(),
            roots=[x509.load_pem_x509_certificate(base.root_pem)],
            now=datetime.now(UTC),
        )
        assert isinstance(answer, RegistrationDenied) and answer.reason == expected
    good = software_device(base, "TH-000209")
    await asyncio.gather(victim.register(run.registration), good.register(run.registration))
    after = (await run.status())["counts"]
    assert after["devices"] == before["devices"] + 2
    assert after["requests"] == before["requests"] + 2


async def test_devices_cannot_touch_foreign_topics_with_a_real_mqtt_client(
    base: Base, registrar: Running, tmp_path: Path
) -> None:
    """mosquitto_sub / mosquitto_pub (not our code) with a device's secondary certificate,
    and our client subscribing every foreign filter: only its own subtree works."""
    run = registrar
    one, two = software_device(base, "TH-000301"), software_device(base, "TH-000302")
    await asyncio.gather(one.register(run.registration), two.register(run.registration))
    cert, key = write_tls_files(tmp_path, one)
    ca = tmp_path / "root.pem"
    ca.write_bytes(base.root_pem)
    op = run.operational
    common = ["-h", op.host, "-p", str(op.port), "-q", "1", "--cafile", str(ca)]
    common += ["--cert", str(cert), "--key", str(key)]
    async with two.operational(op) as s2:
        sub = await asyncio.create_subprocess_exec(
            *LINE_BUFFERED, "mosquitto_sub", *common,
            "-t", "devices/TH-000301/#", "-t", "#", "-t", "devices/+/telemetry",
            "-t", "devices/TH-000302/cmd", "-t", "$SYS/#",
            "-F", "%t", "-C", "1", "-W", "30", "-d",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert sub.stdout is not None
        await mosquitto_sub_subscribed(sub.stdout)  # its CONNECT and SUBSCRIBE are done
        await s2.publish_telemetry(b"from two")  # foreign to one
        await run.acli("send-command", "TH-000302", "for two", passphrase=False)
        await run.acli("send-command", "TH-000301", "for one", passphrase=False)
        out, err = await asyncio.wait_for(sub.communicate(), 30)
        assert sub.returncode == 0, err
        assert without_debug_lines(out) == ["devices/TH-000301/cmd"]  # the first and only
        assert await asyncio.wait_for(s2.commands.get(), 5) == b"for two"
        # mosquitto_pub: a sealed reading on its own topic reaches the registrar; the same
        # envelope on the other device's topic does not.
        reg = one.registered
        assert reg is not None
        for topic, text in (
            ("devices/TH-000302/telemetry", b"spoofed reading"),
            ("devices/TH-000301/telemetry", b"genuine reading"),
        ):
            (tmp_path / "msg").write_bytes(seal_payload(reg.current_key, topic, text))
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub", *common, "-t", topic, "-f", str(tmp_path / "msg")
            )
            assert await asyncio.wait_for(pub.wait(), 5) == 0
        await run.telemetry_seen("TH-000301", b"genuine reading")
        with pytest.raises(AssertionError):
            await run.telemetry_seen("TH-000302", b"spoofed reading", timeout=0.3)
        # our own client: every foreign filter, nothing arrives but its own messages
        async with one.operational(op) as s1:
            for topic_filter in FOREIGN_FILTERS:
                with contextlib.suppress(aiomqtt.MqttError):
                    await s1.client.subscribe(
                        topic_filter.replace("dev-b", "TH-000302").replace("dev-a", "TH-000301"),
                        qos=1,
                    )
            await s2.publish_telemetry(b"again from two")
            await run.acli("send-command", "TH-000302", "second", passphrase=False)
            await run.acli("send-command", "TH-000301", "mine", passphrase=False)
            assert await asyncio.wait_for(s1.commands.get(), 5) == b"mine"
            # nothing else for one: the broker has routed two's reading once the registrar
            # decrypted it, and the registrar's marker command after that is the next
            # (and only) thing one gets
            await run.telemetry_seen("TH-000302", b"again from two")
            await run.acli("send-command", "TH-000301", "marker", passphrase=False)
            assert await asyncio.wait_for(s1.commands.get(), 5) == b"marker"
            assert s1.commands.empty()


async def test_revoking_a_connected_device_cuts_it_within_5_s_and_nobody_else(
    base: Base, registrar: Running
) -> None:
    run = registrar
    victim = tpm_device(base, "TH-000401", base.tpms[2])  # its LDevID key is in its TPM
    other = tpm_device(base, "TH-000402", base.tpms[1])
    third = software_device(base, "TH-000403")
    await asyncio.gather(*(d.register(run.registration) for d in (victim, other, third)))
    async with (
        victim.operational(run.operational) as sv,
        other.operational(run.operational) as so,
        third.operational(run.operational) as st,
    ):
        await sv.publish_telemetry(b"still here")
        started = time.monotonic()
        revoke = asyncio.create_task(run.acli("revoke", "TH-000401", "--reason", "cloned"))
        elapsed = await until_cut(lambda: sv.publish_telemetry(b"x"))
        out = await revoke
        assert time.monotonic() - started < 5 and elapsed < 5
        assert "1 live session(s) cut" in out
        # the others stay connected and served
        await run.acli("send-command", "TH-000402", "still served", passphrase=False)
        assert await asyncio.wait_for(so.commands.get(), 5) == b"still served"
        reading = b"third after revocation"
        await st.publish_telemetry(reading)
        await run.telemetry_seen("TH-000403", reading)
    # the revoked LDevID no longer gets in: the broker's CRL check refuses the handshake
    # signed by the TPM-held key (not only the identity block)
    assert await refused_at_tls(run.operational, victim.operational_context())
    assert await handshake_refused(run.operational, victim.operational_context())
    assert not await handshake_refused(run.operational, other.operational_context())
    crl = x509.load_pem_x509_crl((run.home / "current" / "site-crl.pem").read_bytes())
    assert victim.registered is not None
    assert crl.get_revoked_certificate_by_serial_number(victim.registered.ldevid.serial_number)
    devices = {
        d["device_id"]: d for d in json.loads(await run.acli("devices", "--json", passphrase=False))
    }
    assert devices["TH-000401"]["status"] == "revoked"
    assert devices["TH-000402"]["status"] == "registered"
    status = await run.status()
    assert "TH-000401" in status["instance"]["revoked_devices"]
    assert status["last_revocations"][0]["device_id"] == "TH-000401"
    # re-registration with the still-valid factory certificate does not bring it back
    with pytest.raises((DeviceRegistrationError, aiomqtt.MqttError)):
        await victim.register(run.registration, timeout=1.5, resend_after=1.0, attempts=1)
    # revoking an unknown device is a clear refusal
    assert "unknown_device" in await run.acli("revoke", "TH-999999", code=2)


async def test_payload_key_rotation_reaches_a_connected_device(
    base: Base, registrar: Running
) -> None:
    run = registrar
    device = tpm_device(base, "TH-000501", base.tpms[3])
    registered = await device.register(run.registration)
    old = registered.current_key_id
    async with device.operational(run.operational) as session:
        out = json.loads(await run.acli("rotate-payload-key", "--json"))
        assert out["live"] and out["updates_published"] >= 1
        new = bytes.fromhex(out["key_id"])
        assert new != old
        deadline = time.monotonic() + 5
        while registered.current_key_id != new:
            assert time.monotonic() < deadline, "the key update did not arrive"
            await asyncio.sleep(0.05)
        assert session.key_updates == 1 and old in registered.payload_keys
        reading = b"under the new key"
        await session.publish_telemetry(reading)
        assert await run.telemetry_seen("TH-000501", reading) == new.hex()
        # a command sealed by the registrar now uses the new key, and opens
        await run.acli("send-command", "TH-000501", "new key works", passphrase=False)
        assert await asyncio.wait_for(session.commands.get(), 5) == b"new key works"
    assert (await run.status())["instance"]["payload_key"] == new.hex()


# --------------------------------------------------- offline commands, CRL timer (in process)


async def test_offline_revoke_and_rotation_take_effect_when_the_registrar_starts(
    base: Base, tmp_path: Path
) -> None:
    """``registrar revoke`` and ``rotate-payload-key`` with no registrar running work on the
    store, the CRL and the key file; the next ``registrar run`` blocks the revoked device
    (blocks live in broker memory) and sends the new key to the others."""
    home = tmp_path / "site"
    shutil.copytree(base.site_template, home, symlinks=True)
    site, secrets = SiteHome.open(home), SiteSecrets(base.world.base / "site.pass")
    settings = AppSettings(registration_port=0, operational_port=0)
    victim, keeper = software_device(base, "TH-000601"), software_device(base, "TH-000602")
    async with running(site, secrets, settings) as app:
        await asyncio.gather(*(d.register(app.registration_endpoint) for d in (victim, keeper)))

    def cli(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(
            registrar_main,
            [*args, "--home", str(home), "--passphrase-file", str(secrets.passphrase_file)],
        )
        assert result.exit_code == code, result.output
        return result.output

    out = await asyncio.to_thread(cli, "revoke", "TH-000601", "--reason", "decommissioned")
    assert "no registrar running" in out
    rotated = json.loads(await asyncio.to_thread(cli, "rotate-payload-key", "--json"))
    assert rotated["live"] is False
    assert victim.registered is not None and keeper.registered is not None
    crl = x509.load_pem_x509_crl((home / "current" / "site-crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(victim.registered.ldevid.serial_number)
    async with running(site, secrets, settings) as app:
        op = app.operational_endpoint
        assert await refused_at_tls(op, victim.operational_context())
        async with keeper.operational(op) as session:
            deadline = time.monotonic() + 5
            while keeper.registered.current_key_id.hex() != rotated["key_id"]:
                assert time.monotonic() < deadline, "pending key update not delivered"
                await asyncio.sleep(0.05)
            assert session.key_updates == 1
        # the registration listener: the blocked identity gets no answer
        with pytest.raises((DeviceRegistrationError, aiomqtt.MqttError)):
            await victim.register(
                app.registration_endpoint, timeout=1.0, resend_after=1.0, attempts=1
            )
        assert app.service is not None
        verifier = app.service.verifier
        assert isinstance(verifier, RevocationAwareVerifier)
        assert DeviceId("TH-000601") in verifier.locally_revoked


def test_site_crl_is_reissued_at_half_life_and_stale_hq_crls_are_reported(
    base: Base, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "site"
    shutil.copytree(base.site_template, home, symlinks=True)
    site, secrets = SiteHome.open(home), SiteSecrets(base.world.base / "site.pass")
    app = RegistrarApp(site, secrets)

    def next_update() -> datetime:
        crl = x509.load_pem_x509_crl((home / "current" / "site-crl.pem").read_bytes())
        assert crl.next_update_utc is not None
        return crl.next_update_utc

    first = next_update()
    assert app.refresh_site_crl_if_due() is False  # fresh: left alone
    assert next_update() == first
    later = datetime.now(UTC) + SITE_CRL_VALIDITY / 2 + timedelta(hours=1)
    assert app.refresh_site_crl_if_due(now=later) is True
    assert next_update() > first
    # HQ's CRLs: this world's station CRL lasts 7 days, the root CRL (root ceremony) a
    # year; near the end a warning, past it STALE (fail closed)
    assert app.check_crls() == []
    warn = app.check_crls(now=datetime.now(UTC) + timedelta(days=6, hours=12))
    assert len(warn) == 1 and "runs out" in warn[0] and "Station" in warn[0]
    with caplog.at_level(logging.ERROR, logger="registrar.crl_watch"):
        stale = app.check_crls(now=datetime.now(UTC) + timedelta(days=8))
    assert len(stale) == 1 and all("STALE" in a and "REFUSED" in a for a in stale)
    assert sum("STALE" in r.getMessage() for r in caplog.records) == 1
    stale = app.check_crls(now=datetime.now(UTC) + timedelta(days=366))
    assert any("STALE" in a and "Root CA" in a for a in stale)
