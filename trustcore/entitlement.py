"""The entitlement policy: what HQ allows one factory station to do with its keys.

An entitlement is built at HQ, travels to the station as a sealed package (signed by the
HQ entitlement signer, encrypted to the station) and is enforced by the station on every
issuance (:mod:`trustcore.issuance`) and re-checked by HQ against the station's audit log
(:mod:`trustcore.reconcile`). This module holds only the value objects and their strict
conversion to and from the plain maps that go into deterministic CBOR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trustcore.errors import EncodingError, InvalidValueError, PolicyError

_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # entitlement id, product
_DEVICE_ID_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_OPERATION = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: Operations an entitlement may put behind a quorum of approvers.
QUORUM_OPERATIONS = frozenset({"exceed_daily_limit", "reissue_device_certificate"})


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidValueError(message)


@dataclass(frozen=True)
class DeviceIdRule:
    """Device ids the station may issue: ``prefix`` followed by a zero-padded decimal
    number of exactly ``digits`` digits in ``[first, last]``. A fixed width keeps one
    number from having two spellings (``007`` and ``7``), which would defeat the
    duplicate check."""

    prefix: str
    first: int
    last: int
    digits: int

    def __post_init__(self) -> None:
        _require(
            bool(_DEVICE_ID_CHARS.fullmatch(self.prefix + "0")), f"bad id prefix {self.prefix!r}"
        )
        _require(1 <= self.digits <= 18, "digits must be 1..18")
        _require(0 <= self.first <= self.last < 10**self.digits, "empty or too wide id range")

    def contains(self, device_id: str) -> bool:
        if not device_id.startswith(self.prefix):
            return False
        rest = device_id[len(self.prefix) :]
        if len(rest) != self.digits or not rest.isascii() or not rest.isdigit():
            return False
        return self.first <= int(rest) <= self.last

    def device_id(self, number: int) -> str:
        """The id of the ``number``-th device; raises if outside the range."""
        if not self.first <= number <= self.last:
            raise PolicyError(f"device number {number} outside the range", reason="id_out_of_range")
        return f"{self.prefix}{number:0{self.digits}d}"


@dataclass(frozen=True)
class QuorumRule:
    """``m`` distinct approvals out of ``approvers`` (approver key ids) authorise
    ``operation`` at the station."""

    operation: str
    m: int
    approvers: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _require(
            self.operation in QUORUM_OPERATIONS, f"unknown quorum operation {self.operation!r}"
        )
        _require(len(set(self.approvers)) == len(self.approvers), "duplicate approver")
        _require(all(len(a) == 32 for a in self.approvers), "approver key ids are 32 bytes")
        _require(1 <= self.m <= len(self.approvers), "quorum needs 1 <= m <= len(approvers)")


@dataclass(frozen=True)
class SecretRule:
    """Which devices of the entitlement get product secret ``name`` (the entitlement's
    ``product_secrets`` carry the value), and until when: devices of a product in
    ``products`` whose number under the entitlement's id rule is in ``[first, last]``,
    provisioned before ``not_after`` (unix seconds). The station enforces it before it
    builds a device's import blob; HQ re-checks every ``secret_provisioned`` record."""

    name: str
    products: tuple[str, ...]
    first: int
    last: int
    not_after: int

    def __post_init__(self) -> None:
        _require(bool(_ID_CHARS.fullmatch(self.name)), f"bad secret name {self.name!r}")
        _require(bool(self.products), f"secret {self.name!r} names no product")
        _require(
            all(_ID_CHARS.fullmatch(p) for p in self.products), f"bad product in {self.name!r}"
        )
        _require(len(set(self.products)) == len(self.products), "duplicate product")
        _require(0 <= self.first <= self.last, f"empty device range for secret {self.name!r}")

    def covers(self, id_rule: DeviceIdRule, device_id: str) -> bool:
        """True when ``device_id`` is one of this rule's device numbers."""
        return id_rule.contains(device_id) and (
            self.first <= int(device_id[len(id_rule.prefix) :]) <= self.last
        )

    def to_map(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "products": list(self.products),
            "first": self.first,
            "last": self.last,
            "not_after": self.not_after,
        }

    @classmethod
    def from_map(cls, m: Any) -> SecretRule:
        _exact_keys(m, {"name", "products", "first", "last", "not_after"}, "secret rule")
        return cls(
            _typed(m["name"], str, "secret name"),
            tuple(_typed(p, str, "product") for p in _typed(m["products"], list, "products")),
            _typed(m["first"], int, "first"),
            _typed(m["last"], int, "last"),
            _typed(m["not_after"], int, "not_after"),
        )


