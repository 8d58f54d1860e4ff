"""``hq`` commands for counterfeits and revocation: ``ingest-report`` (a site's report coming
back), ``revoke`` (devices, certificates, a whole station CA under the quorum), and the root
ceremony's ``root-crl`` and ``publish-revocations`` (revocation data for the field)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console

from hq.cli_options import (
    EXIT_CLEAN,
    EXIT_ERROR,
    EXIT_REFUSED,
    EXIT_VIOLATIONS,
    approvals_option,
    fail,
    home_option,
    read_approvals,
    refuse_existing_out,
    secret_options,
)
from hq.errors import HqError
from hq.home import HqHome, HqSecrets
from trustcore.revocation import REVOCATION_REASONS

__all__ = [
    "ingest_report_command",
    "publish_revocations_command",
    "revoke_command",
    "root_crl_command",
]


# ------------------------------------------------------------- counterfeits and revocation


@click.command("ingest-report")
@home_option
@click.argument("report_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ingest_report_command(home: Path, report_file: Path, as_json: bool) -> None:
    """Verify a site report, store what the site saw, and cross-check it with the audit
    logs: counterfeit (in no audit log), over-production, clones.

    Exit 0: clean. 1: findings (listed with evidence). 2: report refused. 3: error.
    """
    from rich.table import Table

    from hq.counterfeit import ReportRefusedError, ingest_site_report

    try:
        result = ingest_site_report(HqHome.open(home), report_file.read_bytes())
    except ReportRefusedError as exc:
        if as_json:
            click.echo(
                json.dumps({"status": "refused", "reason": exc.reason, "message": exc.message})
            )
        else:
            click.echo(f"REFUSED ({exc.reason}): {exc.message}", err=True)
        sys.exit(EXIT_REFUSED)
    except HqError as exc:
        fail(exc, EXIT_ERROR)
    except OSError as exc:
        fail(HqError(f"cannot read {report_file}: {exc}", reason="io_error"), EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(result.to_map(), sort_keys=True))
    else:
        console = Console(highlight=False)
        console.print(
            f"site report {result.sequence} of site {result.site_id}: {result.seen} factory "
            f"certificate(s) seen, {result.registrations} registration(s), "
            f"{result.audited_clean} match the audit logs"
        )
        if result.findings:
            table = Table("kind", "device", "station", "serial", "site", "first seen", "reason")
            for f in result.findings:
                table.add_row(
                    f.kind,
                    f.device_id,
                    f.station_id,
                    f.serial,
                    f.site_id,
                    datetime.fromtimestamp(f.first_seen).isoformat(),
                    f.detail,
                )
            console.print(table)
    sys.exit(EXIT_CLEAN if result.clean else EXIT_VIOLATIONS)


@click.command("revoke")
@home_option
@click.option("--device", "devices", multiple=True, help="Device id (every certificate of it).")
@click.option("--serial", "serials", multiple=True, help="STATION:SERIAL (hex) of one certificate.")
@click.option(
    "--from-report",
    "findings_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="JSON output of `hq ingest-report --json`: revoke every finding.",
)
@click.option("--station-ca", help="Revoke a whole station CA (needs the HQ quorum).")
@click.option(
    "--reason", type=click.Choice(sorted(REVOCATION_REASONS)), help="Override the reason."
)
@approvals_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@secret_options
def revoke_command(
    home: Path,
    devices: tuple[str, ...],
    serials: tuple[str, ...],
    findings_file: Path | None,
    station_ca: str | None,
    reason: str | None,
    approval_files: tuple[Path, ...],
    out: Path,
    as_json: bool,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Append to the HQ revocation list (next sequence, signed by the revocation signer)
    and write it to --out for `registrar import-revocations` at every site."""
    from hq.approvals import QuorumRefused
    from hq.counterfeit import read_findings, revoke
    from hq.home import write_package

    refuse_existing_out(out)
    try:
        findings = read_findings(findings_file) if findings_file is not None else []
        result, package = revoke(
            HqHome.open(home),
            HqSecrets(passphrase_file, pin_file),
            devices=devices,
            serials=serials,
            findings=findings,
            station_ca=station_ca,
            reason=reason,
            approvals=read_approvals(approval_files),
        )
        write_package(out, package)
    except HqError as exc:
        fail(exc, EXIT_REFUSED if isinstance(exc, QuorumRefused) else 1)
    if as_json:
        click.echo(json.dumps({**result.to_map(), "out": str(out)}, sort_keys=True))
        return
    click.echo(
        f"revocation list {result.sequence}: {len(result.added)} device(s) added, "
        f"{result.already_listed} already listed; written to {out}"
    )
    for e in result.added:
        click.echo(f"  revoked {e.station_id}:{e.serial.hex} {e.device_id} ({e.reason})")
    for serial in result.station_ca_serials:
        click.echo(f"  station CA {station_ca} serial {serial} on the root CRL (next site bundle)")


# ------------------------------------------------------- root ceremony, revocation data


@click.command("root-crl")
@home_option
@secret_options
def root_crl_command(home: Path, passphrase_file: Path | None, pin_file: Path | None) -> None:
    """Root ceremony: re-sign the root CRL (valid one year) and create or renew the
    delegated CRL signer certificate. The only routine use of the root key."""
    from hq.revocation_data import root_ceremony
    from trustcore.utctime import now_utc

    try:
        result = root_ceremony(
            HqHome.open(home), HqSecrets(passphrase_file, pin_file), now=now_utc(None)
        )
    except HqError as exc:
        fail(exc)
    click.echo(
        f"root CRL {result.root_crl_number}: next update "
        f"{result.root_crl_next_update.isoformat()}\n"
        f"CRL signer: {'issued now' if result.crl_signer_issued else 'kept'}, valid until "
        f"{result.crl_signer_not_after.isoformat()}"
    )


@click.command("publish-revocations")
@home_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@secret_options
def publish_revocations_command(
    home: Path, out: Path, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """Write the next HQ revocation list with a fresh indirect CRL (no root key): what a
    site imports with `registrar import-revocations FILE` to stay within its offline
    limit between bundles."""
    from hq.home import write_package
    from hq.revocation_data import latest_root_crl, publish_revocations, root_crl_warning
    from hq.store import HqStore
    from trustcore.profiles import HqRole
    from trustcore.utctime import now_utc

    refuse_existing_out(out)
    moment = now_utc(None)
    try:
        hq_home = HqHome.open(home)
        store = HqStore.open(hq_home.store_location)
        try:
            with store.transaction():
                revocations, package = publish_revocations(
                    hq_home, store, HqSecrets(passphrase_file, pin_file), moment
                )
            warning = root_crl_warning(
                latest_root_crl(store), moment, hq_home.role_certificate(HqRole.CRL_SIGNER)
            )
        finally:
            store.close()
        write_package(out, package)
    except HqError as exc:
        fail(exc)
    click.echo(
        f"revocation list {revocations.sequence}: {len(revocations.entries)} entries, "
        f"issued {moment.isoformat()}, written to {out}"
    )
    if warning:
        click.echo(f"warning: {warning}", err=True)
