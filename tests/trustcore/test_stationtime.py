"""Pure tests of the station's trusted time (trustcore.stationtime): the TPM ledger across
boots, anchors from HQ-signed times, and the ceiling they put on the host clock."""

from __future__ import annotations

import pytest

from tests.fixtures.docs import doc_vector
from trustcore import cbor
from trustcore.errors import EncodingError, InvalidValueError, PolicyError
from trustcore.messages import TimeStatement
from trustcore.stationtime import (
    MAX_SIGNED_TIME_AGE_S,
    TimeAnchor,
    TimeAudit,
    TpmClockReading,
    TpmLedger,
    anchor_at,
    trusted_time,
    unpack_tpm_field,
)

T0 = 1_800_000_000


def reading(time_ms: int, reset: int = 1, restart: int = 0, safe: bool = True) -> TpmClockReading:
    return TpmClockReading(time_ms, time_ms, reset, restart, safe)


def test_ledger_adds_powered_time_within_and_across_boots() -> None:
    ledger = TpmLedger.start(reading(5_000))
    ledger = ledger.advance(reading(65_000))
    assert ledger.total_ms == 60_000
    # A new boot (power cycle): only the time since its startup counts, the off time does not.
    ledger = ledger.advance(reading(2_000, reset=2))
    assert (ledger.total_ms, ledger.boot) == (62_000, (2, 0))
    ledger = ledger.advance(reading(3_000, reset=2, restart=1))
    assert ledger.total_ms == 65_000
    assert TpmLedger.from_map(ledger.to_map()) == ledger


@pytest.mark.parametrize(
    "later",
    [reading(4_000), reading(10_000, reset=0), reading(10_000, reset=1, restart=0)],
)
def test_ledger_refuses_a_tpm_that_went_back(later: TpmClockReading) -> None:
    ledger = TpmLedger.start(reading(5_000, reset=1, restart=3))
    with pytest.raises(PolicyError) as info:
        ledger.advance(later)
    assert info.value.reason == "tpm_clock_inconsistent"


def test_reading_values_are_checked() -> None:
    with pytest.raises(InvalidValueError):
        TpmClockReading(-1, 0, 0, 0, True)
    with pytest.raises(InvalidValueError):
        TpmClockReading(0, 0, 2**32, 0, True)
    # The compact field every issued record carries: reset u32, restart u32, time u64.
    fields = TpmClockReading(7, 9, 1, 2, False).audit_fields()
    assert fields == {"tpm": bytes.fromhex("00000001000000020000000000000007")}
    assert unpack_tpm_field(fields["tpm"]) == (1, 2, 7)
    assert unpack_tpm_field(b"\x00" * 15) is None and unpack_tpm_field(7) is None
    full = TpmClockReading(7, 9, 1, 2, False).audit_fields(full=True)
    assert (full["tpm_clock"], full["tpm_safe"]) == (9, 0)


def test_trusted_time_moves_with_the_tpm_only() -> None:
    ledger = TpmLedger.start(reading(1_000))
    anchor = anchor_at(signed_time=T0, host_now=T0 + 20, ledger=ledger, source="entitlement 1")
    assert anchor == TimeAnchor(T0 + 20, 0, "entitlement 1")
    # A day of host clock, ten seconds of TPM: the station vouches for ten seconds.
    assert trusted_time(anchor, ledger.advance(reading(11_000))) == T0 + 30
    assert TimeAnchor.from_map(anchor.to_map()) == anchor


def test_anchor_clamps_the_host_clock_to_the_signed_time() -> None:
    ledger = TpmLedger(boot=(1, 0), boot_time_ms=0, total_ms=50_000)
    # Host behind HQ's signing time: HQ's time wins (the real time is at least that).
    behind = anchor_at(signed_time=T0, host_now=T0 - 900, ledger=ledger, source="s")
    assert behind.time == T0
    # Host far ahead: believed only up to the longest plausible journey of the file.
    ahead = anchor_at(signed_time=T0, host_now=T0 + 30 * 86400, ledger=ledger, source="s")
    assert ahead.time == T0 + MAX_SIGNED_TIME_AGE_S
    # An older signed time never moves trusted time back.
    later = ledger.advance(reading(10_000, reset=2))
    again = anchor_at(
        signed_time=T0 - 86400, host_now=T0 - 86400, ledger=later, source="old", current=behind
    )
    assert again.time == T0 + 10 and again.total_ms == 60_000


def test_from_map_is_strict() -> None:
    with pytest.raises(InvalidValueError):
        TpmLedger.from_map({"reset": 1, "restart": 0, "boot_time_ms": -1, "total_ms": 0})
    with pytest.raises(InvalidValueError):
        TimeAnchor.from_map({"time": 1, "total_ms": 0})


def test_time_statement_vector_and_strict_decoding() -> None:
    statement = TimeStatement("station-a", 1_800_000_000)
    assert statement.encode() == doc_vector("time-statement-payload")
    assert TimeStatement.decode(doc_vector("time-statement-payload")) == statement
    for bad in (
        {"station_id": "station-a"},
        {"station_id": "station-a", "time": 1, "extra": 0},
        {"station_id": "station-a", "time": -1},
        {"station_id": 7, "time": 1},
    ):
        with pytest.raises(EncodingError):
            TimeStatement.decode(cbor.encode(bad))


def _tpm(time_ms: int, reset: int = 1, restart: int = 0) -> bytes:
    tpm = reading(time_ms, reset, restart).audit_fields(full=False)["tpm"]
    assert type(tpm) is bytes
    return tpm


