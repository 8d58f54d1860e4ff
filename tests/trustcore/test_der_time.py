"""trustcore.der.der_time: RFC 5280 §4.1.2.5 times, written by hand (not strftime)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from trustcore.der import der_time


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1950, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 7, 18, 5, 9, 999_999, tzinfo=UTC),
        datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2050, 1, 1, tzinfo=UTC),
        datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(1000, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_der_time_is_what_strftime_wrote(moment: datetime) -> None:
    if 1950 <= moment.year < 2050:
        expected = b"\x17\x0d" + moment.strftime("%y%m%d%H%M%SZ").encode()
    else:
        expected = b"\x18\x0f" + moment.strftime("%Y%m%d%H%M%SZ").encode()
    assert der_time(moment) == expected


def test_utctime_and_generalizedtime_examples() -> None:
    assert der_time(datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)) == b"\x17\x0d260304050607Z"
    assert der_time(datetime(2050, 3, 4, 5, 6, 7, tzinfo=UTC)) == b"\x18\x0f20500304050607Z"
