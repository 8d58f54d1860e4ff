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


#: The commands the registrar sends, all safe to send twice: a reading, and setting a flag
#: or creating a client (a second ``createClient`` answers "already exists", which
#: :meth:`registrar.broker.mosquitto.MosquittoBroker.disconnect` tolerates). One of them
#: that failed with the session is sent again on a new session.
IDEMPOTENT = frozenset({"getDefaultACLAccess", "createClient", "disableClient", "enableClient"})
#: Seconds to wait for one command's response, and to reopen a broken session.
COMMAND_TIMEOUT_S = 5.0


class DynsecAdmin:
    """The registrar's session on the admin listener (see the module docstring).

    The session recovers: a command that fails with it (no PUBACK or no response within
    ``COMMAND_TIMEOUT_S``, the connection lost) ends that connection, a new one is opened
    and an idempotent command (``IDEMPOTENT``) is sent once more on it. Without that, one
    timeout (the registrar's event loop stalled past it, the soak of docs/scale.md) left a
    session that answered nothing again, and every later CRL reload failed."""

    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._login: tuple[int, str, str, Callable[[], str | None]] | None = None
        #: Bumped per connection: a failure reopens only the connection it happened on.
        self._generation = 0
        self._reopen_lock = asyncio.Lock()
        #: Connections reopened after a failure (status, tests).
        self.reconnects = 0

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
        self._login = (port, user, password, failure)
        await self._open(deadline)
        await self._send({"command": "getDefaultACLAccess"})  # round trip: ready

    async def _open(self, deadline: float) -> None:
        assert self._login is not None
        port, user, password, failure = self._login
        while True:
            stack = contextlib.AsyncExitStack()
            client = aiomqtt.Client(
                "127.0.0.1",
                port,
                username=user,
                password=password,
                identifier=user,
                protocol=aiomqtt.ProtocolVersion.V311,
                timeout=COMMAND_TIMEOUT_S,
            )
            try:
                await stack.enter_async_context(client)
                await client.subscribe(CONTROL_TOPIC + "/response", qos=1)
                break
            except aiomqtt.MqttError as exc:
                with contextlib.suppress(aiomqtt.MqttError, OSError):
                    await stack.aclose()
                if (why := failure()) is not None:
                    raise BrokerError(why) from exc
                if time.monotonic() > deadline:
                    raise BrokerError(f"mosquitto admin listener not ready: {exc}") from exc
                await asyncio.sleep(0.01)
        self._client, self._stack = client, stack
        self._generation += 1
        self._reader = asyncio.create_task(self._read_responses(client))

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
        # The connection ended: nothing waiting on it will be answered.
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(BrokerError("the dynsec admin session was lost"))

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send one dynsec command and return its response (``error`` key on failure).
        A command in ``IDEMPOTENT`` that fails with the session is sent once more on a
        new one (see the class docstring)."""
        if self._login is None:
            raise BrokerError("the broker is not started")
        generation = self._generation
        try:
            if self._client is None or self._reader is None or self._reader.done():
                raise BrokerError("the dynsec admin session was lost")
            return await self._send(command)
        except BrokerError as exc:
            if command["command"] not in IDEMPOTENT:
                raise
            log.warning("mosquitto admin session failed (%s); reconnecting", exc)
        await self._reopen(generation)
        return await self._send(command)

    async def _reopen(self, failed: int) -> None:
        """A new connection instead of the one of generation ``failed`` (once, however many
        commands failed on it)."""
        async with self._reopen_lock:
            if self._generation != failed and self._reader is not None and not self._reader.done():
                return  # another command already reopened it
            await self._close_connection()
            await self._open(time.monotonic() + COMMAND_TIMEOUT_S)
            self.reconnects += 1
            log.info("mosquitto admin session reconnected")

    async def _send(self, command: dict[str, Any]) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise BrokerError("the broker is not started")
        correlation = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        body = json.dumps({"commands": [{**command, "correlationData": correlation}]})
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await client.publish(CONTROL_TOPIC, body, qos=1)
                return await future
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise BrokerError(f"dynsec command {command['command']} failed: {exc!r}") from exc
        finally:
            self._pending.pop(correlation, None)

    async def checked(self, command: dict[str, Any], *, tolerate: str = "") -> None:
        """:meth:`command`, raising ``BrokerError`` on an error not containing ``tolerate``."""
        response = await self.command(command)
        error = response.get("error")
        if error and not (tolerate and tolerate in str(error)):
            raise BrokerError(f"dynsec {command['command']}: {error}")

    async def _close_connection(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._stack is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await self._stack.aclose()
            self._stack, self._client = None, None

    async def close(self) -> None:
        """End the session (also when its broker is already gone)."""
        await self._close_connection()
        self._login = None
