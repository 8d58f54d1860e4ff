"""The registrar's MQTT channel writes what paho queues (answers, PUBACKs of requests) from
the loop, several packets per write, instead of a writability watch per packet."""

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


async def test_a_burst_of_registrations_is_answered_without_a_write_watch_per_packet(
    site: tuple[BenchSite, RegistrarApp],
) -> None:
    bench, app = site
    loop = asyncio.get_running_loop()
    watched: list[int] = []
    add_writer = loop.add_writer

    def counting_add_writer(fd: Any, callback: Any, *args: Any) -> None:
        watched.append(fd)
        add_writer(fd, callback, *args)

    loop.add_writer = counting_add_writer  # type: ignore[method-assign]
    try:
        devices = [software_device(d.credentials()) for d in bench.factory_devices(40)]
        served = app.channel.served if app.channel is not None else 0
        results = await asyncio.gather(
            *(d.register(app.registration_endpoint, timeout=30) for d in devices),
            return_exceptions=True,
        )
    finally:
        loop.add_writer = add_writer  # type: ignore[method-assign]
    assert all(isinstance(r, Registered) for r in results), results[:3]
    assert app.channel is not None and app.channel.served - served == 40
    client = app.channel._client
    assert client is not None
    sock = client._client.socket()
    assert sock is not None
    ours = watched.count(sock.fileno())
    # 40 answers and 40 PUBACKs left the registrar's session: paho's default path watches
    # the socket for each (~80 add_writer calls); coalesced, only a refused write does.
    assert ours < 10, ours
    assert len(watched) > 40  # the devices' own sessions (paho's default path) were seen
