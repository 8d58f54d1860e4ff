"""Errors of the site registrar. Everything it raises derives from ``RegistrarError`` (whose
base is the shared ``trustcore.errors.ReasonedError``).

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code); classes outside this module carry their module in brackets::

    RegistrarError
    ├── ConfigError          the site configuration is missing, malformed or inconsistent
    ├── CommissionError      a site bundle was refused (``reason`` says why)
    ├── BrokerError          the broker could not be started, reloaded or commanded
    │   └── MqttSessionError the registrar's MQTT session could not open, broke its
    │                        protocol, or ended [mqtt_session]
    ├── StoreError           the registrar database failed
    │   └── StoreConflict    a write the database refused as a duplicate (the same request,
    │                        nonce or serial committed already, e.g. by another instance)
    ├── RolloverError        a site CA rollover step was refused (``ca_in_use``, ...)
    ├── RegistrationRefused  one device's registration was refused (``reason`` is the public
    │                        reason code sent to the device; details go to the log only)
    └── RevocationError      a revocation or a revocation-list import could not be done
                             [revocation]
"""

from __future__ import annotations

from trustcore.errors import ReasonedError


class RegistrarError(ReasonedError):
    """Root of every error :mod:`registrar` raises."""


class ConfigError(RegistrarError):
    reason = "bad_config"


class CommissionError(RegistrarError):
    reason = "bundle_refused"


class BrokerError(RegistrarError):
    reason = "broker_failed"


class StoreError(RegistrarError):
    reason = "store_failed"


class StoreConflict(StoreError):
    reason = "store_conflict"


class RolloverError(RegistrarError):
    reason = "rollover_refused"


class RegistrationRefused(RegistrarError):
    reason = "refused"
