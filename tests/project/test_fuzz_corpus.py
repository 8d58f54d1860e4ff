"""The inputs that once crashed a parser, replayed: through the fuzz target they were found
with (tests/fuzz_corpus/<target>/), and through the ``hq`` command an operator would run.

A crash used to be a Python traceback and exit 1 — which for ``hq ingest-audit`` and
``hq ingest-report`` means "accepted with findings". Now each is a refusal: one line with
the reason, the command's documented exit code, nothing stored. The named cases below are
the 17 crashes of issue 11 by class (an off-by-one OID in an enrolment CSR or transport key,
a CN that is not UTF-8, an undecodable subject, an unknown curve, an invalid EC point).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization

from tests.fixtures.hq import db_dump, run_hq
from tests.fuzz.targets import CORPUS, TARGETS, corpus_files, run_one
from tests.fuzz.world import FuzzWorld, build_fuzz_world
from trustcore.sealed import seal_package
from trustcore.site_report import CT_SITE_REPORT

DER = serialization.Encoding.DER
P256_OID = bytes.fromhex("06082a8648ce3d030107")  # prime256v1
ECDSA_SHA256_OID = bytes.fromhex("06082a8648ce3d040302")  # ecdsa-with-SHA256


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzWorld]:
    yield build_fuzz_world(tmp_path_factory.mktemp("corpus"))


CASES = [
    (d.name, f.name) for d in sorted(CORPUS.iterdir()) if d.is_dir() for f in corpus_files(d.name)
]


def test_the_corpus_is_kept() -> None:
    assert len(CASES) >= 17, CASES
    assert {name for name, _ in CASES} <= set(TARGETS)


@pytest.mark.parametrize(("target", "file"), CASES)
def test_crashing_input_is_refused_cleanly(world: FuzzWorld, target: str, file: str) -> None:
    data = (CORPUS / target / file).read_bytes()
    crash = run_one(TARGETS[target], world, data)
    assert crash is None, f"{crash.signature}: {crash.message}"


# ---------------------------------------------------------------------- through the CLI


def _one_line_refusal(r: Result, code: int) -> str:
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    line = lines[0]
    assert not re.search(r"\b(\w+): \1:", line), f"reason repeated: {line}"
    return line


def _cli(world: FuzzWorld, target: str, path: Path) -> tuple[list[str], int]:
    home = str(world.hq.home)
    return {
        "hq_enrol_station": (["enrol-station", "--home", home, str(path)], 1),
        "hq_enrol_site": (["site", "enrol", "--home", home, str(path)], 1),
        "hq_ingest_audit": (["ingest-audit", "--home", home, str(path), "--json"], 2),
        "hq_ingest_report": (["ingest-report", "--home", home, str(path), "--json"], 2),
        "hq_station_crl": (["station-crl", "--home", home, "--station", "station-a", str(path)], 1),
    }[target]


HQ_CASES = [c for c in CASES if c[0] in {"hq_enrol_station", "hq_enrol_site", "hq_ingest_audit",
                                         "hq_ingest_report", "hq_station_crl"}]  # fmt: skip


@pytest.mark.parametrize(("target", "file"), HQ_CASES)
def test_crashing_input_through_the_command(
    world: FuzzWorld, tmp_path: Path, target: str, file: str
) -> None:
    path = tmp_path / file
    path.write_bytes((CORPUS / target / file).read_bytes())
    args, code = _cli(world, target, path)
    before = db_dump(world.hq.home)
    line = _one_line_refusal(run_hq(*args), code)
    if "--json" in args:
        assert json.loads(line)["status"] == "refused"
    else:
        assert line.startswith("error: ")
    assert db_dump(world.hq.home) == before


# ------------------------------------------------------ the crash classes of issue 11


def _swap(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data and len(old) == len(new)
    return data.replace(old, new, 1)


def _run(world: FuzzWorld, tmp_path: Path, target: str, data: bytes) -> str:
    path = tmp_path / f"{target}.bin"
    path.write_bytes(data)
    args, code = _cli(world, target, path)
    before = db_dump(world.hq.home)
    line = _one_line_refusal(run_hq(*args), code)
    assert db_dump(world.hq.home) == before
    return line


@pytest.mark.parametrize("kind", ["station_enrolment", "site_enrolment"])
@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        ("csr signature OID", ECDSA_SHA256_OID, ECDSA_SHA256_OID[:-1] + b"\x09"),
        ("key curve OID", P256_OID, P256_OID[:-1] + b"\x08"),
    ],
)
def test_off_by_one_oid_in_an_enrolment(
    world: FuzzWorld, tmp_path: Path, kind: str, what: str, old: bytes, new: bytes
) -> None:
    """``hq enrol-station`` / ``hq site enrol``: the CSR's signature algorithm, or the curve
    of the CSR key or the transport key, one byte off: ``UnsupportedAlgorithm`` used to
    escape trustcore/csr.py and trustcore/messages.py."""
    seed = world.seeds[kind][0]
    target = "hq_enrol_station" if kind == "station_enrolment" else "hq_enrol_site"
    mutated = _swap(seed, old, new)
    line = _run(world, tmp_path, target, mutated)
    # the CSR comes first: an unknown signature is malformed, an unknown curve an unusable key
    reason = "malformed" if old == ECDSA_SHA256_OID else "wrong_key_type"
    assert line.startswith(f"error: {reason}: "), (what, line)
    if old == P256_OID:  # the transport key comes after the CSR: its curve too
        tail = seed.rindex(P256_OID)
        mutated = seed[:tail] + new + seed[tail + len(old) :]
        line = _run(world, tmp_path, target, mutated)
        assert line.startswith("error: malformed: ") and "transport key" in line, line


def _sender_cert_variants(world: FuzzWorld, cert_der: bytes, cn: bytes) -> dict[str, bytes]:
    """A sender certificate broken the ways the issue lists (same length, so the package
    around it stays well-formed; its signature no longer matters: it is parsed first)."""
    spki = world.site_ca.public_key() if cn.startswith(b"Site") else world.hq.a.ca_key.public_key()
    point = spki.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return {
        "cn_not_utf8": _swap(cert_der, cn, b"\xff" * len(cn)),
        # the CN's UTF8String tag made an INTEGER
        "undecodable_subject": _swap(
            cert_der, b"\x0c" + bytes([len(cn)]), b"\x02" + bytes([len(cn)])
        ),
        "unknown_curve": _swap(cert_der, P256_OID, P256_OID[:-1] + b"\x08"),
        "invalid_ec_point": _swap(cert_der, point, point[:-1] + bytes([point[-1] ^ 1])),
    }


@pytest.mark.parametrize(
    "defect", ["cn_not_utf8", "undecodable_subject", "unknown_curve", "invalid_ec_point"]
)
def test_broken_sender_certificate_in_an_audit_export(
    world: FuzzWorld, tmp_path: Path, defect: str
) -> None:
    """``hq ingest-audit``: exit 2 ``malformed``, never exit 1 ("accepted with findings")."""
    assert world.hq.a.ca_cert is not None
    cert = world.hq.a.ca_cert.public_bytes(DER)
    broken = _sender_cert_variants(world, cert, b"Factory Station CA station-a")[defect]
    package = _swap(world.seeds["audit_export"][0], cert, broken)
    report = json.loads(_run(world, tmp_path, "hq_ingest_audit", package))
    assert (report["status"], report["reason"]) == ("refused", "malformed"), report


@pytest.mark.parametrize(
    "defect", ["cn_not_utf8", "undecodable_subject", "unknown_curve", "invalid_ec_point"]
)
def test_broken_sender_certificate_in_a_site_report(
    world: FuzzWorld, tmp_path: Path, defect: str
) -> None:
    """``hq ingest-report``: exit 2 ``malformed``."""
    cert = world.site_ca.public_bytes(DER)
    broken = _sender_cert_variants(world, cert, b"Site CA site-1")[defect]
    package = _swap(world.seeds["site_report"][0], cert, broken)
    report = json.loads(_run(world, tmp_path, "hq_ingest_report", package))
    assert (report["status"], report["reason"]) == ("refused", "malformed"), report


def test_broken_evidence_certificate_in_a_signed_site_report(
    world: FuzzWorld, tmp_path: Path
) -> None:
    """A genuinely signed report whose evidence certificate has an invalid X.509 version
    (``InvalidVersion`` used to escape trustcore/site_report.py): the report is authentic, so
    it is accepted and the certificate is a finding (``invalid_evidence``, exit 1)."""
    payload = world.seeds["site_report_payload"][0]
    # the first evidence certificate: version [0] INTEGER 2 -> 7
    broken_payload = _swap(payload, bytes.fromhex("a003020102"), bytes.fromhex("a003020107"))
    package = seal_package(
        content_type=CT_SITE_REPORT,
        payload=broken_payload,
        sender=world.site_key,
        sender_cert=world.site_ca,
        receiver_public=None,
        sequence=1,
        created=1,
    )
    path = tmp_path / "report.bin"
    path.write_bytes(package)
    try:
        r = run_hq("ingest-report", "--home", str(world.hq.home), str(path), "--json")
        report = json.loads(_one_line_refusal(r, 1))
    finally:
        world.restore()
    assert report["status"] == "findings"
    assert "invalid_evidence" in report["finding_counts"], report
