"""The embedded (amqtt) broker with real TLS clients: aiomqtt, raw sockets, mosquitto_sub/pub.

Every access-control check looks at DELIVERY (what a subscriber actually receives), not only
at SUBACK codes: a "granted" SUBACK proves nothing and a refused one proves little.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings, BrokerTls, Endpoint
from registrar.broker.embedded import EmbeddedBroker
from registrar.errors import BrokerError
from tests.fixtures.pki import DAY, MANUFACTURER, SITE_OPERATOR, Pki, make_crl, p256, pem
from tests.fixtures.readiness import (
    LINE_BUFFERED,
    eventually,
    messages_before_marker,
    messages_until,
    mosquitto_sub_subscribed,
    without_debug_lines,
)
from trustcore.identity import DeviceId
from trustcore.profiles import issue_factory_certificate, issue_secondary_certificate

PASSPHRASE = b"correct horse battery staple"
V311 = aiomqtt.ProtocolVersion.V311


# ------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


def _write_client(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> ClientCert:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ClientCert(cert_path, key_path)


def _service_certificate(pki: Pki, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The registrar's own client certificate: CN=REGISTRAR_IDENTITY, site CA, clientAuth."""
    site_ski = pki.site_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, REGISTRAR_IDENTITY),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, SITE_OPERATOR),
                ]
            )
        )
        .issuer_name(pki.site_ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.now - DAY)
        .not_valid_after(pki.now + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(site_ski),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(pki.site_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Site:
    pki: Pki
    dir: Path
    settings: BrokerSettings
    root: Path
    idevid: dict[str, ClientCert]
    ldevid: dict[str, ClientCert]
    ldevid_certs: dict[str, x509.Certificate]
    service: ClientCert

    def write_crls(self, *, revoked_ldevids: tuple[str, ...] = (), number: int = 2) -> None:
        site_crl = make_crl(
            self.pki.now,
            self.pki.site_ca,
            self.pki.site_key,
            revoked=tuple(self.ldevid_certs[d] for d in revoked_ldevids),
            number=number,
        )
        crls = (self.pki.root_crl, self.pki.station_crl, site_crl)
        self.settings.tls.crl_file.write_bytes(b"".join(pem(c) for c in crls))


DEVICES = ("dev-a", "dev-b", "dev-c")


@pytest.fixture(scope="module")
def site(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Site:
    d = tmp_path_factory.mktemp("site")
    (d / "broker.pem").write_bytes(pem(pki.broker) + pem(pki.site_ca))
    (d / "broker-key.pem").write_bytes(
        pki.broker_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE),
        )
    )
    (d / "registration-cas.pem").write_bytes(pem(pki.root) + pem(pki.station_ca))
    (d / "operational-cas.pem").write_bytes(pem(pki.site_ca))
    (d / "root.pem").write_bytes(pem(pki.root))
    (d / "crls.pem").write_bytes(b"".join(pem(c) for c in pki.crls))
    idevid, ldevid, ldevid_certs = {}, {}, {}
    for name in DEVICES:
        key = p256(f"embedded-{name}")
        device = DeviceId(name)
        factory = issue_factory_certificate(
            pki.station_ca,
            pki.station_key,
            key.public_key(),
            device_id=device,
            manufacturer=MANUFACTURER,
            not_before=pki.now - DAY,
        )
        secondary = issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            key.public_key(),
            device_id=device,
            organization=SITE_OPERATOR,
            not_before=pki.now - DAY,
            not_after=pki.now + 30 * DAY,
        )
        idevid[name] = _write_client(d, f"{name}-idevid", factory, key)
        ldevid[name] = _write_client(d, f"{name}-ldevid", secondary, key)
        ldevid_certs[name] = secondary
    service_key = p256("embedded-service")
    service = _write_client(d, "service", _service_certificate(pki, service_key), service_key)
    settings = BrokerSettings(
        tls=BrokerTls(
            server_cert=d / "broker.pem",
            server_key=d / "broker-key.pem",
            server_key_passphrase=PASSPHRASE,
            registration_cas=d / "registration-cas.pem",
            operational_cas=d / "operational-cas.pem",
            crl_file=d / "crls.pem",
        ),
        workdir=d,
    )
    return Site(pki, d, settings, d / "root.pem", idevid, ldevid, ldevid_certs, service)


