"""``hq``: the manufacturer's headquarters — the composition root of the command line: the
group (logging options, exit-code guard) and its wiring. The commands live by area:
:mod:`hq.cli_setup` (init, KMS, role keys), :mod:`hq.cli_stations` (factory stations,
entitlements, audit ingest), :mod:`hq.cli_sites` (``hq site``), :mod:`hq.approval_cli`
(``hq approval``), :mod:`hq.cli_revocation` (site reports, revocation, root CRL); shared
options in :mod:`hq.cli_options`."""

from __future__ import annotations

import click

from hq.approval_cli import approval_group
from hq.cli_options import EXIT_ERROR
from hq.cli_revocation import (
    ingest_report_command,
    publish_revocations_command,
    revoke_command,
    root_crl_command,
)
from hq.cli_setup import init_command, init_kms_command, renew_roles_command
from hq.cli_sites import site_group
from hq.cli_stations import (
    enrol_command,
    entitle_command,
    ingest_command,
    renew_station_command,
    station_cas_command,
    station_crl_command,
    time_statement_command,
)
from signers.private_files import private_umask
from trustcore.cli_net import guarded_group, log_options
from trustcore.logformat import LogFormat, configure_logging

#: ``ingest-audit`` / ``ingest-report``: exit 1 means "accepted with findings", so any
#: failure there that the command did not map itself is 3 (trustcore/cli_net.py).
_HqGroup = guarded_group(1, {"ingest-audit": EXIT_ERROR, "ingest-report": EXIT_ERROR})


@click.group(cls=_HqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
@log_options
def main(log_format: LogFormat, log_level: str) -> None:
    """Headquarters: the manufacturer root CA, entitlements for factory stations, the
    payload-key KMS, audit reconciliation, counterfeit detection and revocation.

    HQ works offline: what it sends and receives are signed files that can travel on a
    USB stick (entitlements, site bundles, revocation lists; audit exports and site
    reports coming back).

    Secrets never go on the command line: the keystore passphrase comes from
    DEVTRUST_HQ_PASSPHRASE or --passphrase-file, a token PIN from DEVTRUST_HQ_PIN or
    --pin-file. See docs/hq.md.
    """
    configure_logging(log_level, log_format, command="hq")
    private_umask()  # every file this command creates: 0600, directories 0700


#: Every command and group, by area (``hq --help`` lists them sorted).
COMMANDS = (
    init_command,
    enrol_command,
    renew_station_command,
    station_cas_command,
    entitle_command,
    ingest_command,
    init_kms_command,
    time_statement_command,
    station_crl_command,
    site_group,
    approval_group,
    ingest_report_command,
    revoke_command,
    renew_roles_command,
    root_crl_command,
    publish_revocations_command,
)
for command in COMMANDS:
    main.add_command(command)
