"""``factory-station``: the factory NUC signing station."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Factory signing station: keeps its CA key inside its TPM, enforces the entitlement
    HQ issued to it (quota, daily limit, key-use window, device-id range), has each
    device's own TPM create the device key, signs the factory certificate (IDevID) and
    keeps a hash-chained, signed audit log that it exports, encrypted, to HQ.
    """
