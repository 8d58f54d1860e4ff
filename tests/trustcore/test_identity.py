"""Identity value objects: invalid identifiers and serials cannot be constructed."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustcore.errors import InvalidValueError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId

VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
IDENTIFIER_TYPES = (DeviceId, StationId, SiteId)
valid_ids = st.from_regex(VALID, fullmatch=True)


@pytest.mark.parametrize("kind", IDENTIFIER_TYPES)
@given(value=valid_ids)
def test_valid_identifiers_round_trip(kind: type[DeviceId], value: str) -> None:
    ident = kind(value)
    assert str(ident) == value
    assert ident == kind(value)


@pytest.mark.parametrize("kind", IDENTIFIER_TYPES)
@given(value=st.text(max_size=80))
def test_only_matching_text_is_accepted(kind: type[DeviceId], value: str) -> None:
    if VALID.fullmatch(value) and value.isascii():
        assert kind(value).value == value
    else:
        with pytest.raises(InvalidValueError):
            kind(value)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a/b",
        "dev+1",
        "dev#",
        "$SYS",
        "dev 1",
        "dev\t1",
        "dev-1\n",
        "-dev",
        ".dev",
        "_dev",
        "dév-1",
        "dev\u0661",  # Arabic-Indic digit: \d would accept it, our ASCII class must not
        "\uff44\uff45\uff56",  # fullwidth look-alike of "dev"
        "a" * 65,
        "dev\x00",
    ],
)
def test_dangerous_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidValueError):
        DeviceId(bad)


@pytest.mark.parametrize("bad", [None, 1, b"dev-1", ["dev-1"]])
def test_non_string_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidValueError):
        DeviceId(bad)  # type: ignore[arg-type]


def test_identifier_is_frozen_and_typed() -> None:
    device = DeviceId("dev-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        device.value = "dev-2"  # type: ignore[misc]
    assert device != StationId("dev-1")  # type: ignore[comparison-overlap]
    assert DeviceId("a") < DeviceId("b")
    assert DeviceId("a" * 64).value == "a" * 64


@given(value=st.integers(min_value=1, max_value=2**159 - 1))
def test_serial_hex_round_trip(value: int) -> None:
    serial = CertSerial(value)
    assert CertSerial.from_hex(serial.hex) == serial
    assert int(str(serial), 16) == value


@given(value=st.one_of(st.integers(max_value=0), st.integers(min_value=2**159)))
def test_out_of_range_serials_are_refused(value: int) -> None:
    with pytest.raises(InvalidValueError):
        CertSerial(value)


@pytest.mark.parametrize("bad", [True, 1.0, "12", None])
def test_non_int_serials_are_refused(bad: object) -> None:
    with pytest.raises(InvalidValueError):
        CertSerial(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "0x12", "12 34", "g1", "1" * 41, "-1"])
def test_bad_serial_hex_is_refused(bad: str) -> None:
    with pytest.raises(InvalidValueError):
        CertSerial.from_hex(bad)


def test_random_serials_are_in_range_and_distinct() -> None:
    serials = {CertSerial.random() for _ in range(200)}
    assert len(serials) == 200
    assert all(0 < s.value < 2**159 for s in serials)
    # 159 random bits: across 200 draws at least one uses the top 8 bits.
    assert max(s.value for s in serials).bit_length() > 151


@pytest.mark.parametrize("kind", IDENTIFIER_TYPES)
def test_an_underscore_is_refused_it_cannot_be_a_printable_string(kind: type[DeviceId]) -> None:
    """The id is the certificate's serialNumber (PrintableString): with ``_`` the
    certificate would not parse, so the id is refused where it is made."""
    with pytest.raises(InvalidValueError, match="ASCII only"):
        kind("dev_1")
