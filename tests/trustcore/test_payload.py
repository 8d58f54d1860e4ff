"""The payload envelope: the documented vector, topic/key binding, tampering, key lookup,
and the cost of encryption."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.docs import doc_vector
from trustcore.payload import (
    ENVELOPE_OVERHEAD,
    MAX_ENVELOPE_SIZE,
    PayloadError,
    PayloadKey,
    _seal,
    envelope_key_id,
    open_payload,
    seal_payload,
)

TOPIC = "devices/dev-0001/telemetry"


def vector_key() -> PayloadKey:
    return PayloadKey(bytes.fromhex("0001020304050607"), bytes(range(32)))


def test_doc_vector_byte_for_byte() -> None:
    envelope = _seal(vector_key(), TOPIC, b"temp=21.5", bytes(range(100, 112)))
    assert envelope == doc_vector("payload-envelope")
    assert open_payload(vector_key(), TOPIC, envelope) == b"temp=21.5"
    assert len(envelope) == len(b"temp=21.5") + ENVELOPE_OVERHEAD


def test_round_trip_and_fresh_nonces() -> None:
    key = PayloadKey.generate()
    a, b = seal_payload(key, TOPIC, b"x"), seal_payload(key, TOPIC, b"x")
    assert a != b
    assert open_payload(key, TOPIC, a) == open_payload({key.key_id: key}, TOPIC, b) == b"x"
    assert envelope_key_id(a) == key.key_id


def test_topic_is_bound() -> None:
    key = PayloadKey.generate()
    envelope = seal_payload(key, TOPIC, b"x")
    for other in ("devices/dev-0002/telemetry", "devices/dev-0001/cmd", TOPIC + "/"):
        with pytest.raises(PayloadError) as info:
            open_payload(key, other, envelope)
        assert info.value.reason == "decrypt_failed"


def test_key_id_is_bound_and_looked_up() -> None:
    old, new = PayloadKey.generate(), PayloadKey.generate()
    envelope = seal_payload(old, TOPIC, b"x")
    with pytest.raises(PayloadError) as info:
        open_payload({new.key_id: new}, TOPIC, envelope)
    assert info.value.reason == "unknown_key"
    # Relabel the envelope with the other key id (and give that id the right key): the AAD
    # still names the old id, so it does not open.
    relabelled = envelope[:1] + new.key_id + envelope[9:]
    with pytest.raises(PayloadError) as info:
        open_payload({new.key_id: PayloadKey(new.key_id, old.key)}, TOPIC, relabelled)
    assert info.value.reason == "decrypt_failed"
    assert open_payload({old.key_id: old, new.key_id: new}, TOPIC, envelope) == b"x"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_envelopes_are_refused(data: bytes) -> None:
    with pytest.raises(PayloadError):
        open_payload(vector_key(), TOPIC, data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 255))
def test_every_bit_flip_is_detected(pos: int, flip: int) -> None:
    envelope = _seal(vector_key(), TOPIC, b"temp=21.5 and more", bytes(12))
    pos %= len(envelope)
    mutated = envelope[:pos] + bytes([envelope[pos] ^ flip]) + envelope[pos + 1 :]
    with pytest.raises(PayloadError):
        open_payload(vector_key(), TOPIC, mutated)


def test_bad_keys_and_sizes() -> None:
    with pytest.raises(PayloadError):
        PayloadKey(b"short", bytes(32))
    with pytest.raises(PayloadError):
        PayloadKey(bytes(8), bytes(16))
    with pytest.raises(PayloadError) as info:
        seal_payload(vector_key(), TOPIC, bytes(MAX_ENVELOPE_SIZE))
    assert info.value.reason == "oversized"
    with pytest.raises(PayloadError) as info:
        open_payload(vector_key(), TOPIC, bytes(MAX_ENVELOPE_SIZE + 1))
    assert info.value.reason == "oversized"
    assert "key=" not in repr(vector_key())


def test_sealing_is_cheap() -> None:
    """Budget, not a benchmark: 100-byte payloads must seal in well under 50 us each."""
    key = PayloadKey.generate()
    data = bytes(100)
    start = time.perf_counter()
    for _ in range(5000):
        seal_payload(key, TOPIC, data)
    per_message = (time.perf_counter() - start) / 5000
    assert per_message < 50e-6, per_message


def test_precomputed_header_matches_the_documented_layout() -> None:
    """The per-key cached header and AAD prefix are exactly what the format says."""
    key = vector_key()
    envelope = seal_payload(key, TOPIC, b"x")
    assert envelope[:9] == b"\x01" + key.key_id
    # The vector again through the public opener with a bytearray and a memoryview: the
    # opener copies neither differently nor trusts them less.
    vector = doc_vector("payload-envelope")
    assert open_payload(key, TOPIC, bytearray(vector)) == b"temp=21.5"
    assert open_payload({key.key_id: key}, TOPIC, memoryview(vector)) == b"temp=21.5"


def test_a_key_filed_under_another_id_is_refused() -> None:
    """Fail closed: a key-id map whose entry holds a key with a different id (a keyring bug)
    must not be used to open, even when its secret is the right one."""
    key = vector_key()
    misfiled = PayloadKey(bytes(8), key.key)
    with pytest.raises(PayloadError) as info:
        open_payload({key.key_id: misfiled}, TOPIC, doc_vector("payload-envelope"))
    assert info.value.reason == "unknown_key"


def test_non_utf8_topic_is_a_payload_error() -> None:
    key = vector_key()
    with pytest.raises(PayloadError):
        seal_payload(key, "devices/\udc80/telemetry", b"x")
    with pytest.raises(PayloadError):
        open_payload(key, "devices/\udc80/telemetry", doc_vector("payload-envelope"))


def test_wrong_version_and_short_envelopes_are_malformed() -> None:
    vector = doc_vector("payload-envelope")
    for bad in (b"\x02" + vector[1:], vector[: ENVELOPE_OVERHEAD - 1], b""):
        with pytest.raises(PayloadError) as info:
            open_payload(vector_key(), TOPIC, bad)
        assert info.value.reason == "malformed"
