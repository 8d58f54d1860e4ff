"""``hq ingest-audit``: each audit attack is refused with its name (exit 2, DB unchanged);
authentic exports are reconciled across exports and violations reported (exit 1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hq.home import HqHome
from hq.store import HqStore
from signers.software import SoftwareKey
from tests.fixtures.hq import (
    SoftStation,
    StationLog,
    World,
    build_world,
    db_dump,
    entitle_args,
    home_copy,
    ingest,
    ingest_json,
    midnight_utc,
    run_hq,
    world_on_each_store,
)
from trustcore.audit import ChainHead, encode_record, record_hash
from trustcore.crl import build_crl
from trustcore.identity import StationId
from trustcore.profiles import issue_root_ca, issue_station_ca
from trustcore.quorum import ApprovalRequest, encode_bundle, sign_approval

# ------------------------------------------------------------------------------ helpers


def five(slog: StationLog, t0: int, first: int = 1) -> list[bytes]:
    """Import + 4 issuances: five records (seq 0..4 on a fresh log)."""
    slog.imported(t0)
    for i in range(4):
        slog.issue(f"dev-{first + i:04d}", t0 + 10 + i)
    return list(slog.pending)


def assert_refused(home: Path, package: bytes, tmp: Path, reason: str) -> None:
    before = db_dump(home)
    code, report = ingest_json(home, package, tmp)
    assert (code, report["status"], report["reason"]) == (2, "refused", reason), report
    assert db_dump(home) == before, "a refused export must not change the database"


def assert_enrolled_key(home: Path, station: SoftStation) -> None:
    from cryptography.hazmat.primitives import serialization

    store = HqStore.open(HqHome.open(home).store_location)
    try:
        row = store.station(station.station_id)
    finally:
        store.close()
    assert row is not None
    assert row.ca_public_der == station.ca_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One HQ with stations A and B enrolled and entitled, on each store engine; each test
    works on a copy (on PostgreSQL a database made from the world's as a template)."""
    yield from world_on_each_store(request, tmp_path_factory, "hq-world")


@pytest.fixture
def home(world: World, tmp_path: Path) -> Path:
    return home_copy(world, tmp_path)


# ------------------------------------------------------------------------- the attacks


