"""Site CA rollover without downtime, with a real ``registrar run`` process on BOTH brokers
(embedded amqtt, Mosquitto), a real HQ (its CLI), and devices (one with its keys in a
swtpm, two with software keys) that stay online through every step:

begin (``registrar rollover-ca``) → HQ (``hq site rollover``, ``hq site bundle``) →
activate (``registrar commission`` while running) → overlap (old LDevIDs still connect,
new ones come from the new CA, the broker presents the new CA) → ``--migrate-all`` (signed
"renew now"; the devices renew their LDevID over MQTT and reconnect, an offline one when it
comes back) →
``--retire`` (refused while a device depends on the old CA; then the old LDevIDs are
refused at the TLS handshake and the old key is gone).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.agent import DeviceAgent, renew_or_register
from device_sim.client import DeviceClient
from device_sim.swtpm import Swtpm
from hq.cli import main as hq_main
from registrar.site import commission_site
from signers.tpm import Tpm
from tests.fixtures.registrar_run import (
    Base,
    Running,
    refused_at_tls,
    registrar,
    software_device,
    tpm_device,
    write_tls_files,
)
from tests.fixtures.site import SITE, STATION, make_world
from trustcore.payload import seal_payload

__all__ = ["registrar"]  # the module-scoped `registrar run` fixture, on both brokers

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

PEM = serialization.Encoding.PEM
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Base]:
    """HQ + station + a site commissioned with bundle 1 (every TH- device of the station
    admitted) and one swtpm."""
    tmp = tmp_path_factory.mktemp("rollover")
    world = make_world(tmp / "w")
    bundle = world.bundle(
        devices=("TH-000001",), admit_stations=(STATION,), admit_products=("thermo",)
    )
    commission_site(world.site, bundle, world.site_secrets)
    site_ca = x509.load_pem_x509_certificate((world.site.current / "site-ca.pem").read_bytes())
    swtpm = Swtpm(tmp / "tpm0").start()
    tpm = Tpm(swtpm.tcti)
    try:
        yield Base(
            world,
            world.site.path,
            (world.hq.certs_dir / "root-ca.pem").read_bytes(),
            site_ca,
            world.site.key("site-ca", world.site_secrets),
            [tpm],
        )
    finally:
        tpm.close()
        swtpm.stop()


def telemetry_since(running: Running, since: float) -> set[str]:
    doc = json.loads((running.home / "run" / "status.json").read_text())
    return {e["device_id"] for e in doc["telemetry"]["recent"] if e["time"] > since}


async def until(check: Callable[[], object], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def openssl_verify(tmp: Path, root_pem: bytes, ca: x509.Certificate, leaf: x509.Certificate) -> str:
    (tmp / "root.pem").write_bytes(root_pem)
    (tmp / "ca.pem").write_bytes(ca.public_bytes(PEM))
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "ca.pem"),
         str(tmp / "leaf.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip() + done.stderr.strip()


async def broker_issuer(registrar: Running, ctx: ssl.SSLContext) -> x509.Name:
    """The issuer of the certificate the operational listener presents now."""
    _, writer = await asyncio.open_connection(
        registrar.operational.host, registrar.operational.port, ssl=ctx, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).issuer


async def mosquitto_pub(
    running: Running, base: Base, device: DeviceClient, cert: Path, key: Path
) -> int:
    """Exit code of `mosquitto_pub` (not our code) publishing one sealed reading with the
    given LDevID files on the device's telemetry topic."""
    reg = device.registered
    assert reg is not None
    topic = f"devices/{device.device_id.value}/telemetry"
    message = cert.with_suffix(".msg")
    message.write_bytes(seal_payload(reg.current_key, topic, b"mosquitto_pub reading"))
    (cert.parent / "root.pem").write_bytes(base.root_pem)
    op = running.operational
    process = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", op.host, "-p", str(op.port), "-q", "1",
        "--cafile", str(cert.parent / "root.pem"), "--cert", str(cert), "--key", str(key),
        "-i", device.device_id.value, "-t", topic, "-f", str(message),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), 15)


