"""``hq site``: buildings — enrol a site registrar, roll its CA over, write its site bundle
(docs/site.md)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from hq.cli_options import (
    approvals_option,
    fail,
    home_option,
    read_approvals,
    refuse_existing_out,
    secret_options,
)
from hq.errors import HqError
from hq.home import HqHome, HqSecrets

__all__ = ["site_group"]


@click.group("site")
def site_group() -> None:
    """Buildings: enrol a site registrar and write its site bundle (docs/site.md)."""


@site_group.command("enrol")
@home_option
@click.option("--replace", is_flag=True, help="Re-enrol a site id with new keys.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the site CA certificate (PEM) here.",
)
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@secret_options
def site_enrol_command(
    home: Path,
    replace: bool,
    out: Path | None,
    request_file: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Verify a site enrolment request, record the site and issue its site CA certificate."""
    from cryptography.hazmat.primitives import serialization

    from hq.home import write_package
    from hq.site import enrol_site

    try:
        result = enrol_site(
            HqHome.open(home),
            request_file.read_bytes(),
            HqSecrets(passphrase_file, pin_file),
            replace=replace,
        )
        if out is not None:
            write_package(out, result.site_ca_cert.public_bytes(serialization.Encoding.PEM))
    except HqError as exc:
        fail(exc)
    cert = result.site_ca_cert
    Console(highlight=False).print(
        f"site {result.site_id}: {result.status.replace('_', ' ')}\n"
        f"  site CA       serial {cert.serial_number:x}, valid until "
        f"{cert.not_valid_after_utc.isoformat()}\n"
        f"  CA key        {result.ca_key_id}\n  transport key {result.transport_key_id}"
    )


@site_group.command("rollover")
@home_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the new site CA certificate (PEM) here.",
)
@click.argument("request_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@secret_options
def site_rollover_command(
    home: Path,
    out: Path | None,
    request_file: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Issue a site's next CA certificate from its rollover request (`registrar rollover-ca`);
    the next `hq site bundle` carries it to the site."""
    from cryptography.hazmat.primitives import serialization

    from hq.home import write_package
    from hq.site import rollover_site_ca

    try:
        result = rollover_site_ca(
            HqHome.open(home), request_file.read_bytes(), HqSecrets(passphrase_file, pin_file)
        )
        if out is not None:
            write_package(out, result.site_ca_cert.public_bytes(serialization.Encoding.PEM))
    except HqError as exc:
        fail(exc)
    cert = result.site_ca_cert
    Console(highlight=False).print(
        f"site {result.site_id}: {result.status.replace('_', ' ')}\n"
        f"  new site CA   {cert.subject.rfc4514_string()}\n"
        f"                serial {cert.serial_number:x}, valid until "
        f"{cert.not_valid_after_utc.isoformat()}\n"
        f"  CA key        {result.ca_key_id}\n"
        f"next: `hq site bundle --site {result.site_id} ...` and `registrar commission` at the site"
    )


@site_group.command("bundle")
@home_option
@click.option("--site", "site_id", required=True, help="Enrolled site id.")
@click.option("--device", "devices", multiple=True, help="Device id destined for the site.")
@click.option(
    "--devices-from-station", "from_stations", multiple=True, help="All devices of a station."
)
@click.option(
    "--admit-station", "admit_stations", multiple=True, help="Admit a station without listing."
)
@click.option(
    "--admit-product",
    "admit_products",
    multiple=True,
    help="Limit --admit-station to products (their device-id prefixes).",
)
@click.option("--rotate-payload-key", is_flag=True, help="Generate a new current payload key.")
@click.option(
    "--max-offline-days",
    type=int,
    default=30,
    show_default=True,
    help="Days the site may go without fresh HQ revocation data before it refuses new "
    "registrations (1..180).",
)
@approvals_option
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output file."
)
@secret_options
def site_bundle_command(
    home: Path,
    site_id: str,
    devices: tuple[str, ...],
    from_stations: tuple[str, ...],
    admit_stations: tuple[str, ...],
    admit_products: tuple[str, ...],
    rotate_payload_key: bool,
    max_offline_days: int,
    approval_files: tuple[Path, ...],
    out: Path,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Write the site's next bundle (sealed to the site): trust anchors, CRLs, the HQ
    revocation list, manifest and admission rules, and the site's payload keys."""
    from hq.home import write_package
    from hq.site import SiteBundleRequest, build_site_bundle

    refuse_existing_out(out)
    request = SiteBundleRequest(
        site_id=site_id,
        devices=devices,
        devices_from_stations=from_stations,
        admit_stations=admit_stations,
        admit_products=admit_products,
        rotate_payload_key=rotate_payload_key,
        max_offline_days=max_offline_days,
    )
    try:
        result = build_site_bundle(
            HqHome.open(home),
            request,
            HqSecrets(passphrase_file, pin_file),
            approvals=read_approvals(approval_files),
        )
        write_package(out, result.package)
    except HqError as exc:
        fail(exc)
    console = Console(highlight=False)
    rules = ", ".join(f"{a.station_id}:{a.product or '*'}" for a in result.admission) or "-"
    console.print(
        f"site bundle {result.sequence} for site {result.site_id}\n"
        f"  manifest        {len(result.manifest)} device(s)\n"
        f"  admission       {rules}\n"
        f"  station CAs     {', '.join(result.station_ids) or '-'}\n"
        f"  station CRLs    {', '.join(result.station_crls) or '-'}\n"
        f"  root CRL        next update {result.root_crl_next_update.isoformat()}\n"
        f"  revocation list sequence {result.revocation_list_sequence}\n"
        f"  offline limit   {result.max_offline_days} days\n"
        f"  payload keys    {len(result.payload_key_ids)} (current {result.current_payload_key})\n"
        f"  written to      {out} (sha256 {result.package_sha256})"
    )
    if result.stations_without_crl:
        console.print(
            f"[yellow]warning:[/] no CRL held for station(s) "
            f"{', '.join(result.stations_without_crl)}: brokers that check revocation along "
            "the whole chain refuse their devices until one is recorded (hq station-crl)"
        )
    if not result.manifest and not result.admission:
        console.print("[yellow]warning:[/] this bundle admits no device")
    if result.warning:
        console.print(f"[yellow]warning:[/] {result.warning}")
