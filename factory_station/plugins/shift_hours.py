"""Station plugin: provision only during configured shift hours.

Settings (``station.json`` → ``plugins``)::

    {"name": "shift_hours",
     "config": {"shifts": ["06:00-14:00", "14:00-22:00"], "timezone": "Europe/Berlin"}}

A shift is ``HH:MM-HH:MM`` in the given IANA time zone, start inclusive, end exclusive; an
end earlier than the start runs past midnight (``22:00-06:00``). Why: a line that runs
unattended at night should not be able to mint certificates then, even within its quota
(a stolen or scripted station is most useful when nobody is watching). The time judged is
the station's clock reading for the request; clock rollback is already refused by the
built-in ``check_clock`` that runs before any plugin.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trustcore.entitlement import EntitlementPolicy
from trustcore.issuance import IssuanceRequest, IssuanceState
from trustcore.policy_chain import ALLOW, Decision, refuse

__all__ = ["Shift", "ShiftHours"]

_SHIFT = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)")


@dataclass(frozen=True)
class Shift:
    """Minutes after local midnight: ``start`` inclusive, ``end`` exclusive."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: object) -> Shift:
        m = _SHIFT.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"shift {text!r} is not HH:MM-HH:MM")
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3]) * 60 + int(m[4])
        if end > 24 * 60 or start == end:
            raise ValueError(f"shift {text!r} is empty or ends after 24:00")
        return cls(start, end)

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end  # past midnight

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


class ShiftHours:
    """The plugin factory (entry point ``shift_hours``): ``ShiftHours(config)`` validates
    the settings (a bad setting fails at start-up, and the station then refuses every
    issuance) and the instance is the check."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not isinstance(config, Mapping) or set(config) != {"shifts", "timezone"}:
            raise ValueError('shift_hours needs exactly {"shifts": [...], "timezone": "..."}')
        shifts = config["shifts"]
        if not isinstance(shifts, list) or not shifts:
            raise ValueError("shift_hours needs a non-empty list of shifts")
        self.shifts = tuple(Shift.parse(s) for s in shifts)
        try:
            self.zone = ZoneInfo(str(config["timezone"]))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {config['timezone']!r}") from exc

    def __call__(
        self, policy: EntitlementPolicy, state: IssuanceState, request: IssuanceRequest
    ) -> Decision:
        local = datetime.fromtimestamp(request.now, UTC).astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        if any(shift.contains(minute) for shift in self.shifts):
            return ALLOW
        return refuse(
            "outside_shift",
            f"{local:%H:%M} {self.zone.key} is outside the shifts "
            + ", ".join(str(s) for s in self.shifts),
        )
