"""The registrar's broker session: where requests come from and where answers go.

``registrar run`` (:mod:`registrar.app`) serves every registration and renewal through one
:class:`RequestSource`; this module owns that seam and its MQTT implementation,
:class:`MqttChannel`. The service (:mod:`registrar.service`) never sees the broker: it gets
``(device, request bytes)`` and returns answer bytes. A source for another transport (an
AMQP consumer on a RabbitMQ quorum queue) implements the same protocol beside this one.

One MQTT session per registrar instance carries everything the instance does on the
broker: registration requests (``devtrust/register/+/request``), renewals
(``devices/+/renewal/request``), and, on the instance that runs the site's duties,
telemetry, payload-key acknowledgements and the wrap keys of devices enrolled over EST;
plus what the registrar publishes (answers, payload-key updates, commands). A second
session with the same client id would be a takeover, so each instance has its own identity
(:func:`instance_identity`).

Several instances share the request stream with MQTT v5 shared subscriptions
(``$share/<group>/…``): the broker hands each request to one of them. Telemetry and key
acknowledgements are subscribed without ``$share`` by the one instance that runs the site
duties (``site_duties``): processed once, and retained acknowledgements still arrive.

Per message there is no task: a fixed pool of workers takes requests from a bounded
queue (the queue full, the read loop waits), and the session under it
(:mod:`registrar.mqtt_session`) stops reading its socket past ``2 * workers`` undelivered
messages, so a flood waits at the broker (TCP backpressure, then the broker's per-client
queue limits), not in this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from registrar.broker import REGISTRAR_IDENTITY, Endpoint
from registrar.errors import BrokerError, ConfigError
from registrar.mqtt_session import MqttSession, MqttSessionError
from trustcore.identity import DeviceId
from trustcore.topics import (
    KEY_ACK_LEVELS,
    REGISTRATION_REQUEST_FILTER,
    RENEWAL_REQUEST_LEVELS,
    TELEMETRY_LEVEL,
    WRAP_KEY_LEVELS,
    device_of,
    device_of_registration_request,
    every_device_filter,
    registration_response_topic,
    renewal_response_topic,
)

__all__ = [
    "MAX_INSTANCES",
    "MqttChannel",
    "MqttChannelSettings",
    "RequestSource",
    "SiteTraffic",
    "instance_identity",
]

log = logging.getLogger(__name__)

#: Registrar instances one site may run (each has its own broker identity, see below).
MAX_INSTANCES = 16


def instance_identity(instance: int, base: str = REGISTRAR_IDENTITY) -> str:
    """The broker identity (certificate CN and client id) of registrar instance
    ``instance``: ``registrar@site`` for the first, ``registrar.<n>@site`` for the others.
    "@" is in no device id, so no device certificate can carry one of these names."""
    if not 1 <= instance <= MAX_INSTANCES:
        raise ConfigError(f"instance must be 1..{MAX_INSTANCES}, not {instance}")
    if instance == 1:
        return base
    name, _, domain = base.partition("@")
    return f"{name}.{instance}@{domain}"


@dataclass(frozen=True)
class SiteTraffic:
    """What the registrar does with what arrives: ``register`` and ``renew`` answer a
    request (the bytes to publish back); ``telemetry`` and ``key_ack`` take site messages;
    ``connected`` runs after every (re)connection (e.g. re-send pending key updates)."""

    register: Callable[[DeviceId, bytes], Awaitable[bytes]]
    renew: Callable[[DeviceId, bytes], Awaitable[bytes]]
    telemetry: Callable[[DeviceId, str, bytes, bool], None] | None = None
    key_ack: Callable[[DeviceId, bytes, bool], object] | None = None
    connected: Callable[[], Coroutine[Any, Any, None]] | None = None
    #: ``devices/<id>/keys/wrap``: the wrap key of a device enrolled over EST
    #: (:mod:`trustcore.wrap_key`), site duties only.
    wrap_key: Callable[[DeviceId, bytes], object] | None = None


class RequestSource(Protocol):
    """A broker session that delivers requests to :class:`SiteTraffic` and publishes."""

    connected: asyncio.Event

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """A new client certificate: used from the next (re)connect."""
        ...

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None: ...

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, reconnecting after a broker outage."""
        ...


