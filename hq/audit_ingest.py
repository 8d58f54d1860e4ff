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

This module owns the composition (:func:`ingest_audit`) and step 6's storing
(:func:`record_ingest`: duplicates against earlier exports, the report, one transaction).
The steps live by duty: :mod:`hq.audit_verify` (steps 1-5, refusals),
:mod:`hq.audit_chunks` (decoding in worker processes), :mod:`hq.audit_reconcile` (the
records' findings), :mod:`hq.audit_manifest` (the certificates).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from hq.audit_manifest import check_manifest
from hq.audit_reconcile import (
    STATION_TIME_TOLERANCE_S,
    IssuedEntry,
    Reconciliation,
    future_dated,
    reconcile_records,
)
from hq.audit_verify import ChainStream, VerifiedExport, verify_audit_package
from hq.home import HqHome, HqSecrets
from hq.report import IngestReport
from hq.store import AuditHead, DeviceRow, HqStore, ReconState
from trustcore.audit import ChainHead
from trustcore.keys import spki_der
from trustcore.profiles import HqRole
from trustcore.reconcile import Violation
from trustcore.sealed import DEFAULT_MAX_SIZE

__all__ = ["gc_paused", "ingest_audit", "record_ingest"]


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
                    future_dated(verified.checkpoint.seq, verified.checkpoint.time, moment)
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
