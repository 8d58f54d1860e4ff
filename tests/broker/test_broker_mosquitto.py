"""The Mosquitto backend: a real mosquitto 2.0 process on ephemeral loopback ports.

Access control is judged by DELIVERY (what a subscriber actually receives), never by SUBACK
codes: Mosquitto answers "granted" to forbidden subscriptions and filters on delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker_config.render import (
    MosquittoConfig,
    listener_trust,
    render_mosquitto_conf,
    render_operational_acl,
    render_registration_acl,
)
from broker_config.tls_policy import TLS12_CIPHERS, TLS13_CIPHERSUITES
from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings, BrokerTls, Endpoint
from registrar.broker.mosquitto import MosquittoBroker
from registrar.broker.mosquitto_process import free_ports
from registrar.errors import BrokerError
from registrar.mqtt_session import MqttSession, MqttSessionError
from tests.fixtures.mosquitto_site import (
    FOREIGN_FILTERS,
    ClientCert,
    Site,
    build_site,
    refused,
)
from tests.fixtures.pki import Pki, pem
from tests.fixtures.readiness import (
    LINE_BUFFERED,
    eventually,
    messages_before_marker,
    messages_until,
    mosquitto_sub_subscribed,
    without_debug_lines,
)
from trustcore.errors import InvalidValueError

V311 = aiomqtt.ProtocolVersion.V311


@pytest.fixture(scope="module")
def site(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(pki, tmp_path_factory.mktemp("mosquitto-site"))


@pytest.fixture
async def broker(site: Site) -> AsyncIterator[MosquittoBroker]:
    site.write_crls()
    b = MosquittoBroker(site.settings)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def mqtt(
    site: Site,
    endpoint: Endpoint,
    cert: ClientCert | None,
    *,
    chain: bool = False,
    identifier: str | None = None,
    timeout: float = 5,
) -> aiomqtt.Client:
    ctx = ssl.create_default_context(cafile=site.root)
    if cert is not None:
        ctx.load_cert_chain(cert.chain if chain else cert.cert, cert.key)
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier,
        protocol=V311,
        tls_context=ctx,
        timeout=timeout,
    )


async def collect(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []

    async def read() -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append((message.topic.value, message.payload))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return got


# ------------------------------------------------------------------------- rendering (pure)


def _config(tmp: Path, **changes: object) -> MosquittoConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "registration_port": 20001,
        "operational_port": 20002,
        "admin_port": 20003,
        "registrar_identity": REGISTRAR_IDENTITY,
    }
    for name in (
        "server_cert",
        "server_key",
        "registration_cas",
        "operational_cas",
        "registration_crl",
        "operational_crl",
        "registration_acl",
        "operational_acl",
        "dynsec_config",
    ):
        values[name] = tmp / name
    values.update(changes)
    return MosquittoConfig(**values)  # type: ignore[arg-type]


def test_rendered_config_has_no_default_listener_and_mtls_everywhere(tmp_path: Path) -> None:
    text = render_mosquitto_conf(_config(tmp_path))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    first_listener = next(i for i, line in enumerate(lines) if line.startswith("listener "))
    listener_only = ("use_username_as_clientid", "mount_point", "acl_file", "cafile", "keyfile")
    assert not any(line.startswith(listener_only) for line in lines[:first_listener])
    assert not any("1883" in line for line in lines)
    assert "set_tcp_nodelay true" in lines and "per_listener_settings true" in lines
    assert lines.count("require_certificate true") == 2
    assert lines.count("use_username_as_clientid true") == 2
    assert lines.count("allow_anonymous false") == 3
    assert "listener 20003 127.0.0.1" in lines
    # TLS policy on both device listeners (broker_config.tls_policy), none on the admin one
    assert lines.count("tls_version tlsv1.2") == 2
    assert lines.count(f"ciphers {TLS12_CIPHERS}") == 2
    assert lines.count(f"ciphers_tls1.3 {TLS13_CIPHERSUITES}") == 2
    assert "log_type debug" in lines  # the only level with ACL denials in 2.0.11
    quiet = render_mosquitto_conf(_config(tmp_path, log_acl_denials=False)).splitlines()
    assert "log_type debug" not in quiet
    assert "persistence false" in lines
    saved = render_mosquitto_conf(_config(tmp_path, persistence_dir=tmp_path / "db"))
    # written on SIGUSR1 and at exit only (the registrar decides when: save_sessions)
    assert [x for x in saved.splitlines() if x.startswith(("persistence", "autosave"))] == [
        "persistence true",
        f"persistence_location {tmp_path / 'db'}/",
        "autosave_interval 0",
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"server_key": Path("/x\nallow_anonymous true")},
        {"server_cert": Path("relative.pem")},
        {"host": "0.0.0.0 \nlistener 1883"},
        {"admin_port": 20001},
        {"registrar_identity": "registrar\nuser x"},
        {"blocked": frozenset({"dev a"})},
        {"blocked": frozenset({REGISTRAR_IDENTITY})},
        {"run_user": "root\nuser x"},
        {"persistence_dir": Path("relative")},
        {"persistence_dir": Path("/db\npersistence_file x")},
    ],
)
def test_injection_and_bad_values_are_refused(tmp_path: Path, change: dict[str, object]) -> None:
    with pytest.raises(InvalidValueError):
        _config(tmp_path, **change)


def test_acls_separate_listeners_and_deny_blocked_first(tmp_path: Path) -> None:
    config = _config(tmp_path, blocked=frozenset({"dev-x"}))
    reg = render_registration_acl(config)
    op = render_operational_acl(config)
    assert REGISTRAR_IDENTITY not in reg and "devices/" not in reg
    assert "pattern write devtrust/register/%u/request" in reg
    assert "pattern read devtrust/register/%u/response" in reg
    assert "pattern readwrite devices/%u/+/#" in op and "devtrust/register/%u" not in op
    for acl in (reg, op):
        assert acl.index("user dev-x\ntopic deny #") < acl.index("pattern ")


def test_listener_trust_gives_each_listener_only_its_issuers_crls(site: Site) -> None:
    pki = site.pki
    trust = listener_trust(
        pem(pki.root) + pem(pki.station_ca),
        pem(pki.site_ca),
        b"".join(pem(c) for c in pki.crls),
    )
    reg_crls = [x509.load_pem_x509_crl(b) for b in trust.registration_crls.split(b"\n-----B")[:1]]
    assert reg_crls[0].issuer == pki.station_ca.subject
    assert pem(pki.site_crl) not in trust.registration_crls
    assert trust.operational_crls == pem(pki.site_crl)
    assert x509.load_pem_x509_certificates(trust.operational_cas) == [pki.site_ca, pki.root]
    with pytest.raises(InvalidValueError, match="no CRL"):
        listener_trust(pem(pki.root) + pem(pki.station_ca), pem(pki.site_ca), pem(pki.site_crl))


def test_chosen_ports_are_distinct_and_avoid_the_fixed_ones() -> None:
    """The three listeners' ports: a port probed and released at once can come back from
    the next probe (a registrar once failed to start with "the three listeners need three
    different ports"); a restart after a crash keeps the dead broker's two ports."""
    for _ in range(200):
        first = free_ports(["127.0.0.1"] * 3)
        assert len(set(first)) == 3
        again = free_ports(["127.0.0.1"], avoid=first[:2])
        assert again[0] not in first[:2]


# --------------------------------------------------------------------------- real broker


async def test_no_plaintext_key_anywhere_and_bad_passphrase(
    site: Site, broker: MosquittoBroker
) -> None:
    secret = site.pki.broker_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    body = serialization.load_der_private_key(secret, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    marker = body.splitlines()[1]  # first base64 line of the clear PEM
    runtime = broker.runtime_dir
    assert runtime is not None
    keyfile = runtime / "server-key.fifo"
    assert stat.S_ISFIFO(keyfile.lstat().st_mode) and stat.S_IMODE(keyfile.lstat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    status = Path(f"/proc/{broker.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0 and (os.geteuid() == 0 or uid == os.geteuid())  # never root
    site.write_crls(number=2)  # a reload with something to re-read ...
    await broker.reload_crls()  # ... re-reads the key through the FIFO too
    assert broker.key_loads == 4
    for directory in (runtime, site.dir, Path("/dev/shm")):
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert marker not in data, path
                assert b"BEGIN PRIVATE KEY" not in data or path.parent == site.dir, path
    bad = BrokerSettings(
        tls=BrokerTls(**{**site.settings.tls.__dict__, "server_key_passphrase": b"wrong"}),
        workdir=site.dir / "work-bad",
    )
    with pytest.raises(BrokerError, match="decrypt"):
        await MosquittoBroker(bad).start()


async def test_certificates_decide_who_gets_in_where(site: Site, broker: MosquittoBroker) -> None:
    reg, op = broker.registration_endpoint, broker.operational_endpoint
    assert 1883 not in (reg.port, op.port) and reg.host == "127.0.0.1"
    for endpoint in (reg, op):
        assert await refused(site, endpoint, None)
    assert not await refused(site, reg, site.idevid["dev-a"])
    assert not await refused(site, op, site.ldevid["dev-a"])
    assert not await refused(site, op, site.service)
    for chain in (False, True):  # with the chain, the path to the root would verify
        assert await refused(site, op, site.idevid["dev-a"], chain=chain)
        assert await refused(site, reg, site.ldevid["dev-a"], chain=chain)
        assert await refused(site, reg, site.service, chain=chain)


async def test_listeners_share_topics_only_for_the_registrar(
    site: Site, broker: MosquittoBroker
) -> None:
    """A factory-certificate session gets its registration pair only, a secondary-certificate
    session its device subtree only; the registrar (operational listener) reaches both.
    (One identity has one session at a time: the client id IS the identity.)"""
    reg, op = broker.registration_endpoint, broker.operational_endpoint
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, reg, site.idevid["dev-a"]) as dev_a_reg,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b_op,
    ):
        await registrar.subscribe("devtrust/register/+/request", qos=1)
        await registrar.subscribe("devices/#", qos=1)
        await dev_a_reg.subscribe("devtrust/register/dev-a/response", qos=1)
        await dev_a_reg.subscribe("devices/dev-a/#", qos=1)  # not on this listener
        await dev_b_op.subscribe("devices/dev-b/#", qos=1)
        await dev_b_op.subscribe("devtrust/register/dev-b/response", qos=1)  # not here
        await dev_a_reg.publish("devtrust/register/dev-a/request", b"factory", qos=1)
        await dev_a_reg.publish("devices/dev-a/t", b"factory-in-devices", qos=1)
        await dev_b_op.publish("devices/dev-b/t", b"secondary", qos=1)
        await dev_b_op.publish("devtrust/register/dev-b/request", b"secondary-reg", qos=1)
        # a marker on a topic only the registrar reads ends what reached it
        assert sorted(await messages_before_marker(registrar, registrar, "devices/zz/m")) == [
            ("devices/dev-b/t", b"secondary"),
            ("devtrust/register/dev-a/request", b"factory"),
        ]
        for topic in (
            "devtrust/register/dev-a/response",
            "devices/dev-a/cmd",
            "devices/dev-b/cmd",
            "devtrust/register/dev-b/response",
        ):
            await registrar.publish(topic, b"to:" + topic.encode(), qos=1)
        reply_a = "devtrust/register/dev-a/response"
        assert await messages_before_marker(registrar, dev_a_reg, reply_a) == [
            (reply_a, b"to:devtrust/register/dev-a/response")
        ]
        assert await messages_before_marker(registrar, dev_b_op, "devices/dev-b/cmd") == [
            ("devices/dev-b/t", b"secondary"),  # its own publish, back through devices/dev-b/#
            ("devices/dev-b/cmd", b"to:devices/dev-b/cmd"),
        ]


FOREIGN_TOPICS = [
    "devices/dev-b/t",
    "devices/dev-b/cmd",
    "devices//t",
    "devices/dev-a",  # the bare root of its own subtree is not inside it
    "devices/dev\u2011b/t",  # non-breaking hyphen look-alike
    "devices/dev-b\u200b/t",  # zero-width space
    "devices/\u00e9/t",
    "devtrust/register/dev-b/response",
    "devtrust/register/dev-a/request",  # its registration topic, but on the wrong listener
]


async def test_a_device_cannot_read_or_write_foreign_topics(
    site: Site, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registrar.broker.mosquitto")
    reg, op = broker.registration_endpoint, broker.operational_endpoint
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
        mqtt(site, reg, site.idevid["dev-c"]) as dev_c_reg,
    ):
        for topic_filter in FOREIGN_FILTERS:
            await dev_a.subscribe(topic_filter, qos=1)  # SUBACK may say "granted"
        await dev_a.subscribe("devices/dev-a/own", qos=1)
        await registrar.subscribe("#", qos=1)
        await registrar.subscribe("devices/#", qos=1)
        # Foreign traffic from every other party: none of it may reach dev-a.
        await dev_b.publish("devices/dev-b/t", b"b", qos=1)
        await dev_c_reg.publish("devtrust/register/dev-c/request", b"req", qos=1)
        await registrar.publish("devtrust/register/dev-b/response", b"resp", qos=1)
        await registrar.publish("devices/dev-b/cmd", b"cmd", qos=1)
        # dev-a's publishes to foreign topics: none may reach the registrar (subscribed #).
        for topic in FOREIGN_TOPICS:
            await dev_a.publish(topic, b"from-a", qos=1)
        await dev_a.publish("devices/dev-a/own", b"mine", qos=1)  # the positive control
        # the registrar's marker, after all of that: what came before it is all there was
        marker = ("devices/dev-a/own", b"end")
        await registrar.publish(*marker, qos=1)
        got_a = await messages_until(dev_a, marker)
        assert got_a == [("devices/dev-a/own", b"mine")]
        got_registrar = await messages_until(registrar, marker)
        assert [m for m in got_registrar if m[1] == b"from-a"] == []
        assert ("devices/dev-a/own", b"mine") in got_registrar
        assert ("devices/dev-b/t", b"b") in got_registrar
        # Each refused PUBLISH left a trace: who, which topic (the own topic did not).
        await eventually(lambda: broker.acl_denials >= len(FOREIGN_TOPICS))  # its log, read
        assert broker.acl_denials == len(FOREIGN_TOPICS)
        assert "ACL denied PUBLISH from dev-a on topic 'devices/dev-b/t'" in caplog.text
        assert "'devices/dev-a/own'" not in caplog.text


async def test_client_id_takeover_is_impossible_and_clones_are_reported(
    site: Site, broker: MosquittoBroker
) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-b"], identifier="dev-b") as dev_b,
    ):
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        async with mqtt(site, op, site.ldevid["dev-a"], identifier="dev-b"):
            await registrar.publish("devices/dev-b/cmd", b"still-there", qos=1)
            assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
                ("devices/dev-b/cmd", b"still-there")
            ]
        assert broker.clone_signals == []
        async with mqtt(site, op, site.ldevid["dev-b"], identifier="anything"):
            await eventually(lambda: broker.clone_signals != [], seconds=10)  # Mosquitto's log
        assert broker.clone_signals == ["dev-b"]  # same certificate twice: clone signal


