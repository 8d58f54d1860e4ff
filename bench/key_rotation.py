"""Benchmark: the registrar's side of a payload-key rotation for N registered devices.

    python bench/key_rotation.py --devices 5000 --json

Fills a real SQLite store (``registrar.store.Store``, WAL, ``synchronous=FULL``) with N
registered devices, each with its own P-256 wrap key (not timed), then times the code
``registrar run`` runs, through :class:`registrar.key_distribution.KeyDistributor`:

* ``push``: one update per device (HPKE wrap to the device key, ECDSA signature by the site
  CA key, the offer recorded durably); ``publish`` is the seam to the broker and only
  collects the messages here, so the figure is the registrar's own cost;
* ``acks``: every device's acknowledgement verified (``ack_received``: one AES-GCM open)
  and recorded (background confirmation through the store's group commit);
* ``status``: one ``rows()`` (per-key device counts), as written to status.json every 0.5 s.

Progress goes to stderr; the JSON object is the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registrar.key_distribution import KeyDistributor
from registrar.payload_keys import PayloadKeyring
from registrar.store import Registration, Store
from signers.software import SoftwareKey
from trustcore.identity import CertSerial, DeviceId, StationId
from trustcore.key_rotation import build_key_ack
from trustcore.payload import PayloadKey
from trustcore.registration import open_payload_key, parse_key_update


async def run(devices: int, directory: Path) -> dict[str, float | int]:
    store = await Store.open(directory / "registrar.db")
    site = SoftwareKey.ephemeral()
    old, new = PayloadKey.generate(), PayloadKey.generate()
    wrap_keys = [SoftwareKey.ephemeral() for _ in range(devices)]
    ids = [DeviceId(f"dev-{i:06d}") for i in range(devices)]
    now = int(time.time())
    await asyncio.gather(
        *(
            store.record_registration(
                Registration(
                    device_id=dev,
                    station_id=StationId("station-01"),
                    idevid_serial=CertSerial(i + 1),
                    ldevid_serial=CertSerial(i + 2),
                    ldevid_der=b"",
                    ldevid_key_id=os.urandom(32),
                    wrap_key_der=wrap.public_key().public_bytes(
                        serialization.Encoding.DER,
                        serialization.PublicFormat.SubjectPublicKeyInfo,
                    ),
                    payload_key_id=old.key_id,
                    request_digest=os.urandom(32),
                    response=b"",
                    nonce=os.urandom(32),
                    request_time=now,
                    at=now,
                )
            )
            for i, (dev, wrap) in enumerate(zip(ids, wrap_keys, strict=True))
        )
    )
    print(f"{devices} devices registered", file=sys.stderr)
    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, message: bytes) -> None:
        published.append((topic, message))

    keys = KeyDistributor(
        store=store,
        signer_for=lambda _record: site,
        publish=publish,
        clock=lambda: datetime.now(UTC),
        grace_s=7 * 86400,
    )
    await keys.start(PayloadKeyring(old, {old.key_id: old}))
    await keys.use_keyring(PayloadKeyring(new, {old.key_id: old, new.key_id: new}))
    start = time.perf_counter()
    sent = await keys.push_pending()
    push_s = time.perf_counter() - start
    assert sent == devices == len(published)
    # the devices' side (not timed): verify and unwrap the update, then acknowledge it
    site_ca = _self_signed(site)
    acks = []
    for dev, wrap, (_topic, message) in zip(ids, wrap_keys, published, strict=True):
        update = parse_key_update(message, device_id=dev, site_ca=site_ca, newer_than=0)
        key = open_payload_key(wrap, dev, update.payload_key)
        acks.append((dev, build_key_ack(key, dev, update.issued)))
    start = time.perf_counter()
    for dev, ack in acks:
        assert keys.ack_received(dev, ack)
    await keys.wait_idle()
    acks_s = time.perf_counter() - start
    start = time.perf_counter()
    rows = await keys.rows()
    rows_s = time.perf_counter() - start
    on_new = next(r["devices"] for r in rows if r["key_id"] == new.key_id.hex())
    assert on_new == devices, rows
    await store.close()
    return {
        "devices": devices,
        "push_seconds": round(push_s, 3),
        "updates_per_s": round(devices / push_s),
        "acks_seconds": round(acks_s, 3),
        "acks_per_s": round(devices / acks_s),
        "status_rows_ms": round(rows_s * 1000, 1),
    }


def _self_signed(key: SoftwareKey) -> x509.Certificate:
    """A substitute site CA certificate for the devices to verify updates with."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench site CA")])
    moment = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(moment - timedelta(days=1))
        .not_valid_after(moment + timedelta(days=1))
        .sign(key.private_key(), hashes.SHA256())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args.devices, Path(tmp)))
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
