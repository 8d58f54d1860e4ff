"""HQ's second opinion: did a station's issuances respect its entitlement?

The station enforces the policy before each issuance; HQ re-checks the same rules over
the audit log it receives, because a compromised or misconfigured station might not have.
``Reconciler`` is streaming (O(1) work and memory per audit entry and per distinct
device/key) so a million-entry export is checked in one pass, interleaved with chain
verification. HQ feeds runs of ``issued`` records, by column as its decoder delivers them,
to :meth:`Reconciler.add_issued_run`; ``add_issued_batch`` is the same checks record by
record (and ``add_issued`` a batch of one).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter, le
from typing import Any

from trustcore.device_secrets import check_secret_use
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import PolicyError

#: One ``issued`` record as the reconciler reads it: (seq, time, device id, key id, product).
IssuedRecord = tuple[int, int, str, bytes, str]

VIOLATION_KINDS = (
    "over_quota",
    "over_daily_limit",
    "outside_window",
    "id_out_of_range",
    "wrong_product",
    "duplicate_device",
    "duplicate_key",
    "secret_outside_policy",
)


@dataclass(frozen=True)
class Violation:
    kind: str
    seq: int
    device_id: str
    detail: str

    def to_map(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "device_id": self.device_id,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ReconciliationReport:
    station_id: str
    entitlement_id: str
    issued: int
    quota: int
    per_day: dict[str, int]
    daily_limit: int
    violations: tuple[Violation, ...]
    burned: int = 0  # counter slots consumed without a certificate (count toward the quota)
    #: ``secret_provisioned`` records per product secret name (this export).
    secret_uses: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.violations

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(VIOLATION_KINDS, 0)
        for v in self.violations:
            out[v.kind] += 1
        return out

    def to_map(self, max_violations: int = 1000) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "entitlement_id": self.entitlement_id,
            "issued": self.issued,
            "burned": self.burned,
            "quota": self.quota,
            "daily_limit": self.daily_limit,
            "per_day": dict(sorted(self.per_day.items())),
            "secret_uses": dict(sorted(self.secret_uses.items())),
            "clean": self.clean,
            "violation_counts": self.counts(),
            "violations": [v.to_map() for v in self.violations[:max_violations]],
        }


@dataclass
class Reconciler:
    """Feed it every ``issued`` audit entry of one entitlement, in log order.

    ``prior_*`` carry state from earlier exports of the same entitlement so that the
    quota, daily limit and duplicate checks span exports. ``burned`` counts counter slots the
    station consumed without releasing a certificate (a crash between counter increment and
    release): they count toward the total quota, exactly as they do at the station, so a
    station cannot turn crashes into extra certificates unnoticed.
    """

    policy: EntitlementPolicy
    issued: int = 0
    burned: int = 0
    per_day: dict[str, int] = field(default_factory=dict)
    device_ids: set[str] = field(default_factory=set)
    key_ids: set[bytes] = field(default_factory=set)
    violations: list[Violation] = field(default_factory=list)
    #: Extra issuances a verified quorum allowed on a day (``exceed_daily_limit``).
    day_allowance: dict[str, int] = field(default_factory=dict)
    #: Unused verified ``reissue_device_certificate`` grants: device id -> request ids,
    #: oldest first. Each lets exactly one more certificate for that device id through.
    reissue_grants: dict[str, list[bytes]] = field(default_factory=dict)
    #: Grants consumed here: (request id, audit seq of the re-issue it allowed).
    reissues_used: list[tuple[bytes, int]] = field(default_factory=list)
    #: Product secrets handed to devices (``secret_provisioned``), per secret name.
    secret_uses: dict[str, int] = field(default_factory=dict)
    _day_start: int = 1
    _day_end: int = 0
    _day: str = ""

    def add_issued(self, seq: int, when: int, device_id: str, key_id: bytes, product: str) -> None:
        """One ``issued`` record: :meth:`add_issued_batch` with a batch of one."""
        self.add_issued_batch(((seq, when, device_id, key_id, product),))

    def add_issued_batch(self, batch: Iterable[IssuedRecord]) -> None:
        """Consecutive ``issued`` records of this entitlement, in log order, as
        ``(seq, time, device_id, key_id, product)``: the one implementation of the issuance
        checks, and HQ's hot loop (a million records per export).

        Speed: the state is bound to locals for the whole batch and a clean record passes one
        combined test; only a record that fails it goes through :meth:`_check_issued`, which
        names each violation. The caller must not interleave other calls on this reconciler
        with a batch (``add_burned``, ``allow_extra``, ``add_secret`` change what the next
        issuance may do): it ends the batch before any other record of the log."""
        p = self.policy
        per_day = self.per_day
        per_day_get = per_day.get
        allowance_get = self.day_allowance.get
        ids, keys = self.device_ids, self.key_ids
        ids_add, keys_add = ids.add, keys.add
        # The id range as string bounds (what DeviceIdRule.contains computes, without a
        # call and an int() per record): an id of the rule's exact length, ASCII, between
        # the first and last id, its part after the prefix all digits, is the prefix then
        # a number in [first, last] (equal-width digit strings order as their numbers; a
        # string between two that share the prefix has it too). A false "no" only costs
        # the exact check in _check_issued, which flags with contains() itself.
        rule = p.id_rule
        id_len, digits_at = len(rule.prefix) + rule.digits, len(rule.prefix)
        id_lo = f"{rule.prefix}{rule.first:0{rule.digits}d}"
        id_hi = f"{rule.prefix}{rule.last:0{rule.digits}d}"
        quota = p.total_quota - self.burned  # a batch holds no burned slot
        daily_limit, product_ok = p.daily_limit, p.product
        not_before, not_after = p.not_before, p.not_after
        day_start, day_end, day = self._day_start, self._day_end, self._day
        issued = self.issued
        for seq, when, device_id, key_id, product in batch:
            issued += 1
            if not day_start <= when < day_end:
                day_start, day_end, day = p.day_bounds(when)
            n = per_day_get(day, 0) + 1
            per_day[day] = n
            if (
                issued <= quota
                and (n <= daily_limit or n <= daily_limit + allowance_get(day, 0))
                and not_before <= when < not_after
                and product == product_ok
                and device_id not in ids
                and key_id not in keys
                and len(device_id) == id_len
                and id_lo <= device_id <= id_hi
                and device_id.isascii()
                and device_id[digits_at:].isdigit()
            ):
                ids_add(device_id)
                keys_add(key_id)
            else:
                self.issued = issued
                self._day_start, self._day_end, self._day = day_start, day_end, day
                self._check_issued(seq, when, device_id, key_id, product, n)
        self.issued = issued
        self._day_start, self._day_end, self._day = day_start, day_end, day

    def add_issued_run(
        self,
        first_seq: int,
        whens: Sequence[int],
        device_ids: Sequence[str],
        key_ids: Sequence[bytes],
        product: str | Sequence[str],
    ) -> None:
        """A run of ``issued`` records of this entitlement, in log order, by column: record
        ``i`` has ``seq`` ``first_seq + i``, time ``whens[i]``, ``device_ids[i]``,
        ``key_ids[i]`` and ``product`` (one string: every record's; else ``product[i]``),
        every value of exactly its type (as HQ's decoder delivers them). Exactly
        :meth:`add_issued_batch` of those records: the same findings, the same state after.

        Speed: nearly every run breaks no rule. :meth:`_add_clean_run` proves that with
        whole-run tests that run in C (min/max, sets, one bisect per day) instead of a
        Python loop per record, and updates the state as the loop would; a run it cannot
        prove clean goes to :meth:`add_issued_batch`, from the unchanged state, which names
        every violation record by record."""
        n = len(whens)
        if not n:
            return
        if len(device_ids) != n or len(key_ids) != n:
            raise ValueError("one device id and key id per record")
        if not self._add_clean_run(whens, device_ids, key_ids, product):
            self.add_issued_batch(
                zip(
                    range(first_seq, first_seq + n),
                    whens,
                    device_ids,
                    key_ids,
                    repeat(product, n) if type(product) is str else product,
                    strict=True,
                )
            )

    def _add_clean_run(
        self,
        whens: Sequence[int],
        ids: Sequence[str],
        keys: Sequence[bytes],
        product: str | Sequence[str],
    ) -> bool:
        """If no record of the run would fail a check of :meth:`add_issued_batch`, apply
        the run's effect (counts, per-day counts, ids, keys, the cached day) and return
        True; otherwise change nothing and return False. Each test is the per-record
        condition over the whole run:

        - quota: the count only grows, so the last record's is the highest;
        - window and days: the times must be in order (else False: the loop decides),
          so the first and last bound them and each day's records are one slice
          (``bisect``); a day's count only grows, so its last record's is the highest;
        - product: the run's one product (or set of products) is the policy's alone;
        - id range: every id of the rule's length, the least and greatest between the
          first and last id (so all are, and all start with the prefix: a string between
          two that share a prefix has it), ASCII, digits after the prefix;
        - duplicates: the run's ids (keys) are distinct and none was seen before.
        """
        p = self.policy
        n = len(whens)
        issued = self.issued + n
        first, last = whens[0], whens[-1]
        if (
            issued > p.total_quota - self.burned
            or not p.not_before <= first
            or not last < p.not_after
            or not all(map(le, whens, whens[1:]))
            or (product != p.product if type(product) is str else set(product) != {p.product})
        ):
            return False
        rule = p.id_rule
        digits_at = len(rule.prefix)
        if (
            set(map(len, ids)) != {digits_at + rule.digits}
            or min(ids) < f"{rule.prefix}{rule.first:0{rule.digits}d}"
            or max(ids) > f"{rule.prefix}{rule.last:0{rule.digits}d}"
            or not "".join(ids).isascii()
            or not "".join(map(itemgetter(slice(digits_at, None)), ids)).isdigit()
        ):
            return False
        new_ids = set(ids)
        if len(new_ids) != n or not self.device_ids.isdisjoint(new_ids):
            return False
        new_keys = set(keys)
        if len(new_keys) != n or not self.key_ids.isdisjoint(new_keys):
            return False
        per_day, allowance = self.per_day, self.day_allowance
        day_start, day_end, day = self._day_start, self._day_end, self._day
        counts: list[tuple[str, int]] = []
        at = 0
        while at < n:
            when = whens[at]
            if not day_start <= when < day_end:
                day_start, day_end, day = p.day_bounds(when)
            end = bisect_left(whens, day_end, at)  # the first record of a later day
            count = per_day.get(day, 0) + end - at
            if count > p.daily_limit and count > p.daily_limit + allowance.get(day, 0):
                return False
            counts.append((day, count))
            at = end
        per_day.update(counts)
        self.device_ids.update(new_ids)
        self.key_ids.update(new_keys)
        self.issued = issued
        self._day_start, self._day_end, self._day = day_start, day_end, day
        return True

    def allow_extra(self, day: str, extra: int) -> None:
        """A quorum approved ``extra`` issuances beyond the daily limit on ``day`` (the
        caller verified the approvals); the total quota is never lifted."""
        self.day_allowance[day] = self.day_allowance.get(day, 0) + extra

    def allow_reissue(self, device_id: str, request_id: bytes) -> None:
        """A quorum approved one more certificate for ``device_id`` (the caller verified
        the approvals and that the request id is new). It only excuses the duplicate device
        id: quota, daily limit and a reused key are still violations."""
        self.reissue_grants.setdefault(device_id, []).append(request_id)

    def take_reissue(self, seq: int, device_id: str) -> bool:
        """Consume the oldest unused re-issue grant for ``device_id`` for the issuance at
        ``seq``; False if there is none (then the duplicate is a violation)."""
        grants = self.reissue_grants.get(device_id)
        if not grants:
            return False
        self.reissues_used.append((grants.pop(0), seq))
        if not grants:
            del self.reissue_grants[device_id]
        return True

    def _check_issued(
        self, seq: int, when: int, device_id: str, key_id: bytes, product: str, n: int
    ) -> None:
        p = self.policy
        used = self.issued + self.burned
        if used > p.total_quota:
            self._flag("over_quota", seq, device_id, f"slot {used} of quota {p.total_quota}")
        limit = p.daily_limit + self.day_allowance.get(self._day, 0)
        if n > limit:
            self._flag("over_daily_limit", seq, device_id, f"{n} on {self._day} > {limit}")
        if not p.not_before <= when < p.not_after:
            self._flag("outside_window", seq, device_id, f"time {when} outside the key-use window")
        if not p.id_rule.contains(device_id):
            self._flag("id_out_of_range", seq, device_id, "device id outside the entitled range")
        if product != p.product:
            self._flag("wrong_product", seq, device_id, f"product {product!r}")
        if device_id in self.device_ids:
            if not self.take_reissue(seq, device_id):
                self._flag("duplicate_device", seq, device_id, "device id issued twice")
        else:
            self.device_ids.add(device_id)
        if key_id in self.key_ids:
            self._flag("duplicate_key", seq, device_id, f"key {key_id.hex()[:16]}… issued twice")
        else:
            self.key_ids.add(key_id)

    def add_burned(self, seq: int, device_id: str) -> None:
        """A burned counter slot: no certificate, but one unit of the total quota used."""
        self.burned += 1
        used = self.issued + self.burned
        if used > self.policy.total_quota:
            self._flag(
                "over_quota",
                seq,
                device_id,
                f"burned slot {used} of quota {self.policy.total_quota}",
            )

    def add_secret(self, seq: int, when: int, device_id: str, secret: str, product: str) -> None:
        """A ``secret_provisioned`` record: counted, and flagged ``secret_outside_policy``
        when the entitlement's rule for that secret does not give it to that device at that
        time (``trustcore.device_secrets``, the station's own check), or when the device
        holds no certificate under this entitlement (secrets go only to devices the station
        issued, after the issuance record)."""
        self.secret_uses[secret] = self.secret_uses.get(secret, 0) + 1
        try:
            check_secret_use(self.policy, secret, device_id, product, when)
        except PolicyError as exc:
            self._flag("secret_outside_policy", seq, device_id, f"{secret}: {exc}")
            return
        if device_id not in self.device_ids:
            self._flag(
                "secret_outside_policy",
                seq,
                device_id,
                f"{secret}: the device has no certificate under this entitlement",
            )

    def _flag(self, kind: str, seq: int, device_id: str, detail: str) -> None:
        self.violations.append(Violation(kind, seq, device_id, detail))

    def report(self) -> ReconciliationReport:
        return ReconciliationReport(
            station_id=self.policy.station_id,
            entitlement_id=self.policy.entitlement_id,
            issued=self.issued,
            quota=self.policy.total_quota,
            per_day=dict(self.per_day),
            daily_limit=self.policy.daily_limit,
            violations=tuple(self.violations),
            burned=self.burned,
            secret_uses=dict(self.secret_uses),
        )