async def test_real_mosquitto_clients_with_a_secondary_certificate(
    site: Site, broker: MosquittoBroker
) -> None:
    op = broker.operational_endpoint
    cert = site.ldevid["dev-a"]
    tls = ["--cafile", str(site.root), "--cert", str(cert.cert), "--key", str(cert.key)]
    common = ["-h", op.host, "-p", str(op.port), "-q", "1", *tls]
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
    ):
        await registrar.subscribe("devices/#", qos=1)
        sub = await asyncio.create_subprocess_exec(
            *LINE_BUFFERED,
            "mosquitto_sub",
            *common,
            *("-t", "devices/dev-a/#", "-t", "#", "-t", "devices/+/t", "-v", "-C", "1"),
            *("-W", "30", "-d"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert sub.stdout is not None
        await mosquitto_sub_subscribed(sub.stdout)  # its SUBSCRIBE is answered
        await dev_b.publish("devices/dev-b/t", b"foreign", qos=1)
        await registrar.publish("devices/dev-a/cmd", b"hello-cli", qos=1)
        out, err = await asyncio.wait_for(sub.communicate(), 30)
        assert sub.returncode == 0, err
        assert without_debug_lines(out) == ["devices/dev-a/cmd hello-cli"]  # first and only
        await messages_before_marker(registrar, registrar, "devices/zz/m")  # read so far
        for topic, payload in (("devices/dev-b/t", "spoof"), ("devices/dev-a/t", "legit")):
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub", *common, "-t", topic, "-m", payload
            )
            assert await asyncio.wait_for(pub.wait(), 5) == 0
        assert await messages_before_marker(registrar, registrar, "devices/zz/m") == [
            ("devices/dev-a/t", b"legit")
        ]


async def test_revocation_cuts_the_device_within_5_s_and_nobody_else(
    site: Site, broker: MosquittoBroker
) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
    ):
        await dev_a.subscribe("devices/dev-a/#", qos=1)
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        site.write_crls(revoked=("dev-a",), number=2)
        await broker.reload_crls()
        assert await broker.disconnect("dev-a") == 1
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(dev_a.publish("devices/dev-a/x", b"x", qos=1), 5)
            async for _ in dev_a.messages:
                pass
        assert loop.time() - started < 5
        assert await refused(site, op, site.ldevid["dev-a"])
        await registrar.publish("devices/dev-b/cmd", b"alive", qos=1)
        assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
            ("devices/dev-b/cmd", b"alive")
        ]
        assert await broker.disconnect("dev-a") == 0  # nothing left to cut


