"""Step 6 of ``hq ingest-audit`` (:mod:`hq.audit_ingest`): what the records of an authentic
export show. Owns the reconciliation loop (one pass, O(1) per record: every record to the
``trustcore.reconcile.Reconciler`` of its entitlement, state carried over from earlier
exports), HQ's own findings beyond the reconciler's (counters, imports, clock rollback,
future dating, TPM time replay, time anchors, quorum grants re-verified) and
:data:`HQ_VIOLATION_KINDS`. Reads the store, never writes it: nothing is stored until
:func:`hq.audit_ingest.record_ingest`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import le, lt
from typing import NamedTuple

from hq.audit_chunks import IssuedColumns, IssuedRow
from hq.store import AuditHead, EntitlementRow, HqStore, ReconState
from trustcore.audit import AuditRecord
from trustcore.errors import EncodingError
from trustcore.quorum import ParamValue, QuorumError, parse_evidence, verify_quorum_rule
from trustcore.reconcile import IssuedRecord, Reconciler, Violation
from trustcore.stationtime import TimeAudit, expected_anchor

__all__ = [
    "CLOCK_ROLLBACK_TOLERANCE_S",
    "HQ_VIOLATION_KINDS",
    "STATION_TIME_TOLERANCE_S",
    "EntitlementTally",
    "IssuedEntry",
    "Reconciliation",
    "future_dated",
    "reconcile_records",
]

#: Violations HQ finds beyond the per-entitlement ones of ``trustcore.reconcile``.
HQ_VIOLATION_KINDS = (
    "unknown_entitlement",
    "entitlement_not_imported",
    "entitlement_mismatch",
    "malformed_record",
    "clock_rollback",
    "counter_reuse",
    "duplicate_device",
    "duplicate_key",
    "manifest_missing",
    "manifest_unlisted",
    "manifest_mismatch",
    "manifest_bad_certificate",
    "future_dated",
    "clock_ahead_of_tpm",
    "tpm_clock_inconsistent",
    "bad_time_anchor",
)
#: A record more than this many seconds older than the latest time already logged means
#: the station's clock went back (which could reopen a window or a day's allowance).
CLOCK_ROLLBACK_TOLERANCE_S = 300
#: How far a station's record may be dated after HQ received the export, and ahead of the
#: time its TPM vouches for, before HQ reports it: the most any entitlement lets a station's
#: clock be off (``EntitlementPolicy.clock_skew_s`` is at most 3600 s).
STATION_TIME_TOLERANCE_S = 3600
_SERIAL_HEX = re.compile(r"[0-9a-f]{1,40}")
_new_tuple = tuple.__new__  # an IssuedEntry without a Python-level __new__ call


class IssuedEntry(NamedTuple):
    """One ``issued`` record as HQ keeps it (a tuple: a million of these per export)."""

    device_id: str
    serial: str  # lowercase hex, as in the record
    key_id: bytes
    entitlement_seq: int
    seq: int
    time: int


@dataclass
class EntitlementTally:
    """One entitlement's reconciler and counters while an export is reconciled."""

    row: EntitlementRow
    reconciler: Reconciler
    state: ReconState


@dataclass
class Reconciliation:
    """What the records of one export show; nothing stored yet."""

    tallies: dict[int, EntitlementTally] = field(default_factory=dict)
    issued: list[IssuedEntry] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    max_time: int = 0
    #: (request id, entitlement seq, day, extra) of quorum grants verified in this export.
    allowances: list[tuple[bytes, int, str, int]] = field(default_factory=list)
    #: (request id, entitlement seq, device id) of re-issue grants verified in this export.
    reissue_grants: list[tuple[bytes, int, str]] = field(default_factory=list)
    #: HQ's replay of the station's trusted time (state carried across exports).
    time_audit: TimeAudit | None = None


def _malformed(seq: int, what: str) -> Violation:
    return Violation("malformed_record", seq, "", what)


def reconcile_records(
    records: Iterable[IssuedColumns | AuditRecord],
    *,
    station_id: str,
    store: HqStore,
    start: AuditHead,
    received: int | None = None,
) -> Reconciliation:
    """Feed every record (as :class:`ChainStream` yields them: well-formed ``issued``
    records as runs by column, any other record as it is) to the reconciler of its
    entitlement (state carried over from earlier exports, loaded from ``store``). One pass,
    O(1) per record.

    Time findings: ``future_dated`` (dated more than ``STATION_TIME_TOLERANCE_S`` after
    ``received``, when HQ got the export), ``clock_rollback`` (out of order: older than a
    time already logged), and from the TPM readings (``trustcore.stationtime.TimeAudit``)
    ``clock_ahead_of_tpm``, ``tpm_clock_inconsistent`` and ``bad_time_anchor``."""
    r = _RecordReconciler(station_id, store, start, received)
    for item in records:
        if type(item) is IssuedColumns:
            r.issued_run(item)
        else:
            r.record(item)  # type: ignore[arg-type]
    return r.result()


