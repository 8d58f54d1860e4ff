"""TLS handshake cost with the device's key in a swtpm versus a software key.

Usage: ``python bench/tpm_tls.py [--broker mosquitto|embedded] [-n 200]`` — prints one JSON
object. For each TLS version and key kind it measures, against the broker's operational
listener (``CERT_REQUIRED``, CRL checked):

* ``context_ms``: building the client ``SSLContext`` (``TlsIdentity.context``: the TPM
  binding of :mod:`signers.tpm_tls`, or the encrypted key file of
  :func:`signers.software.load_ssl_identity`);
* ``handshake_ms``: TCP connect + full TLS handshake (client side complete);
* ``connack_ms``: the same plus an MQTT 3.1.1 CONNECT answered by CONNACK (under TLS 1.3
  the broker checks the client certificate after the client's handshake ends: only this
  figure includes that).

Medians and 90th percentiles over ``n`` fresh connections (a new context each time, as a
device reconnecting does); one TPM2_Sign per TPM handshake. The swtpm runs on the same
cores as the broker and the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.site_fixture import SITE_OPERATOR, build_site_pki, make_broker, write_site
from device_sim.client import TlsIdentity
from device_sim.swtpm import Swtpm
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey, TpmKeyUsage
from trustcore.endpoint import Endpoint
from trustcore.identity import DeviceId
from trustcore.keys import Signer
from trustcore.profiles import issue_secondary_certificate

DEVICE = DeviceId("dev-tls-000001")
#: MQTT 3.1.1 CONNECT, clean session, keepalive 60, client id = DEVICE
_ID = DEVICE.value.encode()
CONNECT = (
    bytes([0x10, 12 + len(_ID)])
    + b"\x00\x04MQTT\x04\x02\x00\x3c"
    + len(_ID).to_bytes(2, "big")
    + _ID
)
CONNACK_OK = b"\x20\x02\x00\x00"


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered) * 1000, 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
    }


async def measure(
    endpoint: Endpoint,
    contexts: Mapping[str, Callable[[], ssl.SSLContext]],
    *,
    n: int,
    versions: Sequence[ssl.TLSVersion] = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"<version> <kind>": {"context_ms", "handshake_ms", "connack_ms"}}``; raises if a
    connection is not accepted (CONNACK 0)."""
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for version in versions:
        # Kinds alternate connection by connection, so a change in machine load hits both.
        for _ in range(n):
            for kind, make in contexts.items():
                t0 = time.perf_counter()
                ctx = make()
                ctx.minimum_version = ctx.maximum_version = version
                t1 = time.perf_counter()
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=ctx
                )
                t2 = time.perf_counter()
                try:
                    writer.write(CONNECT)
                    await writer.drain()
                    answer = await asyncio.wait_for(reader.readexactly(4), 5)
                    t3 = time.perf_counter()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await writer.wait_closed()
                if answer != CONNACK_OK:
                    raise RuntimeError(f"{kind} over {version.name}: CONNACK {answer.hex()}")
                built, shaken, acked = samples.setdefault(f"{version.name} {kind}", ([], [], []))
                built.append(t1 - t0)
                shaken.append(t2 - t1)
                acked.append(t3 - t1)
    return {
        name: {"context_ms": _stats(b), "handshake_ms": _stats(h), "connack_ms": _stats(a)}
        for name, (b, h, a) in samples.items()
    }


async def run(broker_kind: str, n: int) -> dict[str, Any]:
    pki = build_site_pki()
    with tempfile.TemporaryDirectory(prefix="bench-tpm-tls-") as tmp:
        files = write_site(pki, Path(tmp) / "site")
        swtpm = Swtpm(Path(tmp) / "tpm").start()
        tpm = Tpm(swtpm.tcti)
        broker = make_broker(broker_kind, files.broker)  # type: ignore[arg-type]
        await broker.start()
        try:
            root_pem = files.root.read_bytes()
            identities: dict[str, TlsIdentity] = {}
            keys: dict[str, Signer] = {
                "tpm": TpmKey.create(tpm, TpmKeyUsage.SIGN),
                "software": SoftwareKey.generate(),
            }
            for kind, key in keys.items():
                cert = issue_secondary_certificate(
                    pki.site_ca,
                    pki.site_key,
                    key.public_key(),
                    device_id=DEVICE,
                    organization=SITE_OPERATOR,
                    not_before=pki.now,
                    not_after=pki.now + (pki.site_ca.not_valid_after_utc - pki.now) / 2,
                )
                identities[kind] = TlsIdentity.from_signer((cert, pki.site_ca), key)
            contexts = {k: partial(i.context, root_pem) for k, i in identities.items()}
            figures = await measure(broker.operational_endpoint, contexts, n=n)
        finally:
            await broker.stop()
            tpm.close()
            swtpm.stop()
    return {"broker": broker_kind, "n": n, "openssl": ssl.OPENSSL_VERSION, "results": figures}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("-n", type=int, default=200, help="connections per version and key")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.broker, args.n)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