async def test_block_leaves_a_still_valid_certificate_without_any_access(
    site: Site, broker: MosquittoBroker
) -> None:
    op, reg = broker.operational_endpoint, broker.registration_endpoint
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
    ):
        await registrar.subscribe("devices/#", qos=1)
        await registrar.subscribe("devtrust/register/+/request", qos=1)
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        async with mqtt(site, op, site.ldevid["dev-a"]) as dev_a:
            await dev_a.subscribe("devices/dev-a/#", qos=1)
            await broker.block("dev-a")
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(dev_a.publish("devices/dev-a/x", b"x", qos=1), 5)
                async for _ in dev_a.messages:
                    pass
        with pytest.raises(BrokerError):
            await broker.block(REGISTRAR_IDENTITY)
        reply_topic = "devtrust/register/dev-a/response"
        # The still-valid certificates get in again, on either listener, but can do nothing.
        for endpoint, cert, own, reply in (
            (op, site.ldevid["dev-a"], "devices/dev-a/t", "devices/dev-a/cmd"),
            (reg, site.idevid["dev-a"], "devtrust/register/dev-a/request", reply_topic),
        ):
            async with mqtt(site, endpoint, cert) as dev_a:
                await dev_a.subscribe(reply, qos=1)
                await dev_a.publish(own, b"blocked", qos=1)
                await registrar.publish(reply, b"to-blocked", qos=1)
                await registrar.publish("devices/dev-b/cmd", b"alive", qos=1)
                assert await collect(dev_a, 0.3) == []
                assert [m for m in await collect(registrar, 0.1) if m[1] == b"blocked"] == []
                assert await collect(dev_b, 0.1) == [("devices/dev-b/cmd", b"alive")]


