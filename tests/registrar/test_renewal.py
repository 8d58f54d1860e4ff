"""LDevID renewal without a broker: the pure decision (``trustcore.renewal``) reason by
reason, and ``RegistrationService.handle_renewal`` on real SQLite files (new key, idempotent
retries, the chain of certificates, the superseded hook before the answer, the rate limit,
expired LDevIDs re-registering under the site policy, schema migration)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.client import DeviceClient, DeviceCredentials, SoftwareKeys
from registrar.errors import ConfigError
from registrar.ldevid_policy import read_ldevid_policy, write_ldevid_policy
from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki
from tests.fixtures.registration import ADMIT_STATION, make_dev, verifier
from tests.fixtures.renewal import Facts, ldevid, renewal
from trustcore import cbor
from trustcore.csr import build_device_csr
from trustcore.errors import InvalidValueError
from trustcore.identity import CertSerial, DeviceId
from trustcore.payload import PayloadKey
from trustcore.registration import (
    RegistrationDenied,
    RegistrationError,
    RegistrationGranted,
    parse_response,
)
from trustcore.renewal import (
    LdevidPolicy,
    build_renewal_request,
    parse_renewal_request,
    renew_from,
    renewal_due,
    verify_renewal,
)
from trustcore.topics import (
    RENEWAL_REQUEST_LEVELS,
    device_of,
    renewal_request_topic,
    renewal_response_topic,
)

DAY = timedelta(days=1)
DER = serialization.Encoding.DER


# ------------------------------------------------------------------------- pure decision


def reason_of(
    pki: Pki,
    request: bytes,
    facts: Facts,
    *,
    now: datetime,
    topic: str = "dev-500001",
    policy: LdevidPolicy | None = None,
) -> str:
    try:
        verify_renewal(
            parse_renewal_request(request),
            topic_device_id=DeviceId(topic),
            site_cas=[pki.site_ca],
            facts=facts.build(),
            now=now,
            policy=policy or LdevidPolicy(),
        )
    except RegistrationError as exc:
        return exc.reason
    return "ok"


def test_every_renewal_refusal_has_its_reason(pki: Pki) -> None:
    start = pki.now - 25 * DAY
    now = pki.now
    cur = ldevid(pki, "dev-500001", start=start, days=30)
    serial = cur.cert.serial_number
    facts = Facts(serial, issued_at=start)
    good, _ = renewal(pki, cur)
    assert reason_of(pki, good, facts, now=now) == "ok"
    assert reason_of(pki, good, facts, now=now, topic="dev-500002") == "device_mismatch"
    foreign = ldevid(pki, "dev-500001", start=start, ca="station")
    assert reason_of(pki, renewal(pki, foreign)[0], facts, now=now) == "ldevid_unknown"
    other = ldevid(pki, "dev-500009", start=start)
    named_other, _ = renewal(pki, other, name="dev-500001")
    assert reason_of(pki, named_other, facts, now=now) == "device_mismatch"
    forged, _ = renewal(pki, cur, signer=SoftwareKey.ephemeral())
    assert reason_of(pki, forged, facts, now=now) == "bad_signature"
    stale, _ = renewal(pki, cur, when=now - timedelta(minutes=6))
    assert reason_of(pki, stale, facts, now=now) == "stale_request"
    replay = Facts(serial, issued_at=start, nonce_seen=True)
    assert reason_of(pki, good, replay, now=now) == "replayed_nonce"
    assert reason_of(pki, good, Facts(None), now=now) == "ldevid_unknown"
    assert reason_of(pki, good, Facts(serial, status="revoked"), now=now) == "ldevid_revoked"
    newer = Facts(serial + 1, superseded=frozenset({serial}), issued_at=start)
    assert reason_of(pki, good, newer, now=now) == "ldevid_superseded"
    assert reason_of(pki, good, Facts(serial + 1), now=now) == "ldevid_unknown"
    late = now + 10 * DAY
    expired, _ = renewal(pki, cur, when=late)
    assert reason_of(pki, expired, facts, now=late) == "ldevid_expired"
    young = Facts(serial, issued_at=now - timedelta(minutes=30))
    assert reason_of(pki, good, young, now=now) == "too_early"
    # A young certificate may renew when the site allows it (min_interval 0).
    relaxed = LdevidPolicy(min_interval=timedelta(0))
    assert reason_of(pki, good, young, now=now, policy=relaxed) == "ok"
    same_key, _ = renewal(pki, cur, new_key=cur.key)
    assert reason_of(pki, same_key, facts, now=now) == "csr_reused_key"
    owned = Facts(serial, issued_at=start, key_owner=DeviceId("dev-500001"))
    assert reason_of(pki, good, owned, now=now) == "csr_reused_key"
    foreign_key = Facts(serial, issued_at=start, key_owner=DeviceId("dev-599999"))
    assert reason_of(pki, good, foreign_key, now=now) == "csr_foreign_key"
    wrong_name = build_renewal_request(
        device_id=DeviceId("dev-500001"),
        nonce=os.urandom(32),
        time=int(now.timestamp()),
        csr_der=build_device_csr(SoftwareKey.ephemeral(), DeviceId("dev-500002")),
        ldevid_der=cur.cert.public_bytes(DER),
        ldevid_key=cur.key,
    )
    assert reason_of(pki, wrong_name, facts, now=now) == "csr_wrong_name"


def test_renewal_request_parsing_is_strict(pki: Pki) -> None:
    cur = ldevid(pki, "dev-500001", start=pki.now - DAY)
    good, _ = renewal(pki, cur)
    parsed = parse_renewal_request(good)
    assert parsed.device_id == DeviceId("dev-500001")
    assert parsed.csr_key_id is not None
    for junk, reason in [
        (b"", "malformed"),
        (os.urandom(200), "malformed"),
        (b"\x00" * 5000, "oversized"),
        (good[:-3], "malformed"),
    ]:
        with pytest.raises(RegistrationError) as err:
            parse_renewal_request(junk)
        assert err.value.reason == reason
    outer = cbor.decode(good, max_size=8192)
    body = cbor.decode(outer["body"], max_size=8192)
    body["extra"] = 1
    with pytest.raises(RegistrationError) as err:
        parse_renewal_request(cbor.encode({"body": cbor.encode(body), "sig": outer["sig"]}))
    assert err.value.reason == "malformed"
    body.pop("extra")
    body["v"] = 2
    with pytest.raises(RegistrationError) as err:
        parse_renewal_request(cbor.encode({"body": cbor.encode(body), "sig": outer["sig"]}))
    assert err.value.reason == "unsupported_version"


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=600),
    field_name=st.sampled_from(["v", "device_id", "nonce", "time", "csr", "ldevid"]),
    value=st.one_of(
        # what CBOR can carry (the encoder refuses bignums, so the test could not build them)
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.binary(max_size=80),
        st.text(max_size=20),
        st.none(),
    ),
)
def test_renewal_parser_refuses_junk_with_a_reason(
    pki: Pki, data: bytes, field_name: str, value: object
) -> None:
    """Random bytes and a valid request with one field replaced: a RegistrationError with a
    reason code, never another exception."""
    cur = ldevid(pki, "dev-500001", start=pki.now - DAY)
    good, _ = renewal(pki, cur, nonce=b"n" * 32)
    outer = cbor.decode(good, max_size=8192)
    body = cbor.decode(outer["body"], max_size=8192)
    body[field_name] = value
    mutated = cbor.encode({"body": cbor.encode(body), "sig": outer["sig"]})
    for candidate in (data, mutated):
        try:
            parsed = parse_renewal_request(candidate)
        except RegistrationError as exc:
            assert exc.reason in ("malformed", "oversized", "unsupported_version")
            continue
        # It parsed: the decision still refuses it cleanly (bad signature at the latest).
        reason = reason_of(pki, candidate, Facts(cur.cert.serial_number), now=pki.now)
        assert reason != "ok" or parsed.body == cbor.decode(good, max_size=8192)["body"]


def test_renew_from_two_thirds_and_policy_bounds(pki: Pki, tmp_path: Path) -> None:
    cur = ldevid(pki, "dev-500001", start=pki.now, days=300)
    assert renew_from(cur.cert, 2 / 3) == pki.now + 200 * DAY
    assert not renewal_due(cur.cert, pki.now + 199 * DAY)
    assert renewal_due(cur.cert, pki.now + 200 * DAY)
    for bad in (
        {"renew_from": 1.0},
        {"renew_from": 0.0},
        {"validity": timedelta(minutes=1)},
        {"min_interval": timedelta(days=200)},
        {"handover_seconds": -1.0},
        {"supersede_window_seconds": -1.0},
        {"supersede_window_seconds": 3601.0},
        {"expired_reregistration": "maybe"},
    ):
        with pytest.raises(InvalidValueError):
            LdevidPolicy(**bad)  # type: ignore[arg-type]
    assert read_ldevid_policy(tmp_path) == LdevidPolicy()
    assert LdevidPolicy().supersede_window_seconds == 60.0
    policy = LdevidPolicy(
        validity=90 * DAY,
        renew_from=0.5,
        min_interval=timedelta(0),
        handover_seconds=0.5,
        supersede_window_seconds=0.0,
    )
    write_ldevid_policy(tmp_path, policy)
    assert read_ldevid_policy(tmp_path) == policy
    written = json.loads((tmp_path / "ldevid.json").read_text())
    assert (written["version"], written["supersede_window_seconds"]) == (2, 0.0)
    # A file written before the window existed (version 1) is read with its default ...
    del written["supersede_window_seconds"]
    (tmp_path / "ldevid.json").write_text(json.dumps({**written, "version": 1}))
    assert read_ldevid_policy(tmp_path) == dataclasses.replace(
        policy, supersede_window_seconds=60.0
    )
    # ... but each version has exactly its own keys.
    for broken in (
        {**written, "version": 2},
        {**written, "version": 1, "supersede_window_seconds": 5},
        {**written, "version": 3, "supersede_window_seconds": 5},
        {**written, "version": True},
    ):
        (tmp_path / "ldevid.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError):
            read_ldevid_policy(tmp_path)
    (tmp_path / "ldevid.json").write_text('{"version": 1, "validity_days": 10}')
    with pytest.raises(ConfigError):
        read_ldevid_policy(tmp_path)


def test_renewal_topic_parsing() -> None:
    dev = DeviceId("dev-1")
    assert renewal_request_topic(dev) == "devices/dev-1/renewal/request"
    assert renewal_response_topic(dev) == "devices/dev-1/renewal/response"
    assert device_of("devices/dev-1/renewal/request", *RENEWAL_REQUEST_LEVELS) == dev
    for bad in (
        "devices/dev-1/renewal/response",
        "devices/+/renewal/request",
        "devices/dev-1/renew",
        "devices/dev-1/renewal/request/x",
        "renewal/request",
    ):
        assert device_of(bad, *RENEWAL_REQUEST_LEVELS) is None


# ----------------------------------------------------------------------- the service


class Env:
    """A service on a real SQLite file with a clock the test moves."""

    def __init__(self, pki: Pki, db: Path, store: Store, policy: LdevidPolicy) -> None:
        self.pki = pki
        self.db = db
        self.store = store
        self.now = pki.now
        self.superseded: list[tuple[str, tuple[str, ...], bool]] = []
        self.service = RegistrationService(
            store=store,
            verifier=verifier(),
            admission=ADMIT_STATION,
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=PayloadKey.generate(),
            clock=lambda: self.now,
            policy=policy,
            on_superseded=self._on_superseded,
        )

    async def _on_superseded(
        self, device: DeviceId, serials: tuple[str, ...], *, renewal: bool
    ) -> None:
        self.superseded.append((device.value, serials, renewal))

    def client(self, name: str) -> DeviceClient:
        dev = make_dev(name)
        creds = DeviceCredentials(
            dev.device_id, dev.idevid, (self.pki.station_ca,), dev.factory_key, (self.pki.root,)
        )
        return DeviceClient(creds, SoftwareKeys(), clock=lambda: self.now.timestamp())

    async def register(self, client: DeviceClient) -> RegistrationGranted | RegistrationDenied:
        request, key, wrap = client.new_request()
        response = await self.service.handle(client.device_id, request)
        result = self.answer(client, request, response, key.public_key(), registration=True)
        if isinstance(result, RegistrationGranted):
            client._accept(result, key, wrap)
        return result

    def answer(
        self,
        client: DeviceClient,
        request: bytes,
        response: bytes,
        key: object,
        *,
        registration: bool = False,
    ) -> RegistrationGranted | RegistrationDenied:
        if registration:
            from trustcore.registration import parse_request

            parsed = parse_request(request)
            nonce, digest = parsed.nonce, parsed.digest
        else:
            renewal_request = parse_renewal_request(request)
            nonce, digest = renewal_request.nonce, renewal_request.digest
        return parse_response(
            response,
            device_id=client.device_id,
            nonce=nonce,
            request_digest=digest,
            ldevid_public_key=key,  # type: ignore[arg-type]
            roots=[self.pki.root],
            now=self.now,
        )


async def env_for(pki: Pki, tmp_path: Path, policy: LdevidPolicy) -> Env:
    db = tmp_path / "registrar.db"
    return Env(pki, db, await Store.open(db), policy)


@pytest.fixture
async def env(pki: Pki, tmp_path: Path) -> AsyncIterator[Env]:
    e = await env_for(pki, tmp_path, LdevidPolicy())
    try:
        yield e
    finally:
        await e.store.close()


async def test_renewal_new_key_idempotent_and_the_chain_is_recorded(env: Env) -> None:
    client = env.client("dev-510001")
    assert isinstance(await env.register(client), RegistrationGranted)
    assert client.registered is not None
    first = client.registered.ldevid
    assert not client.renewal_due()
    env.now += 250 * DAY  # past two thirds of a year
    assert client.renewal_due()
    request, new_key = client.new_renewal_request()
    # Identical retries, also concurrent ones: one certificate, one answer.
    answers = await asyncio.gather(
        *(env.service.handle_renewal(client.device_id, request) for _ in range(4))
    )
    assert len(set(answers)) == 1
    assert await env.service.handle_renewal(client.device_id, request) == answers[0]
    granted = env.answer(client, request, answers[0], new_key.public_key())
    assert isinstance(granted, RegistrationGranted)
    assert granted.ldevid.serial_number != first.serial_number
    assert granted.ldevid.public_key() == new_key.public_key()
    assert granted.ldevid.not_valid_after_utc >= env.now + 364 * DAY
    # The old serial was handed to the registrar (site CRL) before the answer came back.
    assert env.superseded == [("dev-510001", (format(first.serial_number, "x"),), True)]
    record = await env.store.device(client.device_id)
    assert record is not None
    assert record.registrations == 1  # renewal is not a registration
    assert record.ldevid_serial == CertSerial(granted.ldevid.serial_number)
    chain = await env.store.certificates(client.device_id)
    assert [(c.kind, c.state) for c in chain] == [
        ("registration", "superseded"),
        ("renewal", "current"),
    ]
    assert chain[1].not_after == int(granted.ldevid.not_valid_after_utc.timestamp())
    assert chain[0].superseded_at == int(env.now.timestamp())
    # The superseded certificate cannot renew again; the device falls back to its IDevID.
    env.now += 2 * DAY
    again, again_key = client.new_renewal_request()  # still signed by the OLD certificate
    denied = env.answer(
        client,
        again,
        await env.service.handle_renewal(client.device_id, again),
        again_key.public_key(),
    )
    assert isinstance(denied, RegistrationDenied)
    assert (denied.reason, denied.retry) == ("ldevid_superseded", False)
    assert len(await env.store.certificates(client.device_id)) == 2


async def test_rate_limit_revoked_and_unknown_devices(env: Env) -> None:
    client = env.client("dev-510002")
    assert isinstance(await env.register(client), RegistrationGranted)
    env.now += timedelta(minutes=10)
    request, key = client.new_renewal_request()
    early = env.answer(
        client,
        request,
        await env.service.handle_renewal(client.device_id, request),
        key.public_key(),
    )
    assert isinstance(early, RegistrationDenied)
    assert (early.reason, early.retry) == ("too_early", True)
    await env.store.set_status(client.device_id, "revoked")
    env.now += 30 * DAY
    request, key = client.new_renewal_request()
    revoked = env.answer(
        client,
        request,
        await env.service.handle_renewal(client.device_id, request),
        key.public_key(),
    )
    assert isinstance(revoked, RegistrationDenied)
    assert revoked.reason == "ldevid_revoked"
    assert env.superseded == []
    junk = await env.service.handle_renewal(client.device_id, b"\xa0")
    assert b"malformed" in junk


async def test_expired_ldevid_registers_again_by_default(pki: Pki, tmp_path: Path) -> None:
    env = await env_for(
        pki, tmp_path, LdevidPolicy(validity=timedelta(minutes=20), min_interval=timedelta(0))
    )
    try:
        client = env.client("dev-510003")
        assert isinstance(await env.register(client), RegistrationGranted)
        assert client.registered is not None
        old = client.registered.ldevid
        env.now += timedelta(hours=1)
        assert client.ldevid_expired()
        request, key = client.new_renewal_request()
        expired = env.answer(
            client,
            request,
            await env.service.handle_renewal(client.device_id, request),
            key.public_key(),
        )
        assert isinstance(expired, RegistrationDenied)
        assert expired.reason == "ldevid_expired"
        again = await env.register(client)
        assert isinstance(again, RegistrationGranted)
        # a re-registration: never batched (renewal=False)
        assert env.superseded == [("dev-510003", (format(old.serial_number, "x"),), False)]
        record = await env.store.device(client.device_id)
        assert record is not None and record.registrations == 2
    finally:
        await env.store.close()


async def test_expired_ldevid_waits_for_approval_when_the_site_says_so(
    pki: Pki, tmp_path: Path
) -> None:
    policy = LdevidPolicy(
        validity=timedelta(minutes=20),
        min_interval=timedelta(0),
        expired_reregistration="approval",
    )
    env = await env_for(pki, tmp_path, policy)
    try:
        client = env.client("dev-510004")
        assert isinstance(await env.register(client), RegistrationGranted)
        # Re-registration while the certificate is valid: allowed as before.
        env.now += timedelta(minutes=5)
        assert isinstance(await env.register(client), RegistrationGranted)
        env.now += timedelta(hours=1)
        held = await env.register(client)
        assert isinstance(held, RegistrationDenied)
        assert (held.reason, held.retry) == ("held_for_approval", True)
        pending = await env.store.pending()
        assert [(p.device_id, p.reason) for p in pending] == [
            (DeviceId("dev-510004"), "ldevid_expired")
        ]
        assert await env.store.approve(client.device_id, at=int(env.now.timestamp()))
        env.now += timedelta(seconds=5)
        assert isinstance(await env.register(client), RegistrationGranted)
        chain = await env.store.certificates(client.device_id)
        assert [c.state for c in chain] == ["superseded", "superseded", "current"]
    finally:
        await env.store.close()


async def test_schema_1_database_is_migrated(pki: Pki, tmp_path: Path) -> None:
    env = await env_for(pki, tmp_path, LdevidPolicy())
    client = env.client("dev-510005")
    assert isinstance(await env.register(client), RegistrationGranted)
    env.now += timedelta(minutes=1)
    assert isinstance(await env.register(client), RegistrationGranted)
    await env.store.close()
    # Make it a schema-1 database again (what a registrar of the previous release left).
    with sqlite3.connect(env.db) as db:
        db.execute("DROP TABLE certificates")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    store = await Store.open(env.db)
    try:
        chain = await store.certificates(DeviceId("dev-510005"))
        assert sorted(c.state for c in chain) == ["current", "superseded"]
        current = next(c for c in chain if c.state == "current")
        assert client.registered is not None
        assert current.not_after == int(client.registered.ldevid.not_valid_after_utc.timestamp())
    finally:
        await store.close()
    with sqlite3.connect(env.db) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    from registrar.errors import StoreError

    with pytest.raises(StoreError):
        await Store.open(env.db)


def test_ldevid_policy_cli_shows_writes_and_refuses_bad_values(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from registrar.cli import main as registrar_main
    from tests.fixtures.site import make_world

    world = make_world(tmp_path / "w")
    home = str(world.site.path)
    runner = CliRunner()
    shown = runner.invoke(registrar_main, ["ldevid-policy", "--home", home, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["validity_days"] == 365
    changed = runner.invoke(
        registrar_main,
        [
            "ldevid-policy", "--home", home, "--validity-days", "90", "--renew-from", "0.75",
            "--expired-reregistration", "approval", "--supersede-window-seconds", "5",
        ],
    )  # fmt: skip
    assert changed.exit_code == 0, changed.output
    assert "restart" in changed.output
    policy = read_ldevid_policy(world.site.path)
    assert (policy.validity, policy.renew_from) == (90 * DAY, 0.75)
    assert policy.expired_reregistration == "approval"
    assert policy.supersede_window_seconds == 5.0
    refused = runner.invoke(
        registrar_main,
        [
            "ldevid-policy",
            "--home",
            home,
            "--validity-days",
            "1",
            "--min-interval-seconds",
            "86400",
        ],
    )
    assert refused.exit_code == 2
    assert "REFUSED (bad_policy)" in refused.output and "Traceback" not in refused.output
    assert read_ldevid_policy(world.site.path) == policy  # unchanged
    (world.site.path / "ldevid.json").write_text("{not json")
    broken = runner.invoke(registrar_main, ["ldevid-policy", "--home", home])
    assert broken.exit_code == 2
    assert "REFUSED (bad_config)" in broken.output
