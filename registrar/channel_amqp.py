"""Registration requests from a RabbitMQ cluster, over AMQP 0-9-1 (a request source).

Devices stay plain MQTT 3.1.1 clients: a request published on
``devtrust/register/<id>/request`` reaches ``amq.topic`` as routing key
``devtrust.register.<id>.request``. :class:`AmqpRequestSource` owns one durable **quorum
queue** bound to that pattern; every registrar instance consumes from it (competing
consumers: each request goes to one instance; the queue is replicated on every node, so a
node failure loses nothing). The answer is published back through ``amq.topic`` with the
response topic's routing key, where the device's MQTT subscription picks it up. LDevID
renewals (``devices/<id>/renewal/request``, answered on ``devices/<id>/renewal/response``)
go through the same queue when a ``renew`` handler is given, and :meth:`publish` sends
anything else the registrar has for devices (commands): the shape of the registrar's
request-source seam, so ``registrar run`` can use this source beside its MQTT channel.

Delivery is at-least-once: a request is acknowledged only after its response has been
confirmed by the broker (publisher confirms). If an instance dies in between, the request
is delivered again to another instance, which answers it idempotently (the registration
service keys retries on the request digest and nonce).

The instance connects to the nodes' AMQP listeners in turn with the registrar's
administrator (see :mod:`registrar.broker.rabbitmq_auth`) and reconnects after a node loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from registrar.broker.rabbitmq import REGISTRATION_QUEUE, amqp_to_mqtt, mqtt_to_amqp
from registrar.broker.rabbitmq_auth import LiveSessions
from registrar.errors import BrokerError
from trustcore.identity import DeviceId
from trustcore.topics import (
    KEY_ACK_LEVELS,
    REGISTRATION_REQUEST_FILTER,
    RENEWAL_REQUEST_LEVELS,
    TELEMETRY_LEVEL,
    device_of,
    device_of_registration_request,
    every_device_filter,
    registration_response_topic,
    renewal_response_topic,
)

log = logging.getLogger(__name__)

Handler = Callable[[DeviceId, bytes], Awaitable[bytes]]
#: The binding: every device's registration request (``*`` is one MQTT level).
REQUEST_BINDING = mqtt_to_amqp(REGISTRATION_REQUEST_FILTER)
#: Every device's LDevID renewal request (answered on ``devices/<id>/renewal/response``).
RENEWAL_BINDING = mqtt_to_amqp(every_device_filter(*RENEWAL_REQUEST_LEVELS))
#: The site-duty queue: telemetry and payload-key acknowledgements of every device, read by
#: the one instance that holds the site duties (bounded: the oldest go first).
SITE_EVENTS_QUEUE = "devtrust.site.events"
SITE_EVENTS_MAX = 100_000
TELEMETRY_BINDING = mqtt_to_amqp(every_device_filter(TELEMETRY_LEVEL))
KEY_ACK_BINDING = mqtt_to_amqp(every_device_filter(*KEY_ACK_LEVELS))


@dataclass(frozen=True)
class SiteEvents:
    """The site duties' callbacks: telemetry ``(device, topic, payload, retained)`` and
    key acknowledgements ``(device, payload, retained)``; AMQP has no retained flag."""

    telemetry: Callable[[DeviceId, str, bytes, bool], None]
    key_ack: Callable[[DeviceId, bytes, bool], object]


def _site_event(topic: str) -> tuple[str, DeviceId] | None:
    if (device := device_of(topic, TELEMETRY_LEVEL)) is not None:
        return "telemetry", device
    if (device := device_of(topic, *KEY_ACK_LEVELS)) is not None:
        return "key_ack", device
    return None


@dataclass(frozen=True)
class AmqpEndpoint:
    """One node's AMQP listener and the credentials of the registrar's administrator."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)

    def url(self) -> str:
        user, password = quote(self.username, safe=""), quote(self.password, safe="")
        return f"amqp://{user}:{password}@{self.host}:{self.port}/"


