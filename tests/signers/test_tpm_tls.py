"""Mutual TLS with keys that stay in a swtpm (:mod:`signers.tpm_tls`), against both brokers.

What is real: the swtpm holding the device's factory key and LDevID key, Mosquitto and the
embedded amqtt broker with ``CERT_REQUIRED`` and CRL checking, aiomqtt (paho) as the client,
TLS 1.2 and 1.3. The broker's acceptance is shown by MQTT, not by the handshake alone: a
device's message on its own topic comes back to it (the broker took the identity from the
certificate the TPM key signed for).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_sim.client import TlsIdentity
from device_sim.swtpm import Swtpm
from registrar.broker import Broker, BrokerSettings, BrokerTls, Endpoint
from registrar.broker.embedded import EmbeddedBroker
from registrar.broker.mosquitto import MosquittoBroker
from signers import tpm_tls
from signers.errors import TlsBindingError
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey, TpmKeyUsage
from signers.tpm_tls import (
    bind_openssl,
    check_same_openssl,
    load_tpm_ssl_identity,
    tpm_client_context,
)
from tests.fixtures.mosquitto_site import refused_with
from tests.fixtures.pki import DAY, MANUFACTURER, SITE_OPERATOR, Pki, make_crl, pem
from trustcore.identity import DeviceId
from trustcore.profiles import issue_factory_certificate, issue_secondary_certificate

pytestmark = [pytest.mark.tpm]

PASSPHRASE = b"tpm tls test passphrase"
DEVICE = "TL-000001"
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@dataclass(frozen=True)
class Device:
    """One swtpm device: factory key and LDevID key in its TPM, their certificates."""

    tpm: Tpm
    factory_key: TpmKey
    idevid: tuple[x509.Certificate, ...]
    ldevid_key: TpmKey
    ldevid: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class Site:
    pki: Pki
    settings: BrokerSettings
    root_pem: bytes
    device: Device

    def write_crls(self, revoked: tuple[x509.Certificate, ...] = (), number: int = 1) -> None:
        site_crl = make_crl(
            self.pki.now, self.pki.site_ca, self.pki.site_key, revoked=revoked, number=number
        )
        crls = (self.pki.root_crl, self.pki.station_crl, site_crl)
        self.settings.tls.crl_file.write_bytes(b"".join(pem(c) for c in crls))


def ldevid_for(pki: Pki, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
    """An LDevID for the test device from the site CA."""
    return issue_secondary_certificate(
        pki.site_ca,
        pki.site_key,
        public_key,
        device_id=DeviceId(DEVICE),
        organization=SITE_OPERATOR,
        not_before=pki.now - DAY,
        not_after=pki.now + 30 * DAY,
    )


@pytest.fixture(scope="module")
def swtpm_device(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    swtpm = Swtpm(tmp_path_factory.mktemp("tpm-tls-device")).start()
    tpm = Tpm(swtpm.tcti)
    try:
        factory_key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
        ldevid_key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
        idevid = issue_factory_certificate(
            pki.station_ca,
            pki.station_key,
            factory_key.public_key(),
            device_id=DeviceId(DEVICE),
            manufacturer=MANUFACTURER,
            not_before=pki.now - DAY,
        )
        ldevid = ldevid_for(pki, ldevid_key.public_key())
        yield Device(tpm, factory_key, (idevid, pki.station_ca), ldevid_key, (ldevid, pki.site_ca))
    finally:
        tpm.close()
        swtpm.stop()


@pytest.fixture(scope="module")
def site(pki: Pki, swtpm_device: Device, tmp_path_factory: pytest.TempPathFactory) -> Site:
    d = tmp_path_factory.mktemp("tpm-tls-site")
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
    settings = BrokerSettings(
        tls=BrokerTls(
            server_cert=d / "broker.pem",
            server_key=d / "broker-key.pem",
            server_key_passphrase=PASSPHRASE,
            registration_cas=d / "registration-cas.pem",
            operational_cas=d / "operational-cas.pem",
            crl_file=d / "crls.pem",
        ),
        workdir=d / "work",
    )
    settings.workdir.mkdir()
    return Site(pki, settings, pem(pki.root), swtpm_device)


@pytest.fixture(params=["embedded", "mosquitto"])
async def broker(request: pytest.FixtureRequest, site: Site) -> AsyncIterator[Broker]:
    site.write_crls()
    b: Broker = (
        EmbeddedBroker(site.settings)
        if request.param == "embedded"
        else MosquittoBroker(site.settings)
    )
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def context(
    site: Site, certs: tuple[x509.Certificate, ...], key: TpmKey, version: ssl.TLSVersion
) -> ssl.SSLContext:
    ctx = tpm_client_context(certs, key, trust_pem=site.root_pem)
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def connected(endpoint: Endpoint, ctx: ssl.SSLContext, *, echo: bool) -> None:
    """Connect as the device (CONNACK accepted) and, with ``echo``, publish on its own
    telemetry topic and get the message back (operational listener ACL: its own subtree)."""
    topic = f"devices/{DEVICE}/telemetry"
    async with aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=DEVICE,
        tls_context=ctx,
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=5,
    ) as client:
        if not echo:
            return
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"signed in the TPM", qos=1)
        message = await asyncio.wait_for(anext(aiter(client.messages)), 5)
        assert message.payload == b"signed in the TPM"


# ------------------------------------------------------------------------------ brokers


@pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
async def test_tpm_keys_carry_the_device_through_both_listeners(
    site: Site, broker: Broker, version: ssl.TLSVersion
) -> None:
    """Factory key on the registration listener, LDevID key on the operational one; both
    never leave the swtpm. The broker admits the identity and routes its own topic."""
    dev = site.device
    registration = context(site, dev.idevid, dev.factory_key, version)
    await connected(broker.registration_endpoint, registration, echo=False)
    operational = context(site, dev.ldevid, dev.ldevid_key, version)
    await connected(broker.operational_endpoint, operational, echo=True)
    # each listener admits only its own issuer's certificates, TPM key or not
    assert await refused_with(broker.registration_endpoint, operational)
    assert await refused_with(broker.operational_endpoint, registration)


async def test_a_revoked_ldevid_is_refused_at_the_handshake(site: Site, broker: Broker) -> None:
    """The live cut works through the certificate check: once the LDevID is on the site
    CRL and the broker reloaded it, the TPM-held key no longer completes a session."""
    dev = site.device
    for version in (TLS12, TLS13):
        assert not await refused_with(
            broker.operational_endpoint, context(site, dev.ldevid, dev.ldevid_key, version)
        )
    site.write_crls(revoked=(dev.ldevid[0],), number=2)
    try:
        await broker.reload_crls()
        for version in (TLS12, TLS13):
            ctx = context(site, dev.ldevid, dev.ldevid_key, version)
            assert await refused_with(broker.operational_endpoint, ctx)
        # the factory identity on the registration listener is untouched
        ctx = context(site, dev.idevid, dev.factory_key, TLS13)
        assert not await refused_with(broker.registration_endpoint, ctx)
    finally:
        site.write_crls(number=3)


async def test_concurrent_handshakes_share_one_tpm_with_other_work(
    site: Site, broker: Broker
) -> None:
    """Four threads complete handshakes with one TPM-held key while a fifth makes and drops
    keys in the same TPM (as a device does while registering): the TPM lock serialises the
    commands and the 3 object slots suffice. TLS 1.2, where the server's Finished follows
    its check of the client's CertificateVerify (no MQTT session: concurrent sessions of
    one identity are a clone signal by design)."""
    dev, endpoint = site.device, broker.operational_endpoint
    ctx = context(site, dev.ldevid, dev.ldevid_key, TLS12)
    stop = threading.Event()

    def connect(_: int) -> str | None:
        with (
            socket.create_connection((endpoint.host, endpoint.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=endpoint.host) as tls,
        ):
            return tls.version()

    def churn() -> int:
        made = 0
        while not stop.is_set():
            TpmKey.create(dev.tpm, TpmKeyUsage.ECDH).unload()
            made += 1
        return made

    def run_all() -> tuple[list[str | None], int]:
        with ThreadPoolExecutor(max_workers=5) as pool:
            churning = pool.submit(churn)
            try:
                answers = list(pool.map(connect, range(20)))
            finally:
                stop.set()
            return answers, churning.result()

    # off the event loop: the embedded broker runs on it
    answers, made = await asyncio.to_thread(run_all)
    assert answers == ["TLSv1.2"] * 20 and made > 0


# --------------------------------------------------------------------- binding checks


def test_the_binding_is_the_openssl_of_ssl() -> None:
    binding = bind_openssl()
    assert binding.version == ssl.OPENSSL_VERSION_NUMBER
    assert binding.version >> 28 == 3


def test_another_copy_of_libcrypto_is_refused(tmp_path: Path) -> None:
    """Same version, another loaded instance: refused with one clear line (in a child
    process, so the second copy of OpenSSL never lives in the test process)."""
    import ctypes.util

    found = ctypes.util.find_library("crypto")
    assert found is not None
    source = next(
        p
        for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")
        if (p := Path(d) / "libcrypto.so.3").exists()
    )
    copy = tmp_path / "libcrypto-copy.so.3"
    shutil.copyfile(source, copy)
    code = (
        "from signers.errors import TlsBindingError\n"
        "from signers.tpm_tls import bind_openssl\n"
        "try:\n"
        f"    bind_openssl({str(copy)!r})\n"
        "except TlsBindingError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('ACCEPTED')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "is not the OpenSSL instance Python's ssl module uses" in out.stdout, out
    assert "Traceback" not in out.stderr


def test_the_binding_rule() -> None:
    v = ssl.OPENSSL_VERSION_NUMBER
    check_same_openssl(v, v, True, "libcrypto.so.3")
    with pytest.raises(TlsBindingError, match="version mismatch"):
        check_same_openssl(v, v + 0x10, True, "libcrypto.so.3")
    with pytest.raises(TlsBindingError, match="not the OpenSSL instance"):
        check_same_openssl(v, v, False, "/opt/other/libcrypto.so.3")
    with pytest.raises(TlsBindingError, match=r"OpenSSL 3\.x needed"):
        check_same_openssl(0x1010117F, 0x1010117F, True, "libcrypto.so.1.1")


def test_wrong_keys_and_contexts_are_clear_errors(site: Site) -> None:
    dev = site.device
    ctx = ssl.create_default_context(cadata=site.root_pem.decode())
    with pytest.raises(TlsBindingError, match="does not carry this TPM key"):
        load_tpm_ssl_identity(ctx, dev.idevid, dev.ldevid_key)
    ecdh = TpmKey.create(dev.tpm, TpmKeyUsage.ECDH)
    try:
        with pytest.raises(TlsBindingError, match="TPM signing key"):
            load_tpm_ssl_identity(ctx, dev.idevid, ecdh)
    finally:
        ecdh.unload()
    with pytest.raises(TlsBindingError, match="no client certificate"):
        load_tpm_ssl_identity(ctx, (), dev.factory_key)
    with pytest.raises(TlsBindingError, match=r"expected an ssl\.SSLContext"):
        load_tpm_ssl_identity(object(), dev.idevid, dev.factory_key)  # type: ignore[arg-type]


def test_key_registry_entries_go_with_their_contexts(site: Site) -> None:
    """OpenSSL's EC_KEY finish callback drops the key when the last SSL_CTX using it goes."""
    gc.collect()
    before = tpm_tls.bound_keys()
    contexts = [tpm_client_context(site.device.idevid, site.device.factory_key,
                                   trust_pem=site.root_pem) for _ in range(5)]  # fmt: skip
    assert tpm_tls.bound_keys() == before + 5
    del contexts
    gc.collect()
    assert tpm_tls.bound_keys() == before


