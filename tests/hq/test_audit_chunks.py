"""HQ's record decoding (hq.audit_chunks): worker chunks verify the same chain as one pass,
a defect at a chunk boundary is caught, and issued records are grouped into runs."""

from __future__ import annotations

import pickle

import pytest

from hq import audit_chunks
from hq.audit_chunks import IssuedColumns, IssuedRun, decode_chunks
from trustcore.audit import (
    ZERO_HASH,
    AuditLog,
    ChainEnd,
    decode_chain,
    encode_record,
    record_hash,
)

T0 = 1_800_000_000


def issued(i: int, **extra: object) -> dict[str, object]:
    return {
        "device_id": f"dev-{i:04d}",
        "serial": format(i + 1, "x"),
        "key_id": i.to_bytes(32, "big"),
        "product": "thermo",
        "entitlement_seq": 1,
        "counter": i,
        "tpm": i.to_bytes(16, "big"),
        **extra,
    }


def build(n: int) -> list[bytes]:
    log = AuditLog("station-a")
    out = [log.append("entitlement_imported", {"entitlement_seq": 1}, T0)]
    for i in range(1, n):
        if i == 9:
            out.append(log.append("slot_burned", {"device_id": "x", "counter": i}, T0 + i))
        elif i == 10:
            no_tpm = issued(i)
            del no_tpm["tpm"]  # a station without TPM readings: still a run
            out.append(log.append("issued", no_tpm, T0 + i))
        elif i == 17:
            out.append(log.append("issued", issued(i, note="extra"), T0 + i))  # not a run
        elif i == 18:
            out.append(log.append("issued", issued(i, counter="7"), T0 + i))  # mistyped
        else:
            out.append(log.append("issued", issued(i), T0 + i))
    return out


def one_pass(records: list[bytes]) -> tuple[bool, bytes, list[IssuedRun | object]]:
    end = ChainEnd()
    items = decode_chain(records, 0, ZERO_HASH, end, issued_runs=True)
    return end.ok, end.last_hash, list(items)


@pytest.fixture
def in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_chunks, "POOL_THRESHOLD", 10)
    monkeypatch.setattr(audit_chunks, "CHUNK_SIZE", 7)


def test_runs_and_single_records() -> None:
    ok, _head, items = one_pass(build(30))
    assert ok
    kinds = [(type(i).__name__, len(i.rows) if type(i) is IssuedRun else i.seq) for i in items]
    assert kinds == [
        ("AuditRecord", 0),
        ("IssuedRun", 8),  # 1..8
        ("AuditRecord", 9),  # slot_burned
        ("IssuedRun", 7),  # 10 (no tpm) ..16
        ("AuditRecord", 17),  # an extra field
        ("AuditRecord", 18),  # a mistyped counter
        ("IssuedRun", 11),  # 19..29
    ]
    run = items[3]
    assert type(run) is IssuedRun
    first, second = run.rows[:2]
    assert first[:3] == (10, T0 + 10, None) and second[2] == (11).to_bytes(16, "big")
    assert run.rows[-1][3] == "dev-0016" and run.rows[2][5] == (12).to_bytes(32, "big")
    assert run.rows[2][4:] == ("d", (12).to_bytes(32, "big"), "thermo", 12, 1)


def test_worker_chunks_equal_one_pass(in_workers: None) -> None:
    records = build(40)
    ok, head, items = one_pass(records)
    chunks = list(decode_chunks(records, 0, ZERO_HASH))
    assert ok and len(chunks) == 6 and all(c.ok for c in chunks)  # 40 in chunks of 7
    assert chunks[-1].last_hash == head == record_hash(records[-1])
    flat: list[object] = [item for c in chunks for item in c.items]
    # Runs are cut at chunk ends; record for record, the content is the same.
    assert _records_of(flat) == _records_of(items)


def _records_of(items: list[object]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for item in items:
        if type(item) is IssuedRun:
            out.extend(item.rows)
        elif type(item) is IssuedColumns:
            out.extend(item.rows())
        else:
            out.append(tuple(item))  # type: ignore[call-overload]
    return out


def test_columns_give_the_run_back_row_for_row() -> None:
    """A run by column (what a worker sends) folds the TPM readings into one string and a
    product or entitlement every record shares into one value; ``rows()`` undoes it."""
    _ok, _head, items = one_pass(build(30))
    runs = [i for i in items if type(i) is IssuedRun]
    plain = IssuedColumns.of(runs[0])  # 1..8: every field shared or 16-byte readings
    assert plain.first_seq == 1 and plain.product == "thermo" and plain.entitlement_seq == 1
    assert plain.tpm == b"".join(row[2] for row in runs[0].rows)
    assert IssuedColumns.of(runs[1]).tpm[0] is None  # record 10 has no reading
    mixed = IssuedRun([*runs[2].rows[:3], (*runs[2].rows[3][:6], "lamp", 12, 2)])
    cols = IssuedColumns.of(mixed)
    assert cols.product == ("thermo",) * 3 + ("lamp",) and cols.entitlement_seq == (1, 1, 1, 2)
    for run in (*runs, mixed):
        cols = IssuedColumns.of(run)
        assert cols.rows() == run.rows
        assert pickle.loads(audit_chunks._pickled(audit_chunks.DecodedChunk(True, b"", [cols])))[
            2
        ] == [cols]


def test_a_rewritten_record_before_a_chunk_boundary_is_caught(in_workers: None) -> None:
    """Record 20 (last of the chunk 14..20) is re-encoded: it links to 19 as it should, so
    only the next chunk, which starts from the hash of record 20, can see the break."""
    records = build(40)
    records[20] = encode_record(20, record_hash(records[19]), T0 + 20, "issued", issued(99))
    chunks = list(decode_chunks(records, 0, ZERO_HASH))
    assert [c.ok for c in chunks] == [True, True, True, False]  # stops at the bad chunk


def test_a_start_that_does_not_link_is_caught(in_workers: None) -> None:
    records = build(40)
    chunks = list(decode_chunks(records[5:], 5, record_hash(records[3])))
    assert [c.ok for c in chunks] == [False]
    chunks = list(decode_chunks(records[5:], 5, record_hash(records[4])))
    assert all(c.ok for c in chunks) and len(chunks) == 5


def test_small_exports_stay_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pool(*args: object) -> None:
        raise AssertionError("no worker for a small export")

    monkeypatch.setattr(audit_chunks.multiprocessing, "get_context", no_pool)
    [chunk] = decode_chunks(build(30), 0, ZERO_HASH)
    assert chunk.ok
