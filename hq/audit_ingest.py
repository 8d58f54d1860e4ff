"""``hq ingest-audit``: accept a station's audit export only if it is authentic and continues
exactly what HQ accepted before, then reconcile it against the entitlements HQ issued.

Two outcomes must never be confused (``docs/hq.md``):

* **refused** (:class:`hq.errors.ExportRefusedError`, exit 2): the export is not the next piece of
  this station's authentic log — foreign or wrong station, bad signature, replayed export,
  gap, fork, reorder, truncation, rewritten entry, forged checkpoint. Nothing is stored: the
  audit head stays where it was, so the station can still send the genuine export.
* **accepted with violations** (exit 1): the log is authentic, so it is evidence; what it
  shows (over quota, over the daily limit, outside the window, ids out of range, duplicates,
  a manifest that does not match) is reported and stored, and the head moves on.

Checks, in this order (the first refusal wins):

1. ``peek``: the package is well-formed and an audit export;
2. the sender certificate is a station CA certificate signed by this HQ's root, issued by
   HQ to an enrolled station, for that station's enrolled CA key (else ``foreign_station``).
   Its validity period is deliberately not checked: an export written after the
   entitlement ended must still be accepted, and authenticity comes from the root signature
   plus HQ's own record of issuing exactly this certificate;
3. ``open_package`` with the audit receiver key (signature, content type, ``replayed`` when the
   export number is not above the last accepted one, decryption);
4. the payload names the same station as the certificate (``wrong_station``) and the export
   number equals the package sequence;
5. ``verify_export`` from the stored head (checkpoint station and signature, continuity);
6. reconciliation of every record (accepted from here on), manifest cross-check, duplicates
   against every device HQ has seen, then one transaction stores it all.
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hq.audit_chunks import IssuedRow, IssuedRun, decode_chunks
from hq.errors import ExportRefusedError
from hq.home import HqHome, HqSecrets
from hq.report import IngestReport
from hq.store import AuditHead, DeviceRow, EntitlementRow, HqStore, ReconState, StationCrlRow
from trustcore.audit import (
    AuditExport,
    AuditRecord,
    ChainHead,
    Checkpoint,
    decode_export,
    verify_checkpoint,
    verify_export,
)
from trustcore.crl import load_crl, verify_crl
from trustcore.errors import (
    AuditChainError,
    CrlError,
    EncodingError,
    ProfileError,
    ReplayError,
    SealedPackageError,
)
from trustcore.keys import KeyAgreement, key_id, spki_der
from trustcore.messages import CT_AUDIT_EXPORT, AuditExportPayload
from trustcore.profiles import HqRole, device_id_from_certificate, station_id_from_certificate
from trustcore.quorum import ParamValue, QuorumError, parse_evidence, verify_quorum_rule
from trustcore.reconcile import IssuedRecord, Reconciler, Violation
from trustcore.sealed import DEFAULT_MAX_SIZE, open_package, peek
from trustcore.stationtime import TimeAudit, expected_anchor

__all__ = [
    "CLOCK_ROLLBACK_TOLERANCE_S",
    "HQ_VIOLATION_KINDS",
    "REFUSAL_REASONS",
    "ChainStream",
    "IssuedEntry",
    "Reconciliation",
    "VerifiedExport",
    "check_manifest",
    "ingest_audit",
    "reconcile_records",
    "record_ingest",
    "verify_audit_package",
]

#: Reasons an export is refused as a whole (exit 2).
REFUSAL_REASONS = frozenset(
    {
        "malformed",
        "oversized",
        "wrong_content_type",
        "foreign_station",
        "wrong_station",
        "wrong_sender",
        "bad_signature",
        "wrong_receiver",
        "not_encrypted",
        "decrypt_failed",
        "replayed",
        "gap",
        "fork",
        "duplicate",
        "reorder",
        "truncation",
        "rewritten_entry",
        "forged_checkpoint",
        "unattested",
    }
)
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


def _refuse(reason: str, message: str) -> ExportRefusedError:
    return ExportRefusedError(message, reason=reason)


# ------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VerifiedExport:
    """An export whose sender, package and signed checkpoint verified. Its records are
    verified as they stream through :class:`ChainStream`."""

    station_id: str
    station_ca: x509.Certificate
    export_number: int
    entitlement_sequence: int
    start: AuditHead
    export: AuditExport
    checkpoint: Checkpoint
    manifest: tuple[bytes, ...]
    crl: StationCrlRow | None = None
    #: CRLs of the station's retired CA keys: (issuer key id, row).
    retired_crls: tuple[tuple[bytes, StationCrlRow], ...] = ()
    #: Every CA certificate HQ issued to the station (renewals and re-keys included): the
    #: manifest may hold devices signed under any of them.
    station_cas: tuple[x509.Certificate, ...] = ()


def _check_station_ca(cert: x509.Certificate, root: x509.Certificate, store: HqStore) -> str:
    """Return the station id if ``cert`` is a station CA certificate HQ issued to an enrolled
    station for its enrolled key; refuse with ``foreign_station`` otherwise."""
    try:
        station_id = station_id_from_certificate(cert).value
    except ProfileError as exc:
        raise _refuse("foreign_station", f"sender is not a station CA: {exc.message}") from exc
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise _refuse(
            "foreign_station", f"sender certificate of {station_id!r} is not issued by this HQ"
        ) from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise _refuse("foreign_station", "sender certificate is not a CA certificate") from exc
    if not bc.ca or bc.path_length != 0:
        raise _refuse("foreign_station", "sender certificate is not a station CA certificate")
    station = store.station(station_id)
    if station is None:
        raise _refuse("foreign_station", f"station {station_id!r} is not enrolled at this HQ")
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The current CA key, or one the station re-keyed away from (hq.station_ca): an export
    # written before a re-key and carried to HQ after it is still the station's own log —
    # until HQ accepted one signed by a newer key (HqStore.station_export_keys).
    if spki not in store.station_export_keys(station_id):
        closed = spki in store.station_ca_keys(station_id)
        raise _refuse(
            "foreign_station",
            f"sender key of station {station_id!r} was superseded by a re-key and the station "
            "already exports with its new key"
            if closed
            else f"sender key is not the enrolled CA key of station {station_id!r}",
        )
    if not store.station_ca_issued(station_id, cert.public_bytes(serialization.Encoding.DER)):
        raise _refuse(
            "foreign_station", f"HQ has no record of issuing this certificate to {station_id!r}"
        )
    return station_id


def verify_audit_package(
    package: bytes,
    *,
    store: HqStore,
    root_cert: x509.Certificate,
    audit_key: KeyAgreement,
    max_size: int = DEFAULT_MAX_SIZE,
) -> VerifiedExport:
    """Steps 1-4 of the module docstring and the checkpoint of step 5 (station, signature);
    the chain itself is verified by :class:`ChainStream`. Raises :class:`ExportRefusedError`;
    never writes."""
    try:
        header = peek(package, max_size=max_size)
        if header.content_type != CT_AUDIT_EXPORT:
            raise _refuse(
                "wrong_content_type", f"package is {header.content_type!r}, not an audit export"
            )
        cert = header.sender_certificate()
    except SealedPackageError as exc:
        raise _refuse(exc.reason, f"package refused: {exc.args[0]}") from exc
    station_id = _check_station_ca(cert, root_cert, store)
    start = store.audit_head(station_id)
    try:
        opened = open_package(
            package,
            receiver=audit_key,
            expected_content_type=CT_AUDIT_EXPORT,
            trusted_sender_public=cert.public_key(),  # type: ignore[arg-type]
            last_sequence=start.last_export,
            max_size=max_size,
        )
    except ReplayError as exc:
        raise _refuse(
            "replayed",
            f"export {header.sequence} of {station_id} is not newer than the last accepted "
            f"export {start.last_export}",
        ) from exc
    except SealedPackageError as exc:
        raise _refuse(exc.reason, f"package refused: {exc.args[0]}") from exc
    try:
        payload = AuditExportPayload.decode(opened.payload, max_size=max_size)
    except EncodingError as exc:
        raise _refuse("malformed", f"audit export payload: {exc.message}") from exc
    if payload.station_id != station_id:
        raise _refuse(
            "wrong_station",
            f"export claims station {payload.station_id!r} but is signed by {station_id!r}",
        )
    if payload.export_number != header.sequence:
        raise _refuse("malformed", "export number differs from the signed package sequence")
    try:
        export = decode_export(payload.audit_export, max_size=max_size)
        checkpoint = verify_checkpoint(
            export.checkpoint,
            station_id=station_id,
            station_public=cert.public_key(),  # type: ignore[arg-type]
        )
    except AuditChainError as exc:
        raise _refuse(exc.reason, f"audit export of {station_id}: {exc.args[0]}") from exc
    crl = None if payload.crl is None else _station_crl(payload.crl, cert, store, station_id)
    station_cas = tuple(
        x509.load_der_x509_certificate(der) for _, der in store.station_ca_certificates(station_id)
    )
    retired = tuple(
        _retired_crl(der, cert, station_cas, store, station_id) for der in payload.retired_crls
    )
    return VerifiedExport(
        station_id=station_id,
        station_ca=cert,
        export_number=payload.export_number,
        entitlement_sequence=payload.entitlement_sequence,
        start=start,
        export=export,
        checkpoint=checkpoint,
        manifest=payload.manifest,
        crl=crl,
        retired_crls=retired,
        station_cas=station_cas,
    )


def _retired_crl(
    der: bytes,
    sender: x509.Certificate,
    station_cas: Sequence[x509.Certificate],
    store: HqStore,
    station_id: str,
) -> tuple[bytes, StationCrlRow]:
    """A CRL signed by one of the station's retired CA keys (not the sender's key): it must
    verify against a certificate HQ issued to the station for a key of its re-key chain."""
    keys = set(store.station_ca_keys(station_id))
    sender_key = spki_der(sender.public_key())
    for ca in station_cas:
        ca_key = spki_der(ca.public_key())
        if ca_key == sender_key or ca_key not in keys:
            continue
        try:
            revocations = verify_crl(der, ca, now=None)
        except CrlError:
            continue
        crl = load_crl(der)
        return revocations.issuer_key_id, StationCrlRow(
            station_id=station_id,
            crl_number=revocations.crl_number,
            this_update=int(crl.last_update_utc.timestamp()),
            next_update=int(revocations.next_update.timestamp()),
            crl_der=crl.public_bytes(serialization.Encoding.DER),
            recorded_at=int(time.time()),
        )
    raise _refuse("bad_crl", "a retired-key CRL in the export does not verify")


def _station_crl(
    der: bytes, station_ca: x509.Certificate, store: HqStore, station_id: str
) -> StationCrlRow | None:
    """The station CA's CRL carried by the export: it must verify against the sender's CA
    certificate (a bad one refuses the whole export: the package is signed, so it was made
    so by the station). An older CRL than the one held is ignored, never stored."""
    try:
        revocations = verify_crl(der, station_ca, now=None)
    except CrlError as exc:
        raise _refuse(
            "bad_crl", f"the station CRL in the export does not verify: {exc.message}"
        ) from exc
    held = store.station_crl(station_id)
    if held is not None and held.crl_number >= revocations.crl_number:
        return None
    crl = load_crl(der)
    return StationCrlRow(
        station_id=station_id,
        crl_number=revocations.crl_number,
        this_update=int(crl.last_update_utc.timestamp()),
        next_update=int(revocations.next_update.timestamp()),
        crl_der=crl.public_bytes(serialization.Encoding.DER),
        recorded_at=int(time.time()),
    )


class ChainStream:
    """Step 5: the chain from the stored head to the signed checkpoint, verified while the
    records stream into the reconciler, one at a time.

    Why not ``trustcore.audit.verify_export`` directly: it keeps every decoded record (about
    1.5 KB each), and building a million of them costs more in memory growth than the
    verification itself (measured: 8.4 s for 10^6 records kept, 2.8 s streamed; see
    docs/hq.md). The per-record checks are the very same (``trustcore.audit.stream_chain``,
    run by ``hq.audit_chunks``, in worker processes for a large export), and on the first
    defect, or if the chain does not end exactly at the signed head, the whole export goes
    to ``verify_export``, which names the attack (gap, fork, reorder, ...). Nothing the
    stream yields may be stored before :meth:`finish` returns.
    """

    def __init__(self, verified: VerifiedExport) -> None:
        self._v = verified
        self._next_seq = verified.start.next_seq
        self._prev = verified.start.head_hash
        self._done = False

    def __iter__(self) -> Iterator[IssuedRun | AuditRecord]:
        """The verified records in order, decoded once (``hq.audit_chunks``: runs of
        well-formed ``issued`` records as columns, every other record as it is; decoded by
        worker processes for a large export). Any defect sends the whole export to
        ``verify_export`` to be named."""
        if self._done:
            raise RuntimeError("a ChainStream is iterated once")
        self._done = True
        records = self._v.export.records
        if not records:
            return
        seq0 = self._next_seq
        last = self._prev
        chunks = decode_chunks(records, seq0, self._prev)
        try:
            for chunk in chunks:
                if not chunk.ok:
                    self._name_the_defect()
                yield from chunk.items
                last = chunk.last_hash
        finally:
            chunks.close()  # stops the worker processes at once, also on a refusal
        self._next_seq, self._prev = seq0 + len(records), last

    def finish(self) -> ChainHead:
        """The new head, once every record streamed and the chain ends at the signed head."""
        if not self._done:
            for _ in self:
                pass
        cp = self._v.checkpoint
        if self._next_seq - 1 != cp.seq or self._prev != cp.head_hash or self._next_seq != cp.count:
            self._name_the_defect()
        return ChainHead(next_seq=self._next_seq, head_hash=self._prev)

    def _name_the_defect(self) -> NoReturn:
        v = self._v
        try:
            verify_export(
                v.export,
                station_id=v.station_id,
                station_public=v.station_ca.public_key(),  # type: ignore[arg-type]
                start_seq=v.start.next_seq,
                start_prev_hash=v.start.head_hash,
            )
        except AuditChainError as exc:
            raise _refuse(exc.reason, f"audit chain of {v.station_id}: {exc.args[0]}") from exc
        # Fail closed should the two verifiers ever disagree.
        raise _refuse("malformed", "the audit chain failed a check that verify_export passed")


# ------------------------------------------------------------------------ reconciliation


class IssuedEntry(NamedTuple):
    """One ``issued`` record as HQ keeps it (a tuple: a million of these per export)."""

    device_id: str
    serial: str  # lowercase hex, as in the record
    key_id: bytes
    entitlement_seq: int
    seq: int
    time: int


@dataclass
class _Tally:
    row: EntitlementRow
    reconciler: Reconciler
    state: ReconState


@dataclass
class Reconciliation:
    """What the records of one export show; nothing stored yet."""

    tallies: dict[int, _Tally] = field(default_factory=dict)
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
    records: Iterable[IssuedRun | AuditRecord],
    *,
    station_id: str,
    store: HqStore,
    start: AuditHead,
    received: int | None = None,
) -> Reconciliation:
    """Feed every record (as :class:`ChainStream` yields them: runs of well-formed
    ``issued`` records as columns, any other record as it is) to the reconciler of its
    entitlement (state carried over from earlier exports, loaded from ``store``). One pass,
    O(1) per record.

    Time findings: ``future_dated`` (dated more than ``STATION_TIME_TOLERANCE_S`` after
    ``received``, when HQ got the export), ``clock_rollback`` (out of order: older than a
    time already logged), and from the TPM readings (``trustcore.stationtime.TimeAudit``)
    ``clock_ahead_of_tpm``, ``tpm_clock_inconsistent`` and ``bad_time_anchor``."""
    r = _RecordReconciler(station_id, store, start, received)
    for item in records:
        if type(item) is IssuedRun:
            r.times(item.rows, exempt_ahead=False)
            r.issued(item.rows)
        else:
            r.record(item)  # type: ignore[arg-type]
    return r.result()


class _RecordReconciler:
    """The state of :func:`reconcile_records`: every record passes :meth:`times`, then
    :meth:`issued` (runs of issued records, the hot path) or :meth:`record` (any other)."""

    def __init__(
        self, station_id: str, store: HqStore, start: AuditHead, received: int | None
    ) -> None:
        self.station_id, self.store, self.received = station_id, store, received
        self.time_audit = store.station_time_audit(station_id, STATION_TIME_TOLERANCE_S)
        self.out = Reconciliation(max_time=start.max_time, time_audit=self.time_audit)
        self.violations = self.out.violations
        self.max_time = start.max_time
        self.future = (1 << 62) if received is None else received + STATION_TIME_TOLERANCE_S
        self.tallies: dict[int, _Tally | None] = {}
        self.n_issued = 0
        #: The entitlement of the current run of issued records, its tally and state.
        self.cur_eseq: object = None
        self.cur: _Tally | None = None
        self.cur_state = ReconState()
        #: The current run of issued records, handed to its reconciler in one call
        #: (Reconciler.add_issued_batch) before any other record or another entitlement's.
        self.batch: list[IssuedRecord] = []

    def tally_for(self, eseq: object, seq: int, device_id: str) -> _Tally | None:
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

    def times(self, rows: Sequence[IssuedRow], *, exempt_ahead: bool) -> None:
        """The station's clock over these records: order, future dating, TPM replay.
        ``exempt_ahead``: an anchor record may be ahead of the old anchor (that is why it
        re-anchors), and a refusal did nothing (the station's own ``clock_ahead`` refusals
        are counted in ``refused_at_station``): only readings that issued are "ahead"."""
        violations, received, future = self.violations, self.received, self.future
        observe_tpm = self.time_audit.observe
        max_time = self.max_time
        for seq, t, tpm, who, _, _, _, _, _ in rows:
            if t > max_time:
                max_time = t
                if t > future:
                    violations.append(_future_dated(seq, t, received))
            elif t + CLOCK_ROLLBACK_TOLERANCE_S < max_time:
                violations.append(
                    Violation(
                        "clock_rollback", seq, "", f"time {t} is before {max_time} logged earlier"
                    )
                )
            elif t > future:
                violations.append(_future_dated(seq, t, received))
            if tpm is not None:
                found = observe_tpm(t, tpm)
                if found is not None and not (exempt_ahead and found[0] == "clock_ahead_of_tpm"):
                    violations.append(Violation(found[0], seq, who, found[1]))
        self.max_time = max_time

    def issued(self, rows: Sequence[IssuedRow]) -> None:
        """Well-typed ``issued`` records (after :meth:`times`): the counter and import
        checks are HQ's, the entitlement's rules are its reconciler's."""
        violations = self.violations
        issued_append = self.out.issued.append
        batch = self.batch
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

    def record(self, record: AuditRecord) -> None:
        """Any record that is not part of an :class:`IssuedRun` (for an ``issued`` one: a
        missing, extra or mistyped field)."""
        seq, _, t, ev, f, _ = record
        who = f.get("device_id")
        self.times(
            ((seq, t, f.get("tpm"), who if type(who) is str else "", "", b"", "", 0, 0),),
            exempt_ahead="anchor_time" in f or ev == "refused",
        )
        violations = self.violations
        if ev == "issued":
            self._one_issued(seq, t, f)
            return
        if self.batch:  # every other record sees the reconciler after the issued ones before
            _end_run(self.cur, self.batch)
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
        if self.batch:
            _end_run(self.cur, self.batch)
        if self.n_issued:
            out.events["issued"] = out.events.get("issued", 0) + self.n_issued
        out.max_time = self.max_time
        out.tallies = {k: v for k, v in self.tallies.items() if v is not None}
        # Each run's clock findings were listed before its issuance findings: back to log
        # order (stable: within one record, clock findings first, as they are checked).
        out.violations.sort(key=lambda v: v.seq)
        return out