async def test_expired_crl_refuses_everyone_and_a_missing_crl_is_an_error(
    site: Site, broker: MosquittoBroker
) -> None:
    op = broker.operational_endpoint
    site.write_crls(next_update=-timedelta(minutes=1), number=3)
    await broker.reload_crls()
    assert await refused(site, op, site.ldevid["dev-b"])
    assert await refused(site, op, site.service)
    site.settings.tls.crl_file.write_bytes(pem(site.pki.station_crl))
    with pytest.raises(BrokerError, match="no CRL"):
        await broker.reload_crls()
    site.write_crls(number=4)
    await broker.reload_crls()
    assert not await refused(site, op, site.ldevid["dev-b"])


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_the_registrars_own_session_on_real_mosquitto(
    site: Site, broker: MosquittoBroker, protocol: Literal["3.1.1", "5"]
) -> None:
    """:class:`registrar.mqtt_session.MqttSession` (what ``registrar run`` serves with) with
    the registrar's certificate: its subscriptions receive what a device publishes with
    ``mosquitto_pub``, its retained QoS 1 publish reaches a later ``mosquitto_sub``, and
    after DISCONNECT it refuses to publish."""
    op = broker.operational_endpoint
    ctx = ssl.create_default_context(cafile=site.root)
    ctx.load_cert_chain(site.service.cert, site.service.key)
    session = await MqttSession.open(
        op.host, op.port, tls=ctx, client_id=REGISTRAR_IDENTITY, protocol=protocol, timeout=5
    )
    cert = site.ldevid["dev-a"]
    tls = ["--cafile", str(site.root), "--cert", str(cert.cert), "--key", str(cert.key)]
    common = [
        "-h",
        op.host,
        "-p",
        str(op.port),
        "-q",
        "1",
        "-V",
        "5" if protocol == "5" else "311",
        *tls,
    ]
    try:
        await session.subscribe("devices/+/telemetry")
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", *common, "-t", "devices/dev-a/telemetry", "-m", "t1", "-r"
        )
        assert await asyncio.wait_for(pub.wait(), 5) == 0
        message = await asyncio.wait_for(session.next_message(), 5)
        assert (message.topic, message.payload) == ("devices/dev-a/telemetry", b"t1")
        await session.publish("devices/dev-a/cmd", b"hello-session", retain=True)
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub",
            *common,
            "-t",
            "devices/dev-a/cmd",
            "-v",
            "-C",
            "1",
            "-W",
            "5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(sub.communicate(), 6)
        assert sub.returncode == 0, err
        assert out.decode().splitlines() == ["devices/dev-a/cmd hello-session"]
        await session.publish("devices/dev-a/cmd", b"", retain=True)  # clear it again
        await session.publish("devices/dev-a/telemetry", b"", retain=True)
    finally:
        await session.disconnect()
    assert not session.is_open
    with pytest.raises(MqttSessionError):
        await session.publish("devices/dev-a/cmd", b"after close")


