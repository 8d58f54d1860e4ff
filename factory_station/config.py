"""The station directory's layout and its typed configuration (``station.json``).

This module owns the file names of a station directory (see
:mod:`factory_station.station` for what each holds), :class:`StationConfig` (strictly
validated: unknown or missing keys are errors) and the attestation modes it can name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from factory_station.errors import StationStateError
from trustcore.errors import InvalidValueError
from trustcore.identity import StationId
from trustcore.policy_chain import PluginSetting, plugin_settings

__all__ = [
    "CA_KEY_FILE",
    "CONFIG_FILE",
    "DB_FILE",
    "DEFAULT_NV_INDEX",
    "ENROLMENT_FILE",
    "LOCK_FILE",
    "ROOT_FILE",
    "TRANSPORT_KEY_FILE",
    "VENDOR_CA_FILE",
    "AttestationMode",
    "StationConfig",
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