@pytest.fixture
async def broker(site: Site) -> AsyncIterator[EmbeddedBroker]:
    site.write_crls(number=1)
    b = EmbeddedBroker(site.settings)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def client_context(site: Site, cert: ClientCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=site.root)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def mqtt(
    site: Site,
    endpoint: Endpoint,
    cert: ClientCert | None,
    *,
    identifier: str | None = None,
    clean_session: bool = True,
    timeout: float = 5,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=identifier,
        protocol=V311,
        tls_context=client_context(site, cert),
        clean_session=clean_session,
        timeout=timeout,
    )


async def collect(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    """Every message that arrives within ``seconds``."""
    got: list[tuple[str, bytes]] = []

    async def read() -> None:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            got.append((message.topic.value, payload))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return got


# ------------------------------------------------------------------------------ tests


async def test_devices_talk_in_their_own_subtree_and_registrar_reaches_both(
    site: Site, broker: EmbeddedBroker
) -> None:
    op, reg = broker.operational_endpoint, broker.registration_endpoint
    assert op.port != reg.port and op.host == reg.host == "127.0.0.1"
    async with (
        mqtt(site, op, site.service) as registrar,
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, reg, site.idevid["dev-b"]) as dev_b,
    ):
        await registrar.subscribe("devtrust/register/+/request", qos=1)
        await registrar.subscribe("devices/+/telemetry", qos=1)
        await dev_a.subscribe("devices/dev-a/cmd/#", qos=1)
        await dev_b.subscribe("devtrust/register/dev-b/response", qos=1)
        await dev_a.publish("devices/dev-a/telemetry", b"t1", qos=1)
        await dev_b.publish("devtrust/register/dev-b/request", b"r1", qos=1)
        got = await collect(registrar, 0.5)
        assert sorted(got) == [
            ("devices/dev-a/telemetry", b"t1"),
            ("devtrust/register/dev-b/request", b"r1"),
        ]
        await registrar.publish("devtrust/register/dev-b/response", b"ok", qos=1)
        await registrar.publish("devices/dev-a/cmd/reboot", b"now", qos=1)
        reply = "devtrust/register/dev-b/response"
        assert await messages_before_marker(registrar, dev_b, reply) == [(reply, b"ok")]
        assert await messages_before_marker(registrar, dev_a, "devices/dev-a/cmd/x") == [
            ("devices/dev-a/cmd/reboot", b"now")
        ]


def connect_packet(client_id: str = "x", *, flags: int = 0x02) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


async def raw_exchange(
    site: Site,
    endpoint: Endpoint,
    cert: ClientCert | None,
    data: bytes,
    *,
    tls: bool = True,
    wait: float = 5,
) -> bytes:
    """Open a connection, send ``data``, return what the broker answers until it closes
    (or raise the TLS/OS error it caused)."""
    ctx = client_context(site, cert) if tls else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx), 5
    )
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_client_without_certificate_fails_the_handshake(
    site: Site, broker: EmbeddedBroker
) -> None:
    for endpoint in (broker.registration_endpoint, broker.operational_endpoint):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            # TLS 1.3: the refusal (certificate required alert) arrives on the first read.
            answer = await raw_exchange(site, endpoint, None, connect_packet())
            assert answer == b"", "no CONNACK may come back"
            raise ConnectionError("closed without answer")
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt(site, endpoint, None, timeout=1):
                pass


async def test_tls_below_1_2_is_refused(site: Site, broker: EmbeddedBroker) -> None:
    endpoint = broker.operational_endpoint
    ctx = client_context(site, site.ldevid["dev-a"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with mqtt(site, endpoint, site.ldevid["dev-a"]):  # TLS 1.2 itself is fine
        pass
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx), 5)


