"""The HTTP auth backend RabbitMQ nodes ask before every connect, vhost, queue and topic use.

``rabbitmq_auth_backend_http`` is the only auth backend of our nodes, so this registrar
module decides everything, live, from the registry (a revocation needs no broker change):

* **user** (``/user``): a device logs in with its certificate only: RabbitMQ then sends the
  CN as ``username`` and no ``password`` field. A login WITH a password is refused for
  every device identity (measured: a client that sends a username and password gets those
  checked instead of its certificate's CN, so ``dev-a``'s certificate with username
  ``dev-b`` would otherwise be ``dev-b``). Only the registrar's administrator logs in with
  a password (a random one held in memory, compared in constant time). Revoked and
  blocked identities are refused; ``registrar@site`` is refused (the registrar uses AMQP
  with its administrator, and a rogue station CA could mint that CN).
* **vhost** (``/vhost``): the site vhost only; the MQTT client id must equal the
  certificate identity (otherwise a device could take over another's session), and a
  second live connection of an identity is refused (a clone signal, reported; the live
  connections come from the cluster's connection events, :class:`LiveSessions`).
* **resource** (``/resource``): a device may use its own MQTT subscription queues
  (``mqtt-subscription-<id>qos0|1``) and read/write ``amq.topic``; nothing else.
* **topic** (``/topic``): routing keys are MQTT topics with ``/`` → ``.`` (and ``.`` →
  ``/``, ``+`` → ``*``); they are mapped back and judged by :mod:`trustcore.topics`: an
  unregistered device its registration request/response pair only, a registered one also
  ``devices/<id>/...``. RabbitMQ caches topic answers per connection: a revocation must
  also close the live connection (:class:`registrar.broker.rabbitmq.RabbitManagement`).

Anything malformed or unexpected is ``deny`` (fail closed); an exception while deciding is
logged and answered ``deny``. :func:`decide` is pure; :class:`AuthBackend` serves it with
aiohttp in the registrar's event loop, on loopback (or behind mTLS: pass ``ssl``).
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from registrar.broker import REGISTRAR_IDENTITY, is_device_identity
from registrar.broker.rabbitmq import amqp_to_mqtt
from registrar.errors import BrokerError
from registrar.http_listener import start_http
from registrar.store.records import DeviceRecord
from trustcore.errors import InvalidValueError
from trustcore.identity import DeviceId
from trustcore.topics import Access, AccessRule, Listener, device_access

log = logging.getLogger(__name__)

#: The registrar's management/AMQP user. Contains "@", which no DeviceId can.
ADMIN_USER = "registrar-admin@site"
ALLOW = "allow"
DENY = "deny"
_KINDS = ("user", "vhost", "resource", "topic")


class DeviceDirectory(Protocol):
    """What the backend reads from the registry (:class:`registrar.store.Store` has it)."""

    async def device(self, device_id: DeviceId) -> DeviceRecord | None: ...


class LiveSessions:
    """Identity → its live connections, as the cluster's connection events report them.

    Why not ask the management API during the vhost check: the node's HTTP client is then
    busy waiting for this backend, and the management API needs this same backend to
    authenticate the request: measured, the two wait for each other until a timeout.
    So the table is fed from ``amq.rabbitmq.event`` (``connection.created``/``closed``,
    see :class:`registrar.channel_amqp.ConnectionEvents`); a node that went down takes its
    connections with it (:meth:`node_down`), since a dead node sends no ``closed``.
    """

    def __init__(self) -> None:
        # Only live connections are kept (plus one counter): nothing here grows with every
        # device the site ever saw, and a count is a dictionary look-up, not a scan.
        self._users: dict[tuple[str, str], str] = {}  # (node, connection name) -> user
        self._live: dict[str, int] = {}  # user -> live connections
        self._seq = 0  # connections created so far, all users
        self._last_created: dict[str, int] = {}  # live user -> seq of its newest connection

    def created(self, node: str, name: str, user: str) -> None:
        key = (node, name)
        if key in self._users:  # the same event twice: nothing new
            return
        self._users[key] = user
        self._live[user] = self._live.get(user, 0) + 1
        self._seq += 1
        self._last_created[user] = self._seq

    def mark(self) -> int:
        """A mark for superseded cuts: connections created later compare greater
        (:meth:`created_since`)."""
        return self._seq

    def created_since(self, identity: str, mark: int) -> bool:
        """Whether ``identity`` has a live connection created after ``mark``."""
        return self._last_created.get(identity, 0) > mark

    def closed(self, node: str, name: str) -> None:
        user = self._users.pop((node, name), None)
        if user is None:
            return
        left = self._live[user] - 1
        if left:
            self._live[user] = left
        else:
            del self._live[user], self._last_created[user]

    def node_down(self, node: str) -> None:
        for key in [k for k in self._users if k[0] == node]:
            self.closed(*key)

    def count(self, identity: str) -> int:
        return self._live.get(identity, 0)

    def devices(self) -> int:
        """Live device connections (service identities contain ``@``)."""
        return sum(n for user, n in self._live.items() if is_device_identity(user))

    def __len__(self) -> int:
        return len(self._users)


class Standing:
    """What the registry says about an identity."""

    UNKNOWN = "unknown"  # not registered (yet): registration topics only
    REGISTERED = "registered"
    REFUSED = "refused"  # revoked or blocked


@dataclass(frozen=True)
class AuthPolicy:
    """The fixed inputs of every decision."""

    admin_password: str = field(repr=False)
    vhost: str = "/"

    def __post_init__(self) -> None:
        if len(self.admin_password) < 24:
            raise BrokerError("the administrator password must be at least 24 characters")


def _device(identity: str) -> DeviceId | None:
    try:
        return DeviceId(identity)
    except InvalidValueError:
        return None


def _rule(device: DeviceId, standing: str) -> AccessRule:
    registration = device_access(device, Listener.REGISTRATION)
    if standing != Standing.REGISTERED:
        return registration
    operational = device_access(device, Listener.OPERATIONAL)
    return AccessRule(
        subtree=operational.subtree,
        extra_publish=registration.extra_publish,
        extra_subscribe=registration.extra_subscribe,
    )


def decide(
    kind: str,
    params: Mapping[str, str],
    policy: AuthPolicy,
    standing: str,
    live_connections: int = 0,
) -> str:
    """One answer of the backend: ``allow``, ``allow <tags>`` or ``deny``.

    ``standing`` is the :class:`Standing` of ``params['username']``; ``live_connections``
    how many connections that identity already has (vhost checks of devices only)."""
    username = params.get("username", "")
    if username == ADMIN_USER:
        return _decide_admin(kind, params, policy)
    device = _device(username)
    if device is None or standing == Standing.REFUSED or username == REGISTRAR_IDENTITY:
        return DENY
    if kind == "user":
        return DENY if "password" in params else ALLOW
    if params.get("vhost") != policy.vhost:
        return DENY
    if kind == "vhost":
        if params.get("client_id") != username:
            return DENY
        return DENY if live_connections > 0 else ALLOW
    if kind == "resource":
        return _decide_resource(params, username)
    if kind == "topic":
        return _decide_topic(params, device, standing)
    return DENY


def _decide_admin(kind: str, params: Mapping[str, str], policy: AuthPolicy) -> str:
    if kind == "user":
        given = params.get("password")
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), policy.admin_password.encode()
        ):
            return DENY
        return "allow administrator management"
    return ALLOW if params.get("vhost") == policy.vhost else DENY


def _decide_resource(params: Mapping[str, str], username: str) -> str:
    resource, name, permission = (params.get(k) for k in ("resource", "name", "permission"))
    if resource == "queue" and name in (
        f"mqtt-subscription-{username}qos0",
        f"mqtt-subscription-{username}qos1",
    ):
        return ALLOW if permission in ("configure", "read", "write") else DENY
    if resource == "exchange" and name == "amq.topic" and permission in ("read", "write"):
        return ALLOW
    return DENY


def _decide_topic(params: Mapping[str, str], device: DeviceId, standing: str) -> str:
    if params.get("resource") != "topic" or params.get("name") != "amq.topic":
        return DENY
    if params.get("variable_map.client_id", device.value) != device.value:
        return DENY
    permission = params.get("permission")
    access = {"write": Access.PUBLISH, "read": Access.SUBSCRIBE}.get(permission or "")
    routing_key = params.get("routing_key")
    if access is None or not routing_key:
        return DENY
    topic = amqp_to_mqtt(routing_key)
    return ALLOW if _rule(device, standing).allows(access, topic) else DENY


class AuthBackend:
    """Serves :func:`decide` to the nodes over HTTP (``POST`` or ``GET``; form or query)."""

    def __init__(
        self,
        directory: DeviceDirectory,
        policy: AuthPolicy,
        *,
        blocked: set[str] | None = None,
        live: LiveSessions | None = None,
        on_clone: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> None:
        self._directory = directory
        self._policy = policy
        #: Identities refused whatever the registry says (shared with RabbitMQTier.block).
        self.blocked: set[str] = blocked if blocked is not None else set()
        self._live = live
        self._on_clone = on_clone
        self.clone_signals: list[str] = []
        self.decisions = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def live(self) -> LiveSessions | None:
        return self._live

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the auth backend is not started")
        return self._port

    async def standing(self, identity: str) -> str:
        device = _device(identity)
        if device is None or identity in self.blocked:
            return Standing.REFUSED
        record = await self._directory.device(device)
        if record is None:
            return Standing.UNKNOWN
        # Fail closed: only the one status that means "in good standing" is trusted.
        return Standing.REGISTERED if record.status == "registered" else Standing.REFUSED

    async def _standing_for(self, kind: str, params: Mapping[str, str], username: str) -> str:
        """The registry is read only where its answer can change the decision: connect
        (user, vhost) and topics outside the registration pair. Queue and exchange rights
        do not depend on it, and the registration pair is the same for every standing
        except refused, which the connect already checked (a revoked device's live
        connection is cut). Measured: this halves the lookups per MQTT connect."""
        device = _device(username)
        if device is None or username in self.blocked:
            return Standing.REFUSED
        if kind == "resource":
            return Standing.UNKNOWN
        if kind == "topic" and decide(kind, params, self._policy, Standing.UNKNOWN) == ALLOW:
            return Standing.UNKNOWN
        return await self.standing(username)

    async def answer(self, kind: str, params: Mapping[str, str]) -> str:
        """The decision for one request (never raises: an error is ``deny``)."""
        self.decisions += 1
        try:
            if kind not in _KINDS:
                return DENY
            username = params.get("username", "")
            standing = Standing.UNKNOWN
            if username != ADMIN_USER:
                standing = await self._standing_for(kind, params, username)
            live = 0
            if (
                kind == "vhost"
                and standing != Standing.REFUSED
                and username != ADMIN_USER
                and params.get("client_id") == username
            ):
                live = self._live_count(username)
            verdict = decide(kind, params, self._policy, standing, live)
            if kind == "vhost" and live and username != ADMIN_USER:
                self.clone_signals.append(username)
                log.warning("second connection of %s refused: clone signal", username)
                if self._on_clone is not None:
                    result = self._on_clone(username)
                    if result is not None:
                        await result
            log.debug(
                "%s %s -> %s", kind, {k: v for k, v in params.items() if k != "password"}, verdict
            )
            if verdict == DENY and kind in ("user", "vhost"):
                log.info("refused %s for %r", kind, username[:80])
            return verdict
        except Exception:
            log.exception("auth backend error (%s): deny", kind)
            return DENY

    def _live_count(self, identity: str) -> int:
        if self._live is None:
            raise BrokerError("no live-session table: cannot check for clones")
        return self._live.count(identity)

    async def _handle(self, request: web.Request) -> web.Response:
        kind = request.match_info.get("kind", "")
        params: dict[str, str] = dict(request.query)
        if request.method == "POST":
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return web.Response(text=await self.answer(kind, params))

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Listen on ``host`` (loopback unless ``ssl_context`` makes it mutual TLS)."""
        if host not in ("127.0.0.1", "::1", "localhost") and ssl_context is None:
            raise BrokerError("the auth backend listens on loopback unless it has mTLS")
        app = web.Application(client_max_size=16 * 1024)
        app.router.add_route("*", "/{kind}", self._handle)
        try:
            runner, bound = await start_http(app, host, port, ssl_context=ssl_context, backlog=512)
        except OSError as exc:
            raise BrokerError(f"the auth backend cannot listen on {host}:{port}: {exc}") from exc
        self._port = bound
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._port = None
