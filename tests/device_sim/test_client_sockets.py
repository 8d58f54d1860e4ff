"""The device's MQTT client leaves no socket open when a TLS handshake fails (a broker
being restarted, a listener that refuses the certificate): paho-mqtt 2.2 does not close
it, ``device_sim.client`` does."""

from __future__ import annotations

import asyncio
import gc
import ssl
import warnings

import aiomqtt
import pytest

from device_sim.client import device_mqtt_client
from registrar.broker import Endpoint


async def test_a_failed_handshake_leaves_no_open_socket() -> None:
    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # the TCP connection is accepted, the TLS handshake gets no answer

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                tls = ssl.create_default_context()
                with pytest.raises(aiomqtt.MqttError):
                    async with device_mqtt_client(
                        Endpoint("127.0.0.1", port), "dev-1", tls, "3.1.1", 5
                    ):
                        pass
            gc.collect()
    finally:
        server.close()
        await server.wait_closed()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked
