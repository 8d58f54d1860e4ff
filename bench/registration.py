"""Registration throughput, latency and registrar CPU through a real broker and the real
registrar: the benchmark starts ``registrar run`` processes, the only way registrations are
served.

    python bench/registration.py --devices 1000 --broker mosquitto --store sqlite --json
    python bench/registration.py --devices 1000 --broker mosquitto --instances 3 --store postgres

Set-up: a site home commissioned from a real HQ bundle (:func:`bench.site_fixture.
build_commissioned_site`), N + 100 software-key factory devices; keys, CSRs, signed requests
and TLS contexts are made before the clock starts, as a device has them before it powers on.
The clients are :mod:`bench.lean_mqtt` on one event loop in this process.

Progress goes to stderr; the LAST line of stdout is one JSON object with:

* ``registrations_per_s``: N devices powered on at once, each doing a full registration
  (mTLS connect to the registration listener, subscribe, signed request, the registrar's
  verification, issuance, payload-key wrap, durable record, signed answer), N divided by the
  time from the first connect to the last answer;
* ``failures``: devices that did not end registered (no answer, a refusal, an answer that does
  not verify on the device side, checked after the clock stops), plus any difference between
  what the devices hold and what the store holds (one device row and one certificate per
  device: no registration lost or duplicated);
* ``baseline_echo_per_s``: the same N devices and requests, same run, same broker kind and
  configuration, answered by the registrar's own channel (:class:`registrar.channel.
  MqttChannel`) with a handler that returns the request bytes (bare mTLS connect + request +
  reply); ``ratio`` = baseline_echo_per_s / registrations_per_s. Echo and registration waves
  alternate ``--rounds`` times (3; fresh devices for each registration wave) with both
  servers up and the other idle; rates and CPU are medians over the rounds (``per_round``);
* ``p50_ms`` / ``p99_ms``: 100 further devices registering one after another on an idle
  system, each from its TCP connect to the answer;
* ``registrar_cpu_ms_per_registration``: CPU (user + system, ``/proc/<pid>/stat``) of ALL
  ``registrar run`` processes during the N-device wave only, divided by N. The Mosquitto
  process is not a registrar process (its CPU is reported apart, ``broker_cpu_ms_per_
  registration``); the embedded broker runs inside the registrar and is counted;
* ``crypto_floor_ms``: the bare cryptography of one registration (4 ECDSA verifications,
  2 signatures, one ECDH + AES-GCM seal) timed in this process just before each
  registration wave: how fast the machine is right then (it moves by 2x on this shared
  host); ``registrar_cpu_vs_floor`` = registrar CPU per registration / that floor, the
  figure to compare across runs;
* ``instances``, ``store`` (``sqlite`` or ``postgres``; PostgreSQL: a database created on
  127.0.0.1:5432, or ``$DEVTRUST_BENCH_PG``, and dropped at the end).

``--transport est``: the registration waves and the latency series go through the
registrar's EST listener (``registrar run --est-port 0``): per device a new HTTPS connection
with its factory certificate (mutual TLS), ``POST /.well-known/est/simpleenroll`` with its
base64 CSR, the certs-only PKCS#7 answer (checked after the clock stops: an LDevID issued by
the site CA for the device and the key of its CSR; EST carries no payload key). Same JSON
fields; the echo baseline stays the MQTT one (a bare mTLS request/reply), and each round also
runs an MQTT registration wave of fresh devices on the same registrar, so the same run gives
``mqtt_registrations_per_s``, ``est_vs_mqtt`` (EST rate / MQTT rate, medians) and
``mqtt_registrar_cpu_ms_per_registration``. The registrar's CPU for EST includes the TLS
handshake and HTTP, which for MQTT are the broker's.

Broker kinds are entries of :data:`BROKERS` (:class:`BrokerTier`): how to start the first
and the further registrar instances, and the echo baseline on that broker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from bench.lean_mqtt import LeanMqtt
from bench.site_fixture import (
    BenchSite,
    FactoryDevice,
    RegistrarProcess,
    SiteProcess,
    build_commissioned_site,
    process_cpu_seconds,
)
from device_sim.client import DeviceClient, SoftwareKeys
from signers.software import SoftwareKey
from trustcore.endpoint import Endpoint
from trustcore.keys import spki_der
from trustcore.payload import PayloadKey
from trustcore.profiles import device_id_from_certificate
from trustcore.registration import (
    RegistrationError,
    RegistrationGranted,
    open_payload_key,
    parse_request,
    parse_response,
)
from trustcore.topics import registration_request_topic, registration_response_topic

Transport = Literal["mqtt", "est"]
EST_ENROL = "/.well-known/est/simpleenroll"

PG_ADMIN = os.environ.get("DEVTRUST_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    device: FactoryDevice
    request: bytes
    ldevid_key: SoftwareKey
    wrap_key: SoftwareKey
    tls: ssl.SSLContext
    request_topic: str
    response_topic: str
    #: The base64 of the request's CSR: the body of an EST enrolment.
    est_body: bytes


@dataclass
class Outcome:
    started: float
    finished: float | None
    response: bytes | None
    error: str | None = None


def prepare(devices: list[FactoryDevice]) -> list[Prepared]:
    out: list[Prepared] = []
    for device in devices:
        client = DeviceClient(device.credentials(), SoftwareKeys())
        request, ldevid_key, wrap_key = client.new_request()
        assert isinstance(ldevid_key, SoftwareKey) and isinstance(wrap_key, SoftwareKey)
        out.append(
            Prepared(
                device,
                request,
                ldevid_key,
                wrap_key,
                client.registration_context(),
                registration_request_topic(device.device_id),
                registration_response_topic(device.device_id),
                base64.b64encode(parse_request(request).csr_der),
            )
        )
    return out


async def one(
    p: Prepared,
    endpoint: Endpoint,
    timeout: float,
    gate: asyncio.Semaphore | None = None,
    transport: Transport = "mqtt",
) -> Outcome:
    if transport == "est":
        return await one_est(p, endpoint, timeout, gate)
    started = time.perf_counter()
    try:
        async with gate or contextlib.nullcontext():
            client = await LeanMqtt.connect(
                endpoint.host,
                endpoint.port,
                p.tls,
                p.device.device_id.value,
                timeout=timeout,
            )
    except Exception as exc:
        return Outcome(started, None, None, f"connect: {exc!r}")
    try:
        await asyncio.wait_for(client.subscribe(p.response_topic, 1), timeout)
        acked = client.publish_nowait(p.request_topic, p.request, 1)
        _topic, payload = await client.next_message(timeout)
        finished = time.perf_counter()
        await asyncio.wait_for(acked, timeout)
        return Outcome(started, finished, payload)
    except Exception as exc:
        return Outcome(started, None, None, f"exchange: {exc!r}")
    finally:
        await client.disconnect()


async def one_est(
    p: Prepared, endpoint: Endpoint, timeout: float, gate: asyncio.Semaphore | None = None
) -> Outcome:
    """One EST enrolment: a new HTTPS connection with the factory certificate (mTLS),
    ``POST simpleenroll``, the PKCS#7 answer (checked after the clock stops)."""
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(ssl=p.tls, force_close=True)
    url = f"https://{endpoint.host}:{endpoint.port}{EST_ENROL}"
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session:
            async with gate or contextlib.nullcontext():
                response = await session.post(
                    url, data=p.est_body, headers={"Content-Type": "application/pkcs10"}
                )
            async with response:
                body = await response.read()
                finished = time.perf_counter()
                if response.status != 200:
                    return Outcome(started, None, None, f"refused: HTTP {response.status}")
                return Outcome(started, finished, body)
    except Exception as exc:
        return Outcome(started, None, None, f"exchange: {exc!r}")


