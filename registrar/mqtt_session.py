"""The registrar's own MQTT client session: MQTT 3.1.1 and 5, QoS 0/1, over one TLS stream.

Why not paho/aiomqtt here: every registration is one PUBLISH in and one PUBLISH out, and
paho handles each packet in Python callbacks behind locks while aiomqtt bridges them to
asyncio through a thread-safe hand-off (a self-pipe wake-up and two ``epoll_ctl`` per
packet). Measured in ``bench/registration.py`` that was about a fifth of the registrar's
CPU per registration. This session is an :class:`asyncio.Protocol`: the event loop hands
it the decrypted bytes, it parses whole packets from them, and what it writes in one loop
iteration leaves in one TLS write.

What a registrar instance needs and nothing else:

- CONNECT with a client certificate (mutual TLS, no username), clean or persistent
  session, keep-alive; v5 with a Session Expiry (0: the session ends with the connection)
  and a Maximum Packet Size the broker must respect; the CONNACK's Receive Maximum (v5)
  bounds our unacknowledged PUBLISHes.
- SUBSCRIBE (one filter per packet, ``$share/…`` on v5), refused filters raise.
- PUBLISH QoS 0/1 (retain as asked); a QoS 1 PUBLISH completes on its PUBACK, and a v5
  PUBACK reason ≥ 0x80 (e.g. not authorized) fails it.
- Incoming PUBLISH QoS 0/1 (we subscribe at QoS 1 at most, so a broker never sends QoS 2;
  one that does breaks the protocol and the session ends), acknowledged on arrival.
- Flow control that reaches the broker: past ``backlog`` undelivered messages the session
  stops reading the socket (TCP backpressure) until the consumer catches up, except while
  a publisher waits for a Receive Maximum credit or for its PUBACK (:meth:`publish`): the
  PUBACK arrives on the same stream, behind the messages, and a consumer that waits for
  that publisher (a worker answering a request) would otherwise never catch up. Meanwhile
  the backlog may grow past ``backlog``; reading stops again once nobody waits.
- PINGREQ when nothing was sent for half the keep-alive; no PINGRESP within the keep-alive
  ends the session. A v5 DISCONNECT from the broker ends it with the broker's reason.
- Bad input ends the session with :class:`MqttSessionError` (malformed packet, oversized
  packet, unexpected packet type, topic alias); nothing in it can raise anything else.

No QoS 2, no AUTH, no will, no username/password, no automatic reconnect: the caller
(:class:`registrar.channel.MqttChannel`) reconnects and resubscribes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import struct
from dataclasses import dataclass
from typing import Any, Literal

from registrar.errors import BrokerError

__all__ = ["Inbound", "MqttSession", "MqttSessionError"]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 0x10, 0x20, 0x30, 0x40
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
_PINGREQ_PACKET = b"\xc0\x00"
_DISCONNECT_PACKET = b"\xe0\x00"
#: v5 property identifiers this session reads or writes.
_P_RECEIVE_MAXIMUM, _P_MAX_PACKET_SIZE, _P_TOPIC_ALIAS = 0x21, 0x27, 0x23
_P_REASON_STRING = 0x1F
_P_SESSION_EXPIRY = 0x11
#: v5 properties by value type, to skip the ones we do not read (MQTT 5.0, 2.2.2.2).
_P_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_P_TWO = {0x13, 0x21, 0x22, 0x23}
_P_FOUR = {0x02, 0x11, 0x18, 0x27}
_P_VARINT = {0x0B}
_P_BINARY_OR_TEXT = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
_P_PAIR = 0x26


class MqttSessionError(BrokerError):
    """The session could not be opened, broke its protocol, or ended."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """One PUBLISH the broker delivered (already acknowledged)."""

    topic: str
    payload: bytes
    retain: bool


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise MqttSessionError("string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the variable byte integer at ``pos``."""
    got = _varint_at(data, pos, len(data), "variable byte integer")
    if got is None:
        raise MqttSessionError("truncated variable byte integer")
    return got


