"""Payload-key rotation without a broker: the pure schedule and acknowledgement
(:mod:`trustcore.key_rotation`) and :class:`registrar.key_distribution.KeyDistributor` on a
real SQLite store, driven by a clock the test moves. The same path with real brokers and a
real ``registrar run`` process: ``tests/registrar/test_key_rotation_restarts.py``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from registrar.errors import ConfigError
from registrar.key_distribution import REPUSH_INTERVAL_S, KeyDistributor
from registrar.payload_keys import PayloadKeyring, PayloadKeyStore, listed_key_ids
from registrar.service import RegistrationService, SiteAuthority
from registrar.site import SiteConfig
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki, p256
from tests.fixtures.registration import ADMIT_STATION, Dev, make_dev, make_request, verifier
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId, SiteId
from trustcore.key_rotation import (
    DEFAULT_GRACE_S,
    KeyPeriod,
    KeyRotationError,
    KeySchedule,
    KeyState,
    build_key_ack,
    parse_grace,
    parse_key_ack,
)
from trustcore.payload import PayloadError, PayloadKey
from trustcore.registration import open_payload_key, parse_key_update
from trustcore.topics import key_ack_topic

K1, K2, K3 = (bytes([i]) * 8 for i in (1, 2, 3))
DAY = 86400


# ------------------------------------------------------------------------------ pure core


def test_schedule_supersedes_the_previous_key_and_counts_grace_from_then() -> None:
    s = KeySchedule((), grace_s=7 * DAY).with_current(K1, 1000)
    assert s.state(K1, 10**9) is KeyState.CURRENT and s.retires_at(K1) is None
    s = s.with_current(K2, 5000)
    assert s.period(K1) == KeyPeriod(K1, 1000, 5000)
    assert s.state(K1, 5000 + 7 * DAY - 1) is KeyState.GRACE
    assert s.state(K1, 5000 + 7 * DAY) is KeyState.RETIRED
    assert not s.accepts(K1, 5000 + 7 * DAY) and s.accepts(K2, 10**9)
    assert s.with_current(K2, 9999) is s  # already current: unchanged
    # a key that comes back (a bundle re-activates it) is current again; K2 superseded
    back = s.with_current(K1, 8000)
    assert back.current == KeyPeriod(K1, 8000) and back.period(K2) == KeyPeriod(K2, 5000, 8000)
    # a key never current here (legacy file): grace from when the current key began
    assert s.retires_at(K3) == 5000 + 7 * DAY


def test_schedule_refuses_impossible_states() -> None:
    with pytest.raises(KeyRotationError):
        KeySchedule((KeyPeriod(K1, 1), KeyPeriod(K2, 2)))  # two current keys
    with pytest.raises(KeyRotationError):
        KeyPeriod(K1, 10, 5)  # superseded before it was current
    with pytest.raises(KeyRotationError):
        KeySchedule((), grace_s=-1)
    with pytest.raises(KeyRotationError):
        KeyPeriod(b"short", 1)


def test_grace_durations() -> None:
    assert parse_grace("7d") == 7 * DAY == DEFAULT_GRACE_S
    assert (parse_grace("12h"), parse_grace("30m"), parse_grace("90s"), parse_grace("0")) == (
        43200,
        1800,
        90,
        0,
    )
    for bad in ("", "7w", "-1d", "1.5d", "366d", "d"):
        with pytest.raises(KeyRotationError):
            parse_grace(bad)


def test_key_ack_proves_possession_of_that_key_on_that_topic() -> None:
    device, other = DeviceId("dev-ack-1"), DeviceId("dev-ack-2")
    new, old = PayloadKey.generate(), PayloadKey.generate()
    held = {new.key_id: new, old.key_id: old}
    ack = parse_key_ack(held, device, build_key_ack(new, device, 1234))
    assert (ack.device_id, ack.key_id, ack.issued) == (device, new.key_id, 1234)
    assert key_ack_topic(device) == "devices/dev-ack-1/keys/ack"
    # moved to another device's topic: does not open (the AAD binds the topic)
    with pytest.raises(PayloadError):
        parse_key_ack(held, other, build_key_ack(new, device, 1))
    # sealed with a key the registrar does not hold: no proof
    with pytest.raises(PayloadError):
        parse_key_ack({old.key_id: old}, device, build_key_ack(new, device, 1))
    # opens, but is not an ack (e.g. telemetry bytes on the ack topic)
    from trustcore.payload import seal_payload

    with pytest.raises(KeyRotationError):
        parse_key_ack(held, device, seal_payload(new, key_ack_topic(device), b"hello"))


def test_site_json_grace_is_optional_validated_and_written() -> None:
    base = {
        "version": 1,
        "site_id": "site-01",
        "organization": "Acme",
        "created": 1,
        "broker_names": ["localhost"],
        "broker_ips": [],
    }
    assert SiteConfig.from_json(json.dumps(base)).payload_key_grace_s == DEFAULT_GRACE_S
    custom = SiteConfig.from_json(json.dumps({**base, "payload_key_grace_s": 3600}))
    assert custom.payload_key_grace_s == 3600
    assert json.loads(custom.to_json())["payload_key_grace_s"] == 3600
    for bad in (-1, 400 * DAY, "7d", True):
        with pytest.raises(ConfigError):
            SiteConfig.from_json(json.dumps({**base, "payload_key_grace_s": bad}))
    with pytest.raises(ConfigError):
        SiteConfig.from_json(json.dumps({**base, "grace": 1}))


def test_key_ids_are_listed_without_the_transport_key(tmp_path: Path) -> None:
    store = PayloadKeyStore(tmp_path / "payload-keys.cbor", SoftwareKey(p256("transport")))
    first = store.add(PayloadKey.generate()).current
    second = store.rotate().current
    assert listed_key_ids(store.path) == (second.key_id, [first.key_id, second.key_id])


# ---------------------------------------------------------------- distributor on SQLite


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class Rig:
    pki: Pki
    db: Path
    store: Store
    service: RegistrationService
    clock: Clock
    keyring: PayloadKeyring
    published: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, topic: str, message: bytes) -> None:
        self.published.append((topic, message))

    def distributor(self, store: Store | None = None, grace_s: int = 7 * DAY) -> KeyDistributor:
        return KeyDistributor(
            store=store or self.store,
            signer_for=lambda _record: SoftwareKey(self.pki.site_key),
            publish=self.publish,
            clock=self.clock,
            grace_s=grace_s,
        )

    def rotate(self) -> PayloadKeyring:
        new = PayloadKey.generate()
        self.keyring = PayloadKeyring(new, {**self.keyring.keys, new.key_id: new})
        self.service.use_payload_key(new)
        return self.keyring

    def update_for(self, dev: Dev, newer_than: int = 0) -> tuple[PayloadKey, int]:
        """The device side of the last update published to ``dev``."""
        topic = f"devices/{dev.device_id}/keys"
        message = [m for t, m in self.published if t == topic][-1]
        update = parse_key_update(
            message, device_id=dev.device_id, site_ca=self.pki.site_ca, newer_than=newer_than
        )
        return open_payload_key(dev.wrap_key, dev.device_id, update.payload_key), update.issued


@pytest.fixture
async def rig(pki: Pki, tmp_path: Path) -> AsyncIterator[Rig]:
    db = tmp_path / "registrar.db"
    store = await Store.open(db)
    first = PayloadKey.generate()
    clock = Clock(pki.now)
    service = RegistrationService(
        store=store,
        verifier=verifier(),
        admission=ADMIT_STATION,
        site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
        payload_key=first,
        clock=clock,
    )
    try:
        yield Rig(pki, db, store, service, clock, PayloadKeyring(first, {first.key_id: first}))
    finally:
        await store.close()


async def _register(rig: Rig, name: str) -> Dev:
    dev = make_dev(name)
    await rig.service.handle(dev.device_id, make_request(rig.pki, dev))
    return dev


async def _key_of(store: Store, dev: Dev) -> bytes:
    record = await store.device(dev.device_id)
    assert record is not None
    return record.payload_key_id


async def test_a_device_is_on_the_new_key_only_once_it_acknowledged_it(rig: Rig) -> None:
    keys = rig.distributor()
    await keys.start(rig.keyring)
    online, offline = await _register(rig, "dev-300001"), await _register(rig, "dev-300002")
    old = rig.keyring.current
    new = (ring := rig.rotate()).current
    await keys.use_keyring(ring)
    assert await keys.push_pending() == 2
    # sending changed nothing: both devices are still recorded on the old key
    assert await _key_of(rig.store, online) == old.key_id == await _key_of(rig.store, offline)
    key, issued = rig.update_for(online)
    assert key == new
    assert keys.ack_received(online.device_id, build_key_ack(key, online.device_id, issued))
    await keys.wait_idle()
    assert await _key_of(rig.store, online) == new.key_id
    assert await _key_of(rig.store, offline) == old.key_id
    # a retained copy of an ack proves nothing now; a forged one (wrong key) neither
    forged = build_key_ack(new, online.device_id, issued)
    assert not keys.ack_received(offline.device_id, forged)  # another device's ack
    assert not keys.ack_received(online.device_id, forged, retained=True)  # a stored copy
    await keys.wait_idle()
    assert await _key_of(rig.store, offline) == old.key_id
    rows = {r["key_id"]: r for r in await keys.rows()}
    assert rows[new.key_id.hex()]["devices"] == 1 and rows[old.key_id.hex()]["devices"] == 1
    assert rows[old.key_id.hex()]["state"] == "grace"
    # telemetry under the new key is proof as well
    assert keys.check_telemetry(offline.device_id, new.key_id)
    await keys.wait_idle()
    assert await _key_of(rig.store, offline) == new.key_id


async def test_restart_resends_with_a_newer_issued_until_acknowledged(rig: Rig) -> None:
    keys = rig.distributor()
    await keys.start(rig.keyring)
    dev = await _register(rig, "dev-300010")
    ring = rig.rotate()
    await keys.use_keyring(ring)
    await keys.push_pending()
    first_key, first_issued = rig.update_for(dev)
    # "restart": a new distributor and a new store connection on the same file, same second
    again = await Store.open(rig.db)
    try:
        restarted = rig.distributor(again)
        await restarted.start(ring)
        assert set(restarted.schedule.periods) == set(keys.schedule.periods)  # persisted
        assert await restarted.push_pending() == 1
        key, issued = rig.update_for(dev)
        assert key == first_key == ring.current and issued > first_issued
        # the device that missed nothing refuses nothing: the re-sent update is newer
        rig.update_for(dev, newer_than=first_issued)
        assert restarted.ack_received(dev.device_id, build_key_ack(key, dev.device_id, issued))
        await restarted.wait_idle()
        assert await restarted.push_pending() == 0
    finally:
        await again.close()


async def test_old_key_accepted_in_grace_refused_after_and_the_device_gets_the_key_again(
    rig: Rig,
) -> None:
    keys = rig.distributor(grace_s=3600)
    await keys.start(rig.keyring)
    dev = await _register(rig, "dev-300020")
    old = rig.keyring.current
    await keys.use_keyring(rig.rotate())
    await keys.push_pending()
    sent = len(rig.published)
    # telemetry sealed before the update arrived: accepted, no second update right away
    assert keys.check_telemetry(dev.device_id, old.key_id)
    await keys.wait_idle()
    assert len(rig.published) == sent
    # still on the old key later (within the grace period): the current key is sent again
    rig.clock.advance(seconds=REPUSH_INTERVAL_S)
    assert keys.check_telemetry(dev.device_id, old.key_id)
    await keys.wait_idle()
    assert len(rig.published) == sent + 1
    # rate-limited: a burst of old-key telemetry does not flood the broker
    for _ in range(20):
        assert keys.check_telemetry(dev.device_id, old.key_id)
    await keys.wait_idle()
    assert len(rig.published) == sent + 1
    # commands are sealed with the key the device holds while it is accepted
    assert await keys.key_for(dev.device_id) == old
    rig.clock.advance(seconds=3600)
    assert keys.schedule.state(old.key_id, int(rig.clock().timestamp())) is KeyState.RETIRED
    assert await keys.key_for(dev.device_id) == rig.keyring.current  # never a retired key
    assert not keys.check_telemetry(dev.device_id, old.key_id)
    assert keys.refused[old.key_id] == 1
    await keys.wait_idle()
    assert len(rig.published) == sent + 2  # pushed again (the interval is over)
    assert REPUSH_INTERVAL_S < 3600
    rows = {r["key_id"]: r for r in await keys.rows()}
    assert rows[old.key_id.hex()]["state"] == "retired"
    assert rows[old.key_id.hex()]["telemetry_refused"] == 1
    assert rows[old.key_id.hex()]["devices"] == 1  # still on it: it never acknowledged


async def test_rows_list_current_first_with_devices_per_key(rig: Rig) -> None:
    keys = rig.distributor()
    await keys.start(rig.keyring)
    await _register(rig, "dev-300030")
    await keys.use_keyring(rig.rotate())
    rows = await keys.rows()
    assert [r["state"] for r in rows] == ["current", "grace"]
    assert [r["devices"] for r in rows] == [0, 1]
    with pytest.raises(TrustCoreError):
        parse_grace("forever")


def test_key_ack_doc_vector_byte_for_byte() -> None:
    import re

    from trustcore import cbor
    from trustcore.payload import _seal

    text = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    match = re.search(r"<!-- vector: key-ack -->\s*```hex\n(.*?)```", text, re.S)
    assert match
    vector = bytes.fromhex("".join(match.group(1).split()))
    key = PayloadKey(bytes.fromhex("0001020304050607"), bytes(range(32)))
    device = DeviceId("dev-0001")
    plaintext = cbor.encode({"v": 1, "issued": 1767225600})
    assert _seal(key, key_ack_topic(device), plaintext, bytes(range(100, 112))) == vector
    ack = parse_key_ack({key.key_id: key}, device, vector)
    assert (ack.key_id, ack.issued) == (key.key_id, 1767225600)


def test_configure_sets_the_grace_period_and_refuses_bad_input(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from registrar.cli import main as registrar_main
    from registrar.site import SiteHome

    config = SiteConfig(SiteId("site-07"), "Acme", 1, ("localhost",), ())
    (tmp_path / "site.json").write_text(config.to_json())
    run = CliRunner()
    shown = run.invoke(registrar_main, ["configure", "--home", str(tmp_path)])
    assert shown.exit_code == 0 and "payload key grace: 7d" in shown.output
    done = run.invoke(
        registrar_main, ["configure", "--home", str(tmp_path), "--payload-key-grace", "12h"]
    )
    assert done.exit_code == 0 and "payload key grace: 12h" in done.output
    assert SiteHome.open(tmp_path).config.payload_key_grace_s == 12 * 3600
    bad = run.invoke(
        registrar_main, ["configure", "--home", str(tmp_path), "--payload-key-grace", "7w"]
    )
    assert bad.exit_code == 2 and "not a duration" in bad.output
    assert bad.exception is None or isinstance(bad.exception, SystemExit)
    assert SiteHome.open(tmp_path).config.payload_key_grace_s == 12 * 3600
