"""Several ``registrar run`` instances on one site: real processes, one real Mosquitto (run
by instance 1), one real PostgreSQL database shared by all, software-key devices.

* a fleet registers through three instances: every device exactly once (one device row,
  one certificate, unique serials), and every instance served part of it (MQTT v5 shared
  subscription); telemetry is processed once, by the site-duties instance;
* a renewal served by any instance answers only once the old LDevID is on the site CRL;
* a revocation received by one instance (the spool of instance 1) is enforced by all three
  within a second (store change feed), and the live session is cut once;
* kill -9 of one of three instances while a fleet registers: nothing lost, nothing
  duplicated, devices whose request died with it succeed by re-sending, and registrations
  go on after the kill (the rate after it is measured);
* two registrars that would both run the site duties: the second is refused, or with
  ``--standby`` takes over when the first is killed;
* the same request served by two instances at once: one certificate, the same answer;
* one instance only on SQLite or on the embedded broker: a clear one-line error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner
from cryptography import x509

from bench.site_fixture import (
    BenchSite,
    RegistrarProcess,
    build_commissioned_site,
    build_site_pki,
)
from device_sim.client import DeviceClient, Registered
from device_sim.fleet import software_device
from registrar.cli import main as registrar_main
from registrar.connections import instance_context
from registrar.service import RegistrationService
from registrar.site import SiteHome, load_commissioned_site
from registrar.spool import submit_command
from registrar.store import Store
from tests.fixtures.postgres import PgServer, create_database, drop_database
from trustcore.registration import RegistrationDenied, parse_request, parse_response
from trustcore.topics import registration_request_topic, registration_response_topic

pytestmark = [pytest.mark.slow]


@dataclass
class Site:
    bench: BenchSite
    store_url: str
    registrars: list[RegistrarProcess]
    logs: Path

    def log_of(self, instance: int) -> str:
        return (self.logs / f"registrar-{instance}.log").read_text(errors="replace")


@pytest.fixture
async def site(tmp_path: Path, pg_server: PgServer) -> AsyncIterator[Site]:
    """Instance 1 (Mosquitto, site duties) and instances 2 and 3 joining it."""
    bench = build_commissioned_site(tmp_path / "world")
    policy = CliRunner().invoke(
        registrar_main,
        [
            "ldevid-policy",
            "--home",
            str(bench.home),
            "--min-interval-seconds",
            "0",
            "--handover-seconds",
            "1",
            # every renewal's old LDevID on the CRL before its answer, on every instance
            "--supersede-window-seconds",
            "0",
        ],
    )
    assert policy.exit_code == 0, policy.output
    name = create_database(pg_server)
    url = pg_server.url_of(name)
    registrars: list[RegistrarProcess] = []
    try:
        first = await RegistrarProcess.start(
            bench,
            [
                *("--broker", "mosquitto", "--registration-port", "0", "--operational-port", "0"),
                *("--store", url, "--log-level", "debug"),
            ],
            log_file=tmp_path / "registrar-1.log",
        )
        registrars.append(first)
        op = first.operational_endpoint
        for k in (2, 3):
            registrars.append(
                await RegistrarProcess.start(
                    bench,
                    [
                        *("--broker", "mosquitto", "--instance", str(k)),
                        *("--join", f"{op.host}:{op.port}", "--store", url),
                        *("--log-level", "debug"),
                    ],
                    log_file=tmp_path / f"registrar-{k}.log",
                )
            )
        yield Site(bench, url, registrars, tmp_path)
    finally:
        codes = [await r.stop() for r in reversed(registrars)]
        drop_database(pg_server, name)
    assert all(code in (0, -9) for code in codes), codes


async def _totals(url: str) -> tuple[int, int, int]:
    """(device rows, certificates, distinct serials) in the shared store."""
    store = await Store.open(url)
    try:
        devices = (await store.counts())["devices"]
        certificates = await store.certificates()
    finally:
        await store.close()
    return devices, len(certificates), len({c.serial for c in certificates})


async def _register_all(
    devices: list[DeviceClient], site: Site, done: list[float] | None = None
) -> list[Registered | BaseException]:
    endpoint = site.registrars[0].registration_endpoint

    async def one(device: DeviceClient) -> Registered:
        # resend_after: the identical request again when no answer came (an instance died
        # with it); the answer is idempotent.
        registered = await device.register(endpoint, timeout=30, resend_after=1.0, attempts=2)
        if done is not None:
            done.append(time.monotonic())
        return registered

    return await asyncio.gather(*(one(d) for d in devices), return_exceptions=True)


async def test_three_instances_register_a_fleet_exactly_once(site: Site) -> None:
    devices = [software_device(d.credentials()) for d in site.bench.factory_devices(90)]
    results = await _register_all(devices, site)
    failed = [r for r in results if not isinstance(r, Registered)]
    assert not failed, failed[:3]
    serials = {r.ldevid.serial_number for r in results if isinstance(r, Registered)}
    assert len(serials) == 90
    assert await _totals(site.store_url) == (90, 90, 90)
    # the request stream was split: each instance registered some of the fleet
    served = [site.log_of(k).count("DEBUG registrar.service: registered ") for k in (1, 2, 3)]
    assert sum(served) == 90 and min(served) > 0, served
    # telemetry is processed once (by the site-duties instance), not once per instance
    op = site.registrars[0].operational_endpoint
    for device in devices[:3]:
        async with device.operational(op) as session:
            for i in range(2):
                await session.publish_telemetry(f"reading {i}".encode())
    status = site.bench.home / "run" / "status.json"
    deadline = time.monotonic() + 10
    while json.loads(status.read_text())["telemetry"]["messages"] < 6:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # two more status writes: nothing counted twice
    assert json.loads(status.read_text())["telemetry"]["messages"] == 6
    assert all("telemetry" not in site.log_of(k) for k in (2, 3))


async def _injected_refusals(
    site: Site, device: DeviceClient, count: int
) -> tuple[list[str], float]:
    """Fresh registration requests of ``device`` published past the broker's block (as
    registrar instance 16 may, on the operational listener), so that the instances, not
    the broker, must refuse them; returns the reasons answered and when (monotonic) the
    first request was published."""
    home = SiteHome.open(site.bench.home)
    commissioned = load_commissioned_site(home, site.bench.secrets())
    tls = instance_context(commissioned, 16, datetime.now(UTC))
    op = site.registrars[0].operational_endpoint
    reasons: list[str] = []
    first = 0.0
    async with aiomqtt.Client(
        op.host,
        op.port,
        identifier="registrar.16@site",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls,
    ) as client:
        await client.subscribe(registration_response_topic(device.device_id), qos=1)
        messages = client.messages.__aiter__()
        for _ in range(count):
            request, ldevid_key, _wrap = device.new_request()
            parsed = parse_request(request)
            first = first or time.monotonic()
            await client.publish(registration_request_topic(device.device_id), request, qos=1)
            message = await asyncio.wait_for(messages.__anext__(), 10)
            assert isinstance(message.payload, bytes)
            result = parse_response(
                message.payload,
                device_id=device.device_id,
                nonce=parsed.nonce,
                request_digest=parsed.digest,
                ldevid_public_key=ldevid_key.public_key(),
                roots=(site.bench.root,),
                now=datetime.now(UTC),
            )
            reasons.append(result.reason if isinstance(result, RegistrationDenied) else "granted")
    return reasons, first


async def test_revocation_is_enforced_by_every_instance_and_cut_once(site: Site) -> None:
    devices = [software_device(d.credentials()) for d in site.bench.factory_devices(6)]
    results = await _register_all(devices, site)
    assert all(isinstance(r, Registered) for r in results), results
    victim = devices[0]
    async with victim.operational(site.registrars[0].operational_endpoint):
        answer = await asyncio.to_thread(
            submit_command,
            SiteHome.open(site.bench.home),
            "revoke",
            {"device_id": victim.device_id.value, "reason": "key_compromise"},
        )
        revoked_at = time.monotonic()
    assert answer is not None and answer["ok"], answer
    assert answer["result"]["sessions_cut"] == 1  # cut once, by the instance owning the broker
    await asyncio.sleep(0.2)
    reasons, first = await _injected_refusals(site, victim, 9)
    assert first - revoked_at < 1.0  # asked within a second of the revocation...
    assert reasons == ["revoked"] * 9, reasons  # ...and refused by every instance
    refused = [
        site.log_of(k).count(f"refused registration on {victim.device_id}") for k in (1, 2, 3)
    ]
    assert sum(refused) == 9 and min(refused) > 0, refused  # every instance refused some
    # the others are untouched
    assert (await _totals(site.store_url))[0] == 6


async def test_renewal_on_any_instance_puts_the_old_ldevid_on_the_crl_first(site: Site) -> None:
    """Whichever instance serves a renewal, the answer comes only once the site CRL (which
    instance 1 re-issues) lists the superseded LDevID."""
    devices = [software_device(d.credentials()) for d in site.bench.factory_devices(6)]
    results = await _register_all(devices, site)
    assert all(isinstance(r, Registered) for r in results), results
    crl_path = site.bench.home / "current" / "site-crl.pem"
    op = site.registrars[0].operational_endpoint
    for device in devices:
        assert device.registered is not None
        old = device.registered.ldevid.serial_number
        renewed = await device.renew(op, timeout=20)
        assert renewed.ldevid.serial_number != old
        listed = {e.serial_number for e in x509.load_pem_x509_crl(crl_path.read_bytes())}
        assert old in listed, f"{device.device_id}: old LDevID not on the CRL when renewed"
    renewals = [site.log_of(k).count("INFO registrar.service: renewed ") for k in (1, 2, 3)]
    assert sum(renewals) == 6 and renewals[1] + renewals[2] > 0, renewals


async def test_kill_one_of_three_under_load_loses_and_duplicates_nothing(site: Site) -> None:
    devices = [software_device(d.credentials()) for d in site.bench.factory_devices(240)]
    done: list[float] = []
    started = time.monotonic()
    wave = asyncio.ensure_future(_register_all(devices, site, done))
    while len(done) < 60:
        assert not wave.done() and time.monotonic() - started < 60
        await asyncio.sleep(0.01)
    site.registrars[2].kill()
    killed = time.monotonic()
    results = await wave
    failed = [r for r in results if not isinstance(r, Registered)]
    assert not failed, failed[:3]
    # No loss, no duplicate: every device has exactly one current LDevID, the one it holds,
    # and every serial is distinct. On a loaded machine a device whose answer took longer
    # than its 30 s timeout sends a NEW request (new nonce, new key): that is a
    # re-registration, and its first certificate must then be superseded, never live.
    store = await Store.open(site.store_url)
    try:
        assert (await store.counts())["devices"] == 240
        certificates = await store.certificates()
    finally:
        await store.close()
    assert len({c.serial for c in certificates}) == len(certificates)
    current = {c.device_id.value: c.serial.hex for c in certificates if c.state == "current"}
    assert len([c for c in certificates if c.state == "current"]) == 240
    held = {
        d.device_id.value: format(r.ldevid.serial_number, "x")
        for d, r in zip(devices, results, strict=True)
        if isinstance(r, Registered)
    }
    assert held == current
    extra = len(certificates) - 240
    assert all(
        c.state == "superseded" for c in certificates if c.serial.hex not in current.values()
    )
    print(f"kill -9 under load: {extra} re-registrations after a device timeout")
    after = sorted(t for t in done if t > killed)
    assert len(after) > 60  # registrations went on after the kill
    span = after[-1] - killed
    rate_before = 60 / (killed - started)
    rate_after = len(after) / span
    print(f"kill -9 under load: {rate_before:.0f}/s before, {rate_after:.0f}/s after")
    assert rate_after > 0.25 * rate_before


async def test_site_duties_run_once_and_a_standby_takes_over(
    tmp_path: Path, pg_server: PgServer
) -> None:
    """Two registrars that would both run the site duties (each its own broker, e.g. two
    machines) on one store: the second is refused, or with --standby waits and takes
    over when the first is killed; devices then register through the standby's broker."""
    bench = build_commissioned_site(tmp_path / "world")
    other = tmp_path / "other-machine"
    shutil.copytree(bench.home, other, symlinks=True)
    standby_site = dataclasses.replace(bench, home=other)
    name = create_database(pg_server)
    url = pg_server.url_of(name)
    own = ["--broker", "mosquitto", "--registration-port", "0", "--operational-port", "0"]
    first = await RegistrarProcess.start(
        bench, [*own, "--store", url], log_file=tmp_path / "first.log"
    )
    standby: asyncio.Future[RegistrarProcess] | None = None
    try:
        with pytest.raises(RuntimeError):
            await RegistrarProcess.start(
                standby_site, [*own, "--store", url], log_file=tmp_path / "second.log"
            )
        second_log = (tmp_path / "second.log").read_text()
        assert "another registrar runs the duties of site" in second_log
        assert "Traceback" not in second_log
        standby = asyncio.ensure_future(
            RegistrarProcess.start(
                standby_site, [*own, "--store", url, "--standby"], log_file=tmp_path / "sb.log"
            )
        )
        before = [software_device(d.credentials()) for d in bench.factory_devices(5)]
        for device in before:
            await device.register(first.registration_endpoint, timeout=10)
        assert not standby.done()  # waiting while the first runs the duties
        first.kill()
        killed = time.monotonic()
        taken = await asyncio.wait_for(standby, 30)
        takeover = time.monotonic() - killed
        print(f"standby took over the site duties {takeover:.2f} s after kill -9")
        after = [software_device(d.credentials()) for d in bench.factory_devices(5, start=5)]
        for device in after:
            await device.register(taken.registration_endpoint, timeout=10)
        assert await _totals(url) == (10, 10, 10)
        assert takeover < 10
    finally:
        if standby is not None:
            if standby.done() and not standby.exception():
                await standby.result().stop()
            else:
                standby.cancel()
        await first.stop()
        drop_database(pg_server, name)


