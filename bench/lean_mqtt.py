"""A minimal asyncio MQTT client (3.1.1 and 5) for load generation, and nothing else.

Why not aiomqtt/paho in the benchmarks: aiomqtt runs paho's blocking connect (TCP + TLS
handshake) in a thread pool and paho does its packet handling in Python callbacks; a
thousand concurrent devices in one process then spend more CPU in the client library than
the registrar spends serving them, and on a 2-core machine the clients would be measured
instead of the server. This client is a few coroutines on one ``asyncio`` TLS stream:
CONNECT, SUBSCRIBE, PUBLISH (QoS 0/1, PUBACKs matched by packet id), incoming PUBLISH
(QoS 1 acknowledged at once), DISCONNECT. No reconnect, no QoS 2, no properties. The device
code (``device_sim.client``) keeps using aiomqtt; this is only the benchmarks' load generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["LeanMqtt", "MqttProtocolError"]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _DISCONNECT = 0x82, 0x90, 0xC0, 0xE0


class MqttProtocolError(ConnectionError):
    """The broker refused us or sent something this client does not understand."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


class LeanMqtt:
    """One connection. Use :meth:`connect`; then ``subscribe``/``publish``/``next_message``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._v5 = version == 5
        self._next_id = 0
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.on_message: Callable[[str, bytes], None] | None = None
        self._task = asyncio.create_task(self._read_loop())
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        client_id: str,
        *,
        version: int = 4,
        keepalive: int = 60,
        timeout: float = 30.0,
    ) -> LeanMqtt:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls, server_hostname=host), timeout
        )
        client = cls(reader, writer, version)
        flags = 0x02  # clean session / clean start
        head = _string("MQTT") + bytes((version, flags)) + struct.pack("!H", keepalive)
        if client._v5:
            head += b"\x00"  # no properties
        writer.write(_packet(_CONNECT, head + _string(client_id)))
        try:
            code = await asyncio.wait_for(asyncio.shield(client._connack), timeout)
        except BaseException:
            client.abort()
            raise
        if code != 0:
            client.abort()
            raise MqttProtocolError(f"CONNACK refused: 0x{code:02x}")
        return client

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                first = (await self._reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    b = (await self._reader.readexactly(1))[0]
                    length += (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                body = await self._reader.readexactly(length) if length else b""
                self._dispatch(first, body)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as exc:
            error = exc
        except MqttProtocolError as exc:
            error = exc
        finally:
            futures: list[asyncio.Future[Any]] = [*self._acks.values(), self._connack]
            for fut in futures:
                if not fut.done():
                    fut.set_exception(MqttProtocolError(f"connection lost: {error!r}"))
            if not self.closed.done():
                self.closed.set_result(error)

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == _PUBLISH:
            qos = (first >> 1) & 0x03
            tlen = struct.unpack_from("!H", body)[0]
            topic = body[2 : 2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                pid = body[pos : pos + 2]
                pos += 2
                self._writer.write(b"\x40\x02" + pid)
            if self._v5:
                plen, shift = 0, 0
                while True:
                    b = body[pos]
                    pos += 1
                    plen += (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                pos += plen
            payload = body[pos:]
            if self.on_message is not None:
                self.on_message(topic, payload)
            else:
                self.messages.put_nowait((topic, payload))
        elif kind in (_PUBACK, _SUBACK & 0xF0):
            pid = struct.unpack_from("!H", body)[0]
            fut = self._acks.pop(pid, None)
            if fut is not None and not fut.done():
                if kind == _SUBACK & 0xF0 and body[-1] >= 0x80:
                    fut.set_exception(MqttProtocolError(f"SUBACK refused: 0x{body[-1]:02x}"))
                else:
                    fut.set_result(None)
        elif kind == _CONNACK:
            if not self._connack.done():
                self._connack.set_result(body[1])
        elif kind == 0xD0:  # PINGRESP
            return
        else:
            raise MqttProtocolError(f"unexpected packet type 0x{first:02x}")

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        pid = self._packet_id()
        fut = self._acks[pid] = asyncio.get_running_loop().create_future()
        props = b"\x00" if self._v5 else b""
        body = struct.pack("!H", pid) + props + _string(topic) + bytes((qos,))
        self._writer.write(_packet(_SUBSCRIBE, body))
        await fut

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        """Send a PUBLISH; the future resolves on its PUBACK (at once for QoS 0)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        props = b"\x00" if self._v5 else b""
        if qos:
            pid = self._packet_id()
            self._acks[pid] = fut
            body = _string(topic) + struct.pack("!H", pid) + props + payload
        else:
            body = _string(topic) + props + payload
            fut.set_result(None)
        self._writer.write(_packet(_PUBLISH | (qos << 1), body))
        return fut

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        await self.publish_nowait(topic, payload, qos)

    async def drain(self) -> None:
        await self._writer.drain()

    async def next_message(self, timeout: float) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def disconnect(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            self._writer.write(_packet(_DISCONNECT, b""))
            await self._writer.drain()
        self.abort()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def abort(self) -> None:
        self._writer.transport.abort()
        self._task.cancel()
