"""``registrar rollover-ca``: the site CA rollover from the site's side (begin, status,
migrate the devices, retire the old CA; docs/site.md, "Site CA rollover").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from registrar.cli_common import (
    EXIT_REFUSED,
    fail,
    home_option,
    live_or_offline,
    open_site,
    passphrase_option,
    refused,
    store_snapshot,
)
from registrar.errors import RegistrarError
from signers.errors import SignerError
from signers.private_files import write_private_file

if TYPE_CHECKING:
    from registrar.site import SiteHome

__all__ = ["rollover_ca_command"]


@click.command("rollover-ca")
@home_option
@passphrase_option
@click.option(
    "--migrate-all",
    "action",
    flag_value="migrate",
    help="Send a signed 'renew now' to every device still on the retiring CA (live only).",
)
@click.option(
    "--retire",
    "action",
    flag_value="retire",
    help="Stop trusting the retiring CA and destroy its key (refused while devices use it).",
)
@click.option("--status", "action", flag_value="status", help="Show the site CAs and devices.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Begin: also copy the rollover request here (for HQ).",
)
@click.option("--json", "as_json", is_flag=True)
def rollover_ca_command(
    home: Path, passphrase_file: Path | None, action: str | None, out: Path | None, as_json: bool
) -> None:
    """Roll the site CA over without downtime (docs/site.md, "Site CA rollover").

    Without a flag: make the next site CA key and the request for HQ (`hq site rollover`);
    the next site bundle carries the new CA and `registrar commission` activates it (new
    LDevIDs come from it; both CAs are trusted). Then --migrate-all (or let devices renew),
    and --retire. Exit 2: refused (e.g. ca_in_use, rollover_in_progress)."""
    import json

    from registrar.site import SiteSecrets

    site = open_site(home)
    secrets = SiteSecrets(passphrase_file)
    if action == "status":
        _rollover_status(site, secrets, as_json)
    elif action == "migrate":
        _rollover_migrate(site, as_json)
    elif action == "retire":
        _rollover_retire(site, secrets, as_json)
    else:
        from registrar.rollover import begin_rollover

        try:
            begun = begin_rollover(site, secrets)
            if out is not None:
                write_private_file(out, begun.request_path.read_bytes())
        except RegistrarError as exc:
            if exc.reason in ("rollover_in_progress", "not_commissioned"):
                refused(exc)
            fail(exc)
        except (OSError, SignerError) as exc:  # e.g. --out names a file that exists
            fail(RegistrarError(f"cannot write the request: {exc}", reason="io_error"))
        if as_json:
            doc = {
                "status": begun.status,
                "request": str(begun.request_path),
                "key": begun.key_name,
                "key_id": begun.key_id,
            }
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
            return
        click.echo(
            f"site CA rollover {begun.status}: next CA key {begun.key_name} ({begun.key_id})\n"
            f"  request  {out or begun.request_path}\n"
            "next: at HQ `hq site rollover REQUEST` and `hq site bundle --site "
            f"{site.site_id} ...`; here `registrar commission BUNDLE`"
        )


def _rollover_records(site: SiteHome, secrets: Any) -> list[Any]:
    """The store's device records (read while a registrar runs, too)."""
    del secrets
    return list(store_snapshot(site)["devices"])


def _rollover_status(site: SiteHome, secrets: Any, as_json: bool) -> None:
    import json

    from registrar.rollover import rollover_status

    try:
        doc = rollover_status(site, _rollover_records(site, secrets))
    except RegistrarError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    issuing, retiring = doc["issuing"], doc["retiring"]
    cert = issuing["certificate"] or {}
    click.echo(
        f"issuing CA   {cert.get('subject')} (key {issuing['key']}, until "
        f"{cert.get('not_after')}): {doc['devices_on_issuing']} device(s)"
    )
    if retiring is not None:
        old = retiring["certificate"] or {}
        click.echo(
            f"retiring CA  {old.get('subject')} (key {retiring['key']}): "
            f"{doc['devices_on_retiring']} device(s) still on it"
            + (f" ({', '.join(doc['retiring_dependents'])})" if doc["retiring_dependents"] else "")
        )
    if doc["pending_key"]:
        click.echo(f"pending      next key {doc['pending_key']}: waiting for HQ's certificate")


def _rollover_migrate(site: SiteHome, as_json: bool) -> None:
    import json

    from registrar.run_dir import registrar_running
    from registrar.spool import submit_command

    if not registrar_running(site):
        fail(
            RegistrarError(
                "no registrar is running: --migrate-all publishes to devices through it",
                reason="not_running",
            )
        )
    answer = submit_command(site, "migrate-ca", {}, timeout=60)
    if answer is None:
        fail(RegistrarError("the running registrar did not answer", reason="timeout"))
    if not answer.get("ok"):
        click.echo(f"REFUSED ({answer.get('reason')}): {answer.get('error')}", err=True)
        sys.exit(EXIT_REFUSED)
    if as_json:
        click.echo(json.dumps(answer["result"], indent=2, sort_keys=True))
        return
    click.echo(
        f"renew-now sent to {answer['result']['published']} device(s) on the retiring CA; "
        "`registrar rollover-ca --status` shows who is still on it"
    )


def _rollover_retire(site: SiteHome, secrets: Any, as_json: bool) -> None:
    import json

    from registrar.rollover import retire_site_ca

    def offline() -> dict[str, Any]:
        result = retire_site_ca(site, _rollover_records(site, secrets))
        return {"retired": result.retired, "key": result.key_name, "state": result.state_dir.name}

    try:
        result, live = live_or_offline(site, "retire-ca", {}, offline)
    except RegistrarError as exc:
        if exc.reason in ("ca_in_use", "nothing_to_retire"):
            refused(exc)
        fail(exc)
    if as_json:
        click.echo(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
        return
    click.echo(
        f"retired {result['retired']}: no longer trusted, key {result['key']} destroyed"
        + ("; brokers reloaded" if live else "")
    )
