"""``registrar run --broker rabbitmq``: real registrar processes on a 3-node cluster.

The site is commissioned from a real HQ bundle; the cluster is rendered from that site by
the production renderer and started on the tests' own ports; two ``registrar run``
processes (instance 1 with the site duties, instance 2) share one PostgreSQL database and
consume the one quorum queue. Scenarios: a fleet registers through both instances on two
nodes and operates (telemetry reaches the site-duties instance once); a revocation through
the spool cuts the live session on the node it is on and the device cannot come back.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import pytest_asyncio
from click.testing import CliRunner

from bench.site_fixture import BenchSite, RegistrarProcess, build_commissioned_site
from device_sim.client import DeviceClient, Registered
from device_sim.fleet import software_device
from registrar.broker import BrokerTls, Endpoint
from registrar.broker.rabbitmq import RabbitNode, site_tls
from registrar.broker.rabbitmq_auth import ADMIN_USER
from registrar.broker.rabbitmq_site import admin_password
from registrar.cli import main as registrar_main
from registrar.site import SiteHome
from registrar.spool import submit_command
from registrar.store import Store
from tests.fixtures.postgres import PgServer, create_database, drop_database
from tests.fixtures.rabbitmq import RabbitCluster, boot_cluster, plan_cluster, stray_beams

pytestmark = [pytest.mark.slow]
IN_LOOP = pytest.mark.asyncio(loop_scope="module")


@dataclass
class RunSite:
    bench: BenchSite
    cluster: RabbitCluster
    store_url: str
    registrars: list[RegistrarProcess]
    logs: Path

    def endpoint(self, node: int) -> Endpoint:
        n = self.cluster.nodes[node]
        return Endpoint(n.host, n.mqtts_port)

    def log_of(self, instance: int) -> str:
        return (self.logs / f"registrar-{instance}.log").read_text(errors="replace")


def _node_spec(node: RabbitNode) -> str:
    ports = (node.amqp_port, node.mqtts_port, node.management_port, node.dist_port)
    return ",".join((node.name, node.host, *map(str, ports)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run_site(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer
) -> AsyncIterator[RunSite]:
    d = tmp_path_factory.mktemp("rabbit-run")
    bench = build_commissioned_site(d / "world")
    policy = CliRunner().invoke(
        registrar_main,
        [
            *("ldevid-policy", "--home", str(bench.home)),
            *("--min-interval-seconds", "0", "--handover-seconds", "1"),
            *("--supersede-window-seconds", "0"),  # no batching: cut 1 s after the answer
        ],
    )
    assert policy.exit_code == 0, policy.output
    home = SiteHome.open(bench.home)
    passphrase = bench.secrets().passphrase()
    current = home.current
    tls = site_tls(
        BrokerTls(
            server_cert=current / "broker.pem",
            server_key=home.key_path("broker"),
            server_key_passphrase=passphrase,
            registration_cas=current / "registration-cas.pem",
            operational_cas=current / "operational-cas.pem",
            crl_file=current / "crls.pem",
        )
    )
    auth_ports = [_free_port(), _free_port()]
    admin = (ADMIN_USER, admin_password(passphrase, home.site_id.value))
    cluster = plan_cluster(d / "cluster", tls, f"http://127.0.0.1:{auth_ports[0]}", admin)
    name = create_database(pg_server)
    url = pg_server.url_of(name)
    registrars: list[RegistrarProcess] = []

    def args(instance: int) -> list[str]:
        nodes = [a for n in cluster.nodes for a in ("--rabbitmq-node", _node_spec(n))]
        return [
            *("--broker", "rabbitmq", "--instance", str(instance), "--store", url),
            *("--auth-port", str(auth_ports[instance - 1])),
            *("--rabbitmq-config", str(cluster.base), *nodes),
        ]

    try:
        started = time.monotonic()
        # Instance 1 serves the auth backend the booting nodes ask (the management API
        # used to see the cluster formed needs it too): both start together.
        first, _ = await asyncio.gather(
            RegistrarProcess.start(bench, args(1), log_file=d / "registrar-1.log", timeout=120),
            asyncio.to_thread(boot_cluster, cluster),
        )
        registrars.append(first)
        registrars.append(
            await RegistrarProcess.start(bench, args(2), log_file=d / "registrar-2.log")
        )
        print(f"\ncluster + 2 registrars ready in {time.monotonic() - started:.1f} s")
        yield RunSite(bench, cluster, url, registrars, d)
    finally:
        codes = [await r.stop() for r in reversed(registrars)]
        await asyncio.to_thread(cluster.stop)
        drop_database(pg_server, name)
    assert codes == [0] * len(codes), codes
    assert stray_beams(cluster) == []


async def _register(site: RunSite, devices: list[DeviceClient]) -> list[Registered]:
    async def one(i: int, device: DeviceClient) -> Registered:
        return await device.register(site.endpoint(i % 2), timeout=30, resend_after=3.0)

    return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(devices))))


@IN_LOOP
async def test_two_registrar_processes_share_the_queue_and_devices_operate(
    run_site: RunSite,
) -> None:
    devices = [software_device(d.credentials()) for d in run_site.bench.factory_devices(40)]
    results = await _register(run_site, devices)
    assert len({r.ldevid.serial_number for r in results}) == 40
    store = await Store.open(run_site.store_url)
    try:
        assert (await store.counts())["devices"] == 40
    finally:
        await store.close()
    # operate: telemetry sealed with the payload key, on another node than registration
    # Nodes 0 and 1 (the registrars' nodes). Before the test cluster booted its nodes one
    # at a time, a node could answer CONNACK 3 "server unavailable" (docs/broker.md, boot
    # order).
    for i, device in enumerate(devices[:3]):
        async with device.operational(run_site.endpoint(1 - i % 2)) as session:
            await session.publish_telemetry(b"reading")
    status = run_site.bench.home / "run" / "status.json"
    deadline = time.monotonic() + 10
    while json.loads(status.read_text())["telemetry"]["messages"] < 3:
        assert time.monotonic() < deadline, "telemetry did not reach the site-duties instance"
        await asyncio.sleep(0.1)
    assert "telemetry" not in run_site.log_of(2)


@IN_LOOP
async def test_revocation_through_the_spool_cuts_the_live_session(run_site: RunSite) -> None:
    victim, bystander = (
        software_device(d.credentials()) for d in run_site.bench.factory_devices(2, start=500)
    )
    await _register(run_site, [victim, bystander])
    async with (
        victim.operational(run_site.endpoint(1)),
        bystander.operational(run_site.endpoint(1)) as other,
    ):
        answer = await asyncio.to_thread(
            submit_command,
            SiteHome.open(run_site.bench.home),
            "revoke",
            {"device_id": victim.device_id.value, "reason": "key_compromise"},
        )
        assert answer is not None and answer["ok"], answer
        assert answer["result"]["sessions_cut"] == 1
        await other.publish_telemetry(b"still here")  # the bystander is untouched
    # the revoked LDevID cannot come back on any node (CRL hash dirs + auth backend)
    for node in range(2):
        with pytest.raises((aiomqtt.MqttError, OSError)):
            async with victim.operational(run_site.endpoint(node)):
                pass


@IN_LOOP
async def test_a_session_left_on_a_renewed_ldevid_is_cut_after_the_handover(
    run_site: RunSite,
) -> None:
    (device,) = (
        software_device(d.credentials()) for d in run_site.bench.factory_devices(1, start=700)
    )
    await _register(run_site, [device])
    assert device.registered is not None
    old_serial = device.registered.ldevid.serial_number
    old_tls = device.operational_context()
    async with device.operational(run_site.endpoint(0)) as session:
        renewed = await session.renew(timeout=20)
        assert renewed.ldevid.serial_number != old_serial
        # the registrar cuts this session (old certificate) after the 1 s hand-over
        with pytest.raises(aiomqtt.MqttError):
            for _ in range(100):
                await session.publish_telemetry(b"old certificate")
                await asyncio.sleep(0.1)
    # the new LDevID gets in; the old one is refused at the handshake (CRL hash dirs)
    async with device.operational(run_site.endpoint(1)) as fresh:
        await fresh.publish_telemetry(b"new certificate")
    with pytest.raises((aiomqtt.MqttError, OSError)):
        async with device.operational(run_site.endpoint(0), tls=old_tls):
            pass


@IN_LOOP
async def test_both_instances_served_part_of_the_stream_and_stop_gracefully(
    run_site: RunSite,
) -> None:
    """Runs last: a graceful stop of both processes; each reports what it answered."""
    codes = [await r.stop() for r in reversed(run_site.registrars)]
    assert codes == [0, 0]
    served = []
    for k in (1, 2):
        found = re.search(r"answered (\d+) requests", run_site.log_of(k))
        assert found is not None, run_site.log_of(k)[-2000:]
        served.append(int(found.group(1)))
    # competing consumers: each instance answered part of the 44 requests. A device that
    # had no answer within resend_after sends the identical request again and gets the same
    # answer (idempotent; the store holds one registration), so on a loaded machine the
    # answered count can exceed 44; the registrations themselves are counted above.
    assert sum(served) >= 44 and min(served) > 0, served


@pytest.fixture(scope="module")
def site_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_commissioned_site(tmp_path_factory.mktemp("rabbit-options")).home


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--broker", "rabbitmq", "--auth-port", "40000"], "at least one --rabbitmq-node"),
        (
            ["--broker", "rabbitmq", "--rabbitmq-node", "r-1@localhost,127.0.0.1,1,2,3,4"],
            "needs --auth-port",
        ),
        (["--rabbitmq-node", "r-1@localhost,127.0.0.1,1,2,3,4", "--auth-port", "40000"], "only it"),
        (["--broker", "rabbitmq", "--rabbitmq-node", "junk", "--auth-port", "40000"], "bad node"),
        (
            [
                *("--broker", "rabbitmq", "--rabbitmq-node", "r-1@localhost,127.0.0.1,1,2,3,4"),
                *("--auth-port", "40000", "--join", "127.0.0.1:1"),
            ],
            "no --join",
        ),
    ],
)
def test_bad_rabbitmq_options_are_one_line_errors(
    site_home: Path, options: list[str], message: str
) -> None:
    result = CliRunner().invoke(registrar_main, ["run", "--home", str(site_home), *options])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