async def test_a_tpm_that_fails_during_the_handshake_is_a_clean_ssl_error(
    pki: Pki, site: Site, broker: Broker, tmp_path: Path
) -> None:
    """The sign callback never raises through OpenSSL: a TPM gone away ends the handshake
    with ``ssl.SSLError`` and the process carries on."""
    swtpm = Swtpm(tmp_path / "tpm").start()
    tpm = Tpm(swtpm.tcti)
    key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
    ldevid = ldevid_for(pki, key.public_key())
    ctx = context(site, (ldevid, pki.site_ca), key, TLS12)
    swtpm.stop()
    try:
        with pytest.raises(ssl.SSLError):
            await asyncio.open_connection(
                broker.operational_endpoint.host, broker.operational_endpoint.port, ssl=ctx
            )
    finally:
        with contextlib.suppress(Exception):
            tpm.close()


def test_a_context_alive_at_interpreter_exit_is_freed_cleanly(tmp_path: Path) -> None:
    """An SSLContext holding a TPM key that is collected during interpreter shutdown runs
    the EC_KEY finish callback then: the process must still exit 0 (it once segfaulted)."""
    code = f"""
import datetime
from pathlib import Path
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from device_sim.swtpm import Swtpm
from signers.tpm import Tpm, TpmKey, TpmKeyUsage
from signers.tpm_tls import tpm_client_context
now = datetime.datetime.now(datetime.UTC)
ca_key = ec.generate_private_key(ec.SECP256R1())
def cert(public):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
            .sign(ca_key, hashes.SHA256()))
swtpm = Swtpm(Path({str(tmp_path)!r})).start()
key = TpmKey.create(Tpm(swtpm.tcti), TpmKeyUsage.SIGN)
class Holder:
    pass
holder = Holder()
holder.cycle = holder  # collected only at shutdown
holder.ctx = tpm_client_context([cert(key.public_key())], key,
    trust_pem=cert(ca_key.public_key()).public_bytes(serialization.Encoding.PEM))
swtpm.stop()
print("exiting")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (out.returncode, out.stdout.strip()) == (0, "exiting"), out


# --------------------------------------------------------------------------- timing


async def test_handshake_time_tpm_versus_software_key(
    site: Site, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bench/tpm_tls.py``'s measurement, briefly: a fresh context and connection each time
    to the operational listener, CONNACK awaited; TPM-held LDevID key vs a software key.
    Printed for the record (the full run is the benchmark); both must be admitted."""
    from bench.tpm_tls import measure

    dev = site.device
    soft = SoftwareKey.ephemeral()
    soft_cert = ldevid_for(site.pki, soft.public_key())
    identities = {
        "tpm": TlsIdentity.from_signer(dev.ldevid, dev.ldevid_key),
        "software": TlsIdentity.from_signer((soft_cert, site.pki.site_ca), soft),
    }
    contexts = {k: partial(i.context, site.root_pem) for k, i in identities.items()}
    results = await measure(broker.operational_endpoint, contexts, n=5)
    with capsys.disabled():
        medians = {k: v["connack_ms"]["median"] for k, v in results.items()}
        print("\nCONNACK median ms:", medians)
    assert set(results) == {f"{v} {k}" for v in ("TLSv1_2", "TLSv1_3") for k in contexts}