def _end_run(tally: _Tally | None, batch: list[IssuedRecord]) -> None:
    """Hand a run of issued records to the reconciler of their entitlement, and empty it."""
    assert tally is not None  # a run is only started once its entitlement is known
    tally.reconciler.add_issued_batch(batch)
    batch.clear()


def _future_dated(seq: int, when: int, received: int | None) -> Violation:
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
    tally: _Tally,
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
    tally: _Tally,
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


def _load_tally(store: HqStore, station_id: str, eseq: int) -> _Tally | None:
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
    return _Tally(row, reconciler, state)


def check_manifest(
    manifest: Sequence[bytes],
    issued: Sequence[IssuedEntry],
    station_ca: x509.Certificate | Sequence[x509.Certificate],
) -> tuple[list[Violation], dict[int, bytes]]:
    """Pair each manifest certificate with its ``issued`` record by serial number. A record
    without a certificate, a certificate without a record (an issuance the log does not
    show), or a pair that disagrees on device id or key is a violation. Returns the
    violations and the verified certificates by serial."""
    violations: list[Violation] = []
    by_serial: dict[int, tuple[str, bytes, bytes]] = {}
    cas = [station_ca] if isinstance(station_ca, x509.Certificate) else list(station_ca)
    for index, der in enumerate(manifest):
        try:
            cert = x509.load_der_x509_certificate(der)
            _verify_by_any(cert, cas)
            device_id = device_id_from_certificate(cert).value
            public = cert.public_key()
            kid = key_id(public)  # type: ignore[arg-type]
        except (ValueError, TypeError, InvalidSignature, ProfileError) as exc:
            violations.append(
                Violation(
                    "manifest_bad_certificate",
                    -1,
                    "",
                    f"manifest entry {index} is not a device certificate of this station "
                    f"({type(exc).__name__})",
                )
            )
            continue
        if cert.serial_number in by_serial:
            violations.append(
                Violation(
                    "manifest_bad_certificate",
                    -1,
                    device_id,
                    f"serial {cert.serial_number:x} twice in the manifest",
                )
            )
            continue
        by_serial[cert.serial_number] = (device_id, kid, der)
    verified = {serial: entry[2] for serial, entry in by_serial.items()}
    for item in issued:
        found = by_serial.pop(int(item.serial, 16), None)
        if found is None:
            violations.append(
                Violation(
                    "manifest_missing",
                    item.seq,
                    item.device_id,
                    f"no certificate with serial {item.serial} in the manifest",
                )
            )
        elif found[0] != item.device_id or found[1] != item.key_id:
            violations.append(
                Violation(
                    "manifest_mismatch",
                    item.seq,
                    item.device_id,
                    f"certificate {item.serial} names {found[0]} / another key",
                )
            )
    for serial, (device_id, _, _) in by_serial.items():
        violations.append(
            Violation(
                "manifest_unlisted",
                -1,
                device_id,
                f"certificate {serial:x} has no issued record in the audit log",
            )
        )
    return violations, verified


