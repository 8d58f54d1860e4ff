"""``registrar run``: the command that starts a site registrar (:mod:`registrar.app`)
from its options, prints where it serves and runs it until SIGINT/SIGTERM; and the cycle
collector setting of a serving registrar (:func:`serving_gc`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from registrar.cli_common import fail, home_option, open_site, passphrase_option, store_option
from registrar.errors import ConfigError, RegistrarError
from trustcore.cli_net import log_options

if TYPE_CHECKING:
    from trustcore.endpoint import Endpoint
    from trustcore.logformat import LogFormat

__all__ = ["SERVING_GC_THRESHOLD", "run_command", "serving_gc"]


def _endpoint(value: str) -> Endpoint:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> Endpoint; a one-line ConfigError otherwise."""
    from trustcore.endpoint import Endpoint

    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--join needs HOST:PORT, not {value!r}")
    return Endpoint(host, int(port))


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


@click.command("run")
@home_option
@passphrase_option
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
@log_options
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
@store_option
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
    log_format: LogFormat,
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

    configure_logging(log_level, log_format, command="registrar")
    site = open_site(home)
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
        fail(exc)

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
        fail(exc)
    click.echo("registrar stopped")