@pytest.mark.parametrize("saved", [True, False], ids=["saved", "not-saved"])
async def test_a_crashed_mosquitto_queues_for_the_registrars_saved_session(
    site: Site, broker: MosquittoBroker, saved: bool
) -> None:
    """SIGKILL of Mosquitto once the registrar's persistent session (v5, Session Expiry)
    has subscribed and :meth:`MosquittoBroker.save_sessions` had the database written: the
    revived broker knows that session, so a reading a device publishes before the registrar
    is back waits for it. Not saved (the control): the revived broker has no such session
    and the reading has no subscriber."""
    op = broker.operational_endpoint
    ctx = ssl.create_default_context(cafile=site.root)
    ctx.load_cert_chain(site.service.cert, site.service.key)

    async def registrar_session() -> MqttSession:
        return await MqttSession.open(
            op.host, op.port, tls=ctx, client_id=REGISTRAR_IDENTITY, protocol="5",
            clean=False, session_expiry=600, timeout=5,
        )  # fmt: skip

    session = await registrar_session()
    assert not session.session_present  # a fresh broker: no saved state is loaded
    await session.subscribe("devices/+/telemetry")
    runtime = broker.runtime_dir
    assert runtime is not None
    if saved:
        assert broker.save_sessions()
        assert not broker.save_sessions()  # once per fresh start
        await eventually(lambda: (runtime / "mosquitto.db").exists())
        assert stat.S_IMODE((runtime / "mosquitto.db").stat().st_mode) & 0o077 == 0
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    session.abort()
    await eventually(lambda: broker.exited, 10)
    assert await broker.revive()
    cert = site.ldevid["dev-a"]
    pub = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", op.host, "-p", str(op.port), "-V", "5", "-q", "1",
        "--cafile", str(site.root), "--cert", str(cert.cert), "--key", str(cert.key),
        "-t", "devices/dev-a/telemetry", "-m", "reading-1",
    )  # fmt: skip
    assert await asyncio.wait_for(pub.wait(), 10) == 0  # acknowledged by the new broker
    session = await registrar_session()
    try:
        assert session.session_present is saved
        if saved:
            message = await asyncio.wait_for(session.next_message(), 5)
            assert (message.topic, message.payload) == ("devices/dev-a/telemetry", b"reading-1")
    finally:
        await session.disconnect()