def _verify_by_any(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> None:
    """``cert`` is signed by one of ``cas`` (same station name, one key per re-key): the
    one whose key id matches the certificate's AKI first, then the others."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        wanted = aki.key_identifier
    except x509.ExtensionNotFound:
        wanted = None
    ordered = sorted(
        cas,
        key=lambda ca: x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest != wanted,
    )
    error: Exception = ValueError("no station CA certificate")
    for ca in ordered:
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature) as exc:
            error = exc
    raise error


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while a million records are built: they hold no cycles, and
    repeated full collections over them cost more than the verification itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------- ingest


def ingest_audit(
    home: HqHome,
    package: bytes,
    secrets: HqSecrets,
    *,
    now: datetime | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> IngestReport:
    """Verify, reconcile and store one export. Raises :class:`ExportRefusedError` (nothing stored)
    or returns the report (``report.clean`` is False when there are violations)."""
    moment = int((now or datetime.now(UTC)).timestamp())
    root_cert = home.root_certificate()
    audit_key = home.role_key(HqRole.AUDIT_RECEIVER, secrets)
    store = HqStore.open(home.store_location)
    try:
        started = time.perf_counter()
        with gc_paused():
            verified = verify_audit_package(
                package, store=store, root_cert=root_cert, audit_key=audit_key, max_size=max_size
            )
            chain = ChainStream(verified)
            recon = reconcile_records(
                chain,
                station_id=verified.station_id,
                store=store,
                start=verified.start,
                received=moment,
            )
            head = chain.finish()  # refuses unless the chain ended exactly at the signed head
            manifest_violations, certs = check_manifest(
                verified.manifest, recon.issued, verified.station_cas or verified.station_ca
            )
            recon.violations.extend(manifest_violations)
            if verified.checkpoint.time > moment + STATION_TIME_TOLERANCE_S:
                recon.violations.append(
                    _future_dated(verified.checkpoint.seq, verified.checkpoint.time, moment)
                )
            report = record_ingest(
                store, verified, head, recon, certs, started=started, received=moment
            )
    finally:
        store.close()
    return report


def record_ingest(
    store: HqStore,
    verified: VerifiedExport,
    head: ChainHead,
    recon: Reconciliation,
    certs: dict[int, bytes],
    *,
    started: float,
    received: int,
) -> IngestReport:
    """Store one verified and reconciled export (the last step of :func:`ingest_audit`,
    also timed on its own by ``bench/audit.py``): duplicates against earlier exports, the
    report (``seconds`` since ``started``, a ``time.perf_counter()`` value), then one
    transaction with the head, the counters, every device and the report."""
    _cross_check_duplicates(store, verified.station_id, recon)
    report = IngestReport(
        station_id=verified.station_id,
        export_number=verified.export_number,
        first_seq=verified.start.next_seq,
        next_seq=head.next_seq,
        records=head.next_seq - verified.start.next_seq,
        head_hash=head.head_hash.hex(),
        events=dict(sorted(recon.events.items())),
        refused=dict(sorted(recon.refused.items())),
        entitlements=tuple(recon.tallies[k].reconciler.report() for k in sorted(recon.tallies)),
        violations=tuple(recon.violations),
        manifest_certs=len(verified.manifest),
        seconds=time.perf_counter() - started,
    )
    _persist(store, verified, head, recon, certs, report, received)
    return report


def _cross_check_duplicates(store: HqStore, station_id: str, recon: Reconciliation) -> None:
    """Devices or keys HQ already saw under another entitlement or station (or that this
    export shows under two entitlements): the per-entitlement reconciler cannot see those."""
    if not recon.issued:
        return
    if len(recon.tallies) > 1:
        first_id: dict[str, int] = {}
        first_key: dict[bytes, int] = {}
        for item in recon.issued:
            eseq = first_id.setdefault(item.device_id, item.entitlement_seq)
            if eseq != item.entitlement_seq and not _approved_reissue(recon, item):
                recon.violations.append(
                    Violation(
                        "duplicate_device",
                        item.seq,
                        item.device_id,
                        f"also issued under entitlement {eseq} in this export",
                    )
                )
            eseq = first_key.setdefault(item.key_id, item.entitlement_seq)
            if eseq != item.entitlement_seq:
                recon.violations.append(
                    Violation(
                        "duplicate_key",
                        item.seq,
                        item.device_id,
                        f"key also used under entitlement {eseq} in this export",
                    )
                )
    by_id, by_key = store.devices_elsewhere(
        station_id, [(i.device_id, i.key_id, i.entitlement_seq) for i in recon.issued]
    )
    if not by_id and not by_key:
        return
    for item in recon.issued:
        where = by_id.get(item.device_id)
        if where is not None and not (
            where.startswith(f"{station_id} ") and _approved_reissue(recon, item)
        ):
            recon.violations.append(
                Violation("duplicate_device", item.seq, item.device_id, f"also issued by {where}")
            )
        where = by_key.get(item.key_id)
        if where is not None:
            recon.violations.append(
                Violation("duplicate_key", item.seq, item.device_id, f"key also used by {where}")
            )


def _approved_reissue(recon: Reconciliation, item: IssuedEntry) -> bool:
    """A device id this station certified under an earlier entitlement, re-issued under a
    verified ``reissue_device_certificate`` grant of the entitlement it is issued under:
    consume that grant instead of reporting a duplicate."""
    tally = recon.tallies.get(item.entitlement_seq)
    return tally is not None and tally.reconciler.take_reissue(item.seq, item.device_id)


def _persist(
    store: HqStore,
    verified: VerifiedExport,
    chain: ChainHead,
    recon: Reconciliation,
    certs: dict[int, bytes],
    report: IngestReport,
    now: int,
) -> None:
    """Everything in one transaction: head, reconciliation state, devices, the report."""
    sid = verified.station_id
    head = AuditHead(
        next_seq=chain.next_seq,
        head_hash=chain.head_hash,
        last_export=verified.export_number,
        max_time=recon.max_time,
    )
    with store.transaction():
        store.put_audit_head(sid, head, now)
        if recon.time_audit is not None:
            store.put_station_time_audit(sid, recon.time_audit)
        if verified.crl is not None:
            store.put_station_crl(verified.crl)
        for issuer_key_id, row in verified.retired_crls:
            store.put_retired_station_crl(issuer_key_id, row)
        store.put_station_export_key(sid, spki_der(verified.station_ca.public_key()))
        for request_id, eseq, day, extra in recon.allowances:
            store.put_allowance(request_id, sid, eseq, day, extra)
        for request_id, eseq, device_id in recon.reissue_grants:
            store.put_reissue_grant(request_id, sid, eseq, device_id)
        for eseq, tally in recon.tallies.items():
            r = tally.reconciler
            state = ReconState(
                issued=r.issued,
                burned=r.burned,
                last_counter=tally.state.last_counter,
                imported_at_seq=tally.state.imported_at_seq,
            )
            store.put_recon(sid, eseq, state, r.per_day)
            for request_id, audit_seq in r.reissues_used:
                store.use_reissue_grant(request_id, audit_seq)
        store.put_devices(
            DeviceRow(
                i.device_id,
                format(int(i.serial, 16), "x"),
                sid,
                i.entitlement_seq,
                i.key_id,
                i.seq,
                i.time,
                certs.get(int(i.serial, 16)),
            )
            for i in recon.issued
        )
        store.put_ingest(
            station_id=sid,
            export_number=verified.export_number,
            now=now,
            first_seq=verified.start.next_seq,
            next_seq=chain.next_seq,
            records=chain.next_seq - verified.start.next_seq,
            violations=report.violation_count,
            report_json=json.dumps(report.to_map(max_violations=100), sort_keys=True),
        )
