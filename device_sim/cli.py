"""``device-sim``: simulated devices and fleets."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Simulated devices: each has its own TPM (one swtpm process and state directory per
    device) or, for large load tests, software keys. Devices are provisioned at a factory
    station and register at a building's registrar.
    """