@dataclass(frozen=True)
class MqttChannelSettings:
    """How one registrar instance talks MQTT.

    ``protocol`` "3.1.1" (amqtt, one instance, persistent session) or "5" (Mosquitto);
    ``shared_group``: requests and renewals through ``$share/<group>/…`` (v5 only);
    ``site_duties``: also subscribe to telemetry and key acknowledgements (one instance per
    site); ``workers``: requests served at once; ``session_expiry`` (v5, seconds): 0, a
    clean session that ends with the connection, or a persistent one the broker keeps that
    long while the instance is away (the site-duties instance: see :meth:`MqttChannel._open`)."""

    endpoint: Endpoint
    client_id: str = REGISTRAR_IDENTITY
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    shared_group: str | None = None
    site_duties: bool = True
    workers: int = 512
    reconnect_delay: float = 0.5
    keepalive: int = 30
    session_expiry: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in ("3.1.1", "5"):
            raise ConfigError(f"unknown MQTT protocol {self.protocol!r}")
        if self.shared_group is not None:
            if self.protocol != "5":
                raise ConfigError("shared subscriptions need MQTT v5")
            if not self.shared_group or any(c in self.shared_group for c in "/+#$"):
                raise ConfigError(f"bad shared subscription group {self.shared_group!r}")
        if not 1 <= self.workers <= 10_000:
            raise ConfigError("workers must be 1..10000")
        if self.reconnect_delay <= 0 or self.keepalive < 5:
            raise ConfigError("reconnect_delay must be positive and keepalive at least 5 s")
        if not 0 <= self.session_expiry < 1 << 32 or (self.session_expiry and self.protocol != "5"):
            raise ConfigError("session_expiry is a v5 setting: 0..4294967295 s")

    def request_filters(self) -> tuple[str, str]:
        """The registration and renewal filters (shared when several instances serve)."""
        filters = (REGISTRATION_REQUEST_FILTER, every_device_filter(*RENEWAL_REQUEST_LEVELS))
        if self.shared_group is None:
            return filters
        share = f"$share/{self.shared_group}/"
        return (share + filters[0], share + filters[1])


_Job = tuple[bool, DeviceId, bytes]  # (renewal?, device, request)