@dataclass(frozen=True)
class EntitlementPolicy:
    """The rules one station enforces. Times are unix seconds (UTC); the daily limit
    counts calendar days in ``day_timezone`` (an IANA name, e.g. ``Asia/Shanghai``)."""

    entitlement_id: str
    station_id: str
    sequence: int
    product: str
    total_quota: int
    daily_limit: int
    day_timezone: str
    not_before: int
    not_after: int
    id_rule: DeviceIdRule
    quorum: tuple[QuorumRule, ...] = ()
    clock_skew_s: int = 300
    #: One rule per product secret the entitlement carries (names match
    #: ``EntitlementPayload.product_secrets`` exactly; checked at HQ and at import).
    secrets: tuple[SecretRule, ...] = ()
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(bool(_ID_CHARS.fullmatch(self.entitlement_id)), "bad entitlement id")
        _require(bool(_DEVICE_ID_CHARS.fullmatch(self.station_id)), "bad station id")
        _require(bool(_ID_CHARS.fullmatch(self.product)), "bad product")
        _require(self.sequence >= 1, "sequence starts at 1")
        _require(self.total_quota >= 0 and self.daily_limit >= 0, "negative quota")
        _require(self.daily_limit <= self.total_quota, "daily limit above total quota")
        _require(self.not_before < self.not_after, "empty key-use window")
        _require(0 <= self.clock_skew_s <= 3600, "clock skew tolerance must be 0..3600 s")
        ops = [q.operation for q in self.quorum]
        _require(len(set(ops)) == len(ops), "one quorum rule per operation")
        names = [r.name for r in self.secrets]
        _require(len(set(names)) == len(names), "one rule per product secret")
        for r in self.secrets:
            _require(
                self.id_rule.first <= r.first and r.last <= self.id_rule.last,
                f"secret {r.name!r}: devices outside the entitlement's id range",
            )
            _require(
                self.not_before < r.not_after <= self.not_after,
                f"secret {r.name!r}: provisioning must end inside the key-use window",
            )
        try:
            zone = ZoneInfo(self.day_timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InvalidValueError(f"unknown time zone {self.day_timezone!r}") from exc
        object.__setattr__(self, "_zone", zone)

    def quorum_rule(self, operation: str) -> QuorumRule | None:
        return next((q for q in self.quorum if q.operation == operation), None)

    def secret_rule(self, name: str) -> SecretRule | None:
        return next((r for r in self.secrets if r.name == name), None)

    def day_of(self, when: int) -> str:
        """The calendar day (``YYYY-MM-DD`` in ``day_timezone``) that ``when`` falls in."""
        return datetime.fromtimestamp(when, self._zone).date().isoformat()

    def day_bounds(self, when: int) -> tuple[int, int, str]:
        """``[start, end)`` in unix seconds of the local day containing ``when``, and its name.
        DST-safe: computed from local midnights, not by adding 86,400."""
        local = datetime.fromtimestamp(when, self._zone)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=1, hours=2)).replace(hour=0)
        return int(start.timestamp()), int(nxt.timestamp()), start.date().isoformat()

    def to_map(self) -> dict[str, Any]:
        m = self._base_map()
        if self.secrets:  # absent when empty: a policy without secrets keeps its bytes
            m["secrets"] = [r.to_map() for r in self.secrets]
        return m

    def _base_map(self) -> dict[str, Any]:
        return {
            "entitlement_id": self.entitlement_id,
            "station_id": self.station_id,
            "sequence": self.sequence,
            "product": self.product,
            "total_quota": self.total_quota,
            "daily_limit": self.daily_limit,
            "day_timezone": self.day_timezone,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "id_rule": {
                "prefix": self.id_rule.prefix,
                "first": self.id_rule.first,
                "last": self.id_rule.last,
                "digits": self.id_rule.digits,
            },
            "quorum": [
                {"operation": q.operation, "m": q.m, "approvers": list(q.approvers)}
                for q in self.quorum
            ],
            "clock_skew_s": self.clock_skew_s,
        }

    @classmethod
    def from_map(cls, m: Any) -> EntitlementPolicy:
        """Strict: unknown or missing keys and wrong types are errors, never defaults."""
        try:
            optional = {"secrets"} & set(m) if isinstance(m, dict) else set()
            _exact_keys(m, cls._KEYS | optional, "entitlement policy")
            if optional and m["secrets"] == []:
                # One encoding per policy: no secrets means no key, never an empty list.
                raise EncodingError("entitlement policy: secrets is present but empty")
            rule = m["id_rule"]
            _exact_keys(rule, {"prefix", "first", "last", "digits"}, "id_rule")
            quorum = []
            for q in _typed(m["quorum"], list, "quorum"):
                _exact_keys(q, {"operation", "m", "approvers"}, "quorum rule")
                approvers = tuple(
                    _typed(a, bytes, "approver") for a in _typed(q["approvers"], list, "approvers")
                )
                quorum.append(
                    QuorumRule(
                        _typed(q["operation"], str, "operation"),
                        _typed(q["m"], int, "m"),
                        approvers,
                    )
                )
            return cls(
                entitlement_id=_typed(m["entitlement_id"], str, "entitlement_id"),
                station_id=_typed(m["station_id"], str, "station_id"),
                sequence=_typed(m["sequence"], int, "sequence"),
                product=_typed(m["product"], str, "product"),
                total_quota=_typed(m["total_quota"], int, "total_quota"),
                daily_limit=_typed(m["daily_limit"], int, "daily_limit"),
                day_timezone=_typed(m["day_timezone"], str, "day_timezone"),
                not_before=_typed(m["not_before"], int, "not_before"),
                not_after=_typed(m["not_after"], int, "not_after"),
                id_rule=DeviceIdRule(
                    _typed(rule["prefix"], str, "prefix"),
                    _typed(rule["first"], int, "first"),
                    _typed(rule["last"], int, "last"),
                    _typed(rule["digits"], int, "digits"),
                ),
                quorum=tuple(quorum),
                clock_skew_s=_typed(m["clock_skew_s"], int, "clock_skew_s"),
                secrets=tuple(
                    SecretRule.from_map(r) for r in _typed(m.get("secrets", []), list, "secrets")
                ),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"invalid entitlement policy: {exc.args[0]}") from exc

    _KEYS = frozenset(
        {
            "entitlement_id", "station_id", "sequence", "product", "total_quota",
            "daily_limit", "day_timezone", "not_before", "not_after", "id_rule",
            "quorum", "clock_skew_s",
        }
    )  # fmt: skip


def _exact_keys(m: Any, keys: frozenset[str] | set[str], what: str) -> None:
    if not isinstance(m, dict):
        raise EncodingError(f"{what} must be a map")
    missing, unknown = keys - m.keys(), m.keys() - keys
    if missing or unknown:
        raise EncodingError(
            f"{what}: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}"
        )


def _typed(v: Any, t: type, what: str) -> Any:
    # bool is an int subclass; a policy number must never be True/False.
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise EncodingError(f"{what} must be {t.__name__}")
    return v