async def test_connack_accepted_for_valid_certificates(site: Site, broker: EmbeddedBroker) -> None:
    answer = await raw_exchange(
        site, broker.registration_endpoint, site.idevid["dev-a"], connect_packet() + b"\xe0\x00"
    )
    assert answer == b"\x20\x02\x00\x00"  # CONNACK accepted, then our DISCONNECT closes it


@pytest.mark.parametrize(
    ("listener", "cert"),
    [
        ("operational", "idevid"),  # factory certificate on the operational listener
        ("registration", "ldevid"),  # secondary certificate on the registration listener
        ("registration", "ldevid-chain"),  # ... even sent with the site CA as intermediate
        ("registration", "service"),  # the registrar's certificate is site-CA only
    ],
)
async def test_certificate_on_the_wrong_listener_is_refused(
    site: Site, broker: EmbeddedBroker, listener: str, cert: str
) -> None:
    endpoint = (
        broker.operational_endpoint if listener == "operational" else broker.registration_endpoint
    )
    if cert == "idevid":
        client = site.idevid["dev-a"]
    elif cert == "ldevid":
        client = site.ldevid["dev-a"]
    elif cert == "service":
        client = site.service
    else:
        chain = site.dir / "dev-a-ldevid-chain.pem"
        chain.write_bytes(site.ldevid["dev-a"].cert.read_bytes() + pem(site.pki.site_ca))
        client = ClientCert(chain, site.ldevid["dev-a"].key)
    try:
        answer = await raw_exchange(site, endpoint, client, connect_packet())
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", "no CONNACK for a certificate from the wrong CA"


FORBIDDEN_FILTERS = [
    "devices/dev-b/#",
    "devices/dev-b/telemetry",
    "devices/+/telemetry",
    "devices/+/#",
    "devices/#",
    "#",
    "+/#",
    "+/+/+",
    "$share/g/devices/dev-b/#",
    "$share/g/#",
    "$SYS/#",
    "$SYS/broker/clients/connected",
    "devices//dev-b/telemetry",
    "/devices/dev-b/telemetry",
    "devices/dev-a",  # the subtree root itself is not part of it
    "devices/dev-\u0430/#",  # Cyrillic a: a look-alike of dev-a
    "devices/dev-\uff41/#",  # fullwidth a
    "devices/dev-a\u0000/#",
    "devices/dev-a/\udcff",  # lone surrogate (not encodable; the client may refuse it)
    "devtrust/register/+/request",
    "devtrust/register/dev-b/response",
    "devtrust/register/#",
]


async def test_cross_device_subscriptions_deliver_nothing(
    site: Site, broker: EmbeddedBroker
) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
        mqtt(site, op, site.service) as registrar,
    ):
        for topic_filter in FORBIDDEN_FILTERS:
            with contextlib.suppress(ValueError, UnicodeError, aiomqtt.MqttError):
                await dev_a.subscribe(topic_filter, qos=1)
        await dev_a.subscribe("devices/dev-a/#", qos=1)
        await dev_b.publish("devices/dev-b/telemetry", b"secret-of-b", qos=1)
        await registrar.publish("devices/dev-b/cmd", b"for-b", qos=1)
        await registrar.publish("devtrust/register/dev-b/response", b"for-b", qos=1)
        await registrar.publish("devices/dev-a/cmd", b"for-a", qos=1)
        got = await collect(dev_a, 0.7)
        assert got == [("devices/dev-a/cmd", b"for-a")]


