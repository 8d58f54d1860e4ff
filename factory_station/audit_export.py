"""Audit export: what the station sends HQ about what it did.

This module owns :class:`AuditExporter`: one sealed package per export, holding the audit
records since the last export, a checkpoint over the chain signed in the TPM by the station
CA key, the manifest of the certificates issued in that span, the station CA's (empty) CRL
and one from each retired CA key, sealed to HQ's audit receiver. An export is recorded only
once its file is written (:meth:`AuditExporter.record_export`): a crash in between
re-exports the same span under the same number, so nothing is lost.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factory_station import ca_renewal
from factory_station.core import StationCore, write_atomic
from factory_station.errors import StationStateError
from signers.tpm import TpmKey
from trustcore.audit import decode_record, encode_export
from trustcore.crl import build_crl
from trustcore.messages import CT_AUDIT_EXPORT, AuditExportPayload
from trustcore.sealed import seal_package
from trustcore.utctime import from_unix

__all__ = ["AuditExporter"]


class AuditExporter:
    """The audit-export duty of one opened station (state: the export prepared, not yet
    recorded)."""

    def __init__(self, core: StationCore) -> None:
        self.core = core
        self._pending: tuple[int, int, int] | None = None

    def export_audit(self) -> tuple[bytes, int]:
        """Seal the records since the last export, a checkpoint signed in the TPM and the
        manifest of certificates issued in that span, to HQ's audit receiver. Returns the
        package and its export number; call :meth:`record_export` once it is written."""
        with self.core.lock:
            active = self.core.require_entitlement()
            now = self.core.now()
            last = self.core.store.last_export()
            number = 1 if last is None else last[0] + 1
            start = 0 if last is None else last[1] + 1
            records = [rec for _, rec in self.core.store.audit_records(start)]
            serials = []
            for raw in records:
                decoded = decode_record(raw)
                if decoded.event == "issued":
                    serials.append(str(decoded.fields["serial"]))
            manifest = self.core.store.certificates_by_serial(serials)
            checkpoint = self.core.audit.make_checkpoint(self.core.ca_key, now)
            payload = AuditExportPayload(
                station_id=self.core.station_id.value,
                entitlement_sequence=active.row.sequence,
                export_number=number,
                audit_export=encode_export(records, checkpoint),
                manifest=tuple(manifest),
                crl=self._station_crl(active.station_ca, number, now),
                retired_crls=self._retired_crls(number, now),
            )
            receiver = active.audit_receiver.public_key()
            assert isinstance(receiver, ec.EllipticCurvePublicKey)  # verified at import
            package = seal_package(
                content_type=CT_AUDIT_EXPORT,
                payload=payload.encode(),
                sender=self.core.ca_key,
                sender_cert=active.station_ca,
                receiver_public=receiver,
                sequence=number,
                created=now,
            )
            self._pending = (number, self.core.audit.head.next_seq - 1, now)
            return package, number

    def _station_crl(self, station_ca: x509.Certificate, number: int, now: int) -> bytes:
        """The station CA's CRL, signed in the TPM. A station never revokes by itself (HQ
        decides revocations and publishes them in its own signed indirect CRL), so the list
        is empty; what matters is that the CA has a CRL, which Mosquitto requires for every
        issuing CA on the registration listener. Valid until the station CA expires: a
        station switched off for years must not make its devices unregistrable, and an
        empty CRL of a CA that never revokes says nothing that can go out of date
        (docs/pki.md, "Station CRLs")."""
        this_update = from_unix(now)
        next_update = station_ca.not_valid_after_utc
        crl = build_crl(
            station_ca,
            self.core.ca_key.private_key(),
            revoked=(),
            crl_number=number,
            this_update=this_update,
            next_update=next_update,
        )
        return crl.public_bytes(serialization.Encoding.DER)

    def _retired_crls(self, number: int, now: int) -> tuple[bytes, ...]:
        """An empty CRL signed by each CA key the station re-keyed away from, so devices
        made under it keep a current CRL at sites. Each key is loaded for this and unloaded
        again (a raw swtpm has three object slots)."""
        out = []
        for path in ca_renewal.retired_key_files(self.core.home):
            self.core.transport_key.unload()
            key = TpmKey.load(self.core.tpm, path)
            try:
                cert = ca_renewal.latest_for_key(self.core.store.ca_certificates, key.public_key())
                if cert is None or cert.not_valid_after_utc <= from_unix(now):
                    continue
                # Valid until the key's certificate ends: the key never revokes anything
                # again (HQ does), so its empty CRL says nothing that can go out of date.
                crl = build_crl(
                    cert,
                    key.private_key(),
                    revoked=(),
                    crl_number=number,
                    this_update=from_unix(now),
                    next_update=cert.not_valid_after_utc,
                )
                out.append(crl.public_bytes(serialization.Encoding.DER))
            finally:
                key.unload()
        return tuple(out)

    def record_export(self, number: int) -> None:
        with self.core.lock:
            pending = self._pending
            if pending is None or pending[0] != number:
                raise StationStateError(f"export {number} was not prepared")
            self.core.store.record_export(*pending)
            self._pending = None

    def export_audit_to(self, path: Path | str) -> int:
        """Write the export atomically, then record it (a crash in between re-exports the
        same span under the same number; nothing is lost)."""
        package, number = self.export_audit()
        write_atomic(Path(path), package)
        self.record_export(number)
        return number
