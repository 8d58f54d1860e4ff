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
* ``instances``, ``store`` (``sqlite`` or ``postgres``; PostgreSQL: a database created on
  127.0.0.1:5432, or ``$DEVTRUST_BENCH_PG``, and dropped at the end).

Broker kinds are entries of :data:`BROKERS` (:class:`BrokerTier`): how to start the first
and the further registrar instances, and the echo baseline on that broker.
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from registrar.broker import Endpoint
from signers.software import SoftwareKey
from trustcore.payload import PayloadKey
from trustcore.registration import (
    RegistrationError,
    RegistrationGranted,
    open_payload_key,
    parse_request,
    parse_response,
)
from trustcore.topics import registration_request_topic, registration_response_topic

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
            )
        )
    return out


async def one(
    p: Prepared, endpoint: Endpoint, timeout: float, gate: asyncio.Semaphore | None = None
) -> Outcome:
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


async def wave(
    prepared: list[Prepared], endpoint: Endpoint, timeout: float, label: str, connecting: int
) -> tuple[float, list[Outcome]]:
    """Everyone at once, at most ``connecting`` TCP+TLS+CONNECT handshakes in flight;
    returns (per second, outcomes)."""
    gate = asyncio.Semaphore(connecting)
    done = 0
    total = len(prepared)

    async def tracked(p: Prepared) -> Outcome:
        nonlocal done
        result = await one(p, endpoint, timeout, gate)
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


def check(p: Prepared, outcome: Outcome, roots: tuple[object, ...]) -> str | None:
    """None if the device ends registered (verified response, payload key opens)."""
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


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


async def run(args: argparse.Namespace) -> dict[str, object]:
    tier = BROKERS[args.broker]
    n, lat_n, k, rounds = args.devices, args.latency_count, args.instances, args.rounds
    if k > tier.max_instances:
        raise SystemExit(f"--broker {tier.name} runs at most {tier.max_instances} instance(s)")
    if k > 1 and args.store != "postgres":
        raise SystemExit("several instances share one PostgreSQL store: add --store postgres")
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        site = build_commissioned_site(base / "world")
        devices = site.factory_devices(rounds * n + lat_n)
        log(f"site commissioned, {len(devices)} devices made in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        prepared = prepare(devices)
        log(f"keys, CSRs, signed requests, TLS contexts in {time.perf_counter() - t:.1f} s")
        loads = [prepared[r * n : (r + 1) * n] for r in range(rounds)]
        idle = prepared[rounds * n :]

        results: list[Round] = []
        reg_out: list[Outcome] = []
        echo_failures = 0
        # Both stay up for the whole run, each idle while the other is measured: an echo
        # wave and a registration wave alternate, so a noisy neighbour hits both alike.
        async with tier.echo(site, base) as echo, bench_store(args.store, site) as store:
            store_args, location = store
            registrars = await start_registrars(tier, site, k, store_args, base)
            try:
                endpoint = registrars[0].registration_endpoint
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
                    cpu0, broker0 = _cpu(registrars), _broker_cpu(registrars[0])
                    reg_rate, out = await wave(
                        load, endpoint, args.timeout, f"registration {r}/{rounds}", args.connecting
                    )
                    cpu1, broker1 = _cpu(registrars), _broker_cpu(registrars[0])
                    reg_out += out
                    broker = None if broker0 is None or broker1 is None else broker1 - broker0
                    results.append(Round(echo_rate, echo_cpu, reg_rate, cpu1 - cpu0, broker))
                    log(
                        f"round {r}: echo {echo_rate:.0f}/s, registration {reg_rate:.0f}/s, "
                        f"registrar CPU {(cpu1 - cpu0) * 1000 / n:.2f} ms per registration"
                    )
                await asyncio.sleep(1.0)  # idle before the latency series
                latencies: list[float] = []
                lat_out: list[Outcome] = []
                for p in idle:
                    o = await one(p, endpoint, args.timeout)
                    lat_out.append(o)
                    if o.finished is not None:
                        latencies.append((o.finished - o.started) * 1000)
            finally:
                codes = [await p.stop() for p in reversed(registrars)]
            totals = await store_totals(location)

    roots = (site.root,)
    problems: dict[str, int] = {}
    failures = 0
    for p, o in zip(prepared, reg_out + lat_out, strict=True):
        problem = check(p, o, roots)
        if problem is not None:
            failures += 1
            key = problem.split(":")[0]
            problems[key] = problems.get(key, 0) + 1
    held = len(prepared) - failures
    if totals["devices"] != held or totals["certificates"] != held:
        log(f"the store holds {totals}, the devices hold {held} registrations")
        failures = max(failures, abs(totals["devices"] - held), abs(totals["certificates"] - held))
    latencies.sort()
    p99_index = max(0, round(0.99 * len(latencies)) - 1)
    reg_rate = _median([r.reg_rate for r in results])
    echo_rate = _median([r.echo_rate for r in results])
    brokers = [r.broker_cpu for r in results if r.broker_cpu is not None]
    return {
        "broker": tier.name,
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