async def test_cross_device_publishes_are_not_delivered(site: Site, broker: EmbeddedBroker) -> None:
    op, reg = broker.operational_endpoint, broker.registration_endpoint
    async with (
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, reg, site.idevid["dev-c"]) as dev_c_reg,
        mqtt(site, op, site.service) as registrar,
    ):
        await registrar.subscribe("devices/#", qos=1)
        await registrar.subscribe("devtrust/register/#", qos=1)
        for topic in (
            "devices/dev-b/cmd",
            "devices/dev-\u0430/x",
            "devtrust/register/dev-b/request",
            "devices//dev-b",
            "/devices/dev-b/x",
            "devices/dev-a",
        ):
            with contextlib.suppress(ValueError, aiomqtt.MqttError):
                await dev_a.publish(topic, b"forged", qos=1)
        # On the registration listener a device has its request topic and nothing else.
        for topic in ("devices/dev-c/x", "devtrust/register/dev-b/request"):
            await dev_c_reg.publish(topic, b"forged", qos=1)
        await dev_c_reg.publish("devtrust/register/dev-c/request", b"mine", qos=1)
        await dev_a.publish("devices/dev-a/ok", b"mine", qos=1)
        got = await collect(registrar, 0.7)
        assert sorted(got) == [
            ("devices/dev-a/ok", b"mine"),
            ("devtrust/register/dev-c/request", b"mine"),
        ]


async def test_will_on_a_foreign_topic_is_refused(site: Site, broker: EmbeddedBroker) -> None:
    will = aiomqtt.Will("devices/dev-b/cmd", b"forged-will", qos=1)
    client = aiomqtt.Client(
        broker.operational_endpoint.host,
        broker.operational_endpoint.port,
        protocol=V311,
        tls_context=client_context(site, site.ldevid["dev-a"]),
        will=will,
        timeout=5,
    )
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with client:
            pass
    assert str(info.value.rc) == "Not authorized"  # CONNACK 5


async def test_retained_messages_of_others_are_not_replayed(
    site: Site, broker: EmbeddedBroker
) -> None:
    op = broker.operational_endpoint
    async with mqtt(site, op, site.service) as registrar:
        await registrar.subscribe("devices/#", qos=1)  # a broad filter exists in the broker
        async with mqtt(site, op, site.ldevid["dev-b"]) as dev_b:
            await dev_b.publish("devices/dev-b/state", b"b-state", qos=1, retain=True)
        await messages_until(registrar, ("devices/dev-b/state", b"b-state"))  # routed, kept
        async with mqtt(site, op, site.ldevid["dev-a"]) as dev_a:
            await dev_a.subscribe("devices/dev-a/#", qos=1)
            assert await messages_before_marker(registrar, dev_a, "devices/dev-a/cmd") == []
        async with mqtt(site, op, site.ldevid["dev-b"]) as dev_b:
            await dev_b.subscribe("devices/dev-b/#", qos=1)
            assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
                ("devices/dev-b/state", b"b-state")
            ]


async def wait_cut(client: aiomqtt.Client) -> None:
    """Return when the broker has closed ``client``'s connection."""
    with contextlib.suppress(aiomqtt.MqttError):
        async for _ in client.messages:
            pass


async def test_client_id_takeover_is_prevented(site: Site, broker: EmbeddedBroker) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.ldevid["dev-b"], identifier="dev-b") as dev_b,
        mqtt(site, op, site.service) as registrar,
    ):
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        # dev-a claims dev-b's client id, with a clean session (which in plain amqtt deletes
        # the session of that client id) and then with a persistent one.
        for clean in (True, False):
            async with mqtt(
                site, op, site.ldevid["dev-a"], identifier="dev-b", clean_session=clean
            ) as dev_a:
                await dev_a.subscribe("devices/dev-b/#", qos=1)
                await dev_a.subscribe("devices/dev-a/#", qos=1)  # for the marker only
                await registrar.publish("devices/dev-b/cmd", b"for-b", qos=1)
                assert await messages_before_marker(registrar, dev_a, "devices/dev-a/cmd") == []
                assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
                    ("devices/dev-b/cmd", b"for-b")
                ]
        await eventually(lambda: broker.live_sessions("dev-a") == 0)
        assert broker.live_sessions("dev-b") == 1


