"""Two years without HQ, run inside a process on the fake clock (``tests/e2e/test_offline_year.py``
starts it with ``FakeClock.env()``; see that test's docstring).

Everything here (HQ, the site, the devices, ``registrar run`` and the Mosquitto it starts)
reads the same libfaketime file, so the devices check the broker's certificate, and the
brokers the devices' certificates, on the same simulated date. The scenario moves the date
while the registrar runs (its CRL tick must do the work, live), then the registrar is down
from day 750 to day 1000 (the start path). Prints one JSON report on stdout; any failed
check raises.

    python -m tests.offline_year_scenario BROKER WORKDIR
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_sim.client import DeviceClient, DeviceRegistrationError
from hq.site import SiteBundleRequest, build_site_bundle, record_station_crl
from registrar.broker import Endpoint
from registrar.site import commission_site, read_crls
from tests.fixtures.faketime import FakeClock
from tests.fixtures.offline_site import device
from tests.fixtures.site import SITE, STATION, make_world
from trustcore.crl import build_crl

REGISTRAR = Path(sys.executable).parent / "registrar"
DAY = timedelta(days=1)


class Registrar:
    """``registrar run`` on the inherited fake clock, with a fast CRL tick."""

    started: ClassVar[list[subprocess.Popen[bytes]]] = []

    def __init__(self, home: Path, passphrase_file: Path, broker: str, log: Path) -> None:
        self.home = home
        self.log = log
        status = home / "run" / "status.json"
        status.unlink(missing_ok=True)
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(REGISTRAR), "run", "--home", str(home),
                    "--passphrase-file", str(passphrase_file), "--broker", broker,
                    "--registration-port", "0", "--operational-port", "0",
                    "--crl-check-interval", "0.2",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        Registrar.started.append(self.process)
        deadline = time.monotonic() + 60
        while not status.exists():
            assert self.process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        listeners = self.status()["listeners"]
        self.registration = Endpoint(**listeners["registration"])
        self.operational = Endpoint(**listeners["operational"])

    def status(self) -> dict[str, Any]:
        doc = json.loads((self.home / "run" / "status.json").read_text())
        assert isinstance(doc, dict)
        return doc

    def telemetry_seen(self, device_id: str, data: bytes, timeout: float = 10) -> None:
        digest = hashlib.sha256(data).hexdigest()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recent = self.status()["telemetry"]["recent"]
            if any(e["device_id"] == device_id and e["sha256"] == digest for e in recent):
                return
            time.sleep(0.05)
        raise AssertionError(f"telemetry {data!r} of {device_id} not accepted: {recent}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        text = self.log.read_text()
        assert code == 0, text
        assert "Traceback" not in text, text


def served_certificate(endpoint: Endpoint) -> x509.Certificate:
    """The certificate the operational listener serves to a new handshake (TLS 1.3: the
    server's certificate arrives before the broker asks for ours)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((endpoint.host, endpoint.port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def until_served_after(endpoint: Endpoint, end: datetime, timeout: float = 15) -> x509.Certificate:
    """Wait until the listener serves a certificate that ends after ``end`` (the re-issued
    one, live: the readiness signal of the reload)."""
    deadline = time.monotonic() + timeout
    while True:
        cert = served_certificate(endpoint)
        if cert.not_valid_after_utc > end:
            return cert
        if time.monotonic() > deadline:
            raise AssertionError(f"still served: a certificate ending {cert.not_valid_after_utc}")
        time.sleep(0.05)


async def use_and_renew(reg: Registrar, dev: DeviceClient, label: str) -> str:
    """Connect with the current LDevID, send telemetry, renew (must be *renewed*, not
    registered again), connect with the new one and send telemetry."""
    assert dev.registered is not None
    async with dev.operational(reg.operational) as session:
        data = f"{label}:{dev.device_id.value}:before".encode()
        await session.publish_telemetry(data)
        reg.telemetry_seen(dev.device_id.value, data)
    old = dev.registered.ldevid.serial_number
    # 30 s, not the device's default 10: on a CI machine at load 10+ one answer was seen
    # to take longer (the request is re-sent every 3 s meanwhile).
    outcome = await dev.keep_certified(reg.registration, reg.operational, timeout=30.0)
    assert outcome == "renewed", outcome
    assert dev.registered.ldevid.serial_number != old
    async with dev.operational(reg.operational) as session:
        data = f"{label}:{dev.device_id.value}:after".encode()
        await session.publish_telemetry(data)
        reg.telemetry_seen(dev.device_id.value, data)
    return outcome


async def scenario(broker: str, work: Path) -> dict[str, Any]:
    clock = FakeClock.inherited()
    world = make_world(work / "w")
    # A station CRL that outlives the test (the world's lasts 7 days): otherwise the
    # registration listener refuses the late device at the TLS handshake (the station CRL
    # it checks is stale, fail closed, no reason given) before the registrar can answer.
    now = clock.now()
    station_crl = build_crl(
        world.station_ca,
        world.station_key.private_key(),
        revoked=[],
        crl_number=2,
        this_update=now - DAY,
        next_update=now + 3 * 365 * DAY,
    )
    record_station_crl(world.hq, STATION, station_crl.public_bytes(serialization.Encoding.DER))
    bundle = build_site_bundle(
        world.hq, SiteBundleRequest(site_id=SITE, admit_stations=(STATION,)), world.hq_secrets
    )
    commission_site(world.site, bundle.package, world.site_secrets)
    home = world.site.path
    t0 = clock.now()
    root = world.hq.root_certificate()
    root_crl_end = next(
        c for c in read_crls(world.site) if c.issuer == root.subject
    ).next_update_utc
    first = x509.load_pem_x509_certificate((home / "current" / "broker.pem").read_bytes())
    assert root_crl_end is not None
    report: dict[str, Any] = {
        "broker": broker,
        "root_crl_days": (root_crl_end - t0).days,
        "first_service_cert_days": (first.not_valid_after_utc - t0).days,
        "phases": [],
    }
    log = work / f"registrar-{broker}.log"
    reg = Registrar(home, world.base / "site.pass", broker, log)
    devices = [device(world, f"TH-00002{n}") for n in (1, 2)]
    late = device(world, "TH-000029")  # made at t0, brought to the site two years later
    for dev in devices:
        await dev.register(reg.registration)

    # Day 250: the service certificates are past half their life. The running registrar
    # re-issues them (CRL tick) and reloads the broker; a session open across the reload
    # stays up and is still accepted.
    async with devices[0].operational(reg.operational) as session:
        await session.publish_telemetry(b"day0")
        reg.telemetry_seen(devices[0].device_id.value, b"day0")
        clock.set(t0 + 250 * DAY)
        served = until_served_after(reg.operational, first.not_valid_after_utc)
        await session.publish_telemetry(b"day250 same session")
        reg.telemetry_seen(devices[0].device_id.value, b"day250 same session")
    report["phases"].append(
        {"day": 250, "served_until_days": (served.not_valid_after_utc - t0).days}
    )
    for dev in devices:
        await use_and_renew(reg, dev, "day250")

    # Days 500 and 750: past the root CRL's nextUpdate and past the first service
    # certificate's end; still no HQ contact.
    for day in (500, 750):
        clock.set(t0 + day * DAY)
        previous = served.not_valid_after_utc
        served = until_served_after(reg.operational, previous)
        assert served.not_valid_before_utc <= clock.now() < served.not_valid_after_utc
        assert clock.now() > root_crl_end and clock.now() > first.not_valid_after_utc
        for dev in devices:
            await use_and_renew(reg, dev, f"day{day}")
        report["phases"].append(
            {"day": day, "served_until_days": (served.not_valid_after_utc - t0).days}
        )
    status = reg.status()
    assert status["hq_revocation_data"]["state"] == "refusing", status["hq_revocation_data"]

    # The start path: the registrar is down from day 750 to day 1000. At start it re-issues
    # the service certificates (past half their life by then) before its broker starts,
    # and its own session must connect with its client certificate.
    reg.stop()
    down_from = served.not_valid_after_utc
    clock.set(t0 + 1000 * DAY)
    reg = Registrar(home, world.base / "site.pass", broker, log)
    served = served_certificate(reg.operational)
    assert served.not_valid_after_utc > down_from, served.not_valid_after_utc
    assert served.not_valid_before_utc <= clock.now()
    report["restart"] = {"day": 1000, "served_until_days": (served.not_valid_after_utc - t0).days}
    shown = reg.status()["service_certificates"]
    assert shown["broker"] == served.not_valid_after_utc.isoformat(), shown
    assert shown["registrar-client"] == shown["broker"], shown
    for dev in devices:
        await use_and_renew(reg, dev, "day1000 after restart")
    # Refused, fail closed. Mosquitto checks only the leaf's CRL at the handshake (the
    # station CRL, still valid here), so the registrar answers with the reason; the
    # embedded broker checks the whole chain on the registration listener
    # (VERIFY_CRL_CHECK_CHAIN), so the stale root CRL already refuses the handshake.
    try:
        await late.register(reg.registration, timeout=5)
    except DeviceRegistrationError as exc:
        report["late_registration"] = exc.reason
    except aiomqtt.MqttError:
        report["late_registration"] = "handshake_refused"
    else:
        raise AssertionError("a registration past the offline limit was accepted")
    reg.stop()
    text = log.read_text()
    report["service_reissues"] = text.count("service certificates re-issued")
    report["root_crl_stale_alert"] = "STALE CRL of" in text
    return report


def main() -> None:
    broker, work = sys.argv[1], Path(sys.argv[2])
    assert os.environ.get("FAKETIME_TIMESTAMP_FILE"), "start me with FakeClock.env()"
    try:
        print(json.dumps(asyncio.run(scenario(broker, work))))
    finally:
        for process in Registrar.started:  # a failed check must not leave a registrar behind
            if process.poll() is None:
                process.kill()
                process.wait(10)


if __name__ == "__main__":
    main()