class _RecordReconciler:
    """The state of :func:`reconcile_records`: every record passes :meth:`times`, then
    :meth:`issued_run` (runs of issued records by column, the hot path, or :meth:`issued`
    row by row) or :meth:`record` (any other). A run of issued records reaches its
    reconciler before the next record is looked at, so any other record sees the
    reconciler exactly as in log order."""

    def __init__(
        self, station_id: str, store: HqStore, start: AuditHead, received: int | None
    ) -> None:
        self.station_id, self.store, self.received = station_id, store, received
        self.time_audit = store.station_time_audit(station_id, STATION_TIME_TOLERANCE_S)
        self.out = Reconciliation(max_time=start.max_time, time_audit=self.time_audit)
        self.violations = self.out.violations
        self.max_time = start.max_time
        self.future = (1 << 62) if received is None else received + STATION_TIME_TOLERANCE_S
        self.tallies: dict[int, EntitlementTally | None] = {}
        self.n_issued = 0
        #: The entitlement of the current run of issued records, its tally and state.
        self.cur_eseq: object = None
        self.cur: EntitlementTally | None = None
        self.cur_state = ReconState()

    def tally_for(self, eseq: object, seq: int, device_id: str) -> EntitlementTally | None:
        if type(eseq) is not int:
            self.violations.append(_malformed(seq, "entitlement_seq is not an integer"))
            return None
        if eseq not in self.tallies:
            self.tallies[eseq] = _load_tally(self.store, self.station_id, eseq)
        tally = self.tallies[eseq]
        if tally is None:
            self.violations.append(
                Violation(
                    "unknown_entitlement",
                    seq,
                    device_id,
                    f"entitlement {eseq} was never issued to {self.station_id}",
                )
            )
        return tally

    def times(
        self,
        first_seq: int,
        whens: Sequence[int],
        readings: bytes | Sequence[object],
        device_ids: Sequence[str],
        *,
        exempt_ahead: bool,
    ) -> None:
        """The station's clock over consecutive records from ``first_seq``: order, future
        dating, TPM replay (``readings``: one per record, ``None`` for none, or all
        16-byte readings concatenated). ``exempt_ahead``: an anchor record may be ahead of
        the old anchor (that is why it re-anchors), and a refusal did nothing (the
        station's own ``clock_ahead`` refusals are counted in ``refused_at_station``): only
        readings that issued are "ahead"."""
        violations, received, future = self.violations, self.received, self.future
        max_time = self.max_time
        if (
            whens
            and whens[0] + CLOCK_ROLLBACK_TOLERANCE_S >= max_time
            and whens[-1] <= future
            and all(map(le, whens, whens[1:]))
        ):
            # In order, the first not rolled back, the last not future dated: the loop
            # below would find nothing (each time is at least the highest before it).
            max_time = max(max_time, whens[-1])
        else:
            for seq, t in enumerate(whens, first_seq):
                if t > max_time:
                    max_time = t
                    if t > future:
                        violations.append(future_dated(seq, t, received))
                elif t + CLOCK_ROLLBACK_TOLERANCE_S < max_time:
                    violations.append(
                        Violation(
                            "clock_rollback",
                            seq,
                            "",
                            f"time {t} is before {max_time} logged earlier",
                        )
                    )
                elif t > future:
                    violations.append(future_dated(seq, t, received))
        self.max_time = max_time
        # The TPM replay in one call (its findings follow the clock's of the same record
        # once result() sorts by seq, as if checked record by record).
        audit = self.time_audit
        findings = (
            audit.observe_joined(whens, readings)
            if type(readings) is bytes
            else audit.observe_batch(whens, readings)
        )
        for index, kind, detail in findings:
            if not (exempt_ahead and kind == "clock_ahead_of_tpm"):
                violations.append(Violation(kind, first_seq + index, device_ids[index], detail))

    def issued_run(self, run: IssuedColumns) -> None:
        """A run of well-formed ``issued`` records: :meth:`times`, then exactly
        :meth:`issued` of its rows, faster for a run that is all of one known, imported
        entitlement with its counters strictly increasing (nearly every run): then no
        record has a counter or import finding, and the entitlement's reconciler takes the
        columns as they are (``Reconciler.add_issued_run``)."""
        first, whens, ids = run.first_seq, run.times, run.device_ids
        self.times(first, whens, run.tpm, ids, exempt_ahead=False)
        eseq = run.entitlement_seq
        if type(eseq) is int and eseq not in self.tallies:
            self.tallies[eseq] = _load_tally(self.store, self.station_id, eseq)
        tally = self.tallies.get(eseq) if type(eseq) is int else None
        counters = run.counters
        if (
            tally is None
            or tally.state.imported_at_seq is None
            or not counters[0] > tally.state.last_counter
            or not all(map(lt, counters, counters[1:]))
        ):
            self.issued(run.rows())
            return
        n = len(whens)
        tally.state.last_counter = counters[-1]
        self.n_issued += n
        self.out.issued.extend(
            map(
                _new_tuple,
                repeat(IssuedEntry),
                zip(ids, run.serials, run.key_ids, repeat(eseq), range(first, first + n), whens),
            )
        )
        tally.reconciler.add_issued_run(first, whens, ids, run.key_ids, run.product)
        self.cur_eseq, self.cur, self.cur_state = eseq, tally, tally.state

    def issued(self, rows: Sequence[IssuedRow]) -> None:
        """Well-typed ``issued`` records (after :meth:`times`): the counter and import
        checks are HQ's, the entitlement's rules are its reconciler's."""
        violations = self.violations
        issued_append = self.out.issued.append
        # Handed to the entitlement's reconciler in one call (Reconciler.add_issued_batch)
        # before another entitlement's record and at the end of these rows.
        batch: list[IssuedRecord] = []
        batch_append = batch.append
        cur_eseq, cur, st = self.cur_eseq, self.cur, self.cur_state
        new_entry = tuple.__new__  # IssuedEntry without a Python-level __new__ call
        self.n_issued += len(rows)
        for seq, t, _, device_id, serial, kid, product, counter, eseq in rows:
            if type(eseq) is not int or eseq != cur_eseq:
                # Another entitlement than the previous record's: the run of issued records
                # for the previous one goes to its reconciler first.
                if batch:
                    _end_run(cur, batch)
                tally = self.tallies.get(eseq) if type(eseq) is int else None
                if tally is None:
                    tally = self.tally_for(eseq, seq, device_id)
                    if tally is None:
                        continue
                cur_eseq, cur, st = eseq, tally, tally.state
            batch_append((seq, t, device_id, kid, product))
            if counter > st.last_counter and st.imported_at_seq is not None:
                st.last_counter = counter
            else:
                assert cur is not None  # set with st
                _counter_or_import_violation(violations, st, cur, seq, device_id, counter)
            issued_append(new_entry(IssuedEntry, (device_id, serial, kid, eseq, seq, t)))
        self.cur_eseq, self.cur, self.cur_state = cur_eseq, cur, st
        if batch:
            _end_run(cur, batch)

    def record(self, record: AuditRecord) -> None:
        """Any record that is not part of an :class:`IssuedRun` (for an ``issued`` one: a
        missing, extra or mistyped field)."""
        seq, _, t, ev, f, _ = record
        who = f.get("device_id")
        self.times(
            seq,
            (t,),
            (f.get("tpm"),),
            (who if type(who) is str else "",),
            exempt_ahead="anchor_time" in f or ev == "refused",
        )
        violations = self.violations
        if ev == "issued":
            self._one_issued(seq, t, f)
            return
        events = self.out.events
        events[ev] = events.get(ev, 0) + 1
        store, station_id, time_audit = self.store, self.station_id, self.time_audit
        if ev == "slot_burned":
            device_id = f.get("device_id")
            counter = f.get("counter")
            if type(device_id) is not str or type(counter) is not int:
                violations.append(_malformed(seq, "slot_burned record lacks a well-typed field"))
                return
            tally = self.tally_for(f.get("entitlement_seq"), seq, device_id)
            if tally is None:
                return
            tally.reconciler.add_burned(seq, device_id)
            if counter <= tally.state.last_counter:
                violations.append(
                    Violation("counter_reuse", seq, device_id, f"counter {counter} not increasing")
                )
            else:
                tally.state.last_counter = counter
        elif ev == "entitlement_imported":
            ent_id = f.get("entitlement_id")
            if type(ent_id) is not str or type(f.get("counter_base")) is not int:
                violations.append(_malformed(seq, "entitlement_imported lacks a field"))
                return
            tally = self.tally_for(f.get("entitlement_seq"), seq, "")
            if tally is None:
                return
            if ent_id != tally.row.entitlement_id:
                violations.append(
                    Violation(
                        "entitlement_mismatch",
                        seq,
                        "",
                        f"imported {ent_id!r} as sequence {tally.row.sequence}, "
                        f"HQ issued {tally.row.entitlement_id!r}",
                    )
                )
            elif tally.state.imported_at_seq is None:
                tally.state.imported_at_seq = seq
            if "anchor_time" in f:
                _time_anchor(violations, time_audit, seq, t, f, tally.row.issued_at)
        elif ev == "time_anchored":
            signed = f.get("signed_time")
            if store.time_statement_issued(station_id, signed):
                _time_anchor(violations, time_audit, seq, t, f, None)
            else:  # not re-anchored: the replay keeps the anchor HQ can vouch for
                violations.append(
                    Violation(
                        "bad_time_anchor",
                        seq,
                        "",
                        f"HQ issued no time statement at {signed!r} to {station_id}",
                    )
                )
        elif ev == "quorum_approved":
            tally = self.tally_for(f.get("entitlement_seq"), seq, "")
            if tally is not None:
                _quorum_grant(self.out, tally, station_id, store, seq, t, f)
        elif ev == "secret_provisioned":
            device_id, secret, product = f.get("device_id"), f.get("secret"), f.get("product")
            if type(device_id) is not str or type(secret) is not str or type(product) is not str:
                violations.append(_malformed(seq, "secret_provisioned lacks a well-typed field"))
                return
            tally = self.tally_for(f.get("entitlement_seq"), seq, device_id)
            if tally is not None:
                tally.reconciler.add_secret(seq, t, device_id, secret, product)
        elif ev == "refused":
            reason = f.get("reason")
            key = reason if type(reason) is str else "?"
            self.out.refused[key] = self.out.refused.get(key, 0) + 1

    def _one_issued(self, seq: int, t: int, f: Mapping[str, object]) -> None:
        """An ``issued`` record outside a run: its fields checked one by one."""
        try:
            device_id = f["device_id"]
            serial = f["serial"]
            kid = f["key_id"]
            product = f["product"]
            counter = f["counter"]
            eseq = f["entitlement_seq"]
        except KeyError:
            self.n_issued += 1
            self.violations.append(_malformed(seq, "issued record lacks a field"))
            return
        if (
            type(device_id) is not str
            or type(serial) is not str
            or type(kid) is not bytes
            or type(product) is not str
            or type(counter) is not int
            or len(kid) != 32
            or _SERIAL_HEX.fullmatch(serial) is None
        ):
            self.n_issued += 1
            self.violations.append(_malformed(seq, "issued record has a mistyped field"))
            return
        self.issued(((seq, t, None, device_id, serial, kid, product, counter, eseq),))

    def result(self) -> Reconciliation:
        out = self.out
        if self.n_issued:
            out.events["issued"] = out.events.get("issued", 0) + self.n_issued
        out.max_time = self.max_time
        out.tallies = {k: v for k, v in self.tallies.items() if v is not None}
        # Each run's clock findings were listed before its issuance findings: back to log
        # order (stable: within one record, clock findings first, as they are checked).
        out.violations.sort(key=lambda v: v.seq)
        return out