def test_observe_batch_is_observe_reading_by_reading() -> None:
    """The batch replay (HQ's hot path) gives the findings and the state that one
    ``observe`` per reading gives, through every branch: no anchor yet, the common case,
    ahead of the TPM, a reboot, a TPM that went back, a malformed field, no reading."""
    readings: list[tuple[int, object]] = [
        (T0, _tpm(1_000)),  # first reading: no boot known yet
        (T0 + 1, _tpm(2_000)),
        (T0 + 2, None),  # a record without a reading
        (T0 + 3, _tpm(3_000)),
        (T0 + 9_000, _tpm(4_000)),  # far ahead once anchored
        (T0 + 10, _tpm(500, restart=1)),  # a TPM restart: powered time goes on
        (T0 + 11, _tpm(400, restart=1)),  # went back within a boot
        (T0 + 12, b"short"),  # malformed
        (T0 + 13, 7),  # not bytes at all
        (T0 + 14, _tpm(5_000, restart=1)),
        (T0 + 15, _tpm(6_000, restart=1)),
    ]
    one, batch = TimeAudit(60), TimeAudit(60)
    expected: list[tuple[int, str, str]] = []
    for index, (when, tpm) in enumerate(readings):
        if index == 2:
            one.anchor(T0)
        if tpm is not None:
            found = one.observe(when, tpm)
            if found is not None:
                expected.append((index, *found))
    whens, tpms = [w for w, _ in readings], [t for _, t in readings]
    found_batch = batch.observe_batch(whens[:2], tpms[:2])
    batch.anchor(T0)
    found_batch += [(i + 2, k, d) for i, k, d in batch.observe_batch(whens[2:], tpms[2:])]
    assert found_batch == expected
    assert [k for _, k, _ in expected] == [
        "clock_ahead_of_tpm",
        "tpm_clock_inconsistent",
        "malformed_record",
        "malformed_record",
    ]
    assert batch.to_map() == one.to_map() and batch.to_map()["total_ms"] == 9_100


def test_observe_batch_unpacks_whole_runs_as_observe_would() -> None:
    """A run of well-formed readings (unpacked at once) through the same branches."""
    whens = [T0, T0 + 1, T0 + 2, T0 + 9_000, T0 + 10, T0 + 11, T0 + 12, T0 + 13]
    tpms: list[object] = [
        _tpm(1_000),
        _tpm(2_000),
        _tpm(3_000),
        _tpm(4_000),  # far ahead
        _tpm(500, restart=1),
        _tpm(400, restart=1),  # went back
        _tpm(5_000, restart=1),
        _tpm(6_000, restart=1),
    ]
    one, batch = TimeAudit(60), TimeAudit(60)
    for audit in (one, batch):
        audit.observe(T0 - 1, _tpm(900))
        audit.anchor(T0)
    expected = []
    for index, (when, tpm) in enumerate(zip(whens, tpms, strict=True)):
        found = one.observe(when, tpm)
        if found is not None:
            expected.append((index, *found))
    found_batch = batch.observe_batch(whens, tpms)
    assert found_batch == expected
    assert [(i, k) for i, k, _ in found_batch] == [
        (3, "clock_ahead_of_tpm"),
        (5, "tpm_clock_inconsistent"),
    ]
    assert batch.to_map() == one.to_map() and batch.to_map()["total_ms"] == 9_200


def test_observe_joined_is_observe_batch_of_the_readings() -> None:
    """HQ's decoder sends a run's readings concatenated: the same findings and state as
    ``observe_batch`` of the readings one by one; a length that is not 16 per time is
    refused."""
    whens = [T0, T0 + 1, T0 + 9_000, T0 + 10, T0 + 11, T0 + 12]
    tpms = [_tpm(1_000), _tpm(2_000), _tpm(4_000), _tpm(500, restart=1), _tpm(400, restart=1)]
    tpms.append(_tpm(5_000, restart=1))
    joined, batch = TimeAudit(60), TimeAudit(60)
    for audit in (joined, batch):
        audit.observe(T0 - 1, _tpm(900))
        audit.anchor(T0)
    assert joined.observe_joined(whens, b"".join(tpms)) == batch.observe_batch(whens, tpms)
    assert joined.to_map() == batch.to_map()
    with pytest.raises(InvalidValueError):
        joined.observe_joined(whens, b"".join(tpms)[:-1])


def test_observe_batch_refuses_readings_that_only_add_up_to_16_bytes_each() -> None:
    """A 15- and a 17-byte reading join to 32 bytes: the batch must still find both
    malformed, as ``observe`` does, not unpack them as two well-formed readings."""
    good = _tpm(2_000)
    whens = [T0, T0 + 1, T0 + 2]
    tpms: list[object] = [good[:15], good + b"\x00", _tpm(3_000)]
    one, batch = TimeAudit(60), TimeAudit(60)
    for audit in (one, batch):
        audit.observe(T0 - 1, _tpm(1_000))
        audit.anchor(T0)
    expected = []
    for index, (when, tpm) in enumerate(zip(whens, tpms, strict=True)):
        found = one.observe(when, tpm)
        if found is not None:
            expected.append((index, *found))
    assert [k for _, k, _ in expected] == ["malformed_record", "malformed_record"]
    assert batch.observe_batch(whens, tpms) == expected
    assert batch.to_map() == one.to_map()