async def wave(
    prepared: list[Prepared],
    endpoint: Endpoint,
    timeout: float,
    label: str,
    connecting: int,
    transport: Transport = "mqtt",
) -> tuple[float, list[Outcome]]:
    """Everyone at once, at most ``connecting`` TCP+TLS+CONNECT handshakes in flight;
    returns (per second, outcomes)."""
    gate = asyncio.Semaphore(connecting)
    done = 0
    total = len(prepared)

    async def tracked(p: Prepared) -> Outcome:
        nonlocal done
        result = await one(p, endpoint, timeout, gate, transport)
        done += 1
        if done % max(1, total // 10) == 0:
            log(f"  {label}: {done}/{total}")
        return result

    outcomes = await asyncio.gather(*(tracked(p) for p in prepared))
    ok = [o for o in outcomes if o.finished is not None]
    if not ok:
        return 0.0, outcomes
    first = min(o.started for o in outcomes)
    last = max(o.finished for o in ok if o.finished is not None)
    return len(ok) / (last - first), outcomes


def check_est(p: Prepared, outcome: Outcome, site_ca: x509.Certificate) -> str | None:
    """None if the PKCS#7 answer holds an LDevID from the site CA for this device and the
    key of its CSR."""
    if outcome.response is None:
        return outcome.error or "no response"
    try:
        (ldevid,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(outcome.response))
        ldevid.verify_directly_issued_by(site_ca)
    except Exception as exc:
        return f"bad response: {exc!r}"
    if device_id_from_certificate(ldevid) != p.device.device_id:
        return "bad response: another device"
    if spki_der(ldevid.public_key()) != spki_der(p.ldevid_key.public_key()):
        return "bad response: another key"
    return None


def granted(
    p: Prepared, outcome: Outcome, roots: tuple[object, ...]
) -> tuple[RegistrationGranted, PayloadKey] | str:
    """The device's registration (verified response, the payload key it unwrapped), or
    what went wrong."""
    if outcome.response is None:
        return outcome.error or "no response"
    parsed = parse_request(p.request)
    try:
        result = parse_response(
            outcome.response,
            device_id=p.device.device_id,
            nonce=parsed.nonce,
            request_digest=parsed.digest,
            ldevid_public_key=p.ldevid_key.public_key(),
            roots=roots,  # type: ignore[arg-type]
            now=datetime.now(UTC),
        )
    except RegistrationError as exc:
        return f"bad response: {exc}"
    if not isinstance(result, RegistrationGranted):
        return f"refused: {result.reason}"
    return result, open_payload_key(p.wrap_key, p.device.device_id, result.payload_key)


def check(
    p: Prepared,
    outcome: Outcome,
    roots: tuple[object, ...],
    transport: Transport = "mqtt",
    site_ca: x509.Certificate | None = None,
) -> str | None:
    """None if the device ends registered (verified response, payload key opens)."""
    if transport == "est":
        assert site_ca is not None
        return check_est(p, outcome, site_ca)
    result = granted(p, outcome, roots)
    return result if isinstance(result, str) else None


# ------------------------------------------------------------------------- broker tiers


class BrokerTier(Protocol):
    """One ``--broker`` kind: how its registrar instances start, and its echo baseline."""

    name: str
    max_instances: int
    #: False: no echo baseline on this broker (the echo waves are skipped).
    has_echo: bool

    def first_args(self) -> list[str]:
        """``registrar run`` options of the first instance."""
        ...

    def joined_args(self, instance: int, first: RegistrarProcess) -> list[str]:
        """``registrar run`` options of instance ``instance`` (2..K)."""
        ...

    def echo(self, site: BenchSite, workdir: Path) -> contextlib.AbstractAsyncContextManager[Echo]:
        """The broker with the echo responder on it."""
        ...


@dataclass(frozen=True)
class Echo:
    """The echo baseline's registration listener, and the CPU seconds its responder has
    used so far (the channel alone: the same client and workers as ``registrar run``)."""

    endpoint: Endpoint
    cpu_seconds: Callable[[], Awaitable[float]]


class _SiteBroker:
    """A broker the first registrar instance starts and owns (embedded, Mosquitto)."""

    has_echo = True

    def __init__(self, name: str, max_instances: int) -> None:
        self.name = name
        self.max_instances = max_instances

    def first_args(self) -> list[str]:
        return ["--broker", self.name, "--registration-port", "0", "--operational-port", "0"]

    def joined_args(self, instance: int, first: RegistrarProcess) -> list[str]:
        op = first.operational_endpoint
        return [
            "--broker",
            self.name,
            "--instance",
            str(instance),
            "--join",
            f"{op.host}:{op.port}",
        ]

    @contextlib.asynccontextmanager
    async def echo(self, site: BenchSite, workdir: Path) -> AsyncIterator[Echo]:
        extra = ("--passphrase-file", str(site.passphrase_file))
        process = await SiteProcess.start(site.home, self.name, extra=extra)  # type: ignore[arg-type]

        async def cpu() -> float:
            value = (await process.command("stats")).get("cpu_s")
            return float(value) if isinstance(value, int | float) else 0.0

        try:
            await process.command("echo")
            yield Echo(process.registration_endpoint, cpu)
        finally:
            await process.close()


class _RabbitCluster:
    """A 3-node RabbitMQ cluster rendered from the site (the production renderer) and run
    on this machine's own ports; every ``registrar run --broker rabbitmq`` instance
    consumes the one quorum queue and serves the auth backend on its own port (the nodes
    ask instance 1's).

    No echo baseline: an echo responder on the same cluster would have to consume the
    same routing keys as the registrars, which run meanwhile (``baseline_echo_per_s`` and
    ``ratio`` are null for this broker)."""

    name = "rabbitmq"
    max_instances = 16
    has_echo = False

    def __init__(self) -> None:
        self.cluster: Any = None
        self.auth_ports: list[int] = []

    def _args(self, instance: int) -> list[str]:
        nodes = [
            a
            for n in self.cluster.nodes
            for a in (
                "--rabbitmq-node",
                f"{n.name},{n.host},{n.amqp_port},{n.mqtts_port},{n.management_port},{n.dist_port}",
            )
        ]
        return [
            *("--broker", "rabbitmq", "--instance", str(instance)),
            *("--auth-port", str(self.auth_ports[instance - 1])),
            *("--rabbitmq-config", str(self.cluster.base), *nodes),
        ]

    def first_args(self) -> list[str]:
        return self._args(1)

    def joined_args(self, instance: int, first: RegistrarProcess) -> list[str]:
        return self._args(instance)

    @contextlib.asynccontextmanager
    async def echo(self, site: BenchSite, workdir: Path) -> AsyncIterator[Echo]:
        """Starts the nodes (no echo: see the class text); they form the cluster while
        the registrars start."""
        from registrar.broker import BrokerTls
        from registrar.broker.rabbitmq import site_tls
        from registrar.broker.rabbitmq_auth import ADMIN_USER
        from registrar.broker.rabbitmq_site import admin_password
        from registrar.site import SiteHome
        from tests.fixtures.rabbitmq import plan_cluster

        home = SiteHome.open(site.home)
        passphrase = site.secrets().passphrase()
        tls = site_tls(
            BrokerTls(
                server_cert=home.current / "broker.pem",
                server_key=home.key_path("broker"),
                server_key_passphrase=passphrase,
                registration_cas=home.current / "registration-cas.pem",
                operational_cas=home.current / "operational-cas.pem",
                crl_file=home.current / "crls.pem",
            )
        )
        self.auth_ports = _free_ports(self.max_instances)
        admin = (ADMIN_USER, admin_password(passphrase, home.site_id.value))
        auth = f"http://127.0.0.1:{self.auth_ports[0]}"
        self.cluster = cluster = plan_cluster(workdir / "rabbit", tls, auth, admin)
        t = time.perf_counter()
        for node in cluster.nodes:
            cluster.start_node(node)
        try:
            await asyncio.to_thread(cluster.wait_listening, cluster.nodes)
            log(f"RabbitMQ nodes listening in {time.perf_counter() - t:.1f} s")
            endpoint = Endpoint(cluster.nodes[0].host, cluster.nodes[0].mqtts_port)

            async def no_cpu() -> float:
                return 0.0

            yield Echo(endpoint, no_cpu)
        finally:
            await asyncio.to_thread(cluster.stop)


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


#: ``--broker`` choices.
BROKERS: dict[str, BrokerTier] = {
    "mosquitto": _SiteBroker("mosquitto", 16),
    "embedded": _SiteBroker("embedded", 1),
    "rabbitmq": _RabbitCluster(),
}


# -------------------------------------------------------------------------------- stores


@contextlib.asynccontextmanager
async def bench_store(kind: str, site: BenchSite) -> AsyncIterator[tuple[list[str], str]]:
    """(``registrar run`` options, store location) for ``--store``: the site home's SQLite
    file, or a PostgreSQL database made for this run and dropped afterwards."""
    if kind == "sqlite":
        yield [], str(site.home / "registrar.db")
        return
    import psycopg

    name = f"devtrust_bench_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}".encode())
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        yield ["--store", url], url
    finally:
        async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


