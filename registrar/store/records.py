"""The values the registrar store reads and writes (frozen; no I/O here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trustcore.identity import CertSerial, DeviceId, StationId

__all__ = [
    "CHANGE_KINDS",
    "CertificateRecord",
    "Change",
    "DeviceRecord",
    "Event",
    "FactorySighting",
    "Lookup",
    "PendingApproval",
    "Registration",
    "RenewalLookup",
    "Statements",
]


@dataclass(frozen=True, slots=True)
class Registration:
    """Everything one successful registration writes, in one transaction."""

    device_id: DeviceId
    station_id: StationId | None
    idevid_serial: CertSerial
    ldevid_serial: CertSerial
    ldevid_der: bytes
    ldevid_key_id: bytes
    wrap_key_der: bytes
    payload_key_id: bytes
    request_digest: bytes
    response: bytes
    nonce: bytes
    request_time: int
    at: int
    #: "registration" (IDevID, ``registrations`` + 1) or "renewal" (LDevID, same device row).
    kind: str = "registration"
    ldevid_not_after: int | None = None


@dataclass(frozen=True, slots=True)
class FactorySighting:
    """A chain-valid factory certificate seen in a registration request (first sighting)."""

    station_id: StationId
    serial: CertSerial
    device_id: DeviceId
    der: bytes = field(repr=False)
    first_seen: int


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One LDevID in a device's chain of certificates (times: unix seconds or None)."""

    serial: CertSerial
    device_id: DeviceId
    kind: str
    issued_at: int | None
    not_after: int | None
    superseded_at: int | None
    revoked_at: int | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "superseded" if self.superseded_at is not None else "current"


@dataclass(frozen=True, slots=True)
class RenewalLookup:
    """What the store knows about a device for a renewal decision."""

    current_serial: CertSerial | None
    status: str
    superseded: frozenset[CertSerial]
    issued_at: int | None


@dataclass(frozen=True, slots=True)
class Event:
    time: int
    device_id: str | None
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Statements:
    """Ad-hoc statements that commit together or not at all (one queued write)."""

    statements: tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the store knows about a request before the decision."""

    response: bytes | None
    nonce_seen: bool
    key_owner: DeviceId | None
    #: The device's record before this request (``lookup(..., device_id=...)`` only).
    previous_serial: CertSerial | None = None
    previous_status: str | None = None
    previous_ldevid_der: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PendingApproval:
    """A device an admission plugin held for the installer (``registrar pending``)."""

    device_id: DeviceId
    station_id: StationId | None
    idevid_serial: CertSerial
    plugin: str
    reason: str
    first_seen: int
    last_seen: int
    attempts: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: DeviceId
    station_id: StationId | None
    idevid_serial: CertSerial
    ldevid_serial: CertSerial
    ldevid_der: bytes = field(repr=False)
    wrap_key_der: bytes = field(repr=False)
    payload_key_id: bytes
    registered_at: int
    registrations: int
    status: str


#: What :meth:`registrar.store.Store.changes` delivers. ``resync``: the feed lost its
#: connection for a while (PostgreSQL restart): changes may have been missed, re-read what
#: matters from the store.
CHANGE_KINDS = frozenset(
    {"registered", "renewed", "revoked", "status", "approved", "payload_key", "resync"}
)


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change another registrar instance may have to act on.

    ``serial``: the new LDevID (registered, renewed); ``detail``: the new status (status),
    the acknowledged key id in hex (payload_key); ``origin``: the instance that wrote it.
    """

    kind: str
    device_id: str | None
    serial: str | None = None
    detail: str = ""
    origin: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {self.kind!r}")

    def encode(self) -> str:
        """The NOTIFY payload (compact JSON, far below PostgreSQL's 8,000-byte limit)."""
        return json.dumps(
            [self.kind, self.device_id, self.serial, self.detail, self.origin],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> Change:
        """Raises ``ValueError`` on anything that is not an encoded change."""
        try:
            kind, device, serial, detail, origin = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a store change: {text[:80]!r}") from exc
        if not all(isinstance(v, str) for v in (kind, detail, origin)) or not all(
            v is None or isinstance(v, str) for v in (device, serial)
        ):
            raise ValueError(f"not a store change: {text[:80]!r}")
        return cls(kind, device, serial, detail, origin)