def _header_length(data: bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """The fixed header's remaining length at ``pos`` and where the body starts, or None
    if the bytes so far end inside it."""
    return _varint_at(data, pos, end, "remaining length")


def _varint_at(
    data: bytes | bytearray | memoryview, pos: int, end: int, what: str
) -> tuple[int, int] | None:
    """(value, next position) of the variable byte integer at ``pos``, or None if it does
    not end before ``end``; ``MqttSessionError`` if it is longer than 4 bytes."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            return None
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MqttSessionError(f"{what} longer than 4 bytes")


def _properties(data: bytes, pos: int) -> tuple[dict[int, int | bytes], int]:
    """The v5 properties at ``pos`` (integers and the raw bytes of strings), and the
    position after them. Unknown identifiers are a protocol error."""
    length, pos = _read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MqttSessionError("properties run past the packet")
    found: dict[int, int | bytes] = {}
    while pos < end:
        ident, pos = _read_varint(data, pos)
        if ident in _P_BYTE:
            found[ident], pos = data[pos], pos + 1
        elif ident in _P_TWO:
            found[ident], pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif ident in _P_FOUR:
            found[ident], pos = int.from_bytes(data[pos : pos + 4], "big"), pos + 4
        elif ident in _P_VARINT:
            found[ident], pos = _read_varint(data, pos)
        elif ident in _P_BINARY_OR_TEXT:
            n = int.from_bytes(data[pos : pos + 2], "big")
            found[ident], pos = bytes(data[pos + 2 : pos + 2 + n]), pos + 2 + n
        elif ident == _P_PAIR:
            for _ in range(2):
                n = int.from_bytes(data[pos : pos + 2], "big")
                pos += 2 + n
        else:
            raise MqttSessionError(f"unknown MQTT v5 property 0x{ident:02x}")
    if pos != end:
        raise MqttSessionError("a property runs past its properties")
    return found, end


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _reason_text(props: dict[int, int | bytes]) -> str:
    text = props.get(_P_REASON_STRING)
    if isinstance(text, bytes):
        return ": " + text.decode("utf-8", "replace")[:200]
    return ""


class MqttSession(asyncio.Protocol):
    """One MQTT connection. Open it with :meth:`open`; read with :meth:`next_message`."""

    def __init__(self, *, v5: bool, max_packet: int, backlog: int) -> None:
        self._v5 = v5
        self._max_packet = max_packet
        self._backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self._paused = False
        self._inbox: collections.deque[Inbound] = collections.deque()
        #: The reader waiting in :meth:`next_message` (one at a time), woken by a delivery
        #: or by the end of the session.
        self._reader: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._credits = 65535
        self._credit_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Publishers awaiting a PUBACK in :meth:`publish` (the socket is read for them).
        self._ack_waiters = 0
        self._connack: asyncio.Future[bool] = self._loop.create_future()
        self._connack.add_done_callback(_retrieve)
        self._ping_sent_at: float | None = None
        self._last_sent = self._loop.time()
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._keepalive = 0
        #: Set once the session has ended; holds why.
        self.closed: asyncio.Future[MqttSessionError] = self._loop.create_future()
        #: Session Present of the CONNACK (a persistent session the broker kept).
        self.session_present = False

    # -------------------------------------------------------------------- opening

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext,
        client_id: str,
        protocol: Literal["3.1.1", "5"] = "5",
        clean: bool = True,
        session_expiry: int = 0,
        keepalive: int = 30,
        max_packet: int = 1 << 21,
        backlog: int = 1024,
        timeout: float = 15.0,
    ) -> MqttSession:
        """Connect, handshake TLS, send CONNECT and wait for a successful CONNACK.
        ``session_expiry`` (v5, seconds): how long the broker keeps the session after the
        connection ends (0: it ends with it); with ``clean`` False the session resumes."""
        loop = asyncio.get_running_loop()
        v5 = protocol == "5"
        try:
            _, session = await asyncio.wait_for(
                loop.create_connection(
                    lambda: cls(v5=v5, max_packet=max_packet, backlog=backlog),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host,
                ),
                timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise MqttSessionError(f"cannot connect to {host}:{port}: {exc!r}") from exc
        session._keepalive = keepalive
        flags = 0x02 if clean else 0x00
        head = _string("MQTT") + bytes((5 if v5 else 4, flags)) + struct.pack("!H", keepalive)
        if v5:
            # Maximum Packet Size: the broker drops (and does not send) anything larger.
            props = bytes((_P_MAX_PACKET_SIZE,)) + struct.pack("!I", max_packet)
            if session_expiry:
                props += bytes((_P_SESSION_EXPIRY,)) + struct.pack("!I", session_expiry)
            head += _varint(len(props)) + props
        session._write(_packet(_CONNECT, head + _string(client_id)))
        try:
            session.session_present = await asyncio.wait_for(
                asyncio.shield(session._connack), timeout
            )
        except TimeoutError as exc:
            session.abort()
            raise MqttSessionError(f"no CONNACK from {host}:{port} within {timeout} s") from exc
        except MqttSessionError:
            session.abort()
            raise
        session._arm_keepalive()
        return session

    # --------------------------------------------------------------- asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(MqttSessionError(f"connection lost{f': {exc!r}' if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        try:
            pos = 0
            end = len(buffer)
            while end - pos >= 2:
                if buffer[pos + 1] & 0x80:
                    header = _header_length(buffer, pos + 1, end)
                    if header is None:
                        break  # the length itself is not complete yet
                    length, start = header
                else:
                    length, start = buffer[pos + 1], pos + 2
                if length > self._max_packet:
                    raise MqttSessionError(f"packet of {length} bytes exceeds {self._max_packet}")
                if start + length > end:
                    break
                self._dispatch(buffer[pos], bytes(buffer[start : start + length]))
                pos = start + length
            del buffer[:pos]
        except MqttSessionError as exc:
            self._fail(exc)
        except (IndexError, UnicodeDecodeError, struct.error, ValueError) as exc:
            self._fail(MqttSessionError(f"malformed packet from the broker: {exc}"))

    # ------------------------------------------------------------------- packets

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == _PUBLISH:
            self._on_publish(first, body)
        elif kind == _PUBACK:
            pid = (body[0] << 8) | body[1]
            fut = self._acks.pop(pid, None)
            self._return_credit()
            if fut is not None and not fut.done():
                code = body[2] if self._v5 and len(body) > 2 else 0
                if code >= 0x80:
                    fut.set_exception(MqttSessionError(f"PUBLISH refused: reason 0x{code:02x}"))
                else:
                    fut.set_result(None)
        elif kind == _SUBACK:
            pid = (body[0] << 8) | body[1]
            pos = _properties(body, 2)[1] if self._v5 else 2
            codes = body[pos:]
            fut = self._acks.pop(pid, None)
            if fut is not None and not fut.done():
                if not codes or codes[0] >= 0x80:
                    code = codes[0] if codes else 0x80
                    fut.set_exception(MqttSessionError(f"SUBSCRIBE refused: reason 0x{code:02x}"))
                else:
                    fut.set_result(None)
        elif kind == _PINGRESP:
            self._ping_sent_at = None
        elif kind == _CONNACK:
            self._on_connack(body)
        elif kind == _DISCONNECT:
            code = body[0] if body else 0
            props = _properties(body, 1)[0] if self._v5 and len(body) > 1 else {}
            raise MqttSessionError(
                f"the broker disconnected us: reason 0x{code:02x}{_reason_text(props)}"
            )
        else:
            raise MqttSessionError(f"unexpected packet type 0x{first:02x} from the broker")

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done() or len(body) < 2:
            raise MqttSessionError("unexpected or short CONNACK")
        code = body[1]
        props: dict[int, int | bytes] = {}
        if self._v5 and len(body) > 2:
            props = _properties(body, 2)[0]
        if code != 0:
            self._connack.set_exception(
                MqttSessionError(f"CONNACK refused: reason 0x{code:02x}{_reason_text(props)}")
            )
            return
        receive_maximum = props.get(_P_RECEIVE_MAXIMUM)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            self._credits = receive_maximum
        self._connack.set_result(bool(body[0] & 0x01))

    def _on_publish(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        if qos == 3 or qos == 2:
            raise MqttSessionError(f"PUBLISH with QoS {qos} (subscribed at QoS 1 at most)")
        tlen = (body[0] << 8) | body[1]
        pos = 2 + tlen
        if pos > len(body):
            raise MqttSessionError("PUBLISH topic runs past the packet")
        topic = body[2:pos].decode("utf-8")
        if qos:
            pid = body[pos : pos + 2]
            pos += 2
            self._write(b"\x40\x02" + pid)
        if self._v5:
            props, pos = _properties(body, pos)
            if _P_TOPIC_ALIAS in props:
                raise MqttSessionError("topic alias from the broker (none was allowed)")
        if not topic:
            raise MqttSessionError("PUBLISH without a topic")
        self._inbox.append(Inbound(topic, body[pos:], bool(first & 0x01)))
        self._wake_reader()
        self._update_reading()

    # --------------------------------------------------------------- the API

    async def next_message(self) -> Inbound:
        """The next delivered message; raises :class:`MqttSessionError` once the session
        ended and everything it delivered was taken."""
        while not self._inbox:
            if self.closed.done():
                raise self.closed.result()
            if self._reader is not None and not self._reader.done():
                raise MqttSessionError("next_message is already awaited by another reader")
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        message = self._inbox.popleft()
        if self._paused:
            self._update_reading()
        return message

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 15.0) -> None:
        self._check_open()
        pid = self._packet_id()
        fut = self._acks[pid] = self._ack_future()
        props = b"\x00" if self._v5 else b""
        body = struct.pack("!H", pid) + props + _string(topic_filter) + bytes((qos,))
        self._write(_packet(_SUBSCRIBE, body))
        await self._await(fut, timeout, f"SUBACK for {topic_filter!r}")

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Send a PUBLISH now if a Receive Maximum credit is free (QoS 1), and return the
        future of its PUBACK (done at once for QoS 0). Raises :class:`MqttSessionError`
        when closed or without a credit (use :meth:`publish` to wait for one)."""
        self._check_open()
        fut = self._ack_future()
        props = b"\x00" if self._v5 else b""
        first = _PUBLISH | (qos << 1) | (0x01 if retain else 0)
        topic_bytes = _string(topic)
        if qos:
            if self._credits <= 0:
                raise MqttSessionError("no Receive Maximum credit")
            self._credits -= 1
            pid = self._packet_id()
            self._acks[pid] = fut
            body = topic_bytes + pid.to_bytes(2, "big") + props
        else:
            body = topic_bytes + props
            fut.set_result(None)
        length = len(body) + len(payload)
        self._write(bytes((first,)) + _varint(length) + body + payload)
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 15.0,
    ) -> None:
        """Publish and wait for the PUBACK (QoS 1), waiting for a credit first if needed."""
        while qos and self._credits <= 0:
            self._check_open()
            waiter = self._ack_future()
            self._credit_waiters.append(waiter)
            self._update_reading()
            await self._await(waiter, timeout, "a Receive Maximum credit")
        acked = self.publish_nowait(topic, payload, qos=qos, retain=retain)
        if not qos:
            return
        self._ack_waiters += 1
        if self._paused:
            self._update_reading()
        try:
            await self._await(acked, timeout, f"PUBACK on {topic!r}")
        finally:
            self._ack_waiters -= 1
            self._update_reading()

    async def disconnect(self) -> None:
        """A clean DISCONNECT, then close."""
        if self._transport is not None and not self.closed.done():
            self._write(_DISCONNECT_PACKET)
            self._flush()
            self._transport.close()
        self._end(MqttSessionError("disconnected"))

    def abort(self) -> None:
        """Drop the connection now (nothing more is sent)."""
        if self._transport is not None:
            self._transport.abort()
        self._end(MqttSessionError("aborted"))

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    # --------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self.closed.done():
            raise self.closed.result()

    async def _await(self, fut: asyncio.Future[None], timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as exc:
            raise MqttSessionError(f"no {what} within {timeout} s") from exc

    def _ack_future(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)  # a failure nobody waits for is not an error
        return fut

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._acks:
                return self._next_id
        raise MqttSessionError("every packet id is in flight")

    def _return_credit(self) -> None:
        self._credits += 1
        while self._credit_waiters:
            waiter = self._credit_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if self._paused:
            self._update_reading()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _update_reading(self) -> None:
        """Stop reading past the backlog (backpressure), unless a publisher waits for a
        credit or a PUBACK: those arrive on the same stream."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        waiting = self._ack_waiters > 0 or any(not w.done() for w in self._credit_waiters)
        pause = len(self._inbox) >= self._backlog and not waiting
        if pause and not self._paused:
            transport.pause_reading()
            self._paused = True
        elif not pause and self._paused and (len(self._inbox) <= self._backlog // 2 or waiting):
            transport.resume_reading()
            self._paused = False

    def _write(self, packet: bytes) -> None:
        """Queue ``packet``; everything queued in one loop iteration leaves in one write."""
        self._out += packet
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if not self._out or transport is None or transport.is_closing():
            self._out.clear()
            return
        transport.write(bytes(self._out))
        self._out.clear()
        self._last_sent = self._loop.time()

    def _arm_keepalive(self) -> None:
        if self._keepalive > 0 and not self.closed.done():
            self._keepalive_handle = self._loop.call_later(self._keepalive / 2, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at > self._keepalive:
            self._fail(MqttSessionError(f"no PINGRESP within {self._keepalive} s"))
            return
        if self._ping_sent_at is None and now - self._last_sent >= self._keepalive / 2:
            self._ping_sent_at = now
            self._write(_PINGREQ_PACKET)
        self._arm_keepalive()

    def _fail(self, error: MqttSessionError) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._end(error)

    def _end(self, error: MqttSessionError) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self.closed.done():
            return
        self.closed.set_result(error)
        if not self._connack.done():
            self._connack.set_exception(error)
        pending = [*self._acks.values(), *self._credit_waiters]
        self._acks.clear()
        self._credit_waiters.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)
        self._wake_reader()
        with contextlib.suppress(Exception):
            self._buffer.clear()
