"""Deterministic CBOR: RFC 8949 §4.2.1 examples, the docs vector, and strict decoding."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.docs import doc_vector
from trustcore import cbor
from trustcore.errors import EncodingError

DOC_VALUE = {"b": 1, 10: [True, None, b"\x00"], -1: "x", "aa": -500, 24: 4294967296}


def test_doc_vector_byte_for_byte() -> None:
    vector = doc_vector("cbor-deterministic")
    assert cbor.encode(DOC_VALUE) == vector
    assert cbor.decode(vector, max_size=100) == DOC_VALUE


def test_key_order_is_bytewise_not_length_first() -> None:
    """The reason cbor2's canonical mode is not used: 24 (18 18) sorts before -1 (20)."""
    ours = cbor.encode({-1: 0, 24: 0})
    assert ours == bytes.fromhex("a2181800" + "2000")
    assert cbor2.dumps({-1: 0, 24: 0}, canonical=True) != ours
    # A length-first (cbor2 canonical) encoding of the same map is refused on decode.
    with pytest.raises(EncodingError):
        cbor.decode(cbor2.dumps({-1: 0, 24: 0}, canonical=True), max_size=100)


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        # RFC 8949 Appendix A examples that fall inside our data model.
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (100, "1864"),
        (1000, "1903e8"),
        (1000000, "1a000f4240"),
        (1000000000000, "1b000000e8d4a51000"),
        (18446744073709551615, "1bffffffffffffffff"),
        (-18446744073709551616, "3bffffffffffffffff"),
        (-1, "20"),
        (-1000, "3903e7"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        (b"", "40"),
        (b"\x01\x02\x03\x04", "4401020304"),
        ("", "60"),
        ("IETF", "6449455446"),
        ("\u00fc", "62c3bc"),
        ([], "80"),
        ([1, [2, 3], [4, 5]], "8301820203820405"),
        ({}, "a0"),
        ({1: 2, 3: 4}, "a201020304"),
        ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    ],
)
def test_rfc8949_examples(value: Any, hex_: str) -> None:
    assert cbor.encode(value) == bytes.fromhex(hex_)
    assert cbor.decode(bytes.fromhex(hex_), max_size=64) == value


@pytest.mark.parametrize(
    "value",
    [1.0, float("nan"), 2**64, -(2**64) - 1, {1, 2}, {True: 1}, {b"k": 1}, {(1,): 2}, object()],
)
def test_encode_refuses_outside_data_model(value: object) -> None:
    with pytest.raises(EncodingError):
        cbor.encode(value)


def test_encode_refuses_lone_surrogate_and_deep_nesting() -> None:
    with pytest.raises(EncodingError):
        cbor.encode("\ud800")
    deep: list[Any] = []
    for _ in range(cbor.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(EncodingError):
        cbor.encode(deep)


@pytest.mark.parametrize(
    ("hex_", "why"),
    [
        ("", "empty"),
        ("0000", "trailing"),
        ("1817", "non-shortest int"),
        ("190017", "non-shortest int"),
        ("5801ff", "non-shortest length"),
        ("f93c00", "half float"),
        ("fb3ff0000000000000", "double"),
        ("c11a514b67b0", "tag 1 (datetime)"),
        ("c24101", "bignum tag"),
        ("d8ff01", "unknown tag"),
        ("f7", "undefined"),
        ("e0", "simple value 0"),
        ("5f4100ff", "indefinite bytes"),
        ("9f01ff", "indefinite array"),
        ("a2616101616102", "duplicate key"),
        ("a2616201616101", "unsorted keys"),
        ("62c328", "invalid UTF-8"),
        ("a1f401", "bool key"),
        ("a14101f6", "bytes key"),
        ("1c", "reserved additional info"),
        ("ff", "lone break"),
        ("82", "truncated array"),
        ("9b0000000100000000", "huge declared array"),
        ("5b0000000100000000", "huge declared bytes"),
    ],
)
def test_decode_refuses(hex_: str, why: str) -> None:
    with pytest.raises(EncodingError) as err:
        cbor.decode(bytes.fromhex(hex_), max_size=100)
    assert err.value.reason == "malformed", why


def test_decode_wraps_library_errors() -> None:
    with pytest.raises(EncodingError) as err:
        cbor.decode(b"\x82\x01", max_size=10)
    assert isinstance(err.value.__cause__, cbor2.CBORDecodeError)


def test_decode_oversized_checked_first() -> None:
    with pytest.raises(EncodingError) as err:
        cbor.decode(b"\x00" * 11, max_size=10)
    assert err.value.reason == "oversized"
    assert cbor.decode(b"\x4a" + b"\x00" * 10, max_size=11) == b"\x00" * 10


def test_decode_refuses_deep_nesting() -> None:
    data = b"\x81" * 40 + b"\x00"
    with pytest.raises(EncodingError):
        cbor.decode(data, max_size=100)


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(EncodingError):
        cbor.decode("a0", max_size=10)  # type: ignore[arg-type]


def test_field_helpers() -> None:
    m = cbor.decode(cbor.encode({"seq": 3, "flag": True, "h": b"\0" * 32, "n": None}), max_size=99)
    assert cbor.field(m, "seq", int) == 3
    assert cbor.field(m, "h", bytes, size=32) == b"\0" * 32
    assert cbor.optional_field(m, "n", str) is None
    assert cbor.optional_field(m, "absent", str) is None
    with pytest.raises(EncodingError, match="missing field 'nope'"):
        cbor.field(m, "nope", int)
    with pytest.raises(EncodingError, match="expected int, got bool"):
        cbor.field(m, "flag", int)
    with pytest.raises(EncodingError, match="expected str, got int"):
        cbor.field(m, "seq", str)
    with pytest.raises(EncodingError, match="expected length 16"):
        cbor.field(m, "h", bytes, size=16)
    with pytest.raises(EncodingError, match="expected bytes"):
        cbor.optional_field(m, "seq", bytes)
    with pytest.raises(EncodingError, match="expected a map"):
        cbor.map_of([1], "header")
    cbor.expect_keys(m, {"seq", "flag"}, {"h", "n"}, what="t")
    with pytest.raises(EncodingError, match="missing"):
        cbor.expect_keys(m, {"seq", "other"}, {"h", "n", "flag"}, what="t")
    with pytest.raises(EncodingError, match="unknown"):
        cbor.expect_keys(m, {"seq"}, what="t")


_scalars = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.integers(-(2**64), 2**64 - 1) | st.text(max_size=8), children, max_size=5
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_roundtrip_property(value: Any) -> None:
    encoded = cbor.encode(value)
    assert cbor.decode(encoded, max_size=len(encoded)) == _normalise(value)
    assert cbor.encode(cbor.decode(encoded, max_size=len(encoded))) == encoded


def _normalise(value: Any) -> Any:
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_escape_encoding_error(data: bytes) -> None:
    try:
        value = cbor.decode(data, max_size=64)
    except EncodingError:
        return
    assert cbor.encode(value) == data  # whatever is accepted is exactly canonical


# -------------------------------------------------------------- the C encoder fast path

_text_keyed = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_text_keyed | _values)
def test_encode_is_byte_identical_to_the_reference_encoder(value: Any) -> None:
    """Whether cbor2's C encoder or the §4.2.1 reference encoder writes it, the bytes are
    the same (text-keyed maps take the C path, anything else the reference)."""
    assert cbor.encode(value) == cbor.encode_reference(value)


