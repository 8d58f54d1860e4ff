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

This module only wires and delegates. The shared state and its rules (lock, audit chain,
health, trusted time) are ``factory_station.core``; each duty has its own module:
``entitlement_import`` (entitlements, time statements), ``issuance`` (device ids, checks,
the counter, signing), ``quorum`` (approvals), ``product_secrets`` (secrets for a device
TPM), ``audit_export`` (exports for HQ), ``ca_requests`` (CA renewal and re-key); the
directory layout and ``station.json`` are ``factory_station.config``, the database
``factory_station.store``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory_station import ca_renewal, ca_requests, entitlement_import, quorum
from factory_station.attestation import AttestationVerifier, VerifiedStorageParent
from factory_station.audit_export import AuditExporter
from factory_station.ca_requests import CaImportResult
from factory_station.config import (
    CA_KEY_FILE,
    CONFIG_FILE,
    DB_FILE,
    DEFAULT_NV_INDEX,
    ENROLMENT_FILE,
    LOCK_FILE,
    ROOT_FILE,
    TRANSPORT_KEY_FILE,
    VENDOR_CA_FILE,
    AttestationMode,
    StationConfig,
)
from factory_station.core import Clock, StationCore, write_atomic
from factory_station.entitlement_import import ImportedEntitlement
from factory_station.errors import StationStateError
from factory_station.issuance import IssuedCertificate, Issuer, issuance_state
from factory_station.plugins import LoadedPlugins
from factory_station.product_secrets import SecretProvisioner
from factory_station.store import MonotonicCounter, StationStore
from signers.errors import SignerError, TpmError
from signers.private_files import private_home
from signers.tpm import Tpm, TpmKey, TpmKeyUsage, TpmNvCounter
from signers.tpm_import import SecretImport
from trustcore.csr import build_csr
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import PolicyError
from trustcore.identity import DeviceId, StationId
from trustcore.messages import StationEnrolment
from trustcore.stationtime import TimeAnchor, TpmClockReading
from trustcore.utctime import from_unix

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_NV_INDEX",
    "LOCK_FILE",
    "AttestationMode",
    "CaImportResult",
    "FactoryStation",
    "ImportedEntitlement",
    "IssuedCertificate",
    "StationConfig",
    "StationStatus",
]

log = logging.getLogger(__name__)

CounterWrapper = Callable[[MonotonicCounter], MonotonicCounter]


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StationStateError(f"cannot read certificates from {path}: {exc}") from exc


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


