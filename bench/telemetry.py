"""Telemetry throughput, plain versus AES-256-GCM payload envelopes, through a real broker.

    python bench/telemetry.py --json [--broker mosquitto]

Devices (LDevID certificates from the site CA, on the operational listener) publish QoS 1
messages on ``devices/<id>/telemetry``; one consumer (the registrar's service identity)
subscribes to ``devices/+/telemetry`` with QoS 1. A message counts when the consumer has it
(and, encrypted, has opened it with the key named by its key id). The same clients, topics,
plaintext size and QoS are used for both variants; the only difference is
``trustcore.payload.seal_payload`` on the device and ``open_payload`` at the consumer
(envelope: version, 8-byte key id, 12-byte nonce, ciphertext, 16-byte tag).

Progress on stderr; the LAST line of stdout is one JSON object: ``plain_msgs_per_s``,
``encrypted_msgs_per_s``, ``overhead_ratio`` = plain / encrypted (target <= 1.10). Each
variant runs ``--rounds`` times, alternating; the median of each is reported. The broker runs
in its own process (``bench/site_fixture.py serve``; Mosquitto is a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from registrar.broker import Endpoint
from trustcore.identity import DeviceId
from trustcore.payload import PayloadKey, open_payload, seal_payload
from trustcore.profiles import issue_secondary_certificate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_variant(
    devices: list[tuple[LeanMqtt, str]],
    consumer: LeanMqtt,
    key: PayloadKey,
    *,
    encrypted: bool,
    per_device: int,
    size: int,
    window: int,
) -> float:
    total = len(devices) * per_device
    received = 0
    opened_bad = 0
    done = asyncio.get_running_loop().create_future()
    keys = {key.key_id: key}

    def on_message(topic: str, payload: bytes) -> None:
        nonlocal received, opened_bad
        if encrypted:
            try:
                open_payload(keys, topic, payload)
            except Exception:
                opened_bad += 1
        received += 1
        if received == total and not done.done():
            done.set_result(None)

    consumer.on_message = on_message
    plaintext = os.urandom(size)

    async def publisher(client: LeanMqtt, topic: str) -> None:
        pending: set[asyncio.Future[None]] = set()
        for _ in range(per_device):
            data = seal_payload(key, topic, plaintext) if encrypted else plaintext
            fut = client.publish_nowait(topic, data, 1)
            pending.add(fut)
            fut.add_done_callback(pending.discard)
            if len(pending) >= window:
                await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
        if pending:
            await asyncio.gather(*pending)

    started = time.perf_counter()
    await asyncio.gather(*(publisher(c, t) for c, t in devices))
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - started
    consumer.on_message = None
    if opened_bad:
        raise RuntimeError(f"{opened_bad} envelopes did not open")
    return total / elapsed


async def run(args: argparse.Namespace) -> dict[str, object]:
    kind: BrokerKind = args.broker
    pki = build_site_pki()
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        files = write_site(pki, Path(tmp) / "site")
        contexts: list[tuple[str, object]] = []
        for i in range(args.devices):
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
            contexts.append((device.value, client_context(pki.root, pem, device_key)))
        site = await SiteProcess.start(files.directory, kind)
        try:
            ep: Endpoint = site.operational_endpoint
            consumer = await LeanMqtt.connect(
                ep.host,
                ep.port,
                client_context(pki.root, files.registrar_cert.read_bytes(), pki.registrar_key),
                "registrar@site",
            )
            await consumer.subscribe("devices/+/telemetry", 1)
            devices = []
            for name, ctx in contexts:
                client = await LeanMqtt.connect(ep.host, ep.port, ctx, name)  # type: ignore[arg-type]
                devices.append((client, f"devices/{name}/telemetry"))
            log(
                f"{kind}: {len(devices)} devices x {args.messages} messages of {args.size} B, QoS 1"
            )
            payload_key = pki.payload_key
            plain: list[float] = []
            encrypted: list[float] = []
            # Warm-up (not counted), then alternate.
            await run_variant(
                devices,
                consumer,
                payload_key,
                encrypted=False,
                per_device=max(1, args.messages // 10),
                size=args.size,
                window=args.window,
            )
            for r in range(args.rounds):
                for enc in (False, True) if r % 2 == 0 else (True, False):
                    rate = await run_variant(
                        devices,
                        consumer,
                        payload_key,
                        encrypted=enc,
                        per_device=args.messages,
                        size=args.size,
                        window=args.window,
                    )
                    (encrypted if enc else plain).append(rate)
                    log(f"  round {r + 1}: {'encrypted' if enc else 'plain'} {rate:.0f} msg/s")
            for client, _ in devices:
                await client.disconnect()
            await consumer.disconnect()
        finally:
            await site.close()
    p, e = statistics.median(plain), statistics.median(encrypted)
    return {
        "broker": kind,
        "devices": args.devices,
        "messages": args.devices * args.messages,
        "plaintext_bytes": args.size,
        "envelope_bytes": len(
            seal_payload(pki.payload_key, "devices/x/telemetry", b"x" * args.size)
        ),
        "plain_msgs_per_s": round(p, 1),
        "encrypted_msgs_per_s": round(e, 1),
        "overhead_ratio": round(p / e, 3),
        "plain_runs": [round(x) for x in plain],
        "encrypted_runs": [round(x) for x in encrypted],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--messages", type=int, default=500, help="per device per round")
    parser.add_argument("--size", type=int, default=200, help="plaintext bytes")
    parser.add_argument("--window", type=int, default=20, help="QoS 1 in flight per device")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
