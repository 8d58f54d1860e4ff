"""Benchmark: HQ at fleet scale — the counterfeit cross-check and audit ingest with a registry
of N audited devices, on SQLite or PostgreSQL.

    python bench/hq_scale.py --devices 10000000 --store postgres --json

Builds (not timed) a real HQ (``hq init``, with ``--store`` on PostgreSQL: a fresh database
on ``--pg-admin-url``'s server, dropped at the end), a software-key station enrolled and
entitled, two enrolled sites, a site report of ``--report`` factory certificates (70 %
genuine, 20 % chain-valid but in no audit log, 5 % audited with another key, 5 % also
registered at the other site) and two signed, sealed audit exports of ``--entries`` records.

Then, twice — first with the small registry the report needs (the baseline), then after
bulk-loading N more audited devices (``HqStore.bulk_put_devices``: COPY on PostgreSQL, in a
child process so its memory is not counted) — it times exactly what the commands run:

* ``report_check_seconds``: ``hq ingest-report`` (:func:`hq.counterfeit.ingest_site_report`:
  verify the report, chain-verify every sighting, cross-check against the registry, store);
* ``cross_check_db_seconds``: the registry part of that alone
  (:meth:`HqStore.audited_certificates`, the query the ingest runs);
* ``ingest_entries_per_s``: ``hq ingest-audit`` (:func:`hq.audit_ingest.ingest_audit`) of
  the next export (decrypt, verify, reconcile, duplicate checks against the registry, store).

Each is the median of ``--repeat`` runs (3), after one untimed warm-up report and export.
``peak_rss_mb`` is this process's peak (the preload runs in a child). Ratios compare the
full registry with the baseline of the same run. Progress goes to stderr; the JSON object
is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hq.audit_ingest import ingest_audit
from hq.authority import enrol_station, init_hq
from hq.counterfeit import ingest_site_report
from hq.entitlements import EntitlementRequest, issue_entitlement
from hq.home import HqHome, HqSecrets
from hq.site import enrol_site
from hq.store import DeviceRow, HqStore
from signers.software import SoftwareKey
from trustcore.audit import AuditLog, encode_export
from trustcore.csr import build_csr
from trustcore.entitlement import DeviceIdRule
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import key_id
from trustcore.messages import (
    CT_AUDIT_EXPORT,
    CT_ENTITLEMENT,
    AuditExportPayload,
    EntitlementPayload,
    SiteEnrolment,
    StationEnrolment,
)
from trustcore.profiles import issue_factory_certificate
from trustcore.sealed import open_package, peek, seal_package
from trustcore.site_report import SeenCertificate, SiteReport, seal_site_report

STATION = "bench-station"
FLEET_STATIONS = 200  # the preloaded registry spreads over this many other stations
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Station:
    ca_key: SoftwareKey
    transport: SoftwareKey
    payload: EntitlementPayload

    @property
    def ca_cert(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.payload.station_ca_cert_der)


@dataclass
class Site:
    site_id: str
    ca_key: SoftwareKey
    ca_cert: x509.Certificate


def setup_hq(base: Path, store: str | None, quota: int) -> tuple[HqHome, HqSecrets, Station]:
    pw = base / "pw"
    pw.write_bytes(os.urandom(16).hex().encode())
    pw.chmod(0o600)
    secrets = HqSecrets(passphrase_file=pw)
    init_hq(base / "hq", organization="Bench", secrets=secrets, store=store)
    home = HqHome.open(base / "hq")
    ca_key, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, STATION)]))
    enrol_station(
        home,
        StationEnrolment.create(StationId(STATION), csr, ca_key, transport.public_key()).encode(),
    )
    now = datetime.now(UTC)
    result = issue_entitlement(
        home,
        EntitlementRequest(
            station_id=STATION,
            product="thermo",
            total_quota=quota,
            daily_limit=quota,
            day_timezone="UTC",
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=30),
            id_rule=DeviceIdRule("dev-", 0, 10**9 - 1, 9),
        ),
        secrets,
    )
    opened = open_package(
        result.package,
        receiver=transport,
        expected_content_type=CT_ENTITLEMENT,
        trusted_sender_public=peek(result.package).sender_certificate().public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 22,
    )
    return home, secrets, Station(ca_key, transport, EntitlementPayload.decode(opened.payload))


def enrol_bench_site(home: HqHome, secrets: HqSecrets, site_id: str) -> Site:
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
    request = SiteEnrolment.create(SiteId(site_id), csr, ca, transport.public_key())
    return Site(site_id, ca, enrol_site(home, request.encode(), secrets).site_ca_cert)


@dataclass
class Sightings:
    seen: list[SeenCertificate]
    audited: list[DeviceRow]  # what the audit logs recorded for them (the small registry)
    clones: list[SeenCertificate]  # also registered at the other site


def build_sightings(station: Station, count: int, first_seen: int) -> Sightings:
    """``count`` real factory certificates of the bench station, in four kinds."""
    ca_cert, ca_key = station.ca_cert, station.ca_key.private_key()
    seen: list[SeenCertificate] = []
    audited: list[DeviceRow] = []
    clones: list[SeenCertificate] = []
    n_unknown, n_other_key, n_clone = count * 20 // 100, count * 5 // 100, count * 5 // 100
    for i in range(count):
        device = f"dev-{500_000_000 + i:09d}"
        key = SoftwareKey.ephemeral()
        cert = issue_factory_certificate(
            ca_cert,
            ca_key,
            key.public_key(),
            device_id=DeviceId(device),
            manufacturer="Bench",
            not_before=ca_cert.not_valid_before_utc,
        )
        serial = format(cert.serial_number, "x")
        s = SeenCertificate(
            StationId(STATION),
            CertSerial(cert.serial_number),
            DeviceId(device),
            first_seen,
            True,
            cert.public_bytes(serialization.Encoding.DER),
        )
        seen.append(s)
        if i < n_unknown:
            continue  # counterfeit: chain-valid, in no audit log
        recorded_key = key_id(key.public_key())
        if i < n_unknown + n_other_key:
            recorded_key = os.urandom(32)  # the audit log has this serial with another key
        elif i < n_unknown + n_other_key + n_clone:
            clones.append(s)
        audited.append(DeviceRow(device, serial, STATION, 1, recorded_key, i, first_seen, None))
        if i % 2000 == 1999:
            progress(f"  {i + 1:,} / {count:,} certificates")
    return Sightings(seen, audited, clones)


def site_report(site: Site, sequence: int, seen: list[SeenCertificate], created: int) -> bytes:
    report = SiteReport(SiteId(site.site_id), sequence, created, tuple(seen), ())
    return seal_site_report(report, site_ca_key=site.ca_key, site_ca_cert=site.ca_cert)


class Exports:
    """The bench station's audit log, exported in parts (each continues the last)."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.log = AuditLog(STATION)
        self.next_device = 0
        self.counter = 0
        self.number = 0
        policy = station.payload.policy
        self.t = policy.not_before + 3600
        self.pending = [self.log.append(
            "entitlement_imported",
            {
                "entitlement_id": policy.entitlement_id,
                "entitlement_seq": policy.sequence,
                "counter_base": 0,
            },
            self.t,
        )]  # fmt: skip

    def next_export(self, entries: int) -> bytes:
        """The next export: ``entries`` issuances, each with its real factory certificate
        in the manifest (as a station sends them)."""
        policy = self.station.payload.policy
        ca_cert, ca_key = self.station.ca_cert, self.station.ca_key.private_key()
        records, self.pending = self.pending, []
        manifest: list[bytes] = []
        for _ in range(entries):
            self.counter += 1
            self.next_device += 1
            device = f"dev-{self.next_device:09d}"
            key = SoftwareKey.ephemeral()
            cert = issue_factory_certificate(
                ca_cert,
                ca_key,
                key.public_key(),
                device_id=DeviceId(device),
                manufacturer="Bench",
                not_before=ca_cert.not_valid_before_utc,
            )
            manifest.append(cert.public_bytes(serialization.Encoding.DER))
            raw = self.log.append(
                "issued",
                {
                    "device_id": device,
                    "serial": format(cert.serial_number, "x"),
                    "key_id": key_id(key.public_key()),
                    "product": "thermo",
                    "entitlement_seq": policy.sequence,
                    "counter": self.counter,
                },
                self.t + self.counter // 1000,
            )
            records.append(raw)
        self.number += 1
        when = self.t + self.counter // 1000
        checkpoint = self.log.make_checkpoint(self.station.ca_key, when)
        payload = AuditExportPayload(
            STATION,
            policy.sequence,
            self.number,
            encode_export(records, checkpoint),
            tuple(manifest),
        )
        return seal_package(
            content_type=CT_AUDIT_EXPORT,
            payload=payload.encode(),
            sender=self.station.ca_key,
            sender_cert=self.station.ca_cert,
            receiver_public=x509.load_der_x509_certificate(
                self.station.payload.audit_receiver_cert_der
            ).public_key(),  # type: ignore[arg-type]
            sequence=self.number,
            created=when,
        )


