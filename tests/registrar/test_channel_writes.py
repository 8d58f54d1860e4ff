"""The registrar's MQTT session writes what one loop iteration queues (answers, PUBACKs of
requests) in one TLS write, not one write per packet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.site_fixture import BenchSite, build_commissioned_site
from device_sim.client import Registered
from device_sim.fleet import software_device
from registrar.app import AppSettings, RegistrarApp, running
from registrar.site import SiteHome


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[BenchSite, RegistrarApp]]:
    bench = build_commissioned_site(tmp_path / "world", id_prefix="dev-")
    settings = AppSettings(registration_port=0, operational_port=0)
    async with running(SiteHome.open(bench.home), bench.secrets(), settings) as app:
        yield bench, app


async def test_a_burst_of_registrations_leaves_in_fewer_writes_than_packets(
    site: tuple[BenchSite, RegistrarApp],
) -> None:
    """40 registrations at once: 40 PUBACKs of the requests and 40 answers leave the
    registrar's session; what one loop iteration queues goes out in one TLS write."""
    bench, app = site
    assert app.channel is not None
    session = app.channel._session
    assert session is not None and session._transport is not None
    transport = session._transport
    writes: list[bytes] = []
    write = transport.write

    def counting_write(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    try:
        devices = [software_device(d.credentials()) for d in bench.factory_devices(40)]
        served = app.channel.served
        results = await asyncio.gather(
            *(d.register(app.registration_endpoint, timeout=30) for d in devices),
            return_exceptions=True,
        )
        for _ in range(100):  # the last PUBACK of an answer may still be on its way
            if app.channel.served - served == 40:
                break
            await asyncio.sleep(0.02)
    finally:
        transport.write = write  # type: ignore[method-assign]
    assert all(isinstance(r, Registered) for r in results), results[:3]
    assert app.channel.served - served == 40
    packets = sum(_count_packets(w) for w in writes)
    assert packets >= 80  # 40 PUBACKs + 40 answers (plus any PINGREQ)
    assert len(writes) < packets, (len(writes), packets)


def _count_packets(data: bytes) -> int:
    """MQTT packets in ``data`` (whole packets: the session writes nothing partial)."""
    count, pos = 0, 0
    while pos < len(data):
        length, shift, pos = 0, 0, pos + 1
        while True:
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos += length
        count += 1
    return count
