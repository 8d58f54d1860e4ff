"""Telemetry throughput, plain versus AES-256-GCM payload envelopes, through a real broker.

    python bench/telemetry.py --json [--broker mosquitto]

Devices (LDevID certificates from the site CA, on the operational listener) publish QoS 1
messages on ``devices/<id>/telemetry``; one consumer (the registrar's service identity)
subscribes to ``devices/+/telemetry`` with QoS 1. A message counts when the consumer has it
(and, encrypted, has opened it with the key named by its key id). The same clients, topics,
plaintext size and QoS are used for both variants; the only difference is
``trustcore.payload.seal_payload`` on the device and ``open_payload`` at the consumer
(envelope: version, 8-byte key id, 12-byte nonce, ciphertext, 16-byte tag).

Processes, as in a building: the broker is one process (``bench/site_fixture.py serve``, or
Mosquitto); the devices' clients run in a publisher process (``--publisher-procs`` of them,
devices split between them); the consumer runs in a process of its own, as the registrar
does. So sealing is paid where devices pay it and opening where the registrar pays it, rather
than one process doing the work of both sides. All clients connect once and are reused by
every round of both variants.

A round: the consumer is armed with the expected count, then the publishers start; the rate
is messages / (consumer's last message - publishers' first publish), both read from
``time.monotonic`` (one system-wide clock). Each variant runs ``--rounds`` times, plain and
encrypted alternating (and which goes first alternates too), after one unrecorded warm-up
round of each; the median of each is reported.

Progress on stderr; the LAST line of stdout is one JSON object: ``plain_msgs_per_s``,
``encrypted_msgs_per_s``, ``overhead_ratio`` = plain / encrypted (target <= 1.10).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from bench.lean_mqtt import LeanMqtt
from bench.site_fixture import (
    SITE_OPERATOR,
    BrokerKind,
    SiteProcess,
    build_site_pki,
    client_context,
    write_site,
)
from trustcore.identity import DeviceId
from trustcore.payload import PayloadKey, open_payload, seal_payload
from trustcore.profiles import issue_secondary_certificate
from trustcore.topics import TELEMETRY_LEVEL, device_topic, every_device_filter

TOPIC_FILTER = every_device_filter(TELEMETRY_LEVEL)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Identity:
    """What a child process needs to build one client's TLS context (picklable)."""

    client_id: str
    cert_pem: bytes
    key_der: bytes


@dataclass(frozen=True)
class Setup:
    host: str
    port: int
    root_pem: bytes
    key_id: bytes
    key: bytes