async def test_second_session_of_one_identity_is_a_clone_signal(
    site: Site, broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    op = broker.operational_endpoint
    caplog.set_level(logging.WARNING, logger="registrar.broker.embedded")
    async with mqtt(site, op, site.ldevid["dev-a"], identifier="first") as first:
        cut = asyncio.create_task(wait_cut(first))
        async with mqtt(site, op, site.ldevid["dev-a"], identifier="second") as second:
            await asyncio.wait_for(cut, 5)  # the older connection is the one cut
            await second.subscribe("devices/dev-a/#", qos=1)
            await second.publish("devices/dev-a/x", b"still-works", qos=1)
            assert await messages_before_marker(second, second, "devices/dev-a/x") == [
                ("devices/dev-a/x", b"still-works")
            ]
            assert broker.live_sessions("dev-a") == 1
    clones = [r for r in caplog.records if r.getMessage().startswith("clone-signal")]
    assert len(clones) == 1 and "dev-a" in clones[0].getMessage()


async def test_revocation_cuts_only_the_revoked_device_within_5_s(
    site: Site, broker: EmbeddedBroker
) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.ldevid["dev-a"]) as dev_a,
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
        mqtt(site, op, site.service) as registrar,
    ):
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        cut = asyncio.create_task(wait_cut(dev_a))
        loop = asyncio.get_running_loop()
        start = loop.time()
        site.write_crls(revoked_ldevids=("dev-a",))
        await broker.reload_crls()
        assert await broker.disconnect("dev-a") == 1
        await asyncio.wait_for(cut, 5)
        assert loop.time() - start < 5
        assert broker.live_sessions("dev-a") == 0
        assert broker.live_sessions("dev-b") == 1
        # dev-b is untouched: the same connection still receives (no reconnect happened).
        await registrar.publish("devices/dev-b/cmd", b"after", qos=1)
        assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
            ("devices/dev-b/cmd", b"after")
        ]
        # the revoked certificate cannot come back: the new CRL is in force for handshakes
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt(site, op, site.ldevid["dev-a"], timeout=1.5):
                pass
        try:
            answer = await raw_exchange(site, op, site.ldevid["dev-a"], connect_packet())
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert answer == b""
        # ... while others still connect with the reloaded contexts
        async with mqtt(site, op, site.ldevid["dev-c"]):
            pass
        assert broker.live_sessions("dev-b") == 1


async def test_block_refuses_connect_and_every_action_of_a_live_session(
    site: Site, broker: EmbeddedBroker
) -> None:
    op = broker.operational_endpoint
    async with (
        mqtt(site, op, site.ldevid["dev-c"]) as dev_c,
        mqtt(site, op, site.service) as registrar,
    ):
        await dev_c.subscribe("devices/dev-c/#", qos=1)
        await registrar.subscribe("devices/#", qos=1)
        await broker.block("dev-c")
        await dev_c.publish("devices/dev-c/telemetry", b"after-block", qos=1)
        await registrar.publish("devices/dev-c/cmd", b"to-blocked", qos=1)
        assert await collect(registrar, 0.4) == [("devices/dev-c/cmd", b"to-blocked")]
        assert await collect(dev_c, 0.2) == []
    with pytest.raises(aiomqtt.MqttCodeError) as info:
        async with mqtt(site, broker.operational_endpoint, site.ldevid["dev-c"]):
            pass
    assert str(info.value.rc) == "Not authorized"
    with pytest.raises(aiomqtt.MqttCodeError):
        async with mqtt(site, broker.registration_endpoint, site.idevid["dev-c"]):
            pass


async def test_disconnect_of_an_absent_identity_cuts_nothing(broker: EmbeddedBroker) -> None:
    assert await broker.disconnect("dev-nobody") == 0


