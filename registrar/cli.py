"""``registrar``: the building's registration server."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from registrar.errors import CommissionError, RegistrarError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 0 done, 1 could not run (home, passphrase, I/O), 2 bundle refused.
EXIT_ERROR = 1
EXIT_REFUSED = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="devtrust")
def main() -> None:
    """Site registrar: devices connect over mutual-TLS MQTT with their factory
    certificate; the registrar verifies them (chain, revocation, manifest), issues a
    secondary certificate from the site CA, installs the AES payload key wrapped to the
    device's TPM key, and enforces per-device topic access and revocation.

    The site keystore passphrase comes from DEVTRUST_SITE_PASSPHRASE or --passphrase-file,
    never from the command line. See docs/site.md.
    """


def _home_option(f: F) -> F:
    return click.option(
        "--home",
        "home",
        required=True,
        type=click.Path(path_type=Path, file_okay=False),
        help="Site directory.",
    )(f)


def _passphrase_option(f: F) -> F:
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help="File holding the site keystore passphrase (default: $DEVTRUST_SITE_PASSPHRASE).",
    )(f)


def _fail(exc: RegistrarError, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


# ---------------------------------------------------------------------------------- init


@main.command("init")
@_home_option
@click.option("--site-id", required=True, help="This building's site id.")
@click.option(
    "--root",
    "root_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Manufacturer root CA certificate (PEM) to pin; check its fingerprint with HQ.",
)
@click.option("--org", "organization", default="", help="Organisation in site certificates.")
@click.option(
    "--broker-name", "broker_names", multiple=True, help="Broker DNS name (default localhost)."
)
@click.option("--broker-ip", "broker_ips", multiple=True, help="Broker IP (default 127.0.0.1).")
@_passphrase_option
def init_command(
    home: Path,
    site_id: str,
    root_file: Path,
    organization: str,
    broker_names: tuple[str, ...],
    broker_ips: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Create the site CA and transport keys and the enrolment request for HQ."""
    from registrar.site import SiteSecrets, init_site

    if not broker_names and not broker_ips:
        broker_names, broker_ips = ("localhost",), ("127.0.0.1",)
    try:
        result = init_site(
            home,
            site_id=site_id,
            root_pem=root_file.read_bytes(),
            secrets=SiteSecrets(passphrase_file),
            organization=organization,
            broker_names=broker_names,
            broker_ips=broker_ips,
        )
    except RegistrarError as exc:
        _fail(exc)
    Console(highlight=False).print(
        f"site {result.site_id} initialised in {result.home}\n"
        f"  root pinned     sha256 {result.root_sha256}\n"
        f"                  (compare with HQ's root fingerprint before going on)\n"
        f"  site CA key     {result.ca_key_id}\n"
        f"  transport key   {result.transport_key_id}\n"
        f"  enrolment       {result.enrolment_path}\n"
        f"next: take the enrolment file to HQ (`hq site enrol`), bring back the site bundle "
        f"and run `registrar commission`"
    )


# ---------------------------------------------------------------------------- commission


@main.command("commission")
@_home_option
@click.argument("bundle_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_passphrase_option
def commission_command(home: Path, bundle_file: Path, passphrase_file: Path | None) -> None:
    """Verify a site bundle from HQ and make it this site's configuration.

    Exit 0: commissioned. 2: the bundle was refused (nothing changed; the reason says why:
    wrong_site, replayed, bad_signature, untrusted_sender, crl_stale, ...). 1: the site
    could not be read or written (home, passphrase, disk).
    """
    from registrar.site import SiteHome, SiteSecrets, commission_site

    console = Console(highlight=False)
    try:
        site = SiteHome.open(home)
        package = bundle_file.read_bytes()
        result = commission_site(site, package, SiteSecrets(passphrase_file))
    except CommissionError as exc:
        console.print(f"[bold red]REFUSED[/] ({exc.reason}): {exc.args[0]}")
        console.print(f"nothing was changed in {home}")
        sys.exit(EXIT_REFUSED)
    except RegistrarError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(RegistrarError(f"cannot read {bundle_file}: {exc}", reason="io_error"))
    table = Table(title=f"site {result.site_id} commissioned (bundle {result.sequence})")
    table.add_column("item")
    table.add_column("value")
    table.add_row("manifest", f"{result.manifest_devices} device(s)")
    rules = ", ".join(f"{a.station_id}:{a.product or '*'}" for a in result.admission)
    table.add_row("admission rules", rules or "-")
    table.add_row("station CAs", ", ".join(result.station_ids) or "-")
    table.add_row("root CRL valid until", result.root_crl_next_update.isoformat())
    table.add_row(
        "HQ revocation list",
        f"sequence {result.revocation_list_sequence}, {result.revoked_devices} device(s)",
    )
    table.add_row(
        "payload keys",
        f"{len(result.payload_key_ids)} (current {result.current_payload_key}), stored sealed",
    )
    table.add_row("broker certificate", ", ".join(result.broker_names))
    table.add_row("state", str(result.state_dir))
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
