"""Foreign origin: what HQ receives is checked against what this HQ itself issued, not only
against key ids — and two stations are never entitled to the same device ids by accident.

The issue's case first: a second HQ that enrolled the same site keys used to store the first
HQ's site report (only key ids were compared; ``ingest-audit`` already refused the
equivalent with ``foreign_station``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from hq.approvals import ADD_APPROVER, add_approver, add_approver_params, create_request
from hq.errors import HqError
from hq.home import HqHome, HqSecrets
from hq.site import enrol_site
from hq.store import HqStore
from signers.software import SoftwareKey
from tests.fixtures.hq import PASSPHRASE, build_world, db_dump, entitle_args, run_hq
from trustcore.csr import build_csr
from trustcore.entitlement import DeviceIdRule
from trustcore.identity import SiteId
from trustcore.messages import SiteEnrolment
from trustcore.quorum import encode_bundle, sign_approval
from trustcore.site_report import SiteReport, seal_site_report


def _init(home: Path) -> HqHome:
    r = run_hq("init", "--home", str(home), "--org", "Acme")
    assert r.exit_code == 0, r.output
    return HqHome.open(home)


def _report(tmp_path: Path, key: SoftwareKey, cert: x509.Certificate, seq: int = 1) -> Path:
    report = SiteReport(SiteId("site-1"), seq, int(time.time()), (), ())
    path = tmp_path / f"report-{seq}-{cert.serial_number:x}.bin"
    path.write_bytes(seal_site_report(report, site_ca_key=key, site_ca_cert=cert))
    return path


def _ingest_report(home: Path, path: Path) -> tuple[int, dict[str, object]]:
    r = run_hq("ingest-report", "--home", str(home), str(path), "--json")
    return r.exit_code, json.loads(r.output.strip().splitlines()[-1])


def test_a_site_report_for_another_hq_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two HQs enrolled the same site keys (one enrolment request, sent to both). Each
    accepts only the reports signed under the site CA certificate it issued itself."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", PASSPHRASE)
    one, two = _init(tmp_path / "one"), _init(tmp_path / "two")
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")]))
    request = SiteEnrolment.create(SiteId("site-1"), csr, ca, transport.public_key()).encode()
    cert_one = enrol_site(one, request, HqSecrets()).site_ca_cert
    cert_two = enrol_site(two, request, HqSecrets()).site_ca_cert
    assert cert_one.public_key() == cert_two.public_key()  # the same key, two certificates

    # HQ two is handed HQ one's report: same site key, same site id, HQ one's certificate.
    for_one = _report(tmp_path, ca, cert_one)
    before = db_dump(two.path)
    code, out = _ingest_report(two.path, for_one)
    assert (code, out["status"], out["reason"]) == (2, "refused", "foreign_site"), out
    assert "not the one this HQ issued" in str(out["message"])
    assert db_dump(two.path) == before, "a refused report must store nothing"

    # Each HQ takes its own site's report.
    code, out = _ingest_report(one.path, for_one)
    assert (code, out["status"]) == (0, "clean"), out
    code, out = _ingest_report(two.path, _report(tmp_path, ca, cert_two))
    assert (code, out["status"]) == (0, "clean"), out


def test_a_self_made_site_ca_certificate_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The site's own key in a certificate HQ never issued (same subject, self-signed)."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", PASSPHRASE)
    home = _init(tmp_path / "hq")
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")]))
    request = SiteEnrolment.create(SiteId("site-1"), csr, ca, transport.public_key()).encode()
    issued = enrol_site(home, request, HqSecrets()).site_ca_cert
    forged = (
        x509.CertificateBuilder()
        .subject_name(issued.subject)
        .issuer_name(issued.issuer)
        .public_key(issued.public_key())
        .serial_number(issued.serial_number)
        .not_valid_before(issued.not_valid_before_utc)
        .not_valid_after(issued.not_valid_after_utc)
    )
    for ext in issued.extensions:
        forged = forged.add_extension(ext.value, ext.critical)
    self_signed = forged.sign(ca.private_key(), issued.signature_hash_algorithm)  # type: ignore[arg-type]
    code, out = _ingest_report(home.path, _report(tmp_path, ca, self_signed))
    assert (code, out["reason"]) == (2, "foreign_site"), out


def test_approvals_for_another_hq_authorise_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two HQs share an approver (the same person, the same key). Approvals of a request
    HQ one wrote do not authorise the same operation at HQ two (``foreign_request``)."""
    monkeypatch.setenv("DEVTRUST_HQ_PASSPHRASE", PASSPHRASE)
    one, two = _init(tmp_path / "one"), _init(tmp_path / "two")
    alice, bob = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    for hq in (one, two):
        add_approver(hq, "alice", alice.public_key())
    params = add_approver_params("bob", bob.public_key())
    request = create_request(one, ADD_APPROVER, params, requested_by="ops")
    evidence = encode_bundle(request, [sign_approval(request, alice, now=request.created)])
    before = db_dump(two.path)
    with pytest.raises(HqError) as refused:
        add_approver(two, "bob", bob.public_key(), [evidence])
    assert refused.value.reason == "foreign_request", refused.value
    assert db_dump(two.path) == before
    add_approver(one, "bob", bob.public_key(), [evidence])  # where it was written: accepted