async def test_site_ca_rollover_without_downtime(
    base: Base, registrar: Running, tmp_path: Path
) -> None:
    hq_home = registrar.home.parent / "hq"  # this broker's own copy of HQ
    shutil.copytree(base.world.hq.path, hq_home)
    hq = ["--home", str(hq_home), "--passphrase-file", str(base.world.base / "hq.pass")]

    def hq_cli(*args: str) -> str:
        result = CliRunner().invoke(hq_main, [*args[:2], *hq, *args[2:]])
        assert result.exit_code == 0, result.output
        return result.output

    # -- before: three registered devices, two of them online sending telemetry
    a = tpm_device(base, "TH-000001", base.tpms[0])
    b, c = software_device(base, "TH-000102"), software_device(base, "TH-000103")
    for device in (a, b, c):
        await device.register(registrar.registration)
    old_ca = base.site_ca
    assert c.registered is not None and c.registered.ldevid.issuer == old_ca.subject
    old_c_context = c.operational_context()  # c's gen-1 LDevID, for the end
    figures: dict[str, object] = {"broker": registrar.broker}
    stop = asyncio.Event()
    renew = renew_or_register(registrar.registration, registrar.operational)
    agents = {d.device_id.value: DeviceAgent(d, registrar.operational, renew=renew) for d in (a, b)}
    tasks = [asyncio.create_task(agent.run(stop)) for agent in agents.values()]
    try:
        await until(lambda: all(x.stats.telemetry >= 3 for x in agents.values()), what="telemetry")

        # -- begin, HQ, activate (the registrar keeps running throughout)
        request, bundle = tmp_path / "rollover.cbor", tmp_path / "bundle-2"
        out = await registrar.acli("rollover-ca", "--out", str(request))
        assert "rollover begun" in out
        assert "rolled over" in await asyncio.to_thread(hq_cli, "site", "rollover", str(request))
        await asyncio.to_thread(
            hq_cli, "site", "bundle", "--site", SITE, "--device", "TH-000001",
            "--admit-station", STATION, "--admit-product", "thermo", "--out", str(bundle),
        )  # fmt: skip
        sent = {k: x.stats.telemetry for k, x in agents.items()}
        t_commission = time.monotonic()
        assert "rolled over" in await registrar.acli("commission", str(bundle))
        new_ca = x509.load_pem_x509_certificate(
            (registrar.home / "current" / "site-ca.pem").read_bytes()
        )
        assert new_ca.subject != old_ca.subject
        await until(
            lambda: (
                json.loads((registrar.home / "run" / "status.json").read_text())["site_ca"][
                    "retiring"
                ]
                is not None
            ),
            what="the registrar to load the new CA",
        )
        deadline = time.monotonic() + 10  # the broker reload follows the registrar's
        while await broker_issuer(registrar, old_c_context) != new_ca.subject:
            assert time.monotonic() < deadline, "the broker never presented the new CA"
            await asyncio.sleep(0.05)
        figures["activation_s"] = round(time.monotonic() - t_commission, 2)

        # -- overlap: the broker presents the new CA; old LDevIDs still connect; new
        #    registrations get the new CA; the online devices never stopped
        async with c.operational(registrar.operational) as session:
            reading = b"old LDevID during the overlap"
            await session.publish_telemetry(reading)
            await registrar.telemetry_seen("TH-000103", reading)
        d = software_device(base, "TH-000104")
        reg_d = await d.register(registrar.registration)
        assert reg_d.ldevid.issuer == new_ca.subject and reg_d.site_ca == new_ca
        assert openssl_verify(tmp_path, base.root_pem, new_ca, reg_d.ldevid).endswith("OK")
        assert "OK" not in openssl_verify(tmp_path, base.root_pem, old_ca, reg_d.ldevid)
        await until(
            lambda: all(x.stats.telemetry > sent[k] + 3 for k, x in agents.items()),
            what="telemetry across the activation",
        )
        assert all(x.stats.connects == 1 for x in agents.values())  # nobody was dropped
        out = await registrar.acli("rollover-ca", "--retire", code=2)
        assert "ca_in_use" in out and "TH-000103" in out
        # a standard client with c's gen-1 LDevID still gets in during the overlap
        old_files = tmp_path / "old"
        old_files.mkdir()
        old_cert, old_key = write_tls_files(old_files, c)
        assert await mosquitto_pub(registrar, base, c, old_cert, old_key) == 0

        # -- migrate: renew-now to every device on the old CA; c is offline and gets its
        #    (retained) command when it comes back
        t_migrate = time.monotonic()
        out = await registrar.acli("rollover-ca", "--migrate-all", passphrase=False)
        assert "renew-now sent to 3 device(s)" in out
        await until(
            lambda: all(x.stats.renewals == 1 and x.connected.is_set() for x in agents.values()),
            what="the online devices to renew",
        )
        figures["migrate_online_s"] = round(time.monotonic() - t_migrate, 2)
        agents["TH-000103"] = late = DeviceAgent(c, registrar.operational, renew=renew)
        tasks.append(asyncio.create_task(late.run(stop)))
        await until(lambda: late.stats.renewals == 1 and late.connected.is_set(), what="c")
        for device in (a, b, c):
            assert device.registered is not None
            assert device.registered.ldevid.issuer == new_ca.subject
            # moved by LDevID renewal over MQTT (authenticated by the old-CA LDevID, which
            # the registrar accepts during the overlap and renews at once), not re-registration
            assert [p.issuer for p in device.registered.previous] == [old_ca.subject]
            assert openssl_verify(
                tmp_path, base.root_pem, new_ca, device.registered.ldevid
            ).endswith("OK")
        status = json.loads(await registrar.acli("rollover-ca", "--status", "--json"))
        assert status["devices_on_retiring"] == 0 and status["devices_on_issuing"] == 4

        # -- retire: the old CA leaves the brokers' trust, its key is destroyed
        t_retire = time.monotonic()
        out = await registrar.acli("rollover-ca", "--retire")
        assert "retired" in out and "brokers reloaded" in out
        figures["retire_s"] = round(time.monotonic() - t_retire, 2)
        assert not (registrar.home / "keys" / "site-ca.key.pem").exists()
        assert await refused_at_tls(registrar.operational, old_c_context)
        assert await mosquitto_pub(registrar, base, c, old_cert, old_key) != 0
        sent = {k: x.stats.telemetry for k, x in agents.items()}
        await until(
            lambda: all(x.stats.telemetry > sent[k] + 3 for k, x in agents.items()),
            what="telemetry after the retirement",
        )
        retired_at = time.time()
        await until(
            lambda: telemetry_since(registrar, retired_at) == set(agents),
            what="the registrar to decrypt every device's telemetry after the retirement",
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    figures["longest_telemetry_gap_s"] = {
        k: round(x.stats.longest_gap, 2) for k, x in agents.items()
    }
    figures["connects"] = {k: x.stats.connects for k, x in agents.items()}
    print("rollover figures:", json.dumps(figures, sort_keys=True))  # shown with -s
    for name, agent in agents.items():
        assert agent.stats.issuers[-1] == new_ca.subject.rfc4514_string(), name
        assert not [e for e in agent.stats.errors if e.startswith("renew")], agent.stats.errors
        assert agent.stats.longest_gap < 5, (name, agent.stats.longest_gap)
