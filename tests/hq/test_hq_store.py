"""The HQ store on both engines (SQLite file, PostgreSQL database): the same API and the
same answers, versioned migrations (an old SQLite file moves forward without loss), the
fleet-scale set operations (counterfeit cross-check, duplicates, clones) and bulk loading,
and clear errors for bad or unreachable store URLs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from hq.counterfeit import ReportRefusedError, RevokeRefusedError, ingest_site_report, revoke
from hq.errors import StoreConflict, StoreError
from hq.home import HqHome, HqSecrets
from hq.site import enrol_site
from hq.store import (
    SCHEMA_VERSION,
    AuditHead,
    DeviceRow,
    HqStore,
    StationRow,
    StoreLocation,
    parse_store_location,
)
from hq.store.schema import SQLITE_MIGRATIONS
from signers.software import SoftwareKey
from tests.fixtures.hq import PASSPHRASE, build_world, ingest, run_hq
from tests.fixtures.postgres import PgServer
from trustcore.csr import build_csr
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.messages import SiteEnrolment
from trustcore.profiles import issue_factory_certificate
from trustcore.site_report import SeenCertificate, SiteReport, seal_site_report


def _location(value: str) -> StoreLocation:
    return parse_store_location(value) if "://" in value else StoreLocation("sqlite", Path(value))


@pytest.fixture
def store(store_location: str) -> Iterator[HqStore]:
    """A new HQ store on each engine (SQLite file / fresh PostgreSQL database)."""
    s = HqStore.create(_location(store_location))
    try:
        yield s
    finally:
        s.close()


def _device(
    n: int, *, station: str = "st-1", eseq: int = 1, device: str | None = None
) -> DeviceRow:
    return DeviceRow(
        device or f"dev-{n:08d}",
        format(0x1000 + n, "x"),
        station,
        eseq,
        n.to_bytes(20, "big"),
        n,
        1_700_000_000 + n,
        None,
    )


def test_round_trip_and_reopen(store_location: str) -> None:
    where = _location(store_location)
    s = HqStore.create(where)
    try:
        with s.transaction():
            s.put_station(
                StationRow("st-1", b"\x01ca", b"\x02tr", b"csr", 5, 1), replacing=None, now=5
            )
            s.put_audit_head("st-1", AuditHead(7, b"\xaa" * 32, 3, 99), now=6)
            assert s.put_devices([_device(1), _device(2, device="dev-x")]) == 2
            s.put_hq_crl(4, 10, 20, b"crl")
            s.record_time_statement("st-1", 1234)
            s.record_time_statement("st-1", 1234)  # idempotent on both engines
    finally:
        s.close()
    s = HqStore.open(where)
    try:
        assert s.station("st-1") == StationRow("st-1", b"\x01ca", b"\x02tr", b"csr", 5, 1)
        assert s.audit_head("st-1") == AuditHead(7, b"\xaa" * 32, 3, 99)
        assert [d.device_id for d in s.devices()] == ["dev-00000001", "dev-x"]
        assert s.devices()[0] == _device(1)
        assert s.last_hq_crl_number() == 4
        assert s.time_statement_issued("st-1", 1234) and not s.time_statement_issued("st-1", 1)
        assert s.device_count() == 2
    finally:
        s.close()


def test_a_failed_transaction_stores_nothing(store: HqStore) -> None:
    with store.transaction():
        store.put_hq_crl(1, 10, 20, b"crl")
    with pytest.raises(StoreConflict), store.transaction():
        store.put_devices([_device(9)])
        store.put_hq_crl(1, 11, 21, b"again")  # primary key: refused
    assert store.device_count() == 0
    # the connection is usable after the refusal
    assert store.last_hq_crl_number() == 1


def test_cross_check_is_a_join_with_the_registry(store: HqStore) -> None:
    loaded: list[int] = []
    assert store.bulk_put_devices((_device(n) for n in range(5000)), progress=loaded.append) == 5000
    assert loaded and loaded[-1] == 5000
    # the same certificate recorded twice: the newest record is last
    store.put_devices([_device(7, device="dev-reissued")])
    asked = [("st-1", format(0x1000 + n, "x")) for n in (3, 7, 4999)]
    asked += [("st-1", "ffffff"), ("st-2", format(0x1000 + 3, "x"))]
    found = store.audited_certificates(asked)
    assert set(found) == {asked[0], asked[1], asked[2]}
    assert found[asked[0]] == [("dev-00000003", (3).to_bytes(20, "big"))]
    assert [d for d, _ in found[asked[1]]] == ["dev-00000007", "dev-reissued"]
    # the temporary table is per call: a second call sees only its own batch
    assert store.audited_certificates([asked[3]]) == {}
    # a site bundle's named devices: a join on the device-id index, oldest record first
    named = store.devices_with_ids(["dev-00000042", "dev-reissued", "dev-unknown"])
    assert named == [_device(42), _device(7, device="dev-reissued")]


def test_devices_elsewhere(store: HqStore) -> None:
    store.bulk_put_devices([_device(1), _device(2, station="st-2"), _device(3, eseq=2)])
    by_id, by_key = store.devices_elsewhere(
        "st-1",
        [
            ("dev-00000001", b"new-key", 1),  # same station and entitlement: fine
            ("dev-00000002", b"k2", 1),  # another station
            ("dev-00000003", b"k3", 1),  # another entitlement
            ("dev-new", (1).to_bytes(20, "big"), 3),  # a key seen under entitlement 1
        ],
    )
    assert by_id == {"dev-00000002": "st-2 entitlement 1", "dev-00000003": "st-1 entitlement 2"}
    assert by_key == {(1).to_bytes(20, "big"): "st-1 entitlement 1"}


def test_site_reports_and_clones(store: HqStore) -> None:
    assert store.site_report_sequence("site-a") is None
    with store.transaction():
        store.put_site_report(
            "site-a",
            1,
            100,
            [("st-1", "a1", "dev-1", 90, True, b"der1"), ("st-1", "a2", "dev-2", 91, False, b"d")],
        )
    assert store.site_report_sequence("site-a") == 1
    clones = store.registered_elsewhere("site-b", [("st-1", "a1"), ("st-1", "a2"), ("st-9", "a1")])
    assert clones == {("st-1", "a1"): [("site-a", 90)]}  # a2 is seen but not registered
    assert store.registered_elsewhere("site-a", [("st-1", "a1")]) == {}
    known = store.known_certificates(device_ids=["dev-2"], certificates=[("st-1", "a1")])
    assert known == [("st-1", "a2", "dev-2"), ("st-1", "a1", "dev-1")]


def test_schema_1_sqlite_file_is_migrated_forward_without_loss(tmp_path: Path) -> None:
    """An HQ database written by the first release (schema 1, plus a table that later code
    created on first use) opens with this code: every row kept, schema 3, new indexes."""
    path = tmp_path / "hq.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SQLITE_MIGRATIONS[1])
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO stations VALUES ('st-1', x'01', x'02', x'03', 5, 1)")
    conn.execute(
        "INSERT INTO devices (device_id, serial, station_id, entitlement_seq, key_id, "
        "audit_seq, issued_time, certificate) VALUES ('dev-1', 'abc', 'st-1', 1, x'09', 3, 4, NULL)"
    )
    conn.execute(
        "CREATE TABLE recon_reissues (request_id BLOB PRIMARY KEY, station_id TEXT NOT NULL, "
        "entitlement_seq INTEGER NOT NULL, device_id TEXT NOT NULL, used_seq INTEGER)"
    )
    conn.execute("INSERT INTO recon_reissues VALUES (x'aa', 'st-1', 1, 'dev-1', NULL)")
    conn.commit()
    conn.close()
    s = HqStore.open(path)
    try:
        assert s.station("st-1") == StationRow("st-1", b"\x01", b"\x02", b"\x03", 5, 1)
        assert s.devices() == [DeviceRow("dev-1", "abc", "st-1", 1, b"\x09", 3, 4, None)]
        assert s.reissue_grants("st-1", 1) == {"dev-1": [b"\xaa"]}
        assert s.audited_certificates([("st-1", "abc")]) == {("st-1", "abc"): [("dev-1", b"\x09")]}
        assert s.sites() == []  # schema 2 tables exist
    finally:
        s.close()
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        conn.close()
    assert version == (str(SCHEMA_VERSION),)
    assert {"devices_certificate", "site_sightings_certificate"} <= indexes


def test_a_newer_or_foreign_database_is_refused(store_location: str, tmp_path: Path) -> None:
    where = _location(store_location)
    HqStore.create(where).close()
    with pytest.raises(StoreError, match="already"):
        HqStore.create(where)
    if where.kind == "sqlite":
        conn = sqlite3.connect(where.path)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.commit()
        conn.close()
        with pytest.raises(StoreError, match="unknown schema version"):
            HqStore.open(where)
        with pytest.raises(StoreError, match="missing"):
            HqStore.open(tmp_path / "absent.sqlite")
    else:
        with psycopg.connect(where.url, autocommit=True) as conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        with pytest.raises(StoreError, match="unknown schema version"):
            HqStore.open(where)


def test_postgres_database_without_hq_is_refused(pg_database: str) -> None:
    with pytest.raises(StoreError, match="not an HQ database"):
        HqStore.open(parse_store_location(pg_database))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://hq:secret@127.0.0.1/hq", "must not carry a password"),
        ("postgresql://127.0.0.1:5432/hq?password=secret", "must not carry a password"),
        ("postgresql://127.0.0.1:5432/", "names its database"),
        ("postgresql://127.0.0.1:99999/hq", "not a PostgreSQL URL"),
        ("mysql://127.0.0.1/hq", "unknown store URL"),
        ("sqlite://relative/path", "sqlite:///absolute/path"),
    ],
)
def test_bad_store_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as info:
        parse_store_location(url)
    assert "secret" not in str(info.value)


def test_cli_bad_or_unreachable_store_is_one_line(tmp_path: Path) -> None:
    r = run_hq("init", "--home", str(tmp_path / "a"), "--org", "Acme", "--store", "mysql://x/y")
    assert r.exit_code == 1 and r.output.startswith("error: store_error: unknown store URL"), (
        r.output
    )
    # a closed port on loopback: refused at once, a one-line error, no traceback, no HQ left
    r = run_hq(
        "init",
        "--home",
        str(tmp_path / "b"),
        "--org",
        "Acme",
        "--store",
        "postgresql://postgres@127.0.0.1:1/hq",
    )
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: store_error: cannot open HQ database postgresql://"), (
        r.output
    )
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3
    assert not (tmp_path / "b").exists()


def test_cli_records_the_store_and_every_command_uses_it(pg_database: str, tmp_path: Path) -> None:
    home = tmp_path / "hq"
    r = run_hq("init", "--home", str(home), "--org", "Acme", "--store", pg_database)
    assert r.exit_code == 0, r.output
    assert json.loads((home / "hq.json").read_text())["store"] == pg_database
    assert not (home / "hq.sqlite").exists()
    assert HqHome.open(home).store_location == parse_store_location(pg_database)
    # a command that opens the store works on PostgreSQL (the root CRL init wrote is there)
    r = run_hq("root-crl", "--home", str(home))
    assert r.exit_code == 0, r.output
    with psycopg.connect(pg_database) as conn:
        numbers = [r[0] for r in conn.execute("SELECT crl_number FROM root_crls ORDER BY 1")]
    assert numbers == [1, 2]
    # the same URL cannot become a second HQ
    r = run_hq("init", "--home", str(tmp_path / "hq2"), "--org", "Acme", "--store", pg_database)
    assert r.exit_code == 1 and "already holds an HQ" in r.output, r.output


def _site(home: HqHome, site_id: str) -> tuple[SoftwareKey, x509.Certificate]:
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
    request = SiteEnrolment.create(SiteId(site_id), csr, ca, transport.public_key())
    return ca, enrol_site(home, request.encode(), HqSecrets()).site_ca_cert


def _seen(cert: x509.Certificate, device: str, *, registered: bool = True) -> SeenCertificate:
    return SeenCertificate(
        StationId("station-a"),
        CertSerial(cert.serial_number),
        DeviceId(device),
        int(time.time()),
        registered,
        cert.public_bytes(serialization.Encoding.DER),
    )


def test_counterfeit_check_and_revocation_on_each_engine(
    store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hq ingest-audit`` → ``hq ingest-report`` → ``hq revoke`` through the store of each
    engine: audited, counterfeit and cloned certificates are told apart, and revocation
    finds devices by id and by certificate without reading the registry."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", PASSPHRASE)
    world = build_world(tmp_path, store_location if "://" in store_location else None)
    home = HqHome.open(world.home)
    slog = world.a.new_log()
    slog.imported(world.t0)
    certs = [slog.issue(f"dev-{i:04d}", world.t0 + i) for i in (1, 2, 3)]
    assert ingest(world.home, slog.export(world.t0 + 100), tmp_path).exit_code == 0
    assert world.a.ca_cert is not None
    forged = issue_factory_certificate(
        world.a.ca_cert,
        world.a.ca_key.private_key(),
        SoftwareKey.ephemeral().public_key(),
        device_id=DeviceId("dev-0050"),
        manufacturer="Acme",
        not_before=world.a.ca_cert.not_valid_before_utc,
    )
    key_1, cert_1 = _site(home, "site-1")
    key_2, cert_2 = _site(home, "site-2")
    now = int(time.time())
    first = SiteReport(SiteId("site-2"), 1, now, (_seen(certs[0], "dev-0001"),), ())
    ingest_site_report(home, seal_site_report(first, site_ca_key=key_2, site_ca_cert=cert_2))
    seen = [_seen(c, f"dev-{i:04d}") for i, c in zip((1, 2, 3), certs, strict=True)]
    seen.append(_seen(forged, "dev-0050", registered=False))
    report = SiteReport(SiteId("site-1"), 1, now, tuple(seen), ())
    result = ingest_site_report(
        home, seal_site_report(report, site_ca_key=key_1, site_ca_cert=cert_1)
    )
    kinds = sorted((f.kind, f.device_id) for f in result.findings)
    assert kinds == [("cloned", "dev-0001"), ("counterfeit", "dev-0050")]
    assert result.audited_clean == 3
    revoked, _ = revoke(home, HqSecrets(), findings=[f.to_map() for f in result.findings])
    assert sorted(e.device_id.value for e in revoked.added) == ["dev-0001", "dev-0050"]
    revoked, _ = revoke(home, HqSecrets(), devices=["dev-0002"])
    assert [e.serial.value for e in revoked.added] == [certs[1].serial_number]
    with pytest.raises(RevokeRefusedError, match="unknown to HQ"):
        revoke(home, HqSecrets(), devices=["dev-0099"])
    with pytest.raises(ReportRefusedError):  # the same report again: a replay
        ingest_site_report(home, seal_site_report(report, site_ca_key=key_1, site_ca_cert=cert_1))


def test_scale_bench_runs_the_production_path(pg_server: PgServer) -> None:
    """``bench/hq_scale.py`` on a tiny registry: its report mix gives the findings it
    promises (25 % counterfeit, 5 % cloned) through ``hq ingest-report``, and its JSON has
    every figure the issue asks for."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "hq_scale.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--devices", "3000", "--store", "postgres",
         "--report", "200", "--entries", "40", "--repeat", "1", "--json",
         "--pg-admin-url", pg_server.admin_url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the preload, the audited devices of the report, the warm-up and baseline exports
    assert result["devices"] == 3000 + 160 + 2 * 40
    assert result["findings"] == {"counterfeit": 50, "cloned": 10}
    assert result["audited_clean"] == 150
    for key in (
        "report_check_seconds",
        "ingest_entries_per_s",
        "peak_rss_mb",
        "report_check_ratio",
    ):
        assert result[key] > 0, key


def test_writers_are_serialised(store_location: str) -> None:
    """Two HQ commands writing at once: the second transaction starts only after the first
    committed (SQLite BEGIN IMMEDIATE; PostgreSQL the advisory writer lock), so a
    read-check-write step (next CRL number, next sequence) is never interleaved."""
    where = _location(store_location)
    HqStore.create(where).close()
    entered, order = threading.Event(), []

    def other_writer() -> None:
        second = HqStore.open(where)  # its own connection, as another command has
        try:
            entered.wait(5)
            with second.transaction():
                n = second.last_hq_crl_number()
                order.append(("second", n))
                second.put_hq_crl(n + 1, 0, 0, b"b")
        finally:
            second.close()

    first = HqStore.open(where)
    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        with first.transaction():
            n = first.last_hq_crl_number()
            entered.set()
            thread.join(0.5)  # the other writer is still waiting for our commit
            assert thread.is_alive()
            first.put_hq_crl(n + 1, 0, 0, b"a")
            order.append(("first", n))
        thread.join(10)
        assert order == [("first", 0), ("second", 1)]
        assert first.last_hq_crl_number() == 2
    finally:
        thread.join(10)
        first.close()
