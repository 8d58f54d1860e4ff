"""Time in the core: one type (aware UTC ``datetime``), one check, one pair of conversions.

The core never reads a clock: every function that needs the time takes ``now`` from its
caller, and each component's composition root owns the clock (so a test can walk a device
through ten years). Certificates, CRLs and chain verification work in aware UTC datetimes;
wire formats (sealed packages, audit records, signed requests) carry whole Unix seconds.
This module owns the check that a datetime is aware and the conversions between the two,
so that no module of the core keeps its own copy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from trustcore.errors import InvalidValueError

__all__ = ["aware_utc", "from_unix", "to_unix", "whole_seconds"]


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
