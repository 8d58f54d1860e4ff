"""``registrar`` commands that set a site up and change its settings: ``init``,
``configure``, ``commission``, ``ldevid-policy`` and ``broker-config`` (docs/site.md,
docs/broker.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from registrar.cli_common import (
    EXIT_REFUSED,
    duration,
    fail,
    grace_option,
    home_option,
    open_site,
    passphrase_option,
    refused,
)
from registrar.errors import CommissionError, ConfigError, RegistrarError

__all__ = [
    "broker_config_command",
    "commission_command",
    "configure_command",
    "init_command",
    "ldevid_policy_command",
]


@click.command("init")
@home_option
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
@grace_option
@passphrase_option
def init_command(
    home: Path,
    site_id: str,
    root_file: Path,
    organization: str,
    broker_names: tuple[str, ...],
    broker_ips: tuple[str, ...],
    grace_s: int | None,
    passphrase_file: Path | None,
) -> None:
    """Create the site CA and transport keys and the enrolment request for HQ."""
    from registrar.site import SiteSecrets, init_site
    from trustcore.key_rotation import DEFAULT_GRACE_S

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
            payload_key_grace_s=DEFAULT_GRACE_S if grace_s is None else grace_s,
        )
    except RegistrarError as exc:
        fail(exc)
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


@click.command("configure")
@home_option
@grace_option
def configure_command(home: Path, grace_s: int | None) -> None:
    """Change site settings in site.json (a running registrar applies them at its next
    start). --payload-key-grace: how long an old payload key is accepted after rotation."""
    from registrar.run_dir import registrar_running
    from registrar.site import configure_site

    site = open_site(home)
    if grace_s is None:
        click.echo(f"payload key grace: {duration(site.config.payload_key_grace_s)}")
        return
    try:
        site = configure_site(site, payload_key_grace_s=grace_s)
    except RegistrarError as exc:
        fail(exc)
    running = registrar_running(site)
    note = " (the running registrar applies it at its next start)" if running else ""
    click.echo(f"payload key grace: {duration(site.config.payload_key_grace_s)}{note}")


@click.command("commission")
@home_option
@click.argument("bundle_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@passphrase_option
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
        fail(exc)
    except OSError as exc:
        fail(RegistrarError(f"cannot read {bundle_file}: {exc}", reason="io_error"))
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
        "offline limit",
        f"{result.max_offline_days} days without fresh HQ revocation data, then new "
        "registrations are refused",
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


@click.command("ldevid-policy")
@home_option
@click.option("--validity-days", type=click.FloatRange(min=0.007), help="LDevID validity.")
@click.option(
    "--renew-from",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Fraction of the LDevID life from which devices renew (default 2/3).",
)
@click.option(
    "--min-interval-seconds",
    type=click.FloatRange(min=0),
    help="Refuse (too_early) renewing a certificate younger than this (default 3600).",
)
@click.option(
    "--handover-seconds",
    type=click.FloatRange(0, 3600),
    help="Time a renewed device has to reconnect before its old session is cut (default 10).",
)
@click.option(
    "--supersede-window-seconds",
    type=click.FloatRange(0, 3600),
    help="Renewals' old LDevIDs go on the site CRL (one broker reload) at most once per "
    "this window; 0: each before its answer (default 60).",
)
@click.option(
    "--expired-reregistration",
    type=click.Choice(["allow", "approval"]),
    help="A device whose LDevID expired registers again: allowed, or held for approval.",
)
@click.option("--json", "as_json", is_flag=True)
def ldevid_policy_command(
    home: Path,
    validity_days: float | None,
    renew_from: float | None,
    min_interval_seconds: float | None,
    handover_seconds: float | None,
    supersede_window_seconds: float | None,
    expired_reregistration: str | None,
    as_json: bool,
) -> None:
    """Show or change the site's LDevID life cycle (``SITE/ldevid.json``); without options
    it shows the policy in force. ``registrar run`` reads it at start."""
    import dataclasses
    import json
    from datetime import timedelta

    from registrar.ldevid_policy import policy_json, read_ldevid_policy, write_ldevid_policy
    from trustcore.errors import InvalidValueError

    site = open_site(home)
    try:
        policy = read_ldevid_policy(site.path)
        changes: dict[str, Any] = {}
        if validity_days is not None:
            changes["validity"] = timedelta(days=validity_days)
        if renew_from is not None:
            changes["renew_from"] = renew_from
        if min_interval_seconds is not None:
            changes["min_interval"] = timedelta(seconds=min_interval_seconds)
        if handover_seconds is not None:
            changes["handover_seconds"] = handover_seconds
        if supersede_window_seconds is not None:
            changes["supersede_window_seconds"] = supersede_window_seconds
        if expired_reregistration is not None:
            changes["expired_reregistration"] = expired_reregistration
        if changes:
            try:
                policy = dataclasses.replace(policy, **changes)
            except InvalidValueError as exc:
                raise ConfigError(exc.message, reason="bad_policy") from exc
            write_ldevid_policy(site.path, policy)
    except RegistrarError as exc:
        refused(exc)
    doc = policy_json(policy)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for key in sorted(doc):
        click.echo(f"{key}: {doc[key]}")
    if changes:
        click.echo("saved; restart `registrar run` to apply")


@click.command("broker-config")
@click.argument("kind", type=click.Choice(["rabbitmq"]))
@home_option
@passphrase_option
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for one sub-directory per node (created 0700).",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    metavar="NAME@HOST,IP,AMQP,MQTTS,MANAGEMENT,DIST",
    help="One cluster node (repeat for each).",
)
@click.option("--auth-url", required=True, help="The registrar's HTTP auth backend URL.")
def broker_config_command(
    kind: str,
    home: Path,
    passphrase_file: Path | None,
    out: Path,
    nodes: tuple[str, ...],
    auth_url: str,
) -> None:
    """Render a RabbitMQ cluster's per-node configuration from the site (see docs/broker.md)."""
    from registrar.broker import BrokerTls
    from registrar.broker.rabbitmq import RabbitMQConfig, parse_node, render_cluster, site_tls
    from registrar.site import SiteSecrets

    site = open_site(home)
    try:
        config = RabbitMQConfig(nodes=tuple(parse_node(n) for n in nodes), auth_url=auth_url)
        current = site.current
        tls = BrokerTls(
            server_cert=current / "broker.pem",
            server_key=site.key_path("broker"),
            server_key_passphrase=SiteSecrets(passphrase_file).passphrase(),
            registration_cas=current / "registration-cas.pem",
            operational_cas=current / "operational-cas.pem",
            crl_file=current / "crls.pem",
        )
        files = render_cluster(out, config, site_tls(tls))
    except RegistrarError as exc:
        fail(exc)
    for name, node_files in files.items():
        click.echo(f"{kind} node {name}: {node_files.directory}")
