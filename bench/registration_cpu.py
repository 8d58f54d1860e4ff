"""CPU per registration inside the registrar's service, with no broker in the way.

    python bench/registration_cpu.py --devices 1000 --json

Drives :meth:`registrar.service.RegistrationService.handle` (the code ``registrar run``
calls for every request) in-process over a real SQLite store with group commit, with N
fresh, prepared device requests in flight together (as the registrar's channel runs them).
``service_cpu_ms_per_registration`` is the process CPU time (every thread: the event loop
and the SQLite worker) spent during the wave, divided by N. Every response is checked:
a refusal counts as a failure.

The breakdown (``phases_us``) is profiler-free: each stage is timed by calling, request by
request, the same functions the service calls for that stage, on a separate set of requests
(medians in µs). ``pure_path_us`` is the median of parse_request + verify_request +
issue_registration for one request (the service's pure functions, end to end);
``store_and_async`` is what the wave cost beyond it: the store's look-up and group commit,
the event loop, the bookkeeping around the stages, and logging (set up as ``registrar run``
does it).

``baseline_ms`` is the bare cryptographic floor of one registration measured in the same
run with the same keys: 4 ECDSA verifications (station CA by the root, IDevID by the station
CA, request by the IDevID key, CSR self-signature), 2 ECDSA signatures (LDevID, response)
and one HPKE seal (ephemeral key, ECDH, AES-256-GCM). ``ratio`` = service / baseline.
Rounds repeat baseline and wave (fresh devices each time); reported figures are medians over
rounds. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.site_fixture import FactoryDevice, SitePki, build_site_pki
from registrar.cli_run import serving_gc
from registrar.service import RegistrationService
from registrar.store import Store
from signers.software import SoftwareKey
from trustcore import cbor
from trustcore import registration as reg
from trustcore.csr import build_device_csr, check_csr
from trustcore.keys import load_canonical_p256_spki, spki_der
from trustcore.profiles import issue_secondary_certificate, station_id_from_certificate

DER = serialization.Encoding.DER
ECDSA = ec.ECDSA(hashes.SHA256())


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Prepared:
    device: FactoryDevice
    request: bytes
    ldevid_key: SoftwareKey
    wrap_key: SoftwareKey


def prepare(pki: SitePki, count: int, start: int) -> list[Prepared]:
    """``count`` factory devices with a signed registration request each (device side)."""
    out: list[Prepared] = []
    chain = [pki.station_ca.public_bytes(DER)]
    for device in pki.factory_devices(count, prefix="cpu-", start=start):
        ldevid_key, wrap_key = SoftwareKey.generate(), SoftwareKey.generate()
        request = reg.build_request(
            device_id=device.device_id,
            nonce=os.urandom(32),
            time=int(pki.now.timestamp()),
            csr_der=build_device_csr(ldevid_key, device.device_id),
            wrap_key=wrap_key.public_key(),
            idevid_der=device.idevid.public_bytes(DER),
            chain_der=chain,
            factory_key=device.factory_key,
        )
        out.append(Prepared(device, request, ldevid_key, wrap_key))
    return out


# ------------------------------------------------------------------------------ baseline


def crypto_floor_ms(pki: SitePki, prepared: list[Prepared]) -> float:
    """CPU ms per registration of the bare cryptography, same keys, same data sizes."""
    root_pub = pki.root_key.public_key()
    station_pub = pki.station_key.public_key()
    site_key = pki.site_key
    payload = pki.payload_key.key
    items = []
    for p in prepared:
        parsed = reg.parse_request(p.request)
        csr = x509.load_der_x509_csr(parsed.csr_der)
        csr_pub = csr.public_key()
        assert isinstance(csr_pub, ec.EllipticCurvePublicKey)
        signed_input = cbor.encode([reg.REQUEST_DOMAIN, parsed.body])
        items.append((p, parsed, csr, csr_pub, p.device.idevid, signed_input))
    started = time.process_time()
    for p, parsed, csr, csr_pub, idevid, signed_input in items:
        sc = pki.station_ca
        root_pub.verify(sc.signature, sc.tbs_certificate_bytes, ECDSA)
        station_pub.verify(idevid.signature, idevid.tbs_certificate_bytes, ECDSA)
        p.device.factory_key.public_key().verify(parsed.signature, signed_input, ECDSA)
        csr_pub.verify(csr.signature, csr.tbs_certrequest_bytes, ECDSA)
        site_key.sign(idevid.tbs_certificate_bytes, ECDSA)  # an LDevID TBS is about this size
        site_key.sign(parsed.body, ECDSA)  # a response body is about a request body's size
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        ephemeral.exchange(ec.ECDH(), p.wrap_key.public_key())
        AESGCM(payload).encrypt(b"\0" * 12, payload, b"")
    return (time.process_time() - started) * 1000 / len(items)


# -------------------------------------------------------------------------------- phases


class _Laps:
    """Wall-clock laps of one thread (the stages are CPU-bound and run back to back)."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self._t = time.perf_counter_ns()

    def start(self) -> None:
        self._t = time.perf_counter_ns()

    def lap(self, name: str) -> None:
        t = time.perf_counter_ns()
        self.samples.setdefault(name, []).append((t - self._t) / 1000)
        self._t = t


