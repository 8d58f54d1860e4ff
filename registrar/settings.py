"""How ``registrar run`` runs: :class:`AppSettings`, the validated CLI options of one
registrar process (broker kind, listeners, intervals, store, instance number, standby,
RabbitMQ cluster, operations listener). Invalid combinations are a ``ConfigError`` here,
before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from broker_config.render import MAX_REGISTRAR_INSTANCES
from registrar.errors import ConfigError
from trustcore.endpoint import Endpoint

if TYPE_CHECKING:
    from registrar.broker.rabbitmq_site import RabbitMQSiteSettings

__all__ = ["AppSettings"]


@dataclass(frozen=True)
class AppSettings:
    """How ``registrar run`` runs (CLI options; validated here)."""

    broker: Literal["embedded", "mosquitto", "rabbitmq"] = "embedded"
    host: str = "127.0.0.1"
    registration_port: int = 8883
    operational_port: int = 8884
    #: ``--est-port``: the EST (RFC 7030) listener (:mod:`registrar.est`); None: none.
    #: Served by the instance that runs the site duties.
    est_port: int | None = None
    #: ``--est-host``; None: :attr:`host`.
    est_host: str | None = None
    watch_interval: float = 0.2
    status_interval: float = 0.5
    crl_check_interval: float = 60.0
    mosquitto_executable: str = "mosquitto"
    concurrency: int = 512
    #: ``--store URL``; None: the site home's SQLite file
    #: (:func:`registrar.run_dir.store_location`).
    store: str | None = None
    #: ``--instance N``: this registrar's number among the site's instances (1: the one
    #: that runs the broker and the site duties; 2..16 join it, see :attr:`join`).
    instance: int = 1
    #: ``--join HOST:PORT``: the operational listener of the Mosquitto broker that instance
    #: 1 runs; this instance serves requests there and starts no broker of its own.
    join: Endpoint | None = None
    #: ``--standby`` (PostgreSQL store): wait for the site duties while another registrar
    #: of the site holds them, and take over when it stops (:mod:`registrar.leadership`).
    standby: bool = False
    #: ``--broker rabbitmq``: the operator's cluster (nodes, auth backend port, CRL dirs).
    #: Every instance consumes the one quorum queue (no --join); instance 1 runs the site
    #: duties (:mod:`registrar.broker.rabbitmq_site`).
    rabbitmq: RabbitMQSiteSettings | None = None
    #: ``--metrics-port`` / ``--metrics-host``: serve ``/metrics`` and ``/healthz`` there
    #: (:mod:`registrar.ops_server`); None: no operations listener.
    metrics: Endpoint | None = None

    def __post_init__(self) -> None:
        if self.broker not in ("embedded", "mosquitto", "rabbitmq"):
            raise ConfigError(f"unknown broker {self.broker!r}")
        if not 1 <= self.instance <= MAX_REGISTRAR_INSTANCES:
            raise ConfigError(f"--instance must be 1..{MAX_REGISTRAR_INSTANCES}")
        if (self.broker == "rabbitmq") != (self.rabbitmq is not None):
            raise ConfigError("--broker rabbitmq needs the cluster's nodes, and only it")
        if self.broker == "rabbitmq":
            if self.join is not None:
                raise ConfigError("on RabbitMQ every instance consumes the queue: no --join")
        elif self.instance > 1 or self.join is not None:
            if self.broker != "mosquitto":
                raise ConfigError(
                    "the embedded broker serves one registrar instance (MQTT 3.1.1 has no "
                    "shared subscriptions): several instances need --broker mosquitto"
                )
            if self.join is None or self.instance == 1:
                raise ConfigError(
                    "instance 1 runs the broker; instances 2..16 join it with "
                    "--instance N --join HOST:PORT (its operational listener)"
                )
            if self.standby:
                raise ConfigError(
                    "--standby is for a registrar that runs the site duties, not --join"
                )
        if self.est_port is not None and (self.join is not None or self.instance > 1):
            raise ConfigError("--est-port is served by instance 1 (the site duties)")
        ports = [self.registration_port, self.operational_port, self.est_port or 0]
        if self.metrics is not None:
            ports.append(self.metrics.port)
        for port in ports:
            if not 0 <= port <= 65535:
                raise ConfigError(f"bad port {port}")
        if min(self.watch_interval, self.status_interval, self.crl_check_interval) <= 0:
            raise ConfigError("intervals must be positive")