async def store_totals(location: str) -> dict[str, int]:
    """What the store holds after the run: device rows and certificates issued."""
    from registrar.store import Store

    store = await Store.open(location)
    try:
        counts = await store.counts()
        certificates = await store.certificates()
    finally:
        await store.close()
    serials = {c.serial for c in certificates}
    return {
        "devices": counts["devices"],
        "certificates": len(certificates),
        "unique_serials": len(serials),
    }


# ------------------------------------------------------------------------------- the run


async def start_registrars(
    tier: BrokerTier, site: BenchSite, instances: int, store_args: list[str], logs: Path
) -> list[RegistrarProcess]:
    first = await RegistrarProcess.start(
        site, [*tier.first_args(), *store_args], log_file=logs / "registrar-1.log"
    )
    out = [first]
    try:
        for k in range(2, instances + 1):
            args = [*tier.joined_args(k, first), *store_args]
            out.append(
                await RegistrarProcess.start(site, args, log_file=logs / f"registrar-{k}.log")
            )
    except BaseException:
        for process in reversed(out):
            await process.stop()
        raise
    return out


def _cpu(processes: Sequence[RegistrarProcess]) -> float:
    return sum(p.cpu_seconds() for p in processes)


def _broker_cpu(first: RegistrarProcess) -> float | None:
    """CPU of the Mosquitto child of the first registrar (None: no such child)."""
    try:
        children = Path(f"/proc/{first.pid}/task/{first.pid}/children").read_text().split()
    except OSError:
        return None
    total = None
    for child in children:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total = (total or 0.0) + process_cpu_seconds(int(child))
    return total


