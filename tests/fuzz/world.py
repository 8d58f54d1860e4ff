"""The genuine artifacts the fuzzers start from, made by the real code paths.

One prepared HQ (``tests.fixtures.hq.build_world``: software root, stations A and B
enrolled and entitled) plus an enrolled site, and every kind of file or message that
crosses a trust boundary: enrolments, CSRs, certificates, CRLs, entitlements, audit
exports, site bundles and reports, revocation lists, approvals, registration messages.
Mutations of these reach deep into each parser; random bytes alone stop at the first
length check.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from hq.approvals import (
    ADD_APPROVER,
    REVOKE_STATION_CA,
    add_approver,
    add_approver_params,
    create_request,
    revoke_station_ca_params,
)
from hq.home import HqHome, HqSecrets
from hq.site import enrol_site
from signers.software import SoftwareKey
from tests.fixtures.hq import PASSPHRASE, SoftStation, World, build_world, run_hq
from tests.fixtures.pki import Pki, shared_pki
from tests.fixtures.registration import make_dev, make_request
from trustcore.crl import RevokedEntry, build_crl
from trustcore.csr import build_csr, build_device_csr
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.messages import CT_AUDIT_EXPORT, SiteEnrolment
from trustcore.payload import PayloadKey
from trustcore.profiles import HqRole
from trustcore.quorum import encode_bundle, sign_approval
from trustcore.registration import build_error_response, build_key_update, issue_ldevid
from trustcore.renewal import build_renewal_request
from trustcore.sealed import open_package, peek
from trustcore.site_report import SeenCertificate, SiteReport, seal_site_report

DER = serialization.Encoding.DER


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


@dataclass
class Registration:
    """One device's registration exchange on the shared test PKI (``tests.fixtures.pki``)."""

    pki: Pki
    device_id: DeviceId
    request: bytes
    nonce: bytes
    digest: bytes
    ldevid_public: object
    response_ok: bytes
    response_refused: bytes
    key_update: bytes
    renewal: bytes


@dataclass(eq=False)
class FuzzWorld:
    """An HQ with its stations and one site, and a genuine sample of every artifact."""

    base: Path
    hq: World
    secrets: HqSecrets
    site_id: SiteId
    site_key: SoftwareKey
    site_transport: SoftwareKey
    site_ca: x509.Certificate
    seeds: dict[str, list[bytes]] = field(default_factory=dict)
    registration: Registration | None = None
    #: HQ database bytes after the build: HQ targets restore it after an accepted input so
    #: every input meets the same state (an accepted report would make the rest replays).
    db_snapshot: bytes = b""

    @property
    def home(self) -> HqHome:
        return HqHome.open(self.hq.home)

    @property
    def root(self) -> x509.Certificate:
        return self.home.root_certificate()

    def restore(self) -> None:
        (self.hq.home / "hq.sqlite").write_bytes(self.db_snapshot)


def _site(home: HqHome, secrets: HqSecrets, site: str) -> tuple[SoftwareKey, SoftwareKey, bytes]:
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
    request = SiteEnrolment.create(SiteId(site), csr, ca, transport.public_key()).encode()
    del secrets
    return ca, transport, request


def _registration() -> Registration:
    pki = shared_pki()
    dev = make_dev("dev-100024")
    nonce = os.urandom(32)
    request = make_request(pki, dev, nonce=nonce)
    digest = hashlib.sha256(request).digest()
    site_signer = SoftwareKey(pki.site_key)
    common = {
        "device_id": dev.device_id,
        "nonce": nonce,
        "request_digest": digest,
        "site_ca_der": _der(pki.site_ca),
        "site_signer": site_signer,
    }
    payload_key = PayloadKey.generate()
    ok = issue_ldevid(
        ldevid_public_key=dev.ldevid_key.public_key(),
        wrap_public_key=dev.wrap_key.public_key(),
        site_ca=pki.site_ca,
        organization="Acme",
        payload_key=payload_key,
        now=pki.now,
        **common,  # type: ignore[arg-type]
    )
    refused = build_error_response(reason="not_admitted", **common)  # type: ignore[arg-type]
    update = build_key_update(
        device_id=dev.device_id,
        wrap_key=dev.wrap_key.public_key(),
        payload_key=PayloadKey.generate(),
        issued=int(pki.now.timestamp()),
        site_signer=site_signer,
    )
    renewal = build_renewal_request(
        device_id=pki.device_id,
        nonce=os.urandom(32),
        time=int(pki.now.timestamp()),
        csr_der=build_device_csr(SoftwareKey.ephemeral(), pki.device_id),
        ldevid_der=_der(pki.ldevid),
        ldevid_key=SoftwareKey(pki.ldevid_key),
    )
    return Registration(
        pki,
        dev.device_id,
        request,
        nonce,
        digest,
        dev.ldevid_key.public_key(),
        ok.response,
        refused,
        update,
        renewal,
    )


