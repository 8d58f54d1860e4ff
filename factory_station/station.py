"""The factory station service: its TPM keys, its counter, its database, its audit log.

This is the station's composition root. :meth:`FactoryStation.open` wires the parts (a
:class:`~signers.tpm.Tpm` reached through the configured TCTI, the station CA key and the
transport key inside it, the TPM NV counter, the SQLite :class:`StationStore`, the pinned
root certificate, the clock) and checks that files and TPM agree before anything else
happens; tests and benchmarks inject a clock or wrap the counter here, never inside the
package. The injected clock is the *host* clock: it is believed only up to the trusted time
(an HQ-signed anchor plus TPM-powered time since, read with TPM2_ReadClock on every
decision; ``trustcore.stationtime``), so a test that moves it must move the TPM's clock too.

Station directory (``--home``)::

    station.json            typed configuration (station id, TCTI, NV index, attestation mode,
                            enabled issuance plugins: factory_station.plugins)
    root.pem                the manufacturer root certificate, pinned at init
    tpm-vendor-ca.pem       TPM-vendor CA certificates for EK-certificate checks (optional)
    station-ca.tss.pem      station CA key: a TPM-wrapped blob, useless outside this TPM
    station-ca.next.tss.pem a re-key's new CA key until its certificate is imported;
    station-ca.retired-*    CA keys re-keyed away from, which sign only their CRL
                            (both: factory_station.ca_renewal)
    transport.tss.pem       transport (ECDH) key: a TPM-wrapped blob, for entitlements
    enrolment.cbor          the enrolment request for HQ (CSR + transport key, bound)
    station.db              SQLite: entitlements, issuances, audit log, exports
    station.lock            one station process at a time

Every public method runs under one lock: the batch provisioner calls :meth:`issue` from
worker threads while device-side work overlaps in other threads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory_station import ca_renewal, product_secrets
from factory_station import quorum as quorum_grants
from factory_station.attestation import AttestationVerifier, VerifiedStorageParent
from factory_station.errors import (
    EntitlementImportError,
    FactoryStationError,
    IssuanceRefused,
    StationStateError,
)
from factory_station.plugins import LoadedPlugins, load_station_plugins
from factory_station.store import ActiveEntitlement, MonotonicCounter, StationStore
from signers.errors import SignerError, TpmError, TpmImportError
from signers.private_files import private_home, write_private_file
from signers.tpm import Tpm, TpmKey, TpmKeyUsage, TpmNvCounter
from signers.tpm_import import SecretImport, build_secret_import
from trustcore import cbor
from trustcore.audit import (
    AuditLog,
    ChainHead,
    FieldValue,
    decode_record,
    encode_export,
    record_hash,
)
from trustcore.crl import build_crl
from trustcore.csr import build_csr
from trustcore.device_secrets import secrets_for_device
from trustcore.entitlement import EntitlementPolicy, SecretRule
from trustcore.errors import (
    EncodingError,
    InvalidValueError,
    PolicyError,
    ProfileError,
    ReplayError,
    SealedPackageError,
    TrustCoreError,
    VerificationError,
)
from trustcore.identity import DeviceId, StationId
from trustcore.issuance import IssuanceRequest, IssuanceState, check_issuance
from trustcore.keys import key_id
from trustcore.messages import (
    CT_AUDIT_EXPORT,
    CT_ENTITLEMENT,
    CT_TIME_STATEMENT,
    MAX_ENTITLEMENT_SIZE,
    AuditExportPayload,
    EntitlementPayload,
    StationEnrolment,
    TimeStatement,
)
from trustcore.policy_chain import PluginSetting, plugin_settings
from trustcore.profiles import (
    HqRole,
    issue_factory_certificate,
    station_id_from_certificate,
)
from trustcore.quorum import QuorumError, encode_bundle, parse_evidence, verify_quorum_rule
from trustcore.sealed import open_package, peek, seal_package
from trustcore.station_ca_request import KIND_REKEY, KIND_RENEW, StationCaRequest
from trustcore.stationtime import (
    TimeAnchor,
    TpmClockReading,
    TpmLedger,
    anchor_at,
    trusted_time,
)
from trustcore.verify import ChainVerifier

__all__ = [
    "DEFAULT_NV_INDEX",
    "AttestationMode",
    "CaImportResult",
    "FactoryStation",
    "ImportedEntitlement",
    "IssuedCertificate",
    "StationConfig",
    "StationStatus",
]

DEFAULT_NV_INDEX: Final = 0x01000100
CONFIG_FILE: Final = "station.json"
ROOT_FILE: Final = "root.pem"
VENDOR_CA_FILE: Final = "tpm-vendor-ca.pem"
CA_KEY_FILE: Final = "station-ca.tss.pem"
TRANSPORT_KEY_FILE: Final = "transport.tss.pem"
ENROLMENT_FILE: Final = "enrolment.cbor"
DB_FILE: Final = "station.db"
LOCK_FILE: Final = "station.lock"
#: A sealed entitlement package: the payload limit plus room for header and certificate.
MAX_ENTITLEMENT_PACKAGE: Final = MAX_ENTITLEMENT_SIZE + 64 * 1024
#: A time statement: a few bytes of payload, the header and the signer's certificate.
MAX_TIME_STATEMENT_PACKAGE: Final = 64 * 1024


class AttestationMode:
    """How a device proves its key lives in its TPM.

    ``tpm2-certify`` (default): EK certificate to a vendor CA, credential activation and
    TPM2_Certify (``factory_station.attestation``). ``unsafe-csr-only``: only the CSR's
    self-signature, which proves possession of *a* key, not that it is in a TPM; for TPMs
    without an EK certificate, named ``unsafe`` so nobody picks it by accident.
    """

    CERTIFY: Final = "tpm2-certify"
    UNSAFE_CSR_ONLY: Final = "unsafe-csr-only"
    ALL: Final = frozenset({CERTIFY, UNSAFE_CSR_ONLY})


log = logging.getLogger(__name__)

Clock = Callable[[], int]
CounterWrapper = Callable[[MonotonicCounter], MonotonicCounter]


def _wall_clock() -> int:
    return int(time.time())


@dataclass(frozen=True)
class StationConfig:
    """``station.json``, strictly validated: unknown or missing keys are errors."""

    station_id: StationId
    tcti: str
    nv_index: int
    attestation: str
    #: Enabled issuance plugins in run order (``factory_station.plugins``); optional key.
    plugins: tuple[PluginSetting, ...] = ()

    _KEYS = frozenset({"version", "station_id", "tcti", "nv_index", "attestation"})
    _OPTIONAL = frozenset({"plugins"})

    def __post_init__(self) -> None:
        if not isinstance(self.tcti, str) or not self.tcti:
            raise StationStateError("tcti must be a non-empty string")
        if not 0x01000000 <= self.nv_index <= 0x013FFFFF:
            raise StationStateError(f"NV index 0x{self.nv_index:08x} is not an owner index")
        if self.attestation not in AttestationMode.ALL:
            raise StationStateError(f"unknown attestation mode {self.attestation!r}")

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "version": 1,
            "station_id": self.station_id.value,
            "tcti": self.tcti,
            "nv_index": f"0x{self.nv_index:08x}",
            "attestation": self.attestation,
        }
        if self.plugins:
            doc["plugins"] = [p.to_obj() for p in self.plugins]
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StationConfig:
        try:
            m = json.loads(text)
            if (
                not isinstance(m, dict)
                or not cls._KEYS <= set(m) <= cls._KEYS | cls._OPTIONAL
                or m["version"] != 1
            ):
                raise StationStateError(
                    f"station.json must hold exactly {sorted(cls._KEYS)} "
                    f"(optionally {sorted(cls._OPTIONAL)})"
                )
            return cls(
                station_id=StationId(m["station_id"]),
                tcti=str(m["tcti"]),
                nv_index=int(m["nv_index"], 16),
                attestation=str(m["attestation"]),
                plugins=plugin_settings(m.get("plugins", [])),
            )
        except (ValueError, TypeError, InvalidValueError) as exc:
            raise StationStateError(f"station.json is invalid: {exc}") from exc


@dataclass(frozen=True)
class IssuedCertificate:
    """One factory certificate, durable in the database and the audit log, not yet released."""

    device_id: DeviceId
    certificate: x509.Certificate
    der: bytes
    counter: int
    serial_hex: str
    key_id: bytes
    station_ca: x509.Certificate


@dataclass(frozen=True)
class CaImportResult:
    """What ``import-ca`` did: ``kind`` is ``renew`` or ``rekey``; ``status`` ``imported``
    or ``already_imported``."""

    kind: str
    status: str
    certificate: x509.Certificate
    previous_serial: str


@dataclass(frozen=True)
class ImportedEntitlement:
    policy: EntitlementPolicy
    counter_base: int


@dataclass(frozen=True)
class StationStatus:
    station_id: str
    tcti: str
    counter: int
    entitlement: dict[str, Any] | None
    issued_total: int
    issued_today: int
    burned: int
    remaining: int
    audit_records: int
    last_export: int | None
    #: Trusted time: the anchor, the TPM reading and the ceiling on the host clock.
    time: dict[str, Any] | None = None

    def to_map(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id,
            "tcti": self.tcti,
            "counter": self.counter,
            "entitlement": self.entitlement,
            "issued_total": self.issued_total,
            "issued_today": self.issued_today,
            "burned": self.burned,
            "remaining": self.remaining,
            "audit_records": self.audit_records,
            "last_export": self.last_export,
            "time": self.time,
        }


@dataclass(frozen=True)
class _Active:
    """The active entitlement, decoded once."""

    row: ActiveEntitlement
    policy: EntitlementPolicy
    station_ca: x509.Certificate
    audit_receiver: x509.Certificate
    manufacturer: str
    #: The HQ CRL signer named as cRLIssuer in every IDevID (None: an older entitlement).
    crl_issuer: x509.Name | None = None


def _utc(when: int) -> datetime:
    return datetime.fromtimestamp(when, UTC)


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (0600): on a full disk the old file stays and no
    temporary file is left behind (``StationStateError`` naming the file)."""
    try:
        write_private_file(path, data, overwrite=True)
    except SignerError as exc:
        raise StationStateError(str(exc)) from exc


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StationStateError(f"cannot read certificates from {path}: {exc}") from exc


