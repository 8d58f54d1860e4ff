"""``hq``: the manufacturer's headquarters."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Headquarters: the manufacturer root CA, entitlements for factory stations, the
    payload-key KMS, audit reconciliation, counterfeit detection and revocation.

    HQ works offline: what it sends and receives are signed files that can travel on a
    USB stick (entitlements, site bundles, revocation lists; audit exports and site
    reports coming back).
    """
