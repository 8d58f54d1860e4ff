"""The clustered broker tier: a real 3-node RabbitMQ 3.10 cluster of this module's own.

What is real: the nodes (rendered by ``registrar.broker.rabbitmq``), mutual TLS with CRLs,
the registrar's HTTP auth backend deciding from a real SQLite registry, the registration
service consuming requests from a quorum queue over AMQP, and devices that are plain
MQTT 3.1.1 clients (``device_sim``). Access is judged by DELIVERY, as on Mosquitto.

The cluster is started once for the module (its start-up time is printed) and torn down
completely (no stray beam process); the node-kill test runs last and kills node 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import stat
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aio_pika
import aiomqtt
import pytest
import pytest_asyncio
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from bench.site_fixture import FactoryDevice, SitePki, build_site_pki
from broker_config.tls_policy import TLS12_CIPHERS, TLS13_CIPHERSUITES
from device_sim.client import DeviceClient, Registered, SoftwareKeys
from registrar.broker import Endpoint
from registrar.broker.rabbitmq import (
    NodeFiles,
    RabbitManagement,
    RabbitMQConfig,
    RabbitMQTier,
    RabbitNode,
    SiteTls,
    amqp_to_mqtt,
    mqtt_to_amqp,
    render_advanced_config,
    render_rabbitmq_conf,
    write_crl_hash_dir,
)
from registrar.broker.rabbitmq_auth import (
    ADMIN_USER,
    AuthBackend,
    AuthPolicy,
    LiveSessions,
    Standing,
    decide,
)
from registrar.channel_amqp import AmqpEndpoint, AmqpRequestSource, ConnectionEvents
from registrar.cli import main as registrar_main
from registrar.errors import BrokerError, ConfigError
from registrar.service import RegistrationService
from registrar.site import commission_site
from registrar.store import Store
from tests.fixtures.rabbitmq import RabbitCluster, start_cluster, stray_beams
from tests.fixtures.site import STATION, make_world
from trustcore.crl import RevokedEntry, build_crl
from trustcore.identity import CertSerial
from trustcore.payload import open_payload, seal_payload
from trustcore.renewal import LdevidPolicy

pytestmark = [pytest.mark.slow]
#: The cluster, its auth backend and the registrar instances live in the module's loop.
IN_CLUSTER_LOOP = pytest.mark.asyncio(loop_scope="module")

V311 = aiomqtt.ProtocolVersion.V311
ADMIN_PASSWORD = "a-test-admin-password-of-enough-length"
FOREIGN_FILTERS = ("#", "+/#", "devices/#", "devices/+/t", "devices/dev-b/#", "devtrust/#")
FOREIGN_TOPICS = ("devices/dev-b/t", "devtrust/register/dev-b/response", "other", "devices/x")


# --------------------------------------------------------------------------- pure parts


def _config(**changes: object) -> RabbitMQConfig:
    node = RabbitNode("n-1@localhost", "127.0.0.1", 30001, 30002, 30003, 30004)
    values: dict[str, object] = {"nodes": (node,), "auth_url": "http://127.0.0.1:30009/auth"}
    values.update(changes)
    return RabbitMQConfig(**values)  # type: ignore[arg-type]


def test_rendered_node_config_is_mtls_only_with_crls_and_the_http_backend(tmp_path: Path) -> None:
    config = _config()
    conf = render_rabbitmq_conf(config, config.nodes[0])
    assert "mqtt.listeners.tcp = none" in conf
    assert "mqtt.listeners.ssl.default = 127.0.0.1:30002" in conf
    assert "mqtt.allow_anonymous = false" in conf and "auth_backends.1 = http" in conf
    assert "auth_backends.2" not in conf and "listeners.ssl = none" in conf
    advanced = render_advanced_config(NodeFiles(tmp_path), config, "pw")
    for option in ("{verify, verify_peer}", "{fail_if_no_peer_cert, true}", "{crl_check, true}"):
        assert option in advanced
    assert "ssl_crl_hash_dir" in advanced and "'tlsv1.1'" not in advanced
    # the AEAD-only suites of broker_config.tls_policy, and no session reuse
    assert f'{{ciphers, "{TLS13_CIPHERSUITES}:{TLS12_CIPHERS}"}}' in advanced
    assert "{reuse_sessions, false}" in advanced and "{honor_cipher_order, true}" in advanced


@pytest.mark.parametrize(
    "change",
    [
        {"auth_url": 'http://x/"]}'},
        {"nodes": ()},
        {"vhost": "other"},
        {"tls_versions": ("tlsv1.1",)},
    ],
)
def test_bad_configuration_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _config(**change)
    with pytest.raises(ConfigError):
        RabbitNode("bad name", "127.0.0.1", 1, 2, 3, 4)
    with pytest.raises(ConfigError):
        render_advanced_config(NodeFiles(Path('/tmp/x"]}.')), _config(), "pw")


def test_topic_mapping_round_trips() -> None:
    for topic in ("devices/dev.1/t", "devtrust/register/+/request", "a/#"):
        assert amqp_to_mqtt(mqtt_to_amqp(topic)) == topic
    assert mqtt_to_amqp("devices/dev.1/+") == "devices.dev/1.*"


def test_broker_config_command_renders_every_node_from_the_site(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w")
    bundle = world.bundle(devices=("TH-000001",), admit_stations=(STATION,))
    commission_site(world.site, bundle, world.site_secrets)
    assert world.site_secrets.passphrase_file is not None
    common = ["broker-config", "rabbitmq", "--home", str(world.site.path)]
    common += ["--passphrase-file", str(world.site_secrets.passphrase_file)]
    nodes = ["--node", "r-1@localhost,127.0.0.1,30001,30002,30003,30004"]
    nodes += ["--node", "r-2@localhost,127.0.0.1,30011,30012,30013,30014"]
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        registrar_main, [*common, *nodes, "--out", str(out), "--auth-url", "http://127.0.0.1:9/a"]
    )
    assert result.exit_code == 0, result.output
    for short in ("r-1", "r-2"):
        files = NodeFiles(out / short)
        assert "cluster_formation.classic_config.nodes.2 = r-2@localhost" in files.conf.read_text()
        assert b"ENCRYPTED PRIVATE KEY" in files.server_key.read_bytes()
        assert len(list(files.crl_dir.iterdir())) >= 2
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    bad = runner.invoke(
        registrar_main, [*common, "--node", "r-1@localhost,x", "--out", str(out), "--auth-url", "u"]
    )
    assert bad.exit_code != 0 and "bad node" in bad.output and "Traceback" not in bad.output


def test_live_sessions_follow_events_and_forget_a_dead_node() -> None:
    live = LiveSessions()
    live.created("n1", "c1", "dev-a")
    live.created("n3", "c2", "dev-a")
    live.created("n3", "c3", "dev-b")
    assert (live.count("dev-a"), live.count("dev-b")) == (2, 1)
    live.closed("n1", "c1")
    live.closed("n1", "never-seen")
    live.node_down("n3")
    assert (live.count("dev-a"), live.count("dev-b")) == (0, 0)


def test_live_sessions_marks_and_nothing_kept_for_gone_identities() -> None:
    live = LiveSessions()
    live.created("n1", "c1", "dev-a")
    mark = live.mark()
    assert not live.created_since("dev-a", mark)  # the connection before the mark
    live.created("n1", "c1", "dev-a")  # the same event twice changes nothing
    assert live.count("dev-a") == 1 and not live.created_since("dev-a", mark)
    live.created("n2", "c2", "dev-a")  # a reconnect after the mark (new certificate)
    assert live.created_since("dev-a", mark) and live.count("dev-a") == 2
    for i in range(1000):  # a thousand devices come and go
        live.created("n1", f"x{i}", f"dev-{i}")
        live.closed("n1", f"x{i}")
    live.closed("n1", "c1")
    live.closed("n2", "c2")
    assert len(live) == 0 and live.count("dev-a") == 0
    assert not live.created_since("dev-a", mark)
    assert live.mark() > mark
    assert (live._live, live._last_created) == ({}, {})  # nothing grows with the fleet


def test_crl_hash_dir_is_replaced_whole_and_refuses_junk(tmp_path: Path) -> None:
    pki = build_site_pki()
    bundle = _site_tls(pki).crls_pem
    (tmp_path / "stale.r0").write_bytes(b"old")
    assert write_crl_hash_dir(tmp_path, bundle) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(n.endswith(".r0") and len(n) == 11 for n in names)
    with pytest.raises(BrokerError):
        write_crl_hash_dir(tmp_path, b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(BrokerError):
        write_crl_hash_dir(tmp_path, b"not a crl")
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # unchanged


POLICY = AuthPolicy(ADMIN_PASSWORD)


def _topic(user: str, permission: str, key: str, client: str | None = None) -> dict[str, str]:
    return {
        "username": user,
        "vhost": "/",
        "resource": "topic",
        "name": "amq.topic",
        "permission": permission,
        "routing_key": key,
        "variable_map.client_id": client or user,
    }


@pytest.mark.parametrize(
    ("kind", "params", "standing", "expected"),
    [
        ("user", {"username": "dev-a"}, Standing.REGISTERED, "allow"),
        ("user", {"username": "dev-a", "password": ""}, Standing.REGISTERED, "deny"),
        ("user", {"username": "dev-a"}, Standing.REFUSED, "deny"),
        ("user", {"username": "registrar@site"}, Standing.UNKNOWN, "deny"),
        ("user", {"username": ADMIN_USER}, Standing.UNKNOWN, "deny"),
        ("user", {"username": ADMIN_USER, "password": "x"}, Standing.UNKNOWN, "deny"),
        (
            "user",
            {"username": ADMIN_USER, "password": ADMIN_PASSWORD},
            Standing.UNKNOWN,
            "allow administrator management",
        ),
        ("vhost", {"username": "dev-a", "vhost": "/", "client_id": "dev-b"}, "registered", "deny"),
        ("vhost", {"username": "dev-a", "vhost": "/", "client_id": "dev-a"}, "registered", "allow"),
        ("vhost", {"username": "dev-a", "vhost": "x", "client_id": "dev-a"}, "registered", "deny"),
        ("topic", _topic("dev-a", "write", "devices.dev-a.t"), Standing.REGISTERED, "allow"),
        ("topic", _topic("dev-a", "write", "devices.dev-a.t"), Standing.UNKNOWN, "deny"),
        ("topic", _topic("dev-a", "read", "devices.dev-a.#"), Standing.REGISTERED, "allow"),
        ("topic", _topic("dev-a", "read", "devices.*.#"), Standing.REGISTERED, "deny"),
        ("topic", _topic("dev-a", "read", "#"), Standing.REGISTERED, "deny"),
        ("topic", _topic("dev-a", "write", "devices.dev-b.t"), Standing.REGISTERED, "deny"),
        ("topic", _topic("dev-a", "write", "devices.dev-a.t", "dev-b"), "registered", "deny"),
        ("topic", _topic("dev-a", "write", "devtrust.register.dev-a.request"), "unknown", "allow"),
        ("topic", _topic("dev-a", "read", "devtrust.register.dev-a.response"), "unknown", "allow"),
        ("topic", _topic("dev-a", "read", "devtrust.register.*.response"), "unknown", "deny"),
        ("topic", _topic("dev-a", "write", "devtrust.register.dev-b.request"), "unknown", "deny"),
        (
            "resource",
            {
                "username": "dev-a",
                "vhost": "/",
                "resource": "queue",
                "name": "mqtt-subscription-dev-aqos1",
                "permission": "configure",
            },
            "registered",
            "allow",
        ),
        (
            "resource",
            {
                "username": "dev-a",
                "vhost": "/",
                "resource": "queue",
                "name": "mqtt-subscription-dev-bqos1",
                "permission": "read",
            },
            "registered",
            "deny",
        ),
        (
            "resource",
            {
                "username": "dev-a",
                "vhost": "/",
                "resource": "exchange",
                "name": "amq.direct",
                "permission": "write",
            },
            "registered",
            "deny",
        ),
        ("nonsense", {"username": "dev-a", "vhost": "/"}, Standing.REGISTERED, "deny"),
    ],
)
def test_decisions(kind: str, params: dict[str, str], standing: str, expected: str) -> None:
    assert decide(kind, params, POLICY, standing) == expected


def test_a_second_live_connection_is_refused() -> None:
    params = {"username": "dev-a", "vhost": "/", "client_id": "dev-a"}
    assert decide("vhost", params, POLICY, Standing.REGISTERED, live_connections=1) == "deny"


# ------------------------------------------------------------------------- the cluster


@dataclass
class Tier:
    pki: SitePki
    dir: Path
    cluster: RabbitCluster
    store: Store
    backend: AuthBackend
    management: RabbitManagement
    tier: RabbitMQTier
    sources: list[AmqpRequestSource]
    stop: asyncio.Event
    registered: dict[str, DeviceClient]

    def endpoint(self, index: int) -> Endpoint:
        node = self.cluster.nodes[index]
        return Endpoint(node.host, node.mqtts_port)

    def amqp(self, index: int) -> AmqpEndpoint:
        node = self.cluster.nodes[index]
        return AmqpEndpoint(node.host, node.amqp_port, ADMIN_USER, ADMIN_PASSWORD)


def _site_tls(pki: SitePki, crls: tuple[object, ...] | None = None) -> SiteTls:
    def pem(obj: object) -> bytes:
        return obj.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]

    return SiteTls(
        server_chain_pem=pem(pki.broker) + pem(pki.site_ca),
        server_key=pki.broker_key,
        ca_bundle_pem=pem(pki.root) + pem(pki.station_ca) + pem(pki.site_ca),
        crls_pem=b"".join(pem(c) for c in (crls or pki.crls)),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tier(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tier]:
    d = tmp_path_factory.mktemp("rabbitmq")
    pki = build_site_pki()
    store = await Store.open(d / "registrar.db")
    service = RegistrationService(
        store=store,
        verifier=pki.verifier(),
        admission=pki.admission(),
        site=pki.site_authority(),
        payload_key=pki.payload_key,
        policy=LdevidPolicy(min_interval=timedelta(0)),  # renew at once in the test
    )
    stack = contextlib.AsyncExitStack()
    async with stack:
        stack.push_async_callback(store.close)
        backend = AuthBackend(store, POLICY, live=LiveSessions())
        await backend.start()
        stack.push_async_callback(backend.stop)
        started = time.monotonic()
        cluster = await asyncio.to_thread(
            start_cluster,
            d / "cluster",
            _site_tls(pki),
            f"http://127.0.0.1:{backend.port}",
            (ADMIN_USER, ADMIN_PASSWORD),
        )
        print(f"\n3-node RabbitMQ cluster ready in {time.monotonic() - started:.1f} s")

        async def stop_cluster() -> None:
            await asyncio.to_thread(cluster.stop)
            assert stray_beams(cluster) == []

        stack.push_async_callback(stop_cluster)
        management = RabbitManagement(cluster.nodes, ADMIN_USER, ADMIN_PASSWORD)
        stack.push_async_callback(management.close)
        assert backend.live is not None
        events = ConnectionEvents(
            [cluster_amqp(cluster, i) for i in range(3)], backend.live, management.cluster_nodes
        )
        crl_file = d / "crls.pem"
        crl_file.write_bytes(_site_tls(pki).crls_pem)
        rabbit = RabbitMQTier(cluster.config, cluster.files, crl_file, management, backend.blocked)
        stop = asyncio.Event()
        # Two registrar instances (competing consumers), each on its own node.
        sources = [
            AmqpRequestSource(
                [cluster_amqp(cluster, i), cluster_amqp(cluster, 2)],
                service.handle,
                renew=service.handle_renewal,
            )
            for i in (0, 1)
        ]
        runners = [asyncio.create_task(s.run(stop)) for s in (*sources, events)]

        async def stop_sources() -> None:
            stop.set()
            await asyncio.gather(*runners, return_exceptions=True)

        stack.push_async_callback(stop_sources)
        for source in (*sources, events):
            await asyncio.wait_for(source.connected.wait(), 15)
        yield Tier(pki, d, cluster, store, backend, management, rabbit, sources, stop, {})


def cluster_amqp(cluster: RabbitCluster, index: int) -> AmqpEndpoint:
    node = cluster.nodes[index]
    return AmqpEndpoint(node.host, node.amqp_port, ADMIN_USER, ADMIN_PASSWORD)


def mqtt(
    tier: Tier,
    index: int,
    client: DeviceClient,
    *,
    identifier: str | None = None,
    idevid: bool = False,
    timeout: float = 5,
) -> aiomqtt.Client:
    endpoint = tier.endpoint(index)
    context = client.registration_context() if idevid else client.operational_context()
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier or client.device_id.value,
        protocol=V311,
        tls_context=context,
        timeout=timeout,
        keepalive=10,
    )


async def collect(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []

    async def read() -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append((message.topic.value, message.payload))

    with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
        await asyncio.wait_for(read(), seconds)
    return got


async def registered(tier: Tier, name: str, node: int = 0) -> DeviceClient:
    """A device registered through the cluster (once per name and module)."""
    if name not in tier.registered:
        device: FactoryDevice = tier.pki.factory_device(name)
        client = DeviceClient(device.credentials(), SoftwareKeys())
        await client.register(tier.endpoint(node), timeout=10)
        tier.registered[name] = client
    return tier.registered[name]


@contextlib.asynccontextmanager
async def amqp_tap(
    tier: Tier, binding: str, node: int = 0
) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
    """A test-side AMQP consumer (the registrar's administrator) on ``binding``."""
    connection = await aio_pika.connect(tier.amqp(node).url())
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind("amq.topic", routing_key=binding)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.put_nowait((amqp_to_mqtt(message.routing_key or ""), message.body))
            await message.ack()

        await queue.consume(on_message)
        yield got
    finally:
        await connection.close()


# ---------------------------------------------------------------------------- scenarios


@IN_CLUSTER_LOOP
async def test_cluster_runs_on_its_own_ports_and_files(tier: Tier) -> None:
    nodes = await tier.management.cluster_nodes()
    assert sorted(nodes) == sorted(n.name for n in tier.cluster.nodes)
    assert all(nodes.values())
    for node in tier.cluster.nodes:
        assert {5672, 1883, 8883, 15672} & {
            node.amqp_port,
            node.mqtts_port,
            node.management_port,
        } == set()
        files = tier.cluster.files[node.name]
        cookie = files.home / ".erlang.cookie"
        assert stat.S_IMODE(cookie.stat().st_mode) == 0o400
        assert b"ENCRYPTED PRIVATE KEY" in files.server_key.read_bytes()
        assert stat.S_IMODE(files.advanced.stat().st_mode) == 0o600
        assert len(list(files.crl_dir.iterdir())) == 3


async def _handshake(tier: Tier, ctx: ssl.SSLContext) -> tuple[str, str]:
    """(version, cipher) a TLS client gets from node 0's MQTT listener; raises on refusal."""
    endpoint = tier.endpoint(0)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx), 10
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        return tls.version(), tls.cipher()[0]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@IN_CLUSTER_LOOP
async def test_tls_policy_on_the_cluster(tier: Tier) -> None:
    """TLS 1.3 preferred, TLS 1.2 with AES-GCM accepted; TLS 1.1 and CBC suites refused."""
    device = DeviceClient(tier.pki.factory_device("tls-1").credentials(), SoftwareKeys())

    def context(**settings: object) -> ssl.SSLContext:
        ctx = device.registration_context()
        for name, value in settings.items():
            if name == "ciphers":
                ctx.set_ciphers(str(value))
            else:
                setattr(ctx, name, value)
        return ctx

    assert await _handshake(tier, context()) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    v12 = ssl.TLSVersion.TLSv1_2
    gcm = context(maximum_version=v12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert await _handshake(tier, gcm) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    cbc_suites = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"
    cbc = context(maximum_version=v12, ciphers=cbc_suites)
    v11 = ssl.TLSVersion.TLSv1_1
    with warnings.catch_warnings():  # the client must be able to offer TLS 1.1 at all
        warnings.simplefilter("ignore", DeprecationWarning)
        old = context(minimum_version=v11, maximum_version=v11, ciphers="DEFAULT:@SECLEVEL=0")
    for refused in (cbc, old):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(tier, refused)


@IN_CLUSTER_LOOP
async def test_register_then_operate_with_the_payload_key(tier: Tier) -> None:
    """Registration over MQTT on node 1 and node 2 (requests consumed over AMQP from the
    quorum queue by two registrar instances); telemetry sealed with the payload key."""
    devices = [await registered(tier, f"reg-{i}", node=i % 2) for i in range(6)]
    assert all(isinstance(d.registered, Registered) for d in devices)
    # Each answer is counted after its publish is confirmed: a device may see it first.
    deadline = time.monotonic() + 5
    while sum(s.answered for s in tier.sources) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sum(s.answered for s in tier.sources) == 6
    device = devices[0]
    async with amqp_tap(tier, mqtt_to_amqp(f"devices/{device.device_id.value}/#")) as tap:
        async with device.operational(tier.endpoint(2)) as session:
            await session.publish_telemetry(b'{"t": 21.5}')
        topic, envelope = await asyncio.wait_for(tap.get(), 5)
    assert topic == f"devices/{device.device_id.value}/telemetry"
    assert open_payload(tier.pki.payload_key, topic, envelope) == b'{"t": 21.5}'


@IN_CLUSTER_LOOP
async def test_renewal_and_commands_go_through_the_amqp_source(tier: Tier) -> None:
    device = await registered(tier, "ren-a")
    assert device.registered is not None
    old = device.registered.ldevid.serial_number
    renewed = await device.renew(tier.endpoint(1), timeout=10)
    assert renewed.ldevid.serial_number != old
    await gone(tier, "ren-a")
    async with device.operational(tier.endpoint(2)) as session:  # on the new LDevID
        topic = "devices/ren-a/cmd"
        with pytest.raises(BrokerError):  # RabbitMQ cannot retain what AMQP publishes
            await tier.sources[0].publish(topic, b"x", retain=True)
        await tier.sources[1].publish(topic, seal_payload(tier.pki.payload_key, topic, b"on"))
        assert await asyncio.wait_for(session.commands.get(), 5) == b"on"


@IN_CLUSTER_LOOP
async def test_unregistered_device_gets_only_its_registration_pair(tier: Tier) -> None:
    fresh = DeviceClient(tier.pki.factory_device("fresh-1").credentials(), SoftwareKeys())
    async with amqp_tap(tier, "devices.#") as tap:
        async with mqtt(tier, 0, fresh, idevid=True) as client:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish("devices/fresh-1/t", b"too early", qos=1, timeout=0.5)
        await asyncio.sleep(0.3)
        assert tap.empty()


async def gone(tier: Tier, identity: str, timeout: float = 5) -> None:
    """Wait until the registrar saw the identity's last connection close (a reconnect
    sooner would be refused as a clone, by design)."""
    assert tier.backend.live is not None
    deadline = time.monotonic() + timeout
    while tier.backend.live.count(identity):
        assert time.monotonic() < deadline, f"{identity} still connected"
        await asyncio.sleep(0.01)


@IN_CLUSTER_LOOP
async def test_a_device_cannot_read_or_write_foreign_topics(tier: Tier) -> None:
    dev_a, dev_b = await registered(tier, "dev-a"), await registered(tier, "dev-b", node=1)
    registrar = await aio_pika.connect(tier.amqp(2).url())
    exchange = await (await registrar.channel()).get_exchange("amq.topic", ensure=False)
    async with mqtt(tier, 1, dev_b) as b, amqp_tap(tier, "#") as tap:
        for topic_filter in FOREIGN_FILTERS:  # each on a connection of its own
            await gone(tier, "dev-a")
            async with mqtt(tier, 0, dev_a) as a:
                with contextlib.suppress(aiomqtt.MqttError):
                    await a.subscribe(topic_filter, qos=1, timeout=0.5)
                await b.publish("devices/dev-b/t", b"b", qos=1)
                await exchange.publish(  # what the registrar answers dev-b
                    aio_pika.Message(b"r"),
                    routing_key=mqtt_to_amqp("devtrust/register/dev-b/response"),
                )
                assert await collect(a, 0.3) == [], topic_filter
        for topic in FOREIGN_TOPICS:
            await gone(tier, "dev-a")
            async with mqtt(tier, 0, dev_a) as a:
                with contextlib.suppress(aiomqtt.MqttError):
                    await a.publish(topic, b"from-a", qos=1, timeout=0.5)
        await gone(tier, "dev-a")
        async with mqtt(tier, 0, dev_a) as a:  # the positive control
            await a.subscribe("devices/dev-a/own", qos=1)
            await a.publish("devices/dev-a/own", b"mine", qos=1)
            assert await collect(a, 0.5) == [("devices/dev-a/own", b"mine")]
        seen = []
        while not tap.empty():
            seen.append(tap.get_nowait())
        assert [m for m in seen if m[1] == b"from-a"] == []
        assert ("devices/dev-a/own", b"mine") in seen and ("devices/dev-b/t", b"b") in seen
    await registrar.close()


@IN_CLUSTER_LOOP
async def test_client_id_takeover_and_clones_are_refused(tier: Tier) -> None:
    dev_a, dev_b = await registered(tier, "dev-a"), await registered(tier, "dev-b", node=1)
    async with mqtt(tier, 1, dev_b) as b:
        await b.subscribe("devices/dev-b/#", qos=1)
        with pytest.raises(aiomqtt.MqttError):  # dev-a's certificate, dev-b's client id
            async with mqtt(tier, 0, dev_a, identifier="dev-b"):
                pass
        with pytest.raises(aiomqtt.MqttError):  # the same certificate again: a clone
            async with mqtt(tier, 2, dev_b):
                pass
        assert "dev-b" in tier.backend.clone_signals
        with pytest.raises(aiomqtt.MqttError):  # a password instead of the certificate
            endpoint = tier.endpoint(0)
            async with aiomqtt.Client(
                endpoint.host,
                endpoint.port,
                identifier="dev-b",
                username="dev-b",
                password="",
                protocol=V311,
                tls_context=dev_a.operational_context(),
                timeout=5,
            ):
                pass
        await b.publish("devices/dev-b/cmd", b"still-there", qos=1)
        assert await collect(b, 0.5) == [("devices/dev-b/cmd", b"still-there")]


@IN_CLUSTER_LOOP
async def test_revocation_cuts_the_device_on_any_node_and_nobody_else(tier: Tier) -> None:
    victim, bystander = await registered(tier, "rev-a"), await registered(tier, "rev-b")
    async with mqtt(tier, 2, victim) as v, mqtt(tier, 1, bystander) as b:
        await v.subscribe("devices/rev-a/#", qos=1)
        await b.subscribe("devices/rev-b/#", qos=1)
        started = time.monotonic()
        assert victim.registered is not None
        await tier.store.mark_revoked(victim.device_id, at=int(time.time()))
        serial = CertSerial(victim.registered.ldevid.serial_number)
        site_crl = build_crl(
            tier.pki.site_ca,
            tier.pki.site_key,
            revoked=[RevokedEntry(serial, tier.pki.now)],
            crl_number=2,
            this_update=tier.pki.now - timedelta(minutes=5),
            next_update=tier.pki.now + timedelta(days=7),
        )
        crls = (*tier.pki.crls[:2], site_crl)
        tier.tier.crl_file.write_bytes(_site_tls(tier.pki, crls).crls_pem)
        await tier.tier.reload_crls()
        assert await tier.tier.disconnect("rev-a") == 1
        with pytest.raises(aiomqtt.MqttError):  # the broker closed the session

            async def drain() -> None:
                async for _ in v.messages:
                    pass

            await asyncio.wait_for(drain(), 5)
        assert time.monotonic() - started < 5
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt(tier, 0, victim):
                pass
        await b.publish("devices/rev-b/x", b"alive", qos=1)
        assert await collect(b, 0.5) == [("devices/rev-b/x", b"alive")]


@IN_CLUSTER_LOOP
async def test_block_refuses_a_still_valid_certificate_and_cuts_it(tier: Tier) -> None:
    blocked, other = await registered(tier, "blk-a"), await registered(tier, "blk-b")
    async with mqtt(tier, 1, blocked) as session, mqtt(tier, 0, other) as bystander:
        await session.subscribe("devices/blk-a/#", qos=1)
        await tier.tier.block("blk-a")
        assert await collect(session, 3) == []  # the session was closed
        await bystander.publish("devices/blk-b/x", b"ok", qos=1)
    await gone(tier, "blk-a")
    with pytest.raises(aiomqtt.MqttError):
        async with mqtt(tier, 0, blocked):
            pass


@IN_CLUSTER_LOOP
async def test_an_expired_crl_refuses_every_certificate_of_its_issuer(tier: Tier) -> None:
    """Fail closed: a site CRL past nextUpdate refuses every LDevID at the handshake."""
    device = await registered(tier, "crl-a")
    good = tier.tier.crl_file.read_bytes()
    expired = build_crl(
        tier.pki.site_ca,
        tier.pki.site_key,
        revoked=[],
        crl_number=100,
        this_update=tier.pki.now - timedelta(days=8),
        next_update=tier.pki.now - timedelta(days=1),
    )
    try:
        tier.tier.crl_file.write_bytes(_site_tls(tier.pki, (*tier.pki.crls[:2], expired)).crls_pem)
        await tier.tier.reload_crls()
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt(tier, 0, device):
                pass
    finally:
        tier.tier.crl_file.write_bytes(good)
        await tier.tier.reload_crls()
    await gone(tier, "crl-a")
    async with mqtt(tier, 0, device):  # the fresh CRL is read at the next handshake
        pass


@dataclass
class Publisher:
    """A device publishing numbered telemetry at QoS 1; on a lost session it reconnects
    to the next node with exponential back-off and re-sends what was not acknowledged."""

    client: DeviceClient
    node: int
    acked: list[int]
    reconnects: int = 0
    refused: int = 0
    nodes_used: tuple[int, ...] = ()

    async def run(self, tier: Tier, stop: asyncio.Event, alive: list[int]) -> None:
        seq, delay, node = 0, 0.1, self.node
        topic = f"devices/{self.client.device_id.value}/telemetry"
        while not stop.is_set():
            try:
                async with mqtt(tier, node, self.client, timeout=3) as session:
                    self.nodes_used = (*self.nodes_used, node)
                    delay = 0.1
                    while not stop.is_set():
                        await session.publish(topic, f"{seq}".encode(), qos=1, timeout=3)
                        self.acked.append(seq)
                        seq += 1
                        await asyncio.sleep(0.01)
            except aiomqtt.MqttError:
                if stop.is_set():
                    return
                self.reconnects += 1
                live = [n for n in alive if n != node] or alive
                node = live[self.reconnects % len(live)]
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


@IN_CLUSTER_LOOP
async def test_kill_9_one_node_under_load_loses_nothing(tier: Tier) -> None:
    """Runs last: node 3 stays dead. Devices on nodes 1 and 2 keep their sessions, those on
    node 3 reconnect elsewhere with back-off; every acknowledged message is delivered (from
    a quorum queue); registration still works."""
    clients = [await registered(tier, f"load-{i}", node=i % 2) for i in range(6)]
    publishers = [Publisher(c, i % 3, []) for i, c in enumerate(clients)]
    connection = await aio_pika.connect(tier.amqp(0).url())
    channel = await connection.channel()
    queue = await channel.declare_queue(
        "test.telemetry", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind("amq.topic", routing_key="devices.*.telemetry")
    received: dict[str, set[int]] = {c.device_id.value: set() for c in clients}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        device = amqp_to_mqtt(message.routing_key or "").split("/")[1]
        if device in received:
            received[device].add(int(message.body))
        await message.ack()

    await queue.consume(on_message)
    stop, alive = asyncio.Event(), [0, 1, 2]
    tasks = [asyncio.create_task(p.run(tier, stop, alive)) for p in publishers]
    try:
        while min(len(p.acked) for p in publishers) < 20:
            await asyncio.sleep(0.05)
        before = {p.client.device_id.value: len(p.acked) for p in publishers}
        killed_at = time.monotonic()
        await asyncio.to_thread(tier.cluster.kill, tier.cluster.nodes[2])
        alive.remove(2)
        moved = [p for p in publishers if p.node == 2]
        while any(len(p.acked) < before[p.client.device_id.value] + 20 for p in publishers):
            assert time.monotonic() - killed_at < 30, "publishing did not recover"
            await asyncio.sleep(0.05)
        recovered = time.monotonic() - killed_at
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    print(f"\nnode killed; every device published 20 more within {recovered:.2f} s")
    for p in publishers:
        if p.node == 2:
            assert p.reconnects >= 1 and p.nodes_used[-1] != 2
        else:
            assert p.reconnects == 0, p.client.device_id  # never lost its session
    assert moved
    deadline = time.monotonic() + 10
    missing: dict[str, set[int]] = {}
    while time.monotonic() < deadline:
        missing = {
            p.client.device_id.value: set(p.acked) - received[p.client.device_id.value]
            for p in publishers
        }
        if not any(missing.values()):
            break
        await asyncio.sleep(0.1)
    assert not any(missing.values()), {k: sorted(v)[:5] for k, v in missing.items() if v}
    total = sum(len(p.acked) for p in publishers)
    print(f"{total} acknowledged messages, all delivered")
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    late = await registered(tier, "after-kill", node=1)
    assert late.registered is not None