class FactoryStation:
    """One opened station. Use :meth:`init` once, then :meth:`open` (a context manager)."""

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
        self._counter = counter
        self.store = store
        self.root = root
        self.vendor_cas = vendor_cas
        self._clock = clock
        self._lock_file = lock_file
        self._lock = threading.RLock()
        self._broken: str | None = None
        self._reserved: set[str] = set()
        self._id_cursor: int | None = None
        self._ca_private = ca_key.private_key()
        self._counter_value = counter.read()
        self._audit = AuditLog(config.station_id.value, head=self._stored_head())
        self._active: _Active | None = None
        self._pending_export: tuple[int, int, int] | None = None
        # Trusted time (trustcore.stationtime): the TPM ledger and HQ-vouched anchor.
        self._ledger: TpmLedger | None
        self._anchor: TimeAnchor | None
        self._ledger, self._anchor = store.time_state()
        self._reading: TpmClockReading | None = None
        #: Opened product secrets of the active entitlement (memory only, never written).
        self._secrets_cache: dict[int, dict[str, bytes]] = {}
        quorum_grants.ensure_tables(store.db)
        # Built-in checks first, then the configured plugins (which can only add refusals).
        # A configured plugin that cannot be loaded refuses every issuance (fail closed).
        self.plugins: LoadedPlugins = load_station_plugins(config.plugins)
        for problem in self.plugins.problems:
            log.error("station %s: %s: every issuance is refused", config.station_id, problem)

    # ------------------------------------------------------------------------------- init

    @classmethod
    def init(
        cls,
        home: Path | str,
        *,
        station_id: StationId,
        tcti: str,
        root_pem: bytes,
        nv_index: int = DEFAULT_NV_INDEX,
        vendor_ca_pem: bytes | None = None,
        attestation: str = AttestationMode.CERTIFY,
    ) -> StationEnrolment:
        """Create a station: CA and transport keys inside the TPM, the NV counter, the
        pinned root, the database with its counter floor, and the enrolment for HQ."""
        home = Path(home)
        if (home / CONFIG_FILE).exists():
            raise StationStateError(f"{home} already holds a station")
        try:
            root = x509.load_pem_x509_certificate(root_pem)
        except ValueError as exc:
            raise StationStateError(f"root certificate does not parse: {exc}") from exc
        if attestation == AttestationMode.CERTIFY and not vendor_ca_pem:
            raise StationStateError(
                "tpm2-certify attestation needs the TPM vendor CA certificates "
                "(or choose the unsafe-csr-only mode explicitly)"
            )
        if vendor_ca_pem:
            try:
                x509.load_pem_x509_certificates(vendor_ca_pem)
            except ValueError as exc:
                raise StationStateError(f"TPM vendor CA does not parse: {exc}") from exc
        config = StationConfig(station_id, tcti, nv_index, attestation)
        private_home(home)
        with Tpm(tcti) as tpm:
            ca_key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
            transport = TpmKey.create(tpm, TpmKeyUsage.ECDH)
            counter = TpmNvCounter(tpm, nv_index).define(exist_ok=True)
            floor = counter.read()
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, station_id.value),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, station_id.value),
                ]
            )
            csr = build_csr(ca_key, subject)
            enrolment = StationEnrolment.create(station_id, csr, ca_key, transport.public_key())
            ca_key.save(home / CA_KEY_FILE)
            transport.save(home / TRANSPORT_KEY_FILE)
        (home / ROOT_FILE).write_bytes(root.public_bytes(serialization.Encoding.PEM))
        if vendor_ca_pem:
            (home / VENDOR_CA_FILE).write_bytes(vendor_ca_pem)
        store = StationStore(home / DB_FILE)
        try:
            with store.transaction() as db:
                store.set_meta("counter_floor", floor, db)
                store.set_meta("station_id", station_id.value, db)
        finally:
            store.close()
        _write_atomic(home / ENROLMENT_FILE, enrolment.encode())
        # Written last: a station directory without station.json is an unfinished init.
        _write_atomic(home / CONFIG_FILE, config.to_json().encode())
        return enrolment

    # ------------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls,
        home: Path | str,
        *,
        tcti: str | None = None,
        clock: Clock = _wall_clock,
        wrap_counter: CounterWrapper | None = None,
    ) -> FactoryStation:
        """Open a station, check files against the TPM counter (repairing a crash, refusing
        a rollback) and audit what was repaired. ``tcti`` overrides the configured one."""
        home = Path(home)
        try:
            config = StationConfig.from_json((home / CONFIG_FILE).read_text())
        except OSError as exc:
            raise StationStateError(f"{home} is not a station directory: {exc}") from exc
        if tcti is not None:
            config = dataclasses.replace(config, tcti=tcti)
        try:
            private_home(home)  # station.db, its journal, exports: 0600; directories 0700
        except SignerError as exc:
            raise StationStateError(str(exc)) from exc
        lock_file = (home / LOCK_FILE).open("w")  # held for the station's life
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock_file.close()
            raise StationStateError(f"another process has the station {home} open") from exc
        roots = _load_pem_certs(home / ROOT_FILE)
        vendor = _load_pem_certs(home / VENDOR_CA_FILE) if (home / VENDOR_CA_FILE).exists() else []
        opened: list[Any] = [lock_file]
        try:
            tpm = Tpm(config.tcti)
            opened.append(tpm)
            ca_key = TpmKey.load(tpm, home / CA_KEY_FILE)
            transport = TpmKey.load(tpm, home / TRANSPORT_KEY_FILE)
            counter: MonotonicCounter = TpmNvCounter(tpm, config.nv_index)
            if wrap_counter is not None:
                counter = wrap_counter(counter)
            store = StationStore(home / DB_FILE)
            opened.append(store)
            ca_renewal.ensure_table(store.db)
            ca_key = ca_renewal.finish_key_switch(home, tpm, store.db, ca_key)
            station = cls(
                home=home,
                config=config,
                tpm=tpm,
                ca_key=ca_key,
                transport_key=transport,
                counter=counter,
                store=store,
                root=roots[0],
                vendor_cas=vendor,
                clock=clock,
                lock_file=lock_file,
            )
            station._recover()
            station._load_active()
        except TpmError as exc:
            for thing in reversed(opened):
                thing.close()
            raise StationStateError(f"station TPM: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            # A damaged file is refused before anything writes to it (fail closed: the
            # operator restores or re-initialises; the station never repairs it in place).
            for thing in reversed(opened):
                thing.close()
            raise StationStateError(
                f"station database {home / DB_FILE} is damaged or unreadable: {exc}"
            ) from exc
        except BaseException:
            for thing in reversed(opened):
                thing.close()
            raise
        return station

    def close(self) -> None:
        with self._lock:
            self.store.close()
            try:
                self.tpm.close()
            except SignerError as exc:
                # The TPM went away (its process died, the bus reset): the error that
                # brought us here, if any, is the one to report, not this one.
                log.warning("station TPM did not close cleanly: %s", exc)
            finally:
                self._lock_file.close()

    def __enter__(self) -> FactoryStation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stored_head(self) -> ChainHead:
        head = self.store.audit_head()
        if head is None:
            return ChainHead()
        seq, record = head
        return ChainHead(next_seq=seq + 1, head_hash=record_hash(record))

    def _reload_audit(self) -> None:
        """Re-read the audit head after a failed commit, so memory never runs ahead of disk."""
        self._audit = AuditLog(self.config.station_id.value, head=self._stored_head())

    def _recover(self) -> None:
        """The anti-rollback rule (``store.check_counter``) and its audit, in one transaction."""
        with self.store.transaction():
            recovery = self.store.check_counter(self._counter_value)
            records = []
            for counter, device_id in recovery.burned:
                fields: dict[str, int | str] = {
                    "counter": counter,
                    "device_id": device_id,
                    "entitlement_seq": self.store.entitlement_seq_of(counter),
                }
                rec = self._audit.append("slot_burned", fields, self._clock())
                records.append((self._audit.head.next_seq - 1, rec))
            if records:
                self.store.db.executemany("INSERT INTO audit(seq, record) VALUES (?, ?)", records)
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
            self._reload_audit()

    def _load_active(self) -> None:
        row = self.store.active_entitlement()
        if row is None:
            self._active = None
            return
        payload = EntitlementPayload.decode(row.package)
        self._active = _Active(
            row=row,
            policy=payload.policy,
            # The newest certificate for the CA key in use: a renewed or re-keyed one
            # (import-ca) wins over the entitlement's own.
            station_ca=ca_renewal.current_certificate(
                self.store.db,
                self.ca_key.public_key(),
                x509.load_der_x509_certificate(payload.station_ca_cert_der),
            ),
            audit_receiver=x509.load_der_x509_certificate(payload.audit_receiver_cert_der),
            manufacturer=_organization(payload.station_ca_cert_der),
            crl_issuer=(
                None
                if payload.crl_signer_cert_der is None
                else x509.load_der_x509_certificate(payload.crl_signer_cert_der).subject
            ),
        )

    @property
    def station_id(self) -> StationId:
        return self.config.station_id

    @property
    def policy(self) -> EntitlementPolicy | None:
        return None if self._active is None else self._active.policy

    @property
    def station_ca_certificate(self) -> x509.Certificate | None:
        return None if self._active is None else self._active.station_ca

    def now(self) -> int:
        return self._clock()

    # ---------------------------------------------------------------- entitlement import

    def import_entitlement(self, package: bytes) -> ImportedEntitlement:
        """Verify, decrypt (ECDH in the TPM) and store an entitlement; refuse anything
        doubtful with :class:`EntitlementImportError` and change nothing on refusal."""
        with self._lock:
            self._require_healthy()
            now = self._clock()
            try:
                header = peek(package, max_size=MAX_ENTITLEMENT_PACKAGE)
            except SealedPackageError as exc:
                raise EntitlementImportError(exc.message, reason="malformed") from exc
            sender = self._verify_sender(header.sender_certificate, now)
            try:
                opened = open_package(
                    package,
                    receiver=self.transport_key,
                    expected_content_type=CT_ENTITLEMENT,
                    trusted_sender_public=sender,
                    last_sequence=self.store.last_entitlement_sequence(),
                    max_size=MAX_ENTITLEMENT_PACKAGE,
                )
            except ReplayError as exc:
                raise EntitlementImportError(
                    f"entitlement sequence {header.sequence} is not newer than the last "
                    f"imported ({self.store.last_entitlement_sequence()}): replayed or rolled "
                    "back",
                    reason="replayed",
                ) from exc
            except SealedPackageError as exc:
                raise EntitlementImportError(
                    f"{exc.message}", reason=_SEALED_REASONS.get(exc.reason, "tampered")
                ) from exc
            except TpmError as exc:
                raise StationStateError(f"TPM ECDH failed: {exc}") from exc
            try:
                payload = EntitlementPayload.decode(opened.payload)
            except (EncodingError, InvalidValueError) as exc:
                raise EntitlementImportError(
                    f"entitlement payload does not decode: {exc.message}", reason="malformed"
                ) from exc
            policy = payload.policy
            self._check_payload(payload, header.sequence, now)
            product_secrets.check_payload_secrets(policy, payload.product_secrets)
            meta: dict[str, object] = {}
            if payload.product_secrets:
                # Plaintext secrets never reach the database: sealed to our own TPM key.
                meta[product_secrets.meta_key(policy.sequence)] = product_secrets.seal_at_rest(
                    self.transport_key.public_key(),
                    self.station_id.value,
                    policy.sequence,
                    payload.product_secrets,
                )
            stored = dataclasses.replace(payload, product_secrets={}).encode()
            base = self._counter_value
            # HQ signed this package at header.created: the station's new time anchor.
            reading, ledger, anchor = self._anchor_to(
                header.created, now, f"entitlement {policy.sequence}"
            )
            fields: dict[str, FieldValue] = {
                "entitlement_id": policy.entitlement_id,
                "entitlement_seq": policy.sequence,
                "counter_base": base,
                "signed_time": header.created,
                "anchor_time": anchor.time,
            }
            fields.update(reading.audit_fields(full=True))
            rec = self._audit.append("entitlement_imported", fields, now)
            try:
                self.store.record_entitlement(
                    sequence=policy.sequence,
                    entitlement_id=policy.entitlement_id,
                    policy_cbor=cbor.encode(policy.to_map()),
                    package=stored,
                    imported_at=now,
                    counter_base=base,
                    audit_records=[(self._audit.head.next_seq - 1, rec)],
                    meta=self._time_meta(ledger, anchor) | meta,
                )
            except BaseException:
                self._reload_audit()
                raise
            self._ledger, self._anchor, self._reading = ledger, anchor, reading
            self._load_active()
            self._id_cursor = None
            return ImportedEntitlement(policy=policy, counter_base=base)

    # ---------------------------------------------------------------------- trusted time

    def _read_tpm_clock(self) -> TpmClockReading:
        """TPM2_ReadClock and the ledger advanced by it (kept in memory, stored with the
        next write). Raises ``PolicyError`` (``tpm_clock_inconsistent``) if the TPM's time
        went back: the ledger then stays where it was until HQ vouches for a time again."""
        try:
            reading = self.tpm.read_clock()
        except TpmError as exc:
            raise StationStateError(f"station TPM: {exc}") from exc
        self._reading = reading
        ledger = self._ledger
        self._ledger = TpmLedger.start(reading) if ledger is None else ledger.advance(reading)
        return reading

    def trusted_time(self) -> int | None:
        """The latest time the station can vouch for (anchor + TPM-powered time since), as of
        the last TPM reading; None before the first anchor."""
        if self._anchor is None or self._ledger is None:
            return None
        return trusted_time(self._anchor, self._ledger)

    def _anchor_to(
        self, signed_time: int, now: int, source: str
    ) -> tuple[TpmClockReading, TpmLedger, TimeAnchor]:
        """A new anchor at a time HQ signed (not stored yet). A TPM whose time cannot follow
        the ledger (another boot lineage, a cleared TPM) starts a new ledger here: HQ's
        signature, not the old ledger, vouches for the new anchor."""
        try:
            reading = self._read_tpm_clock()
            ledger, current = self._ledger, self._anchor
        except PolicyError:
            last = self._reading
            assert last is not None  # set by _read_tpm_clock before advancing
            reading, ledger, current = last, TpmLedger.start(last), None
        assert ledger is not None
        anchor = anchor_at(
            signed_time=signed_time, host_now=now, ledger=ledger, source=source, current=current
        )
        return reading, ledger, anchor

    def import_time_statement(self, package: bytes) -> TimeAnchor:
        """Re-anchor trusted time on an HQ time statement (``hq time-statement``): signed by
        the HQ entitlement signer under the pinned root, for this station, newer than any
        statement imported before. Stored with its ``time_anchored`` audit record; refusals
        (``EntitlementImportError`` reasons ``malformed``, ``untrusted_sender``, ``tampered``,
        ``foreign_station``, ``replayed``) change nothing."""
        with self._lock:
            self._require_healthy()
            now = self._clock()
            try:
                header = peek(package, max_size=MAX_TIME_STATEMENT_PACKAGE)
            except SealedPackageError as exc:
                raise EntitlementImportError(exc.message, reason="malformed") from exc
            sender = self._verify_sender(header.sender_certificate, now)
            last = self.store.get_meta("last_time_statement")
            try:
                opened = open_package(
                    package,
                    receiver=None,
                    expected_content_type=CT_TIME_STATEMENT,
                    trusted_sender_public=sender,
                    last_sequence=last if isinstance(last, int) else None,
                    max_size=MAX_TIME_STATEMENT_PACKAGE,
                )
                statement = TimeStatement.decode(opened.payload)
            except ReplayError as exc:
                raise EntitlementImportError(
                    f"time statement {header.sequence} is not newer than the last one ({last})",
                    reason="replayed",
                ) from exc
            except SealedPackageError as exc:
                raise EntitlementImportError(
                    f"{exc.message}", reason=_SEALED_REASONS.get(exc.reason, "tampered")
                ) from exc
            except (EncodingError, InvalidValueError) as exc:
                raise EntitlementImportError(
                    f"time statement does not decode: {exc.message}", reason="malformed"
                ) from exc
            if statement.station_id != self.station_id.value:
                raise EntitlementImportError(
                    f"the time statement is for station {statement.station_id!r}",
                    reason="foreign_station",
                )
            if statement.time != header.created or header.sequence != header.created:
                raise EntitlementImportError(
                    "the time statement's time differs from its signed header", reason="malformed"
                )
            reading, ledger, anchor = self._anchor_to(
                statement.time, now, f"time statement {statement.time}"
            )
            fields: dict[str, FieldValue] = {
                "signed_time": statement.time,
                "anchor_time": anchor.time,
            }
            fields.update(reading.audit_fields(full=True))
            rec = self._audit.append("time_anchored", fields, now)
            try:
                with self.store.transaction() as db:
                    db.execute(
                        "INSERT INTO audit(seq, record) VALUES (?, ?)",
                        (self._audit.head.next_seq - 1, rec),
                    )
                    meta = self._time_meta(ledger, anchor)
                    meta["last_time_statement"] = statement.time
                    for key, value in meta.items():
                        self.store.set_meta(key, value, db)
            except BaseException:
                self._reload_audit()
                raise
            self._ledger, self._anchor, self._reading = ledger, anchor, reading
            return anchor

    @staticmethod
    def _time_meta(ledger: TpmLedger, anchor: TimeAnchor | None = None) -> dict[str, object]:
        meta: dict[str, object] = {"tpm_ledger": json.dumps(ledger.to_map(), sort_keys=True)}
        if anchor is not None:
            meta["time_anchor"] = json.dumps(anchor.to_map(), sort_keys=True)
        return meta

    def _verify_sender(
        self, certificate: Callable[[], x509.Certificate], now: int
    ) -> ec.EllipticCurvePublicKey:
        try:
            cert = certificate()
            ChainVerifier(
                [self.root], required_eku=HqRole.ENTITLEMENT_SIGNER.eku, require_crl=False
            ).verify(cert, now=_utc(now))
        except (VerificationError, SealedPackageError, ValueError, UnsupportedAlgorithm) as exc:
            # ValueError / UnsupportedAlgorithm: cryptography parses some fields lazily (a
            # mangled issuer name or key OID is only noticed when read), and ChainVerifier
            # lets those through.
            raise EntitlementImportError(
                f"the sender is not an HQ entitlement signer under the pinned root: {exc}",
                reason="untrusted_sender",
            ) from exc
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)  # ChainVerifier: P-256 only
        return public

    def _check_payload(self, payload: EntitlementPayload, header_seq: int, now: int) -> None:
        policy = payload.policy
        if policy.station_id != self.station_id.value:
            raise EntitlementImportError(
                f"the entitlement is for station {policy.station_id!r}, this is "
                f"{self.station_id.value!r}",
                reason="foreign_station",
            )
        if policy.sequence != header_seq:
            raise EntitlementImportError(
                f"policy sequence {policy.sequence} differs from the signed package sequence "
                f"{header_seq}",
                reason="malformed",
            )
        if now >= policy.not_after:
            raise EntitlementImportError(
                f"the entitlement's key-use window ended at {_utc(policy.not_after).isoformat()}",
                reason="expired",
            )
        try:
            ca = x509.load_der_x509_certificate(payload.station_ca_cert_der)
        except ValueError as exc:
            raise EntitlementImportError(
                "station CA certificate does not parse", reason="wrong_station_ca"
            ) from exc
        ca_pub = ca.public_key()
        if not isinstance(ca_pub, ec.EllipticCurvePublicKey) or _spki(ca_pub) != _spki(
            self.ca_key.public_key()
        ):
            raise EntitlementImportError(
                "the station CA certificate does not certify this station's TPM key",
                reason="wrong_station_ca",
            )
        _check_station_ca(ca, self.root, self.station_id, now)
        try:
            receiver = x509.load_der_x509_certificate(payload.audit_receiver_cert_der)
            ChainVerifier(
                [self.root], required_eku=HqRole.AUDIT_RECEIVER.eku, require_crl=False
            ).verify(receiver, now=_utc(now))
        except (ValueError, VerificationError) as exc:
            raise EntitlementImportError(
                f"the audit receiver certificate is not valid under the root: {exc}",
                reason="bad_audit_receiver",
            ) from exc
        if payload.crl_signer_cert_der is not None:
            try:
                signer = x509.load_der_x509_certificate(payload.crl_signer_cert_der)
                ChainVerifier(
                    [self.root], required_eku=HqRole.CRL_SIGNER.eku, require_crl=False
                ).verify(signer, now=_utc(now))
            except (ValueError, VerificationError) as exc:
                raise EntitlementImportError(
                    f"the CRL signer certificate is not valid under the root: {exc}",
                    reason="bad_crl_signer",
                ) from exc

    # ------------------------------------------------------------------------- issuance

    def attestation_verifier(self) -> AttestationVerifier | None:
        """A fresh one-shot verifier, or None in the ``unsafe-csr-only`` mode."""
        if self.config.attestation == AttestationMode.UNSAFE_CSR_ONLY:
            return None
        return AttestationVerifier(self.vendor_cas[:1], intermediates=self.vendor_cas[1:])

    def allocate_device_id(self) -> DeviceId:
        """The next number of the policy's id rule that no issuance (or in-flight
        provisioning) has used. Reserved until :meth:`issue` or :meth:`release_id`."""
        with self._lock:
            active = self._require_entitlement()
            rule = active.policy.id_rule
            used = self.store.used_device_ids() | self._reserved
            number = rule.first if self._id_cursor is None else self._id_cursor
            while number <= rule.last:
                candidate = rule.device_id(number)
                number += 1
                if candidate not in used:
                    self._id_cursor = number
                    self._reserved.add(candidate)
                    return DeviceId(candidate)
            raise IssuanceRefused(
                f"no unused device id left in {rule.prefix}{rule.first}..{rule.last}",
                reason="id_out_of_range",
            )

    def release_id(self, device_id: DeviceId) -> None:
        with self._lock:
            self._reserved.discard(device_id.value)
            self._id_cursor = None  # the released number is free again: rescan from first

    def refuse(self, device_id: str, reason: str) -> None:
        """Audit a refusal that happened outside :meth:`issue` (CSR, attestation)."""
        with self._lock:
            self._audit_refusal(device_id, reason)

    def _audit_refusal(
        self, device_id: str, reason: str, reading: TpmClockReading | None = None
    ) -> None:
        fields: dict[str, FieldValue] = {"device_id": device_id, "reason": reason}
        if reading is not None:  # a policy refusal: the TPM reading it was decided on
            fields.update(reading.audit_fields())
        rec = self._audit.append("refused", fields, self._clock())
        try:
            self.store.append_audit([(self._audit.head.next_seq - 1, rec)])
        except BaseException:
            self._reload_audit()
            raise

    def _require_healthy(self) -> None:
        if self._broken is not None:
            raise StationStateError(f"station stopped after an error: {self._broken}; reopen it")

    def _require_entitlement(self) -> _Active:
        self._require_healthy()
        if self._active is None:
            raise IssuanceRefused("no entitlement imported", reason="no_entitlement")
        return self._active

    def _state(self, active: _Active, device_id: str, now: int) -> tuple[IssuanceState, str]:
        latest = self.store.latest_time()
        day = active.policy.day_of(max(now, latest))
        issued_today = self.store.counts(active.row.sequence, day)
        return (
            IssuanceState(
                issued_total=self._counter_value - active.row.counter_base,
                issued_today=issued_today,
                latest_time=latest,
                device_already_issued=self.store.device_issued(device_id),
                approved_operations=quorum_grants.approved_operations(
                    self.store.db, active.policy, active.row.sequence, day, issued_today, device_id
                ),
                trusted_time=self.trusted_time(),
            ),
            day,
        )

    def accept_approvals(self, evidence: Sequence[bytes]) -> quorum_grants.QuorumGrant:
        """Verify a quorum bundle for an operation the entitlement gates and store the
        grant durably with its ``quorum_approved`` audit record (which carries the evidence
        for HQ). Refusals raise :class:`IssuanceRefused` with the quorum reason."""
        with self._lock:
            active = self._require_entitlement()
            policy = active.policy
            now = self._clock()
            day = policy.day_of(max(now, self.store.latest_time()))
            try:
                bundle = parse_evidence(evidence)
                operation = bundle.request.operation
                params = quorum_grants.check_station_params(
                    policy, operation, bundle.request.params, day
                )
                decision = verify_quorum_rule(
                    bundle,
                    policy.quorum_rule(operation),
                    params=params,
                    now=now,
                    used_request_ids=(
                        {bundle.request.request_id}
                        if quorum_grants.grant_used(self.store.db, bundle.request.request_id)
                        else set()
                    ),
                    clock_skew_s=policy.clock_skew_s,
                )
            except QuorumError as exc:
                self._audit_refusal("", f"quorum_{exc.reason}")
                raise IssuanceRefused(
                    f"approvals refused: {exc.message}", reason=exc.reason
                ) from exc
            counted = set(decision.approvers)
            carried = encode_bundle(
                bundle.request, [a for a in bundle.approvals if a.approver in counted]
            )
            fields: dict[str, FieldValue] = {
                "operation": operation,
                "request_id": decision.request_id,
                "approvers": ",".join(a.hex() for a in decision.approvers),
                "entitlement_seq": active.row.sequence,
                "evidence": carried,
            }
            for name in ("day", "extra", "device_id"):
                if name in params:
                    fields[name] = params[name]
            rec = self._audit.append("quorum_approved", fields, now)
            try:
                with self.store.transaction() as db:
                    grant = quorum_grants.record_grant(db, decision, active.row.sequence, now)
                    db.execute(
                        "INSERT INTO audit(seq, record) VALUES (?, ?)",
                        (self._audit.head.next_seq - 1, rec),
                    )
            except QuorumError as exc:
                self._reload_audit()
                raise IssuanceRefused(
                    f"approvals refused: {exc.message}", reason=exc.reason
                ) from exc
            except BaseException:
                self._reload_audit()
                raise
            return grant

    def check(self, device_id: DeviceId, product: str | None = None) -> None:
        """Run the policy checks without issuing (fail early, before device work)."""
        with self._lock:
            active = self._require_entitlement()
            now = self._clock()
            try:
                self._read_tpm_clock()
                state, _ = self._state(active, device_id.value, now)
                check_issuance(
                    active.policy,
                    state,
                    IssuanceRequest(device_id.value, product or active.policy.product, now),
                    self.plugins.checks,
                )
            except PolicyError as exc:
                self._audit_refusal(device_id.value, exc.reason, self._reading)
                raise IssuanceRefused(exc.args[0], reason=exc.reason) from exc

    def issue(
        self,
        device_id: DeviceId,
        public_key: ec.EllipticCurvePublicKey,
        *,
        product: str | None = None,
    ) -> IssuedCertificate:
        """Policy check, then intent → NV increment → sign in the TPM + audit + complete.

        The certificate returned is durable (database and audit log) and may be released.
        A refusal is audited and consumes no counter slot.
        """
        with self._lock:
            try:
                return self._issue(device_id, public_key, product)
            finally:
                self._reserved.discard(device_id.value)

    def _issue(
        self, device_id: DeviceId, public_key: ec.EllipticCurvePublicKey, product: str | None
    ) -> IssuedCertificate:
        active = self._require_entitlement()
        policy = active.policy
        now = self._clock()
        try:
            reading = self._read_tpm_clock()
            state, day = self._state(active, device_id.value, now)
            check_issuance(
                policy,
                state,
                IssuanceRequest(device_id.value, product or policy.product, now),
                self.plugins.checks,
            )
            if (
                not active.station_ca.not_valid_before_utc
                <= _utc(now)
                < (active.station_ca.not_valid_after_utc)
            ):
                raise PolicyError(
                    "the station CA certificate is not valid now", reason="station_ca_expired"
                )
            reissue = self._reissue(active, state.device_already_issued, device_id, public_key)
        except PolicyError as exc:
            self._audit_refusal(device_id.value, exc.reason, self._reading)
            raise IssuanceRefused(exc.args[0], reason=exc.reason) from exc

        before = self._counter_value
        counter = before + 1
        assert self._ledger is not None  # advanced by _read_tpm_clock above
        self.store.record_intent(
            counter, active.row.sequence, device_id.value, day, now, self._time_meta(self._ledger)
        )
        self._increment(counter, before)
        try:
            cert = issue_factory_certificate(
                active.station_ca,
                self._ca_private,
                public_key,
                device_id=device_id,
                manufacturer=active.manufacturer,
                not_before=_utc(now),
                crl_issuer=active.crl_issuer,
            )
        except (TpmError, ProfileError, TrustCoreError) as exc:
            # The slot is consumed but we know no certificate exists: burn it, audited.
            self._burn(counter, device_id.value, active.row.sequence, now)
            raise FactoryStationError(f"signing the certificate failed: {exc}") from exc
        der = cert.public_bytes(serialization.Encoding.DER)
        serial_hex = f"{cert.serial_number:x}"
        kid = key_id(public_key)
        fields: dict[str, FieldValue] = {
            "device_id": device_id.value,
            "serial": serial_hex,
            "key_id": kid,
            "product": product or policy.product,
            "entitlement_seq": active.row.sequence,
            "counter": counter,
        }
        fields.update(reading.audit_fields())
        if reissue is not None:
            fields["reissue_of"] = reissue[0]
        rec = self._audit.append("issued", fields, now)
        try:
            self.store.complete(
                counter,
                serial_hex,
                kid,
                der,
                [(self._audit.head.next_seq - 1, rec)],
                supersedes=None if reissue is None else reissue[0],
                also=None
                if reissue is None
                else lambda db: quorum_grants.consume_grant(db, reissue[1], counter),
            )
        except BaseException as exc:
            self._reload_audit()
            self._broken = f"could not record issuance {counter}: {exc}"
            raise
        return IssuedCertificate(device_id, cert, der, counter, serial_hex, kid, active.station_ca)

    def _reissue(
        self,
        active: _Active,
        already_issued: bool,
        device_id: DeviceId,
        public_key: ec.EllipticCurvePublicKey,
    ) -> tuple[str, bytes] | None:
        """For a device that already has a certificate (the checks let it through only
        under a ``reissue_device_certificate`` grant): the serial it supersedes and the
        grant it consumes. Re-checked here so that a check chain without the duplicate
        check still cannot issue a second current certificate (fail closed), and the key
        must be new: re-issuing for the same key would only mint a second copy."""
        if not already_issued:
            return None
        old = self.store.issued_serial(device_id.value)
        grant = quorum_grants.unused_reissue_grant(
            self.store.db, active.row.sequence, device_id.value
        )
        if old is None or grant is None:
            raise PolicyError(
                f"device {device_id.value} already has a certificate", reason="duplicate_device"
            )
        if self.store.key_used(key_id(public_key)):
            raise PolicyError(
                "a re-issued certificate needs a new device key", reason="duplicate_key"
            )
        return old, grant

    def _increment(self, counter: int, before: int) -> None:
        try:
            value = self._counter.increment()
        except TpmError as exc:
            # Did the increment happen? Ask the TPM; if we cannot tell, stop (fail closed).
            try:
                now_value = self._counter.read()
            except TpmError:
                self._broken = f"TPM counter state unknown after: {exc}"
                raise StationStateError(self._broken) from exc
            if now_value == before:
                self.store.drop_intent(counter)
                raise StationStateError(f"TPM counter increment failed: {exc}") from exc
            value = now_value
        if value != counter:
            self._broken = f"TPM counter moved to {value}, expected {counter}"
            raise StationStateError(self._broken)
        self._counter_value = value

    def _burn(self, counter: int, device_id: str, seq: int, now: int) -> None:
        rec = self._audit.append(
            "slot_burned", {"counter": counter, "device_id": device_id, "entitlement_seq": seq}, now
        )
        try:
            self.store.burn(counter, [(self._audit.head.next_seq - 1, rec)])
        except BaseException:
            self._reload_audit()
            self._broken = f"could not record burned slot {counter}"
            raise

    # ------------------------------------------------------------------- product secrets

    def check_secrets(
        self, device_id: DeviceId, names: Sequence[str] | None, product: str | None = None
    ) -> tuple[str, ...]:
        """The product secrets ``device_id`` gets under the policy (``names=None``: all its
        rules give it); a name outside its rule is refused (audited) with a ``secret_*``
        reason (``trustcore.device_secrets``). Run before device work, like :meth:`check`."""
        with self._lock:
            active = self._require_entitlement()
            rules = self._secret_rules(active, device_id, names, product)
            return tuple(r.name for r in rules)

    def _secret_rules(
        self,
        active: _Active,
        device_id: DeviceId,
        names: Sequence[str] | None,
        product: str | None,
    ) -> tuple[SecretRule, ...]:
        if names is None and not active.policy.secrets:
            return ()  # the common case: no product secrets, no database read
        # Judged at the latest time ever recorded: setting the clock back cannot reopen a
        # secret whose provisioning period ended.
        when = max(self._clock(), self.store.latest_time())
        try:
            return secrets_for_device(
                active.policy, device_id.value, product or active.policy.product, when, names
            )
        except PolicyError as exc:
            self._audit_refusal(device_id.value, exc.reason)
            raise IssuanceRefused(exc.args[0], reason=exc.reason) from exc

    def provision_secrets(
        self,
        device_id: DeviceId,
        parent: VerifiedStorageParent,
        names: Sequence[str] | None = None,
        *,
        product: str | None = None,
    ) -> tuple[SecretImport, ...]:
        """Wrap the product secrets the policy gives ``device_id`` to its TPM's storage
        primary (verified by the attestation that certified its key) and audit one
        ``secret_provisioned`` record per secret. The device must hold a certificate of
        this station. The plaintext is opened in memory (one ECDH in the station TPM per
        entitlement and process) and never written anywhere."""
        with self._lock:
            active = self._require_entitlement()
            if not self.store.device_issued(device_id.value):
                self._audit_refusal(device_id.value, "secret_device_not_issued")
                raise IssuanceRefused(
                    f"device {device_id.value} has no certificate from this station",
                    reason="secret_device_not_issued",
                )
            rules = self._secret_rules(active, device_id, names, product)
            if not rules:
                return ()
            values = self._secret_values(active)
            try:
                blobs = tuple(
                    build_secret_import(parent.public_area, r.name, values[r.name]) for r in rules
                )
            except TpmImportError as exc:
                raise FactoryStationError(f"cannot wrap a product secret: {exc}") from exc
            now = self._clock()
            records = []
            for rule in rules:
                fields: dict[str, FieldValue] = {
                    "device_id": device_id.value,
                    "secret": rule.name,
                    "product": product or active.policy.product,
                    "entitlement_seq": active.row.sequence,
                    "parent": parent.name,
                }
                rec = self._audit.append("secret_provisioned", fields, now)
                records.append((self._audit.head.next_seq - 1, rec))
            try:
                self.store.append_audit(records)
            except BaseException:
                self._reload_audit()
                raise
            return blobs

    def _secret_values(self, active: _Active) -> dict[str, bytes]:
        seq = active.row.sequence
        cached = self._secrets_cache.get(seq)
        if cached is not None:
            return cached
        sealed = self.store.get_meta(product_secrets.meta_key(seq))
        if not isinstance(sealed, bytes):
            raise StationStateError(f"the product secrets of entitlement {seq} are missing")
        try:
            values = product_secrets.open_at_rest(
                self.transport_key, self.station_id.value, seq, sealed
            )
        except (SealedPackageError, EncodingError) as exc:
            raise StationStateError(f"cannot open the stored product secrets: {exc}") from exc
        except TpmError as exc:
            raise StationStateError(f"TPM ECDH failed: {exc}") from exc
        self._secrets_cache = {seq: values}
        return values

    # ---------------------------------------------------------------------- audit export

    def export_audit(self) -> tuple[bytes, int]:
        """Seal the records since the last export, a checkpoint signed in the TPM and the
        manifest of certificates issued in that span, to HQ's audit receiver. Returns the
        package and its export number; call :meth:`record_export` once it is written."""
        with self._lock:
            active = self._require_entitlement()
            now = self._clock()
            last = self.store.last_export()
            number = 1 if last is None else last[0] + 1
            start = 0 if last is None else last[1] + 1
            records = [rec for _, rec in self.store.audit_records(start)]
            serials = []
            for raw in records:
                decoded = decode_record(raw)
                if decoded.event == "issued":
                    serials.append(str(decoded.fields["serial"]))
            manifest = self.store.certificates_by_serial(serials)
            checkpoint = self._audit.make_checkpoint(self.ca_key, now)
            payload = AuditExportPayload(
                station_id=self.station_id.value,
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
                sender=self.ca_key,
                sender_cert=active.station_ca,
                receiver_public=receiver,
                sequence=number,
                created=now,
            )
            self._pending_export = (number, self._audit.head.next_seq - 1, now)
            return package, number

    def _station_crl(self, station_ca: x509.Certificate, number: int, now: int) -> bytes:
        """The station CA's CRL, signed in the TPM. A station never revokes by itself (HQ
        decides revocations and publishes them in its own signed indirect CRL), so the list
        is empty; what matters is that the CA has a CRL, which Mosquitto requires for every
        issuing CA on the registration listener. Valid until the station CA expires: a
        station switched off for years must not make its devices unregistrable, and an
        empty CRL of a CA that never revokes says nothing that can go out of date
        (docs/pki.md, "Station CRLs")."""
        this_update = datetime.fromtimestamp(now, UTC)
        next_update = station_ca.not_valid_after_utc
        crl = build_crl(
            station_ca,
            self.ca_key.private_key(),
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
        for path in ca_renewal.retired_key_files(self.home):
            self.transport_key.unload()
            key = TpmKey.load(self.tpm, path)
            try:
                cert = ca_renewal.latest_for_key(self.store.db, key.public_key())
                if cert is None or cert.not_valid_after_utc <= _utc(now):
                    continue
                # Valid until the key's certificate ends: the key never revokes anything
                # again (HQ does), so its empty CRL says nothing that can go out of date.
                crl = build_crl(
                    cert,
                    key.private_key(),
                    revoked=(),
                    crl_number=number,
                    this_update=_utc(now),
                    next_update=cert.not_valid_after_utc,
                )
                out.append(crl.public_bytes(serialization.Encoding.DER))
            finally:
                key.unload()
        return tuple(out)

    # ------------------------------------------------------------ CA renewal and re-key

    def make_ca_request(self, *, rekey: bool) -> bytes:
        """A signed request for HQ (``hq renew-station``): renewal of the current CA key's
        certificate, or (``rekey``) a new CA key created in the TPM now and kept as the
        pending key until its certificate is imported. A new re-key request replaces an
        earlier pending key. Audited as ``ca_requested``."""
        with self._lock:
            active = self._require_entitlement()
            now = self._clock()
            current = active.station_ca
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, self.station_id.value),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, self.station_id.value),
                ]
            )
            new_key: TpmKey | None = None
            try:
                if rekey:
                    # Free the slots (both keys reload from their blobs on next use).
                    self.transport_key.unload()
                    self.ca_key.unload()
                    new_key = TpmKey.create(self.tpm, TpmKeyUsage.SIGN)
                    new_key.save(self.home / ca_renewal.NEXT_CA_KEY_FILE, overwrite=True)
                csr = build_csr(self.ca_key if new_key is None else new_key, subject)
                request = StationCaRequest.create(
                    station_id=self.station_id,
                    csr_der=csr,
                    current_cert_der=current.public_bytes(serialization.Encoding.DER),
                    current_key=self.ca_key,
                    new_key=new_key,
                    created=now,
                )
            except TpmError as exc:
                raise StationStateError(f"station TPM: {exc}") from exc
            finally:
                if new_key is not None:
                    new_key.unload()
            certified = new_key.public_key() if new_key is not None else self.ca_key.public_key()
            self._append_audit(
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
        self, data: bytes, *, expect_rekey: bool | None = None
    ) -> CaImportResult:
        """Take HQ's answer to :meth:`make_ca_request`. The certificate must be a station CA
        certificate for this station, signed by the pinned root, valid now, and certify the
        current CA key (renewal) or the pending re-key key. A re-key switches issuance,
        checkpoints and the station CRL to the new key in the same step; the audit chain
        simply continues (record ``station_ca_imported``). Refusals: ``wrong_station_ca``,
        ``key_mismatch``, ``stale_certificate``."""
        with self._lock:
            active = self._require_entitlement()
            now = self._clock()
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
            _check_station_ca(cert, self.root, self.station_id, now)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise EntitlementImportError("not a P-256 key", reason="wrong_station_ca")
            previous = active.station_ca
            spki = _spki(public)
            pending: TpmKey | None = None
            nxt = self.home / ca_renewal.NEXT_CA_KEY_FILE
            if spki == _spki(self.ca_key.public_key()):
                kind = KIND_RENEW
            else:
                if nxt.exists():
                    self.transport_key.unload()
                    pending = TpmKey.load(self.tpm, nxt)
                if pending is None or _spki(pending.public_key()) != spki:
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
                "previous_key_id": key_id(self.ca_key.public_key()),
            }
            rec = self._audit.append("station_ca_imported", fields, now)
            try:
                with self.store.transaction() as db:
                    ca_renewal.record_certificate(db, previous, "previous", now)
                    ca_renewal.record_certificate(db, cert, kind, now)
                    db.execute(
                        "INSERT INTO audit(seq, record) VALUES (?, ?)",
                        (self._audit.head.next_seq - 1, rec),
                    )
            except BaseException:
                self._reload_audit()
                if pending is not None:
                    pending.unload()
                raise
            if pending is not None:
                try:
                    ca_renewal.switch_keys(self.home, self.ca_key, pending)
                except StationStateError as exc:
                    # The database already says "new key": stop; the next open finishes the
                    # switch (ca_renewal.finish_key_switch).
                    self._broken = f"re-key recorded but key files not switched: {exc.message}"
                    raise StationStateError(f"{self._broken}; reopen the station") from exc
                self.ca_key.unload()
                self.ca_key = pending
                self._ca_private = pending.private_key()
            self._load_active()
            return CaImportResult(kind, "imported", cert, f"{previous.serial_number:x}")

    def station_ca_summary(self) -> dict[str, Any] | None:
        """The CA certificate in use, its key, a pending re-key, retired keys (status)."""
        with self._lock:
            if self._active is None:
                return None
            cert = self._active.station_ca
            return {
                "serial": f"{cert.serial_number:x}",
                "key_id": key_id(self.ca_key.public_key()).hex(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "rekey_pending": (self.home / ca_renewal.NEXT_CA_KEY_FILE).exists(),
                "retired_keys": len(ca_renewal.retired_key_files(self.home)),
            }

    def _append_audit(self, event: str, fields: dict[str, FieldValue], now: int) -> None:
        rec = self._audit.append(event, fields, now)
        try:
            self.store.append_audit([(self._audit.head.next_seq - 1, rec)])
        except BaseException:
            self._reload_audit()
            raise

    def record_export(self, number: int) -> None:
        with self._lock:
            pending = self._pending_export
            if pending is None or pending[0] != number:
                raise StationStateError(f"export {number} was not prepared")
            self.store.record_export(*pending)
            self._pending_export = None

    def export_audit_to(self, path: Path | str) -> int:
        """Write the export atomically, then record it (a crash in between re-exports the
        same span under the same number; nothing is lost)."""
        package, number = self.export_audit()
        _write_atomic(Path(path), package)
        self.record_export(number)
        return number

    # --------------------------------------------------------------------------- status

    def time_status(self) -> dict[str, Any]:
        """The station's view of time, for ``status``: host clock, trusted time (None
        without an anchor), the anchor and the TPM reading it was computed from."""
        with self._lock:
            problem = None
            try:
                reading: TpmClockReading | None = self._read_tpm_clock()
            except PolicyError as exc:
                reading, problem = self._reading, exc.reason
            trusted = self.trusted_time()
            return {
                "host_time": self._clock(),
                "trusted_time": trusted,
                "anchor": None if self._anchor is None else self._anchor.to_map(),
                "tpm": None if reading is None else reading.to_map(),
                "tpm_powered_ms": None if self._ledger is None else self._ledger.total_ms,
                "problem": problem,
            }

    def status(self) -> StationStatus:
        with self._lock:
            time_info = self.time_status()
            active = self._active
            last = self.store.last_export()
            if active is None:
                return StationStatus(
                    self.station_id.value, self.config.tcti, self._counter_value, None,
                    0, 0, 0, 0, self.store.audit_count(), None if last is None else last[0],
                    time_info,
                )  # fmt: skip
            now = self._clock()
            state, _ = self._state(active, "", now)
            p = active.policy
            return StationStatus(
                station_id=self.station_id.value,
                tcti=self.config.tcti,
                counter=self._counter_value,
                entitlement={
                    "entitlement_id": p.entitlement_id,
                    "sequence": p.sequence,
                    "product": p.product,
                    "total_quota": p.total_quota,
                    "daily_limit": p.daily_limit,
                    "day_timezone": p.day_timezone,
                    "not_before": _utc(p.not_before).isoformat(),
                    "not_after": _utc(p.not_after).isoformat(),
                    "id_range": f"{p.id_rule.device_id(p.id_rule.first)}.."
                    f"{p.id_rule.device_id(p.id_rule.last)}",
                    "counter_base": active.row.counter_base,
                },
                issued_total=state.issued_total,
                issued_today=state.issued_today,
                burned=self.store.burned_count(p.sequence),
                remaining=max(0, p.total_quota - state.issued_total),
                audit_records=self.store.audit_count(),
                last_export=None if last is None else last[0],
                time=time_info,
            )


_SEALED_REASONS = {
    "wrong_receiver": "foreign_station",
    "malformed": "malformed",
    "oversized": "malformed",
    "wrong_content_type": "malformed",
    "not_encrypted": "malformed",
    "bad_signature": "tampered",
    "wrong_sender": "tampered",
    "decrypt_failed": "tampered",
}


def _organization(cert_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(cert_der)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = orgs[0].value if orgs else ""
    return value if isinstance(value, str) and value else "unknown manufacturer"


def _check_station_ca(
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
    if not ca.not_valid_before_utc <= _utc(now) < ca.not_valid_after_utc:
        raise refuse("the station CA certificate is not valid now")
