"""The SQLite store's registration path: point reads answered on the loop through their own
connection (the reader thread only when that connection is busy), and a group commit as
one call on the writer thread, still all-or-nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from registrar.errors import StoreConflict
from registrar.store import Store
from registrar.store.sqlite import SqliteBackend
from tests.fixtures.store import registration
from trustcore.identity import DeviceId


def _backend(store: Store) -> SqliteBackend:
    backend = store._backend
    assert isinstance(backend, SqliteBackend)
    return backend


async def test_a_lookup_sees_the_last_commit_without_the_reader_thread(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "r.db") as store:
        record = registration("dev-000001")
        backend = _backend(store)
        reader_calls: list[str] = []
        original = backend._reader.execute_fetchall

        async def counted(sql: str, params: Any = ()) -> Any:
            reader_calls.append(sql)
            return await original(sql, params)

        backend._reader.execute_fetchall = counted  # type: ignore[method-assign]
        before = await store.lookup(
            record.request_digest, record.nonce, record.ldevid_key_id, record.device_id
        )
        assert before.response is None and not before.nonce_seen and before.key_owner is None
        await store.record_registration(record)
        after = await store.lookup(
            record.request_digest, record.nonce, record.ldevid_key_id, record.device_id
        )
        assert after.response == record.response
        assert after.nonce_seen
        assert after.key_owner == record.device_id
        assert after.previous_serial == record.ldevid_serial
        plain = await store.lookup(record.request_digest, b"\0" * 32, None)
        assert plain.response == record.response and not plain.nonce_seen
        assert reader_calls == []  # all three on the loop
        # a listing is not a point read: the reader thread answers it
        assert [d.device_id for d in await store.devices()] == [DeviceId("dev-000001")]
        assert len(reader_calls) == 1


async def test_a_point_read_the_probe_cannot_answer_goes_to_the_reader(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "r.db") as store:
        record = registration("dev-000002")
        await store.record_registration(record)
        probe = _backend(store)._probe
        assert probe is not None
        probe.close()  # any sqlite3 error of the loop's connection: the reader thread answers
        found = await store.lookup(record.request_digest, record.nonce, None)
        assert found.response == record.response and found.nonce_seen
        missing = await store.lookup(b"\1" * 32, b"\2" * 32, None)
        assert missing.response is None and not missing.nonce_seen


async def test_a_failed_group_commit_leaves_nothing_behind(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "r.db", batch_window=0.05) as store:
        await store.record_registration(registration("dev-000003", serial="ab01"))
        first = registration("dev-000004")
        clash = registration("dev-000005", serial="ab01")
        # queued together: one group commit that fails, then retried one by one
        results = await asyncio.gather(
            store.record_registration(first),
            store.record_registration(clash),
            return_exceptions=True,
        )
        assert results[0] is None
        assert isinstance(results[1], StoreConflict)
        assert await store.device(DeviceId("dev-000004")) is not None
        assert await store.device(DeviceId("dev-000005")) is None
        gone = await store.lookup(clash.request_digest, clash.nonce, clash.ldevid_key_id)
        assert gone.response is None and not gone.nonce_seen and gone.key_owner is None
