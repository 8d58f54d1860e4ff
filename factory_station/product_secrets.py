"""The entitlement's product secrets at the station: kept encrypted at rest, opened in memory,
wrapped for one device TPM at a time.

What this module owns (:class:`SecretProvisioner`, behind ``FactoryStation.check_secrets``
and ``FactoryStation.provision_secrets``):

* **At rest**: the station stores the entitlement payload *without* its product secrets;
  the secrets are sealed again (HPKE, ``trustcore.hpke``) to the station's own transport
  key, whose private half lives in the station TPM, under meta key
  ``product_secrets.<sequence>``. Opening them costs one TPM2_ECDH_ZGen; the plaintext
  exists only in this process's memory (a copy of ``station.db`` discloses nothing).
* **Import check**: every secret has exactly one rule in the signed policy and vice versa,
  and each value fits a TPM HMAC key (16..64 bytes): refused at import otherwise (reason
  ``bad_secrets``), so a station never holds a secret it could not lawfully provision.
* **Per device**: ``signers.tpm_import.build_secret_import`` wraps a secret to the device
  TPM's storage primary, which the attestation verified
  (``AttestationVerifier.storage_parent``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from factory_station.attestation import VerifiedStorageParent
from factory_station.core import ActiveState, StationCore
from factory_station.errors import (
    EntitlementImportError,
    FactoryStationError,
    IssuanceRefused,
    StationStateError,
)
from signers.errors import TpmError, TpmImportError
from signers.tpm_import import SecretImport, build_secret_import
from trustcore import cbor, hpke
from trustcore.audit import FieldValue
from trustcore.device_secrets import MAX_SECRET_BYTES, MIN_SECRET_BYTES, secrets_for_device
from trustcore.entitlement import EntitlementPolicy, SecretRule
from trustcore.errors import EncodingError, PolicyError, SealedPackageError
from trustcore.identity import DeviceId
from trustcore.keys import KeyAgreement

__all__ = [
    "SecretProvisioner",
    "check_payload_secrets",
    "meta_key",
    "open_at_rest",
    "seal_at_rest",
]

_INFO = b"devtrust/station-product-secrets/v1"


def meta_key(sequence: int) -> str:
    return f"product_secrets.{sequence}"


def check_payload_secrets(policy: EntitlementPolicy, secrets: Mapping[str, bytes]) -> None:
    """Secrets and rules name the same set; every value fits a TPM HMAC key."""
    rules = {r.name for r in policy.secrets}
    if set(secrets) != rules:
        raise EntitlementImportError(
            f"product secrets {sorted(secrets)} and secret rules {sorted(rules)} differ: "
            "every secret needs exactly one rule",
            reason="bad_secrets",
        )
    for name, value in secrets.items():
        if not MIN_SECRET_BYTES <= len(value) <= MAX_SECRET_BYTES:
            raise EntitlementImportError(
                f"secret {name!r} is {len(value)} bytes; a device TPM HMAC key takes "
                f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES}",
                reason="bad_secrets",
            )


def _aad(station_id: str, sequence: int) -> bytes:
    return cbor.encode({"station_id": station_id, "sequence": sequence})


def seal_at_rest(
    transport_public: ec.EllipticCurvePublicKey,
    station_id: str,
    sequence: int,
    secrets: Mapping[str, bytes],
) -> bytes:
    """``secrets`` sealed to the station's own transport key, bound to this entitlement."""
    enc, ct = hpke.seal(
        transport_public,
        cbor.encode(dict(secrets)),
        info=_INFO,
        aad=_aad(station_id, sequence),
    )
    return enc + ct


def open_at_rest(
    transport_key: KeyAgreement, station_id: str, sequence: int, sealed: bytes
) -> dict[str, bytes]:
    """Open what :func:`seal_at_rest` wrote (one ECDH in the station TPM)."""
    plain = hpke.open_(
        transport_key,
        sealed[: hpke.ENC_LENGTH],
        sealed[hpke.ENC_LENGTH :],
        info=_INFO,
        aad=_aad(station_id, sequence),
    )
    m = cbor.map_of(cbor.decode(plain, max_size=len(plain)), "product secrets")
    if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in m.items()):
        raise EncodingError("product secrets map names to byte strings")
    return dict(m)


class SecretProvisioner:
    """The product-secret duty of one opened station (state: the opened secrets of the
    active entitlement, in memory only, never written)."""

    def __init__(self, core: StationCore) -> None:
        self.core = core
        self._cache: dict[int, dict[str, bytes]] = {}

    def check_secrets(
        self, device_id: DeviceId, names: Sequence[str] | None, product: str | None = None
    ) -> tuple[str, ...]:
        """The product secrets ``device_id`` gets under the policy (``names=None``: all its
        rules give it); a name outside its rule is refused (audited) with a ``secret_*``
        reason (``trustcore.device_secrets``). Run before device work, like :meth:`check`."""
        with self.core.lock:
            active = self.core.require_entitlement()
            rules = self._secret_rules(active, device_id, names, product)
            return tuple(r.name for r in rules)

    def _secret_rules(
        self,
        active: ActiveState,
        device_id: DeviceId,
        names: Sequence[str] | None,
        product: str | None,
    ) -> tuple[SecretRule, ...]:
        if names is None and not active.policy.secrets:
            return ()  # the common case: no product secrets, no database read
        # Judged at the latest time ever recorded: setting the clock back cannot reopen a
        # secret whose provisioning period ended.
        when = max(self.core.now(), self.core.store.latest_time())
        try:
            return secrets_for_device(
                active.policy, device_id.value, product or active.policy.product, when, names
            )
        except PolicyError as exc:
            self.core.audit_refusal(device_id.value, exc.reason)
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
        with self.core.lock:
            active = self.core.require_entitlement()
            if not self.core.store.device_issued(device_id.value):
                self.core.audit_refusal(device_id.value, "secret_device_not_issued")
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
            now = self.core.now()
            records = []
            for rule in rules:
                fields: dict[str, FieldValue] = {
                    "device_id": device_id.value,
                    "secret": rule.name,
                    "product": product or active.policy.product,
                    "entitlement_seq": active.row.sequence,
                    "parent": parent.name,
                }
                records.append(self.core.next_record("secret_provisioned", fields, now))
            try:
                self.core.store.append_audit(records)
            except BaseException:
                self.core.reload_audit()
                raise
            return blobs

    def _secret_values(self, active: ActiveState) -> dict[str, bytes]:
        seq = active.row.sequence
        cached = self._cache.get(seq)
        if cached is not None:
            return cached
        sealed = self.core.store.get_meta(meta_key(seq))
        if not isinstance(sealed, bytes):
            raise StationStateError(f"the product secrets of entitlement {seq} are missing")
        try:
            values = open_at_rest(self.core.transport_key, self.core.station_id.value, seq, sealed)
        except (SealedPackageError, EncodingError) as exc:
            raise StationStateError(f"cannot open the stored product secrets: {exc}") from exc
        except TpmError as exc:
            raise StationStateError(f"TPM ECDH failed: {exc}") from exc
        self._cache = {seq: values}
        return values
