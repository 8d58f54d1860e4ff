"""Issuing factory certificates: device ids, the policy checks, the counter, the signature.

This module owns :class:`Issuer`, the station's issuance duty: it hands out unused device
ids of the entitlement's id rule (reserved while a device is being provisioned), runs the
policy checks (``trustcore.issuance.check_issuance`` plus the configured plugins) and then
the crash-safe order of one issuance (``factory_station.store``): intent → TPM NV counter
increment → signature in the TPM + audit record + completion, one transaction each. A
refusal is audited and consumes no counter slot; an error the station cannot judge stops it
(``StationCore.broken``) until it is reopened.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factory_station import quorum
from factory_station.core import ActiveState, StationCore, time_meta
from factory_station.errors import FactoryStationError, IssuanceRefused, StationStateError
from signers.errors import TpmError
from trustcore.audit import FieldValue
from trustcore.errors import PolicyError, ProfileError, TrustCoreError
from trustcore.identity import DeviceId
from trustcore.issuance import IssuanceRequest, IssuanceState, check_issuance
from trustcore.keys import key_id
from trustcore.profiles import issue_factory_certificate
from trustcore.utctime import from_unix

__all__ = ["IssuedCertificate", "Issuer", "issuance_state"]


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


def issuance_state(
    core: StationCore, active: ActiveState, device_id: str, now: int
) -> tuple[IssuanceState, str]:
    """What the policy checks judge an issuance for ``device_id`` on, and its day."""
    latest = core.store.latest_time()
    day = active.policy.day_of(max(now, latest))
    issued_today = core.store.counts(active.row.sequence, day)
    return (
        IssuanceState(
            issued_total=core.counter_value - active.row.counter_base,
            issued_today=issued_today,
            latest_time=latest,
            device_already_issued=core.store.device_issued(device_id),
            approved_operations=quorum.approved_operations(
                core.store.grants,
                active.policy,
                active.row.sequence,
                day,
                issued_today,
                device_id,
            ),
            trusted_time=core.trusted_time(),
        ),
        day,
    )


class Issuer:
    """The issuance duty of one opened station (state: the ids reserved in flight)."""

    def __init__(self, core: StationCore) -> None:
        self.core = core
        self._reserved: set[str] = set()
        self._id_cursor: int | None = None

    def entitlement_changed(self) -> None:
        """A new entitlement (a new id rule): scan for unused ids from its first again."""
        self._id_cursor = None

    def allocate_device_id(self) -> DeviceId:
        """The next number of the policy's id rule that no issuance (or in-flight
        provisioning) has used. Reserved until :meth:`issue` or :meth:`release_id`."""
        with self.core.lock:
            active = self.core.require_entitlement()
            rule = active.policy.id_rule
            store = self.core.store
            number = rule.first if self._id_cursor is None else self._id_cursor
            while number <= rule.last:
                candidate = rule.device_id(number)
                number += 1
                if candidate not in self._reserved and not store.device_id_used(candidate):
                    self._id_cursor = number
                    self._reserved.add(candidate)
                    return DeviceId(candidate)
            raise IssuanceRefused(
                f"no unused device id left in {rule.prefix}{rule.first}..{rule.last}",
                reason="id_out_of_range",
            )

    def release_id(self, device_id: DeviceId) -> None:
        with self.core.lock:
            self._reserved.discard(device_id.value)
            self._id_cursor = None  # the released number is free again: rescan from first

    def refuse(self, device_id: str, reason: str) -> None:
        """Audit a refusal that happened outside :meth:`issue` (CSR, attestation)."""
        with self.core.lock:
            self.core.audit_refusal(device_id, reason)

    def check(self, device_id: DeviceId, product: str | None = None) -> None:
        """Run the policy checks without issuing (fail early, before device work)."""
        with self.core.lock:
            active = self.core.require_entitlement()
            now = self.core.now()
            try:
                self.core.read_tpm_clock()
                state, _ = issuance_state(self.core, active, device_id.value, now)
                check_issuance(
                    active.policy,
                    state,
                    IssuanceRequest(device_id.value, product or active.policy.product, now),
                    self.core.plugins.checks,
                )
            except PolicyError as exc:
                self.core.audit_refusal(device_id.value, exc.reason, self.core.reading)
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
        with self.core.lock:
            try:
                return self._issue(device_id, public_key, product)
            finally:
                self._reserved.discard(device_id.value)

    def _issue(
        self, device_id: DeviceId, public_key: ec.EllipticCurvePublicKey, product: str | None
    ) -> IssuedCertificate:
        active = self.core.require_entitlement()
        policy = active.policy
        now = self.core.now()
        try:
            reading = self.core.read_tpm_clock()
            state, day = issuance_state(self.core, active, device_id.value, now)
            check_issuance(
                policy,
                state,
                IssuanceRequest(device_id.value, product or policy.product, now),
                self.core.plugins.checks,
            )
            if (
                not active.station_ca.not_valid_before_utc
                <= from_unix(now)
                < (active.station_ca.not_valid_after_utc)
            ):
                raise PolicyError(
                    "the station CA certificate is not valid now", reason="station_ca_expired"
                )
            reissue = self._reissue(active, state.device_already_issued, device_id, public_key)
        except PolicyError as exc:
            self.core.audit_refusal(device_id.value, exc.reason, self.core.reading)
            raise IssuanceRefused(exc.args[0], reason=exc.reason) from exc

        before = self.core.counter_value
        counter = before + 1
        assert self.core.ledger is not None  # advanced by read_tpm_clock above
        self.core.store.record_intent(
            counter, active.row.sequence, device_id.value, day, now, time_meta(self.core.ledger)
        )
        self._increment(counter, before)
        try:
            cert = issue_factory_certificate(
                active.station_ca,
                self.core.ca_private,
                public_key,
                device_id=device_id,
                manufacturer=active.manufacturer,
                not_before=from_unix(now),
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
        record = self.core.next_record("issued", fields, now)
        try:
            self.core.store.complete(
                counter,
                serial_hex,
                kid,
                der,
                [record],
                supersedes=None if reissue is None else reissue[0],
                also=None
                if reissue is None
                else lambda: quorum.consume_grant(self.core.store.grants, reissue[1], counter),
            )
        except BaseException as exc:
            self.core.reload_audit()
            self.core.broken = f"could not record issuance {counter}: {exc}"
            raise
        return IssuedCertificate(device_id, cert, der, counter, serial_hex, kid, active.station_ca)

    def _reissue(
        self,
        active: ActiveState,
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
        old = self.core.store.issued_serial(device_id.value)
        grant = quorum.unused_reissue_grant(
            self.core.store.grants, active.row.sequence, device_id.value
        )
        if old is None or grant is None:
            raise PolicyError(
                f"device {device_id.value} already has a certificate", reason="duplicate_device"
            )
        if self.core.store.key_used(key_id(public_key)):
            raise PolicyError(
                "a re-issued certificate needs a new device key", reason="duplicate_key"
            )
        return old, grant

    def _increment(self, counter: int, before: int) -> None:
        try:
            value = self.core.counter.increment()
        except TpmError as exc:
            # Did the increment happen? Ask the TPM; if we cannot tell, stop (fail closed).
            try:
                now_value = self.core.counter.read()
            except TpmError:
                self.core.broken = f"TPM counter state unknown after: {exc}"
                raise StationStateError(self.core.broken) from exc
            if now_value == before:
                self.core.store.drop_intent(counter)
                raise StationStateError(f"TPM counter increment failed: {exc}") from exc
            value = now_value
        if value != counter:
            self.core.broken = f"TPM counter moved to {value}, expected {counter}"
            raise StationStateError(self.core.broken)
        self.core.counter_value = value

    def _burn(self, counter: int, device_id: str, seq: int, now: int) -> None:
        record = self.core.next_record(
            "slot_burned", {"counter": counter, "device_id": device_id, "entitlement_seq": seq}, now
        )
        try:
            self.core.store.burn(counter, [record])
        except BaseException:
            self.core.reload_audit()
            self.core.broken = f"could not record burned slot {counter}"
            raise