def phase_breakdown(
    pki: SitePki, service: RegistrationService, prepared: list[Prepared]
) -> dict[str, float]:
    """Median µs per stage, each stage run with the service's own objects and functions."""
    verifier = service.verifier
    authority = service.issuing_authority()
    now = pki.now
    laps = _Laps()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in prepared:
            laps.start()
            request = reg.parse_request(p.request)
            laps.lap("request_parse")
            leaf = x509.load_der_x509_certificate(request.idevid_der)
            inter = verifier.load_intermediates(request.chain_der)
            identity = verifier.verify(leaf, now=now, intermediates=inter, require_device_id=True)
            laps.lap("chain_verification")
            idevid_key = identity.leaf_key
            assert isinstance(idevid_key, ec.EllipticCurvePublicKey)
            assert reg.envelope_signature_valid(
                idevid_key, request.signature, reg.REQUEST_DOMAIN, request.body
            )
            laps.lap("request_signature")
            station_id_from_certificate(identity.issuer)
            assert request.csr is not None and request.csr_spki is not None
            csr = check_csr(
                request.csr, expected_device_id=request.device_id, public_key=request.csr_key
            )
            assert request.csr_spki != spki_der(idevid_key)
            assert request.csr_key_id == hashlib.sha256(request.csr_spki).digest()
            wrap = load_canonical_p256_spki(request.wrap_key_der)
            assert wrap is not None
            laps.lap("csr_and_key_checks")
            cert = issue_secondary_certificate(
                authority.certificate,
                authority.signer.private_key(),
                csr.public_key,
                device_id=request.device_id,
                organization=authority.organization,
                not_before=now,
                not_after=now + service.policy.validity,
            )
            ldevid_der = cert.public_bytes(DER)
            laps.lap("ldevid_issuance")
            wrapped = reg.wrap_payload_key(service.payload_key, request.device_id, wrap)
            laps.lap("hpke_wrap")
            body = {
                "v": reg.PROTOCOL_VERSION,
                "status": "ok",
                "device_id": request.device_id.value,
                "nonce": request.nonce,
                "request": request.digest,
                "ldevid": ldevid_der,
                "site_ca": authority.der,
                "payload_key": wrapped,
            }
            reg.sign_envelope(reg.RESPONSE_DOMAIN, body, authority.signer)
            laps.lap("response")
        # The same request again through the service's own pure functions, end to end.
        for p in prepared:
            laps.start()
            request = reg.parse_request(p.request)
            verified = reg.verify_request(
                request,
                topic_device_id=request.device_id,
                verifier=verifier,
                admission=service.admission,
                now=now,
                nonce_seen=False,
                key_owner=None,
            )
            reg.issue_registration(
                verified,
                site_ca=authority.certificate,
                site_ca_der=authority.der,
                site_signer=authority.signer,
                organization=authority.organization,
                payload_key=service.payload_key,
                now=now,
                validity=service.policy.validity,
            )
            laps.lap("pure_path")
    return {name: round(statistics.median(v), 1) for name, v in laps.samples.items()}


# ---------------------------------------------------------------------------------- wave


async def wave(
    service: RegistrationService, prepared: list[Prepared], concurrency: int
) -> tuple[float, float, int]:
    """(CPU ms per registration, wall s, failures) for all of ``prepared`` at once."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(p: Prepared) -> None:
        nonlocal failures
        async with gate:
            response = await service.handle(p.device.device_id, p.request)
        if b"status\x62ok" not in response:
            failures += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(p) for p in prepared))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu * 1000 / len(prepared), wall, failures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n, rounds = args.devices, args.rounds
    pki = build_site_pki()
    log(f"preparing {n * rounds + args.phase_samples} devices and requests")
    batches = [prepare(pki, n, start=i * n) for i in range(rounds)]
    sampled = prepare(pki, args.phase_samples, start=rounds * n)
    with tempfile.TemporaryDirectory(prefix="devtrust-cpu-") as tmp:
        store = await Store.open(str(Path(tmp) / "registrar.db"))
        try:
            service = RegistrationService(
                store=store,
                verifier=pki.verifier(),
                admission=pki.admission(),
                site=pki.site_authority(),
                payload_key=pki.payload_key,
                clock=lambda: pki.now,
            )
            # Warm-up: first-use costs (CRL verification, imports) stay out of the figures.
            warm = prepare(pki, 20, start=10**6)
            await wave(service, warm, args.concurrency)
            serving_gc()  # as `registrar run` once it serves
            floors, services, walls, failures = [], [], [], 0
            for i, batch in enumerate(batches):
                floors.append(crypto_floor_ms(pki, batch))
                cpu_ms, wall, failed = await wave(service, batch, args.concurrency)
                services.append(cpu_ms)
                walls.append(wall)
                failures += failed
                log(
                    f"round {i + 1}: service {cpu_ms:.3f} ms/registration, floor "
                    f"{floors[-1]:.3f} ms, {n / wall:.0f} registrations/s, {failed} failed"
                )
            commits, writes = store.commits, store.writes
            phases = phase_breakdown(pki, service, sampled)
            registered = (await store.counts()).get("devices", 0)
        finally:
            await store.close()
    service_ms = statistics.median(services)
    baseline_ms = statistics.median(floors)
    pure = phases.pop("pure_path")
    phases["store_and_async"] = round(service_ms * 1000 - pure, 1)
    return {
        "devices": n,
        "rounds": rounds,
        "concurrency": args.concurrency,
        "failures": failures + (n * rounds + len(warm) - registered),
        "service_cpu_ms_per_registration": round(service_ms, 3),
        "service_cpu_ms_rounds": [round(x, 3) for x in services],
        "registrations_per_s": round(n / statistics.median(walls), 1),
        "baseline_ms": round(baseline_ms, 3),
        "baseline": "4 ECDSA verify + 2 ECDSA sign + 1 HPKE seal, same keys, same run",
        "ratio": round(service_ms / baseline_ms, 2),
        "phases_us": phases,
        "pure_path_us": pure,
        # group commit: writes (registrations, factory sightings) per SQLite transaction
        "store_writes_per_commit": round(writes / max(commits, 1), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--phase-samples", type=int, default=300)
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="the service's logging, configured as `registrar run` does (default info)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on the last line only")
    args = parser.parse_args()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
