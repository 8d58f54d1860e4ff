"""The site registrar when things die under it: a corrupted ``registrar.db`` (refused at
start naming the file, nothing overwritten), a full disk while it writes its registry
(a local revocation: all of it or nothing, then done once space is back), and Mosquitto
killed with SIGKILL under a running registrar with devices registering and sending
telemetry (the registrar restarts it; everyone reconnects; nothing acknowledged is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509

from device_sim.agent import DeviceAgent, reregister
from device_sim.client import DeviceClient, DeviceRegistrationError
from registrar.broker import Endpoint
from registrar.site import commission_site
from tests.faults_support import (
    assert_one_line_error,
    command,
    run,
    run_with_little_space,
    sqlite_intact,
)
from tests.fixtures.ops_site import OpsSite, registrar_process, software_device
from tests.fixtures.site import STATION, make_world

pytestmark = [pytest.mark.slow]

EXIT_ERROR, EXIT_REFUSED = 1, 2  # registrar: failed / refused


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> OpsSite:
    """A commissioned site admitting the station's devices; TH-000001 and 2 registered."""
    world = make_world(tmp_path_factory.mktemp("faults-registrar") / "w")
    bundle = world.bundle(devices=("TH-000001", "TH-000002"), admit_stations=(STATION,))
    commission_site(world.site, bundle, world.site_secrets)
    ops = OpsSite(world, world.site.path, world.base / "site.pass")
    _register_offline(ops, ("TH-000001", "TH-000002"))
    return ops


def _register_offline(ops: OpsSite, devices: tuple[str, ...]) -> None:
    """Register devices against an embedded-broker registrar in this process."""
    from registrar.app import AppSettings, RegistrarApp
    from registrar.site import SiteHome, SiteSecrets

    async def go() -> None:
        app = RegistrarApp(
            SiteHome.open(ops.template),
            SiteSecrets(ops.passphrase_file),
            AppSettings(registration_port=0, operational_port=0),
        )
        await app.start()
        try:
            for device_id in devices:
                await software_device(ops.world, device_id).register(app.registration_endpoint)
        finally:
            await app.stop()

    asyncio.run(go())


def _registrar(ops: OpsSite, home: Path, *args: str) -> list[str]:
    secret = (
        [] if args[0] in ("devices", "status") else ["--passphrase-file", str(ops.passphrase_file)]
    )
    return command("registrar", args[0], "--home", str(home), *secret, *args[1:])


def _devices(home: Path) -> dict[str, str]:
    db = home / "registrar.db"
    sqlite_intact(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT device_id, status FROM devices").fetchall())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- corruption


def _corrupt_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:16] = b"not a database!\0"
    db.write_bytes(bytes(data))


def _corrupt_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    rng = random.Random(5)
    for offset in range(page, len(data), page):
        data[offset : offset + 64] = rng.randbytes(64)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_corrupt_header, _corrupt_pages])
