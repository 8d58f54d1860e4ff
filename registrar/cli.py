"""``registrar``: the building's registration server."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Site registrar: devices connect over mutual-TLS MQTT with their factory
    certificate; the registrar verifies them (chain, revocation, manifest), issues a
    secondary certificate from the site CA, installs the AES payload key wrapped to the
    device's TPM key, and enforces per-device topic access and revocation.
    """
