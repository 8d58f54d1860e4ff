"""The HQ store's values: one frozen dataclass per kind of row (pure: no database here)."""

from __future__ import annotations

from dataclasses import dataclass

from trustcore.audit import ZERO_HASH
from trustcore.entitlement import EntitlementPolicy

__all__ = [
    "ApproverRow",
    "AuditHead",
    "DeviceRow",
    "EntitlementRow",
    "ReconState",
    "SiteRow",
    "StationCrlRow",
    "StationRow",
    "StoredPayloadKey",
]


@dataclass(frozen=True)
class SiteRow:
    site_id: str
    ca_public_der: bytes
    transport_public_der: bytes
    csr_der: bytes
    site_ca_der: bytes
    enrolled_at: int


@dataclass(frozen=True)
class StoredPayloadKey:
    """A site payload key as HQ stores it: HPKE-sealed to the HQ KMS key (never in clear)."""

    site_id: str
    key_id: bytes
    created: int
    enc: bytes
    ct: bytes
    current: bool


@dataclass(frozen=True)
class StationCrlRow:
    station_id: str
    crl_number: int
    this_update: int
    next_update: int
    crl_der: bytes
    recorded_at: int


@dataclass(frozen=True)
class StationRow:
    station_id: str
    ca_public_der: bytes
    transport_public_der: bytes
    csr_der: bytes
    enrolled_at: int
    generation: int


@dataclass(frozen=True)
class EntitlementRow:
    station_id: str
    sequence: int
    entitlement_id: str
    policy: EntitlementPolicy
    station_ca_der: bytes
    station_ca_serial: str
    issued_at: int


@dataclass(frozen=True)
class AuditHead:
    """What HQ accepted last from a station (a new station: seq 0, zero hash, no export)."""

    next_seq: int = 0
    head_hash: bytes = ZERO_HASH
    last_export: int | None = None
    max_time: int = 0


@dataclass
class ReconState:
    """Reconciliation state of one entitlement carried across exports."""

    issued: int = 0
    burned: int = 0
    last_counter: int = -1
    imported_at_seq: int | None = None


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    serial: str
    station_id: str
    entitlement_seq: int
    key_id: bytes
    audit_seq: int
    issued_time: int
    certificate: bytes | None


@dataclass(frozen=True)
class ApproverRow:
    """One HQ approver: key id, unique name, public key (SPKI DER), when added."""

    key_id: bytes
    name: str
    public_der: bytes
    added_at: int