def _end_run(tally: EntitlementTally | None, batch: list[IssuedRecord]) -> None:
    """Hand a run of issued records to the reconciler of their entitlement, and empty it."""
    assert tally is not None  # a run is only started once its entitlement is known
    tally.reconciler.add_issued_batch(batch)
    batch.clear()


def future_dated(seq: int, when: int, received: int | None) -> Violation:
    """A record (or checkpoint) dated too far after HQ received the export."""
    return Violation(
        "future_dated",
        seq,
        "",
        f"time {when} is {when - (received or 0)} s after HQ received the export "
        f"(tolerance {STATION_TIME_TOLERANCE_S} s)",
    )


def _time_anchor(
    violations: list[Violation],
    audit: TimeAudit,
    seq: int,
    when: int,
    f: Mapping[str, object],
    hq_signed: int | None,
) -> None:
    """An anchor record (``entitlement_imported`` with ``anchor_time``, ``time_anchored``):
    the anchor must be the one the station's rule gives for the time HQ signed (for an
    entitlement HQ knows it: ``hq_signed``). HQ replays with the anchor it computes, so a
    station that claims a later one gains nothing in the replay."""
    signed, claimed = f.get("signed_time"), f.get("anchor_time")
    if type(signed) is not int or type(claimed) is not int:
        violations.append(_malformed(seq, "anchor record lacks signed_time/anchor_time"))
        return
    if hq_signed is not None and signed != hq_signed:
        violations.append(
            Violation("bad_time_anchor", seq, "", f"signed time {signed} is not HQ's {hq_signed}")
        )
        signed = hq_signed
    expected = expected_anchor(audit, signed_time=signed, host_now=when)
    if claimed > expected + audit.tolerance_s:
        violations.append(
            Violation(
                "bad_time_anchor",
                seq,
                "",
                f"anchor {claimed} is {claimed - expected} s after the {expected} the rule gives",
            )
        )
    audit.anchor(expected)