# ------------------------------------------------------------------- overlapping ranges


def _entitle(
    home: Path, station: str, out: Path, *, first: int, last: int, **more: str
) -> list[str]:
    args = entitle_args(
        home, station, out, **{"--id-first": str(first), "--id-last": str(last)}, **more
    )
    args.remove("--allow-overlap")  # the helper overrides the check; these tests do not
    return args


def test_overlapping_device_ids_are_refused_unless_overridden(tmp_path: Path) -> None:
    world = build_world(tmp_path)  # stations a and b, both dev-0001..dev-0100 (overridden)
    home = world.home
    # a third station enrols; its range must not meet a or b's
    from tests.fixtures.hq import SoftStation

    c = SoftStation("station-c")
    (tmp_path / "c.enrol").write_bytes(c.enrolment())
    assert run_hq("enrol-station", "--home", str(home), str(tmp_path / "c.enrol")).exit_code == 0
    before = db_dump(home)
    out = tmp_path / "c-1.ent"
    r = run_hq(*_entitle(home, "station-c", out, first=100, last=200))
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("error: overlapping_range: device ids dev-0100..dev-0200 overlap"), line
    assert "station station-a entitlement 1" in line and "station station-b" in line
    assert len(line.splitlines()) == 1 and not out.exists()
    assert db_dump(home) == before, "a refused entitlement changes nothing"

    # the next free range is fine, and so is the same station's own range again
    r = run_hq(*_entitle(home, "station-c", out, first=101, last=200))
    assert r.exit_code == 0, r.output
    r = run_hq(*_entitle(home, "station-c", tmp_path / "c-2.ent", first=150, last=300))
    assert r.exit_code == 0, r.output
    # a longer prefix inside another station's ids: "dev-00" + 2 digits = dev-0000..dev-0099
    r = run_hq(*_entitle(home, "station-c", tmp_path / "c-3.ent", first=0, last=5,
                         **{"--id-prefix": "dev-00", "--id-digits": "2"}))  # fmt: skip
    assert r.exit_code == 1 and "overlapping_range" in r.output, r.output

    # the explicit override: issued, warned about, and recorded with the entitlement
    r = run_hq(*_entitle(home, "station-c", tmp_path / "c-4.ent", first=50, last=60),
               "--allow-overlap")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning: overlapping_range (overridden, recorded)" in r.output
    store = HqStore.open(HqHome.open(home).store_location)
    try:
        overrides = store.entitlement_overrides()
    finally:
        store.close()
    mine = [o for o in overrides if o[0] == "station-c"]
    assert len(mine) == 1 and mine[0][2] == "overlapping_range", overrides
    assert "dev-0050..dev-0060 overlap station station-a entitlement 1" in mine[0][3]
    assert any(o[0] == "station-b" for o in overrides)  # the world's own override


def _ids(rule: DeviceIdRule) -> set[str]:
    return {rule.device_id(n) for n in range(rule.first, rule.last + 1)}


@st.composite
def _rules(draw: st.DrawFn) -> DeviceIdRule:
    prefix = draw(st.sampled_from(["d", "d1", "d12", "d0", "e", "d-", "dx"]))
    digits = draw(st.integers(1, 3))
    a, b = draw(st.integers(0, 10**digits - 1)), draw(st.integers(0, 10**digits - 1))
    return DeviceIdRule(prefix, min(a, b), max(a, b), digits)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_rules(), _rules())
def test_overlap_is_exactly_a_shared_device_id(a: DeviceIdRule, b: DeviceIdRule) -> None:
    assert a.overlaps(b) == b.overlaps(a) == bool(_ids(a) & _ids(b))