def build_fuzz_world(base: Path) -> FuzzWorld:
    """Build the world under ``base`` (a few seconds: one HQ, two stations, one site)."""
    hq = build_world(base)
    passphrase = base / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    secrets = HqSecrets(passphrase_file=passphrase)
    home = HqHome.open(hq.home)
    site_key, site_transport, site_enrolment = _site(home, secrets, "site-1")
    site_ca = enrol_site(home, site_enrolment, secrets).site_ca_cert
    _, _, other_site_enrolment = _site(home, secrets, "site-2")

    # factory certificates from station A, recorded in an audit export
    slog = hq.a.new_log()
    slog.imported(hq.t0)
    devices = [slog.issue(f"dev-{i:04d}", hq.t0 + 10 + i) for i in (1, 2)]
    audit_package = slog.export(hq.t0 + 100)
    assert hq.a.ca_cert is not None and hq.a.audit_receiver is not None

    # a station CRL (station A's CA key) and a root-issued artifact set
    now = datetime.now(UTC)
    station_crl = build_crl(
        hq.a.ca_cert,
        hq.a.ca_key.private_key(),
        revoked=(RevokedEntry(CertSerial(devices[0].serial_number), now - timedelta(hours=1)),),
        crl_number=1,
        this_update=now - timedelta(minutes=5),
        next_update=now + timedelta(days=7),
    ).public_bytes(DER)

    # a site report of what site-1 saw
    seen = tuple(
        SeenCertificate(
            StationId("station-a"),
            CertSerial(c.serial_number),
            DeviceId(f"dev-{i:04d}"),
            int(time.time()),
            True,
            _der(c),
        )
        for i, c in zip((1, 2), devices, strict=True)
    )
    report = SiteReport(SiteId("site-1"), 1, int(time.time()), seen, ())
    report_package = seal_site_report(report, site_ca_key=site_key, site_ca_cert=site_ca)

    # a site bundle and an HQ revocation list, written by the hq CLI
    bundle_path = base / "site-1.bundle"
    r = run_hq(
        "site", "bundle", "--home", str(hq.home), "--site", "site-1",
        "--admit-station", "station-a", "--out", str(bundle_path),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    statement_path = base / "time-statement.bin"
    r = run_hq(
        "time-statement", "--home", str(hq.home), "--station", "station-a",
        "--out", str(statement_path),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    revocations_path = base / "revocations.bin"
    r = run_hq("publish-revocations", "--home", str(hq.home), "--out", str(revocations_path))
    assert r.exit_code == 0, r.output

    # quorum evidence: a request HQ wrote and its approval, as one bundle and as files
    alice, bob = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    add_approver(home, "alice", alice.public_key())
    adding = create_request(
        home, ADD_APPROVER, add_approver_params("bob", bob.public_key()), requested_by="fuzz"
    )
    bundle = encode_bundle(adding, [sign_approval(adding, alice, now=adding.created)])
    add_approver(home, "bob", bob.public_key(), [bundle])
    approval_request = create_request(
        home, REVOKE_STATION_CA, revoke_station_ca_params("station-a"), requested_by="fuzz"
    )
    approvals = [
        sign_approval(approval_request, k, now=approval_request.created) for k in (alice, bob)
    ]

    # a station enrolment and a station CSR / device CSR
    station_c = SoftStation("station-c")
    registration = _registration()
    entitlement = (base / "station-a.entitlement").read_bytes()
    device_csr = build_device_csr(SoftwareKey.ephemeral(), DeviceId("dev-0007"))

    seeds = {
        "csr": [device_csr, build_csr(station_c.ca_key, _name("station-c"))],
        "certificate": [_der(c) for c in devices] + [_der(hq.a.ca_cert), _der(site_ca)],
        "crl": [station_crl, registration.pki.station_crl.public_bytes(DER)],
        "station_enrolment": [station_c.enrolment(), hq.a.enrolment()],
        "site_enrolment": [other_site_enrolment, site_enrolment],
        "entitlement": [entitlement],
        "audit_export": [audit_package],
        "site_bundle": [bundle_path.read_bytes()],
        "site_report": [report_package],
        "site_report_payload": [report.encode()],
        "revocation_list": [revocations_path.read_bytes()],
        "approvals": [
            encode_bundle(approval_request, approvals),
            approval_request.encode(),
            approvals[0].encode(),
        ],
        "registration_request": [registration.request],
        "registration_response": [registration.response_ok, registration.response_refused],
        "key_update": [registration.key_update],
        "renewal_request": [registration.renewal],
        "station_crl": [station_crl],
    }
    seeds["sealed_package"] = [
        *seeds["entitlement"],
        *seeds["audit_export"],
        *seeds["site_bundle"],
        *seeds["site_report"],
        *seeds["revocation_list"],
        statement_path.read_bytes(),
    ]
    seeds["audit_export_payload"] = [_audit_payload(audit_package, hq, secrets)]
    world = FuzzWorld(
        base, hq, secrets, SiteId("site-1"), site_key, site_transport, site_ca, seeds, registration
    )
    world.db_snapshot = (hq.home / "hq.sqlite").read_bytes()
    return world


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _audit_payload(package: bytes, hq: World, secrets: HqSecrets) -> bytes:
    """The plaintext payload of an audit export (opened with HQ's audit receiver key)."""
    home = HqHome.open(hq.home)
    header = peek(package)
    return open_package(
        package,
        receiver=home.role_key(HqRole.AUDIT_RECEIVER, secrets),
        expected_content_type=CT_AUDIT_EXPORT,
        trusted_sender_public=header.sender_certificate().public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 24,
    ).payload