@pytest.mark.parametrize("failure", ["passphrase", "executable", "config"])
async def test_a_failed_start_leaves_no_temporary_directory(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    settings = BrokerSettings(tls=site.settings.tls, workdir=tmp_path / "work")
    executable = "mosquitto"
    if failure == "passphrase":
        settings = BrokerSettings(
            tls=BrokerTls(**{**site.settings.tls.__dict__, "server_key_passphrase": b"wrong"}),
            workdir=tmp_path / "work",
        )
    elif failure == "executable":
        executable = str(tmp_path / "no-such-mosquitto")
    else:
        executable = "/bin/false"  # starts, exits at once
    site.write_crls()
    broker = MosquittoBroker(settings, executable=executable)
    with pytest.raises(BrokerError):
        await broker.start()
    assert list(scratch.iterdir()) == []
    assert broker.pid is None and broker.runtime_dir is None


async def test_concurrent_reloads_are_serialised(site: Site, broker: MosquittoBroker) -> None:
    """A revocation and a burst of renewals reload at the same time (found by the soak,
    ``bench/soak.py``): none may time out or disarm the key pipe under another; the calls
    that arrive while one reload runs share the next one."""
    site.write_crls(number=2)
    await asyncio.wait_for(asyncio.gather(*(broker.reload_crls() for _ in range(4))), 30)
    assert broker.key_loads == 4  # the last reload read the key through the FIFO in full
    site.write_crls(number=3)
    await broker.reload_crls()  # and the pipe is left ready for the next one
    assert broker.key_loads == 4


async def test_a_burst_of_revocations_reloads_mosquitto_a_bounded_number_of_times(
    site: Site, broker: MosquittoBroker
) -> None:
    """Every SIGHUP builds new TLS contexts that stay allocated while a connection made
    under them is open (``bench/mosquitto_reloads.py``), so reloads are coalesced: 20
    revocations at once (each a new CRL, then ``reload_crls``) cost at most 2 SIGHUPs, the
    last CRL is in force when every call has returned, and a reload with nothing new to
    read sends none."""
    op = broker.operational_endpoint
    before = broker.sighups

    async def revoke(number: int) -> None:
        revoked = ("dev-a",) if number == 20 else ()
        site.write_crls(revoked=revoked, number=number + 1)
        await broker.reload_crls()

    await asyncio.wait_for(asyncio.gather(*(revoke(n) for n in range(1, 21))), 30)
    assert 1 <= broker.sighups - before <= 2
    assert await refused(site, op, site.ldevid["dev-a"])
    assert not await refused(site, op, site.ldevid["dev-b"])
    unchanged = broker.sighups
    await broker.reload_crls()
    await broker.block("dev-c")  # new ACL files: one more reload
    await broker.block("dev-c")  # the same ACL files again: none
    assert broker.sighups == unchanged + 1


def _cut_connections_to(endpoint: Endpoint) -> int:
    """Shut down, from this process, every TCP connection it has to ``endpoint`` (a network
    fault as the peer sees it: both directions end). How many were cut."""
    cut = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            sock = socket.socket(fileno=os.dup(int(fd.name)))
        except OSError:
            continue  # not a socket
        try:
            if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    if sock.getpeername() == (endpoint.host, endpoint.port):
                        sock.shutdown(socket.SHUT_RDWR)
                        cut += 1
        finally:
            sock.close()
    return cut


async def test_a_broken_admin_session_recovers_and_the_next_reload_works(
    site: Site, broker: MosquittoBroker
) -> None:
    """Found by the soak (docs/scale.md, "Re-run, 2026-12-07"): after one failure of the
    dynsec admin session every later command failed, so every CRL reload failed. The
    session is now reopened and the command sent again: with its connection cut, the next
    revocation (reload + kick) works."""
    op = broker.operational_endpoint
    assert _cut_connections_to(broker.admin_endpoint) == 1
    async with mqtt(site, op, site.ldevid["dev-a"]) as dev_a:
        await dev_a.subscribe("devices/dev-a/#", qos=1)
        site.write_crls(revoked=("dev-a",), number=2)
        await asyncio.wait_for(broker.reload_crls(), 20)
        assert broker.admin_reconnects == 1
        assert await asyncio.wait_for(broker.disconnect("dev-a"), 20) == 1
    assert await refused(site, op, site.ldevid["dev-a"])
    assert _cut_connections_to(broker.admin_endpoint) == 1  # again, between two commands
    assert await asyncio.wait_for(broker.disconnect("dev-b"), 20) == 0
    assert broker.admin_reconnects == 2
