"""``registrar run --broker rabbitmq``: the registrar's side of an operator-run cluster.

The RabbitMQ nodes are not the registrar's processes (the operator runs them from the files
``registrar broker-config rabbitmq`` rendered); what one registrar instance owns is:

* the **HTTP auth backend** the nodes call (:class:`~registrar.broker.rabbitmq_auth.AuthBackend`)
  on ``auth_port``, in the registrar's event loop, with the table of live sessions fed from
  the cluster's connection events (clone checks). **Every** instance serves it on its own
  port: the answers come from the shared store (a revoked device is refused by all), so
  any instance can answer any node. ``auth_backend_http`` takes one URL per node: point
  each node at the instance on its own machine (``broker-config --auth-url`` per node) or
  at a local TCP balancer in front of every instance; a node whose backend is down refuses
  new connects (fail closed) while live sessions continue.
* the administrator password: derived from the site passphrase (HMAC, never on disk), so
  every instance of the site logs in to AMQP and the management API with the same one and
  any instance's backend admits it.
* the :class:`~registrar.broker.Broker` verbs: ``reload_crls`` rewrites the CRL hash
  directory of every node whose rendered directory is on this machine (``crl_dirs``; the
  nodes re-read it per handshake), ``block``/``disconnect`` through the management API,
  ``connection_mark``/``cut_superseded`` from the connection events (RabbitMQ cannot show
  a session's certificate serial; one live connection per identity is enforced, so a
  connection made after the mark used the new certificate). Nodes on other machines get
  the CRL by the same hash-directory write there: the operator syncs the site's
  ``crls.pem`` (or runs an instance there, whose reload writes the local nodes' dirs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from base64 import urlsafe_b64encode
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from registrar.broker.rabbitmq import (
    NodeFiles,
    RabbitManagement,
    RabbitNode,
    write_crl_hash_dir,
)
from registrar.broker.rabbitmq_auth import (
    ADMIN_USER,
    AuthBackend,
    AuthPolicy,
    DeviceDirectory,
    LiveSessions,
)
from registrar.channel_amqp import AmqpEndpoint, ConnectionEvents
from registrar.errors import BrokerError, ConfigError
from trustcore.endpoint import Endpoint

log = logging.getLogger(__name__)


def admin_password(site_passphrase: bytes, site_id: str) -> str:
    """The administrator's password of one site: the same for every instance (derived from
    the site passphrase they all hold), never written anywhere."""
    if not site_passphrase:
        raise ConfigError("the site passphrase is empty")
    mac = hmac.new(
        site_passphrase, b"devtrust rabbitmq administrator\0" + site_id.encode(), hashlib.sha256
    ).digest()
    return urlsafe_b64encode(mac).decode().rstrip("=")


@dataclass(frozen=True)
class RabbitMQSiteSettings:
    """``--rabbitmq-node`` (repeat), ``--auth-port``, ``--rabbitmq-config`` (the rendered
    directory: the CRL hash dirs of the nodes on this machine)."""

    nodes: tuple[RabbitNode, ...]
    auth_port: int
    auth_host: str = "127.0.0.1"
    crl_dirs: tuple[Path, ...] = ()
    #: How long start() waits for a node to accept the AMQP login (nodes may be booting).
    start_timeout: float = 90.0

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("--broker rabbitmq needs at least one --rabbitmq-node")
        if not 0 < self.auth_port <= 65535:
            raise ConfigError("--broker rabbitmq needs --auth-port (the nodes' auth URL port)")

    @staticmethod
    def crl_dirs_in(rendered: Path, nodes: Sequence[RabbitNode]) -> tuple[Path, ...]:
        """The CRL hash directories of the nodes rendered under ``rendered`` (those present)."""
        dirs = (NodeFiles(rendered / n.short).crl_dir for n in nodes)
        return tuple(d for d in dirs if d.is_dir())


class RabbitMQSite:
    """One registrar instance's view of the cluster (see the module text)."""

    def __init__(
        self,
        settings: RabbitMQSiteSettings,
        directory: DeviceDirectory,
        password: str,
        crl_file: Path,
    ) -> None:
        self._settings = settings
        self.password = password
        self._crl_file = crl_file
        self.live = LiveSessions()
        self.backend = AuthBackend(directory, AuthPolicy(password), live=self.live)
        self.management = RabbitManagement(settings.nodes, ADMIN_USER, password)
        self.amqp = tuple(
            AmqpEndpoint(n.host, n.amqp_port, ADMIN_USER, password) for n in settings.nodes
        )
        self._events = ConnectionEvents(self.amqp, self.live, self.management.cluster_nodes)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def registration_endpoint(self) -> Endpoint:
        node = self._settings.nodes[0]
        return Endpoint(node.host, node.mqtts_port)

    @property
    def operational_endpoint(self) -> Endpoint:
        return self.registration_endpoint  # one mqtts listener per node serves both

    async def start(self) -> None:
        """Serve the auth backend, then follow the connection events (the nodes may still
        be starting: the backend answers meanwhile, the events reconnect)."""
        await self.backend.start(self._settings.auth_host, self._settings.auth_port)
        self._task = asyncio.create_task(self._events.run(self._stop), name="rabbit-events")
        try:
            await asyncio.wait_for(self._events.connected.wait(), self._settings.start_timeout)
        except TimeoutError as exc:
            await self.stop()
            raise BrokerError("no RabbitMQ node accepted the registrar's AMQP login") from exc

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        await self.management.close()
        await self.backend.stop()

    async def reload_crls(self) -> None:
        try:
            data = self._crl_file.read_bytes()
        except OSError as exc:
            raise BrokerError(f"cannot read the CRL file: {exc}") from exc
        for directory in self._settings.crl_dirs:
            await asyncio.to_thread(write_crl_hash_dir, directory, data)

    async def disconnect(self, identity: str) -> int:
        return await self.management.close_connections(identity)

    async def block(self, identity: str) -> None:
        self.backend.blocked.add(identity)
        with contextlib.suppress(BrokerError):  # at start the nodes may not be up yet
            await self.disconnect(identity)

    def connected_devices(self) -> int:
        return self.live.devices()

    def connection_mark(self, identity: str) -> int:
        return self.live.mark()

    async def cut_superseded(self, identity: str, serials: frozenset[int], mark: int) -> int:
        if self.live.created_since(identity, mark):
            return 0  # that connection passed the CRL (new certificate); one per identity
        return await self.disconnect(identity)
