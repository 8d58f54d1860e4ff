"""Mosquitto's dynamic-security plugin: its initial document and the registrar's admin
session that sends it commands (today: kicking a live session, which Mosquitto 2.0.11 can
do only through this plugin).

The plugin is loaded on a third, admin-only listener on 127.0.0.1; the admin's username and
password are random and held in memory only (the plugin's JSON file, mode 0600 in the
private directory, stores a salted PBKDF2 hash). :class:`DynsecAdmin` is that session: one
MQTT client on the admin listener, commands correlated with their responses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiomqtt

from registrar.errors import BrokerError

log = logging.getLogger("registrar.broker.mosquitto")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"


def _pbkdf2_entry(password: str) -> dict[str, Any]:
    """dynsec's password format: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def dynsec_document(admin_user: str, admin_password: str) -> dict[str, Any]:
    """The plugin's initial state: one admin limited to the control topic. The plugin is
    loaded on the admin listener only (``per_listener_settings true``), so it grants
    nothing on the device listeners; it is there for its kick (``disableClient``)."""

    def acl(acltype: str) -> dict[str, Any]:
        return {"acltype": acltype, "topic": "$CONTROL/dynamic-security/#", "allow": True}

    return {
        "clients": [
            {
                "username": admin_user,
                "textName": "devtrust registrar",
                **_pbkdf2_entry(admin_password),
                "roles": [{"rolename": "admin"}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": "admin",
                "acls": [
                    acl("publishClientSend"),
                    acl("publishClientReceive"),
                    acl("subscribePattern"),
                    acl("unsubscribePattern"),
                ],
            }
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


class DynsecAdmin:
    """The registrar's session on the admin listener (see the module docstring)."""

    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def connect(
        self,
        port: int,
        user: str,
        password: str,
        deadline: float,
        *,
        failure: Callable[[], str | None],
    ) -> None:
        """Connect (retrying until ``deadline`` while the listener comes up), subscribe to
        the responses and make one round trip. ``failure()`` returns why it is pointless to
        keep trying (Mosquitto exited), or None."""
        while True:
            stack = contextlib.AsyncExitStack()
            client = aiomqtt.Client(
                "127.0.0.1",
                port,
                username=user,
                password=password,
                identifier=user,
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=5,
            )
            try:
                await stack.enter_async_context(client)
                break
            except aiomqtt.MqttError as exc:
                await stack.aclose()
                if (why := failure()) is not None:
                    raise BrokerError(why) from exc
                if time.monotonic() > deadline:
                    raise BrokerError(f"mosquitto admin listener not ready: {exc}") from exc
                await asyncio.sleep(0.01)
        self._client, self._stack = client, stack
        await client.subscribe(CONTROL_TOPIC + "/response", qos=1)
        self._reader = asyncio.create_task(self._read_responses(client))
        await self.command({"command": "getDefaultACLAccess"})  # round trip: ready

    async def _read_responses(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                try:
                    payload = message.payload
                    assert isinstance(payload, bytes | bytearray)
                    responses = json.loads(payload)["responses"]
                except (ValueError, KeyError, TypeError, AssertionError):
                    log.warning("unreadable dynsec response")
                    continue
                for response in responses:
                    future = self._pending.pop(str(response.get("correlationData")), None)
                    if future is not None and not future.done():
                        future.set_result(response)

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one dynsec command and return its response (``error`` key on failure)."""
        if self._client is None:
            raise BrokerError("the broker is not started")
        correlation = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        body = json.dumps({"commands": [{**command, "correlationData": correlation}]})
        try:
            await self._client.publish(CONTROL_TOPIC, body, qos=1)
            return await asyncio.wait_for(future, 5)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise BrokerError(f"dynsec command {command['command']} failed: {exc}") from exc
        finally:
            self._pending.pop(correlation, None)

    async def checked(self, command: dict[str, Any], *, tolerate: str = "") -> None:
        """:meth:`command`, raising ``BrokerError`` on an error not containing ``tolerate``."""
        response = await self.command(command)
        error = response.get("error")
        if error and not (tolerate and tolerate in str(error)):
            raise BrokerError(f"dynsec {command['command']}: {error}")

    async def close(self) -> None:
        """End the session (also when its broker is already gone)."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await self._stack.aclose()
            self._stack, self._client = None, None