class AmqpRequestSource:
    """Consumes registration requests and publishes the answers (see the module text)."""

    def __init__(
        self,
        endpoints: Sequence[AmqpEndpoint],
        handle: Handler,
        renew: Handler | None = None,
        *,
        prefetch: int = 128,
        reconnect_delay: float = 0.5,
        on_answered: Callable[[DeviceId], None] | None = None,
        site_events: SiteEvents | None = None,
        on_connected: Callable[[], Coroutine[Any, Any, None]] | None = None,
        retain_as_plain: bool = False,
    ) -> None:
        if not endpoints:
            raise BrokerError("no AMQP endpoint")
        if not 0 < prefetch <= 65535:
            raise BrokerError(f"bad prefetch {prefetch}")
        self._endpoints = tuple(endpoints)
        self._handle = handle
        self._renew = renew
        self._exchange: AbstractExchange | None = None
        self._prefetch = prefetch
        self._reconnect_delay = reconnect_delay
        self._on_answered = on_answered
        self._site_events = site_events
        self._on_connected = on_connected
        #: ``registrar run``: a retained publish (payload-key update) goes out plain; the
        #: registrar re-sends what is pending itself (see ``publish``).
        self._retain_as_plain = retain_as_plain
        self._background: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.answered = 0
        self.endpoint: AmqpEndpoint | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; move to the next node when one is lost."""
        index = 0
        while not stop.is_set():
            endpoint = self._endpoints[index % len(self._endpoints)]
            index += 1
            try:
                await self._serve(endpoint, stop)
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, OSError) as exc:
                if stop.is_set():
                    break
                log.warning(
                    "AMQP session with %s:%s lost (%s); next node",
                    endpoint.host,
                    endpoint.port,
                    exc,
                )
            finally:
                self.connected.clear()
                self.endpoint = None
                self._exchange = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._reconnect_delay)
        log.info("AMQP request source stopped: answered %d requests", self.answered)

    async def _serve(self, endpoint: AmqpEndpoint, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect(endpoint.url(), timeout=5)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.declare_queue(
                REGISTRATION_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind("amq.topic", routing_key=REQUEST_BINDING)
            if self._renew is not None:
                await queue.bind("amq.topic", routing_key=RENEWAL_BINDING)
            exchange = await channel.get_exchange("amq.topic", ensure=False)
            self._exchange = exchange
            tasks: set[asyncio.Task[None]] = set()

            async def on_message(message: AbstractIncomingMessage) -> None:
                task = asyncio.create_task(self._answer(exchange, message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            tag = await queue.consume(on_message)
            if self._site_events is not None:
                await self._consume_site_events(channel)
            self.endpoint = endpoint
            self.connected.set()
            if self._on_connected is not None:
                task = asyncio.create_task(self._on_connected())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            closed = asyncio.ensure_future(_closed(connection, channel))
            stopper = asyncio.ensure_future(stop.wait())
            try:
                done, _ = await asyncio.wait({closed, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                stopper.cancel()
            if stopper in done:
                with contextlib.suppress(aio_pika.exceptions.AMQPException, aiormq.AMQPError):
                    await queue.cancel(tag)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                return
            raise BrokerError("the AMQP connection closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _consume_site_events(self, channel: AbstractChannel) -> None:
        events = self._site_events
        assert events is not None
        queue = await channel.declare_queue(
            SITE_EVENTS_QUEUE,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-max-length": SITE_EVENTS_MAX},
        )
        await queue.bind("amq.topic", routing_key=TELEMETRY_BINDING)
        await queue.bind("amq.topic", routing_key=KEY_ACK_BINDING)

        async def on_event(message: AbstractIncomingMessage) -> None:
            topic = amqp_to_mqtt(message.routing_key or "")
            found = _site_event(topic)
            try:
                if found is not None and found[0] == "telemetry":
                    events.telemetry(found[1], topic, message.body, False)
                elif found is not None:
                    events.key_ack(found[1], message.body, False)
                else:
                    log.warning("ignored a site event on %r", topic[:200])
            except Exception:
                log.exception("site event on %s failed", topic[:200])
            await message.ack()

        await queue.consume(on_event)

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """The AMQP session logs in with the administrator's password, not a certificate."""

    def _route(self, routing_key: str) -> tuple[DeviceId, Handler, str] | None:
        """(device, handler, answer topic) for a request's routing key; None: not ours."""
        topic = amqp_to_mqtt(routing_key)
        device = device_of_registration_request(topic)
        if device is not None:
            return device, self._handle, registration_response_topic(device)
        device = device_of(topic, *RENEWAL_REQUEST_LEVELS)
        if device is not None and self._renew is not None:
            return device, self._renew, renewal_response_topic(device)
        return None

    async def _answer(self, exchange: AbstractExchange, message: AbstractIncomingMessage) -> None:
        route = self._route(message.routing_key or "")
        if route is None:
            log.warning("dropped a request on %r", (message.routing_key or "")[:200])
            await message.reject(requeue=False)
            return
        device, handler, answer_topic = route
        try:
            response = await handler(device, message.body)
        except Exception:
            log.exception("request of %s on %s failed unexpectedly", device, answer_topic)
            await message.reject(requeue=False)
            return
        try:
            await exchange.publish(
                aio_pika.Message(response, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=mqtt_to_amqp(answer_topic),
            )
            await message.ack()
        except (aio_pika.exceptions.AMQPException, aiormq.AMQPError, OSError) as exc:
            # Not acknowledged: the request comes back (to this or another instance).
            log.warning("could not answer %s: %s", device, exc)
            return
        self.answered += 1
        if self._on_answered is not None:
            self._on_answered(device)

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish to MQTT subscribers through ``amq.topic`` (confirmed by the broker).

        ``retain`` is refused: RabbitMQ 3.10 keeps retained messages only for MQTT
        publishers, so an AMQP publish can never be retained (use an MQTT session) --
        unless the source was made with ``retain_as_plain`` (the registrar's key updates:
        it re-sends what is still pending at every reconnection and when a device's
        telemetry shows an old key, so a device away at publish time still gets it)."""
        if retain and not self._retain_as_plain:
            raise BrokerError("retained messages cannot be published over AMQP")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            exchange = self._exchange
            if exchange is not None and self.connected.is_set():
                try:
                    await asyncio.wait_for(
                        exchange.publish(
                            aio_pika.Message(
                                payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                            ),
                            routing_key=mqtt_to_amqp(topic),
                        ),
                        max(0.1, deadline - asyncio.get_running_loop().time()),
                    )
                    return
                except (aio_pika.exceptions.AMQPException, aiormq.AMQPError, OSError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        raise BrokerError(f"cannot publish on {topic}: {exc}") from exc
                except TimeoutError as exc:
                    raise BrokerError(f"cannot publish on {topic}: timed out") from exc
            elif asyncio.get_running_loop().time() > deadline:
                raise BrokerError("the registrar's AMQP session is not connected")
            await asyncio.sleep(0.05)


async def _closed(connection: aio_pika.abc.AbstractConnection, channel: AbstractChannel) -> None:
    """Returns when the connection or the channel is gone."""
    done = asyncio.get_running_loop().create_future()

    def closed(*_args: object) -> None:
        if not done.done():
            done.set_result(None)

    connection.close_callbacks.add(closed)
    channel.close_callbacks.add(closed)
    await done


class ConnectionEvents:
    """Feeds a :class:`~registrar.broker.rabbitmq_auth.LiveSessions` table from the
    cluster's ``amq.rabbitmq.event`` exchange, and drops the sessions of nodes the
    management API reports down (a killed node sends no ``connection.closed``).

    Each registrar instance has its own exclusive queue, so each has the whole picture.
    Known gap: events missed while this stream was down are not replayed after its
    reconnect, so a connection that closed meanwhile stays in the table until its node is
    reported down (its identity's next connect is refused as a clone until then). The
    management API's connection list is not a fix: it comes from the statistics database,
    which lags (a connection made a moment ago was missing from it, measured), so replacing
    the table with it would forget live sessions."""

    def __init__(
        self,
        endpoints: Sequence[AmqpEndpoint],
        sessions: LiveSessions,
        nodes: Callable[[], Awaitable[dict[str, bool]]],
        *,
        poll_interval: float = 1.0,
        reconnect_delay: float = 0.5,
    ) -> None:
        if not endpoints:
            raise BrokerError("no AMQP endpoint")
        self._endpoints = tuple(endpoints)
        self._sessions = sessions
        self._nodes = nodes
        self._poll_interval = poll_interval
        self._reconnect_delay = reconnect_delay
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        poller = asyncio.create_task(self._poll_nodes(stop))
        index = 0
        try:
            while not stop.is_set():
                endpoint = self._endpoints[index % len(self._endpoints)]
                index += 1
                try:
                    await self._follow(endpoint, stop)
                except (aiormq.AMQPError, aio_pika.exceptions.AMQPException, OSError) as exc:
                    if stop.is_set():
                        break
                    log.warning("connection events from %s lost (%s)", endpoint.host, exc)
                finally:
                    self.connected.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._reconnect_delay)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _follow(self, endpoint: AmqpEndpoint, stop: asyncio.Event) -> None:
        connection = await aio_pika.connect(endpoint.url(), timeout=5)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in ("connection.created", "connection.closed"):
                await queue.bind("amq.rabbitmq.event", routing_key=key)

            async def on_event(message: AbstractIncomingMessage) -> None:
                self._apply(message.routing_key or "", message.headers)
                await message.ack()

            await queue.consume(on_event)
            self.connected.set()
            closed = asyncio.ensure_future(_closed(connection, channel))
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({closed, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                stopper.cancel()
            if not stop.is_set():
                raise BrokerError("the event connection closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    def _apply(self, kind: str, headers: Mapping[str, object]) -> None:
        def text(key: str) -> str:
            value = headers.get(key)
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

        if kind == "connection.created":
            self._sessions.created(text("node"), text("name"), text("user"))
        elif kind == "connection.closed":
            self._sessions.closed(text("node"), text("name"))

    async def _poll_nodes(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for node, running in (await self._nodes()).items():
                    if not running:
                        self._sessions.node_down(node)
            except BrokerError as exc:
                log.warning("cannot read the cluster's nodes: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._poll_interval)