def _context(setup: Setup, ident: Identity) -> Any:
    key = serialization.load_der_private_key(ident.key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return client_context(x509.load_pem_x509_certificate(setup.root_pem), ident.cert_pem, key)


async def _recv(conn: Connection) -> Any:
    return await asyncio.to_thread(conn.recv)


# ----------------------------------------------------------------------------- consumer


async def _consume_round(
    client: LeanMqtt, keys: dict[bytes, PayloadKey], *, encrypted: bool, total: int
) -> tuple[float, int]:
    """Count ``total`` messages (opening each when encrypted); the time of the last, and how
    many did not open."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    received = bad = 0

    def on_encrypted(topic: str, payload: bytes) -> None:
        nonlocal received, bad
        try:
            open_payload(keys, topic, payload)
        except Exception:
            bad += 1
        received += 1
        if received == total and not done.done():
            done.set_result(time.monotonic())

    def on_plain(topic: str, payload: bytes) -> None:
        nonlocal received
        received += 1
        if received == total and not done.done():
            done.set_result(time.monotonic())

    client.on_message = on_encrypted if encrypted else on_plain
    try:
        last = await asyncio.wait_for(done, 120)
    finally:
        client.on_message = None
    return last, bad


async def _consumer(setup: Setup, ident: Identity, conn: Connection) -> None:
    client = await LeanMqtt.connect(setup.host, setup.port, _context(setup, ident), ident.client_id)
    await client.subscribe(TOPIC_FILTER, 1)
    keys = {setup.key_id: PayloadKey(setup.key_id, setup.key)}
    conn.send("ready")
    while True:
        command = await _recv(conn)
        if command[0] == "stop":
            break
        _, encrypted, total = command
        cpu = time.process_time()
        counting = asyncio.create_task(
            _consume_round(client, keys, encrypted=encrypted, total=total)
        )
        await asyncio.sleep(0)  # the handler is installed before the publishers are told to go
        conn.send("armed")
        last, bad = await counting
        conn.send(("received", last, bad, time.process_time() - cpu))
    await client.disconnect()


# ---------------------------------------------------------------------------- publishers


async def _publish(
    client: LeanMqtt,
    topic: str,
    key: PayloadKey,
    plaintext: bytes,
    *,
    encrypted: bool,
    count: int,
    window: int,
) -> None:
    pending: set[asyncio.Future[None]] = set()
    for _ in range(count):
        data = seal_payload(key, topic, plaintext) if encrypted else plaintext
        fut = client.publish_nowait(topic, data, 1)
        pending.add(fut)
        fut.add_done_callback(pending.discard)
        if len(pending) >= window:
            await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
    if pending:
        await asyncio.gather(*pending)


async def _publishers(
    setup: Setup, idents: list[Identity], size: int, window: int, conn: Connection
) -> None:
    devices = []
    for ident in idents:
        client = await LeanMqtt.connect(
            setup.host, setup.port, _context(setup, ident), ident.client_id
        )
        devices.append((client, device_topic(DeviceId(ident.client_id), TELEMETRY_LEVEL)))
    key = PayloadKey(setup.key_id, setup.key)
    plaintext = os.urandom(size)
    conn.send("ready")
    while True:
        command = await _recv(conn)
        if command[0] == "stop":
            break
        _, encrypted, count = command
        cpu = time.process_time()
        started = time.monotonic()
        await asyncio.gather(
            *(
                _publish(c, t, key, plaintext, encrypted=encrypted, count=count, window=window)
                for c, t in devices
            )
        )
        conn.send(("sent", started, time.process_time() - cpu))
    for client, _ in devices:
        await client.disconnect()


def _consumer_process(conn: Connection, setup: Setup, ident: Identity) -> None:
    try:
        asyncio.run(_consumer(setup, ident, conn))
    except BaseException as exc:
        conn.send(("error", f"consumer: {exc!r}"))
        raise


def _publisher_process(
    conn: Connection, setup: Setup, idents: list[Identity], size: int, window: int
) -> None:
    try:
        asyncio.run(_publishers(setup, idents, size, window, conn))
    except BaseException as exc:
        conn.send(("error", f"publishers: {exc!r}"))
        raise


def _expect(conn: Connection, timeout: float = 180) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError("a bench process did not answer in time")
    answer = conn.recv()
    if isinstance(answer, tuple) and answer[0] == "error":
        raise RuntimeError(answer[1])
    return answer


# ---------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Round:
    rate: float  # messages per second, first publish to last message consumed
    publisher_cpu_us: float  # CPU per message, all publisher processes together
    consumer_cpu_us: float  # CPU per message in the consumer process


def _round(
    consumer: Connection,
    publishers: list[Connection],
    *,
    encrypted: bool,
    per_device: int,
    total: int,
) -> Round:
    consumer.send(("arm", encrypted, total))
    if _expect(consumer) != "armed":
        raise RuntimeError("the consumer did not arm")
    for conn in publishers:
        conn.send(("run", encrypted, per_device))
    sent = [_expect(conn) for conn in publishers]
    _, last, bad, consumer_cpu = _expect(consumer)
    if bad:
        raise RuntimeError(f"{bad} envelopes did not open")
    return Round(
        total / (last - min(start for _, start, _ in sent)),
        sum(cpu for _, _, cpu in sent) / total * 1e6,
        consumer_cpu / total * 1e6,
    )


def _identities(count: int) -> tuple[Any, list[Identity], Identity]:
    pki = build_site_pki()
    idents = []
    for i in range(count):
        device = DeviceId(f"dev-{i:06d}")
        device_key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            device_key.public_key(),
            device_id=device,
            organization=SITE_OPERATOR,
            not_before=pki.now - timedelta(days=1),
            not_after=pki.now + timedelta(days=30),
        )
        pem = cert.public_bytes(Encoding.PEM) + pki.site_ca.public_bytes(Encoding.PEM)
        idents.append(Identity(device.value, pem, _der(device_key)))
    return pki, idents, Identity("registrar@site", b"", _der(pki.registrar_key))


def _der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def run(args: argparse.Namespace) -> dict[str, object]:
    kind: BrokerKind = args.broker
    pki, idents, registrar = _identities(args.devices)
    mp = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        files = write_site(pki, Path(tmp) / "site")
        registrar = Identity(
            registrar.client_id, files.registrar_cert.read_bytes(), registrar.key_der
        )
        runner = asyncio.Runner()  # one loop for the site process's whole life
        site = runner.run(SiteProcess.start(files.directory, kind))
        procs: list[Any] = []
        try:
            ep = site.operational_endpoint
            setup = Setup(
                ep.host,
                ep.port,
                pki.root.public_bytes(Encoding.PEM),
                pki.payload_key.key_id,
                pki.payload_key.key,
            )
            consumer, child = mp.Pipe()
            procs.append(mp.Process(target=_consumer_process, args=(child, setup, registrar)))
            procs[-1].start()
            _expect(consumer)
            n = max(1, min(args.publisher_procs, len(idents)))
            publishers = []
            for i in range(n):
                parent, child = mp.Pipe()
                share = idents[i::n]
                procs.append(
                    mp.Process(
                        target=_publisher_process,
                        args=(child, setup, share, args.size, args.window),
                    )
                )
                procs[-1].start()
                publishers.append(parent)
            for conn in publishers:
                _expect(conn)
            log(
                f"{kind}: {len(idents)} devices ({n} publisher process(es)) x {args.messages}"
                f" messages of {args.size} B, QoS 1; consumer in its own process"
            )
            total = len(idents) * args.messages
            warm = max(1, args.messages // 10)
            for enc in (False, True):
                _round(
                    consumer, publishers, encrypted=enc, per_device=warm, total=warm * len(idents)
                )
            plain: list[Round] = []
            encrypted: list[Round] = []
            for r in range(args.rounds):
                for enc in (False, True) if r % 2 == 0 else (True, False):
                    result = _round(
                        consumer, publishers, encrypted=enc, per_device=args.messages, total=total
                    )
                    (encrypted if enc else plain).append(result)
                    log(
                        f"  round {r + 1}: {'encrypted' if enc else 'plain':9} "
                        f"{result.rate:6.0f} msg/s; CPU per message: publishers "
                        f"{result.publisher_cpu_us:.1f} us, "
                        f"consumer {result.consumer_cpu_us:.1f} us"
                    )
            for conn in (consumer, *publishers):
                conn.send(("stop",))
            for proc in procs:
                proc.join(30)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(10)
            runner.run(site.close())
            runner.close()
    p = statistics.median(x.rate for x in plain)
    e = statistics.median(x.rate for x in encrypted)

    def cpu(rounds: list[Round]) -> dict[str, float]:
        return {
            "publishers": round(statistics.median(x.publisher_cpu_us for x in rounds), 2),
            "consumer": round(statistics.median(x.consumer_cpu_us for x in rounds), 2),
        }

    return {
        "broker": kind,
        "devices": args.devices,
        "publisher_procs": n,
        "messages": total,
        "plaintext_bytes": args.size,
        "envelope_bytes": len(
            seal_payload(
                pki.payload_key, device_topic(DeviceId("x"), TELEMETRY_LEVEL), b"x" * args.size
            )
        ),
        "plain_msgs_per_s": round(p, 1),
        "encrypted_msgs_per_s": round(e, 1),
        "overhead_ratio": round(p / e, 3),
        "plain_runs": [round(x.rate) for x in plain],
        "encrypted_runs": [round(x.rate) for x in encrypted],
        "cpu_us_per_msg": {"plain": cpu(plain), "encrypted": cpu(encrypted)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--messages", type=int, default=500, help="per device per round")
    parser.add_argument("--size", type=int, default=200, help="plaintext bytes")
    parser.add_argument("--window", type=int, default=20, help="QoS 1 in flight per device")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--publisher-procs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
