"""Station time the host cannot wind: HQ-vouched anchors plus TPM-powered time, without I/O.

A factory station enforces a daily limit and a key-use window, both judged by a clock. The
host clock is the operator's to set, so it is only believed up to a ceiling:

    trusted time = anchor time + TPM-powered time elapsed since the anchor

* The **anchor** is a moment HQ vouches for: the signed ``created`` time of an entitlement
  package or of an HQ time statement, taken when the station imports it
  (:func:`anchor_at`, clamped to ``[signed, signed + MAX_SIGNED_TIME_AGE_S]``).
* **TPM-powered time** is measured with the TPM's ``TPMS_TIME_INFO.time`` (milliseconds
  since this TPM boot; nobody can set it, not even the owner, unlike ``Clock`` which the
  owner may move forward with TPM2_ClockSet) and the boot identity ``(resetCount,
  restartCount)``, which goes up at every TPM startup. :class:`TpmLedger` adds it up across
  boots; time while the TPM was off counts as zero, because the station cannot know it.

Host time more than the entitlement's ``clock_skew_s`` above the trusted time is refused
(``clock_ahead``, :func:`trustcore.issuance.check_trusted_time`). Host time set back below
what the station already recorded stays refused by ``check_clock``. So a clock moved
forward a day at a time gains nothing: trusted time moves only as fast as real time.

The price is that powered-off time is lost: after the station (with its TPM) was off for
longer than the skew, the host clock is ahead of the trusted time until HQ vouches for a
new time (a new entitlement or a time statement). That is deliberate: a power cycle is
exactly what an attacker would use to pretend that a day passed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from trustcore.errors import InvalidValueError, PolicyError

__all__ = [
    "MAX_SIGNED_TIME_AGE_S",
    "TimeAnchor",
    "TimeAudit",
    "TpmClockReading",
    "TpmLedger",
    "anchor_at",
    "expected_anchor",
    "powered_ms",
    "trusted_time",
    "unpack_tpm_field",
]

#: The most a station believes has passed between HQ signing a time (an entitlement, a time
#: statement) and the station importing it: time for a file to travel on a USB stick. A
#: host clock further ahead at import is clamped to this, then ``clock_ahead`` refusals say
#: that HQ must vouch again.
MAX_SIGNED_TIME_AGE_S: Final = 7 * 86400

_U32: Final = 2**32
_U64: Final = 2**64
#: The ``tpm`` audit field: resetCount u32, restartCount u32, time u64 (ms), big-endian.
_TPM_FIELD: Final = struct.Struct(">IIQ")


@dataclass(frozen=True, slots=True)
class TpmClockReading:
    """One TPM2_ReadClock answer (``TPMS_TIME_INFO``).

    ``time_ms``: milliseconds since this TPM boot's startup, advanced only while powered,
    settable by nobody. ``clock_ms``: the persistent TPM Clock (the owner can move it
    forward). ``reset_count``/``restart_count``: the boot identity (every TPM startup raises
    one of them; TPM2_Clear zeroes both). ``safe``: False when Clock may have gone back
    (a disorderly shutdown before Clock was saved).
    """

    time_ms: int
    clock_ms: int
    reset_count: int
    restart_count: int
    safe: bool

    def __post_init__(self) -> None:
        for name, value, bound in (
            ("time_ms", self.time_ms, _U64),
            ("clock_ms", self.clock_ms, _U64),
            ("reset_count", self.reset_count, _U32),
            ("restart_count", self.restart_count, _U32),
        ):
            if type(value) is not int or not 0 <= value < bound:
                raise InvalidValueError(f"TPM clock {name} out of range: {value!r}")

    @property
    def boot(self) -> tuple[int, int]:
        """Ordered: a later TPM boot has a larger ``(resetCount, restartCount)``."""
        return (self.reset_count, self.restart_count)

    def audit_fields(self, *, full: bool = False) -> dict[str, int | bytes]:
        """What a station writes into an audit record so that HQ can check its times:
        ``tpm``, 16 bytes (``resetCount`` u32, ``restartCount`` u32, ``time`` u64 ms,
        big-endian; compact because every ``issued`` record carries it and a million-record
        export must stay under the package size limit). ``full`` (anchor records) adds
        ``tpm_clock`` and ``tpm_safe`` (0/1) for diagnosis; HQ's replay does not need them."""
        out: dict[str, int | bytes] = {
            "tpm": _TPM_FIELD.pack(self.reset_count, self.restart_count, self.time_ms)
        }
        if full:
            out["tpm_clock"] = self.clock_ms
            out["tpm_safe"] = int(self.safe)
        return out

    def to_map(self) -> dict[str, int | bool]:
        return {
            "time_ms": self.time_ms,
            "clock_ms": self.clock_ms,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": self.safe,
        }


