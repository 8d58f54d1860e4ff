"""LDevID renewal and superseded certificates through a real ``registrar run`` process, on
BOTH brokers (embedded amqtt, Mosquitto), checked with clients this project did not write
(``mosquitto_pub``, ``openssl verify``).

The site runs with ``registrar ldevid-policy --min-interval-seconds 0 --handover-seconds 1
--supersede-window-seconds 0`` so a fresh certificate may renew at once, every superseded
LDevID is on the CRL before the answer leaves (window 0: no batching, whatever order the
tests run in), and a session left on a superseded certificate is cut one second after the
answer. The batching of renewals within a window has its own test (the last one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from device_sim.client import DeviceClient
from signers.tpm import TpmKey
from tests.fixtures.registrar_run import (
    REGISTRAR,
    Base,
    Running,
    software_device,
    tpm_device,
    until_cut,
    write_tls_files,
)
from tests.fixtures.registrar_run import base as base

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def registrar(request: pytest.FixtureRequest, base: Base) -> Iterator[Running]:
    broker = str(request.param)
    root = base.world.base / f"renewal-{broker}"
    home = root / "site"
    shutil.copytree(base.site_template, home, symlinks=True)
    passphrase_file = base.world.base / "site.pass"
    policy = subprocess.run(
        [
            str(REGISTRAR), "ldevid-policy", "--home", str(home),
            "--min-interval-seconds", "0", "--handover-seconds", "1",
            "--supersede-window-seconds", "0", "--json",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert policy.returncode == 0, policy.stderr
    assert json.loads(policy.stdout)["handover_seconds"] == 1.0
    assert json.loads(policy.stdout)["supersede_window_seconds"] == 0.0
    log = root / "registrar.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(REGISTRAR), "run", "--home", str(home),
                "--passphrase-file", str(passphrase_file), "--broker", broker,
                "--registration-port", "0", "--operational-port", "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        status = home / "run" / "status.json"
        deadline = time.monotonic() + 60
        while not status.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        listeners = json.loads(status.read_text())["listeners"]
        from registrar.broker import Endpoint

        yield Running(
            broker,
            home,
            passphrase_file,
            process,
            Endpoint(**listeners["registration"]),
            Endpoint(**listeners["operational"]),
            log,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text


async def mosquitto_pub(run: Running, ca: Path, cert: Path, key: Path, topic: str) -> int:
    """Exit code of a real ``mosquitto_pub`` on the operational listener with these files."""
    op = run.operational
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", op.host, "-p", str(op.port), "-q", "1",
        "--cafile", str(ca), "--cert", str(cert), "--key", str(key),
        "-t", topic, "-m", "probe",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 15)


def tls_files(directory: Path, device: DeviceClient) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return write_tls_files(directory, device)


def openssl_verify(run: Running, base: Base, directory: Path, cert: Path) -> str:
    chain = directory / "chain.pem"
    chain.write_bytes(base.root_pem + base.site_ca.public_bytes(PEM))
    result = subprocess.run(
        [
            "openssl", "verify", "-CAfile", str(chain), "-crl_check",
            "-CRLfile", str(run.home / "current" / "site-crl.pem"), str(cert),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


async def test_renewed_and_re_registered_old_ldevids_are_refused_at_connect(
    base: Base,
    registrar: Running,
    tmp_path: Path,
) -> None:
    """The issue's "must show": after a renewal and after a re-registration, the OLD
    LDevID is refused at connect by the broker (``mosquitto_pub`` fails), the live session
    still on it is cut after the hand-over, and the NEW certificate works."""
    run = registrar
    ca = tmp_path / "root.pem"
    ca.write_bytes(base.root_pem)
    renewed, reregistered = software_device(base, "TH-000801"), software_device(base, "TH-000802")
    await asyncio.gather(
        renewed.register(run.registration), reregistered.register(run.registration)
    )
    old_a = tls_files(tmp_path / "a-old", renewed)
    old_b = tls_files(tmp_path / "b-old", reregistered)
    assert await mosquitto_pub(run, ca, *old_a, "devices/TH-000801/telemetry") == 0
    assert await mosquitto_pub(run, ca, *old_b, "devices/TH-000802/telemetry") == 0
    assert "OK" in openssl_verify(run, base, tmp_path, old_a[0])

    # Renewal over the live operational session (authenticated by the current LDevID).
    assert renewed.registered is not None
    first = renewed.registered.ldevid
    async with renewed.operational(run.operational) as session:
        started = time.monotonic()
        reg = await session.renew()
        renewed_in = time.monotonic() - started
        assert reg.ldevid.serial_number != first.serial_number
        assert reg.previous == [first]
        # The old certificate is refused at connect from the moment the answer exists ...
        assert await mosquitto_pub(run, ca, *old_a, "devices/TH-000801/telemetry") != 0
        # ... and the session still on it is cut after the 1 s hand-over.
        cut_after = await until_cut(lambda: session.publish_telemetry(b"old session"), 10)
    assert renewed_in < 5
    assert time.monotonic() - started >= 0.9  # not before the hand-over
    assert cut_after < 10
    new_a = tls_files(tmp_path / "a-new", renewed)
    assert await mosquitto_pub(run, ca, *new_a, "devices/TH-000801/telemetry") == 0
    assert "certificate revoked" in openssl_verify(run, base, tmp_path, old_a[0])
    assert "OK" in openssl_verify(run, base, tmp_path, new_a[0])
    # The device keeps working with the new certificate: telemetry is decrypted.
    async with renewed.operational(run.operational) as session:
        await session.publish_telemetry(b"after renewal")
        await run.telemetry_seen("TH-000801", b"after renewal")

    # Re-registration with the IDevID supersedes the old LDevID the same way.
    await reregistered.register(run.registration)
    assert await mosquitto_pub(run, ca, *old_b, "devices/TH-000802/telemetry") != 0
    new_b = tls_files(tmp_path / "b-new", reregistered)
    assert await mosquitto_pub(run, ca, *new_b, "devices/TH-000802/telemetry") == 0

    devices = {
        d["device_id"]: d for d in json.loads(await run.acli("devices", "--json", passphrase=False))
    }
    a, b = devices["TH-000801"], devices["TH-000802"]
    assert (a["registrations"], a["renewals"]) == (1, 1)
    assert [(c["kind"], c["state"]) for c in a["certificates"]] == [
        ("registration", "superseded"),
        ("renewal", "current"),
    ]
    assert (b["registrations"], b["renewals"]) == (2, 0)
    assert [c["state"] for c in b["certificates"]] == ["superseded", "current"]
    status = json.loads((run.home / "run" / "status.json").read_text())
    assert status["ldevid_policy"]["handover_seconds"] == 1.0
    assert status["registrations"]["renewed"] >= 1
    assert status["superseded_sessions_cut"] >= 1
    table = await run.acli("devices", "--certificates", passphrase=False)
    assert "LDevID certificates per device" in table


async def test_swtpm_device_renews_with_a_new_tpm_key_and_retries_are_idempotent(
    base: Base,
    registrar: Running,
) -> None:
    run = registrar
    device = tpm_device(base, "TH-000811", base.tpms[3])
    await device.register(run.registration)
    assert device.registered is not None
    old_key = device.registered.ldevid_key
    outcome = await device.keep_certified(run.registration, run.operational)
    assert outcome == "current"  # young certificate: nothing to do
    async with device.operational(run.operational) as session:
        request, new_key = await asyncio.to_thread(device.new_renewal_request)
        topic = "devices/TH-000811/renewal/request"
        for _ in range(3):  # the device did not see an answer and re-sends the same bytes
            await session.client.publish(topic, request, qos=1)
        answers = [await asyncio.wait_for(session._renewal_answers.get(), 10) for _ in range(3)]
    assert len(set(answers)) == 1
    assert isinstance(new_key, TpmKey) and isinstance(old_key, TpmKey)
    devices = {
        d["device_id"]: d for d in json.loads(await run.acli("devices", "--json", passphrase=False))
    }
    assert devices["TH-000811"]["renewals"] == 1  # three requests, one certificate
    # A second renewal through the client API: a new TPM key, certified by the site CA.
    device.renew_from = 1e-9  # "due" at once (the site allows min interval 0)
    # The stored answer above was not applied to the device (raw publish): it still holds
    # the superseded certificate, so the registrar says so and the device re-registers.
    outcome = await device.keep_certified(run.registration, run.operational)
    assert outcome == "registered"
    assert device.registered is not None
    before = device.registered.ldevid_key
    assert await device.keep_certified(run.registration, run.operational) == "renewed"
    reg = device.registered
    assert reg.ldevid_key is not before and isinstance(reg.ldevid_key, TpmKey)
    assert reg.ldevid.public_key() == reg.ldevid_key.public_key()


async def test_a_superseded_serial_missing_from_the_crl_is_listed_at_start(
    base: Base, tmp_path: Path
) -> None:
    """The crash window between the commit of a new certificate and the CRL: a registrar
    that starts finds the superseded serial in its store and puts it on the site CRL."""
    import sqlite3

    from cryptography import x509

    from registrar.app import AppSettings, running
    from registrar.run_dir import store_path
    from registrar.site import SiteHome
    from registrar.store import Store

    home_path = tmp_path / "site"
    shutil.copytree(base.site_template, home_path, symlinks=True)
    home = SiteHome.open(home_path)
    store = await Store.open(store_path(home))
    await store.close()
    with sqlite3.connect(store_path(home)) as db:
        db.execute(
            "INSERT INTO superseded (ldevid_serial, device_id, superseded_at) VALUES (?, ?, ?)",
            ("5eed0001", "TH-000899", int(time.time())),
        )
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(home, base.world.site_secrets, settings):
        crl = x509.load_pem_x509_crl((home_path / "current" / "site-crl.pem").read_bytes())
        entry = crl.get_revoked_certificate_by_serial_number(0x5EED0001)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.superseded


def test_embedded_subscription_table_survives_changes_while_iterated() -> None:
    """amqtt iterates its subscription table across awaits; a SUBSCRIBE or disconnect in
    between used to raise "dictionary changed size during iteration" (seen in this suite)."""
    from registrar.broker.embedded import _SnapshotDict

    table = _SnapshotDict({"devices/a/cmd": [], "devices/b/cmd": []})
    for topic_filter in table:
        table[topic_filter + "/x"] = []
    assert len(table) == 4
    for topic_filter, _ in table.items():
        del table[topic_filter]
    assert table == {}


async def test_a_device_whose_ldevid_was_superseded_behind_its_back_registers_again(
    base: Base, registrar: Running
) -> None:
    """The device never got the answer that replaced its certificate (here: a second
    client with the same factory identity registered): its old LDevID is refused at connect,
    and ``keep_certified`` falls back to the IDevID instead of giving up."""
    run = registrar
    device = software_device(base, "TH-000821")
    await device.register(run.registration)
    twin = DeviceClient(device.credentials, device.keys)  # same device, other memory
    await twin.register(run.registration)
    device.renew_from = 1e-9  # due now
    assert device.registered is not None
    stale = device.registered.ldevid
    assert await device.keep_certified(run.registration, run.operational) == "registered"
    assert device.registered.ldevid.serial_number != stale.serial_number
    async with device.operational(run.operational) as session:
        await session.publish_telemetry(b"back again")
        await run.telemetry_seen("TH-000821", b"back again")


async def test_a_device_that_reconnects_at_once_is_not_cut_by_the_hand_over(
    base: Base, registrar: Running
) -> None:
    """The usual path: the device renews, closes the old session and reconnects with its
    new certificate before the hand-over ends; that session is never cut (Mosquitto cannot
    see certificates: it must tell from the connection after the CRL reload)."""
    run = registrar
    device = software_device(base, "TH-000831")
    await device.register(run.registration)
    async with device.operational(run.operational) as session:
        await session.renew()
    async with device.operational(run.operational) as session:
        deadline = time.monotonic() + 2.0  # twice the 1 s hand-over
        sent = 0
        while time.monotonic() < deadline:
            await session.publish_telemetry(b"new certificate %d" % sent)
            sent += 1
            await asyncio.sleep(0.1)
        await session.publish_telemetry(b"still connected")
        await run.telemetry_seen("TH-000831", b"still connected")
    assert sent >= 10


async def test_renewals_within_the_window_share_one_crl_and_one_mosquitto_reload(
    base: Base, tmp_path: Path
) -> None:
    """``supersede_window_seconds`` (docs/broker.md, "Reloads and Mosquitto's memory"):
    the first renewal after a quiet window puts its old LDevID on the CRL before its answer;
    the next four, within the window, are answered at once and share ONE re-signed CRL and
    ONE Mosquitto reload. Afterwards every old certificate fails a real TLS handshake with
    Mosquitto, the devices that reconnected with their new certificate during the window
    keep their sessions, and the one session left on an old certificate is cut. A batch
    still waiting when the registrar stops is on the site CRL afterwards."""
    from dataclasses import replace
    from datetime import timedelta

    from cryptography import x509

    from registrar.app import AppSettings, running
    from registrar.broker.mosquitto import MosquittoBroker
    from registrar.ldevid_policy import read_ldevid_policy, write_ldevid_policy
    from registrar.site import SiteHome, SiteSecrets
    from tests.fixtures.registrar_run import refused_at_tls

    home_path = tmp_path / "site"
    shutil.copytree(base.site_template, home_path, symlinks=True)
    window = 15.0  # long enough for every check below to run inside the next window
    write_ldevid_policy(
        home_path,
        replace(
            read_ldevid_policy(home_path),
            min_interval=timedelta(0),
            handover_seconds=1.0,
            supersede_window_seconds=window,
        ),
    )
    settings = AppSettings(broker="mosquitto", registration_port=0, operational_port=0)
    secrets = SiteSecrets(base.world.base / "site.pass")
    devices = [software_device(base, f"TH-00086{n}") for n in range(5)]
    first, batched, straggler = devices[0], devices[1:4], devices[4]
    async with running(SiteHome.open(home_path), secrets, settings) as app:
        broker, superseded = app.broker, app.superseded
        assert isinstance(broker, MosquittoBroker) and superseded is not None
        op = app.operational_endpoint
        await asyncio.gather(*(d.register(app.registration_endpoint) for d in devices))
        old = [d.operational_context() for d in devices]

        # A quiet window: the first renewal's old certificate is refused before its answer.
        reloads = broker.sighups
        async with first.operational(op) as session:
            await session.renew()
        assert superseded.pending == 0
        assert broker.sighups == reloads + 1
        assert await refused_at_tls(op, old[0])

        # Four more within the window: answered without waiting for a CRL. Three devices
        # reconnect with their new certificate at once, as devices do; the fourth keeps
        # its session on the old certificate.
        reloads, signed = broker.sighups, superseded.crls_signed
        async with contextlib.AsyncExitStack() as stack:
            old_session = await stack.enter_async_context(straggler.operational(op))

            async def renew(device: DeviceClient) -> float:
                async with device.operational(op) as session:
                    started = time.monotonic()
                    await session.renew()
                    return time.monotonic() - started

            answered_in = await asyncio.gather(*(renew(d) for d in batched), old_session.renew())
            assert superseded.pending == 4  # the readiness signal: 4 serials wait
            assert broker.sighups == reloads  # no reload yet
            fresh = [await stack.enter_async_context(d.operational(op)) for d in batched]
            deadline = time.monotonic() + window + 10
            while superseded.pending:
                assert time.monotonic() < deadline, "the batch was never signed"
                await asyncio.sleep(0.05)
            # The batch's CRL is in force: one CRL, one reload for four renewals.
            assert (superseded.crls_signed, broker.sighups) == (signed + 1, reloads + 1)
            for ctx in old[1:]:
                assert await refused_at_tls(op, ctx)
            # The session left on an old certificate is cut; the reconnected ones stay.
            assert await until_cut(lambda: old_session.publish_telemetry(b"old"), 10) < 10
            await asyncio.sleep(1.5)  # past the 1 s hand-over of every batched renewal
            for session in fresh:
                await session.publish_telemetry(b"new certificate")
            assert superseded.cut_sessions == 1
        # One more renewal within the window, then a graceful stop: the waiting batch is
        # signed before the broker stops (and would be reconciled at the next start).
        async with first.operational(op) as session:
            await session.renew()
        assert superseded.pending == 1
        assert max(answered_in[:3]) < window / 2
        assert not await refused_at_tls(op, straggler.operational_context())
    crl = x509.load_pem_x509_crl((home_path / "current" / "site-crl.pem").read_bytes())
    for d in devices:
        assert d.registered is not None and len(d.registered.previous) == 1
        entry = crl.get_revoked_certificate_by_serial_number(d.registered.previous[0].serial_number)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.superseded
