"""``hq`` set-up and role keys: ``init`` (root CA and HQ role keys), ``init-kms`` (the
payload-key KMS) and ``renew-roles`` (root ceremony: role certificates)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from hq.cli_options import (
    fail,
    home_option,
    secret_options,
)
from hq.errors import HqError
from hq.home import HqHome, HqSecrets, Pkcs11Location

__all__ = ["init_command", "init_kms_command", "renew_roles_command"]


# -------------------------------------------------------------------------------- init


@click.command("init")
@home_option
@click.option("--org", "organization", required=True, help="Manufacturer (organisation) name.")
@click.option("--root-pkcs11-module", help="PKCS#11 module holding the root key.")
@click.option("--root-pkcs11-token", help="Token label.")
@click.option("--root-pkcs11-key", help="Key label (generated in the token if absent).")
@click.option(
    "--store",
    metavar="URL",
    help="HQ database: postgresql://user@host:port/db (an empty database; no password in "
    "the URL, use ~/.pgpass). Recorded in hq.json: every later command uses it. "
    "Default: hq.sqlite in the HQ directory.",
)
@secret_options
def init_command(
    home: Path,
    organization: str,
    root_pkcs11_module: str | None,
    root_pkcs11_token: str | None,
    root_pkcs11_key: str | None,
    store: str | None,
    passphrase_file: Path | None,
    pin_file: Path | None,
) -> None:
    """Create the root CA and the HQ role keys and certificates (never overwrites)."""
    from hq.authority import init_hq

    given = [root_pkcs11_module, root_pkcs11_token, root_pkcs11_key]
    location = None
    if any(given):
        if not all(given):
            raise click.UsageError(
                "--root-pkcs11-module, --root-pkcs11-token and --root-pkcs11-key go together"
            )
        location = Pkcs11Location(*given)  # type: ignore[arg-type]
    try:
        result = init_hq(
            home,
            organization=organization,
            secrets=HqSecrets(passphrase_file, pin_file),
            root_pkcs11=location,
            store=store,
        )
    except HqError as exc:
        fail(exc)
    console = Console(highlight=False)
    where = "software keystore (encrypted)"
    if location is not None:
        state = "generated in" if result.root_key_generated else "taken from"
        where = f"PKCS#11 token {location.token!r}, key {location.label!r} ({state} the token)"
    console.print(f"HQ initialised in {result.home}")
    console.print(f"  root CA     {result.root_cert.subject.rfc4514_string()}  ({where})")
    for role, cert in result.role_certs.items():
        console.print(f"  {role.value:<19} serial {cert.serial_number:x}")


@click.command("init-kms")
@home_option
@secret_options
def init_kms_command(home: Path, passphrase_file: Path | None, pin_file: Path | None) -> None:
    """Create the payload-key KMS key of an HQ initialised before sites existed."""
    from hq.kms import init_kms

    try:
        created = init_kms(HqHome.open(home), HqSecrets(passphrase_file, pin_file))
    except HqError as exc:
        fail(exc)
    Console().print("KMS key created" if created else "this HQ already has a KMS key")


# --------------------------------------------------------------------------- renew-roles


@click.command("renew-roles")
@home_option
@click.option("--force", is_flag=True, help="Renew every role certificate, due or not.")
@secret_options
def renew_roles_command(
    home: Path, force: bool, passphrase_file: Path | None, pin_file: Path | None
) -> None:
    """Root ceremony: re-issue (same keys) the HQ role certificates that end within a year,
    so HQ keeps signing bundles, entitlements and revocation lists for the devices' whole
    life (docs/lifecycle.md)."""
    from hq.roles import renew_role_certificates

    try:
        done = renew_role_certificates(
            HqHome.open(home), HqSecrets(passphrase_file, pin_file), force=force
        )
    except HqError as exc:
        fail(exc)
    for r in done:
        state = "renewed" if r.renewed else "current"
        click.echo(f"{r.role}: {state}, valid until {r.not_after.isoformat()}")