def fleet_rows(n: int, seed: int = 7) -> Iterator[DeviceRow]:
    """N audited devices of other stations (200 stations, entitlements of 100,000)."""
    rnd = random.Random(seed)  # test data, not secrets
    randbytes = rnd.randbytes
    for i in range(n):
        yield DeviceRow(
            f"fleet-{i:010d}",
            randbytes(16).hex(),
            f"fleet-station-{i % FLEET_STATIONS:03d}",
            1 + (i // FLEET_STATIONS) // 100_000,
            randbytes(32),
            i // FLEET_STATIONS,
            1_700_000_000 + i // 1000,
            None,
        )


def preload(home_path: str, n: int) -> None:
    """Child process: bulk-load N devices through the store's public method."""
    home = HqHome.open(home_path)
    store = HqStore.open(home.store_location)
    started = time.perf_counter()
    step = max(n // 20, 200_000)
    mark = [0]

    def report(count: int) -> None:
        if count - mark[0] >= step or count == n:
            mark[0] = count
            rate = count / max(time.perf_counter() - started, 1e-9)
            progress(f"  preloaded {count:,} / {n:,} devices ({rate:,.0f}/s)")

    try:
        store.bulk_put_devices(fleet_rows(n), progress=report)
    finally:
        store.close()


def measure(
    home: HqHome,
    secrets: HqSecrets,
    site: Site,
    report_seqs: range,
    sightings: Sightings,
    exports: list[bytes],
    entries: int,
) -> dict[str, float]:
    """Medians over ``len(report_seqs)`` site reports (each a new sequence of the same
    sightings), as many registry queries, and ``len(exports)`` consecutive exports."""
    report_s: list[float] = []
    db_s: list[float] = []
    ingest_rates: list[float] = []
    keys = [
        ("" if s.station_id is None else s.station_id.value, s.serial.hex) for s in sightings.seen
    ]
    for seq in report_seqs:
        now = int(time.time())
        package = site_report(site, seq, sightings.seen, now)
        t0 = time.perf_counter()
        result = ingest_site_report(home, package, now=now)
        report_s.append(time.perf_counter() - t0)
        store = HqStore.open(home.store_location)
        try:
            t0 = time.perf_counter()
            found = store.audited_certificates(keys)
            db_s.append(time.perf_counter() - t0)
        finally:
            store.close()
    counts = result.to_map()["finding_counts"]
    for export in exports:
        t0 = time.perf_counter()
        ingested = ingest_audit(home, export, secrets)
        ingest_rates.append(entries / (time.perf_counter() - t0))
        if ingested.violation_count:
            raise SystemExit(f"bench export had violations: {ingested.to_map(max_violations=3)}")
    progress(
        f"  report {_ms(report_s)} (findings {counts}, audited {len(found):,}), "
        f"registry query {_ms(db_s)}, ingest {[round(r) for r in ingest_rates]} entries/s"
    )
    return {
        "report_check_seconds": statistics.median(report_s),
        "cross_check_db_seconds": statistics.median(db_s),
        "cross_check_db_first_seconds": db_s[0],
        "ingest_entries_per_s": statistics.median(ingest_rates),
        "counterfeit": counts.get("counterfeit", 0),
        "cloned": counts.get("cloned", 0),
        "audited_clean": result.audited_clean,
    }


def _ms(values: list[float]) -> str:
    return "[" + ", ".join(f"{v * 1000:.0f}" for v in values) + "] ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1_000_000, help="registry size N")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--report", type=int, default=10_000, help="site report size")
    parser.add_argument("--entries", type=int, default=20_000, help="audit export size")
    parser.add_argument(
        "--pg-admin-url", default=os.environ.get("DEVTRUST_BENCH_PG", DEFAULT_ADMIN_URL)
    )
    parser.add_argument(
        "--keep-db", action="store_true", help="keep the PostgreSQL database (for EXPLAIN)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per phase (medians)")
    parser.add_argument("--json", action="store_true", help="(the last line is always JSON)")
    args = parser.parse_args()
    if args.devices < 0 or args.report < 100 or args.entries < 1 or args.repeat < 1:
        parser.error("--devices >= 0, --report >= 100, --entries >= 1, --repeat >= 1")

    db_name = f"hq_scale_{uuid.uuid4().hex[:10]}"
    store_url = None
    if args.store == "postgres":
        try:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {db_name}".encode())
        except psycopg.Error as exc:
            raise SystemExit(f"error: cannot create the bench database: {exc}") from exc
        store_url = args.pg_admin_url.rsplit("/", 1)[0] + "/" + db_name
    try:
        with tempfile.TemporaryDirectory(prefix="bench-hq-scale-") as tmp:
            result = run(Path(tmp), args, store_url)
    finally:
        if store_url is not None and args.keep_db:
            progress(f"kept {store_url}")
        elif store_url is not None:
            with psycopg.connect(args.pg_admin_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)".encode())
    print(json.dumps(result))


def run(base: Path, args: argparse.Namespace, store_url: str | None) -> dict[str, object]:
    progress(f"setting up HQ ({args.store}) in {base}")
    home, secrets, station = setup_hq(
        base, store_url, quota=(2 * args.repeat + 1) * args.entries + 10
    )
    site_a = enrol_bench_site(home, secrets, "site-a")
    site_b = enrol_bench_site(home, secrets, "site-b")
    progress(f"building a {args.report:,}-certificate site report")
    first_seen = int(time.time())
    sightings = build_sightings(station, args.report, first_seen)
    store = HqStore.open(home.store_location)
    try:
        store.bulk_put_devices(sightings.audited)  # the devices their audit logs recorded
    finally:
        store.close()
    # The other site reported the clones as registered there first.
    ingest_site_report(home, site_report(site_b, 1, sightings.clones, int(time.time())))
    r = args.repeat
    progress(f"building {2 * r + 1} consecutive audit exports of {args.entries:,} records")
    log = Exports(station)
    exports = [log.next_export(args.entries) for _ in range(2 * r + 1)]
    progress("warm-up (untimed): one report, one export")
    ingest_site_report(home, site_report(site_a, 1, sightings.seen, int(time.time())))
    ingest_audit(home, exports.pop(0), secrets)

    progress(f"baseline: registry of {len(sightings.audited):,} devices")
    small = measure(home, secrets, site_a, range(2, r + 2), sightings, exports[:r], args.entries)
    rss_small = rss_mb()

    progress(f"preloading {args.devices:,} devices ({args.store})")
    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=preload, args=(str(home.path), args.devices)
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"error: preload failed (exit {child.exitcode})")
    preload_s = time.perf_counter() - t0
    store = HqStore.open(home.store_location)
    try:
        registry = store.device_count()
    finally:
        store.close()

    progress(f"full: registry of {registry:,} devices")
    full = measure(
        home, secrets, site_a, range(r + 2, 2 * r + 2), sightings, exports[r:], args.entries
    )
    peak = rss_mb()
    return {
        "store": args.store,
        "devices": registry,
        "report_size": args.report,
        "export_entries": args.entries,
        "repeat": args.repeat,
        "preload_seconds": round(preload_s, 1),
        "preload_devices_per_s": round(args.devices / preload_s) if args.devices else 0,
        "report_check_seconds": round(full["report_check_seconds"], 3),
        "report_check_seconds_baseline": round(small["report_check_seconds"], 3),
        "report_check_ratio": round(
            full["report_check_seconds"] / small["report_check_seconds"], 3
        ),
        "cross_check_db_seconds": round(full["cross_check_db_seconds"], 4),
        "cross_check_db_seconds_baseline": round(small["cross_check_db_seconds"], 4),
        "cross_check_db_first_seconds": round(full["cross_check_db_first_seconds"], 4),
        "cross_check_db_ratio": round(
            full["cross_check_db_seconds"] / small["cross_check_db_seconds"], 3
        ),
        "ingest_entries_per_s": round(full["ingest_entries_per_s"]),
        "ingest_entries_per_s_baseline": round(small["ingest_entries_per_s"]),
        "ingest_ratio": round(small["ingest_entries_per_s"] / full["ingest_entries_per_s"], 3),
        "findings": {"counterfeit": full["counterfeit"], "cloned": full["cloned"]},
        "audited_clean": full["audited_clean"],
        "peak_rss_mb": round(peak, 1),
        "peak_rss_mb_baseline": round(rss_small, 1),
        "rss_ratio": round(peak / rss_small, 3),
    }


if __name__ == "__main__":
    main()