def test_c_path_is_taken_only_for_its_data_model() -> None:
    registration_like = {
        "v": 1,
        "status": "ok",
        "nonce": b"\x01" * 32,
        "payload_key": {"key_id": b"k" * 8, "enc": b"e" * 65, "ct": b"c" * 48},
        "chain": [b"x" * 700, b"y" * 650],
        "retry": False,
        "aa": None,
        "z" * 30: -(2**64),
    }
    assert cbor._c_encodable(registration_like, 0)
    assert cbor.encode(registration_like) == cbor.encode_reference(registration_like)
    for outside in ({1: 2}, (1, 2), [2**64], [True, 1.0], {"a": bytearray(b"x")}):
        assert not cbor._c_encodable(outside, 0)
    deep: Any = 0
    for _ in range(cbor.MAX_DEPTH + 1):
        deep = [deep]
    assert not cbor._c_encodable(deep, 0)
    with pytest.raises(EncodingError):
        cbor.encode(deep)
    with pytest.raises(EncodingError):
        cbor.encode({"a": "\ud800"})


def test_large_byte_strings_are_checked_around_not_reencoded() -> None:
    """A top-level map with a large byte string (a sealed package's ciphertext) takes the
    path that compares everything but the string's content: it refuses the same things."""
    blob = bytes(range(256)) * 512  # 128 KiB
    value = {"v": 1, "ct": blob, "hdr": {"a": 1, "bb": [b"x", None]}, "z": blob[:100]}
    data = cbor.encode(value)
    assert cbor.decode(data, max_size=1 << 20) == value
    head = cbor.bytes_head(len(blob))
    long_head = b"\x5b" + len(blob).to_bytes(8, "big")
    small = cbor.encode({"a": 1, "bb": [b"x", None]})
    bad = {
        "trailing byte": data + b"\x00",
        "non-shortest blob head": data.replace(head + blob[:4], long_head + blob[:4], 1),
        "non-shortest small int": data.replace(
            small, small.replace(b"\x61a\x01", b"\x61a\x18\x01")
        ),
        "keys out of order": b"\xa4"
        + cbor.encode("v")
        + cbor.encode(1)
        + cbor.encode("ct")
        + head
        + blob
        + cbor.encode("z")
        + cbor.encode(blob[:100])
        + cbor.encode("hdr")
        + small,
        "float": data.replace(b"\x61v\x01", b"\x61v\xf9\x3c\x00"),
    }
    for what, variant in bad.items():
        assert variant != data, what
        with pytest.raises(EncodingError):
            cbor.decode(variant, max_size=1 << 20)
