"""Errors of the device simulator. Everything :mod:`device_sim` raises on purpose derives from
``DeviceSimError`` (whose base is the shared ``trustcore.errors.ReasonedError``: a stable
``reason`` besides the message).

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code); classes outside this module carry their module in brackets::

    DeviceSimError
    ├── SwtpmError               swtpm could not be started, did not answer, or provisioning
    │                            failed [swtpm]
    ├── DeviceStateError         a device directory is missing, incomplete or inconsistent
    │                            [device]
    ├── FleetError               a load fleet directory is missing or inconsistent [fleet]
    └── DeviceRegistrationError  registration did not succeed; ``reason`` is the registrar's
                                 public reason code (or ``timeout`` / ``no_valid_response``)
                                 [client]

The click ``Refused`` exception of :mod:`device_sim.cli` is not in the tree: it is how the
command line exits with code 2, not an error the package raises to its callers.
"""

from __future__ import annotations

from trustcore.errors import ReasonedError

__all__ = ["DeviceSimError"]


class DeviceSimError(ReasonedError):
    """Root of every error :mod:`device_sim` raises."""

    reason = "device_sim_failed"
