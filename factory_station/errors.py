"""Errors of the factory station. Everything it raises derives from ``FactoryStationError``
(whose base is the shared ``trustcore.errors.ReasonedError``).

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code)::

    FactoryStationError
    ├── StationStateError       the station's files are missing, corrupt or older than its TPM
    │                           counter (restored from a backup: fail closed)
    ├── EntitlementImportError  an entitlement package was refused (``reason`` says why)
    ├── IssuanceRefused         policy refused one issuance (``reason`` from trustcore.issuance)
    ├── AttestationError        the device could not prove its key lives in its TPM
    └── DeviceError             the device (its TPM) failed or answered nonsense

Errors from the trust core, signers and TPM are chained (``raise ... from exc``).
"""

from __future__ import annotations

from trustcore.errors import ReasonedError


class FactoryStationError(ReasonedError):
    """Root of every error :mod:`factory_station` raises."""


class StationStateError(FactoryStationError):
    reason = "station_state"


class EntitlementImportError(FactoryStationError):
    reason = "entitlement_refused"


class IssuanceRefused(FactoryStationError):
    reason = "policy_refused"


class AttestationError(FactoryStationError):
    reason = "attestation_failed"


class DeviceError(FactoryStationError):
    reason = "device_error"