def test_corrupted_registrar_db_is_refused(site: OpsSite, tmp_path: Path, corrupt) -> None:  # type: ignore[no-untyped-def]
    home = site.copy(tmp_path / "site")
    db = home / "registrar.db"
    corrupt(db)
    damaged = _digest(db)
    for args in (
        ("run", "--registration-port", "0", "--operational-port", "0"),
        ("revoke", "TH-000001"),
        ("devices",),
    ):
        out = run(_registrar(site, home, *args), timeout=60)
        print(args[0], out.code, out.stderr.strip())
        assert_one_line_error(out, EXIT_ERROR, str(db))
    assert _digest(db) == damaged  # nothing overwritten, nothing "repaired"


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_the_registry(site: OpsSite, tmp_path: Path) -> None:
    """``registrar revoke`` (registry row, event and site CRL) on a full filesystem with a
    little more room at each attempt (the write that fails moves from opening the
    database, to its transaction, to the CRL file), then with space. Every failure is one
    line naming what could not be written; the device ends revoked once, its serial on
    the site CRL, the other device untouched."""
    home = site.copy(tmp_path / "site")
    serial = _serial(home, "TH-000001")
    frees: list[int | None] = [*range(0, 49153, 8192), None]
    steps = [(free, _registrar(site, home, "revoke", "TH-000001")) for free in frees]
    outcomes = run_with_little_space(home, tmp_path / "fs", steps, size_kib=4096)
    failed = [o for o in outcomes if o.code != 0]
    for out in failed:
        line = assert_one_line_error(out, EXIT_ERROR, "error: ")
        assert "registrar.db" in line or "crls.pem" in line, line
    assert {("registrar.db" in o.stderr) for o in failed} == {True, False}, "sweep too narrow"
    first_ok = next(i for i, o in enumerate(outcomes) if o.code == 0)
    assert all(o.code == 0 for o in outcomes[first_ok:])  # space back: it works, and again
    assert "TH-000001 revoked" in outcomes[-1].stdout
    assert _devices(home) == {"TH-000001": "revoked", "TH-000002": "registered"}
    with contextlib.closing(sqlite3.connect(home / "registrar.db")) as conn:
        events = conn.execute(
            "SELECT count(*) FROM events WHERE device_id = 'TH-000001' AND kind = 'revoked'"
        ).fetchone()[0]
    assert events == 1  # revoked once, however many attempts
    pem = (home / "current" / "crls.pem").read_bytes()
    marker = b"-----BEGIN X509 CRL-----"
    revoked = {
        r.serial_number
        for block in pem.split(marker)[1:]
        for r in x509.load_pem_x509_crl(marker + block)
    }
    assert serial in revoked


