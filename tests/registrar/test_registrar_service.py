"""RegistrationService.handle driven directly (no broker) on both real stores (a SQLite file
and a PostgreSQL database): idempotency,
replay, foreign keys, re-registration, junk, durability across reopen, group commit,
payload-key storage and rotation."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from registrar.errors import ConfigError
from registrar.payload_keys import PayloadKeyStore
from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki, p256
from tests.fixtures.registration import ADMIT_STATION, Dev, make_dev, make_request, verifier
from trustcore import cbor
from trustcore.csr import build_device_csr
from trustcore.identity import CertSerial, DeviceId
from trustcore.payload import PayloadKey
from trustcore.registration import (
    RegistrationDenied,
    RegistrationGranted,
    open_payload_key,
    parse_request,
    parse_response,
)
from trustcore.topics import (
    device_of_registration_request,
    registration_request_topic,
    registration_response_topic,
)


class Env:
    def __init__(self, pki: Pki, db: str, store: Store, payload_key: PayloadKey) -> None:
        self.pki = pki
        self.db = db
        self.store = store
        self.payload_key = payload_key
        self.service = RegistrationService(
            store=store,
            verifier=verifier(),
            admission=ADMIT_STATION,
            site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
            payload_key=payload_key,
            clock=lambda: pki.now,
        )

    def parse(
        self, dev: Dev, request: bytes, response: bytes
    ) -> RegistrationGranted | RegistrationDenied:
        parsed = parse_request(request)
        key = x509.load_der_x509_csr(parsed.csr_der).public_key()
        return parse_response(
            response,
            device_id=dev.device_id,
            nonce=parsed.nonce,
            request_digest=parsed.digest,
            ldevid_public_key=key,  # type: ignore[arg-type]
            roots=[self.pki.root],
            now=self.pki.now,
        )


@pytest.fixture
async def env(pki: Pki, store_location: str) -> AsyncIterator[Env]:
    db = store_location
    store = await Store.open(db)
    try:
        yield Env(pki, db, store, PayloadKey.generate())
    finally:
        await store.close()


async def test_registration_is_recorded_before_the_reply_and_survives_reopen(env: Env) -> None:
    dev = make_dev("dev-200001")
    request = make_request(env.pki, dev)
    response = await env.service.handle(dev.device_id, request)
    result = env.parse(dev, request, response)
    assert isinstance(result, RegistrationGranted)
    assert open_payload_key(dev.wrap_key, dev.device_id, result.payload_key) == env.payload_key
    # Reopen the file with a new Store: the record is there (committed before the reply).
    again = await Store.open(env.db)
    try:
        record = await again.device(dev.device_id)
        assert record is not None
        assert record.ldevid_serial == CertSerial(result.ldevid.serial_number)
        assert record.status == "registered"
        assert (await again.counts())["requests"] == 1
    finally:
        await again.close()


async def test_identical_request_gets_identical_response_without_duplicates(env: Env) -> None:
    dev = make_dev("dev-200002")
    request = make_request(env.pki, dev)
    first = await env.service.handle(dev.device_id, request)
    second = await env.service.handle(dev.device_id, request)
    assert first == second
    # Concurrent identical retries as well.
    dev3 = make_dev("dev-200003")
    request3 = make_request(env.pki, dev3)
    answers = await asyncio.gather(
        *(env.service.handle(dev3.device_id, request3) for _ in range(5))
    )
    assert len(set(answers)) == 1
    assert isinstance(env.parse(dev3, request3, answers[0]), RegistrationGranted)
    counts = await env.store.counts()
    assert counts["devices"] == 2
    assert counts["requests"] == 2
    assert counts["nonces"] == 2


async def test_replayed_nonce_in_another_request_is_refused(env: Env) -> None:
    dev = make_dev("dev-200004")
    nonce = os.urandom(32)
    first = make_request(env.pki, dev, nonce=nonce)
    assert isinstance(
        env.parse(dev, first, await env.service.handle(dev.device_id, first)), RegistrationGranted
    )
    t = int(env.pki.now.timestamp()) + 1
    second = make_request(env.pki, dev, nonce=nonce, time=t)
    result = env.parse(dev, second, await env.service.handle(dev.device_id, second))
    assert isinstance(result, RegistrationDenied)
    assert result.reason == "replayed_nonce"
    assert result.retry


async def test_concurrent_requests_sharing_a_nonce(env: Env) -> None:
    dev = make_dev("dev-200005")
    nonce = os.urandom(32)
    t = int(env.pki.now.timestamp())
    requests = [make_request(env.pki, dev, nonce=nonce, time=t + i) for i in range(4)]
    answers = await asyncio.gather(*(env.service.handle(dev.device_id, r) for r in requests))
    results = [env.parse(dev, r, a) for r, a in zip(requests, answers, strict=True)]
    assert sum(isinstance(r, RegistrationGranted) for r in results) == 1
    assert all(isinstance(r, RegistrationGranted) or r.reason == "replayed_nonce" for r in results)


async def test_csr_key_of_another_device_is_refused(env: Env) -> None:
    a, b = make_dev("dev-200006"), make_dev("dev-200007")
    req_a = make_request(env.pki, a)
    assert isinstance(
        env.parse(a, req_a, await env.service.handle(a.device_id, req_a)), RegistrationGranted
    )
    # b holds a copy of a's LDevID key (a clone) and asks for it under its own name.
    csr = build_device_csr(a.ldevid_key, b.device_id)
    req_b = make_request(env.pki, b, csr=csr)
    result = env.parse(b, req_b, await env.service.handle(b.device_id, req_b))
    assert isinstance(result, RegistrationDenied)
    assert result.reason == "csr_foreign_key"
    assert (await env.store.device(b.device_id)) is None


async def test_re_registration_supersedes_the_old_ldevid(env: Env) -> None:
    dev = make_dev("dev-200008")
    first = make_request(env.pki, dev)
    r1 = env.parse(dev, first, await env.service.handle(dev.device_id, first))
    assert isinstance(r1, RegistrationGranted)
    new_key = SoftwareKey(p256("dev-200008-second"))
    second = make_request(
        env.pki,
        dev,
        csr=build_device_csr(new_key, dev.device_id),
        time=int(env.pki.now.timestamp()) + 5,
    )
    response = await env.service.handle(dev.device_id, second)
    parsed = parse_request(second)
    r2 = parse_response(
        response,
        device_id=dev.device_id,
        nonce=parsed.nonce,
        request_digest=parsed.digest,
        ldevid_public_key=new_key.public_key(),
        roots=[env.pki.root],
        now=env.pki.now,
    )
    assert isinstance(r2, RegistrationGranted)
    record = await env.store.device(dev.device_id)
    assert record is not None
    assert record.registrations == 2
    assert record.ldevid_serial == CertSerial(r2.ldevid.serial_number)
    superseded = await env.store.superseded_serials()
    assert [s[0] for s in superseded] == [format(r1.ldevid.serial_number, "x")]


async def test_junk_is_refused_and_others_keep_being_served(env: Env) -> None:
    good = [make_dev(f"dev-2001{i:02d}") for i in range(5)]
    junk = [
        b"",
        b"\x00",
        os.urandom(300),
        b"\xa0" * 20000,
        cbor.encode({"body": b"x", "sig": b"y" * 10}),
    ]
    topic = DeviceId("dev-junk")
    tasks = [env.service.handle(topic, j) for j in junk]
    requests = [make_request(env.pki, d) for d in good]
    tasks += [env.service.handle(d.device_id, r) for d, r in zip(good, requests, strict=True)]
    answers = await asyncio.gather(*tasks)
    for d, r, a in zip(good, requests, answers[len(junk) :], strict=True):
        assert isinstance(env.parse(d, r, a), RegistrationGranted)
    for a in answers[: len(junk)]:
        body = cbor.decode(cbor.decode(a, max_size=1 << 16)["body"], max_size=1 << 16)
        assert body["status"] == "error"
        assert body["reason"] in {"malformed", "oversized"}
    assert (await env.store.counts())["devices"] == 5


async def test_refusals_are_recorded_as_events_with_detail_kept_internal(env: Env) -> None:
    dev = make_dev("dev-200009")
    req = make_request(env.pki, dev, signer=SoftwareKey(p256("intruder")))
    answer = await env.service.handle(dev.device_id, req)
    body = cbor.decode(cbor.decode(answer, max_size=1 << 16)["body"], max_size=1 << 16)
    assert body["reason"] == "bad_signature"
    await env.store.record_event(None, "flush", "")  # the writer is FIFO: refusal is in
    events = await env.store.events(kind="refused")
    assert events and events[0].device_id == dev.device_id.value
    assert "IDevID" in events[0].detail and "IDevID" not in body["message"]


async def test_group_commit_shares_transactions(env: Env) -> None:
    devs = [make_dev(f"dev-3{i:05d}") for i in range(120)]
    requests = [make_request(env.pki, d) for d in devs]
    before = env.store.commits
    answers = await asyncio.gather(
        *(env.service.handle(d.device_id, r) for d, r in zip(devs, requests, strict=True))
    )
    assert all(
        isinstance(env.parse(d, r, a), RegistrationGranted)
        for d, r, a in zip(devs, requests, answers, strict=True)
    )
    commits = env.store.commits - before
    assert commits < 30, commits
    assert (await env.store.counts())["devices"] == 120


def test_payload_keys_at_rest(tmp_path: Path) -> None:
    transport = SoftwareKey(p256("site-transport"))
    store = PayloadKeyStore(tmp_path / "payload-keys.cbor", transport)
    with pytest.raises(ConfigError):
        store.load()
    first = PayloadKey.generate()
    ring = store.add(first)
    assert ring.current == first
    rotated = store.rotate()
    assert rotated.current != first
    assert set(rotated.keys) == {first.key_id, rotated.current.key_id}
    raw = (tmp_path / "payload-keys.cbor").read_bytes()
    assert first.key not in raw and rotated.current.key not in raw
    assert oct((tmp_path / "payload-keys.cbor").stat().st_mode & 0o777) == "0o600"
    assert PayloadKeyStore(tmp_path / "payload-keys.cbor", transport).load() == rotated
    with pytest.raises(ConfigError):
        PayloadKeyStore(tmp_path / "payload-keys.cbor", SoftwareKey(p256("other"))).load()


def test_request_topic_parsing() -> None:
    topic = "devtrust/register/dev-1/request"
    assert device_of_registration_request(topic) == DeviceId("dev-1")
    assert registration_request_topic(DeviceId("dev-1")) == topic
    assert registration_response_topic(DeviceId("dev-1")) == "devtrust/register/dev-1/response"
    for bad in (
        "devtrust/register/+/request",
        "devtrust/register/a/b/request",
        "devtrust/register//request",
        "devtrust/register/dev-1/response",
        "devices/dev-1/request",
    ):
        assert device_of_registration_request(bad) is None


async def test_device_client_request_is_accepted_and_its_keys_open_the_answer(env: Env) -> None:
    from device_sim.client import DeviceClient, DeviceCredentials, SoftwareKeys, TlsIdentity

    dev = make_dev("dev-200011")
    creds = DeviceCredentials(
        dev.device_id, dev.idevid, (env.pki.station_ca,), dev.factory_key, (env.pki.root,)
    )
    client = DeviceClient(creds, SoftwareKeys(), clock=lambda: env.pki.now.timestamp())
    request, ldevid_key, wrap_key = client.new_request()
    response = await env.service.handle(dev.device_id, request)
    parsed = parse_request(request)
    granted = parse_response(
        response,
        device_id=dev.device_id,
        nonce=parsed.nonce,
        request_digest=parsed.digest,
        ldevid_public_key=ldevid_key.public_key(),
        roots=[env.pki.root],
        now=env.pki.now,
    )
    assert isinstance(granted, RegistrationGranted)
    registered = client._accept(granted, ldevid_key, wrap_key)
    assert registered.current_key == env.payload_key
    assert client.operational_context().verify_mode.name == "CERT_REQUIRED"
    # A TPM-less TLS identity cannot be made from a non-software key.
    with pytest.raises(TypeError):
        TlsIdentity.from_signer([registered.ldevid], object())  # type: ignore[arg-type]
