"""Payload-key updates survive restarts, and old keys retire after the grace period: a real
``registrar run`` process on BOTH brokers, swtpm devices, and the registrar's clock moved
with libfaketime (no sleeping through the grace period).

The story, per broker: two swtpm devices and a software device register; one swtpm device
goes offline; the key is rotated live (the online device acknowledges at once); the
registrar is restarted (on Mosquitto that is also a new broker process: every retained
message is gone on either broker); the offline device connects, gets the current key,
switches to it and its telemetry opens under the new key id. Then the registrar's clock
jumps past the grace period: telemetry under the old key is refused and counted, the device
that sent it gets the current key pushed again, and ``registrar status`` shows per key how
many devices are still on it.

libfaketime (Debian ``libfaketime``) is preloaded into the registrar only
(``FAKETIME_SKIP_CMDS=mosquitto``); its offset is read from a file the test rewrites, and
the test waits for the registrar's own status document to show the new time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from click.testing import CliRunner

from device_sim.client import DeviceClient, Registered
from registrar.broker import Endpoint
from registrar.cli import main as registrar_main
from tests.fixtures.registrar_run import (
    REGISTRAR,
    Base,
    base,
    refused_at_tls,
    software_device,
    tpm_device,
)
from trustcore.identity import DeviceId
from trustcore.payload import seal_payload
from trustcore.registration import open_payload_key, parse_key_update
from trustcore.topics import device_topic

__all__ = ["base"]  # the module-scoped world of the integration tests (swtpm devices)

pytestmark = [pytest.mark.tpm, pytest.mark.slow]

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
GRACE = "1h"
JUMP_S = 2 * 3600  # past the grace period, far inside every certificate's and CRL's life


@dataclass
class Registrar:
    """One ``registrar run`` process under libfaketime (restartable)."""

    broker: str
    home: Path
    passphrase_file: Path
    faketime_file: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    registration: Endpoint | None = None
    operational: Endpoint | None = None

    def cli(self, *args: str, passphrase: bool = True) -> str:
        extra = ["--passphrase-file", str(self.passphrase_file)] if passphrase else []
        result = CliRunner().invoke(registrar_main, [*args, "--home", str(self.home), *extra])
        assert result.exit_code == 0, result.output
        return result.output

    async def acli(self, *args: str, passphrase: bool = True) -> str:
        return await asyncio.to_thread(self.cli, *args, passphrase=passphrase)

    def start(self) -> None:
        status = self.home / "run" / "status.json"
        env = {
            **os.environ,
            "LD_PRELOAD": str(FAKETIME_LIB),
            "FAKETIME_TIMESTAMP_FILE": str(self.faketime_file),
            "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_SKIP_CMDS": "mosquitto",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(REGISTRAR), "run", "--home", str(self.home),
                    "--passphrase-file", str(self.passphrase_file), "--broker", self.broker,
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
        listeners = json.loads(status.read_text())["listeners"]
        self.registration = Endpoint(**listeners["registration"])
        self.operational = Endpoint(**listeners["operational"])

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.process = None
        text = self.log.read_text()
        assert code == 0, text
        assert "Traceback" not in text, text

    def status_doc(self) -> dict[str, Any]:
        doc = json.loads((self.home / "run" / "status.json").read_text())
        assert isinstance(doc, dict)
        return doc

    async def wait_status(self, check: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        """Poll the running registrar's status document (rewritten every 0.5 s)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                doc = self.status_doc()
                if check(doc):
                    return doc
            except (OSError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, f"{what}; log: {self.log.read_text()[-3000:]}"
            await asyncio.sleep(0.1)

    async def move_clock(self, seconds: int) -> None:
        """Move the registrar's clock (libfaketime offset) and wait until it shows."""
        target = time.time() + seconds - 5
        self.faketime_file.write_text(f"+{seconds}\n")
        await self.wait_status(
            lambda d: d["now"] >= target and d["connected"], "the registrar clock did not move"
        )

    def key_rows(self, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {row["key_id"]: row for row in doc["payload_keys"]}


@pytest.fixture(params=["embedded", "mosquitto"])
def registrar(request: pytest.FixtureRequest, base: Base, tmp_path: Path) -> Iterator[Registrar]:
    if not FAKETIME_LIB.exists():
        pytest.fail(f"libfaketime is required ({FAKETIME_LIB}): apt-get install libfaketime")
    home = tmp_path / "site"
    shutil.copytree(base.site_template, home, symlinks=True)
    faketime = tmp_path / "faketime"
    faketime.write_text("+0\n")
    reg = Registrar(
        str(request.param),
        home,
        base.world.base / "site.pass",
        faketime,
        tmp_path / "registrar.log",
    )
    assert "1h" in reg.cli("configure", "--payload-key-grace", GRACE, passphrase=False)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


async def _wait_key(registered: Registered, key_id: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while registered.current_key_id != key_id:
        assert time.monotonic() < deadline, "the key update did not arrive"
        await asyncio.sleep(0.05)


async def _telemetry_key(reg: Registrar, device: str, marker: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(marker).hexdigest()
    doc = await reg.wait_status(
        lambda d: any(
            e["device_id"] == device and e["sha256"] == digest for e in d["telemetry"]["recent"]
        ),
        f"the registrar never decrypted that telemetry of {device}",
    )
    return next(e["key_id"] for e in doc["telemetry"]["recent"] if e["sha256"] == digest)


async def test_offline_device_gets_the_current_key_after_restarts_and_old_key_retires(
    base: Base, registrar: Registrar
) -> None:
    reg = registrar
    assert reg.registration is not None and reg.operational is not None
    online = tpm_device(base, "TH-000701", base.tpms[0])
    offline = tpm_device(base, "TH-000702", base.tpms[1])
    laggard: DeviceClient = software_device(base, "TH-000703")
    await asyncio.gather(*(d.register(reg.registration) for d in (online, offline, laggard)))
    assert online.registered and offline.registered and laggard.registered
    old = offline.registered.current_key_id

    # -- rotation while `offline` is away; `online` acknowledges at once ---------------------
    async with online.operational(reg.operational) as session:
        rotated = json.loads(await reg.acli("rotate-payload-key", "--json"))
        new = bytes.fromhex(rotated["key_id"])
        assert rotated["live"] and rotated["updates_published"] == 3 and new != old
        await _wait_key(online.registered, new)
        doc = await reg.wait_status(
            lambda d: reg.key_rows(d)[new.hex()]["devices"] == 1, "the ack was not recorded"
        )
        assert session.key_acks == 1
    rows = reg.key_rows(doc)
    assert rows[old.hex()]["state"] == "grace" and rows[old.hex()]["devices"] == 2
    assert rows[new.hex()]["state"] == "current"

    # -- restart: a new registrar (and, on Mosquitto, a new broker process) --------------------
    reg.stop()
    reg.start()
    assert reg.operational is not None and reg.registration is not None
    async with offline.operational(reg.operational) as session:
        await _wait_key(offline.registered, new)
        marker = b"offline device, after the restart"
        await session.publish_telemetry(marker)
        assert await _telemetry_key(reg, "TH-000702", marker) == new.hex()
    doc = await reg.wait_status(
        lambda d: reg.key_rows(d)[new.hex()]["devices"] == 2, "offline device not on the new key"
    )
    assert reg.key_rows(doc)[old.hex()]["devices"] == 1  # only the laggard is left on it

    # -- within the grace period the old key is still accepted ------------------------------
    device = DeviceId("TH-000703")
    telemetry = device_topic(device, "telemetry")
    laggard_reg = laggard.registered
    async with aiomqtt.Client(
        reg.operational.host,
        reg.operational.port,
        identifier=device.value,
        tls_context=laggard.operational_context(),
    ) as raw:
        marker = b"laggard, old key, in the grace period"
        sealed = seal_payload(laggard_reg.payload_keys[old], telemetry, marker)
        await raw.publish(telemetry, sealed, qos=1)
        assert await _telemetry_key(reg, "TH-000703", marker) == old.hex()

    # -- the grace period ends (the registrar's clock moves; nobody sleeps) -----------------
    await reg.move_clock(JUMP_S)
    # and 15 s more: any update a reconnection after the jump sent is older than the 10 s
    # re-send guard, so what the laggard gets below can only come from the re-push
    await reg.move_clock(JUMP_S + 15)
    doc = reg.status_doc()
    assert reg.key_rows(doc)[old.hex()]["state"] == "retired"
    keys_topic = device_topic(device, "keys")
    async with aiomqtt.Client(
        reg.operational.host,
        reg.operational.port,
        identifier=device.value,
        tls_context=laggard.operational_context(),
    ) as raw:
        # drop the retained update: from now on only a re-push can bring the key
        await raw.publish(keys_topic, b"", qos=1, retain=True)
        await raw.subscribe(keys_topic, qos=1)
        stale = seal_payload(laggard_reg.payload_keys[old], telemetry, b"under the retired key")
        await raw.publish(telemetry, stale, qos=1)
        message = await asyncio.wait_for(anext(aiter(raw.messages)), 20)
        update = parse_key_update(
            bytes(message.payload),  # type: ignore[arg-type]
            device_id=device,
            site_ca=laggard_reg.site_ca,
            newer_than=laggard_reg.key_issued,
        )
        pushed = open_payload_key(laggard_reg.wrap_key, device, update.payload_key)
        assert pushed.key_id == new
    doc = await reg.wait_status(
        lambda d: d["telemetry"]["retired_key"] >= 1, "retired-key telemetry was not refused"
    )
    assert reg.key_rows(doc)[old.hex()]["telemetry_refused"] == 1
    # the laggard's own session takes the key and is served again
    async with laggard.operational(reg.operational) as session:
        await _wait_key(laggard_reg, new)
        marker = b"laggard, back on the current key"
        await session.publish_telemetry(marker)
        assert await _telemetry_key(reg, "TH-000703", marker) == new.hex()
    doc = await reg.wait_status(
        lambda d: reg.key_rows(d)[new.hex()]["devices"] == 3, "laggard not on the new key"
    )
    assert reg.key_rows(doc)[old.hex()]["devices"] == 0
    # what the operator reads: per key, its state and how many devices are still on it
    out = json.loads(await reg.acli("status", "--json", passphrase=False))
    assert {r["key_id"]: r["devices"] for r in out["payload_keys"]}[new.hex()] == 3
    text = await reg.acli("status", passphrase=False)
    assert "payload keys (grace 1h)" in text
    assert new.hex() in text and old.hex() in text and "retired" in text


@pytest.fixture
def mosquitto_registrar(base: Base, tmp_path: Path) -> Iterator[Registrar]:
    home = tmp_path / "site"
    shutil.copytree(base.site_template, home, symlinks=True)
    faketime = tmp_path / "faketime"
    faketime.write_text("+0\n")
    reg = Registrar("mosquitto", home, base.world.base / "site.pass", faketime, tmp_path / "log")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


async def test_mosquitto_dies_after_a_rotation_and_the_offline_device_still_gets_the_key(
    base: Base, mosquitto_registrar: Registrar
) -> None:
    """Only the broker restarts (killed; the registrar brings it back on the same ports):
    its retained messages are gone, and the registrar re-sends the pending update as soon
    as its session is back. A device revoked before the crash stays refused after it."""
    reg = mosquitto_registrar
    assert reg.registration is not None and reg.operational is not None
    device = tpm_device(base, "TH-000711", base.tpms[2])
    revoked = software_device(base, "TH-000712")
    registered, _ = await asyncio.gather(
        device.register(reg.registration), revoked.register(reg.registration)
    )
    await reg.acli("revoke", "TH-000712")
    rotated = json.loads(await reg.acli("rotate-payload-key", "--json"))
    new = bytes.fromhex(rotated["key_id"])
    assert rotated["updates_published"] == 1 and registered.current_key_id != new
    before = reg.status_doc()
    os.kill(before["broker_pid"], signal.SIGKILL)
    after = await reg.wait_status(
        lambda d: d["broker_restarts"] == 1 and d["connected"] and d["key_updates"]["sent"] >= 2,
        "mosquitto was not restarted, or the update was not re-sent",
    )
    assert after["broker_pid"] != before["broker_pid"]
    assert after["listeners"] == before["listeners"]  # same ports: devices need no new config
    assert await refused_at_tls(reg.operational, revoked.operational_context())
    async with device.operational(reg.operational) as session:
        await _wait_key(registered, new)
        assert session.key_acks == 1
    doc = await reg.wait_status(
        lambda d: reg.key_rows(d)[new.hex()]["devices"] == 1, "the ack was not recorded"
    )
    assert reg.key_rows(doc)[new.hex()]["state"] == "current"
