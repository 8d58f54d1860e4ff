"""Registration throughput and latency through a real broker and the real registrar.

    python bench/registration.py --devices 1000 --broker mosquitto --json

Progress goes to stderr; the LAST line of stdout is one JSON object:

* ``registrations_per_s``: N software-key devices powered on at once, each doing a full
  registration (mTLS connect to the registration listener, subscribe to its response topic,
  signed request, verification, LDevID issuance, payload-key wrap, durable SQLite record with
  synchronous=FULL, signed response), N divided by the time from the first connect to the
  last response;
* ``failures``: devices that did not end registered: no response, a refusal, or a response
  that does not verify on the device side (every response is checked with the device's own
  ``parse_response`` and unwrapped with its ECDH key, after the clock stops), plus any
  mismatch with the registrar's own count of registered devices;
* ``baseline_echo_per_s``: the same devices and requests in the same run, the same
  connect/subscribe/publish/await-reply sequence, against a trivial responder (same MQTT
  library, subscription and QoS as the registrar) on the same broker; ``ratio`` =
  baseline_echo_per_s / registrations_per_s;
* ``p50_ms`` / ``p99_ms``: 100 further devices registering one after another on an idle
  system, each timed from its TCP connect to the verified-later response.

Set-up outside the clock, as on a real device: keys, CSRs and signed requests are made
before the device connects; TLS contexts are built beforehand. The registrar (and, for the
embedded broker, the broker) runs in its own process (``bench/site_fixture.py serve``);
Mosquitto is a third process. The clients are :mod:`bench.lean_mqtt` on one event loop.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lean_mqtt import LeanMqtt
from bench.site_fixture import (
    BrokerKind,
    FactoryDevice,
    SiteProcess,
    build_site_pki,
    write_site,
)
from device_sim.client import DeviceClient, SoftwareKeys
from registrar.broker import Endpoint
from signers.software import SoftwareKey
from trustcore.registration import (
    RegistrationError,
    RegistrationGranted,
    open_payload_key,
    parse_request,
    parse_response,
)
from trustcore.topics import registration_request_topic, registration_response_topic


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


def check(p: Prepared, outcome: Outcome, roots: tuple[object, ...]) -> str | None:
    """None if the device ends registered (verified response, payload key opens)."""
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
    open_payload_key(p.wrap_key, p.device.device_id, result.payload_key)
    return None


def _delta(before: dict[str, object], after: dict[str, object], key: str) -> float:
    a, b = after.get(key), before.get(key)
    return float(a) - float(b) if isinstance(a, int | float) and isinstance(b, int | float) else 0.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    kind: BrokerKind = args.broker
    n, lat_n = args.devices, args.latency_count
    with tempfile.TemporaryDirectory(prefix="bench-registration-") as tmp:
        t = time.perf_counter()
        pki = build_site_pki()
        files = write_site(pki, Path(tmp) / "site")
        devices = pki.factory_devices(n + lat_n)
        log(f"factory: {n + lat_n} devices in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        prepared = prepare(devices)
        log(
            "devices made keys, CSRs, signed requests and TLS contexts in "
            f"{time.perf_counter() - t:.1f} s"
        )
        load, idle = prepared[:n], prepared[n:]
        site = await SiteProcess.start(files.directory, kind)
        try:
            endpoint = site.registration_endpoint
            log(f"site process {site.pid} ({kind}): registration listener {endpoint.port}")

            await site.command("echo")
            log(f"baseline: {n} devices, echo responder")
            echo_rate, echo_out = await wave(load, endpoint, args.timeout, "echo", args.connecting)
            echo_failures = sum(o.response is None for o in echo_out)
            await site.command("stop-responder")
            await asyncio.sleep(0.5)

            before = await site.command("registrar")
            log(f"registration: {n} devices")
            cpu = time.process_time()
            reg_rate, reg_out = await wave(
                load, endpoint, args.timeout, "registration", args.connecting
            )
            client_cpu = time.process_time() - cpu
            after = await site.command("stats")
            cpu_site = _delta(before, after, "cpu_s")
            cpu_broker = _delta(before, after, "broker_cpu_s")
            log(
                f"CPU during the registration wave: clients {client_cpu:.2f} s, "
                f"site process {cpu_site:.2f} s, mosquitto process {cpu_broker:.2f} s"
            )
            await asyncio.sleep(1.0)  # idle before the latency series

            latencies: list[float] = []
            lat_out: list[Outcome] = []
            for p in idle:
                o = await one(p, endpoint, args.timeout)
                lat_out.append(o)
                if o.finished is not None:
                    latencies.append((o.finished - o.started) * 1000)
            stats = await site.command("stats")
        finally:
            await site.close()

    roots = (pki.root,)
    problems: dict[str, int] = {}
    failures = 0
    for p, o in zip(prepared, reg_out + lat_out, strict=True):
        problem = check(p, o, roots)
        if problem is not None:
            failures += 1
            key = problem.split(":")[0]
            problems[key] = problems.get(key, 0) + 1
    store = stats.get("store") if isinstance(stats.get("store"), dict) else {}
    registered = int(store.get("devices", -1)) if isinstance(store, dict) else -1
    if registered != n + lat_n - failures:
        log(f"registrar counts {registered} devices, devices count {n + lat_n - failures}")
        failures = max(failures, n + lat_n - registered)
    latencies.sort()
    p99_index = max(0, round(0.99 * len(latencies)) - 1)
    result: dict[str, object] = {
        "broker": kind,
        "devices": n,
        "registrations_per_s": round(reg_rate, 1),
        "failures": failures,
        "baseline_echo_per_s": round(echo_rate, 1),
        "ratio": round(echo_rate / reg_rate, 3) if reg_rate else None,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(latencies[p99_index], 2) if latencies else None,
        "latency_samples": len(latencies),
        "echo_failures": echo_failures,
        "failure_kinds": problems,
        "registrar": stats,
        "connecting": args.connecting,
        "cpus": os.cpu_count(),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
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
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
