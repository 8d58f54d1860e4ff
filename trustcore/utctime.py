"""Time in the core: one type (aware UTC ``datetime``), one check, one pair of conversions.

The core never reads a clock: every function that needs the time takes ``now`` from its
caller, and each component's composition root owns the clock (so a test can walk a device
through ten years). Certificates, CRLs and chain verification work in aware UTC datetimes;
wire formats (sealed packages, audit records, signed requests) carry whole Unix seconds.
This module owns the check that a datetime is aware and the conversions between the two,
so that no module of the core keeps its own copy; and the one clock protocol
(:class:`Clock`) with the one wall clock (:func:`system_clock`) that the composition roots
of the registrar and HQ inject. No function of the core calls a clock (``now`` is passed
in; ``tests/trustcore/test_utctime.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from trustcore.errors import InvalidValueError

__all__ = [
    "Clock",
    "aware_utc",
    "from_unix",
    "now_unix",
    "now_utc",
    "system_clock",
    "to_unix",
    "whole_seconds",
]


class Clock(Protocol):
    """A clock: called, it returns the current time as an aware UTC ``datetime``.

    The one clock type of the project: each component's composition root picks one
    (:func:`system_clock` in production, a fake in tests) and passes it down."""

    def __call__(self) -> datetime: ...


def system_clock() -> datetime:
    """The wall clock (aware UTC). Only composition roots and defaults of components use it:
    the core takes ``now`` from its caller and never calls this."""
    return datetime.now(UTC)


def aware_utc(
    what: str, moment: object, error: Callable[[str], Exception] = InvalidValueError
) -> datetime:
    """``moment`` in UTC. A naive datetime (a local-time bug waiting to happen) or anything
    else raises ``error(f"{what} must be timezone-aware")`` — each caller passes its own
    error type, so a bad time reads as that module's refusal."""
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise error(f"{what} must be timezone-aware")
    return moment.astimezone(UTC)


def whole_seconds(
    what: str, moment: object, error: Callable[[str], Exception] = InvalidValueError
) -> datetime:
    """:func:`aware_utc` truncated to the second: X.509 times (RFC 5280 §4.1.2.5) carry
    whole seconds, so a certificate or CRL is built from exactly the time it will show."""
    return aware_utc(what, moment, error).replace(microsecond=0)


def to_unix(moment: datetime) -> int:
    """Whole Unix seconds of an aware datetime (what the wire formats carry)."""
    return int(moment.timestamp())


def from_unix(seconds: float) -> datetime:
    """The aware UTC datetime of Unix ``seconds``."""
    return datetime.fromtimestamp(seconds, UTC)


def now_utc(now: datetime | None, clock: Clock = system_clock) -> datetime:
    """``now`` (or, when None, ``clock()``) in UTC to the whole second. A naive ``now``
    raises ``ValueError("now must be timezone-aware")``: the form in which the registrar's
    and HQ's operations take an optional time."""
    return whole_seconds("now", clock() if now is None else now, ValueError)


def now_unix(now: int | None, clock: Clock = system_clock) -> int:
    """``now`` (whole Unix seconds) or, when None, ``clock()`` in whole Unix seconds: the
    form in which HQ's store operations take an optional time."""
    return to_unix(clock()) if now is None else now
