"""A site cut off from HQ (issue 8, item 3) with real registrar and broker processes.

The site's bundle allows one day without fresh HQ revocation data. A device registers
(its IDevID names the HQ CRL signer, so the registrar checks it against HQ's indirect
CRL); then the registrar is restarted two days later (libfaketime on the real registrar
process and the broker it starts) and, with the same HQ data: the registered device still
connects and its telemetry is accepted, a new device is refused with
``revocation_unavailable``, and ``status.json`` says why. Then HQ publishes fresh data
(``hq publish-revocations``), the site imports it and registers again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from device_sim.client import DeviceRegistrationError
from hq.site import SiteBundleRequest, build_site_bundle
from registrar.broker import Endpoint
from registrar.cli import main as registrar_main
from registrar.site import commission_site
from tests.fixtures.offline_site import device
from tests.fixtures.site import SITE, STATION, World, make_world

REGISTRAR = Path(sys.executable).parent / "registrar"
HQ = Path(sys.executable).parent / "hq"
#: the thread-safe build: the plain one returned wrong dates to concurrent threads
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = make_world(tmp_path_factory.mktemp("offline") / "w")
    result = build_site_bundle(
        world.hq,
        SiteBundleRequest(site_id=SITE, admit_stations=(STATION,), max_offline_days=1),
        world.hq_secrets,
    )
    commission_site(world.site, result.package, world.site_secrets)
    return world


class Registrar:
    """``registrar run`` as a real process, optionally under libfaketime."""

    def __init__(self, world: World, home: Path, broker: str, faketime: str | None) -> None:
        self.home = home
        env = dict(os.environ)
        if faketime is not None:
            env.update(LD_PRELOAD=str(FAKETIME_LIB), FAKETIME=faketime)
        self.log = home.parent / f"registrar-{broker}-{faketime or 'now'}.log"
        status = home / "run" / "status.json"
        status.unlink(missing_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    str(REGISTRAR), "run", "--home", str(home),
                    "--passphrase-file", str(world.base / "site.pass"), "--broker", broker,
                    "--registration-port", "0", "--operational-port", "0",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not status.exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        listeners = self.status()["listeners"]
        self.registration = Endpoint(**listeners["registration"])
        self.operational = Endpoint(**listeners["operational"])

    def status(self) -> dict[str, Any]:
        doc = json.loads((self.home / "run" / "status.json").read_text())
        assert isinstance(doc, dict)
        return doc

    def telemetry_seen(self, device_id: str, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["device_id"] == device_id for e in self.status()["telemetry"]["recent"]):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        text = self.log.read_text()
        assert code == 0, text
        assert "Traceback" not in text, text
        return text


@pytest.fixture
def running() -> Iterator[list[Registrar]]:
    started: list[Registrar] = []
    yield started
    for r in started:
        if r.process.poll() is None:
            r.process.kill()
            r.process.wait(10)


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
async def test_site_past_its_offline_limit_keeps_devices_and_refuses_new_ones(
    world: World, broker: str, tmp_path: Path, running: list[Registrar]
) -> None:
    assert FAKETIME_LIB.exists(), "libfaketime is needed (apt-get install libfaketime)"
    home = tmp_path / "site"
    shutil.copytree(world.site.path, home, symlinks=True)
    early = device(world, "TH-000011")
    late = device(world, "TH-000012", ahead=timedelta(days=2))

    now = Registrar(world, home, broker, None)
    running.append(now)
    assert now.status()["hq_revocation_data"]["state"] == "ok"
    await early.register(now.registration)
    now.stop()

    later = Registrar(world, home, broker, "+2d")  # two days without HQ, limit one day
    running.append(later)
    status = later.status()
    assert status["hq_revocation_data"]["state"] == "refusing"
    assert status["hq_revocation_data"]["max_offline_days"] == 1
    assert any("STALE" in a and "limit of 1 days" in a for a in status["alerts"])
    shown = await asyncio.to_thread(
        CliRunner().invoke, registrar_main, ["status", "--home", str(home)]
    )
    assert shown.exit_code == 0 and "refusing" in shown.output and "ALERT" in shown.output
    # The registered device is not cut off: it connects and its telemetry is accepted.
    async with early.operational(later.operational) as session:
        await session.publish_telemetry(b"temperature=20.5")
        assert later.telemetry_seen("TH-000011")
    # A new registration is refused, with the public reason and a clear log line.
    with pytest.raises(DeviceRegistrationError) as info:
        await late.register(later.registration)
    assert info.value.reason == "revocation_unavailable"
    # HQ publishes fresh data (no root key; HQ runs on the same faked date), the site
    # imports it through the running registrar's spool, and registrations resume.
    fresh = tmp_path / "revocations.sealed"
    env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+2d"}
    done = subprocess.run(
        [
            str(HQ), "publish-revocations", "--home", str(world.hq.path), "--out", str(fresh),
            "--passphrase-file", str(world.base / "hq.pass"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = await asyncio.to_thread(
        CliRunner().invoke,
        registrar_main,
        ["import-revocations", str(fresh), "--home", str(home),
         "--passphrase-file", str(world.base / "site.pass")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    registered = await late.register(later.registration)
    assert registered.ldevid.issuer.rfc4514_string().endswith(f"CN=Site CA {SITE}")
    deadline = time.monotonic() + 5  # status.json is rewritten every 0.5 s
    while later.status()["hq_revocation_data"]["state"] != "ok":
        assert time.monotonic() < deadline, later.status()["hq_revocation_data"]
        time.sleep(0.1)
    log = later.stop()
    assert "past this site's limit of 1 days" in log
