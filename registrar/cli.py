"""``registrar``: the building's registration server."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from registrar.errors import CommissionError, ConfigError, RegistrarError
from signers.errors import SignerError
from signers.private_files import private_umask, write_private_file
from trustcore.cli_net import guarded_group

if TYPE_CHECKING:
    from registrar.site import SiteHome
    from trustcore.endpoint import Endpoint

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 0 done, 1 could not run (home, passphrase, I/O), 2 bundle refused.
EXIT_ERROR = 1
EXIT_REFUSED = 2


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


def _store_option(f: F) -> F:
    return click.option(
        "--store",
        "store",
        envvar="DEVTRUST_REGISTRAR_STORE",
        metavar="URL",
        help="The registrar store: postgresql://user@host:port/db (several instances share "
        "it), sqlite:///path or a path (default: the site home's SQLite file; "
        "$DEVTRUST_REGISTRAR_STORE).",
    )(f)


def _grace(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """``--payload-key-grace``: 7d, 12h, 30m, 90s (or seconds) -> seconds."""
    if value is None:
        return None
    from trustcore.errors import TrustCoreError
    from trustcore.key_rotation import parse_grace

    try:
        return parse_grace(value)
    except TrustCoreError as exc:
        raise click.BadParameter(str(exc.args[0])) from exc


def _grace_option(f: F) -> F:
    return click.option(
        "--payload-key-grace",
        "grace_s",
        callback=_grace,
        help="How long telemetry under a superseded payload key is still accepted "
        "(e.g. 7d, 12h; default 7d, at most 365d).",
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
@_grace_option
@_passphrase_option
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


@main.command("configure")
@_home_option
@_grace_option
def configure_command(home: Path, grace_s: int | None) -> None:
    """Change site settings in site.json (a running registrar applies them at its next
    start). --payload-key-grace: how long an old payload key is accepted after rotation."""
    from registrar.run_dir import registrar_running
    from registrar.site import configure_site

    site = _open_site(home)
    if grace_s is None:
        click.echo(f"payload key grace: {_duration(site.config.payload_key_grace_s)}")
        return
    try:
        site = configure_site(site, payload_key_grace_s=grace_s)
    except RegistrarError as exc:
        _fail(exc)
    running = registrar_running(site)
    note = " (the running registrar applies it at its next start)" if running else ""
    click.echo(f"payload key grace: {_duration(site.config.payload_key_grace_s)}{note}")


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


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


# ----------------------------------------------------------------------------------- run


def _endpoint(value: str) -> Endpoint:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> Endpoint; a one-line ConfigError otherwise."""
    from trustcore.endpoint import Endpoint

    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--join needs HOST:PORT, not {value!r}")
    return Endpoint(host, int(port))


def _open_site(home: Path) -> SiteHome:
    from registrar.site import SiteHome

    try:
        return SiteHome.open(home)
    except RegistrarError as exc:
        _fail(exc)


#: Young-generation threshold of a serving registrar (Python's default: 700 allocations).
SERVING_GC_THRESHOLD = 20_000


def serving_gc() -> None:
    """The cycle collector of a registrar that has started: everything start-up built
    (modules, the site, trust anchors, the broker) is frozen out of its view, and a young
    collection runs every ``SERVING_GC_THRESHOLD`` allocations. A registration allocates
    thousands of short-lived objects that reference counting frees; with the defaults the
    collector ran every few registrations and walked them all (~7 % of the service's CPU,
    bench/registration_cpu.py)."""
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(SERVING_GC_THRESHOLD, older, oldest)


@main.command("run")
@_home_option
@_passphrase_option
@click.option(
    "--broker",
    type=click.Choice(["embedded", "mosquitto", "rabbitmq"]),
    default="embedded",
    show_default=True,
    help="embedded: amqtt in this process; mosquitto: a Mosquitto process the registrar owns; "
    "rabbitmq: the operator's cluster (--rabbitmq-node, --auth-port).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--registration-port", type=click.IntRange(0, 65535), default=8883, show_default=True)
