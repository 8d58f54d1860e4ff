"""The embedded broker: amqtt 0.12 in the registrar's own event loop.

amqtt gives MQTT 3.1.1 routing; this module supplies everything security-relevant around it,
because amqtt's own defaults do not fit (see docs/broker.md, "Embedded (amqtt)"):

* **TLS** is ours (contexts built in :mod:`registrar.broker.embedded_tls`): two server
  contexts with ``CERT_REQUIRED`` and TLS 1.2+ (amqtt would use ``CERT_OPTIONAL``), the
  server key read from the encrypted PKCS#8 file with its passphrase, CRL checking by
  OpenSSL, and a CRL hot swap: each handshake's ``sni_callback`` moves the
  connection onto the newest context, so :meth:`EmbeddedBroker.reload_crls` affects new
  handshakes without touching live sessions or restarting the listeners.
* **Identity** comes only from the verified client certificate, before amqtt sees the
  CONNECT (:func:`registrar.broker.embedded_tls.identify`): registration listener →
  factory certificate directly issued by a station CA; operational listener → secondary
  certificate issued by the site CA, or the registrar's service certificate (CN
  ``REGISTRAR_IDENTITY``). The client id is replaced by the identity *before* amqtt's
  clean-session handling (which deletes the session of whatever client id the CONNECT
  names), so no certificate can touch another identity's session.
* **Clone signal**: a second live connection of one identity is logged (``clone-signal``)
  and the *older* connection is cut — MQTT takeover semantics, the same as Mosquitto with
  ``use_username_as_clientid``; a device whose old TCP connection is half-open must be able
  to come back, and a clone is detected either way.
* **Kicking**: amqtt has no API for it; the broker keeps its own registry of live TLS
  transports per identity and aborts them (:meth:`EmbeddedBroker.disconnect`).
* **Delivery fixes**: retained messages are filtered per receiver (amqtt replays the
  retained messages of *every* subscription filter to each connecting client), QoS 1
  messages already acknowledged to a publisher are routed before its session is torn down
  (amqtt acknowledges before routing and dropped the rest on disconnect), and the
  subscription table is iterated on snapshots (a SUBSCRIBE during a broadcast made amqtt
  drop that message: :class:`_SnapshotDict`).

The overridden amqtt internals are version-specific: the module refuses to start on an
amqtt other than 0.12.x rather than silently run without its checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker as AmqttBroker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from cryptography import x509

from registrar.broker import BrokerSettings, Endpoint, is_device_identity
from registrar.broker.amqtt_plugins import (
    AccessPolicy,
    CertificateAuthPlugin,
    Principal,
    TopicAclPlugin,
)
from registrar.broker.embedded_tls import (
    ListenerTls,
    build_context,
    identify,
    issuing_cas,
    load_pem_certificates,
    warn_issuers_without_crl,
)
from registrar.errors import BrokerError
from trustcore.topics import Listener

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

#: A client must finish the TLS handshake and send CONNECT within these (slowloris guard).
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
#: How long ``disconnect`` waits for cut sessions to be torn down inside amqtt.
CUT_WAIT_S = 3.0

#: Largest single read amqtt may ask for (the PUBLISH payload is one ``readexactly`` of the
#: announced remaining length, up to 256 MiB): the same 1 MiB as Mosquitto's max_packet_size.
MAX_READ_BYTES = 1 << 20

_LISTENERS = {"default": Listener.REGISTRATION, "operational": Listener.OPERATIONAL}
_SUPPORTED_AMQTT = "0.12."


class _BoundedReader(StreamReaderAdapter):  # type: ignore[misc]
    """amqtt trusts the length a client announces and buffers that much before looking at
    it; a read above :data:`MAX_READ_BYTES` cuts the connection instead (to amqtt it looks
    like end of stream, which ends the session the normal way)."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.WriteTransport) -> None:
        super().__init__(reader)
        self._transport = transport

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_READ_BYTES:
            log.warning("cut a client announcing a %d-byte read", n)
            self._transport.abort()
            raise asyncio.IncompleteReadError(b"", None)
        data: bytes = await super().read(n)
        return data


# ------------------------------------------------------------------------------ amqtt