@dataclass
class Round:
    """One echo wave and one registration wave, back to back (same devices' requests for
    the echo, fresh devices for the registrations)."""

    echo_rate: float
    echo_cpu: float
    reg_rate: float
    registrar_cpu: float
    broker_cpu: float | None
    #: ``--transport est``: the MQTT registration wave of the same round (else None).
    mqtt_rate: float | None = None
    mqtt_cpu: float | None = None
    #: :func:`crypto_floor_ms` measured just before the registration wave.
    floor_ms: float = 0.0


def crypto_floor_ms(samples: int = 200) -> float:
    """CPU ms, in this process now, of the bare cryptography one registration needs (the
    same floor as ``bench/registration_cpu.py``): 4 ECDSA P-256 verifications, 2
    signatures and one HPKE-style seal (ephemeral key, ECDH, AES-256-GCM). Measured next
    to each wave, it says how fast this machine is at that moment: ``registrar_cpu_ms``
    divided by it is comparable across runs and machines."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ecdsa = ec.ECDSA(hashes.SHA256())
    signer = ec.generate_private_key(ec.SECP256R1())
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    tbs = os.urandom(450)  # an IDevID's TBSCertificate is about this size
    signature = signer.sign(tbs, ecdsa)
    public = signer.public_key()
    aead = AESGCM(os.urandom(32))
    started = time.process_time()
    for _ in range(samples):
        for _ in range(4):
            public.verify(signature, tbs, ecdsa)
        signer.sign(tbs, ecdsa)
        signer.sign(tbs, ecdsa)
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        ephemeral.exchange(ec.ECDH(), peer)
        aead.encrypt(b"\0" * 12, b"\0" * 32, b"")
    return (time.process_time() - started) * 1000 / samples


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


async def run(args: argparse.Namespace) -> dict[str, object]:
    tier = BROKERS[args.broker]
    n, lat_n, k, rounds = args.devices, args.latency_count, args.instances, args.rounds
    if k > tier.max_instances:
        raise SystemExit(f"--broker {tier.name} runs at most {tier.max_instances} instance(s)")
    if k > 1 and args.store != "postgres":
        raise SystemExit("several instances share one PostgreSQL store: add --store postgres")
    transport: Transport = args.transport
    est = transport == "est"
    if est and (k > 1 or tier.name == "rabbitmq"):
        raise SystemExit("--transport est: one registrar instance (it serves EST), MQTT broker")
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        site = build_commissioned_site(base / "world")
        site_ca = x509.load_pem_x509_certificate(
            (site.home / "current" / "site-ca.pem").read_bytes()
        )
        waves = 2 if est else 1  # EST: an MQTT registration wave of its own in each round
        devices = site.factory_devices(waves * rounds * n + lat_n)
        log(f"site commissioned, {len(devices)} devices made in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        prepared = prepare(devices)
        log(f"keys, CSRs, signed requests, TLS contexts in {time.perf_counter() - t:.1f} s")
        loads = [prepared[r * n : (r + 1) * n] for r in range(rounds)]
        mqtt_loads = (
            [prepared[(rounds + r) * n : (rounds + r + 1) * n] for r in range(rounds)]
            if est
            else []
        )
        idle = prepared[waves * rounds * n :]
        mqtt_out: list[Outcome] = []

        results: list[Round] = []
        reg_out: list[Outcome] = []
        echo_failures = 0
        # Both stay up for the whole run, each idle while the other is measured: an echo
        # wave and a registration wave alternate, so a noisy neighbour hits both alike.
        async with tier.echo(site, base) as echo, bench_store(args.store, site) as store:
            store_args, location = store
            est_args = ["--est-port", "0"] if est else []
            registrars = await start_registrars(tier, site, k, [*store_args, *est_args], base)
            try:
                mqtt_endpoint = registrars[0].registration_endpoint
                endpoint = registrars[0].est_endpoint if est else mqtt_endpoint
                assert endpoint is not None, "registrar run did not report its EST listener"
                pids = [p.pid for p in registrars]
                log(f"registrar run x{k} (pids {pids}, {args.store}): {endpoint}")
                await asyncio.sleep(0.5)  # start-up work (status, CRL check) out of the way
                for r, load in enumerate(loads, 1):
                    echo_rate = echo_cpu = 0.0
                    if tier.has_echo:
                        e0 = await echo.cpu_seconds()
                        echo_rate, echo_out = await wave(
                            load, echo.endpoint, args.timeout, f"echo {r}/{rounds}", args.connecting
                        )
                        echo_cpu = await echo.cpu_seconds() - e0
                        echo_failures += sum(o.response is None for o in echo_out)
                    mqtt_rate = mqtt_cpu = None
                    if est:
                        m_cpu0 = _cpu(registrars)
                        mqtt_rate, m_out = await wave(
                            mqtt_loads[r - 1],
                            mqtt_endpoint,
                            args.timeout,
                            f"MQTT registration {r}/{rounds}",
                            args.connecting,
                        )
                        mqtt_out += m_out
                        mqtt_cpu = _cpu(registrars) - m_cpu0
                    floor_ms = crypto_floor_ms()
                    cpu0, broker0 = _cpu(registrars), _broker_cpu(registrars[0])
                    reg_rate, out = await wave(
                        load,
                        endpoint,
                        args.timeout,
                        f"{transport} registration {r}/{rounds}",
                        args.connecting,
                        transport,
                    )
                    cpu1, broker1 = _cpu(registrars), _broker_cpu(registrars[0])
                    reg_out += out
                    broker = None if broker0 is None or broker1 is None else broker1 - broker0
                    results.append(
                        Round(
                            echo_rate,
                            echo_cpu,
                            reg_rate,
                            cpu1 - cpu0,
                            broker,
                            mqtt_rate,
                            mqtt_cpu,
                            floor_ms,
                        )
                    )
                    log(
                        f"round {r}: echo {echo_rate:.0f}/s, {transport} registration "
                        f"{reg_rate:.0f}/s"
                        + ("" if mqtt_rate is None else f", MQTT registration {mqtt_rate:.0f}/s")
                        + f", registrar CPU {(cpu1 - cpu0) * 1000 / n:.2f} ms per registration"
                    )
                await asyncio.sleep(1.0)  # idle before the latency series
                latencies: list[float] = []
                lat_out: list[Outcome] = []
                for p in idle:
                    o = await one(p, endpoint, args.timeout, None, transport)
                    lat_out.append(o)
                    if o.finished is not None:
                        latencies.append((o.finished - o.started) * 1000)
            finally:
                codes = [await p.stop() for p in reversed(registrars)]
            totals = await store_totals(location)

    roots = (site.root,)
    problems: dict[str, int] = {}
    failures = 0
    checked = [
        (p, o, transport)
        for p, o in zip(
            [*[p for load in loads for p in load], *idle], reg_out + lat_out, strict=True
        )
    ] + [(p, o, "mqtt") for p, o in zip([p for m in mqtt_loads for p in m], mqtt_out, strict=True)]
    for p, o, how in checked:
        problem = check(p, o, roots, how, site_ca)
        if problem is not None:
            failures += 1
            key = problem.split(":")[0]
            problems[key] = problems.get(key, 0) + 1
    held = len(checked) - failures
    if totals["devices"] != held or totals["certificates"] != held:
        log(f"the store holds {totals}, the devices hold {held} registrations")
        failures = max(failures, abs(totals["devices"] - held), abs(totals["certificates"] - held))
    latencies.sort()
    p99_index = max(0, round(0.99 * len(latencies)) - 1)
    reg_rate = _median([r.reg_rate for r in results])
    echo_rate = _median([r.echo_rate for r in results])
    brokers = [r.broker_cpu for r in results if r.broker_cpu is not None]
    mqtt_rates = [r.mqtt_rate for r in results if r.mqtt_rate is not None]
    mqtt_rate = _median(mqtt_rates) if mqtt_rates else None
    mqtt_cpus = [r.mqtt_cpu for r in results if r.mqtt_cpu is not None]
    return {
        "broker": tier.name,
        "transport": transport,
        "mqtt_registrations_per_s": round(mqtt_rate, 1) if mqtt_rate else None,
        "est_vs_mqtt": round(reg_rate / mqtt_rate, 3) if mqtt_rate and est else None,
        "mqtt_registrar_cpu_ms_per_registration": (
            round(_median(mqtt_cpus) * 1000 / n, 3) if mqtt_cpus else None
        ),
        "devices": n,
        "registrations_per_s": round(reg_rate, 1),
        "failures": failures,
        "baseline_echo_per_s": round(echo_rate, 1) if tier.has_echo else None,
        "ratio": round(echo_rate / reg_rate, 3) if reg_rate and tier.has_echo else None,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[p99_index], 2) if latencies else None,
        "registrar_cpu_ms_per_registration": round(
            _median([r.registrar_cpu for r in results]) * 1000 / n, 3
        ),
        # this machine's speed in the same run (see crypto_floor_ms), and the registrar's
        # CPU per registration in units of it
        "crypto_floor_ms": round(_median([r.floor_ms for r in results]), 3),
        "registrar_cpu_vs_floor": round(
            _median([r.registrar_cpu * 1000 / n / r.floor_ms for r in results]), 2
        ),
        "instances": k,
        "store": args.store,
        # medians over the rounds; per round below
        "rounds": rounds,
        "broker_cpu_ms_per_registration": (
            round(_median(brokers) * 1000 / n, 3) if brokers else None
        ),
        # the channel alone (echo responder: same MQTT client, subscriptions and workers)
        "echo_cpu_ms_per_request": round(_median([r.echo_cpu for r in results]) * 1000 / n, 3),
        "per_round": [
            {
                "registrations_per_s": round(r.reg_rate, 1),
                "baseline_echo_per_s": round(r.echo_rate, 1),
                "registrar_cpu_ms": round(r.registrar_cpu * 1000 / n, 3),
                "mqtt_registrations_per_s": None if r.mqtt_rate is None else round(r.mqtt_rate, 1),
            }
            for r in results
        ],
        "latency_samples": len(latencies),
        "echo_failures": echo_failures,
        "failure_kinds": problems,
        "store_totals": totals,
        "exit_codes": codes,
        "connecting": args.connecting,
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--broker", choices=sorted(BROKERS), default="mosquitto")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--transport",
        choices=["mqtt", "est"],
        default="mqtt",
        help="est: registrations through the EST listener (plus an MQTT wave per round for "
        "the comparison in the same run)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="echo and registration waves alternate this many times (fresh devices each "
        "registration wave); rates and CPU are the medians",
    )
    parser.add_argument("--latency-count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--connecting",
        type=int,
        default=64,
        help="TCP+TLS handshakes in flight at once (the brokers' listen backlog is 100)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on the last line only")
    args = parser.parse_args()
    if min(args.devices, args.instances, args.rounds) < 1:
        parser.error("--devices, --instances and --rounds must be at least 1")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
