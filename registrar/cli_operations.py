"""``registrar`` commands that change a site's devices or keys, live through the running
registrar or offline (:func:`registrar.cli_common.live_or_offline`): ``revoke``,
``import-revocations``, ``rotate-payload-key``, ``approve``; and ``send-command`` (live
only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from registrar.cli_common import (
    EXIT_REFUSED,
    fail,
    home_option,
    live_or_offline,
    open_site,
    parse_device_id,
    passphrase_option,
    refused,
    run_offline,
    store_option,
)
from registrar.errors import RegistrarError

__all__ = [
    "approve_command",
    "import_revocations_command",
    "revoke_command",
    "rotate_payload_key_command",
    "send_command_command",
]


@click.command("revoke")
@home_option
@passphrase_option
@click.argument("device_id")
@click.option(
    "--reason",
    type=click.Choice(
        [
            "unspecified",
            "key_compromise",
            "cloned",
            "counterfeit",
            "over_production",
            "decommissioned",
        ]
    ),
    default="unspecified",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
@store_option
def revoke_command(
    home: Path,
    passphrase_file: Path | None,
    device_id: str,
    reason: str,
    as_json: bool,
    store: str | None,
) -> None:
    """Revoke a registered device: its secondary certificates go on the site CRL, it is
    blocked in the broker and its live sessions are cut (within seconds when a registrar
    runs; offline, the registrar applies it when it starts). Exit 2: refused (e.g. the
    device is not registered here)."""
    import json

    from registrar.revocation import revoke_device
    from registrar.site import SiteSecrets
    from registrar.spool import revoke_json

    site = open_site(home)
    secrets = SiteSecrets(passphrase_file)
    device = parse_device_id(device_id)

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            return revoke_json(
                await revoke_device(
                    home=site, secrets=secrets, store=opened, device_id=device, reason=reason
                )
            )

        return dict(run_offline(site, secrets, work, store))

    try:
        result, live = live_or_offline(
            site, "revoke", {"device_id": device.value, "reason": reason}, offline
        )
    except RegistrarError as exc:
        if exc.reason in ("unknown_device", "bad_reason"):
            refused(exc)
        fail(exc)
    if as_json:
        click.echo(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
        return
    serials = ", ".join(result["serials"])
    click.echo(
        f"{result['device_id']} revoked ({result['reason']}): LDevID {serials} on site CRL "
        f"{result['crl_number']}"
        + (
            f"; {result['sessions_cut']} live session(s) cut"
            if live
            else "; no registrar running: blocks are applied when it starts"
        )
    )


@click.command("import-revocations")
@home_option
@passphrase_option
@click.argument("list_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True)
@store_option
def import_revocations_command(
    home: Path, passphrase_file: Path | None, list_file: Path, as_json: bool, store: str | None
) -> None:
    """Import a revocation list signed by HQ: only a newer list replaces the one held
    (rollback refused, exit 2); listed factory certificates are refused at registration;
    registered devices it lists are revoked (live if a registrar runs)."""
    import json

    from registrar.revocation import import_revocation_list
    from registrar.site import SiteSecrets
    from registrar.spool import import_json

    site = open_site(home)
    secrets = SiteSecrets(passphrase_file)
    try:
        package = list_file.read_bytes()
    except OSError as exc:
        fail(RegistrarError(f"cannot read {list_file}: {exc}", reason="io_error"))

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            result, _ = await import_revocation_list(
                home=site, secrets=secrets, store=opened, package=package
            )
            return import_json(result)

        return dict(run_offline(site, secrets, work, store))

    try:
        result, live = live_or_offline(site, "import-revocations", {}, offline, data=package)
    except RegistrarError as exc:
        if exc.reason in ("bad_config", "store_failed", "io_error"):
            fail(exc)
        refused(exc)
    if as_json:
        click.echo(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
        return
    click.echo(
        f"HQ revocation list {result['sequence']} {result['status']} (held: "
        f"{result['previous']}; {result['entries']} entries); "
        f"{len(result['revoked'])} registered device(s) revoked"
        + ("" if live else " (offline: blocks are applied when the registrar starts)")
    )
    for r in result["revoked"]:
        click.echo(f"  revoked {r['device_id']} ({r['reason']})")


@click.command("rotate-payload-key")
@home_option
@passphrase_option
@click.option("--json", "as_json", is_flag=True)
def rotate_payload_key_command(home: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Make a new AES payload key current and send it, wrapped to each registered device's
    TPM key, on devices/<id>/keys (retained). Offline, devices get it when the registrar
    next starts."""
    import json

    from registrar.site import SiteSecrets, load_commissioned_site, revocation_lock

    site = open_site(home)
    secrets = SiteSecrets(passphrase_file)

    def offline() -> dict[str, Any]:
        commissioned = load_commissioned_site(site, secrets)
        with revocation_lock(site):
            ring = commissioned.payload_keys.rotate()
        return {"key_id": ring.current.key_id.hex(), "updates_published": 0}

    try:
        result, live = live_or_offline(site, "rotate-payload-key", {}, offline)
    except RegistrarError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
        return
    click.echo(
        f"payload key {result['key_id']} is current; "
        + (
            f"{result['updates_published']} device update(s) published"
            if live
            else "no registrar running: registered devices get it when it starts"
        )
    )


@click.command("send-command")
@home_option
@click.argument("device_id")
@click.argument("message")
def send_command_command(home: Path, device_id: str, message: str) -> None:
    """Send MESSAGE to a device on devices/<id>/cmd, encrypted with the current payload key
    (needs a running registrar)."""
    from registrar.run_dir import registrar_running
    from registrar.spool import submit_command

    site = open_site(home)
    if not registrar_running(site):
        fail(RegistrarError("no registrar is running for this site", reason="not_running"))
    answer = submit_command(
        site, "send-command", {"device_id": device_id}, data=message.encode("utf-8")
    )
    if answer is None:
        fail(RegistrarError("the running registrar did not answer", reason="timeout"))
    if not answer.get("ok"):
        click.echo(f"REFUSED ({answer.get('reason')}): {answer.get('error')}", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo(f"sent on {answer['result']['topic']}")


@click.command("approve")
@home_option
@click.argument("device_id")
@store_option
def approve_command(home: Path, device_id: str, store: str | None) -> None:
    """Approve a held device: recorded durably (live through the running registrar, if one
    runs); the device's next retry registers. Approval admits only a device that passes
    every other check (chain, revocation, signature, CSR)."""
    from trustcore.utctime import system_clock, to_unix

    site = open_site(home)
    device = parse_device_id(device_id)

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            pending = await opened.approve(device, at=to_unix(system_clock()))
            return {"device_id": device.value, "was_pending": pending}

        return dict(run_offline(site, None, work, store))

    try:
        result, live = live_or_offline(site, "approve", {"device_id": device.value}, offline)
    except RegistrarError as exc:
        fail(exc)
    note = "" if result["was_pending"] else " (it was not pending: pre-approved)"
    click.echo(
        f"{result['device_id']} approved{note}; "
        + ("the running registrar admits its next retry" if live else "admitted from now on")
    )