def unpack_tpm_field(value: object) -> tuple[int, int, int] | None:
    """``(resetCount, restartCount, time_ms)`` of a ``tpm`` audit field; None if malformed."""
    if type(value) is not bytes or len(value) != _TPM_FIELD.size:
        return None
    reset, restart, time_ms = _TPM_FIELD.unpack(value)
    return reset, restart, time_ms


def powered_ms(
    last_boot: tuple[int, int], last_time_ms: int, boot: tuple[int, int], time_ms: int
) -> int | None:
    """TPM-powered milliseconds between two readings, as far as they show: within one boot
    the difference of ``time``; into a later boot the ``time`` since its startup (the time
    the TPM was off counts as zero). None when the second reading cannot follow the first:
    ``time`` went back within a boot, or the boot counters went down."""
    if boot == last_boot:
        return time_ms - last_time_ms if time_ms >= last_time_ms else None
    return time_ms if boot > last_boot else None


@dataclass(frozen=True, slots=True)
class TpmLedger:
    """TPM-powered time the station has observed, accumulated across TPM boots.

    ``boot``/``boot_time_ms``: the last reading's boot identity and ``time``; ``total_ms``:
    powered milliseconds added up since the ledger started. Stored by the station after
    every reading it acts on.
    """

    boot: tuple[int, int]
    boot_time_ms: int
    total_ms: int

    @classmethod
    def start(cls, reading: TpmClockReading) -> TpmLedger:
        return cls(reading.boot, reading.time_ms, 0)

    def advance(self, reading: TpmClockReading) -> TpmLedger:
        """The ledger after ``reading``. Raises ``PolicyError`` (``tpm_clock_inconsistent``)
        when the reading cannot follow the last one: the boot counters went down (another
        TPM, or a cleared one) or ``time`` went back within one boot."""
        delta = powered_ms(self.boot, self.boot_time_ms, reading.boot, reading.time_ms)
        if delta is None:
            raise PolicyError(
                f"the TPM's reading {reading.boot}/{reading.time_ms} ms cannot follow "
                f"{self.boot}/{self.boot_time_ms} ms (boot counters or time went back): "
                "another TPM, or a cleared one",
                reason="tpm_clock_inconsistent",
            )
        return TpmLedger(reading.boot, reading.time_ms, self.total_ms + delta)

    def to_map(self) -> dict[str, int]:
        return {
            "reset": self.boot[0],
            "restart": self.boot[1],
            "boot_time_ms": self.boot_time_ms,
            "total_ms": self.total_ms,
        }

    @classmethod
    def from_map(cls, m: object) -> TpmLedger:
        if not isinstance(m, dict) or set(m) != {"reset", "restart", "boot_time_ms", "total_ms"}:
            raise InvalidValueError("a TPM ledger needs reset, restart, boot_time_ms, total_ms")
        if not all(type(v) is int and v >= 0 for v in m.values()):
            raise InvalidValueError("TPM ledger values are integers >= 0")
        return cls((m["reset"], m["restart"]), m["boot_time_ms"], m["total_ms"])


@dataclass(frozen=True, slots=True)
class TimeAnchor:
    """``time`` (unix seconds) was trustworthy when the ledger stood at ``total_ms``.
    ``source`` says who vouched (``entitlement 3``, ``time statement 1765000000``)."""

    time: int
    total_ms: int
    source: str

    def to_map(self) -> dict[str, int | str]:
        return {"time": self.time, "total_ms": self.total_ms, "source": self.source}

    @classmethod
    def from_map(cls, m: object) -> TimeAnchor:
        if not isinstance(m, dict) or set(m) != {"time", "total_ms", "source"}:
            raise InvalidValueError("a time anchor needs time, total_ms, source")
        if type(m["time"]) is not int or type(m["total_ms"]) is not int:
            raise InvalidValueError("time anchor values are integers")
        if type(m["source"]) is not str:
            raise InvalidValueError("time anchor source is a string")
        return cls(m["time"], m["total_ms"], m["source"])


def trusted_time(anchor: TimeAnchor, ledger: TpmLedger) -> int:
    """The latest time the station can vouch for now (unix seconds)."""
    return anchor.time + max(0, ledger.total_ms - anchor.total_ms) // 1000