async def test_two_instances_serving_one_request_issue_one_certificate(
    pg_server: PgServer,
) -> None:
    """The same request bytes reach two instances at once (a device re-sent it while the
    first copy was being served): both answer with the one committed grant."""
    pki = build_site_pki()
    name = create_database(pg_server)
    stores = [await Store.open(pg_server.url_of(name)) for _ in range(2)]
    try:
        services = [
            RegistrationService(
                store=store,
                verifier=pki.verifier(),
                admission=pki.admission(),
                site=pki.site_authority(),
                payload_key=pki.payload_key,
            )
            for store in stores
        ]
        for _ in range(5):
            device = software_device(pki.factory_device(f"dev-{_:06d}").credentials())
            request, _key, _wrap = device.new_request()
            answers = await asyncio.gather(*(s.handle(device.device_id, request) for s in services))
            assert answers[0] == answers[1]
        certificates = await stores[0].certificates()
        assert len(certificates) == 5 and (await stores[0].counts())["devices"] == 5
    finally:
        for store in stores:
            await store.close()
        drop_database(pg_server, name)


def test_one_instance_only_on_sqlite_or_embedded(tmp_path: Path) -> None:
    bench = build_commissioned_site(tmp_path / "world")
    base = ["run", "--home", str(bench.home), "--passphrase-file", str(bench.passphrase_file)]
    runner = CliRunner()
    sqlite = runner.invoke(
        registrar_main,
        [*base, "--broker", "mosquitto", "--instance", "2", "--join", "127.0.0.1:1883"],
    )
    assert sqlite.exit_code == 1, sqlite.output
    assert "share one PostgreSQL store" in sqlite.output
    embedded = runner.invoke(registrar_main, [*base, "--instance", "2", "--join", "h:1"])
    assert embedded.exit_code == 1 and "embedded broker serves one" in embedded.output
    no_join = runner.invoke(registrar_main, [*base, "--broker", "mosquitto", "--instance", "2"])
    assert no_join.exit_code == 1 and "--join HOST:PORT" in no_join.output
    bad = runner.invoke(registrar_main, [*base, "--broker", "mosquitto", "--join", "nohost"])
    assert bad.exit_code == 1 and "HOST:PORT" in bad.output
    for result in (sqlite, embedded, no_join, bad):
        assert "Traceback" not in result.output