class MqttChannel:
    """:class:`RequestSource` over one :class:`~registrar.mqtt_session.MqttSession` at a
    time (see the module docstring)."""

    def __init__(
        self, settings: MqttChannelSettings, tls: ssl.SSLContext, traffic: SiteTraffic
    ) -> None:
        self._settings = settings
        self._tls = tls
        self._traffic = traffic
        self._session: MqttSession | None = None
        self.connected = asyncio.Event()
        #: Requests answered (registrations and renewals), for status and benchmarks.
        self.served = 0

    def use_tls(self, tls: ssl.SSLContext) -> None:
        self._tls = tls

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            session = self._session
            if session is not None and session.is_open and self.connected.is_set():
                try:
                    await session.publish(topic, payload, retain=retain, timeout=timeout)
                    return
                except MqttSessionError as exc:
                    if time.monotonic() > deadline:
                        raise BrokerError(f"cannot publish on {topic}: {exc}") from exc
            elif time.monotonic() > deadline:
                raise BrokerError("the registrar's MQTT session is not connected")
            await asyncio.sleep(0.05)

    async def _open(self) -> MqttSession:
        s = self._settings
        # v5, session_expiry 0 (instances without site duties): a clean session that ends
        # with the connection: requests the broker handed to an instance that died are not
        # kept for it (the device retries and another instance answers). v5 with a
        # session_expiry (the site-duties instance) and 3.1.1 (amqtt, one instance): a
        # persistent session, so telemetry and key acknowledgements that arrive while the
        # registrar reconnects, or while its Mosquitto restarts after a crash (the broker
        # saved this session: MosquittoBroker.save_sessions), wait for it. A request held
        # so is answered late and idempotently (the device has retried meanwhile).
        persistent = s.protocol == "3.1.1" or s.session_expiry > 0
        return await MqttSession.open(
            s.endpoint.host,
            s.endpoint.port,
            tls=self._tls,
            client_id=s.client_id,
            protocol=s.protocol,
            clean=not persistent,
            session_expiry=s.session_expiry,
            keepalive=s.keepalive,
            backlog=2 * s.workers,
        )

    async def run(self, stop: asyncio.Event) -> None:
        background: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * self._settings.workers)
            workers: list[asyncio.Task[None]] = []
            session: MqttSession | None = None
            try:
                session = await self._open()
                await self._subscribe(session)
                self._session = session
                workers = [
                    asyncio.create_task(self._worker(session, queue))
                    for _ in range(self._settings.workers)
                ]
                self.connected.set()
                if self._traffic.connected is not None:
                    task = asyncio.create_task(self._traffic.connected())
                    background.add(task)
                    task.add_done_callback(background.discard)
                await self._read_until(session, queue, stop)
                # Graceful stop: requests already taken are answered before we leave.
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers, return_exceptions=True)
                await session.disconnect()
            except MqttSessionError as exc:
                if stop.is_set():
                    break
                log.warning("registrar MQTT session lost (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                self._session = None
                for worker in workers:
                    worker.cancel()
                if workers:
                    await asyncio.gather(*workers, return_exceptions=True)
                if session is not None:
                    session.abort()
                if background:
                    await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.reconnect_delay)

    async def _subscribe(self, session: MqttSession) -> None:
        for topic_filter in self._settings.request_filters():
            await session.subscribe(topic_filter, qos=1)
        if self._settings.site_duties:
            if self._traffic.telemetry is not None:
                await session.subscribe(every_device_filter(TELEMETRY_LEVEL), qos=1)
            if self._traffic.key_ack is not None:
                await session.subscribe(every_device_filter(*KEY_ACK_LEVELS), qos=1)
            if self._traffic.wrap_key is not None:
                await session.subscribe(every_device_filter(*WRAP_KEY_LEVELS), qos=1)

    async def _read_until(
        self, session: MqttSession, queue: asyncio.Queue[_Job | None], stop: asyncio.Event
    ) -> None:
        reader = asyncio.create_task(self._read(session, queue))
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # re-raises MqttSessionError when the session was lost

    async def _read(self, session: MqttSession, queue: asyncio.Queue[_Job | None]) -> None:
        traffic = self._traffic
        while True:
            message = await session.next_message()
            topic, payload = message.topic, message.payload
            device = device_of_registration_request(topic)
            if device is not None:
                await queue.put((False, device, payload))
                continue
            renewing = device_of(topic, *RENEWAL_REQUEST_LEVELS)
            if renewing is not None:
                await queue.put((True, renewing, payload))
                continue
            telemetry = device_of(topic, TELEMETRY_LEVEL)
            if telemetry is not None and traffic.telemetry is not None:
                traffic.telemetry(telemetry, topic, payload, message.retain)
            elif (acked := device_of(topic, *KEY_ACK_LEVELS)) is not None and (
                traffic.key_ack is not None
            ):
                traffic.key_ack(acked, payload, message.retain)
            elif (
                wrapping := device_of(topic, *WRAP_KEY_LEVELS)
            ) is not None and traffic.wrap_key is not None:
                traffic.wrap_key(wrapping, payload)
            else:
                log.warning("ignored message on %r", topic[:200])

    async def _worker(self, session: MqttSession, queue: asyncio.Queue[_Job | None]) -> None:
        """Answer requests. The answer's PUBACK is not awaited here (a worker waiting for
        it would hold a request slot for a network round trip): :meth:`_answered` counts
        it or logs why it failed."""
        traffic = self._traffic
        while (job := await queue.get()) is not None:
            renewal, device, payload = job
            try:
                if renewal:
                    answer = await traffic.renew(device, payload)
                    topic = renewal_response_topic(device)
                else:
                    answer = await traffic.register(device, payload)
                    topic = registration_response_topic(device)
                try:
                    acked = session.publish_nowait(topic, answer)
                except MqttSessionError:  # no Receive Maximum credit: wait for one
                    await session.publish(topic, answer)
                    self.served += 1
                else:
                    acked.add_done_callback(functools.partial(self._answered, device))
            except MqttSessionError as exc:
                log.warning("could not publish the answer to %s: %s", device, exc)
            except Exception:
                what = "renewal" if renewal else "registration"
                log.exception("%s of %s failed unexpectedly", what, device)

    def _answered(self, device: DeviceId, acked: asyncio.Future[None]) -> None:
        if acked.cancelled():
            return
        error = acked.exception()
        if error is None:
            self.served += 1
        else:
            log.warning("could not publish the answer to %s: %s", device, error)