class FactoryStation:
    """One opened station. Use :meth:`init` once, then :meth:`open` (a context manager)."""

    def __init__(self, core: StationCore) -> None:
        self._core = core
        self._issuer = Issuer(core)
        self._secrets = SecretProvisioner(core)
        self._exporter = AuditExporter(core)

    # ------------------------------------------------------------------------- init, open

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
        write_atomic(home / ENROLMENT_FILE, enrolment.encode())
        # Written last: a station directory without station.json is an unfinished init.
        write_atomic(home / CONFIG_FILE, config.to_json().encode())
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
            store.ca_certificates.ensure_table()
            ca_key = ca_renewal.finish_key_switch(home, tpm, store.ca_certificates, ca_key)
            station = cls(
                StationCore(
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
            )
            station._core.recover()
            station._core.load_active()
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
        core = self._core
        with core.lock:
            core.store.close()
            try:
                core.tpm.close()
            except SignerError as exc:
                # The TPM went away (its process died, the bus reset): the error that
                # brought us here, if any, is the one to report, not this one.
                log.warning("station TPM did not close cleanly: %s", exc)
            finally:
                core.lock_file.close()

    def __enter__(self) -> FactoryStation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ parts

    @property
    def home(self) -> Path:
        return self._core.home

    @property
    def config(self) -> StationConfig:
        return self._core.config

    @property
    def tpm(self) -> Tpm:
        return self._core.tpm

    @property
    def ca_key(self) -> TpmKey:
        """The CA key in use (a re-key import replaces it)."""
        return self._core.ca_key

    @property
    def transport_key(self) -> TpmKey:
        return self._core.transport_key

    @property
    def store(self) -> StationStore:
        return self._core.store

    @property
    def root(self) -> x509.Certificate:
        return self._core.root

    @property
    def vendor_cas(self) -> list[x509.Certificate]:
        return self._core.vendor_cas

    @property
    def plugins(self) -> LoadedPlugins:
        return self._core.plugins

    @property
    def station_id(self) -> StationId:
        return self._core.station_id

    @property
    def policy(self) -> EntitlementPolicy | None:
        active = self._core.active
        return None if active is None else active.policy

    @property
    def station_ca_certificate(self) -> x509.Certificate | None:
        active = self._core.active
        return None if active is None else active.station_ca

    def now(self) -> int:
        return self._core.now()

    def trusted_time(self) -> int | None:
        """The latest time the station can vouch for (anchor + TPM-powered time since), as of
        the last TPM reading; None before the first anchor."""
        return self._core.trusted_time()

    # ------------------------------------------------- imports from HQ (entitlement_import)

    def import_entitlement(self, package: bytes) -> ImportedEntitlement:
        """Verify, decrypt (ECDH in the TPM) and store an entitlement; refuse anything
        doubtful with :class:`EntitlementImportError` and change nothing on refusal."""
        with self._core.lock:
            imported = entitlement_import.import_entitlement(self._core, package)
            self._issuer.entitlement_changed()
            return imported

    def import_time_statement(self, package: bytes) -> TimeAnchor:
        """Re-anchor trusted time on an HQ time statement (``hq time-statement``);
        see :func:`factory_station.entitlement_import.import_time_statement`."""
        return entitlement_import.import_time_statement(self._core, package)

    # -------------------------------------------------------------- issuance (issuance)

    def attestation_verifier(self) -> AttestationVerifier | None:
        """A fresh one-shot verifier, or None in the ``unsafe-csr-only`` mode."""
        if self._core.config.attestation == AttestationMode.UNSAFE_CSR_ONLY:
            return None
        vendor_cas = self._core.vendor_cas
        return AttestationVerifier(
            vendor_cas[:1], intermediates=vendor_cas[1:], clock=self._core.clock
        )

    def allocate_device_id(self) -> DeviceId:
        """The next number of the policy's id rule that no issuance (or in-flight
        provisioning) has used. Reserved until :meth:`issue` or :meth:`release_id`."""
        return self._issuer.allocate_device_id()

    def release_id(self, device_id: DeviceId) -> None:
        self._issuer.release_id(device_id)

    def refuse(self, device_id: str, reason: str) -> None:
        """Audit a refusal that happened outside :meth:`issue` (CSR, attestation)."""
        self._issuer.refuse(device_id, reason)

    def check(self, device_id: DeviceId, product: str | None = None) -> None:
        """Run the policy checks without issuing (fail early, before device work)."""
        self._issuer.check(device_id, product)

    def issue(
        self, device_id: DeviceId, public_key: ec.EllipticCurvePublicKey,
        *, product: str | None = None,
    ) -> IssuedCertificate:  # fmt: skip
        """A durable certificate for ``device_id`` (:meth:`Issuer.issue
        <factory_station.issuance.Issuer.issue>`: policy check, intent, NV increment, sign)."""
        return self._issuer.issue(device_id, public_key, product=product)

    def accept_approvals(self, evidence: Sequence[bytes]) -> quorum.QuorumGrant:
        """Verify a quorum bundle and store its grant (:func:`quorum.accept_approvals`)."""
        return quorum.accept_approvals(self._core, evidence)

    # ------------------------------------------------------ product secrets (product_secrets)

    def check_secrets(
        self, device_id: DeviceId, names: Sequence[str] | None, product: str | None = None
    ) -> tuple[str, ...]:
        """The product secrets ``device_id`` gets under the policy (``names=None``: all its
        rules give it); a name outside its rule is refused (audited) with a ``secret_*``
        reason (``trustcore.device_secrets``). Run before device work, like :meth:`check`."""
        return self._secrets.check_secrets(device_id, names, product)

    def provision_secrets(
        self, device_id: DeviceId, parent: VerifiedStorageParent,
        names: Sequence[str] | None = None, *, product: str | None = None,
    ) -> tuple[SecretImport, ...]:  # fmt: skip
        """Wrap the product secrets the policy gives ``device_id`` to its TPM's storage
        primary and audit them (:meth:`SecretProvisioner.provision_secrets`)."""
        return self._secrets.provision_secrets(device_id, parent, names, product=product)

    # ------------------------------------------------------------ audit export (audit_export)

    def export_audit(self) -> tuple[bytes, int]:
        """Seal the records since the last export for HQ; returns the package and its
        export number; call :meth:`record_export` once it is written."""
        return self._exporter.export_audit()

    def record_export(self, number: int) -> None:
        self._exporter.record_export(number)

    def export_audit_to(self, path: Path | str) -> int:
        """Write the export atomically, then record it (a crash in between re-exports the
        same span under the same number; nothing is lost)."""
        return self._exporter.export_audit_to(path)

    # ------------------------------------------------------ CA renewal and re-key (ca_requests)

    def make_ca_request(self, *, rekey: bool) -> bytes:
        """A signed renewal (or ``rekey``) request for HQ (``hq renew-station``)."""
        return ca_requests.make_ca_request(self._core, rekey=rekey)

    def import_ca_certificate(
        self, data: bytes, *, expect_rekey: bool | None = None
    ) -> CaImportResult:
        """Take HQ's answer to :meth:`make_ca_request` (``import-ca``)."""
        return ca_requests.import_ca_certificate(self._core, data, expect_rekey=expect_rekey)

    def station_ca_summary(self) -> dict[str, Any] | None:
        """The CA certificate in use, its key, a pending re-key, retired keys (status)."""
        return ca_requests.station_ca_summary(self._core)

    # --------------------------------------------------------------------------- status

    def time_status(self) -> dict[str, Any]:
        """The station's view of time, for ``status``: host clock, trusted time (None
        without an anchor), the anchor and the TPM reading it was computed from."""
        with self._core.lock:
            problem = None
            try:
                reading: TpmClockReading | None = self._core.read_tpm_clock()
            except PolicyError as exc:
                reading, problem = self._core.reading, exc.reason
            trusted = self.trusted_time()
            return {
                "host_time": self._core.now(),
                "trusted_time": trusted,
                "anchor": None if self._core.anchor is None else self._core.anchor.to_map(),
                "tpm": None if reading is None else reading.to_map(),
                "tpm_powered_ms": None if self._core.ledger is None else self._core.ledger.total_ms,
                "problem": problem,
            }

    def status(self) -> StationStatus:
        with self._core.lock:
            time_info = self.time_status()
            active = self._core.active
            last = self.store.last_export()
            if active is None:
                return StationStatus(
                    self.station_id.value, self.config.tcti, self._core.counter_value, None,
                    0, 0, 0, 0, self.store.audit_count(), None if last is None else last[0],
                    time_info,
                )  # fmt: skip
            now = self._core.now()
            state, _ = issuance_state(self._core, active, "", now)
            p = active.policy
            return StationStatus(
                station_id=self.station_id.value,
                tcti=self.config.tcti,
                counter=self._core.counter_value,
                entitlement={
                    "entitlement_id": p.entitlement_id,
                    "sequence": p.sequence,
                    "product": p.product,
                    "total_quota": p.total_quota,
                    "daily_limit": p.daily_limit,
                    "day_timezone": p.day_timezone,
                    "not_before": from_unix(p.not_before).isoformat(),
                    "not_after": from_unix(p.not_after).isoformat(),
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
