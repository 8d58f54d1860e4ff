"""What every duty of an opened factory station shares, and the rules that guard it.

This module owns :class:`StationCore`: the parts :meth:`FactoryStation.open
<factory_station.station.FactoryStation.open>` wired (TPM, keys, counter, store, pinned
root, clock), the one lock every public station method runs under, the audit chain in memory
(never ahead of the database: :meth:`StationCore.reload_audit` after a failed commit), the
station's health (stopped after an error it cannot judge), the active entitlement decoded
once, the anti-rollback check at open, and trusted time: an HQ-signed anchor plus the TPM's
powered time since, read with TPM2_ReadClock on every decision (``trustcore.stationtime``).

The duties built on it (``entitlement_import``, ``issuance``, ``product_secrets``,
``audit_export``, ``ca_requests``) each take the core; none holds state another needs.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory_station import ca_renewal
from factory_station.config import StationConfig
from factory_station.errors import EntitlementImportError, IssuanceRefused, StationStateError
from factory_station.plugins import LoadedPlugins, load_station_plugins
from factory_station.store import ActiveEntitlement, MonotonicCounter, StationStore
from signers.errors import SignerError, TpmError
from signers.private_files import write_private_file
from signers.tpm import Tpm, TpmKey
from trustcore.audit import AuditLog, ChainHead, FieldValue, record_hash
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import PolicyError, ProfileError
from trustcore.identity import StationId
from trustcore.messages import EntitlementPayload
from trustcore.profiles import station_id_from_certificate
from trustcore.stationtime import (
    TimeAnchor,
    TpmClockReading,
    TpmLedger,
    anchor_at,
    trusted_time,
)
from trustcore.utctime import Clock, aware_utc, from_unix, to_unix

__all__ = [
    "ActiveState",
    "Clock",
    "StationCore",
    "check_station_ca",
    "spki",
    "time_meta",
    "write_atomic",
]

log = logging.getLogger(__name__)

#: The station's host clock is ``trustcore.utctime.Clock`` (an aware UTC ``datetime``, the
#: type of every clock in the project); the station works in whole Unix seconds
#: (:meth:`StationCore.now`) because its policy, audit records and wire formats do.


@dataclass(frozen=True)
class ActiveState:
    """The active entitlement, decoded once."""

    row: ActiveEntitlement
    policy: EntitlementPolicy
    station_ca: x509.Certificate
    audit_receiver: x509.Certificate
    manufacturer: str
    #: The HQ CRL signer named as cRLIssuer in every IDevID (None: an older entitlement).
    crl_issuer: x509.Name | None = None


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def time_meta(ledger: TpmLedger, anchor: TimeAnchor | None = None) -> dict[str, object]:
    """The store's ``meta`` values for the TPM ledger (and a new anchor)."""
    meta: dict[str, object] = {"tpm_ledger": json.dumps(ledger.to_map(), sort_keys=True)}
    if anchor is not None:
        meta["time_anchor"] = json.dumps(anchor.to_map(), sort_keys=True)
    return meta


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (0600): on a full disk the old file stays and no
    temporary file is left behind (``StationStateError`` naming the file)."""
    try:
        write_private_file(path, data, overwrite=True)
    except SignerError as exc:
        raise StationStateError(str(exc)) from exc


def organization(cert_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(cert_der)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = orgs[0].value if orgs else ""
    return value if isinstance(value, str) and value else "unknown manufacturer"


def check_station_ca(
    ca: x509.Certificate, root: x509.Certificate, station_id: StationId, now: int
) -> None:
    """The station CA certificate must be a pathLen-0 CA for this station, signed by the
    pinned root and valid now: the certificate devices will chain through."""

    def refuse(message: str) -> EntitlementImportError:
        return EntitlementImportError(message, reason="wrong_station_ca")

    try:
        ca.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise refuse("the station CA certificate is not signed by the pinned root") from exc
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise refuse("the station CA certificate has no basicConstraints") from exc
    if not bc.ca or bc.path_length != 0:
        raise refuse("the station CA certificate is not a pathLen-0 CA")
    try:
        if station_id_from_certificate(ca) != station_id:
            raise refuse("the station CA certificate names another station")
    except ProfileError as exc:
        raise refuse(f"the station CA certificate has no station id: {exc.message}") from exc
    if not ca.not_valid_before_utc <= from_unix(now) < ca.not_valid_after_utc:
        raise refuse("the station CA certificate is not valid now")


class StationCore:
    """The opened station's parts and shared state (see the module docstring)."""

    def __init__(
        self,
        *,
        home: Path,
        config: StationConfig,
        tpm: Tpm,
        ca_key: TpmKey,
        transport_key: TpmKey,
        counter: MonotonicCounter,
        store: StationStore,
        root: x509.Certificate,
        vendor_cas: list[x509.Certificate],
        clock: Clock,
        lock_file: TextIO,
    ) -> None:
        self.home = home
        self.config = config
        self.tpm = tpm
        self.ca_key = ca_key
        self.transport_key = transport_key
        self.counter = counter
        self.store = store
        self.root = root
        self.vendor_cas = vendor_cas
        self.clock = clock
        self.lock_file = lock_file
        self.lock = threading.RLock()
        #: Why the station stopped (None: healthy); every duty refuses while it is set.
        self.broken: str | None = None
        self.ca_private = ca_key.private_key()
        self.counter_value = counter.read()
        self.audit = AuditLog(config.station_id.value, head=self._stored_head())
        self.active: ActiveState | None = None
        # Trusted time (trustcore.stationtime): the TPM ledger and HQ-vouched anchor.
        self.ledger: TpmLedger | None
        self.anchor: TimeAnchor | None
        self.ledger, self.anchor = store.time_state()
        self.reading: TpmClockReading | None = None
        store.grants.ensure_tables()
        # Built-in checks first, then the configured plugins (which can only add refusals).
        # A configured plugin that cannot be loaded refuses every issuance (fail closed).
        self.plugins: LoadedPlugins = load_station_plugins(config.plugins)
        for problem in self.plugins.problems:
            log.error("station %s: %s: every issuance is refused", config.station_id, problem)

    @property
    def station_id(self) -> StationId:
        return self.config.station_id

    def now(self) -> int:
        """The host clock in whole Unix seconds (believed only up to the trusted time)."""
        return to_unix(aware_utc("the station clock", self.clock(), StationStateError))

    # --------------------------------------------------------------------- audit chain

    def _stored_head(self) -> ChainHead:
        head = self.store.audit_head()
        if head is None:
            return ChainHead()
        seq, record = head
        return ChainHead(next_seq=seq + 1, head_hash=record_hash(record))

    def reload_audit(self) -> None:
        """Re-read the audit head after a failed commit, so memory never runs ahead of disk."""
        self.audit = AuditLog(self.config.station_id.value, head=self._stored_head())

    def next_record(self, event: str, fields: dict[str, FieldValue], now: int) -> tuple[int, bytes]:
        """Append ``event`` to the chain in memory; returns ``(seq, record)`` for the
        caller's transaction (which must :meth:`reload_audit` if it fails)."""
        rec = self.audit.append(event, fields, now)
        return (self.audit.head.next_seq - 1, rec)

    def append_audit(self, event: str, fields: dict[str, FieldValue], now: int) -> None:
        """Append ``event`` and commit it on its own."""
        record = self.next_record(event, fields, now)
        try:
            self.store.append_audit([record])
        except BaseException:
            self.reload_audit()
            raise

    def audit_refusal(
        self, device_id: str, reason: str, reading: TpmClockReading | None = None
    ) -> None:
        fields: dict[str, FieldValue] = {"device_id": device_id, "reason": reason}
        if reading is not None:  # a policy refusal: the TPM reading it was decided on
            fields.update(reading.audit_fields())
        self.append_audit("refused", fields, self.now())

    # ------------------------------------------------------------------ state at open

    def recover(self) -> None:
        """The anti-rollback rule (``store.check_counter``) and its audit, in one transaction."""
        with self.store.transaction():
            recovery = self.store.check_counter(self.counter_value)
            records = []
            for counter, device_id in recovery.burned:
                fields: dict[str, FieldValue] = {
                    "counter": counter,
                    "device_id": device_id,
                    "entitlement_seq": self.store.entitlement_seq_of(counter),
                }
                records.append(self.next_record("slot_burned", fields, self.now()))
            if records:
                self.store.insert_audit(records)
        for counter in recovery.aborted:
            log.warning(
                "recovered: issuance %d was interrupted before the TPM counter moved; "
                "dropped (no slot used)",
                counter,
            )
        for counter, device_id in recovery.burned:
            log.warning(
                "recovered: issuance %d for %s was interrupted after the TPM counter moved; "
                "slot burned and audited (slot_burned)",
                counter,
                device_id,
            )
        if records:
            self.reload_audit()

    def load_active(self) -> None:
        row = self.store.active_entitlement()
        if row is None:
            self.active = None
            return
        payload = EntitlementPayload.decode(row.package)
        self.active = ActiveState(
            row=row,
            policy=payload.policy,
            # The newest certificate for the CA key in use: a renewed or re-keyed one
            # (import-ca) wins over the entitlement's own.
            station_ca=ca_renewal.current_certificate(
                self.store.ca_certificates,
                self.ca_key.public_key(),
                x509.load_der_x509_certificate(payload.station_ca_cert_der),
            ),
            audit_receiver=x509.load_der_x509_certificate(payload.audit_receiver_cert_der),
            manufacturer=organization(payload.station_ca_cert_der),
            crl_issuer=(
                None
                if payload.crl_signer_cert_der is None
                else x509.load_der_x509_certificate(payload.crl_signer_cert_der).subject
            ),
        )

    def require_healthy(self) -> None:
        if self.broken is not None:
            raise StationStateError(f"station stopped after an error: {self.broken}; reopen it")

    def require_entitlement(self) -> ActiveState:
        self.require_healthy()
        if self.active is None:
            raise IssuanceRefused("no entitlement imported", reason="no_entitlement")
        return self.active

    # ------------------------------------------------------------------- trusted time

    def read_tpm_clock(self) -> TpmClockReading:
        """TPM2_ReadClock and the ledger advanced by it (kept in memory, stored with the
        next write). Raises ``PolicyError`` (``tpm_clock_inconsistent``) if the TPM's time
        went back: the ledger then stays where it was until HQ vouches for a time again."""
        try:
            reading = self.tpm.read_clock()
        except TpmError as exc:
            raise StationStateError(f"station TPM: {exc}") from exc
        self.reading = reading
        ledger = self.ledger
        self.ledger = TpmLedger.start(reading) if ledger is None else ledger.advance(reading)
        return reading

    def trusted_time(self) -> int | None:
        """The latest time the station can vouch for (anchor + TPM-powered time since), as of
        the last TPM reading; None before the first anchor."""
        if self.anchor is None or self.ledger is None:
            return None
        return trusted_time(self.anchor, self.ledger)

    def anchor_to(
        self, signed_time: int, now: int, source: str
    ) -> tuple[TpmClockReading, TpmLedger, TimeAnchor]:
        """A new anchor at a time HQ signed (not stored yet). A TPM whose time cannot follow
        the ledger (another boot lineage, a cleared TPM) starts a new ledger here: HQ's
        signature, not the old ledger, vouches for the new anchor."""
        try:
            reading = self.read_tpm_clock()
            ledger, current = self.ledger, self.anchor
        except PolicyError:
            last = self.reading
            assert last is not None  # set by read_tpm_clock before advancing
            reading, ledger, current = last, TpmLedger.start(last), None
        assert ledger is not None
        anchor = anchor_at(
            signed_time=signed_time, host_now=now, ledger=ledger, source=source, current=current
        )
        return reading, ledger, anchor