@dataclass(eq=False)
class _Connection:
    principal: Principal
    transport: asyncio.WriteTransport
    serial: int | None = None  # the client certificate's serial (superseded-LDevID cuts)
    session: Session | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class _SnapshotDict(dict[str, Any]):
    """amqtt 0.12.1's subscription table, iterated over a snapshot. amqtt loops over it with
    ``await`` inside (each broadcast awaits the topic plugin per filter; a connecting
    client's retained replay awaits per filter), so a SUBSCRIBE or a disconnect of another
    client in between raised "dictionary changed size during iteration" and lost that
    broadcast. Seen in the suite once devices subscribed one more filter (renewal answers)."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(dict.items(self))


class _Amqtt(AmqttBroker):  # type: ignore[misc]  # amqtt ships no usable stubs
    """amqtt's broker with our TLS, identity binding, kick registry and delivery fixes."""

    def __init__(
        self, config: BrokerConfig, policy: AccessPolicy, tls: dict[str, ListenerTls]
    ) -> None:
        super().__init__(config)
        self._subscriptions: dict[str, Any] = _SnapshotDict(self.__dict__["_subscriptions"])
        self._policy = policy
        self._tls = tls
        self._by_ssl: dict[ssl.SSLObject, _Connection] = {}
        self.bound: dict[str, tuple[str, int]] = {}
        # connections accepted so far, all identities (a per-identity table would grow
        # with every device the site ever saw)
        self.connects = 0

    # -- listeners: our contexts, with handshake timeout
    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type is not ListenerType.TCP or listener_name not in self._tls:
            raise BrokerError(f"unexpected listener {listener_name!r}")
        server = await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            ssl=self._tls[listener_name].base,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        )
        host, bound_port = server.sockets[0].getsockname()[:2]
        self.bound[listener_name] = (host, bound_port)
        return server

    # -- identity from the certificate, before amqtt reads anything
    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        lt = self._tls[listener_name]
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            if not der:  # CERT_REQUIRED makes this unreachable; fail closed anyway
                raise BrokerError("no client certificate")
            if ssl_object.session_reused:  # the cache is off; fail closed if one slips by
                raise BrokerError("resumed TLS session (its certificate was not re-verified)")
            principal = identify(lt.listener, der, lt.issuers)
        except BrokerError as exc:
            log.warning("refused on %s listener: %s", lt.listener.value, exc)
            writer.transport.abort()
            return
        conn = _Connection(principal, writer.transport, _certificate_serial(der))
        self._by_ssl[ssl_object] = conn
        self.connects += 1
        try:
            await self._client_connected(
                listener_name,
                _BoundedReader(reader, writer.transport),
                StreamWriterAdapter(writer),
            )
        except OSError as exc:  # the peer vanished while amqtt was talking to it
            log.info("connection of %s lost: %r", principal.identity, exc)
        except Exception:  # one client's failure must never reach the listener
            log.exception("session of %s failed", principal.identity)
        finally:
            self._by_ssl.pop(ssl_object, None)
            conn.done.set()
            if not writer.transport.is_closing():
                writer.transport.abort()

    def connections(self, identity: str) -> list[_Connection]:
        return [c for c in self._by_ssl.values() if c.principal.identity == identity]

    def all_connections(self) -> list[_Connection]:
        return list(self._by_ssl.values())

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt 0.12.1's version, with: a CONNECT timeout; the client id replaced by the
        certificate identity before any session lookup; the clone signal; the principal
        bound to the (new or resumed) session for the plugins."""
        conn = self._by_ssl.get(writer.get_ssl_info())
        if conn is None:
            await writer.close()
            raise AMQTTError("connection without a certificate identity")
        try:
            handler, client_session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError as exc:
            await writer.close()
            raise AMQTTError("no CONNECT in time") from exc
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(f"cannot read CONNECT: {exc}") from exc
        except MQTTError:
            await writer.close()
            raise
        except Exception as exc:  # the packet decoders raise assorted errors on junk
            await writer.close()
            raise MQTTError(f"malformed CONNECT: {exc!r}") from exc

        identity = conn.principal.identity
        if client_session.client_id not in ("", identity):
            log.info(
                "client id %r of %s replaced by its identity", client_session.client_id, identity
            )
        client_session.client_id = identity
        self._cut_clones(conn)

        if client_session.clean_session:
            await self._delete_session(identity)
            client_session.parent = 0
        elif identity in self._sessions:
            existing, _ = self._sessions[identity]
            for attr in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, attr, getattr(client_session, attr))
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        client_session.ssl_object = writer.get_ssl_info()
        self._policy.bind(client_session, conn.principal)
        conn.session = client_session

        delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(delay, int):
            client_session.keep_alive += delay
        return handler, client_session

    def _cut_clones(self, newcomer: _Connection) -> None:
        others = [c for c in self.connections(newcomer.principal.identity) if c is not newcomer]
        if not others:
            return
        log.warning(
            "clone-signal: identity %s connected again on the %s listener while %d session(s) "
            "were live; cutting the older one(s)",
            newcomer.principal.identity,
            newcomer.principal.listener.value,
            len(others),
        )
        for other in others:
            other.transport.abort()

    # -- delivery fixes
    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages only on topics this receiver may receive, and only for its own
        subscriptions (amqtt 0.12.1 replays every subscription filter of every client)."""
        topic_filter, qos = subscription
        own = any(s is session for s, _ in self._subscriptions.get(topic_filter, []))
        if not own:
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        """Route what the client already had acknowledged (PUBACK sent, message still queued)
        before the session ends; amqtt 0.12.1 dropped those for clean sessions."""
        queue = client_session.delivered_message_queue
        while not queue.empty():
            message = queue.get_nowait()
            if message is None or not message.topic:
                continue
            if not await self._topic_filtering(client_session, message.topic, Action.PUBLISH):
                continue
            if message.topic.startswith("$") or "+" in message.topic or "#" in message.topic:
                continue
            await self._broadcast_message(client_session, message.topic, message.data)
            packet = message.publish_packet
            if packet is not None and packet.retain_flag:
                await self.retain_message(client_session, message.topic, message.data, message.qos)
        if self._policy.principal_of(client_session) is None or self._blocked(client_session):
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    def _blocked(self, session: Session) -> bool:
        principal = self._policy.principal_of(session)
        return principal is None or self._policy.is_blocked(principal.identity)


