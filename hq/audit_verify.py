"""Steps 1-5 of ``hq ingest-audit`` (:mod:`hq.audit_ingest`): is this export the next piece of
this station's authentic log? Owns the refusal reasons, the sender check (station CA
certificate issued by this HQ to an enrolled station for its enrolled key), opening the
sealed package, the payload and checkpoint checks, the station CRLs the export carries, and
:class:`ChainStream`, which verifies the hash chain while the records stream on (decoded by
:mod:`hq.audit_chunks`). A refusal raises :class:`hq.errors.ExportRefusedError`; nothing
here writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hq.audit_chunks import IssuedColumns, decode_chunks
from hq.errors import ExportRefusedError
from hq.store import AuditHead, HqStore, StationCrlRow
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
from trustcore.keys import KeyAgreement, spki_der
from trustcore.messages import CT_AUDIT_EXPORT, AuditExportPayload
from trustcore.profiles import station_id_from_certificate
from trustcore.sealed import DEFAULT_MAX_SIZE, open_package, parse_package

__all__ = ["REFUSAL_REASONS", "ChainStream", "VerifiedExport", "refuse", "verify_audit_package"]

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


def refuse(reason: str, message: str) -> ExportRefusedError:
    """The one way an export is refused: ``reason`` is one of :data:`REFUSAL_REASONS`."""
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
        raise refuse("foreign_station", f"sender is not a station CA: {exc.message}") from exc
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise refuse(
            "foreign_station", f"sender certificate of {station_id!r} is not issued by this HQ"
        ) from exc
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError) as exc:
        raise refuse("foreign_station", "sender certificate is not a CA certificate") from exc
    if not bc.ca or bc.path_length != 0:
        raise refuse("foreign_station", "sender certificate is not a station CA certificate")
    station = store.station(station_id)
    if station is None:
        raise refuse("foreign_station", f"station {station_id!r} is not enrolled at this HQ")
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The current CA key, or one the station re-keyed away from (hq.station_ca): an export
    # written before a re-key and carried to HQ after it is still the station's own log —
    # until HQ accepted one signed by a newer key (HqStore.station_export_keys).
    if spki not in store.station_export_keys(station_id):
        closed = spki in store.station_ca_keys(station_id)
        raise refuse(
            "foreign_station",
            f"sender key of station {station_id!r} was superseded by a re-key and the station "
            "already exports with its new key"
            if closed
            else f"sender key is not the enrolled CA key of station {station_id!r}",
        )
    if not store.station_ca_issued(station_id, cert.public_bytes(serialization.Encoding.DER)):
        raise refuse(
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
        parsed = parse_package(package, max_size=max_size)  # once: peek and open read it
        header = parsed.header
        if header.content_type != CT_AUDIT_EXPORT:
            raise refuse(
                "wrong_content_type", f"package is {header.content_type!r}, not an audit export"
            )
        cert = header.sender_certificate()
    except SealedPackageError as exc:
        raise refuse(exc.reason, f"package refused: {exc.args[0]}") from exc
    station_id = _check_station_ca(cert, root_cert, store)
    start = store.audit_head(station_id)
    try:
        opened = open_package(
            parsed,
            receiver=audit_key,
            expected_content_type=CT_AUDIT_EXPORT,
            trusted_sender_public=cert.public_key(),  # type: ignore[arg-type]
            last_sequence=start.last_export,
            max_size=max_size,
        )
    except ReplayError as exc:
        raise refuse(
            "replayed",
            f"export {header.sequence} of {station_id} is not newer than the last accepted "
            f"export {start.last_export}",
        ) from exc
    except SealedPackageError as exc:
        raise refuse(exc.reason, f"package refused: {exc.args[0]}") from exc
    del parsed  # the ciphertext copy (as large as the export)
    try:
        payload = AuditExportPayload.decode(opened.payload, max_size=max_size)
    except EncodingError as exc:
        raise refuse("malformed", f"audit export payload: {exc.message}") from exc
    if payload.station_id != station_id:
        raise refuse(
            "wrong_station",
            f"export claims station {payload.station_id!r} but is signed by {station_id!r}",
        )
    if payload.export_number != header.sequence:
        raise refuse("malformed", "export number differs from the signed package sequence")
    try:
        export = decode_export(payload.audit_export, max_size=max_size)
        checkpoint = verify_checkpoint(
            export.checkpoint,
            station_id=station_id,
            station_public=cert.public_key(),  # type: ignore[arg-type]
        )
    except AuditChainError as exc:
        raise refuse(exc.reason, f"audit export of {station_id}: {exc.args[0]}") from exc
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
    raise refuse("bad_crl", "a retired-key CRL in the export does not verify")


def _station_crl(
    der: bytes, station_ca: x509.Certificate, store: HqStore, station_id: str
) -> StationCrlRow | None:
    """The station CA's CRL carried by the export: it must verify against the sender's CA
    certificate (a bad one refuses the whole export: the package is signed, so it was made
    so by the station). An older CRL than the one held is ignored, never stored."""
    try:
        revocations = verify_crl(der, station_ca, now=None)
    except CrlError as exc:
        raise refuse(
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
    docs/hq.md). The per-record checks are the very same (``trustcore.audit.decode_chain``,
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

    def __iter__(self) -> Iterator[IssuedColumns | AuditRecord]:
        """The verified records in order, decoded once (``hq.audit_chunks``: well-formed
        ``issued`` records as runs by column, every other record as it is; decoded by
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
            raise refuse(exc.reason, f"audit chain of {v.station_id}: {exc.args[0]}") from exc
        # Fail closed should the two verifiers ever disagree.
        raise refuse("malformed", "the audit chain failed a check that verify_export passed")
