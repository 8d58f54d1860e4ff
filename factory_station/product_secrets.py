"""The entitlement's product secrets at the station: kept encrypted at rest, opened in memory,
wrapped for one device TPM at a time.

What this module owns (``FactoryStation.provision_secrets`` drives it):

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

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import ec

from factory_station.errors import EntitlementImportError
from trustcore import cbor, hpke
from trustcore.device_secrets import MAX_SECRET_BYTES, MIN_SECRET_BYTES
from trustcore.entitlement import EntitlementPolicy
from trustcore.errors import EncodingError
from trustcore.keys import KeyAgreement

__all__ = ["check_payload_secrets", "meta_key", "open_at_rest", "seal_at_rest"]

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