def _serial(home: Path, device_id: str) -> int:
    with contextlib.closing(sqlite3.connect(home / "registrar.db")) as conn:
        row = conn.execute(
            "SELECT ldevid_serial FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
    return int(row[0], 16)


# ------------------------------------------------------------ the broker dies, comes back


def _status_doc(home: Path) -> dict[str, Any]:
    return json.loads((home / "run" / "status.json").read_text())  # type: ignore[no-any-return]


async def _wait_status(home: Path, check: Any, what: str, timeout: float = 30) -> dict[str, Any]:
    """Poll the running registrar's status document (rewritten every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            doc = _status_doc(home)
            if check(doc):
                return doc
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _register_with_retry(device: DeviceClient, endpoint: Endpoint) -> int:
    """What a device does when its registration connection dies: try again, backing off
    (0.2 s doubling, at most 2 s). Returns the attempts it took."""
    delay = 0.2
    for attempt in range(1, 30):
        try:
            await device.register(endpoint, timeout=5)
            return attempt
        except (aiomqtt.MqttError, OSError, DeviceRegistrationError) as exc:
            if isinstance(exc, DeviceRegistrationError) and not exc.retry:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
    raise AssertionError("registration never succeeded")


async def test_mosquitto_killed_under_the_registrar(site: OpsSite, tmp_path: Path) -> None:
    """SIGKILL of Mosquitto while a device sends QoS 1 telemetry and another registers:
    the registrar starts Mosquitto again on the same ports and its session comes back; the
    device mid-registration succeeds on retry; the telemetry device reconnects with
    back-off and re-sends the reading the dead broker never acknowledged.

    What is kept, reading by reading (the agent numbers them and moves on only after a
    PUBACK): every reading after the kill, also those the new Mosquitto acknowledged before
    the registrar was back (the revived broker loaded the registrar's persistent session,
    saved once it had subscribed, and queued them for it: docs/broker.md, "What a
    Mosquitto crash loses"), and every reading before the kill except at most the one the
    dead broker acknowledged and had not yet routed."""
    home = site.copy(tmp_path / "site")
    with registrar_process(site, home, tmp_path / "registrar.err", "mosquitto") as status:
        listeners = status["listeners"]
        assert isinstance(listeners, dict)
        registration = Endpoint(**listeners["registration"])
        operational = Endpoint(**listeners["operational"])
        sender = software_device(site.world, "TH-000003")
        await sender.register(registration)
        agent = DeviceAgent(sender, operational, renew=reregister(registration), interval=0.1)
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        acked_at: dict[int, float] = {}  # reading -> when its PUBACK was seen (±2 ms)

        async def note_acks() -> None:
            seen = 0
            while not stop.is_set():
                while seen < agent.reading:
                    acked_at[seen] = time.monotonic()
                    seen += 1
                await asyncio.sleep(0.002)

        noting = asyncio.create_task(note_acks())
        try:
            await asyncio.wait_for(agent.connected.wait(), 10)
            while agent.reading < 5:
                await asyncio.sleep(0.05)
            before = _status_doc(home)
            late = asyncio.create_task(
                _register_with_retry(software_device(site.world, "TH-000004"), registration)
            )
            await asyncio.sleep(0.02)  # its connection is being set up, or its request sent
            at_kill = agent.reading
            os.kill(before["broker_pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            back = await _wait_status(
                home,
                lambda d: d["broker_restarts"] == 1 and d["connected"],
                "Mosquitto was not restarted, or the registrar did not reconnect",
            )
            recovered_s = time.monotonic() - killed_at
            mark = agent.reading  # acknowledged from here on: the registrar is subscribed
            while agent.reading < mark + 10:
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await running
            await noting
        sent = agent.reading
        attempts = await asyncio.wait_for(late, 60)
        doc = await _wait_status(
            home,
            lambda d: d["telemetry"]["messages"] >= sent - mark,
            "telemetry did not arrive",
        )
        await asyncio.sleep(0.6)  # one more status write: late arrivals are counted too
        doc = _status_doc(home)
    assert back["broker_pid"] != before["broker_pid"]
    assert back["listeners"] == before["listeners"]  # same ports: devices need no new config
    assert agent.stats.connects >= 2  # the agent reconnected
    assert sent <= 50  # the status document lists the last 50 readings
    received_hashes = {r["sha256"] for r in doc["telemetry"]["recent"]}
    digest = {n: hashlib.sha256(f"reading {n}".encode()).hexdigest() for n in range(sent)}
    received = {n for n in range(sent) if digest[n] in received_hashes}
    lost = sorted(set(range(sent)) - received)
    # First reading the registrar got after the kill: from it on, nothing may be missing.
    first_after = min(n for n in received if n >= at_kill)
    assert set(range(first_after, sent)) <= received, lost
    assert set(range(mark, sent)) <= received, lost  # acknowledged after it resubscribed
    # Before the kill: everything, except the one reading the dead broker may have
    # acknowledged and not yet routed.
    assert len([n for n in lost if n < at_kill]) <= 1, (lost, at_kill)
    assert all(n >= at_kill - 1 for n in lost), (lost, at_kill)
    # Nothing acknowledged by the new broker is lost, also before the registrar was back:
    # the revived Mosquitto queued it for the registrar's saved session.
    assert not [n for n in lost if n >= at_kill], (lost, at_kill)
    # How long the new broker acknowledged readings before the registrar was back.
    queued = [n for n in range(at_kill, sent) if acked_at.get(n, 0.0) < killed_at + recovered_s]
    window = acked_at[queued[-1]] - acked_at[queued[0]] if queued else 0.0
    # QoS 1 is at least once: the reading in flight at the kill may arrive twice.
    duplicates = doc["telemetry"]["messages"] - (sent - len(lost))
    assert 0 <= duplicates <= 1, duplicates
    devices = _devices(home)
    assert devices["TH-000003"] == devices["TH-000004"] == "registered"
    print(
        f"broker back and registrar subscribed {recovered_s:.2f} s after the kill; "
        f"registration took {attempts} attempt(s); readings acknowledged {sent}, received "
        f"{doc['telemetry']['messages']} (lost: {len(lost)}, readings {lost}; queued for "
        f"the registrar by the new broker: {len(queued)} during {window:.2f} s); "
        f"duplicates {duplicates}; agent connects {agent.stats.connects}, "
        f"errors {agent.stats.errors}"
    )
