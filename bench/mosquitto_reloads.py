"""Mosquitto's memory against the number of CRL reloads (SIGHUP), with N sessions held.

    python bench/mosquitto_reloads.py --sessions 200 --reloads 100

One :class:`registrar.broker.mosquitto.MosquittoBroker` on loopback (the test PKI of
``tests/fixtures/pki``), ``--sessions`` LDevID sessions on the operational listener, then
two phases of ``--reloads`` reloads each, every one with a new site CRL (so that the reload
really happens; it lists ``--crl-entries`` serials, as superseded LDevIDs pile up on a real
site), RSS (``VmRSS``) of the Mosquitto process read from ``/proc`` before and
after each phase:

* **held**: the sessions stay connected, nobody reconnects;
* **churn**: after each reload one session (round robin) reconnects, as a device does after
  an LDevID renewal (each renewal supersedes its old LDevID: a new CRL and a reload).

Prints one JSON object: RSS per phase and KB per reload. A development script (it imports
the test PKI), not part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registrar.broker.mosquitto import MosquittoBroker
from registrar.mqtt_session import MqttSession
from tests.fixtures.mosquitto_site import build_site
from tests.fixtures.pki import DAY, SITE_OPERATOR, pem, shared_pki
from trustcore.crl import RevokedEntry, build_crl
from trustcore.identity import CertSerial, DeviceId
from trustcore.profiles import issue_secondary_certificate


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def client_contexts(d: Path, count: int) -> list[tuple[str, ssl.SSLContext]]:
    pki = shared_pki()
    out = []
    for n in range(count):
        name = f"rl-{n:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            key.public_key(),
            device_id=DeviceId(name),
            organization=SITE_OPERATOR,
            not_before=pki.now - DAY,
            not_after=pki.now + 30 * DAY,
        )
        (d / f"{name}.pem").write_bytes(pem(cert))
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx = ssl.create_default_context(cafile=d / "root.pem")
        ctx.load_cert_chain(d / f"{name}.pem", d / f"{name}.key")
        out.append((name, ctx))
    return out


async def main(args: argparse.Namespace) -> dict[str, object]:
    pki = shared_pki()
    with tempfile.TemporaryDirectory(prefix="mosq-reloads-") as tmp:
        d = Path(tmp)
        site = build_site(pki, d)
        number = 1

        revoked = [
            RevokedEntry(CertSerial(1000 + n), pki.now - DAY, x509.ReasonFlags.superseded)
            for n in range(args.crl_entries)
        ]

        def new_crl() -> None:
            nonlocal number
            number += 1
            site_crl = build_crl(
                pki.site_ca,
                pki.site_key,
                revoked=revoked,
                crl_number=number,
                this_update=pki.now - timedelta(hours=1),
                next_update=pki.now + 7 * DAY,
            )
            crls = (pki.root_crl, pki.station_crl, site_crl)
            site.settings.tls.crl_file.write_bytes(b"".join(pem(c) for c in crls))

        new_crl()
        clients = client_contexts(d, args.sessions)
        broker = MosquittoBroker(site.settings, log_acl_denials=False)
        await broker.start()
        op = broker.operational_endpoint
        sessions: list[MqttSession] = []
        try:
            for name, ctx in clients:
                sessions.append(
                    await MqttSession.open(op.host, op.port, tls=ctx, client_id=name, keepalive=600)
                )
            pid = broker.pid
            assert pid is not None
            result: dict[str, object] = {
                "sessions": len(sessions),
                "reloads": args.reloads,
                "crl_entries": args.crl_entries,
            }
            for phase in ("held", "churn"):
                before = rss_kb(pid)
                started = time.monotonic()
                for k in range(args.reloads):
                    new_crl()
                    await broker.reload_crls()
                    if phase == "churn":
                        i = k % len(sessions)
                        sessions[i].abort()
                        name, ctx = clients[i]
                        sessions[i] = await MqttSession.open(
                            op.host, op.port, tls=ctx, client_id=name, keepalive=600
                        )
                after = rss_kb(pid)
                result[phase] = {
                    "rss_before_mb": round(before / 1024, 1),
                    "rss_after_mb": round(after / 1024, 1),
                    "kb_per_reload": round((after - before) / args.reloads, 1),
                    "seconds": round(time.monotonic() - started, 1),
                }
                print(phase, result[phase], file=sys.stderr)
            return result
        finally:
            for s in sessions:
                s.abort()
            await broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--reloads", type=int, default=100)
    parser.add_argument("--crl-entries", type=int, default=0, help="serials on the site CRL")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