def _certificate_serial(der: bytes | None) -> int | None:
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der).serial_number
    except ValueError:
        return None


# --------------------------------------------------------------------------- backend


class EmbeddedBroker:
    """:class:`registrar.broker.Broker` on amqtt, in the caller's event loop.

    Listener names inside amqtt: ``default`` is the registration listener (amqtt requires a
    listener of that name), ``operational`` the operational one. Both bind to
    ``settings.host`` (loopback by default) and the configured ports (0 = ephemeral).
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self._settings = settings
        self._policy = AccessPolicy()
        self._amqtt: _Amqtt | None = None
        self._tls: dict[str, ListenerTls] = {}

    # -- endpoints
    def _endpoint(self, name: str) -> Endpoint:
        if self._amqtt is None or name not in self._amqtt.bound:
            raise BrokerError("the embedded broker is not running")
        host, port = self._amqtt.bound[name]
        return Endpoint(host, port)

    @property
    def registration_endpoint(self) -> Endpoint:
        return self._endpoint("default")

    @property
    def operational_endpoint(self) -> Endpoint:
        return self._endpoint("operational")

    # -- life cycle
    async def start(self) -> None:
        if self._amqtt is not None:
            raise BrokerError("the embedded broker is already running")
        amqtt_version = version("amqtt")
        if not amqtt_version.startswith(_SUPPORTED_AMQTT):
            raise BrokerError(
                f"amqtt {amqtt_version} is not supported (its internals are overridden for "
                f"security; tested with {_SUPPORTED_AMQTT}x)"
            )
        tls = self._settings.tls
        registration_issuers = issuing_cas(load_pem_certificates(tls.registration_cas))
        operational_issuers = issuing_cas(load_pem_certificates(tls.operational_cas))
        if not registration_issuers or not operational_issuers:
            raise BrokerError("a listener has no issuing CA in its bundle")
        warn_issuers_without_crl(self._settings, registration_issuers)
        for name, listener, issuers in (
            ("default", Listener.REGISTRATION, registration_issuers),
            ("operational", Listener.OPERATIONAL, operational_issuers),
        ):
            base = await asyncio.to_thread(build_context, self._settings, listener)
            self._tls[name] = ListenerTls(listener, base, base, issuers)
            base.sni_callback = self._sni_callback(name)

        host = self._settings.host
        config = BrokerConfig(
            listeners={
                "default": ListenerConfig(bind=f"{host}:{self._settings.registration_port}"),
                "operational": ListenerConfig(bind=f"{host}:{self._settings.operational_port}"),
            },
            plugins={
                f"{CertificateAuthPlugin.__module__}.{CertificateAuthPlugin.__name__}": {
                    "policy": self._policy
                },
                f"{TopicAclPlugin.__module__}.{TopicAclPlugin.__name__}": {"policy": self._policy},
            },
        )
        broker = _Amqtt(config, self._policy, self._tls)
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerError(f"the embedded broker did not start: {exc}") from exc
        self._amqtt = broker
        log.info(
            "embedded broker: registration %s, operational %s",
            self.registration_endpoint,
            self.operational_endpoint,
        )

    def _sni_callback(
        self, name: str
    ) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
        def switch(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
            # Runs for every ClientHello, with or without SNI: verification of this
            # handshake then uses the newest context's store (CA bundle + current CRLs).
            del server_name, ctx
            sslobj.context = self._tls[name].current

        return switch

    async def stop(self) -> None:
        broker, self._amqtt = self._amqtt, None
        if broker is None:
            return
        try:
            await broker.shutdown()
        except Exception as exc:
            raise BrokerError(f"the embedded broker did not stop cleanly: {exc}") from exc
        finally:
            for conn in broker.all_connections():
                conn.transport.abort()

    # -- revocation
    async def reload_crls(self) -> None:
        """Build fresh contexts (same key and bundles, CRL file re-read); on any error the
        old contexts stay in force and ``BrokerError`` is raised (call ``block`` then)."""
        fresh = {
            name: await asyncio.to_thread(build_context, self._settings, lt.listener)
            for name, lt in self._tls.items()
        }
        # The CA bundles are re-read too (a site CA rollover adds, then removes, an
        # operational issuer; a new bundle may bring station CAs).
        tls = self._settings.tls
        issuers = {
            Listener.REGISTRATION: issuing_cas(load_pem_certificates(tls.registration_cas)),
            Listener.OPERATIONAL: issuing_cas(load_pem_certificates(tls.operational_cas)),
        }
        if not all(issuers.values()):
            raise BrokerError("a listener has no issuing CA in its bundle")
        warn_issuers_without_crl(self._settings, issuers[Listener.REGISTRATION])
        for name, ctx in fresh.items():
            self._tls[name].current = ctx
            self._tls[name].issuers = issuers[self._tls[name].listener]
        log.info("CRLs reloaded from %s", self._settings.tls.crl_file)

    async def disconnect(self, identity: str) -> int:
        broker = self._require()
        victims = broker.connections(identity)
        for conn in victims:
            if conn.session is not None and self._policy.is_blocked(identity):
                conn.session.will_flag = False
            conn.transport.abort()
        if victims:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.done.wait() for c in victims)), CUT_WAIT_S
                )
            log.warning("cut %d live session(s) of %s", len(victims), identity)
        return len(victims)

    def connection_mark(self, identity: str) -> int:
        return self._require().connects

    async def cut_superseded(self, identity: str, serials: frozenset[int], mark: int) -> int:
        """This broker sees each session's certificate: cut exactly those on a superseded
        serial (``mark`` is not needed)."""
        victims = [c for c in self._require().connections(identity) if c.serial in serials]
        for conn in victims:
            conn.transport.abort()
        if victims:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c.done.wait() for c in victims)), CUT_WAIT_S
                )
            log.warning("cut %d session(s) of %s on a superseded LDevID", len(victims), identity)
        return len(victims)

    async def block(self, identity: str) -> None:
        self._policy.block(identity)
        log.warning("identity %s blocked (connect, publish, subscribe, delivery)", identity)

    # -- introspection (status, metrics, tests)
    def connected_devices(self) -> int:
        if self._amqtt is None:
            return 0
        return sum(
            1 for c in self._amqtt.all_connections() if is_device_identity(c.principal.identity)
        )

    def live_sessions(self, identity: str) -> int:
        """How many live connections ``identity`` has right now."""
        return len(self._require().connections(identity))

    def _require(self) -> _Amqtt:
        if self._amqtt is None:
            raise BrokerError("the embedded broker is not running")
        return self._amqtt