def test_clean_export_then_continuation(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 0 and report["status"] == "clean", report
    assert (report["records"], report["first_seq"], report["next_seq"]) == (5, 0, 5)
    assert report["events"] == {"entitlement_imported": 1, "issued": 4}
    # The next export continues from the stored head.
    slog.issue("dev-0005", world.t0 + 200)
    slog.burn("dev-0006", world.t0 + 201)
    code, report = ingest_json(home, slog.export(world.t0 + 300), tmp_path)
    assert code == 0, report
    assert (report["first_seq"], report["next_seq"]) == (5, 7)
    [ent] = report["entitlements"]
    assert (ent["issued"], ent["burned"]) == (5, 1)
    store = HqStore.open(HqHome.open(home).store_location)
    try:
        devices = store.devices("station-a")
        assert [d.device_id for d in devices] == [f"dev-{i:04d}" for i in range(1, 6)]
        assert all(d.certificate is not None for d in devices)
        assert store.audit_head("station-a").next_seq == 7
    finally:
        store.close()


def test_gap(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    pkg = slog.export(world.t0 + 100, records=[recs[0], recs[1], recs[3], recs[4]])
    assert_refused(home, pkg, tmp_path, "gap")


def test_gap_across_exports(world: World, home: Path, tmp_path: Path) -> None:
    """A whole export withheld: the next one does not start at the accepted head."""
    slog = world.a.new_log()
    five(slog, world.t0)
    assert ingest_json(home, slog.export(world.t0 + 100), tmp_path)[0] == 0
    slog.issue("dev-0010", world.t0 + 110)
    slog.export(world.t0 + 120)  # never delivered
    slog.issue("dev-0011", world.t0 + 130)
    assert_refused(home, slog.export(world.t0 + 140), tmp_path, "gap")


def test_fork(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    assert ingest_json(home, slog.export(world.t0 + 100), tmp_path)[0] == 0
    # The station rewrites history from record 2 on and exports the alternative branch.
    alt = slog.fork_from(ChainHead(next_seq=3, head_hash=record_hash(recs[2])))
    branch = [alt.append("issued_elsewhere", {"n": i}, world.t0 + 50 + i) for i in range(4)]
    cp = alt.make_checkpoint(world.a.ca_key, world.t0 + 150)
    assert_refused(
        home, slog.export(world.t0 + 150, records=branch, checkpoint=cp), tmp_path, "fork"
    )


def test_reorder(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    pkg = slog.export(world.t0 + 100, records=[recs[0], recs[2], recs[1], recs[3], recs[4]])
    assert_refused(home, pkg, tmp_path, "reorder")


def test_truncation(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    assert_refused(home, slog.export(world.t0 + 100, records=recs[:3]), tmp_path, "truncation")


def test_rewritten_entry(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    # Record 2 re-encoded with another device id, same seq and prev: record 3 no longer links.
    forged = encode_record(
        2,
        record_hash(recs[1]),
        world.t0 + 11,
        "issued",
        {"device_id": "dev-0099", "serial": "1", "key_id": bytes(32), "product": "thermo"},
    )
    pkg = slog.export(world.t0 + 100, records=[recs[0], recs[1], forged, recs[3], recs[4]])
    assert_refused(home, pkg, tmp_path, "rewritten_entry")


def test_forged_checkpoint(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    cp = slog.checkpoint(world.t0 + 100, signer=SoftwareKey.ephemeral())
    assert_refused(home, slog.export(world.t0 + 100, checkpoint=cp), tmp_path, "forged_checkpoint")


def _crl(world: World, key: SoftwareKey, number: int) -> bytes:
    ca = world.a.ca_cert
    assert ca is not None
    now = datetime.fromtimestamp(world.t0, UTC)
    if key is world.a.ca_key:
        crl = build_crl(
            ca,
            key.private_key(),
            revoked=(),
            crl_number=number,
            this_update=now,
            next_update=now + timedelta(days=30),
        )
    else:  # a forger: the station's name, another key (build_crl refuses to make this)
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now)
            .next_update(now + timedelta(days=30))
            .add_extension(x509.CRLNumber(number), critical=False)
            .sign(key.private_key(), hashes.SHA256())
        )
    return crl.public_bytes(Encoding.DER)


def test_station_crl_is_kept_and_a_forged_one_refuses_the_export(
    world: World, home: Path, tmp_path: Path
) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    pending, manifest = list(slog.pending), list(slog.manifest)
    forged = _crl(world, SoftwareKey.ephemeral(), 1)
    assert_refused(home, slog.export(world.t0 + 100, crl=forged), tmp_path, "bad_crl")
    slog.pending, slog.manifest = pending, manifest
    good = _crl(world, world.a.ca_key, 1)
    code, report = ingest_json(
        home, slog.export(world.t0 + 100, crl=good, export_number=1), tmp_path
    )
    assert code == 0, report
    store = HqStore.open(HqHome.open(home).store_location)
    try:
        held = store.station_crl("station-a")
        assert held is not None and held.crl_number == 1
    finally:
        store.close()


def test_export_signed_by_another_station(world: World, home: Path, tmp_path: Path) -> None:
    """Station B (enrolled, entitled) sends station A's log as its own package."""
    slog = world.a.new_log()
    five(slog, world.t0)
    pkg = slog.export(world.t0 + 100, sender=world.b)
    assert_refused(home, pkg, tmp_path, "wrong_station")


def test_checkpoint_of_another_station(world: World, home: Path, tmp_path: Path) -> None:
    """B claims A's records (checkpoint signed by A) as its own export."""
    slog = world.a.new_log()
    five(slog, world.t0)
    pkg = slog.export(world.t0 + 100, sender=world.b, claimed_station="station-b")
    assert_refused(home, pkg, tmp_path, "wrong_station")


def test_unenrolled_foreign_station(world: World, home: Path, tmp_path: Path) -> None:
    """A station CA from another root, with the same station id: foreign_station."""
    from datetime import UTC, datetime, timedelta

    rogue_root_key = SoftwareKey.ephemeral()
    now = datetime.now(UTC)
    rogue_root = issue_root_ca(
        rogue_root_key.private_key(),
        common_name="Rogue Root",
        organization="Rogue",
        not_before=now - timedelta(days=3),
        not_after=now + timedelta(days=60),
    )
    rogue = SoftStation("station-a")
    rogue.ca_cert = issue_station_ca(
        rogue_root,
        rogue_root_key.private_key(),
        rogue.ca_key.public_key(),
        station_id=StationId("station-a"),
        organization="Rogue",
        not_before=now - timedelta(days=3),
        not_after=now + timedelta(days=30),
        max_not_after=now + timedelta(days=30),
    )
    rogue.policy, rogue.audit_receiver = world.a.policy, world.a.audit_receiver
    slog = rogue.new_log()
    five(slog, world.t0)
    assert_refused(home, slog.export(world.t0 + 100), tmp_path, "foreign_station")


def test_replayed_export(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    pkg = slog.export(world.t0 + 100)
    assert ingest_json(home, pkg, tmp_path)[0] == 0
    assert_refused(home, pkg, tmp_path, "replayed")


def test_tampered_package_bytes(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    pkg = bytearray(slog.export(world.t0 + 100))
    pkg[-10] ^= 0x01  # inside the signature or ciphertext
    before = db_dump(home)
    code, report = ingest_json(home, bytes(pkg), tmp_path)
    assert code == 2 and report["reason"] in {"bad_signature", "malformed"}, report
    assert db_dump(home) == before


def test_refusal_in_table_form_names_the_attack(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    path = tmp_path / "gap.bin"
    path.write_bytes(slog.export(world.t0 + 100, records=[recs[0], recs[2], recs[3], recs[4]]))
    r = run_hq("ingest-audit", "--home", str(home), str(path))
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "REFUSED (gap)" in text and "record 1 is missing" in text
    assert "nothing was stored" in text


# ------------------------------------------------------------------------ reconciliation


def kinds(report: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = report["violation_counts"]
    return counts


def test_over_daily_limit_across_exports(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    for i in range(6):
        slog.issue(f"dev-{i + 1:04d}", world.t0 + i)
    assert ingest_json(home, slog.export(world.t0 + 50), tmp_path)[0] == 0
    for i in range(6, 11):  # 11 on one day, limit 10: only the sum over exports shows it
        slog.issue(f"dev-{i + 1:04d}", world.t0 + 60 + i)
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 1 and report["status"] == "violations"
    assert kinds(report) == {"over_daily_limit": 1}
    [v] = report["violations"]
    assert v["device_id"] == "dev-0011" and v["kind"] == "over_daily_limit"


def test_over_quota_counts_burned_slots(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    for i in range(10):
        slog.issue(f"dev-{i + 1:04d}", world.t0 + i)
    for i in range(10):  # next day: 10 burned slots (crashes) use up the rest of the quota
        slog.burn(f"dev-{i + 11:04d}", world.t0 + 86400 + i)
    slog.issue("dev-0050", world.t0 + 86400 + 100)  # slot 21 of 20
    code, report = ingest_json(home, slog.export(world.t0 + 86400 + 200), tmp_path)
    assert code == 1
    assert kinds(report) == {"over_quota": 1}
    ents = report["entitlements"]
    assert isinstance(ents, list)
    assert (ents[0]["issued"], ents[0]["burned"], ents[0]["quota"]) == (11, 10, 20)


def test_window_range_duplicate_product(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0 - 7200)
    slog.issue("dev-0001", world.t0 - 7200)  # before the key-use window
    slog.issue("dev-0500", world.t0 + 1)  # id range is 1..100
    slog.issue("dev-0002", world.t0 + 2)
    slog.issue("dev-0002", world.t0 + 3)  # duplicate device id
    key = SoftwareKey.ephemeral()
    slog.issue("dev-0003", world.t0 + 4, key=key)
    slog.issue("dev-0004", world.t0 + 5, key=key)  # duplicate key
    slog.issue("dev-0005", world.t0 + 6, product="toaster")
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 1
    assert kinds(report) == {
        "outside_window": 1,
        "id_out_of_range": 1,
        "duplicate_device": 1,
        "duplicate_key": 1,
        "wrong_product": 1,
    }


def test_duplicate_across_stations(world: World, home: Path, tmp_path: Path) -> None:
    a, b = world.a.new_log(), world.b.new_log()
    a.imported(world.t0)
    a.issue("dev-0007", world.t0 + 1)
    assert ingest_json(home, a.export(world.t0 + 10), tmp_path)[0] == 0
    b.imported(world.t0)
    b.issue("dev-0007", world.t0 + 1)
    code, report = ingest_json(home, b.export(world.t0 + 10), tmp_path)
    assert code == 1 and kinds(report) == {"duplicate_device": 1}
    assert "station-a" in report["violations"][0]["detail"]


def test_manifest_mismatches(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    slog.issue("dev-0001", world.t0 + 1, in_manifest=False)  # record without certificate
    slog.issue("dev-0002", world.t0 + 2)
    unlisted = world.a.new_log()  # a certificate the audit log does not show
    unlisted.issue("dev-0003", world.t0 + 3)
    slog.manifest.extend(unlisted.manifest)
    slog.manifest.append(b"\x30\x03junk")
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 1
    assert kinds(report) == {
        "manifest_missing": 1,
        "manifest_unlisted": 1,
        "manifest_bad_certificate": 1,
    }


def test_a_run_in_order_that_starts_rolled_back_is_found(
    world: World, home: Path, tmp_path: Path
) -> None:
    """A run of issued records in ascending time whose first record is older than the
    import before it: each record of the run is a rollback, as checked one by one."""
    slog = world.a.new_log()
    slog.imported(world.t0 + 5000)
    slog.issue("dev-0001", world.t0 + 10)
    slog.issue("dev-0002", world.t0 + 11)
    slog.issue("dev-0003", world.t0 + 5001)  # the clock is back: no finding
    code, report = ingest_json(home, slog.export(world.t0 + 6000), tmp_path)
    assert code == 1
    assert kinds(report) == {"clock_rollback": 2}
    assert [v["seq"] for v in report["violations"]] == [1, 2]


def test_unknown_entitlement_and_clock_rollback(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0 + 5000)
    slog.issue("dev-0001", world.t0 + 5001)
    slog.issue("dev-0002", world.t0 + 10)  # the clock went back by more than the tolerance
    slog.record(
        "issued",
        {
            "device_id": "dev-0003",
            "serial": "abc",
            "key_id": bytes(range(32)),
            "product": "thermo",
            "entitlement_seq": 7,  # never issued by HQ
            "counter": 99,
        },
        world.t0 + 5002,
    )
    code, report = ingest_json(home, slog.export(world.t0 + 6000), tmp_path)
    assert code == 1
    assert kinds(report) == {"clock_rollback": 1, "unknown_entitlement": 1}


def test_violation_table_output(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    slog.imported(world.t0)
    slog.issue("dev-0500", world.t0 + 1)
    path = tmp_path / "e.bin"
    path.write_bytes(slog.export(world.t0 + 10))
    r = run_hq("ingest-audit", "--home", str(home), str(path))
    assert r.exit_code == 1, r.output
    assert "id_out_of_range" in r.output and "VIOLATIONS" in r.output


def test_missing_passphrase_is_exit_3(world: World, home: Path, tmp_path: Path) -> None:
    slog = world.a.new_log()
    five(slog, world.t0)
    path = tmp_path / "x.bin"
    path.write_bytes(slog.export(world.t0 + 100))
    r = run_hq("ingest-audit", "--home", str(home), str(path), env={})
    assert r.exit_code == 3
    assert "DEVTRUST_HQ_PASSPHRASE" in r.output
    assert ingest(home, path.read_bytes(), tmp_path).exit_code == 0  # still ingestible


def test_re_enrolment_needs_replace_and_restarts_the_log(tmp_path: Path) -> None:
    w = build_world(tmp_path / "w")
    slog = w.a.new_log()
    five(slog, w.t0)
    assert ingest_json(w.home, slog.export(w.t0 + 100), tmp_path)[0] == 0
    new = SoftStation("station-a")
    req = tmp_path / "again.enrol"
    req.write_bytes(new.enrolment())
    r = run_hq("enrol-station", "--home", str(w.home), str(req))
    assert r.exit_code == 1 and "already enrolled" in r.output
    # The old key still rules until --replace.
    assert_enrolled_key(w.home, w.a)
    r = run_hq("enrol-station", "--home", str(w.home), "--replace", str(req))
    assert r.exit_code == 0 and "replaced" in r.output
    assert_enrolled_key(w.home, new)
    # The old station key is no longer trusted: its next export is refused.
    slog.issue("dev-0020", w.t0 + 200)
    assert_refused(w.home, slog.export(w.t0 + 300), tmp_path, "foreign_station")


def test_import_order_counter_and_malformed_records(
    world: World, home: Path, tmp_path: Path
) -> None:
    slog = world.a.new_log()
    slog.issue("dev-0001", world.t0 + 1)  # before the entitlement_imported record
    slog.imported(world.t0 + 2)
    slog.issue("dev-0002", world.t0 + 3)
    slog.counter -= 2  # the station reuses a counter value
    slog.issue("dev-0003", world.t0 + 4)
    slog.record("issued", {"device_id": "dev-0004", "product": "thermo"}, world.t0 + 5)
    slog.record(
        "entitlement_imported",
        {"entitlement_id": "ent-forged", "entitlement_seq": 1, "counter_base": 0},
        world.t0 + 6,
    )
    slog.record("refused", {"device_id": "dev-0005", "reason": "over_daily_limit"}, world.t0 + 7)
    code, report = ingest_json(home, slog.export(world.t0 + 100), tmp_path)
    assert code == 1
    assert kinds(report) == {
        "entitlement_not_imported": 1,
        "counter_reuse": 1,
        "malformed_record": 1,
        "entitlement_mismatch": 1,
    }
    assert report["refused_at_station"] == {"over_daily_limit": 1}


def test_undecodable_record_is_refused_as_malformed(
    world: World, home: Path, tmp_path: Path
) -> None:
    slog = world.a.new_log()
    recs = five(slog, world.t0)
    pkg = slog.export(world.t0 + 100, records=[recs[0], b"\xff\x00", *recs[2:]])
    assert_refused(home, pkg, tmp_path, "malformed")


def test_two_entitlements_in_one_export(tmp_path: Path) -> None:
    """A second entitlement (fresh station CA certificate, sequence 2) mid-log: each issuance
    is reconciled against its own entitlement, and a device issued under both is caught."""
    from tests.fixtures.hq import entitle_args

    w = build_world(tmp_path / "w")
    slog = w.a.new_log()
    slog.imported(w.t0)
    slog.issue("dev-0001", w.t0 + 1)
    out = tmp_path / "second.bin"
    limits = {"--quota": "1", "--daily-limit": "1"}
    assert run_hq(*entitle_args(w.home, "station-a", out, **limits)).exit_code == 0
    w.a.import_entitlement(out.read_bytes())
    assert slog.policy.sequence == 2
    slog.imported(w.t0 + 2)
    slog.issue("dev-0001", w.t0 + 3)  # again, under entitlement 2
    slog.issue("dev-0002", w.t0 + 4)  # quota of entitlement 2 is 1
    code, report = ingest_json(w.home, slog.export(w.t0 + 100), tmp_path)
    assert code == 1, report
    assert kinds(report) == {"duplicate_device": 1, "over_quota": 1, "over_daily_limit": 1}
    assert [(e["issued"], e["quota"]) for e in report["entitlements"]] == [(1, 20), (2, 1)]


# --------------------------------------------------------------- quorum grants at HQ


def test_quorum_grant_lifts_the_daily_limit_only_when_its_evidence_verifies(
    tmp_path: Path,
) -> None:
    """A station that exceeded its daily limit under a 2-of-3 quorum is clean at HQ; a grant
    record whose evidence does not verify (one approval only) is named, and the extra
    issuances are over the daily limit."""
    approvers = [SoftwareKey.ephemeral() for _ in range(3)]
    files = []
    for i, key in enumerate(approvers):
        f = tmp_path / f"approver-{i}.pem"
        f.write_bytes(
            key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        files.append(str(f))
    home = tmp_path / "hq"
    assert run_hq("init", "--home", str(home), "--org", "Acme").exit_code == 0
    results = []
    for sid, m_signing, first in (("station-a", 2, 1), ("station-b", 1, 11)):
        st = SoftStation(sid)
        (tmp_path / f"{sid}.enrol").write_bytes(st.enrolment())
        assert (
            run_hq("enrol-station", "--home", str(home), str(tmp_path / f"{sid}.enrol")).exit_code
            == 0
        )
        out = tmp_path / f"{sid}.ent"
        args = entitle_args(home, sid, out, **{"--daily-limit": "3"})
        r = run_hq(*args, "--quorum", f"exceed_daily_limit:2:{','.join(files)}")
        assert r.exit_code == 0, r.output
        st.import_entitlement(out.read_bytes())
        assert st.policy is not None
        t0 = int(midnight_utc(1).timestamp()) + 3600
        day = st.policy.day_of(t0)
        request = ApprovalRequest(
            request_id=os.urandom(16),
            operation="exceed_daily_limit",
            params={
                "station_id": sid,
                "entitlement_id": st.policy.entitlement_id,
                "day": day,
                "extra": 2,
            },
            approvers=st.policy.quorum[0].approvers,
            m=2,
            created=t0 - 60,
            expires=t0 + 3600,
            requested_by="ops",
        )
        signed = [sign_approval(request, k, now=t0 - 30) for k in approvers[:m_signing]]
        slog = st.new_log()
        slog.imported(t0)
        for i in range(3):
            slog.issue(f"dev-{first + i:04d}", t0 + 10 + i)
        slog.record(
            "quorum_approved",
            {
                "operation": "exceed_daily_limit",
                "request_id": request.request_id,
                "approvers": "",
                "entitlement_seq": st.policy.sequence,
                "day": day,
                "extra": 2,
                "evidence": encode_bundle(request, signed),
            },
            t0 + 20,
        )
        for i in range(3, 5):
            slog.issue(f"dev-{first + i:04d}", t0 + 30 + i)
        results.append(ingest_json(home, slog.export(t0 + 100), tmp_path))
    (code_a, report_a), (code_b, report_b) = results
    assert code_a == 0 and report_a["status"] == "clean", report_a
    assert code_b == 1, report_b
    kinds = sorted(v["kind"] for v in report_b["violations"])
    assert kinds == ["invalid_quorum", "over_daily_limit", "over_daily_limit"], kinds


def test_quorum_grant_excuses_one_reissue_only_when_its_evidence_verifies(
    tmp_path: Path,
) -> None:
    """A verified ``reissue_device_certificate`` grant lets exactly one more certificate for
    its device id through reconciliation (also when the re-issue comes in a later export);
    a third certificate, a reused key, or a grant whose evidence does not verify are named."""
    approvers = [SoftwareKey.ephemeral() for _ in range(3)]
    files = []
    for i, key in enumerate(approvers):
        f = tmp_path / f"approver-{i}.pem"
        f.write_bytes(
            key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        files.append(str(f))
    home = tmp_path / "hq"
    assert run_hq("init", "--home", str(home), "--org", "Acme").exit_code == 0
    t0 = int(midnight_utc(1).timestamp()) + 3600
    stations = {}
    for sid in ("station-a", "station-b"):
        st = SoftStation(sid)
        (tmp_path / f"{sid}.enrol").write_bytes(st.enrolment())
        assert (
            run_hq("enrol-station", "--home", str(home), str(tmp_path / f"{sid}.enrol")).exit_code
            == 0
        )
        out = tmp_path / f"{sid}.ent"
        args = entitle_args(home, sid, out)
        r = run_hq(*args, "--quorum", f"reissue_device_certificate:2:{','.join(files)}")
        assert r.exit_code == 0, r.output
        st.import_entitlement(out.read_bytes())
        stations[sid] = st

    def grant(slog: StationLog, device_id: str, signers: int, when: int) -> None:
        policy = slog.policy
        request = ApprovalRequest(
            request_id=os.urandom(16),
            operation="reissue_device_certificate",
            params={
                "station_id": policy.station_id,
                "entitlement_id": policy.entitlement_id,
                "device_id": device_id,
            },
            approvers=policy.quorum[0].approvers,
            m=2,
            created=when - 60,
            expires=when + 3600,
            requested_by="ops",
        )
        signed = [sign_approval(request, k, now=when - 30) for k in approvers[:signers]]
        slog.record(
            "quorum_approved",
            {
                "operation": "reissue_device_certificate",
                "request_id": request.request_id,
                "approvers": "",
                "entitlement_seq": policy.sequence,
                "device_id": device_id,
                "evidence": encode_bundle(request, signed),
            },
            when,
        )

    # Station A: grants for dev-0001 and dev-0002 in export 1, used in exports 1 and 2.
    slog = stations["station-a"].new_log()
    slog.imported(t0)
    slog.issue("dev-0001", t0 + 1)
    reused = SoftwareKey.ephemeral()
    slog.issue("dev-0002", t0 + 2, key=reused)
    grant(slog, "dev-0001", 2, t0 + 3)
    grant(slog, "dev-0002", 2, t0 + 4)
    slog.issue("dev-0001", t0 + 5)  # the approved re-issue, new key
    code, report = ingest_json(home, slog.export(t0 + 10), tmp_path)
    assert code == 0 and report["status"] == "clean", report
    slog.issue("dev-0003", t0 + 20)  # an ordinary device does not use a grant
    code, report = ingest_json(home, slog.export(t0 + 30), tmp_path)
    assert code == 0 and report["status"] == "clean", report
    slog.issue("dev-0002", t0 + 40, key=reused)  # grant from export 1, but the key is old
    slog.issue("dev-0001", t0 + 41)  # a third certificate: its grant is used up
    code, report = ingest_json(home, slog.export(t0 + 50), tmp_path)
    assert code == 1, report
    found = sorted((v["kind"], v["device_id"]) for v in report["violations"])
    assert found == [("duplicate_device", "dev-0001"), ("duplicate_key", "dev-0002")], found

    # Station B: evidence with one approval of the two needed excuses nothing.
    slog = stations["station-b"].new_log()
    slog.imported(t0)
    slog.issue("dev-0011", t0 + 1)
    grant(slog, "dev-0011", 1, t0 + 2)
    slog.issue("dev-0011", t0 + 3)
    code, report = ingest_json(home, slog.export(t0 + 10), tmp_path)
    assert code == 1, report
    found = sorted((v["kind"], v["device_id"]) for v in report["violations"])
    assert found == [("duplicate_device", "dev-0011"), ("invalid_quorum", "dev-0011")], found


# ----------------------------------------------- the worker-process path of a large export


@pytest.fixture
def in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode every export in worker processes, two records a chunk (hq.audit_chunks)."""
    from hq import audit_chunks

    monkeypatch.setattr(audit_chunks, "POOL_THRESHOLD", 1)
    monkeypatch.setattr(audit_chunks, "CHUNK_SIZE", 2)


def test_worker_path_clean_and_continuation(
    world: World, home: Path, tmp_path: Path, in_workers: None
) -> None:
    test_clean_export_then_continuation(world, home, tmp_path)


def test_worker_path_violations(world: World, home: Path, tmp_path: Path, in_workers: None) -> None:
    test_window_range_duplicate_product(world, home, tmp_path)


def test_worker_path_rewritten_entry(
    world: World, home: Path, tmp_path: Path, in_workers: None
) -> None:
    test_rewritten_entry(world, home, tmp_path)
