"""A simulated device that stays in service on its own: :class:`DeviceAgent`.

The agent keeps one :class:`~device_sim.client.DeviceClient` online on the operational
listener: it publishes telemetry at an interval, reconnects after any loss (broker restart,
a session cut), and obeys a verified "renew now" (site CA rollover,
``trustcore.site_rollover``) by getting a new LDevID from the site's issuing CA and
reconnecting with it. How the new LDevID is obtained is a pluggable coroutine
(``renew``): :func:`renew_or_register` renews over MQTT on the operational listener
(``DeviceClient.renew``) and falls back to registering again with the IDevID;
:func:`reregister` only registers again.

Counters (connects, telemetry sent, renewals, errors) let tests show that no step of a
rollover took the device out of service for longer than a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiomqtt

from device_sim.client import DeviceClient, DeviceRegistrationError, OperationalSession
from trustcore.endpoint import Endpoint

__all__ = ["AgentStats", "DeviceAgent", "Renewer", "renew_or_register", "reregister"]

log = logging.getLogger(__name__)

#: How the agent gets a new LDevID: given the client, returns when ``client.registered``
#: holds the new certificate.
Renewer = Callable[[DeviceClient], Awaitable[None]]


def reregister(registration: Endpoint) -> Renewer:
    """Register again (factory identity, registration listener)."""

    async def renew(client: DeviceClient) -> None:
        await client.register(registration)

    return renew


def renew_or_register(registration: Endpoint, operational: Endpoint) -> Renewer:
    """LDevID renewal over MQTT on the operational listener (authenticated by the current
    LDevID); registration again with the IDevID if the renewal is refused for good or the
    listener no longer takes the certificate. A refusal with retry advice (``busy``,
    ``too_early``) is raised: the agent stays in service and tries again after a back-off."""

    async def renew(client: DeviceClient) -> None:
        try:
            await client.renew(operational)
        except DeviceRegistrationError as exc:
            if exc.retry or exc.reason == "ldevid_revoked":
                raise
            log.warning("%s: renewal refused (%s); registering again", client.device_id, exc)
            await client.register(registration)
        except aiomqtt.MqttError as exc:
            log.warning("%s: cannot renew (%s); registering again", client.device_id, exc)
            await client.register(registration)

    return renew


@dataclass
class AgentStats:
    connects: int = 0
    telemetry: int = 0
    renewals: int = 0
    errors: list[str] = field(default_factory=list)
    #: longest time (s) between two successful telemetry publishes
    longest_gap: float = 0.0
    issuers: list[str] = field(default_factory=list)  # LDevID issuer at each connect


class DeviceAgent:
    """Run with ``task = asyncio.create_task(agent.run(stop))``; read ``stats``."""

    def __init__(
        self,
        client: DeviceClient,
        operational: Endpoint,
        *,
        renew: Renewer,
        interval: float = 0.1,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
        renew_backoff: float = 5.0,
    ) -> None:
        self.client = client
        self.operational = operational
        self.renew = renew
        self.interval = interval
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        #: The next reading to send: it moves on only once the broker acknowledged the
        #: current one (QoS 1 PUBACK), so a reading lost with a connection is sent again.
        self.reading = 0
        self.stats = AgentStats()
        self.connected = asyncio.Event()
        self._last_ok = 0.0
        self.renew_backoff = renew_backoff
        self._renew_pending = False
        self._renew_not_before = 0.0

    def _published(self) -> None:
        now = time.monotonic()
        if self._last_ok:
            self.stats.longest_gap = max(self.stats.longest_gap, now - self._last_ok)
        self._last_ok = now
        self.stats.telemetry += 1

    async def run(self, stop: asyncio.Event) -> None:
        delay = self.retry_delay
        while not stop.is_set():
            renew_due = False
            try:
                async with self.client.operational(self.operational) as session:
                    self.stats.connects += 1
                    delay = self.retry_delay  # connected: the back-off starts again
                    reg = self.client.registered
                    assert reg is not None
                    self.stats.issuers.append(reg.ldevid.issuer.rfc4514_string())
                    self.connected.set()
                    renew_due = await self._serve(session, stop)
            except (aiomqtt.MqttError, OSError) as exc:
                self.stats.errors.append(f"session: {exc}")
            finally:
                self.connected.clear()
            if renew_due:
                # The operational session is closed first: the registration listener
                # connection uses the same identity, and a second live session of one
                # identity is a clone signal (the broker would cut the first one anyway).
                try:
                    await self.renew(self.client)
                    self.stats.renewals += 1
                    continue  # reconnect at once with the new LDevID
                except (DeviceRegistrationError, aiomqtt.MqttError, OSError) as exc:
                    self.stats.errors.append(f"renew: {exc}")
                    # stay in service on the current LDevID; try again after a back-off
                    self._renew_pending = True
                    self._renew_not_before = time.monotonic() + self.renew_backoff
            # Exponential back-off while the broker stays away (a restarting broker is
            # not hammered by every device at once), capped at ``max_retry_delay``.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(2 * delay, self.max_retry_delay)

    async def _serve(self, session: OperationalSession, stop: asyncio.Event) -> bool:
        """Publish telemetry until stopped (False) or a renewal is due (True)."""
        while not stop.is_set():
            while not session.renew_requests.empty():
                session.renew_requests.get_nowait()
                self._renew_pending = True
            if self._renew_pending and time.monotonic() >= self._renew_not_before:
                self._renew_pending = False
                return True
            await session.publish_telemetry(f"reading {self.reading}".encode())
            self._published()
            self.reading += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        return False
