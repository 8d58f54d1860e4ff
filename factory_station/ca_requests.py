"""Station CA renewal and re-key: the request for HQ and the import of HQ's answer.

This module owns the two flows (``factory-station renew-ca`` and ``import-ca``): a signed
:class:`~trustcore.station_ca_request.StationCaRequest` for the current CA key's
certificate, or for a new CA key created in the TPM now (a re-key); then the certificate HQ
issued, checked against the pinned root, this station and the key it must certify, recorded
with its ``station_ca_imported`` audit record, and (re-key) the switch of issuance,
checkpoints and the station CRL to the new key. The key files and which recorded
certificate is current are :mod:`factory_station.ca_renewal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory_station import ca_renewal
from factory_station.core import StationCore, check_station_ca, spki
from factory_station.errors import EntitlementImportError, StationStateError
from signers.errors import TpmError
from signers.tpm import TpmKey, TpmKeyUsage
from trustcore.audit import FieldValue
from trustcore.csr import build_csr
from trustcore.keys import key_id
from trustcore.station_ca_request import KIND_REKEY, KIND_RENEW, StationCaRequest

__all__ = ["CaImportResult", "import_ca_certificate", "make_ca_request", "station_ca_summary"]


@dataclass(frozen=True)
class CaImportResult:
    """What ``import-ca`` did: ``kind`` is ``renew`` or ``rekey``; ``status`` ``imported``
    or ``already_imported``."""

    kind: str
    status: str
    certificate: x509.Certificate
    previous_serial: str


def make_ca_request(core: StationCore, *, rekey: bool) -> bytes:
    """A signed request for HQ (``hq renew-station``): renewal of the current CA key's
    certificate, or (``rekey``) a new CA key created in the TPM now and kept as the
    pending key until its certificate is imported. A new re-key request replaces an
    earlier pending key. Audited as ``ca_requested``."""
    with core.lock:
        active = core.require_entitlement()
        now = core.now()
        current = active.station_ca
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, core.station_id.value),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, core.station_id.value),
            ]
        )
        new_key: TpmKey | None = None
        try:
            if rekey:
                # Free the slots (both keys reload from their blobs on next use).
                core.transport_key.unload()
                core.ca_key.unload()
                new_key = TpmKey.create(core.tpm, TpmKeyUsage.SIGN)
                new_key.save(core.home / ca_renewal.NEXT_CA_KEY_FILE, overwrite=True)
            csr = build_csr(core.ca_key if new_key is None else new_key, subject)
            request = StationCaRequest.create(
                station_id=core.station_id,
                csr_der=csr,
                current_cert_der=current.public_bytes(serialization.Encoding.DER),
                current_key=core.ca_key,
                new_key=new_key,
                created=now,
            )
        except TpmError as exc:
            raise StationStateError(f"station TPM: {exc}") from exc
        finally:
            if new_key is not None:
                new_key.unload()
        certified = new_key.public_key() if new_key is not None else core.ca_key.public_key()
        core.append_audit(
            "ca_requested",
            {
                "kind": request.kind,
                "request_id": request.request_id,
                "key_id": key_id(certified),
                "current_serial": f"{current.serial_number:x}",
            },
            now,
        )
        return request.encode()


def import_ca_certificate(
    core: StationCore, data: bytes, *, expect_rekey: bool | None = None
) -> CaImportResult:
    """Take HQ's answer to :meth:`make_ca_request`. The certificate must be a station CA
    certificate for this station, signed by the pinned root, valid now, and certify the
    current CA key (renewal) or the pending re-key key. A re-key switches issuance,
    checkpoints and the station CRL to the new key in the same step; the audit chain
    simply continues (record ``station_ca_imported``). Refusals: ``wrong_station_ca``,
    ``key_mismatch``, ``stale_certificate``."""
    with core.lock:
        active = core.require_entitlement()
        now = core.now()
        try:
            cert = (
                x509.load_pem_x509_certificate(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data)
            )
            public = cert.public_key()
        except ValueError as exc:
            raise EntitlementImportError(
                f"the certificate does not parse: {exc}", reason="malformed"
            ) from exc
        check_station_ca(cert, core.root, core.station_id, now)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise EntitlementImportError("not a P-256 key", reason="wrong_station_ca")
        previous = active.station_ca
        public_spki = spki(public)
        pending: TpmKey | None = None
        nxt = core.home / ca_renewal.NEXT_CA_KEY_FILE
        if public_spki == spki(core.ca_key.public_key()):
            kind = KIND_RENEW
        else:
            if nxt.exists():
                core.transport_key.unload()
                pending = TpmKey.load(core.tpm, nxt)
            if pending is None or spki(pending.public_key()) != public_spki:
                if pending is not None:
                    pending.unload()
                raise EntitlementImportError(
                    "the certificate certifies neither the station's CA key nor its "
                    "pending re-key key",
                    reason="key_mismatch",
                )
            kind = KIND_REKEY
        if expect_rekey is not None and expect_rekey != (kind == KIND_REKEY):
            if pending is not None:
                pending.unload()
            raise EntitlementImportError(
                f"expected a {'re-key' if expect_rekey else 'renewal'} certificate, this "
                f"one is a {kind}",
                reason="key_mismatch",
            )
        if cert.serial_number == previous.serial_number:
            if pending is not None:
                pending.unload()
            return CaImportResult(kind, "already_imported", cert, f"{previous.serial_number:x}")
        if kind == KIND_RENEW and cert.not_valid_before_utc < previous.not_valid_before_utc:
            raise EntitlementImportError(
                "the certificate is older than the one in use", reason="stale_certificate"
            )
        fields: dict[str, FieldValue] = {
            "kind": kind,
            "serial": f"{cert.serial_number:x}",
            "key_id": key_id(public),
            "previous_serial": f"{previous.serial_number:x}",
            "previous_key_id": key_id(core.ca_key.public_key()),
        }
        record = core.next_record("station_ca_imported", fields, now)
        try:
            with core.store.transaction():
                ca_renewal.record_certificate(core.store.ca_certificates, previous, "previous", now)
                ca_renewal.record_certificate(core.store.ca_certificates, cert, kind, now)
                core.store.insert_audit([record])
        except BaseException:
            core.reload_audit()
            if pending is not None:
                pending.unload()
            raise
        if pending is not None:
            try:
                ca_renewal.switch_keys(core.home, core.ca_key, pending)
            except StationStateError as exc:
                # The database already says "new key": stop; the next open finishes the
                # switch (ca_renewal.finish_key_switch).
                core.broken = f"re-key recorded but key files not switched: {exc.message}"
                raise StationStateError(f"{core.broken}; reopen the station") from exc
            core.ca_key.unload()
            core.ca_key = pending
            core.ca_private = pending.private_key()
        core.load_active()
        return CaImportResult(kind, "imported", cert, f"{previous.serial_number:x}")


def station_ca_summary(core: StationCore) -> dict[str, Any] | None:
    """The CA certificate in use, its key, a pending re-key, retired keys (status)."""
    with core.lock:
        if core.active is None:
            return None
        cert = core.active.station_ca
        return {
            "serial": f"{cert.serial_number:x}",
            "key_id": key_id(core.ca_key.public_key()).hex(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "rekey_pending": (core.home / ca_renewal.NEXT_CA_KEY_FILE).exists(),
            "retired_keys": len(ca_renewal.retired_key_files(core.home)),
        }
