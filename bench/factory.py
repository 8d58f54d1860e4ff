"""Factory provisioning throughput, with one swtpm per device and one for the station.

    python bench/factory.py --devices 200 --workers 3 --json

Prints progress on stderr and one JSON object on the last line of stdout:

* ``devices_per_s``: full provisioning (policy, CSR check, TPM attestation, counter,
  certificate signed in the station TPM, audit record, two SQLite commits with
  synchronous=FULL, certificate written to the device directory), swtpm start-up excluded;
* ``swtpm_startup_s`` / ``swtpm_startup_ms_per_device``: what was excluded (device TPMs
  powered on in parallel before the clock starts);
* ``tpm_only_per_s``: the same TPM commands one provisioning issues (device: storage
  primary + TPM2_CreateLoaded of the key, TPM2_Sign of the CSR, EK certificate read +
  persistent-EK check + AK derivation, TPM2_Certify + TPM2_ActivateCredential with the
  P-384 EK; station: two TPM2_ReadClock (trusted time, at the pre-check and at issue), NV
  increment + read, TPM2_Sign of the certificate) on fresh device
  TPMs connected exactly as in the full run (connection made at power-on, outside the
  clock), called bare in the same thread-pool shape, expressed as provisionings per second;
* ``overhead_ratio`` = tpm_only_per_s / devices_per_s: the cost of everything that is not
  the TPM;
* ``station_cpu_ms_per_device``: CPU time of this process (user + system, all its threads;
  ``time.process_time``, which never counts child processes) during the full provisioning,
  per provisioned device. The station runs in this process and every TPM, the station's
  and the devices', is a separate swtpm child process, so this is the station's own cost:
  its Python, SQLite, ``cryptography`` and the TSS client library (marshalling, the ESYS
  crypto) for the station's commands and for the device commands it drives;
* ``device_client_cpu_ms_per_device``: the part of it spent inside the device's side of the
  protocol (``DeviceEndpoint`` calls: the device's TSS client creating its key, building its
  CSR, reading its EK certificate, answering the challenge, writing its files), measured as
  the CPU time of the worker thread during each call (``time.thread_time``); on a real line
  each device runs that on its own processor;
* ``station_own_cpu_ms_per_device`` = the difference: what the station itself spends.

Device TPMs are copies of one template state with an EK certificate (``swtpm_setup`` takes
about 0.6 s per TPM; copies share the template's EK, which changes nothing in the cost).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.device import (
    SimDevice,
    create_fleet,
    power_off_all,
    power_on_all,
    vendor_ca_pem,
)
from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.attestation import AttestationVerifier
from factory_station.provision import provision_batch
from factory_station.station import FactoryStation
from signers.attestation import TpmAttestor
from signers.software import SoftwareKey
from signers.tpm import Tpm, TpmKey, TpmKeyUsage, TpmNvCounter
from trustcore.csr import build_device_csr
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy
from trustcore.identity import DeviceId, StationId
from trustcore.messages import CT_ENTITLEMENT, EntitlementPayload
from trustcore.profiles import (
    HqRole,
    issue_role_certificate,
    issue_root_ca,
    issue_station_ca,
)
from trustcore.sealed import seal_package

ORG = "Bench Manufacturer"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def software_hq(now: datetime) -> tuple[object, ...]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = issue_root_ca(
        root_key,
        common_name="Bench Root",
        organization=ORG,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3650),
    )
    roles = {}
    for role in (HqRole.ENTITLEMENT_SIGNER, HqRole.AUDIT_RECEIVER):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_role_certificate(
            root,
            root_key,
            key.public_key(),
            role=role,
            common_name=f"Bench {role.value}",
            organization=ORG,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=365),
        )
        roles[role] = (cert, key)
    return root, root_key, roles


class TimedEndpoint:
    """Forwards every call to a device endpoint and adds up the calling thread's CPU time
    inside it (the device's side of the protocol, run in this process by the simulator)."""

    def __init__(self, inner: object, totals: list[float], lock: threading.Lock) -> None:
        self._inner = inner
        self._totals = totals
        self._lock = lock

    def __getattr__(self, name: str) -> object:
        target = getattr(self._inner, name)
        if not callable(target):
            return target

        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.thread_time()
            try:
                return target(*args, **kwargs)
            finally:
                spent = time.thread_time() - t0
                with self._lock:
                    self._totals[0] += spent

        return timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    # 3: on 2 cores more threads only add GIL hand-offs (measured: 2-3 best, 6+ worse).
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the JSON result line")
    parser.add_argument("--profile", action="store_true", help="cProfile the full run (stderr)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    n = args.devices
    os.environ.setdefault("TSS2_LOG", "all+NONE")

    tmp = Path(tempfile.mkdtemp(prefix="bench-factory-"))
    now = datetime.now(UTC)
    log(f"bench directory {tmp}")
    t0 = time.perf_counter()
    provision_ek_certificate(tmp / "template", ca_dir=tmp / "vendor-ca")
    log(f"EK template manufactured in {time.perf_counter() - t0:.2f} s")

    root, root_key, roles = software_hq(now)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    station_tpm = Swtpm(tmp / "station-tpm").start()
    fleets: list[list[SimDevice]] = []
    try:
        home = tmp / "station"
        enrolment = FactoryStation.init(
            home,
            station_id=StationId("bench-station"),
            tcti=station_tpm.tcti,
            root_pem=root.public_bytes(Encoding.PEM),  # type: ignore[attr-defined]
            vendor_ca_pem=vendor_ca_pem(tmp / "vendor-ca"),
        )
        csr, transport = enrolment.verify()
        station_ca = issue_station_ca(
            root,  # type: ignore[arg-type]
            root_key,
            csr.public_key,
            station_id=StationId("bench-station"),
            organization=ORG,
            not_before=now - timedelta(hours=1),
            not_after=now + timedelta(days=30),
            max_not_after=now + timedelta(days=30),
        )
        stamp = int(now.timestamp())
        policy = EntitlementPolicy(
            entitlement_id="bench",
            station_id="bench-station",
            sequence=1,
            product="bench-widget",
            total_quota=n,
            daily_limit=n,
            day_timezone="UTC",
            not_before=stamp - 3600,
            not_after=stamp + 30 * 86400,
            id_rule=DeviceIdRule("dev-", 1, 999_999, 6),
        )
        signer_cert, signer_key = roles[HqRole.ENTITLEMENT_SIGNER]  # type: ignore[index]
        audit_cert, _ = roles[HqRole.AUDIT_RECEIVER]  # type: ignore[index]
        package = seal_package(
            content_type=CT_ENTITLEMENT,
            payload=EntitlementPayload(
                policy,
                station_ca.public_bytes(Encoding.DER),
                audit_cert.public_bytes(Encoding.DER),
                {},
            ).encode(),
            sender=SoftwareKey(signer_key),
            sender_cert=signer_cert,
            receiver_public=transport,
            sequence=1,
            created=stamp,
        )

        with FactoryStation.open(home) as station:
            station.import_entitlement(package)

            # -- full provisioning ---------------------------------------------------------
            log(f"manufacturing {n} device TPMs (template copies) ...")
            fleet = create_fleet(tmp / "fleet", n, template=tmp / "template")
            fleets.append(fleet)
            t0 = time.perf_counter()
            power_on_all(fleet)
            startup_wall = time.perf_counter() - t0
            startup_each = sum(d.startup_seconds for d in fleet) / n
            log(f"{n} swtpm started in {startup_wall:.2f} s (excluded)")

            progress = {"done": 0}
            lock = threading.Lock()

            def on_done(res: object, err: object) -> None:
                with lock:
                    progress["done"] += 1
                    k = progress["done"]
                if k % max(1, n // 10) == 0 or k == n:
                    log(f"  provisioned {k}/{n}")

            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            device_cpu = [0.0]
            endpoints = [TimedEndpoint(d.endpoint, device_cpu, lock) for d in fleet]
            cpu0 = time.process_time()
            result = provision_batch(
                station,
                endpoints,  # type: ignore[arg-type]
                workers=args.workers,
                on_done=on_done,
            )
            station_cpu = time.process_time() - cpu0
            if profiler:
                profiler.disable()
            if result.refused:
                log(f"REFUSED: {[str(e) for _, e in result.refused][:3]}")
            devices_per_s = len(result.provisioned) / result.seconds
            done = max(1, len(result.provisioned))
            cpu_ms = 1000 * station_cpu / done
            device_ms = 1000 * device_cpu[0] / done
            log(
                f"full provisioning: {len(result.provisioned)} in {result.seconds:.2f} s "
                f"= {devices_per_s:.1f} devices/s, process CPU {cpu_ms:.2f} ms per device "
                f"({device_ms:.2f} in device calls, {cpu_ms - device_ms:.2f} station's own)"
            )
            power_off_all(fleet)

            # -- the same TPM commands, bare -------------------------------------------------
            fleet2 = create_fleet(tmp / "fleet-tpm-only", n, template=tmp / "template")
            fleets.append(fleet2)
            power_on_all(fleet2)  # same state as the full run: connected, nothing loaded
            # The challenge is software (make_credential): made once, outside the clock.
            probe = fleet2[0].swtpm
            assert probe is not None
            with Tpm(probe.tcti) as ptpm:
                ident = TpmAttestor(ptpm).identity()
            verifier = AttestationVerifier(
                [x for x in station.vendor_cas[:1]], intermediates=station.vendor_cas[1:]
            )
            challenge = verifier.begin(ident.ek_certificate, ident.ak_public)
            bench_counter = TpmNvCounter(station.tpm, 0x01000101).define()
            tbs = os.urandom(400)
            station_lock = threading.Lock()

            def bare(device: SimDevice) -> None:
                tpm = device.tpm
                assert tpm is not None
                key = TpmKey.create(tpm, TpmKeyUsage.SIGN)
                build_device_csr(key, DeviceId("dev-000001"))
                att = TpmAttestor(tpm)
                att.identity()
                att.respond(
                    key,
                    credential_blob=challenge.credential_blob,
                    encrypted_secret=challenge.encrypted_secret,
                    nonce=challenge.nonce,
                )
                with station_lock:
                    station.tpm.read_clock()  # check(): trusted time
                    station.tpm.read_clock()  # issue(): trusted time
                    bench_counter.increment()
                    station.ca_key.sign(tbs)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                list(pool.map(bare, fleet2))
            tpm_seconds = time.perf_counter() - t0
            tpm_only_per_s = n / tpm_seconds
            log(f"TPM commands only: {n} in {tpm_seconds:.2f} s = {tpm_only_per_s:.1f}/s")
    finally:
        for fl in fleets:
            power_off_all(fl)
        station_tpm.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        log(out.getvalue())
    summary = {
        "devices": n,
        "workers": args.workers,
        "provisioned": len(result.provisioned),
        "seconds": round(result.seconds, 3),
        "devices_per_s": round(devices_per_s, 1),
        "swtpm_startup_s": round(startup_wall, 3),
        "swtpm_startup_ms_per_device": round(startup_each * 1000, 2),
        "tpm_only_per_s": round(tpm_only_per_s, 1),
        "overhead_ratio": round(tpm_only_per_s / devices_per_s, 3),
        "station_cpu_ms_per_device": round(cpu_ms, 2),
        "device_client_cpu_ms_per_device": round(device_ms, 2),
        "station_own_cpu_ms_per_device": round(cpu_ms - device_ms, 2),
        "target_devices_per_s": 100,
        "target_overhead_ratio": 1.5,
        "target_station_cpu_ms_per_device": 4.0,
    }
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