@click.option("--operational-port", type=click.IntRange(0, 65535), default=8884, show_default=True)
@click.option(
    "--est-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve EST (RFC 7030, HTTPS with mutual TLS) on this port (0: any free port); "
    "see docs/est.md. Off without it.",
)
@click.option("--est-host", default=None, help="EST listen address (default: --host).")
@click.option(
    "--crl-check-interval",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds between site CRL refresh checks.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per log line on stderr (docs/operations.md).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics and /healthz on this port (0: any free port; default: off).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the metrics listener (unauthenticated: keep it on loopback or a "
    "management network).",
)
@click.option(
    "--instance",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="This registrar's number among the site's instances (2..16 need --join).",
)
@click.option(
    "--join",
    metavar="HOST:PORT",
    default=None,
    help="Serve on the Mosquitto broker that instance 1 runs (its operational listener) "
    "instead of starting one; needs a PostgreSQL --store shared with instance 1.",
)
@click.option(
    "--standby",
    is_flag=True,
    help="PostgreSQL store: if another registrar runs this site's duties, wait and take "
    "over when it stops (instead of refusing to start).",
)
@click.option(
    "--rabbitmq-node",
    "rabbitmq_nodes",
    multiple=True,
    metavar="NAME@HOST,IP,AMQP,MQTTS,MANAGEMENT,DIST",
    help="--broker rabbitmq: a cluster node, as given to broker-config (repeat for each).",
)
@click.option(
    "--rabbitmq-config",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="--broker rabbitmq: the directory broker-config rendered; the CRL hash directories "
    "of the nodes found there are rewritten at every CRL change.",
)
@click.option(
    "--auth-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="--broker rabbitmq: serve the nodes' HTTP auth backend here (loopback), the port "
    "of broker-config's --auth-url.",
)
@_store_option
def run_command(
    home: Path,
    passphrase_file: Path | None,
    broker: str,
    host: str,
    registration_port: int,
    operational_port: int,
    est_port: int | None,
    est_host: str | None,
    crl_check_interval: float,
    log_level: str,
    log_format: str,
    metrics_port: int | None,
    metrics_host: str,
    instance: int,
    join: str | None,
    standby: bool,
    rabbitmq_nodes: tuple[str, ...],
    rabbitmq_config: Path | None,
    auth_port: int | None,
    store: str | None,
) -> None:
    """Run the registrar: broker (two mTLS listeners), registration service, revocation,
    CRL refresh and status, until SIGINT or SIGTERM (graceful stop, exit 0).

    Several instances per site (Mosquitto, PostgreSQL store): instance 1 runs as usual;
    each further instance runs ``--instance N --join HOST:PORT`` with the same ``--store``
    and shares the request stream through MQTT v5 shared subscriptions. On RabbitMQ
    (``--broker rabbitmq``) every instance consumes the one quorum queue: give each its
    ``--instance N`` and the same nodes; instance 1 runs the site duties."""
    import asyncio
    import signal

    from registrar.app import AppSettings, RegistrarApp, run_registrar
    from registrar.run_dir import store_location
    from registrar.site import SiteSecrets
    from trustcore.endpoint import Endpoint
    from trustcore.logformat import configure_logging

    configure_logging(log_level, log_format, command="registrar")  # type: ignore[arg-type]
    site = _open_site(home)
    try:
        rabbitmq = None
        if broker == "rabbitmq" or rabbitmq_nodes or auth_port is not None:
            from registrar.broker.rabbitmq import parse_node
            from registrar.broker.rabbitmq_site import RabbitMQSiteSettings

            parsed = tuple(parse_node(n) for n in rabbitmq_nodes)
            rabbitmq = RabbitMQSiteSettings(
                nodes=parsed,
                auth_port=auth_port or 0,
                crl_dirs=()
                if rabbitmq_config is None
                else RabbitMQSiteSettings.crl_dirs_in(rabbitmq_config, parsed),
            )
        settings = AppSettings(
            broker=broker,  # type: ignore[arg-type]
            rabbitmq=rabbitmq,
            host=host,
            registration_port=registration_port,
            operational_port=operational_port,
            est_port=est_port,
            est_host=est_host,
            crl_check_interval=crl_check_interval,
            store=store,
            instance=instance,
            join=None if join is None else _endpoint(join),
            standby=standby,
            metrics=None if metrics_port is None else Endpoint(metrics_host, metrics_port),
        )
        store_location(site, store)  # a bad URL: one line now, not at start-up
    except RegistrarError as exc:
        _fail(exc)

    def ready(app: RegistrarApp) -> None:
        serving_gc()
        if settings.rabbitmq is not None:
            reg = app.registration_endpoint
            click.echo(
                f"registrar instance {instance} running for site {site.site_id}: serving on "
                f"{reg.host}:{reg.port} (rabbitmq, {len(settings.rabbitmq.nodes)} node(s), auth "
                f"backend 127.0.0.1:{settings.rabbitmq.auth_port}); stop with Ctrl-C"
            )
            sys.stdout.flush()
            return
        if settings.join is not None:
            click.echo(
                f"registrar instance {instance} running for site {site.site_id}: serving on "
                f"{settings.join.host}:{settings.join.port} ({broker}); stop with Ctrl-C"
            )
            sys.stdout.flush()
            return
        reg, op = app.registration_endpoint, app.operational_endpoint
        est = "" if app.est is None else f", EST {app.est.endpoint.host}:{app.est.endpoint.port}"
        metrics = app.metrics_endpoint
        served = "" if metrics is None else f", metrics http://{metrics.host}:{metrics.port}/"
        click.echo(
            f"registrar running for site {site.site_id}: registration {reg.host}:{reg.port}, "
            f"operational {op.host}:{op.port}{est} ({broker}){served}; stop with Ctrl-C",
        )
        sys.stdout.flush()

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_registrar(site, SiteSecrets(passphrase_file), settings, stop=stop, ready=ready)

    try:
        asyncio.run(main_loop())
    except RegistrarError as exc:
        _fail(exc)
    click.echo("registrar stopped")


# ------------------------------------------------------------------------- broker-config


@main.command("broker-config")
@click.argument("kind", type=click.Choice(["rabbitmq"]))
@_home_option
@_passphrase_option
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

    site = _open_site(home)
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
        _fail(exc)
    for name, node_files in files.items():
        click.echo(f"{kind} node {name}: {node_files.directory}")


# -------------------------------------------------------------------------------- status


def _store_snapshot(site: SiteHome, store_url: str | None = None) -> dict[str, Any]:
    """Counts, devices and recent events from the store (read while a registrar runs, too).
    A site that never ran has no database yet: nothing is created by reading."""
    import asyncio

    from registrar.run_dir import store_location
    from registrar.store import Store

    location = store_location(site, store_url)
    if location.kind == "sqlite" and not location.path.exists():
        return {
            "counts": {},
            "devices": [],
            "certificates": [],
            "registered": [],
            "revoked": [],
            "refused": [],
            "key_periods": [],
            "per_key": {},
        }

    async def read() -> dict[str, Any]:
        store = await Store.open(location)
        try:
            devices = await store.devices()
            return {
                "counts": await store.counts(),
                "devices": devices,
                "certificates": await store.certificates(),
                "registered": await store.events(10, "registered"),
                "revoked": await store.events(10, "revoked"),
                "refused": await store.events(10, "refused"),
                "key_periods": await store.key_periods(),
                "per_key": await store.devices_per_payload_key(),
            }
        finally:
            await store.close()

    return asyncio.run(read())


def _payload_key_rows(site: SiteHome, snap: dict[str, Any]) -> list[dict[str, Any]]:
    """Per payload key: state and devices on it, from the store and the key file (key ids
    only, nothing decrypted), for a site whose registrar is not running."""
    import time

    from registrar.key_distribution import key_rows
    from registrar.payload_keys import listed_key_ids
    from trustcore.key_rotation import KeyPeriod, KeySchedule

    if not site.commissioned:
        return []
    try:
        current, ids = listed_key_ids(site.payload_keys_path)
    except RegistrarError:
        return []
    from trustcore.errors import TrustCoreError

    try:
        schedule = KeySchedule(
            tuple(KeyPeriod(*p) for p in snap["key_periods"]), site.config.payload_key_grace_s
        )
        if current is not None:  # what a registrar starting now would record
            schedule = schedule.with_current(current, int(time.time()))
    except TrustCoreError as exc:
        click.echo(f"warning: payload key periods unreadable: {exc}", err=True)
        return []
    return key_rows(schedule, ids, snap["per_key"], int(time.time()))


def _when(ts: float | int | None) -> str:
    from datetime import UTC, datetime

    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@main.command("status")
@_home_option
@_store_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status_command(home: Path, store: str | None, as_json: bool) -> None:
    """Listeners of the running registrar, counts, last registrations and revocations."""
    import json
    from dataclasses import asdict

    from registrar.run_dir import read_status

    site = _open_site(home)
    running = read_status(site)
    try:
        snap = _store_snapshot(site, store)
    except RegistrarError as exc:
        _fail(exc)
    devices = snap["devices"]
    by_status: dict[str, int] = {}
    for record in devices:
        by_status[record.status] = by_status.get(record.status, 0) + 1
    state = site.commission_state() or {}
    payload_keys = (running or {}).get("payload_keys") or _payload_key_rows(site, snap)
    doc = {
        "site_id": site.site_id.value,
        "commissioned": site.commissioned,
        "bundle_sequence": state.get("bundle_sequence"),
        "revocation_list_sequence": state.get("revocation_list_sequence"),
        "running": running is not None,
        "instance": running,
        "counts": snap["counts"],
        "devices": by_status,
        "last_registrations": [asdict(e) for e in snap["registered"]],
        "last_revocations": [asdict(e) for e in snap["revoked"]],
        "last_refusals": [asdict(e) for e in snap["refused"]],
        "payload_keys": payload_keys,
        "payload_key_grace_s": site.config.payload_key_grace_s,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    console = Console(highlight=False)
    table = Table(title=f"site {doc['site_id']}", show_header=False)
    table.add_column("item")
    table.add_column("value")
    table.add_row("commissioned", f"bundle {doc['bundle_sequence']}" if site.commissioned else "no")
    if running is None:
        table.add_row("registrar", "[yellow]not running[/]")
    else:
        table.add_row("registrar", f"running (pid {running['pid']}, {running['broker']} broker)")
        for name, ep in running["listeners"].items():
            table.add_row(f"{name} listener", f"{ep['host']}:{ep['port']}")
        if running.get("metrics"):
            ep = running["metrics"]
            table.add_row("metrics", f"http://{ep['host']}:{ep['port']}/metrics, /healthz")
        table.add_row("payload key", str(running.get("payload_key")))
        table.add_row("site CRL valid until", str(running.get("site_crl_next_update")))
        site_ca = running.get("site_ca") or {}
        if site_ca.get("issuing"):
            retiring = site_ca.get("retiring")
            table.add_row(
                "site CA",
                str(site_ca["issuing"]) + (f" (retiring: {retiring})" if retiring else ""),
            )
        tele = running.get("telemetry", {})
        table.add_row(
            "telemetry", f"{tele.get('messages', 0)} decrypted, {tele.get('rejected', 0)} rejected"
        )
    table.add_row("HQ revocation list", f"sequence {doc['revocation_list_sequence']}")
    hq_data = (running or {}).get("hq_revocation_data")
    if hq_data:
        table.add_row(
            "HQ data age",
            f"{hq_data['age_days']} of {hq_data['max_offline_days']} days "
            f"({hq_data['state']}; new registrations stop {hq_data['refuse_after']})",
        )
    table.add_row(
        "devices",
        ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none registered",
    )
    console.print(table)
    for alert in (running or {}).get("alerts", []):
        console.print(f"[bold red]ALERT[/] {alert}")
    if payload_keys:
        keys = Table(title=f"payload keys (grace {_duration(site.config.payload_key_grace_s)})")
        keys.add_column("key id", no_wrap=True)
        for col in ("state", "superseded", "retires", "devices on it", "refused"):
            keys.add_column(col)
        for row in payload_keys:
            keys.add_row(
                row["key_id"],
                row["state"],
                _when(row["superseded_at"])[:16],
                _when(row["retires_at"])[:16],
                str(row["devices"]),
                str(row.get("telemetry_refused") or 0),
            )
        console.print(keys)
    for title, events in (
        ("last registrations", snap["registered"]),
        ("last revocations", snap["revoked"]),
    ):
        if not events:
            continue
        t = Table(title=title)
        for col in ("time (UTC)", "device", "detail"):
            t.add_column(col)
        for e in events:
            t.add_row(_when(e.time), e.device_id or "-", e.detail)
        console.print(t)


# ------------------------------------------------------------------------------- devices


@main.command("devices")
@_home_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
@click.option(
    "--certificates",
    "show_chain",
    is_flag=True,
    help="Also list every LDevID of each device (issued, notAfter, superseded, revoked).",
)
@_store_option
def devices_command(home: Path, as_json: bool, show_chain: bool, store: str | None) -> None:
    """Registered devices (status, station, certificates, payload key). Each device's chain
    of LDevIDs (registration and renewals) is in the JSON as ``certificates``."""
    import json

    site = _open_site(home)
    try:
        snapshot = _store_snapshot(site, store)
    except RegistrarError as exc:
        _fail(exc)
    chains: dict[str, list[dict[str, Any]]] = {}
    for c in snapshot["certificates"]:
        chains.setdefault(c.device_id, []).append(
            {
                "serial": c.serial,
                "kind": c.kind,
                "state": c.state,
                "issued_at": c.issued_at,
                "not_after": c.not_after,
                "superseded_at": c.superseded_at,
                "revoked_at": c.revoked_at,
            }
        )
    rows = [
        {
            "device_id": d.device_id,
            "status": d.status,
            "station_id": d.station_id,
            "idevid_serial": d.idevid_serial,
            "ldevid_serial": d.ldevid_serial,
            "payload_key_id": d.payload_key_id.hex(),
            "registered_at": d.registered_at,
            "registrations": d.registrations,
            "renewals": sum(1 for c in chains.get(d.device_id, []) if c["kind"] == "renewal"),
            "certificates": chains.get(d.device_id, []),
        }
        for d in snapshot["devices"]
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    table = Table(title=f"{len(rows)} device(s)")
    columns = ("device", "status", "station", "LDevID serial", "payload key", "registered")
    for col in (*columns, "renewals"):
        table.add_column(col)
    for r in rows:
        status = r["status"] if r["status"] == "registered" else f"[red]{r['status']}[/]"
        table.add_row(
            r["device_id"],
            status,
            r["station_id"] or "-",
            r["ldevid_serial"],
            r["payload_key_id"],
            _when(r["registered_at"]),
            str(r["renewals"]),
        )
    console = Console(highlight=False)
    console.print(table)
    if not show_chain:
        return
    chain_table = Table(title="LDevID certificates per device (oldest first)")
    for col in ("device", "serial", "kind", "state", "issued", "notAfter", "superseded", "revoked"):
        chain_table.add_column(col)
    for r in rows:
        for c in r["certificates"]:
            chain_table.add_row(
                r["device_id"],
                c["serial"],
                c["kind"],
                c["state"],
                _when(c["issued_at"]),
                _when(c["not_after"]),
                _when(c["superseded_at"]),
                _when(c["revoked_at"]),
            )
    console.print(chain_table)


@main.command("ldevid-policy")
@_home_option
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

    site = _open_site(home)
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
        if expired_reregistration is not None:
            changes["expired_reregistration"] = expired_reregistration
        if changes:
            try:
                policy = dataclasses.replace(policy, **changes)
            except InvalidValueError as exc:
                raise ConfigError(exc.message, reason="bad_policy") from exc
            write_ldevid_policy(site.path, policy)
    except RegistrarError as exc:
        _refused(exc)
    doc = policy_json(policy)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for key in sorted(doc):
        click.echo(f"{key}: {doc[key]}")
    if changes:
        click.echo("saved; restart `registrar run` to apply")


# ---------------------------------------------------- commands that act live or offline


def _rotation_wait(site: SiteHome) -> float:
    """How long ``rotate-payload-key`` waits for the running registrar: it answers once
    every registered device's update is published (about 3 ms each on this class of
    machine: 10,000 devices took ~30 s in bench/soak.py), so 30 s plus 10 ms a device."""
    from registrar.run_dir import read_status

    status = read_status(site) or {}
    counts = status.get("counts")
    devices = counts.get("devices", 0) if isinstance(counts, dict) else 0
    return 30.0 + 0.01 * (devices if isinstance(devices, int) and devices > 0 else 0)


def _live_or_offline(
    site: SiteHome,
    command: str,
    args: dict[str, Any],
    offline: Callable[[], dict[str, Any]],
    *,
    data: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[dict[str, Any], bool]:
    """Run ``offline`` while holding the instance lock when no registrar runs; otherwise
    hand the command to the running registrar (it applies it live). Returns the result and
    whether it was applied live."""
    from registrar.run_dir import instance_lock, read_status
    from registrar.spool import submit_command

    with instance_lock(site, wait=0.0 if read_status(site) else 5.0) as free:
        if free:
            return offline(), False
    answer = submit_command(site, command, args, data=data, timeout=timeout)
    if answer is None:
        _fail(
            RegistrarError(
                f"the running registrar did not answer within {timeout:.0f} s; the request "
                "stays queued and the registrar applies it (it may be doing so now): see "
                "`registrar status` and its log",
                reason="timeout",
            )
        )
    if not answer.get("ok"):
        click.echo(f"REFUSED ({answer.get('reason')}): {answer.get('error')}", err=True)
        sys.exit(EXIT_REFUSED)
    result = answer["result"]
    assert isinstance(result, dict)
    return result, True


def _run_offline(
    site: SiteHome, secrets: Any, work: Callable[[Any], Any], store_url: str | None = None
) -> Any:
    import asyncio

    from registrar.run_dir import store_location
    from registrar.store import Store

    async def go() -> Any:
        store = await Store.open(store_location(site, store_url))
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _refused(exc: RegistrarError) -> NoReturn:
    click.echo(f"REFUSED ({exc.reason}): {exc.args[0]}", err=True)
    sys.exit(EXIT_REFUSED)


@main.command("revoke")
@_home_option
@_passphrase_option
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
@_store_option
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
    from trustcore.errors import InvalidValueError
    from trustcore.identity import DeviceId

    site = _open_site(home)
    secrets = SiteSecrets(passphrase_file)
    try:
        device = DeviceId(device_id)
    except InvalidValueError as exc:
        _refused(RegistrarError(exc.message, reason="bad_device_id"))

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            return revoke_json(
                await revoke_device(
                    home=site, secrets=secrets, store=opened, device_id=device, reason=reason
                )
            )

        return dict(_run_offline(site, secrets, work, store))

    try:
        result, live = _live_or_offline(
            site, "revoke", {"device_id": device.value, "reason": reason}, offline
        )
    except RegistrarError as exc:
        if exc.reason in ("unknown_device", "bad_reason"):
            _refused(exc)
        _fail(exc)
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


@main.command("import-revocations")
@_home_option
@_passphrase_option
@click.argument("list_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True)
@_store_option
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

    site = _open_site(home)
    secrets = SiteSecrets(passphrase_file)
    try:
        package = list_file.read_bytes()
    except OSError as exc:
        _fail(RegistrarError(f"cannot read {list_file}: {exc}", reason="io_error"))

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            result, _ = await import_revocation_list(
                home=site, secrets=secrets, store=opened, package=package
            )
            return import_json(result)

        return dict(_run_offline(site, secrets, work, store))

    try:
        result, live = _live_or_offline(site, "import-revocations", {}, offline, data=package)
    except RegistrarError as exc:
        if exc.reason in ("bad_config", "store_failed", "io_error"):
            _fail(exc)
        _refused(exc)
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


@main.command("rotate-payload-key")
@_home_option
@_passphrase_option
@click.option("--json", "as_json", is_flag=True)
def rotate_payload_key_command(home: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Make a new AES payload key current and send it, wrapped to each registered device's
    TPM key, on devices/<id>/keys (retained). Offline, devices get it when the registrar
    next starts."""
    import json

    from registrar.site import SiteSecrets, load_commissioned_site, revocation_lock

    site = _open_site(home)
    secrets = SiteSecrets(passphrase_file)

    def offline() -> dict[str, Any]:
        commissioned = load_commissioned_site(site, secrets)
        with revocation_lock(site):
            ring = commissioned.payload_keys.rotate()
        return {"key_id": ring.current.key_id.hex(), "updates_published": 0}

    try:
        result, live = _live_or_offline(
            site, "rotate-payload-key", {}, offline, timeout=_rotation_wait(site)
        )
    except RegistrarError as exc:
        _fail(exc)
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


@main.command("send-command")
@_home_option
@click.argument("device_id")
@click.argument("message")
def send_command_command(home: Path, device_id: str, message: str) -> None:
    """Send MESSAGE to a device on devices/<id>/cmd, encrypted with the current payload key
    (needs a running registrar)."""
    from registrar.run_dir import registrar_running
    from registrar.spool import submit_command

    site = _open_site(home)
    if not registrar_running(site):
        _fail(RegistrarError("no registrar is running for this site", reason="not_running"))
    answer = submit_command(
        site, "send-command", {"device_id": device_id}, data=message.encode("utf-8")
    )
    if answer is None:
        _fail(RegistrarError("the running registrar did not answer", reason="timeout"))
    if not answer.get("ok"):
        click.echo(f"REFUSED ({answer.get('reason')}): {answer.get('error')}", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo(f"sent on {answer['result']['topic']}")


@main.command("report")
@_home_option
@_passphrase_option
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@_store_option
def report_command(home: Path, passphrase_file: Path | None, out: Path, store: str | None) -> None:
    """Write the next signed site report for HQ (`hq ingest-report`): every factory
    certificate seen, with the certificate as evidence, and every registration."""
    from registrar.report import write_site_report
    from registrar.site import SiteSecrets

    site = _open_site(home)
    try:
        result = write_site_report(site, SiteSecrets(passphrase_file), out, store=store)
    except RegistrarError as exc:
        _fail(exc)
    click.echo(
        f"site report {result.sequence}: {result.seen} factory certificate(s) seen, "
        f"{result.registered} registration(s); written to {result.out}"
    )


# ------------------------------------------------------------- admission plugins (holds)


@main.command("pending")
@_home_option
@click.option("--json", "as_json", is_flag=True)
@_store_option
def pending_command(home: Path, as_json: bool, store: str | None) -> None:
    """Devices an admission plugin (e.g. hold_unlisted) holds for the installer's approval."""
    import json
    from dataclasses import asdict

    from registrar.run_dir import store_location
    from registrar.store import PendingApproval, Store

    site = _open_site(home)

    async def read() -> list[PendingApproval]:
        opened = await Store.open(store_location(site, store))
        try:
            return await opened.pending()
        finally:
            await opened.close()

    import asyncio

    try:
        rows = asyncio.run(read())
    except RegistrarError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no devices waiting for approval")
    for r in rows:
        click.echo(
            f"{r.device_id}  station {r.station_id}  idevid {r.idevid_serial}  "
            f"held by {r.plugin} ({r.reason})  first {_when(r.first_seen)}  "
            f"attempts {r.attempts}"
        )


@main.command("approve")
@_home_option
@click.argument("device_id")
@_store_option
def approve_command(home: Path, device_id: str, store: str | None) -> None:
    """Approve a held device: recorded durably (live through the running registrar, if one
    runs); the device's next retry registers. Approval admits only a device that passes
    every other check (chain, revocation, signature, CSR)."""
    import time

    from trustcore.errors import InvalidValueError
    from trustcore.identity import DeviceId

    site = _open_site(home)
    try:
        device = DeviceId(device_id)
    except InvalidValueError as exc:
        _refused(RegistrarError(exc.message, reason="bad_device_id"))

    def offline() -> dict[str, Any]:
        async def work(opened: Any) -> dict[str, Any]:
            pending = await opened.approve(device, at=int(time.time()))
            return {"device_id": device.value, "was_pending": pending}

        return dict(_run_offline(site, None, work, store))

    try:
        result, live = _live_or_offline(site, "approve", {"device_id": device.value}, offline)
    except RegistrarError as exc:
        _fail(exc)
    note = "" if result["was_pending"] else " (it was not pending: pre-approved)"
    click.echo(
        f"{result['device_id']} approved{note}; "
        + ("the running registrar admits its next retry" if live else "admitted from now on")
    )


# ------------------------------------------------------------------------ site CA rollover


@main.command("rollover-ca")
@_home_option
@_passphrase_option
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

    site = _open_site(home)
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
                _refused(exc)
            _fail(exc)
        except (OSError, SignerError) as exc:  # e.g. --out names a file that exists
            _fail(RegistrarError(f"cannot write the request: {exc}", reason="io_error"))
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
    return list(_store_snapshot(site)["devices"])


def _rollover_status(site: SiteHome, secrets: Any, as_json: bool) -> None:
    import json

    from registrar.rollover import rollover_status

    try:
        doc = rollover_status(site, _rollover_records(site, secrets))
    except RegistrarError as exc:
        _fail(exc)
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
        _fail(
            RegistrarError(
                "no registrar is running: --migrate-all publishes to devices through it",
                reason="not_running",
            )
        )
    answer = submit_command(site, "migrate-ca", {}, timeout=60)
    if answer is None:
        _fail(RegistrarError("the running registrar did not answer", reason="timeout"))
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
        result, live = _live_or_offline(site, "retire-ca", {}, offline, timeout=30)
    except RegistrarError as exc:
        if exc.reason in ("ca_in_use", "nothing_to_retire"):
            _refused(exc)
        _fail(exc)
    if as_json:
        click.echo(json.dumps({**result, "live": live}, indent=2, sort_keys=True))
        return
    click.echo(
        f"retired {result['retired']}: no longer trusted, key {result['key']} destroyed"
        + ("; brokers reloaded" if live else "")
    )
