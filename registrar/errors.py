"""Errors of the site registrar. Everything it raises derives from ``RegistrarError``.

::

    RegistrarError
    ├── ConfigError          the site configuration is missing, malformed or inconsistent
    ├── CommissionError      a site bundle was refused (``reason`` says why)
    ├── BrokerError          the broker could not be started, reloaded or commanded
    ├── StoreError           the registrar database failed
    └── RegistrationRefused  one device's registration was refused (``reason`` is the public
                             reason code sent to the device; details go to the log only)
"""

from __future__ import annotations


class RegistrarError(Exception):
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}" if self.args else self.reason


class ConfigError(RegistrarError):
    reason = "bad_config"


class CommissionError(RegistrarError):
    reason = "bundle_refused"


class BrokerError(RegistrarError):
    reason = "broker_failed"


class StoreError(RegistrarError):
    reason = "store_failed"


class RegistrationRefused(RegistrarError):
    reason = "refused"