def _quorum_grant(
    out: Reconciliation,
    tally: EntitlementTally,
    station_id: str,
    store: HqStore,
    seq: int,
    when: int,
    f: Mapping[str, object],
) -> None:
    """A station's record that a quorum let it exceed the daily limit or re-issue a device's
    certificate: HQ re-verifies the carried evidence against the entitlement's rule before
    it counts (a station cannot grant itself more by writing such a record). A re-issue
    grant excuses exactly one later duplicate of that device id. Other operations are only
    counted."""
    operation = f.get("operation")
    if operation not in ("exceed_daily_limit", "reissue_device_certificate"):
        return
    policy = tally.row.policy
    evidence = f.get("evidence")
    device_id = f.get("device_id")
    day, extra = f.get("day"), f.get("extra")
    params: dict[str, ParamValue] = {
        "station_id": station_id,
        "entitlement_id": policy.entitlement_id,
    }
    try:
        if type(evidence) is not bytes:
            raise QuorumError("quorum_approved record lacks its evidence", reason="malformed")
        if operation == "exceed_daily_limit":
            if type(day) is not str or type(extra) is not int:
                raise QuorumError("quorum_approved record lacks day/extra", reason="malformed")
            params |= {"day": day, "extra": extra}
        else:
            if type(device_id) is not str:
                raise QuorumError("quorum_approved record lacks device_id", reason="malformed")
            params["device_id"] = device_id
        used = {a[0] for a in out.allowances} | {r[0] for r in out.reissue_grants}
        bundle = parse_evidence([evidence])
        decision = verify_quorum_rule(
            bundle,
            policy.quorum_rule(operation),
            params=params,
            # Judged at the time the station recorded the grant: approvals expire.
            now=when,
            used_request_ids=used,
        )
        if store.allowance_used(decision.request_id) or store.reissue_grant_known(
            decision.request_id
        ):
            raise QuorumError("these approvals were already used", reason="replayed")
    except (QuorumError, EncodingError) as exc:
        out.violations.append(
            Violation(
                "invalid_quorum",
                seq,
                device_id if type(device_id) is str else "",
                f"{operation} approval refused: {exc.message}",
            )
        )
        return
    if operation == "exceed_daily_limit":
        assert type(day) is str and type(extra) is int  # checked above
        tally.reconciler.allow_extra(day, extra)
        out.allowances.append((decision.request_id, tally.row.sequence, day, extra))
    else:
        assert type(device_id) is str  # checked above
        tally.reconciler.allow_reissue(device_id, decision.request_id)
        out.reissue_grants.append((decision.request_id, tally.row.sequence, device_id))


