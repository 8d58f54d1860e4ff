"""PostgreSQL killed (-9) and restarted under a running registration service.

A private cluster (``initdb`` + ``pg_ctl`` on an ephemeral port, never the machine's server)
dies with registrations in flight. What must hold:

* a registration commits fully or not at all: every device row has its certificate,
  certified key, stored response, nonce and event, and nothing exists without its device;
* a device told "granted" is in the database (the reply follows the commit);
* during the outage a device gets a signed, retryable refusal quickly, not a hang or a
  traceback;
* after the restart the same store (no reopen) serves again: the retry of every device
  that was refused succeeds, and a replayed nonce is still refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from cryptography import x509

from registrar.service import RegistrationService, SiteAuthority
from registrar.store import Store
from signers.software import SoftwareKey
from tests.fixtures.pki import SITE_OPERATOR, Pki
from tests.fixtures.postgres import PrivatePostgres
from tests.fixtures.registration import ADMIT_STATION, Dev, make_dev, make_request, verifier
from tests.fixtures.store import next_change
from trustcore.payload import PayloadKey
from trustcore.registration import (
    RegistrationDenied,
    RegistrationGranted,
    parse_request,
    parse_response,
)


@pytest.fixture
def cluster() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()


@pytest.fixture
async def served(
    pki: Pki, cluster: PrivatePostgres
) -> AsyncIterator[tuple[RegistrationService, Store]]:
    store = await Store.open(cluster.url)
    try:
        yield (
            RegistrationService(
                store=store,
                verifier=verifier(),
                admission=ADMIT_STATION,
                site=SiteAuthority(pki.site_ca, SoftwareKey(pki.site_key), SITE_OPERATOR),
                payload_key=PayloadKey.generate(),
                clock=lambda: pki.now,
            ),
            store,
        )
    finally:
        await store.close()


def answer(pki: Pki, dev: Dev, request: bytes, response: bytes) -> object:
    parsed = parse_request(request)
    key = x509.load_der_x509_csr(parsed.csr_der).public_key()
    return parse_response(
        response,
        device_id=dev.device_id,
        nonce=parsed.nonce,
        request_digest=parsed.digest,
        ldevid_public_key=key,  # type: ignore[arg-type]
        roots=[pki.root],
        now=pki.now,
    )


def registry_rows(url: str) -> dict[str, set[str]]:
    """Device ids per table, read with a connection of its own."""
    tables = {
        "devices": "SELECT device_id FROM devices",
        "certificates": "SELECT device_id FROM certificates",
        "current": "SELECT d.device_id FROM devices d JOIN certificates c "
        "ON c.serial = d.ldevid_serial AND c.device_id = d.device_id",
        "certified_keys": "SELECT device_id FROM certified_keys",
        "requests": "SELECT device_id FROM requests",
        "nonces": "SELECT device_id FROM nonces",
        "events": "SELECT device_id FROM events WHERE kind = 'registered'",
    }
    with psycopg.connect(url) as conn:
        return {name: {r[0] for r in conn.execute(sql.encode())} for name, sql in tables.items()}


async def test_postgres_killed_and_restarted_under_registrations(
    pki: Pki, cluster: PrivatePostgres, served: tuple[RegistrationService, Store]
) -> None:
    service, store = served
    feed = store.changes()
    first = make_dev("dev-300000")
    first_request = make_request(pki, first)
    assert isinstance(
        answer(pki, first, first_request, await service.handle(first.device_id, first_request)),
        RegistrationGranted,
    )

    # 200 devices register at once (enough that some are still in flight however fast the
    # commits are); the server is killed as soon as some have committed
    devs = [make_dev(f"dev-3{i:05d}") for i in range(1, 201)]
    requests = {d.device_id: make_request(pki, d) for d in devs}

    async def kill_when_some_committed() -> None:
        while service.stats["ok"] < 4:
            await asyncio.sleep(0)
        await asyncio.to_thread(cluster.kill9)

    killer = asyncio.create_task(kill_when_some_committed())
    responses = await asyncio.gather(
        *(service.handle(d.device_id, requests[d.device_id]) for d in devs)
    )
    await killer
    outcome = {
        d.device_id: answer(pki, d, requests[d.device_id], r)
        for d, r in zip(devs, responses, strict=True)
    }
    granted = {d for d, a in outcome.items() if isinstance(a, RegistrationGranted)}
    refused = {d: a for d, a in outcome.items() if isinstance(a, RegistrationDenied)}
    assert len(granted) + len(refused) == len(devs)
    assert refused, "the kill came too late to catch a registration in flight"
    for denial in refused.values():
        assert denial.retry, denial.reason

    # during the outage: a clear, signed, retryable refusal within seconds
    late = make_dev("dev-399999")
    late_request = make_request(pki, late)
    start = time.monotonic()
    during = answer(pki, late, late_request, await service.handle(late.device_id, late_request))
    assert isinstance(during, RegistrationDenied) and during.reason == "internal_error"
    assert during.retry
    assert time.monotonic() - start < 5.0  # about 1 s: no pool timeout, no hang

    await asyncio.to_thread(cluster.start)
    # the change feed (LISTEN) is back too, and says that notifications may have been lost
    assert (await next_change(feed, "resync", timeout=10)).kind == "resync"
    await feed.aclose()

    # nothing half-written; every granted device durable
    rows = registry_rows(cluster.url)
    devices = rows["devices"]
    for table, ids in rows.items():
        assert ids == devices, (table, ids ^ devices)
    assert {d.value for d in granted} <= devices
    assert first.device_id.value in devices

    # the devices retry (the identical request: a commit whose reply was lost is found
    # and answered again; one that never committed is processed afresh), same store
    for device, denial in refused.items():
        retry = await service.handle(device, requests[device])
        dev = next(d for d in devs if d.device_id == device)
        assert isinstance(answer(pki, dev, requests[device], retry), RegistrationGranted), denial
    retry = await service.handle(late.device_id, late_request)
    assert isinstance(answer(pki, late, late_request, retry), RegistrationGranted)

    # replay protection survived: the first device's nonce again, in a new request
    nonce = parse_request(first_request).nonce
    replay = make_request(pki, first, nonce=nonce)
    replayed = answer(pki, first, replay, await service.handle(first.device_id, replay))
    assert isinstance(replayed, RegistrationDenied) and replayed.reason == "replayed_nonce"

    rows = registry_rows(cluster.url)
    assert len(rows["devices"]) == len(devs) + 2
    for table, ids in rows.items():
        assert ids == rows["devices"], table