async def test_malformed_input_does_not_hurt_other_clients(
    site: Site, broker: EmbeddedBroker
) -> None:
    op, reg = broker.operational_endpoint, broker.registration_endpoint
    junk = [
        os.urandom(1024),
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length beyond 4 bytes
        b"\x10\x05\x00\x04MQ",  # truncated CONNECT
        connect_packet(flags=0x01),  # reserved flag set
        b"\x30\x02\x00\x00",  # PUBLISH before CONNECT
        connect_packet() + os.urandom(64),  # junk after a good CONNECT
        connect_packet() + b"\x82\x03\x00\x01\x00",  # SUBSCRIBE without topics
        connect_packet() + b"\x30\x04\x00\x02\xc3\x28",  # PUBLISH with invalid UTF-8 topic
    ]
    async with (
        mqtt(site, op, site.ldevid["dev-b"]) as dev_b,
        mqtt(site, op, site.service) as registrar,
    ):
        await dev_b.subscribe("devices/dev-b/#", qos=1)
        attempts = []
        for data in junk:
            attempts += [
                raw_exchange(site, op, site.ldevid["dev-a"], data, wait=1),
                raw_exchange(site, reg, site.idevid["dev-a"], data, wait=1),
                raw_exchange(site, op, None, data, tls=False, wait=1),  # not even TLS
            ]
        # All at once: the broker must stay responsive while they are in flight.
        results = await asyncio.gather(*attempts, return_exceptions=True)
        for result in results:
            assert isinstance(result, bytes | OSError | ssl.SSLError | TimeoutError), result
        await registrar.publish("devices/dev-b/cmd", b"alive", qos=1)
        assert await messages_before_marker(registrar, dev_b, "devices/dev-b/cmd") == [
            ("devices/dev-b/cmd", b"alive")
        ]
    async with mqtt(site, op, site.ldevid["dev-a"]) as dev_a:
        await dev_a.subscribe("devices/dev-a/#", qos=1)
        await dev_a.publish("devices/dev-a/x", b"ok", qos=1)
        assert await messages_before_marker(dev_a, dev_a, "devices/dev-a/x") == [
            ("devices/dev-a/x", b"ok")
        ]


@pytest.mark.parametrize("clean_session", [True, False])
async def test_qos1_messages_acknowledged_before_a_disconnect_all_arrive(
    site: Site, broker: EmbeddedBroker, clean_session: bool
) -> None:
    """amqtt PUBACKs before routing; the publisher leaves right after its last PUBACK."""
    op = broker.operational_endpoint
    count = 200
    async with mqtt(site, op, site.service) as registrar:
        await registrar.subscribe("devices/dev-a/#", qos=1)
        async with mqtt(
            site, op, site.ldevid["dev-a"], identifier="dev-a", clean_session=clean_session
        ) as dev_a:
            await asyncio.gather(
                *(dev_a.publish(f"devices/dev-a/m/{i}", b"%d" % i, qos=1) for i in range(count))
            )
        got = await collect(registrar, 1.5)
    assert sorted(int(p) for _, p in got) == list(range(count))