def _counter_or_import_violation(
    violations: list[Violation],
    st: ReconState,
    tally: EntitlementTally,
    seq: int,
    device_id: str,
    counter: int,
) -> None:
    """The rare branch of the hot loop: issued before the import record, or a counter that
    did not increase."""
    if st.imported_at_seq is None:
        violations.append(
            Violation(
                "entitlement_not_imported",
                seq,
                device_id,
                f"issued under entitlement {tally.row.sequence} before importing it",
            )
        )
        st.imported_at_seq = -1  # report once per entitlement
    if counter <= st.last_counter:
        violations.append(
            Violation("counter_reuse", seq, device_id, f"counter {counter} not increasing")
        )
    else:
        st.last_counter = counter


def _load_tally(store: HqStore, station_id: str, eseq: int) -> EntitlementTally | None:
    row = store.entitlement(station_id, eseq)
    if row is None:
        return None
    state = store.recon_state(station_id, eseq)
    ids, keys = store.entitlement_devices(station_id, eseq)
    reconciler = Reconciler(
        row.policy,
        issued=state.issued,
        burned=state.burned,
        per_day=store.recon_days(station_id, eseq),
        day_allowance=store.recon_allowances(station_id, eseq),
        reissue_grants=store.reissue_grants(station_id, eseq),
        device_ids=ids,
        key_ids=keys,
    )
    return EntitlementTally(row, reconciler, state)
