"""The registrar store on both backends: several instances on one PostgreSQL (one
certificate per registration, one CRL number sequence, the change feed), replay records
pruned, store URLs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from registrar.errors import ConfigError, StoreConflict, StoreError
from registrar.store import (
    Change,
    FactorySighting,
    Store,
    parse_store_location,
)
from registrar.store.base import EXACT_COUNT_BELOW, REPLAY_RETENTION
from tests.fixtures.store import next_change, registration
from trustcore.identity import CertSerial, DeviceId, StationId


async def test_two_instances_racing_one_registration_record_one_certificate(
    pg_database: str,
) -> None:
    """Two instances that both processed the same request (each signed its own LDevID)
    commit at the same moment: one commits, the other gets StoreConflict, and the device
    has one certificate, one device row, one stored response."""
    a, b = await Store.open(pg_database), await Store.open(pg_database)
    try:
        firsts = [registration(f"dev-{i:06d}") for i in range(30)]
        seconds = [dataclasses.replace(r, ldevid_serial=CertSerial.random()) for r in firsts]
        results = await asyncio.gather(
            *(a.record_registration(r) for r in firsts),
            *(b.record_registration(r) for r in seconds),
            return_exceptions=True,
        )
        for one, other in zip(results[:30], results[30:], strict=True):
            assert (one is None) != (other is None), (one, other)
            assert isinstance(one or other, StoreConflict)
        for r in firsts:
            chain = await a.certificates(r.device_id)
            assert len(chain) == 1
            record = await b.device(r.device_id)
            assert record is not None and record.ldevid_serial == chain[0].serial
            assert record.registrations == 1
        counts = await a.counts()
        assert counts["devices"] == counts["requests"] == counts["nonces"] == 30
    finally:
        await a.close()
        await b.close()


async def test_a_serial_is_unique_even_across_devices(store_location: str) -> None:
    async with await Store.open(store_location) as store:
        await store.record_registration(registration("dev-000001", serial="5e1a1"))
        with pytest.raises(StoreConflict):
            await store.record_registration(registration("dev-000002", serial="5e1a1"))
        assert await store.device(DeviceId("dev-000002")) is None  # nothing half-written
        assert (await store.counts())["nonces"] == 1


async def test_a_closed_store_refuses_and_closes_again_at_once(store_location: str) -> None:
    """The registrar's stop closes the store even when a health check or an operator already
    did: the second close returns at once (it hung on SQLite's writer thread), and a read
    or write after it is refused with StoreError, never left waiting."""
    store = await Store.open(store_location)
    await store.record_registration(registration("dev-000001"))
    await store.close()
    await asyncio.wait_for(store.close(), 5)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.ping(), 5)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.record_registration(registration("dev-000002")), 5)


async def test_revocation_reaches_the_other_instance_within_a_second(pg_database: str) -> None:
    a, b = await Store.open(pg_database), await Store.open(pg_database)
    try:
        r = registration("dev-000010")
        await a.record_registration(r)
        feed = b.changes()
        pending = asyncio.ensure_future(next_change(feed, "revoked"))
        await asyncio.sleep(0)  # subscribed before the write
        loop = asyncio.get_running_loop()
        start = loop.time()
        await a.set_status(r.device_id, "revoked")
        change = await pending
        assert loop.time() - start < 1.0
        assert change.device_id == "dev-000010" and change.origin == a.instance
        # renewals and approvals travel the same way
        renewal = dataclasses.replace(registration("dev-000010"), kind="renewal")
        pending = asyncio.ensure_future(next_change(feed, "renewed"))
        await asyncio.sleep(0)
        await a.record_registration(renewal)
        assert (await pending).serial == renewal.ldevid_serial.hex
        pending = asyncio.ensure_future(next_change(feed, "approved"))
        await asyncio.sleep(0)
        await a.approve(DeviceId("dev-000011"), at=1)
        assert (await pending).device_id == "dev-000011"
        await feed.aclose()
    finally:
        await a.close()
        await b.close()


async def test_sqlite_feed_carries_this_process_changes(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "r.db") as store:
        feed = store.changes()
        pending = asyncio.ensure_future(next_change(feed, "payload_key"))
        await asyncio.sleep(0)
        await store.set_payload_key(DeviceId("dev-000012"), b"\x01" * 8)
        assert (await pending).detail == "01" * 8
        await feed.aclose()


async def test_crl_numbers_strictly_increase_across_two_instances(store_location: str) -> None:
    a, b = await Store.open(store_location), await Store.open(store_location)
    try:
        got: dict[str, list[int]] = {"a": [], "b": []}

        async def take(name: str, store: Store) -> None:
            for _ in range(15):
                got[name].append(await store.next_crl_number(at_least=1))

        await asyncio.gather(take("a", a), take("b", b))
        numbers = got["a"] + got["b"]
        assert len(set(numbers)) == 30 and min(numbers) == 1 and max(numbers) == 30
        assert got["a"] == sorted(got["a"]) and got["b"] == sorted(got["b"])
        # a site whose CRL files are ahead of a fresh store: the floor wins, then +1
        assert await b.next_crl_number(at_least=100) == 100
        assert await a.next_crl_number(at_least=5) == 101
    finally:
        await a.close()
        await b.close()


async def test_replay_records_are_pruned_by_age(store_location: str) -> None:
    async with await Store.open(store_location) as store:
        old, new = registration("dev-000020", at=1000), registration("dev-000021", at=5000)
        await store.record_registration(old)
        await store.record_registration(new)
        await store.prune_replay_records(before=3000)
        gone = await store.lookup(old.request_digest, old.nonce, None)
        kept = await store.lookup(new.request_digest, new.nonce, None)
        assert gone.response is None and not gone.nonce_seen
        assert kept.response == new.response and kept.nonce_seen
        assert (await store.counts())["devices"] == 2  # the registrations stay


async def test_expired_nonces_are_pruned_by_the_writer_itself(store_location: str) -> None:
    """No clock needed: records older than the newest by more than REPLAY_RETENTION go, in
    bounded batches, after a commit (and on demand)."""
    now = 1_800_000_000
    old = [registration(f"dev-{i:06d}", at=now - REPLAY_RETENTION - 10) for i in range(5)]
    edge = registration("dev-000100", at=now - REPLAY_RETENTION + 10)
    async with await Store.open(store_location) as store:
        await store.import_registrations([*old, edge])
        await store.record_registration(registration("dev-000200", at=now))
        await store.next_crl_number(1)  # the writer is sequential: its prune ran before this
        for r in old:
            gone = await store.lookup(r.request_digest, r.nonce, None)
            assert gone.response is None and not gone.nonce_seen
        kept = await store.lookup(edge.request_digest, edge.nonce, None)
        assert kept.response == edge.response and kept.nonce_seen
        assert (await store.counts())["nonces"] == 2
        assert (await store.counts())["devices"] == 7  # the registrations stay
        assert await store.prune_expired_replay_records() == 0


async def test_paged_and_bounded_reads(store_location: str) -> None:
    async with await Store.open(store_location) as store:
        regs = [registration(f"dev-{i:06d}") for i in range(25)]
        await store.import_registrations(regs)
        await store.set_status(DeviceId("dev-000003"), "revoked")
        pages = [p async for p in store.device_pages(size=10)]
        assert [len(p) for p in pages] == [10, 10, 5]
        assert [d.device_id for p in pages for d in p] == sorted(r.device_id for r in regs)
        assert await store.revoked_device_ids() == {DeviceId("dev-000003")}
        found = await store.device_by_idevid(StationId("line-1"), regs[7].idevid_serial)
        assert found is not None and found.device_id == DeviceId("dev-000007")
        assert [
            p async for p in store.device_pages(size=10, status="registered", not_key=b"k" * 8)
        ] == []
        # devices still on older keys: every one, key by key, each key's in id order
        for i, key in ((4, b"a" * 8), (5, b"z" * 8), (6, b"a" * 8), (3, b"b" * 8)):
            await store.set_payload_key(DeviceId(f"dev-{i:06d}"), key)
        pending = [
            d.device_id
            async for p in store.device_pages(size=1, status="registered", not_key=b"k" * 8)
            for d in p
        ]
        assert pending == [DeviceId(f"dev-00000{i}") for i in (4, 6, 5)]  # dev-000003: revoked
        registered = [d async for p in store.device_pages(size=7, status="registered") for d in p]
        assert len(registered) == 24 and all(d.status == "registered" for d in registered)


async def test_bulk_import_writes_what_a_registration_writes_in_chunks(
    store_location: str,
) -> None:
    """The preload of a large registry: every row a live registration writes (so replay
    protection and idempotency hold for imported devices too), chunk by chunk."""
    regs = [registration(f"dev-{i:06d}") for i in range(25)]
    seen = [
        FactorySighting(
            StationId("line-1"), r.idevid_serial, r.device_id, b"der", r.at
        )
        for r in regs
    ]
    done: list[int] = []
    async with await Store.open(store_location) as store:
        count = await store.import_registrations(
            iter(regs), sightings=iter(seen), chunk=10, progress=done.append
        )
        assert count == 25 and done == [10, 20, 25]
        counts = await store.counts()
        assert counts["devices"] == counts["requests"] == counts["nonces"] == 25
        assert counts["certified_keys"] == counts["events"] == 25
        again = await store.lookup(regs[3].request_digest, regs[3].nonce, regs[3].ldevid_key_id)
        assert again.response == regs[3].response and again.nonce_seen
        assert again.key_owner == regs[3].device_id
        assert len(await store.factory_sightings()) == 25
        assert [c.serial for c in await store.certificates(regs[9].device_id)] == [
            regs[9].ldevid_serial
        ]
        # a device imported twice: that chunk is refused as a whole, the others stay
        with pytest.raises(StoreConflict):
            await store.import_registrations([registration("dev-000100"), regs[0]])
        assert await store.device(DeviceId("dev-000100")) is None
        assert (await store.counts())["devices"] == 25


async def test_status_counts_of_a_large_registry_come_from_the_engine(
    store_location: str,
) -> None:
    """Above ``EXACT_COUNT_BELOW`` rows the counts are the engine's estimates (no table
    scan twice a second); the devices-per-key count is right."""
    n = EXACT_COUNT_BELOW + 500
    async with await Store.open(store_location) as store:
        await store.import_registrations(registration(f"dev-{i:06d}") for i in range(n))
        await store.record_registration(registration("dev-999999"))
        expected = n + 1
        names = ("devices", "requests", "nonces", "certified_keys", "events")

        def close(counts: dict[str, int]) -> bool:
            return all(abs(counts[t] - expected) <= expected // 100 for t in names)

        # SQLite: the rowid range (exact without deletions) at once; PostgreSQL: its
        # statistics, which follow the writes within seconds
        deadline = asyncio.get_running_loop().time() + 20
        counts = await store.counts()
        while not close(counts) and asyncio.get_running_loop().time() < deadline:
            assert store.backend == "postgres", counts
            assert all(EXACT_COUNT_BELOW <= counts[t] <= expected for t in names), counts
            await asyncio.sleep(0.2)
            counts = await store.counts()
        assert close(counts), counts
        assert counts["superseded"] == 0
        assert await store.devices_per_payload_key() == {b"k" * 8: n + 1}


async def test_a_newer_postgres_schema_is_refused(pg_database: str) -> None:
    import psycopg

    store = await Store.open(pg_database)  # creates the schema
    await store.close()
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(StoreError, match="schema 99"):
        await Store.open(pg_database)


def test_store_locations() -> None:
    assert parse_store_location("/x/registrar.db").path == Path("/x/registrar.db")
    assert parse_store_location("sqlite:///x/r.db").path == Path("/x/r.db")
    pg = parse_store_location("postgresql://reg@db:5432/site1")
    assert pg.kind == "postgres" and str(pg) == "postgresql://reg@db:5432/site1"
    assert "secret" not in str(parse_store_location("postgresql://reg:secret@db/site1"))
    for bad in ("mysql://db/x", "sqlite://relative/x", "postgresql://db", ""):
        with pytest.raises(ConfigError):
            parse_store_location(bad)


def test_change_values_round_trip_and_refuse_junk() -> None:
    change = Change("revoked", "dev-1", None, "revoked", "host:1")
    assert Change.decode(change.encode()) == change
    for junk in ("", "[1,2]", '["revoked",1,null,"",""]', "{}"):
        with pytest.raises(ValueError):
            Change.decode(junk)
    with pytest.raises(ValueError):
        Change("exploded", None)


def test_registry_scale_benchmark_runs_and_reports(tmp_path: Path) -> None:
    """``bench/registry_scale.py`` at a tiny size: the production service over a preloaded
    store, one JSON object on the last line, no failed registration."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "registry_scale.py"
    out = subprocess.run(
        [
            sys.executable,
            str(bench),
            *("--preload", "500", "--registrations", "20"),
            *("--store", "sqlite", "--dir", str(tmp_path), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == 0 and result["registrations"] == 20
    assert result["devices_full"] == 500
    assert result["p50_ms_full"] > 0 and result["ratio"] > 0
    assert 0 < result["peak_rss_mb"] < 1000
