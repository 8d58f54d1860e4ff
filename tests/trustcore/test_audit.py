"""Audit chain: builder, checkpoints, exports, the documented vectors and every attack."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from trustcore import audit, cbor
from trustcore.audit import AuditLog, ChainHead, Checkpoint
from trustcore.errors import AuditChainError, InvalidValueError

T0 = 1_700_000_000


class DeterministicKey(SoftwareKey):
    """A software key that signs with RFC 6979 nonces, so documented vectors are stable."""

    def sign(self, data: bytes) -> bytes:
        return self.private_key().sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


VECTOR_STATION = "5b1e3a7c9d2f4b6a8c0e2d4f6a8b0c2e4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e"


def vector_key() -> DeterministicKey:
    return DeterministicKey(ec.derive_private_key(int(VECTOR_STATION, 16), ec.SECP256R1()))


STATION_KEY = SoftwareKey.ephemeral()
OTHER_KEY = SoftwareKey.ephemeral()


def issue(log: AuditLog, n: int, *, first_device: int = 0, t: int = T0) -> list[bytes]:
    return [
        log.append(
            "issued",
            {"device": f"dev-{first_device + i:06d}", "serial": i.to_bytes(8, "big"), "ok": True},
            t + i,
        )
        for i in range(n)
    ]


def export(
    records: list[bytes],
    seq: int,
    head: bytes,
    *,
    count: int | None = None,
    station: str = "station-1",
    key: SoftwareKey = STATION_KEY,
) -> bytes:
    cp = audit.sign_checkpoint(
        Checkpoint(station, seq, head, T0 + 10_000, seq + 1 if count is None else count), key
    )
    return audit.encode_export(records, cp)


def export_of(log: AuditLog, records: list[bytes]) -> bytes:
    return audit.encode_export(records, log.make_checkpoint(STATION_KEY, T0 + 10_000))


def verify(
    data: bytes,
    *,
    head: ChainHead | None = None,
    station: str = "station-1",
    key: SoftwareKey = STATION_KEY,
) -> ChainHead:
    start = head or ChainHead()
    return audit.verify_export(
        data,
        station_id=station,
        station_public=key.public_key(),
        start_seq=start.next_seq,
        start_prev_hash=start.head_hash,
    )


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(AuditChainError) as err:
        fn()
    return err.value.reason


# -- builder and format ----------------------------------------------------------------------


def test_builder_links_records() -> None:
    log = AuditLog("station-1")
    records = issue(log, 3)
    decoded = [audit.decode_record(r) for r in records]
    assert [r.seq for r in decoded] == [0, 1, 2]
    assert decoded[0].prev_hash == audit.ZERO_HASH
    assert decoded[1].prev_hash == audit.record_hash(records[0])
    assert decoded[2].prev_hash == audit.record_hash(records[1])
    assert decoded[1].fields == {"device": "dev-000001", "serial": b"\0" * 7 + b"\1", "ok": True}
    assert log.head == ChainHead(3, audit.record_hash(records[2]))
    assert log.head.last_seq == 2


def test_builder_resumes_from_stored_head() -> None:
    log = AuditLog("station-1")
    first = issue(log, 2)
    resumed = AuditLog("station-1", head=log.head)
    second = issue(resumed, 2, first_device=2)
    head = audit.verify_chain(first + second)
    assert head.next_seq == 4
    assert [r.fields["device"] for r in head.records] == [f"dev-{i:06d}" for i in range(4)]


def test_builder_refuses_bad_input() -> None:
    log = AuditLog("station-1")
    for event, fields, t in (
        ("", {}, T0),
        ("issued", {"x": 1.5}, T0),
        ("issued", {"x": [1]}, T0),
        ("issued", {"": 1}, T0),
        ("issued", {}, -1),
        ("issued", {}, True),
    ):
        with pytest.raises(InvalidValueError):
            log.append(event, fields, t)  # type: ignore[arg-type]
    assert log.head.next_seq == 0  # nothing was appended
    with pytest.raises(InvalidValueError):
        log.make_checkpoint(STATION_KEY, T0)  # empty log
    with pytest.raises(InvalidValueError):
        AuditLog("")
    with pytest.raises(InvalidValueError):
        AuditLog("s", head=ChainHead(0, b"\1" * 32))


def test_decode_record_is_strict() -> None:
    record = issue(AuditLog("s"), 1)[0]
    with pytest.raises(AuditChainError) as err:
        audit.decode_record(record + b"\0")
    assert err.value.reason == "malformed"
    m = cbor.decode(record, max_size=1000)
    m["extra"] = 1
    with pytest.raises(AuditChainError):
        audit.decode_record(cbor.encode(m))


# -- documented vectors ----------------------------------------------------------------------


def vector_log() -> tuple[AuditLog, list[bytes]]:
    log = AuditLog("station-example")
    records = [
        log.append(
            "issued", {"device": "dev-0001", "serial": bytes.fromhex("01"), "product": "thermo"}, T0
        ),
        log.append(
            "issued",
            {"device": "dev-0002", "serial": bytes.fromhex("02"), "product": "thermo"},
            T0 + 60,
        ),
    ]
    return log, records


def test_doc_vector_record() -> None:
    _, records = vector_log()
    assert records[0] == doc_vector("audit-record")
    assert audit.record_hash(records[0]) == doc_vector("audit-record-hash")
    decoded = audit.decode_record(records[0])
    assert decoded.seq == 0
    assert decoded.prev_hash == audit.ZERO_HASH
    assert decoded.event == "issued"


def test_doc_vector_export() -> None:
    log, records = vector_log()
    data = audit.encode_export(records, log.make_checkpoint(vector_key(), T0 + 3600))
    assert data == doc_vector("audit-export")
    head = audit.verify_export(
        data, station_id="station-example", station_public=vector_key().public_key()
    )
    assert head.next_seq == 2
    assert head.head_hash == audit.record_hash(records[1])


# -- valid exports -----------------------------------------------------------------------------


def test_consecutive_exports_verify() -> None:
    log = AuditLog("station-1")
    first = issue(log, 5)
    head1 = verify(export_of(log, first))
    assert head1.next_seq == 5
    assert [r.seq for r in head1.records] == list(range(5))
    second = issue(log, 3, first_device=5)
    head2 = verify(export_of(log, second), head=head1)
    assert head2.next_seq == 8
    assert head2.head_hash == log.head.head_hash
    assert head2.records[0].fields["device"] == "dev-000005"


def test_streaming_on_record() -> None:
    log = AuditLog("station-1")
    records = issue(log, 5)
    seen: list[audit.AuditRecord] = []
    head = verify_stream(export_of(log, records), seen.append)
    assert head.records == ()
    assert head.next_seq == 5
    assert [r.seq for r in seen] == list(range(5))
    assert [r.hash for r in seen] == [audit.record_hash(r) for r in records]
    # On a broken chain the callback has seen only records before the break.
    seen.clear()
    broken = [*records[:2], records[3], records[2], records[4]]
    with pytest.raises(AuditChainError) as err:
        verify_stream(export_of(log, broken), seen.append)
    assert err.value.reason == "reorder"
    assert [r.seq for r in seen] == [0, 1]


def verify_stream(data: bytes, on_record: Callable[[audit.AuditRecord], object]) -> ChainHead:
    return audit.verify_export(
        data, station_id="station-1", station_public=STATION_KEY.public_key(), on_record=on_record
    )


def test_verify_chain_accepts_any_iterable() -> None:
    records = issue(AuditLog("s"), 4)
    assert audit.verify_chain(iter(records)).next_seq == 4
    assert audit.verify_chain([]).next_seq == 0
    with pytest.raises(TypeError):
        audit.verify_chain(records[0])  # type: ignore[arg-type]


# -- attacks -------------------------------------------------------------------------------------


def test_gap_missing_middle_record() -> None:
    log = AuditLog("station-1")
    records = issue(log, 6)
    del records[2]
    assert reason(lambda: verify(export_of(log, records))) == "gap"


def test_gap_between_exports() -> None:
    log = AuditLog("station-1")
    head1 = verify(export_of(log, issue(log, 3)))
    issue(log, 2)  # records 3, 4 never exported
    later = issue(log, 2)
    assert reason(lambda: verify(export_of(log, later), head=head1)) == "gap"


def test_reorder_adjacent_swap() -> None:
    log = AuditLog("station-1")
    records = issue(log, 6)
    records[2], records[3] = records[3], records[2]
    assert reason(lambda: verify(export_of(log, records))) == "reorder"


def test_reorder_whole_export_reversed() -> None:
    log = AuditLog("station-1")
    records = issue(log, 5)
    assert reason(lambda: verify(export_of(log, records[::-1]))) == "reorder"


def _forked_logs(common: int) -> tuple[AuditLog, list[bytes], AuditLog, list[bytes]]:
    """Two histories sharing their first ``common`` records (a station database restored
    from a backup and reused)."""
    a = AuditLog("station-1")
    shared = issue(a, common)
    b = AuditLog("station-1", head=a.head)
    return a, shared + issue(a, 3, first_device=100), b, shared + issue(b, 3, first_device=200)


def accepted_prefix(records: list[bytes], n: int) -> bytes:
    """An export of the first ``n`` records with a station checkpoint at record ``n - 1``."""
    return export(records[:n], n - 1, audit.record_hash(records[n - 1]))


def test_fork_two_records_for_one_seq() -> None:
    a, recs_a, _, recs_b = _forked_logs(3)
    mixed = [*recs_a[:4], recs_b[3], *recs_a[4:]]
    assert reason(lambda: verify(export_of(a, mixed))) == "fork"


def test_fork_new_export_does_not_link_to_previous_head() -> None:
    _, recs_a, b, recs_b = _forked_logs(3)
    head1 = verify(accepted_prefix(recs_a, 5))  # HQ accepted history A up to seq 4
    issue(b, 5, first_device=300)  # B continues past seq 5
    later_b = recs_b[5:]  # B's seq 5: its prev is B's record 4, not A's
    assert [audit.decode_record(r).seq for r in later_b] == [5]
    assert reason(lambda: verify(export_of(b, later_b), head=head1)) == "fork"


def test_fork_export_restating_an_accepted_seq_differently() -> None:
    _, recs_a, b, recs_b = _forked_logs(3)
    head1 = verify(accepted_prefix(recs_a, 5))
    assert reason(lambda: verify(export_of(b, recs_b[4:]), head=head1)) == "fork"


def test_duplicate_record_in_export_and_resent_head() -> None:
    log = AuditLog("station-1")
    records = issue(log, 4)
    assert (
        reason(lambda: audit.verify_chain([*records[:3], records[2], *records[3:]])) == "duplicate"
    )
    head1 = verify(export_of(log, records))
    more = issue(log, 2)
    assert reason(lambda: verify(export_of(log, [records[3], *more]), head=head1)) == "duplicate"


def test_truncation_tail_cut() -> None:
    log = AuditLog("station-1")
    records = issue(log, 6)
    data = export_of(log, records[:4])  # checkpoint says seq 5, records stop at 3
    assert reason(lambda: verify(data)) == "truncation"


def test_truncation_everything_cut() -> None:
    log = AuditLog("station-1")
    issue(log, 3)
    assert reason(lambda: verify(export_of(log, []))) == "truncation"


def test_truncation_checkpoint_count_mismatch() -> None:
    log = AuditLog("station-1")
    records = issue(log, 4)
    data = export(records, 3, log.head.head_hash, count=6)
    assert reason(lambda: verify(data)) == "truncation"


def test_rewritten_entry_in_the_middle() -> None:
    log = AuditLog("station-1")
    records = issue(log, 5)
    m = cbor.decode(records[2], max_size=1000)
    m["fields"]["device"] = "dev-counterfeit"
    records[2] = cbor.encode(m)
    assert reason(lambda: verify(export_of(log, records))) == "rewritten_entry"


def test_rewritten_last_entry_breaks_the_signed_head() -> None:
    log = AuditLog("station-1")
    records = issue(log, 3)
    m = cbor.decode(records[2], max_size=1000)
    m["time"] += 1
    records[2] = cbor.encode(m)
    assert reason(lambda: verify(export_of(log, records))) == "forged_checkpoint"


def test_forged_checkpoint_wrong_key() -> None:
    log = AuditLog("station-1")
    records = issue(log, 3)
    data = export(records, 2, log.head.head_hash, key=OTHER_KEY)
    assert reason(lambda: verify(data)) == "forged_checkpoint"


def test_forged_checkpoint_altered_body() -> None:
    """Extending the checkpoint over added records without the station key fails."""
    log = AuditLog("station-1")
    records = issue(log, 3)
    signed = cbor.decode(log.make_checkpoint(STATION_KEY, T0), max_size=4096)
    extra = issue(log, 1)
    signed["body"].update(seq=3, count=4, head=log.head.head_hash)
    data = audit.encode_export(records + extra, cbor.encode(signed))
    assert reason(lambda: verify(data)) == "forged_checkpoint"


def test_wrong_station() -> None:
    log = AuditLog("station-2")
    data = export_of(log, issue(log, 2))  # signed by STATION_KEY but names station-2
    assert reason(lambda: verify(data, station="station-1")) == "wrong_station"


def test_unattested_records_after_checkpoint() -> None:
    log = AuditLog("station-1")
    records = issue(log, 3)
    cp = log.make_checkpoint(STATION_KEY, T0)
    records += issue(log, 2)
    assert reason(lambda: verify(audit.encode_export(records, cp))) == "unattested"


def test_malformed_record_and_export() -> None:
    log = AuditLog("station-1")
    records = issue(log, 3)
    cp = log.make_checkpoint(STATION_KEY, T0)
    for bad in (b"", b"\xa0", b"\x01", records[1][:-1], cbor.encode({"seq": 1})):
        with pytest.raises(AuditChainError) as err:
            audit.verify_chain([records[0], bad])
        assert err.value.reason == "malformed"
    data = audit.encode_export(records, cp)
    assert reason(lambda: audit.decode_export(data + b"\0", max_size=1 << 20)) == "malformed"
    assert reason(lambda: audit.decode_export(data, max_size=len(data) - 1)) == "oversized"
    for length in range(0, len(data), 7):
        with pytest.raises(AuditChainError) as err:
            audit.decode_export(data[:length], max_size=1 << 20)
        assert err.value.reason == "malformed"


def test_every_byte_flip_of_an_export_is_refused() -> None:
    log = AuditLog("station-1")
    data = export_of(log, issue(log, 3))
    verify(data)
    for position in range(len(data)):
        bad = bytearray(data)
        bad[position] ^= 0x01
        with pytest.raises(AuditChainError):
            verify(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=5))
def test_random_records_refused_cleanly(records: list[bytes]) -> None:
    with pytest.raises(AuditChainError):
        audit.verify_chain(records)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_exports_refused_cleanly(data: bytes) -> None:
    with pytest.raises(AuditChainError):
        verify(data)


def test_export_encoding_is_checked_without_reencoding_records() -> None:
    """decode_export compares the bytes around the records and the total length: a longer
    head for one record, an unsorted map, an unsorted checkpoint or a trailing byte
    is still refused."""
    log = AuditLog("station-1")
    records = [*issue(log, 3), bytes(300)]  # a record of 300 bytes has a 3-byte head
    cp = log.make_checkpoint(STATION_KEY, T0)
    data = audit.encode_export(records, cp)
    assert audit.decode_export(data, max_size=1 << 20).records == tuple(records)
    one = cbor.bytes_head(len(records[1])) + records[1]
    long_head = b"\x59" + len(records[1]).to_bytes(2, "big") + records[1]
    cp_map = cbor.decode(cp, max_size=4096)
    variants = {
        "non-shortest record head": data.replace(one, long_head, 1),
        "keys out of order": b"\xa3"
        + cbor.encode("v")
        + cbor.encode(1)
        + cbor.encode("checkpoint")
        + cp
        + cbor.encode("records")
        + cbor.encode(records),
        "unsorted checkpoint": data[: -len(cp)]
        + b"\xa2"
        + cbor.encode("body")
        + cbor.encode(cp_map["body"])
        + cbor.encode("sig")
        + cbor.encode(cp_map["sig"]),
        "trailing byte": data + b"\x00",
    }
    for what, variant in variants.items():
        assert variant != data, what
        with pytest.raises(AuditChainError) as err:
            audit.decode_export(variant, max_size=1 << 20)
        assert err.value.reason == "malformed", what


@pytest.mark.parametrize("bad", [1, 255, 256, 257, 700])
def test_streamed_verification_catches_a_defect_in_any_slice(bad: int) -> None:
    """verify_chain decodes a few hundred records at a time (audit.decode_chain): a
    rewritten record on either side of a slice boundary is named, and every record before
    it was streamed in order."""
    log = audit.AuditLog("station-a")
    records = [log.append("tick", {"i": i}, i) for i in range(800)]
    seen: list[int] = []
    head = audit.verify_chain(records, on_record=lambda r: seen.append(r.seq))
    assert seen == list(range(800)) and head.head_hash == audit.record_hash(records[-1])
    records[bad] = audit.encode_record(bad, bytes(32), bad, "tick", {})
    seen.clear()
    with pytest.raises(AuditChainError) as err:
        audit.verify_chain(records, on_record=lambda r: seen.append(r.seq))
    assert err.value.reason == "rewritten_entry"
    assert seen[: min(bad, 256)] == list(range(min(bad, 256)))