async def test_mosquitto_clients_with_device_certificates(
    site: Site, broker: EmbeddedBroker
) -> None:
    """mosquitto_sub (as dev-a) and mosquitto_pub (as dev-b): clients this project did not
    write, with secondary certificates, reach exactly their own subtrees."""
    op = broker.operational_endpoint
    tls_args = ["-V", "mqttv311", "-h", op.host, "-p", str(op.port), "--cafile", str(site.root)]

    def cert_args(device: str) -> list[str]:
        return ["--cert", str(site.ldevid[device].cert), "--key", str(site.ldevid[device].key)]

    sub = await asyncio.create_subprocess_exec(
        *LINE_BUFFERED, "mosquitto_sub", *tls_args, *cert_args("dev-a"), "-q", "1", "-v",
        "-d", "-C", "2", "-W", "30",
        "-t", "devices/dev-b/#", "-t", "devices/+/cmd", "-t", "#", "-t", "devices/dev-a/#",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert sub.stdout is not None
    async with mqtt(site, op, site.service) as registrar:
        await mosquitto_sub_subscribed(sub.stdout)  # its SUBSCRIBE is answered
        await registrar.subscribe("devices/#", qos=1)
        await registrar.publish("devices/dev-b/cmd", b"for-b", qos=1)
        await registrar.publish("devices/dev-a/cmd", b"for-a", qos=1)
        for topic in ("devices/dev-a/cmd", "devices/dev-b/up"):
            pub = await asyncio.create_subprocess_exec(
                "mosquitto_pub", *tls_args, *cert_args("dev-b"), "-q", "1", "-t", topic,
                "-m", "from-b", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, pub_err = await asyncio.wait_for(pub.communicate(), 10)
            assert pub.returncode == 0, pub_err
        # after everything above: the next message both subscribers get (one routing queue)
        await registrar.publish("devices/dev-a/cmd", b"marker", qos=1)
        got = await messages_until(registrar, ("devices/dev-a/cmd", b"marker"))
    out, _ = await asyncio.wait_for(sub.communicate(), 30)
    # nothing of dev-b's, nothing forged by dev-b, before the marker (-C 2: it stops there)
    assert without_debug_lines(out) == ["devices/dev-a/cmd for-a", "devices/dev-a/cmd marker"]
    assert sorted(got) == [
        ("devices/dev-a/cmd", b"for-a"),
        ("devices/dev-b/cmd", b"for-b"),
        ("devices/dev-b/up", b"from-b"),
    ]


async def test_stale_crl_fails_closed_for_new_handshakes(
    site: Site, broker: EmbeddedBroker
) -> None:
    op = broker.operational_endpoint
    async with mqtt(site, op, site.ldevid["dev-b"]) as dev_b:
        now = site.pki.now
        stale = make_crl(
            now, site.pki.site_ca, site.pki.site_key,
            this_update=now - timedelta(days=10), next_update=now - timedelta(days=1), number=3,
        )  # fmt: skip
        site.settings.tls.crl_file.write_bytes(
            b"".join(pem(c) for c in (site.pki.root_crl, site.pki.station_crl, stale))
        )
        await broker.reload_crls()
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt(site, op, site.ldevid["dev-a"], timeout=1.5):
                pass
        await dev_b.subscribe("devices/dev-b/#", qos=1)  # live sessions are untouched
        await dev_b.publish("devices/dev-b/x", b"still", qos=1)
        assert await messages_before_marker(dev_b, dev_b, "devices/dev-b/x") == [
            ("devices/dev-b/x", b"still")
        ]


async def test_broker_key_must_be_encrypted_and_passphrase_right(
    site: Site, tmp_path: Path
) -> None:
    plain = tmp_path / "plain-key.pem"
    plain.write_bytes(
        site.pki.broker_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = site.settings.tls
    for bad in (
        dataclasses.replace(tls, server_key=plain),
        dataclasses.replace(tls, server_key_passphrase=b"wrong"),
        dataclasses.replace(tls, crl_file=tmp_path / "missing.pem"),
    ):
        b = EmbeddedBroker(dataclasses.replace(site.settings, tls=bad))
        with pytest.raises(BrokerError):
            await b.start()
        with pytest.raises(BrokerError):
            _ = b.operational_endpoint


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def test_oversized_publish_is_cut_before_it_is_buffered(
    site: Site, broker: EmbeddedBroker
) -> None:
    """amqtt reads a PUBLISH payload with one ``readexactly`` of the announced length (up to
    256 MiB): a device announcing 200 MiB must be cut at once, not buffered (Mosquitto's
    ``max_packet_size`` is the same 1 MiB limit)."""
    topic = b"devices/dev-a/x"
    body_len = 200 * 1024 * 1024
    data = (
        connect_packet()
        + b"\x30"
        + _remaining_length(body_len)
        + len(topic).to_bytes(2, "big")
        + topic
        + b"\x00" * 4096
    )
    try:
        await raw_exchange(site, broker.operational_endpoint, site.ldevid["dev-a"], data, wait=3)
    except TimeoutError:  # (an OSError subclass: checked first)
        pytest.fail("the broker kept waiting for a 200 MiB PUBLISH")
    except (OSError, ssl.SSLError):
        pass  # a reset is as good as a close
