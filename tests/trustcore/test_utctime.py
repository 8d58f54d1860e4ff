"""The one clock protocol and time helpers of ``trustcore.utctime``; the core reads no clock."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from trustcore.utctime import Clock, now_unix, now_utc, system_clock

CORE = Path(__file__).resolve().parents[2] / "trustcore"


def test_system_clock_is_aware_utc() -> None:
    moment = system_clock()
    assert moment.tzinfo is UTC
    assert abs(moment - datetime.now(UTC)) < timedelta(minutes=1)


def test_now_utc_takes_the_given_time_to_the_second() -> None:
    given = datetime(2030, 1, 2, 4, 5, 6, 789, tzinfo=timezone(timedelta(hours=1)))
    assert now_utc(given) == datetime(2030, 1, 2, 3, 5, 6, tzinfo=UTC)
    assert now_utc(given).tzinfo is UTC


def test_now_utc_reads_the_clock_only_without_a_time() -> None:
    fixed = datetime(2031, 6, 1, 12, 0, 0, 500, tzinfo=UTC)
    calls: list[int] = []

    def clock() -> datetime:
        calls.append(1)
        return fixed

    typed: Clock = clock
    assert now_utc(None, typed) == fixed.replace(microsecond=0)
    assert now_utc(fixed, typed) == fixed.replace(microsecond=0)
    assert calls == [1]


def test_now_unix_takes_the_given_seconds_or_the_clock() -> None:
    fixed = datetime(2031, 6, 1, 12, 0, 0, 900_000, tzinfo=UTC)
    assert now_unix(1_234, lambda: fixed) == 1_234
    assert now_unix(None, lambda: fixed) == int(fixed.timestamp())


def test_now_utc_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        now_utc(datetime(2030, 1, 1))


def test_the_core_reads_no_clock() -> None:
    """Only ``utctime.system_clock`` touches the wall clock, and no core module calls it."""
    reads = {"now", "utcnow", "today", "time", "time_ns", "monotonic"}
    found: list[tuple[str, str]] = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "system_clock":
                found.append((path.name, func.id))
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id in {"datetime", "date", "time"}
                and func.attr in reads
            ):
                found.append((path.name, func.attr))
    assert found == [("utctime.py", "now")]