def anchor_at(
    *,
    signed_time: int,
    host_now: int,
    ledger: TpmLedger,
    source: str,
    current: TimeAnchor | None = None,
    max_age_s: int = MAX_SIGNED_TIME_AGE_S,
) -> TimeAnchor:
    """A new anchor from a time HQ signed (``signed_time``), imported at host time
    ``host_now``. The real time is at least ``signed_time`` (HQ signed it before the
    station saw it) and the host may have waited up to ``max_age_s`` for the file, so the
    host clock is believed within ``[signed_time, signed_time + max_age_s]``. An anchor never
    moves trusted time backward: the current trusted time, if later, is kept."""
    when = min(max(host_now, signed_time), signed_time + max_age_s)
    if current is not None:
        when = max(when, trusted_time(current, ledger))
    return TimeAnchor(when, ledger.total_ms, source)


_NO_ANCHOR: Final = 1 << 62


@dataclass(slots=True)
class TimeAudit:
    """HQ's replay of the station's time rule over the TPM readings in its audit records.

    Fed in log order (state carried across exports by the caller, :meth:`to_map`), it adds
    up TPM-powered time exactly as :class:`TpmLedger` does (:func:`powered_ms`) and, once
    an anchor was seen, reports a record dated more than ``tolerance_s`` after ``anchor +
    powered time since``. :meth:`observe` returns ``None`` or a ``(kind, detail)`` finding:
    ``tpm_clock_inconsistent`` (boot counters or time went back: another TPM, a cleared
    one, a rewritten reading), ``clock_ahead_of_tpm`` (the host clock ran ahead of what the
    TPM vouches for) or ``malformed_record``. After an inconsistency the replay has no
    anchor until the next one, so one defect is one finding.

    Speed: one call per record of a million-record export; the common case (same boot,
    time forward, not ahead) is one ``struct`` unpack, three comparisons and an addition.
    """

    tolerance_s: int
    reset: int | None = None
    restart: int | None = None
    boot_time_ms: int = 0
    total_ms: int = 0
    anchor_time: int | None = None
    anchor_total_ms: int = 0
    #: ``when * 1000 > total_ms + _k`` is "ahead": ``when > anchor + (total - anchor
    #: total) // 1000 + tolerance`` without a division per record.
    _k: int = field(init=False, default=_NO_ANCHOR)

    def __post_init__(self) -> None:
        self._set_k()

    def _set_k(self) -> None:
        self._k = (
            _NO_ANCHOR
            if self.anchor_time is None
            else 1000 * (self.anchor_time + self.tolerance_s) - self.anchor_total_ms
        )

    @property
    def boot(self) -> tuple[int, int] | None:
        return None if self.reset is None or self.restart is None else (self.reset, self.restart)

    def observe(self, when: int, tpm_field: object) -> tuple[str, str] | None:
        """One record dated ``when`` with the ``tpm`` audit field ``tpm_field``."""
        try:
            reset, restart, tpm_time = _TPM_FIELD.unpack(tpm_field)  # type: ignore[arg-type]
        except (TypeError, struct.error):
            return ("malformed_record", "the tpm field is not 16 bytes")
        if reset == self.reset and restart == self.restart and tpm_time >= self.boot_time_ms:
            self.total_ms += tpm_time - self.boot_time_ms
            self.boot_time_ms = tpm_time
        else:
            last = self.boot
            self.reset, self.restart = reset, restart
            if last is not None:
                delta = powered_ms(last, self.boot_time_ms, (reset, restart), tpm_time)
                if delta is None:
                    finding = (
                        f"TPM reading {(reset, restart)}/{tpm_time} ms cannot follow "
                        f"{last}/{self.boot_time_ms} ms (boot counters or time went back)"
                    )
                    self.boot_time_ms = tpm_time
                    self.anchor_time = None
                    self._set_k()
                    return ("tpm_clock_inconsistent", finding)
                self.total_ms += delta
            self.boot_time_ms = tpm_time
        if when * 1000 <= self.total_ms + self._k:
            return None
        assert self.anchor_time is not None  # _k is _NO_ANCHOR otherwise
        trusted = self.anchor_time + (self.total_ms - self.anchor_total_ms) // 1000
        return (
            "clock_ahead_of_tpm",
            f"time {when} is {when - trusted} s ahead of what the TPM vouches for "
            f"({trusted}, anchored at {self.anchor_time})",
        )

    def observe_batch(
        self, whens: Sequence[int], tpm_fields: Sequence[object]
    ) -> list[tuple[int, str, str]]:
        """:meth:`observe` of each reading ``tpm_fields[i]`` dated ``whens[i]``, in log
        order, a reading of ``None`` skipped (a record without one): the findings as
        ``(i, kind, detail)``. Findings and state are exactly one ``observe`` per reading's:
        when every reading is a 16-byte field they go to :meth:`observe_joined`; otherwise
        each reading goes through :meth:`observe` itself."""
        if len(whens) != len(tpm_fields):
            raise InvalidValueError("one reading per time")
        try:
            joined = b"".join(tpm_fields)  # type: ignore[arg-type]
        except TypeError:  # a None or a non-bytes reading: one call each
            joined = b""
        # Each reading exactly 16 bytes, not only their total: a 15- and a 17-byte reading
        # would otherwise be unpacked as two well-formed ones (fail open).
        if (
            not tpm_fields
            or len(joined) != _TPM_FIELD.size * len(tpm_fields)
            or set(map(len, tpm_fields)) != {_TPM_FIELD.size}  # type: ignore[arg-type]
        ):
            findings: list[tuple[int, str, str]] = []
            for index, tpm_field in enumerate(tpm_fields):
                if tpm_field is not None:
                    found = self.observe(whens[index], tpm_field)
                    if found is not None:
                        findings.append((index, found[0], found[1]))
            return findings
        return self.observe_joined(whens, joined)

    def observe_joined(self, whens: Sequence[int], joined: bytes) -> list[tuple[int, str, str]]:
        """:meth:`observe_batch` of readings that are each a 16-byte field, given
        concatenated (``joined[16 * i : 16 * i + 16]`` is dated ``whens[i]``; HQ's decoder
        joins them only after checking each one's length). All are unpacked in one C
        call and the common case (same boot, time forward, not ahead) runs inline; any
        other reading goes through :meth:`observe` itself."""
        size = _TPM_FIELD.size
        if len(joined) != size * len(whens):
            raise InvalidValueError("one 16-byte reading per time")
        findings: list[tuple[int, str, str]] = []
        # Within one boot, total_ms grows by exactly the TPM time's growth, so "not
        # ahead" (when * 1000 <= total_ms + _k) is when * 1000 <= base + reading.
        reset, restart, last = self.reset, self.restart, self.boot_time_ms
        base = self.total_ms - last + self._k
        readings = _TPM_FIELD.iter_unpack(joined)
        for index, (when, (r, s, tpm_time)) in enumerate(zip(whens, readings, strict=True)):
            if tpm_time >= last and r == reset and s == restart and when * 1000 <= base + tpm_time:
                last = tpm_time
                continue
            self.total_ms += last - self.boot_time_ms
            self.boot_time_ms = last
            found = self.observe(when, joined[size * index : size * index + size])
            if found is not None:
                findings.append((index, found[0], found[1]))
            reset, restart, last = self.reset, self.restart, self.boot_time_ms
            base = self.total_ms - last + self._k
        self.total_ms += last - self.boot_time_ms
        self.boot_time_ms = last
        return findings

    def anchor(self, anchor_time: int) -> None:
        """An anchor record (after :meth:`observe` of its own reading)."""
        self.anchor_time = anchor_time
        self.anchor_total_ms = self.total_ms
        self._set_k()

    def to_map(self) -> dict[str, int | None]:
        return {
            "reset": self.reset,
            "restart": self.restart,
            "boot_time_ms": self.boot_time_ms,
            "total_ms": self.total_ms,
            "anchor_time": self.anchor_time,
            "anchor_total_ms": self.anchor_total_ms,
        }

    @classmethod
    def from_map(cls, m: object, tolerance_s: int) -> TimeAudit:
        keys = {"reset", "restart", "boot_time_ms", "total_ms", "anchor_time", "anchor_total_ms"}
        if not isinstance(m, dict) or set(m) != keys:
            raise InvalidValueError(f"a time audit state needs {sorted(keys)}")
        if not all(v is None or type(v) is int for v in m.values()):
            raise InvalidValueError("time audit state values are integers or null")
        if (m["reset"] is None) != (m["restart"] is None):
            raise InvalidValueError("time audit state: reset and restart go together")
        return cls(
            tolerance_s,
            m["reset"],
            m["restart"],
            m["boot_time_ms"] or 0,
            m["total_ms"] or 0,
            m["anchor_time"],
            m["anchor_total_ms"] or 0,
        )


def expected_anchor(audit: TimeAudit, *, signed_time: int, host_now: int) -> int:
    """The anchor a station following :func:`anchor_at` must have taken, given what HQ
    replayed so far (call after :meth:`TimeAudit.observe` of the anchor record's reading)."""
    ledger = TpmLedger(audit.boot or (0, 0), audit.boot_time_ms, audit.total_ms)
    current = (
        None
        if audit.anchor_time is None
        else TimeAnchor(audit.anchor_time, audit.anchor_total_ms, "replayed")
    )
    return anchor_at(
        signed_time=signed_time,
        host_now=host_now,
        ledger=ledger,
        source="replayed",
        current=current,
    ).time
