"""``registrar``: the building's registration server.

This module is the command group only (``registrar.cli:main``, the console script): the
commands live by duty in ``registrar/cli_site.py`` (set up and configure a site),
``cli_run.py`` (``registrar run``), ``cli_status.py`` (read a site), ``cli_operations.py``
(revoke, revocation lists, payload keys, approvals, device commands) and
``cli_rollover.py`` (site CA rollover); what they share is in ``cli_common.py``.
"""

from __future__ import annotations

import click

from registrar.cli_common import EXIT_ERROR
from registrar.cli_operations import (
    approve_command,
    import_revocations_command,
    revoke_command,
    rotate_payload_key_command,
    send_command_command,
)
from registrar.cli_rollover import rollover_ca_command
from registrar.cli_run import run_command
from registrar.cli_site import (
    broker_config_command,
    commission_command,
    configure_command,
    init_command,
    ldevid_policy_command,
)
from registrar.cli_status import (
    devices_command,
    pending_command,
    report_command,
    status_command,
)
from signers.private_files import private_umask
from trustcore.cli_net import guarded_group

__all__ = ["main"]


@click.group(
    cls=guarded_group(EXIT_ERROR), context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="devtrust")
def main() -> None:
    """Site registrar: devices connect over mutual-TLS MQTT with their factory
    certificate; the registrar verifies them (chain, revocation, manifest), issues a
    secondary certificate from the site CA, installs the AES payload key wrapped to the
    device's TPM key, and enforces per-device topic access and revocation.

    The site keystore passphrase comes from DEVTRUST_SITE_PASSPHRASE or --passphrase-file,
    never from the command line. See docs/site.md.
    """
    private_umask()  # every file this command creates: 0600, directories 0700


for _command in (
    init_command,
    configure_command,
    commission_command,
    run_command,
    broker_config_command,
    status_command,
    devices_command,
    ldevid_policy_command,
    revoke_command,
    import_revocations_command,
    rotate_payload_key_command,
    send_command_command,
    report_command,
    pending_command,
    approve_command,
    rollover_ca_command,
):
    main.add_command(_command)
