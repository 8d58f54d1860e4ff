"""The registrar's own MQTT session (:mod:`registrar.mqtt_session`).

Against real Mosquitto (both protocol versions, the registrar's certificate) for what a
broker does, and against a scripted TLS peer on loopback for what a healthy broker never
does (malformed, oversized and unexpected packets, a refused CONNACK, a broker that stops
answering PINGREQ), plus a property-based run of arbitrary bytes through the parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar.errors import RegistrarError
from registrar.mqtt_session import Inbound, MqttSession, MqttSessionError

# ------------------------------------------------------------------ scripted TLS peer

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(length)


def packet(first: int, body: bytes) -> bytes:
    assert len(body) < 128 * 128
    head = (
        bytes([len(body)]) if len(body) < 128 else bytes([len(body) & 0x7F | 0x80, len(body) >> 7])
    )
    return bytes([first]) + head + body


def publish(topic: str, payload: bytes, pid: int | None = None) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t
    if pid is not None:
        body += struct.pack("!H", pid)
    return packet(0x32 if pid is not None else 0x30, body + payload)


CONNACK_OK = packet(0x20, b"\x00\x00")


@pytest.fixture
def tls_pair(pki_pem_dir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki_pem_dir / "broker.pem", pki_pem_dir / "broker-key.pem")
    client = ssl.create_default_context(
        cadata=(pki_pem_dir / "root.pem").read_text() + (pki_pem_dir / "site_ca.pem").read_text()
    )
    return server, client


@contextlib.asynccontextmanager
async def peer(server_tls: ssl.SSLContext, script: Script) -> AsyncIterator[int]:
    """A one-shot TLS server on an ephemeral loopback port that runs ``script``."""
    done: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        done.append(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await read_packet(reader)  # CONNECT
            await script(reader, writer)
            await writer.drain()
            await reader.read()  # until the client goes

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in done:
            task.cancel()
        await asyncio.gather(*done, return_exceptions=True)


async def open_session(port: int, client_tls: ssl.SSLContext, **kw: object) -> MqttSession:
    return await MqttSession.open(
        "127.0.0.1",
        port,
        tls=client_tls,
        client_id="registrar@test",
        timeout=5,
        **kw,  # type: ignore[arg-type]
    )


async def test_messages_arrive_in_order_and_qos1_is_acknowledged(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    acks: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_OK)
        # Two packets in one TLS record and one split across records.
        writer.write(publish("a/1", b"one", pid=7) + publish("a/2", b"two"))
        big = publish("a/3", b"x" * 3000, pid=8)
        writer.write(big[:5])
        await writer.drain()
        await asyncio.sleep(0)
        writer.write(big[5:])
        for _ in range(2):
            first, body = await read_packet(reader)
            assert first == 0x40
            acks.append(body)

    async with peer(tls_pair[0], script) as port:
        session = await open_session(port, tls_pair[1], protocol="3.1.1")
        got = [await asyncio.wait_for(session.next_message(), 5) for _ in range(3)]
        assert [m.topic for m in got] == ["a/1", "a/2", "a/3"]
        assert got[0] == Inbound("a/1", b"one", False)
        assert got[2].payload == b"x" * 3000
        for _ in range(50):
            if len(acks) == 2:
                break
            await asyncio.sleep(0.02)
        assert acks == [b"\x00\x07", b"\x00\x08"]
        await session.disconnect()


@pytest.mark.parametrize(
    ("name", "reply", "expected"),
    [
        ("connack refused", packet(0x20, b"\x00\x05"), "CONNACK refused: reason 0x05"),
        ("qos 2", CONNACK_OK + packet(0x34, b"\x00\x01a\x00\x01x"), "QoS 2"),
        ("oversized", CONNACK_OK + b"\x30\xff\xff\xff\x7f", "exceeds"),
        ("bad length", CONNACK_OK + b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        ("unknown type", CONNACK_OK + packet(0xF0, b""), "unexpected packet type 0xf0"),
        ("topic past end", CONNACK_OK + packet(0x30, b"\x00\x09ab"), "topic runs past"),
        ("bad utf-8", CONNACK_OK + packet(0x30, b"\x00\x02\xff\xfe"), "malformed packet"),
        ("short puback", CONNACK_OK + packet(0x40, b"\x01"), "malformed packet"),
        ("empty topic", CONNACK_OK + packet(0x30, b"\x00\x00x"), "without a topic"),
    ],
)
async def test_a_broken_broker_ends_the_session_with_a_clear_error(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], name: str, reply: bytes, expected: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply)

    async with peer(tls_pair[0], script) as port:
        with pytest.raises(MqttSessionError, match=expected) as caught:
            session = await open_session(port, tls_pair[1], protocol="3.1.1", max_packet=65536)
            await asyncio.wait_for(session.next_message(), 5)
        assert isinstance(caught.value, RegistrarError)  # the package's one root


async def test_v5_disconnect_and_refused_publish_carry_the_brokers_reason(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # CONNACK with Receive Maximum 1, then refuse the first PUBLISH (0x87 not authorized)
        writer.write(packet(0x20, b"\x00\x00\x03\x21\x00\x01"))
        first, body = await read_packet(reader)
        assert first & 0xF0 == 0x30
        pid = body[2 + body[1] : 4 + body[1]]
        writer.write(packet(0x40, pid + b"\x87\x00"))
        reason = b"bye now"
        props = b"\x1f" + struct.pack("!H", len(reason)) + reason
        writer.write(packet(0xE0, b"\x8e" + bytes([len(props)]) + props))

    async with peer(tls_pair[0], script) as port:
        session = await open_session(port, tls_pair[1], protocol="5")
        with pytest.raises(MqttSessionError, match="PUBLISH refused: reason 0x87"):
            await session.publish("x/y", b"z")
        with pytest.raises(MqttSessionError, match=r"reason 0x8e: bye now"):
            await asyncio.wait_for(session.next_message(), 5)


async def test_a_silent_broker_is_detected_by_the_keepalive(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    pings: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_OK)
        await writer.drain()
        first, _ = await read_packet(reader)
        pings.append(first)  # and never a PINGRESP

    async with peer(tls_pair[0], script) as port:
        session = await open_session(port, tls_pair[1], protocol="3.1.1", keepalive=1)
        with pytest.raises(MqttSessionError, match="no PINGRESP within 1 s"):
            await asyncio.wait_for(session.next_message(), 10)
        assert pings == [0xC0]


COUNT = 2000


async def test_reading_stops_past_the_backlog_and_resumes(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    sent = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_OK)
        for i in range(COUNT):  # 16 MB: more than loopback TCP and TLS buffers hold
            writer.write(publish(f"t/{i}", b"p" * 8000))
            await writer.drain()  # blocks once the client stops reading
        sent.set()

    async with peer(tls_pair[0], script) as port:
        session = await open_session(port, tls_pair[1], protocol="3.1.1", backlog=8)
        first = await asyncio.wait_for(session.next_message(), 5)
        # Nobody consumes: the session must stop reading, so the peer cannot finish.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sent.wait(), 1.0)
        assert session._paused
        topics = [first.topic] + [
            (await asyncio.wait_for(session.next_message(), 5)).topic for _ in range(COUNT - 1)
        ]
        assert topics == [f"t/{i}" for i in range(COUNT)]
        await asyncio.wait_for(sent.wait(), 5)
        await session.disconnect()


async def test_a_publisher_gets_its_puback_while_the_backlog_is_full(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The PUBACK comes behind more undelivered messages than the backlog: the session
    reads on while a publisher waits for it (a consumer that waits for that publisher
    would otherwise wait forever: issue 11, the soak's rotation), then stops again."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CONNACK_OK)
        first, body = await read_packet(reader)  # the client's QoS 1 PUBLISH
        assert first & 0xF6 == 0x32
        tlen = struct.unpack("!H", body[:2])[0]
        for i in range(COUNT):  # 16 MB before the PUBACK
            writer.write(publish(f"t/{i}", b"p" * 8000))
            await writer.drain()
        writer.write(packet(0x40, body[2 + tlen : 4 + tlen]))
        for i in range(COUNT, COUNT + 100):  # and more after it
            writer.write(publish(f"t/{i}", b"p" * 8000))
            await writer.drain()

    async with peer(tls_pair[0], script) as port:
        session = await open_session(port, tls_pair[1], protocol="3.1.1", backlog=8)
        # Nobody consumes while the publisher waits.
        await asyncio.wait_for(session.publish("up", b"x", timeout=20), 20)
        assert session._paused  # served: reading stops again
        topics = [
            (await asyncio.wait_for(session.next_message(), 5)).topic for _ in range(COUNT + 100)
        ]
        assert topics == [f"t/{i}" for i in range(COUNT + 100)]
        await session.disconnect()


class _Sink(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v5=st.booleans(),
    chunks=st.lists(st.binary(max_size=64), max_size=8),
)
def test_arbitrary_bytes_only_ever_end_the_session_cleanly(v5: bool, chunks: list[bytes]) -> None:
    async def feed() -> None:
        session = MqttSession(v5=v5, max_packet=4096, backlog=4)
        session.connection_made(_Sink())
        session._connack.set_result(False)
        for chunk in [CONNACK_OK[:0], *chunks]:
            session.data_received(chunk)  # must not raise
        if session.closed.done():
            assert isinstance(session.closed.result(), MqttSessionError)

    asyncio.run(feed())
