"""One fuzz target per parser that sees outside input.

A target takes the bytes an attacker controls and runs them through the same entry point
production runs (the ``hq`` functions behind each CLI command, the registrar's and the
device's parsers). Its contract: it returns, or raises the documented exception root of its
package (``TrustCoreError`` in the core, ``HqError`` at HQ) — a clean refusal. Anything else
escaping is a crash: a traceback for an operator, or an exception a caller does not expect.

``*_payload`` targets re-seal the mutated payload with the genuine sender key, so the
mutations reach the payload parsers behind the signature (what a stolen key, or a bug in
a genuine sender, could send).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from hq.errors import HqError
from tests.fuzz.world import FuzzWorld
from trustcore import cbor
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.keys import KeyAgreement
from trustcore.messages import (
    CT_AUDIT_EXPORT,
    CT_ENTITLEMENT,
    CT_TIME_STATEMENT,
    AuditExportPayload,
    EntitlementPayload,
    SiteEnrolment,
    StationEnrolment,
    TimeStatement,
)
from trustcore.profiles import (
    HqRole,
    device_id_from_certificate,
    site_id_from_certificate,
    station_id_from_certificate,
)
from trustcore.sealed import open_package, peek, seal_package
from trustcore.site_bundle import CT_SITE_BUNDLE, SiteBundlePayload, verify_site_bundle
from trustcore.site_report import CT_SITE_REPORT, SiteReport

#: Where crashing inputs are kept (one folder per target); replayed by
#: tests/project/test_fuzz_corpus.py.
CORPUS = Path(__file__).resolve().parent.parent / "fuzz_corpus"


@dataclass(frozen=True)
class Target:
    name: str
    seeds: str  # key of FuzzWorld.seeds
    run: Callable[[FuzzWorld, bytes], object]
    allowed: tuple[type[BaseException], ...]
    #: HQ targets change the database when an input is accepted: restore it afterwards.
    restores: bool = False


def _now(world: FuzzWorld) -> datetime:
    del world
    return datetime.now(UTC)


# ----------------------------------------------------------------------- trust core


def _csr(world: FuzzWorld, data: bytes) -> object:
    from trustcore.csr import validate_csr

    return validate_csr(data)


@functools.cache
def _verifier(world: FuzzWorld) -> object:
    from trustcore.verify import ChainVerifier

    assert world.hq.a.ca_cert is not None
    return ChainVerifier([world.root], [world.hq.a.ca_cert], require_crl=False)


def _certificate(world: FuzzWorld, data: bytes) -> object:
    from trustcore.verify import ChainVerifier, load_certificate

    cert = load_certificate(data)
    for extract in (device_id_from_certificate, station_id_from_certificate):
        with contextlib.suppress(TrustCoreError):
            extract(cert)
    with contextlib.suppress(TrustCoreError):
        site_id_from_certificate(cert)
    verifier = _verifier(world)
    assert isinstance(verifier, ChainVerifier)
    return verifier.verify(cert, now=_now(world), require_device_id=True)


def _crl(world: FuzzWorld, data: bytes) -> object:
    from trustcore.crl import verify_crl

    assert world.hq.a.ca_cert is not None
    return verify_crl(data, world.hq.a.ca_cert, now=_now(world))


def _station_enrolment(world: FuzzWorld, data: bytes) -> object:
    return StationEnrolment.decode(data).verify()


def _site_enrolment(world: FuzzWorld, data: bytes) -> object:
    return SiteEnrolment.decode(data).verify()


def _receiver_for(world: FuzzWorld, content_type: str) -> KeyAgreement | None:
    if content_type == CT_ENTITLEMENT:
        return world.hq.a.transport
    if content_type == CT_SITE_BUNDLE:
        return world.site_transport
    if content_type == CT_AUDIT_EXPORT:
        return _audit_key(world)
    return None


@functools.cache
def _audit_key(world: FuzzWorld) -> KeyAgreement:
    return world.home.role_key(HqRole.AUDIT_RECEIVER, world.secrets)


@functools.cache
def _entitlement_signer(world: FuzzWorld) -> object:
    return world.home.role_key(HqRole.ENTITLEMENT_SIGNER, world.secrets)


def _sealed_package(world: FuzzWorld, data: bytes) -> object:
    """Any package, as every receiver opens it: header, sender certificate, then the
    signature and decryption with the sender key from that certificate."""
    from cryptography.hazmat.primitives.asymmetric import ec

    header = peek(data)
    public = header.sender_certificate().public_key()  # parsed by sender_certificate()

    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None
    opened = open_package(
        data,
        receiver=_receiver_for(world, header.content_type) if header.encrypted else None,
        expected_content_type=header.content_type,
        trusted_sender_public=public,
        last_sequence=None,
        max_size=1 << 24,
    )
    decoders: dict[str, Callable[[bytes], object]] = {
        CT_ENTITLEMENT: EntitlementPayload.decode,
        CT_AUDIT_EXPORT: lambda p: AuditExportPayload.decode(p, max_size=1 << 24),
        CT_SITE_BUNDLE: SiteBundlePayload.decode,
        CT_SITE_REPORT: SiteReport.decode,
        CT_TIME_STATEMENT: TimeStatement.decode,
    }
    decoder = decoders.get(header.content_type)
    return None if decoder is None else decoder(opened.payload)


def _entitlement(world: FuzzWorld, data: bytes) -> object:
    """What a station does with an entitlement file: open it (sealed to its transport key,
    signed by HQ's entitlement signer) and decode the policy."""
    signer = world.home.role_certificate(HqRole.ENTITLEMENT_SIGNER)
    opened = open_package(
        data,
        receiver=world.hq.a.transport,
        expected_content_type=CT_ENTITLEMENT,
        trusted_sender_public=signer.public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 22,
    )
    payload = EntitlementPayload.decode(opened.payload)
    x509.load_der_x509_certificate(payload.station_ca_cert_der)
    return payload


def _site_bundle(world: FuzzWorld, data: bytes) -> object:
    return verify_site_bundle(
        data,
        root=world.root,
        transport=world.site_transport,
        site_id=world.site_id,
        site_ca_public=world.site_key.public_key(),
        last_sequence=None,
        last_revocation_sequence=None,
        now=_now(world),
    )


def _site_bundle_payload(world: FuzzWorld, data: bytes) -> object:
    signer = _entitlement_signer(world)
    package = seal_package(
        content_type=CT_SITE_BUNDLE,
        payload=data,
        sender=signer,  # type: ignore[arg-type]
        sender_cert=world.home.role_certificate(HqRole.ENTITLEMENT_SIGNER),
        receiver_public=world.site_transport.public_key(),
        sequence=1,
        created=int(_now(world).timestamp()),
    )
    return _site_bundle(world, package)


def _revocation_list(world: FuzzWorld, data: bytes) -> object:
    from trustcore.revocation import open_revocation_list

    return open_revocation_list(
        data, root=world.root, now=_now(world), root_crl=None, not_older_than=None
    )


def _approvals(world: FuzzWorld, data: bytes) -> object:
    from trustcore.quorum import parse_evidence, verify_quorum

    bundle = parse_evidence([data])
    return verify_quorum(
        bundle.request,
        bundle.approvals,
        operation=bundle.request.operation,
        params=dict(bundle.request.params),
        approvers=bundle.request.approvers,
        m=bundle.request.m,
        now=bundle.request.created,
        used_request_ids=(),
    )


def _registration_request(world: FuzzWorld, data: bytes) -> object:
    from tests.fixtures.registration import ADMIT_STATION, verifier
    from trustcore.registration import parse_request, verify_request

    assert world.registration is not None
    request = parse_request(data)
    return verify_request(
        request,
        topic_device_id=world.registration.device_id,
        verifier=verifier(),
        admission=ADMIT_STATION,
        now=world.registration.pki.now,
        nonce_seen=False,
        key_owner=None,
    )


def _registration_response(world: FuzzWorld, data: bytes) -> object:
    from trustcore.registration import parse_response

    reg = world.registration
    assert reg is not None
    return parse_response(
        data,
        device_id=reg.device_id,
        nonce=reg.nonce,
        request_digest=reg.digest,
        ldevid_public_key=reg.ldevid_public,  # type: ignore[arg-type]
        roots=[reg.pki.root],
        now=reg.pki.now,
    )


def _key_update(world: FuzzWorld, data: bytes) -> object:
    from trustcore.registration import parse_key_update

    reg = world.registration
    assert reg is not None
    return parse_key_update(data, device_id=reg.device_id, site_ca=reg.pki.site_ca, newer_than=0)


def _renewal_request(world: FuzzWorld, data: bytes) -> object:
    """The registrar's renewal decision (``devices/<id>/renewal/request``)."""
    from trustcore.renewal import LdevidPolicy, RenewalFacts, parse_renewal_request, verify_renewal

    reg = world.registration
    assert reg is not None
    request = parse_renewal_request(data)
    facts = RenewalFacts(reg.pki.ldevid.serial_number, "registered", frozenset(), None, False, None)
    return verify_renewal(
        request,
        topic_device_id=reg.pki.device_id,
        site_cas=[reg.pki.site_ca],
        facts=facts,
        now=reg.pki.now,
        policy=LdevidPolicy(),
    )


def _decoders(world: FuzzWorld, data: bytes) -> object:
    """The payload decoders behind the signatures, and the other small messages."""
    from trustcore.quorum import Approval, ApprovalRequest
    from trustcore.renewal import parse_renewal_request
    from trustcore.revocation import RevocationList
    from trustcore.site_rollover import SiteCaRollover
    from trustcore.station_ca_request import StationCaRequest

    decoders: list[Callable[[bytes], object]] = [
        lambda d: cbor.decode(d, max_size=1 << 20),
        EntitlementPayload.decode,
        lambda d: AuditExportPayload.decode(d, max_size=1 << 20),
        SiteBundlePayload.decode,
        SiteReport.decode,
        RevocationList.decode,
        TimeStatement.decode,
        ApprovalRequest.decode,
        Approval.decode,
        StationCaRequest.decode,
        SiteCaRollover.decode,
        parse_renewal_request,
    ]
    for decode in decoders:
        with contextlib.suppress(TrustCoreError):
            decode(data)
    return None


def _topics(world: FuzzWorld, data: bytes) -> object:
    """Registrar topic parsing and the device ACL: a bool or None, never an exception."""
    from trustcore.errors import InvalidValueError
    from trustcore.topics import (
        KEY_ACK_LEVELS,
        RENEWAL_REQUEST_LEVELS,
        TELEMETRY_LEVEL,
        Access,
        Listener,
        device_access,
        device_of,
        device_of_registration_request,
        validate_topic_filter,
    )

    topic = data.decode("utf-8", "surrogateescape")  # lone surrogates: not valid UTF-8
    device = DeviceId("dev-a")
    for listener in Listener:
        rule = device_access(device, listener)
        for access in Access:
            allowed = rule.allows(access, topic)
            assert isinstance(allowed, bool)
            if allowed and listener is Listener.OPERATIONAL:
                assert topic.startswith("devices/dev-a/"), topic
    for found in (
        device_of_registration_request(topic),
        device_of(topic, *RENEWAL_REQUEST_LEVELS),
        device_of(topic, TELEMETRY_LEVEL),
        device_of(topic, *KEY_ACK_LEVELS),
    ):
        assert found is None or isinstance(found, DeviceId)
    with contextlib.suppress(InvalidValueError):
        validate_topic_filter(topic)
    return None


# ------------------------------------------------------------------------------- HQ


def _hq_enrol_station(world: FuzzWorld, data: bytes) -> object:
    from hq.authority import enrol_station

    return enrol_station(world.home, data)


def _hq_enrol_site(world: FuzzWorld, data: bytes) -> object:
    from hq.site import enrol_site

    return enrol_site(world.home, data, world.secrets)


def _hq_ingest_audit(world: FuzzWorld, data: bytes) -> object:
    from hq.audit_ingest import ingest_audit

    return ingest_audit(world.home, data, world.secrets)


def _hq_ingest_audit_payload(world: FuzzWorld, data: bytes) -> object:
    station = world.hq.a
    assert station.ca_cert is not None and station.audit_receiver is not None
    package = seal_package(
        content_type=CT_AUDIT_EXPORT,
        payload=data,
        sender=station.ca_key,
        sender_cert=station.ca_cert,
        receiver_public=station.audit_receiver.public_key(),  # type: ignore[arg-type]
        sequence=1,
        created=world.hq.t0 + 100,
    )
    return _hq_ingest_audit(world, package)


def _hq_ingest_report(world: FuzzWorld, data: bytes) -> object:
    from hq.counterfeit import ingest_site_report

    return ingest_site_report(world.home, data)


def _hq_ingest_report_payload(world: FuzzWorld, data: bytes) -> object:
    try:
        seq = cbor.field(cbor.map_of(cbor.decode(data, max_size=1 << 20), "r"), "seq", int)
    except TrustCoreError:
        seq = 1
    package = seal_package(
        content_type=CT_SITE_REPORT,
        payload=data,
        sender=world.site_key,
        sender_cert=world.site_ca,
        receiver_public=None,
        sequence=seq if 0 <= seq < 1 << 62 else 1,
        created=int(_now(world).timestamp()),
    )
    return _hq_ingest_report(world, package)


def _hq_station_crl(world: FuzzWorld, data: bytes) -> object:
    from hq.site import record_station_crl

    return record_station_crl(world.home, "station-a", data)


def _hq_approvals(world: FuzzWorld, data: bytes) -> object:
    """Quorum evidence as ``hq revoke --station-ca ... --approvals FILE`` reads it."""
    from hq.approvals import authorize_station_ca_revocation

    return authorize_station_ca_revocation(world.home, "station-a", [data])


TC = (TrustCoreError,)
HQ = (HqError,)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("csr", "csr", _csr, TC),
        Target("certificate", "certificate", _certificate, TC),
        Target("crl", "crl", _crl, TC),
        Target("station_enrolment", "station_enrolment", _station_enrolment, TC),
        Target("site_enrolment", "site_enrolment", _site_enrolment, TC),
        Target("sealed_package", "sealed_package", _sealed_package, TC),
        Target("entitlement", "entitlement", _entitlement, TC),
        Target("site_bundle", "site_bundle", _site_bundle, TC),
        Target("site_bundle_payload", "site_bundle_payload", _site_bundle_payload, TC),
        Target("revocation_list", "revocation_list", _revocation_list, TC),
        Target("approvals", "approvals", _approvals, TC),
        Target("registration_request", "registration_request", _registration_request, TC),
        Target("registration_response", "registration_response", _registration_response, TC),
        Target("key_update", "key_update", _key_update, TC),
        Target("renewal_request", "renewal_request", _renewal_request, TC),
        Target("decoders", "decoders", _decoders, TC),
        Target("topics", "topics", _topics, ()),
        Target("hq_enrol_station", "station_enrolment", _hq_enrol_station, HQ, True),
        Target("hq_enrol_site", "site_enrolment", _hq_enrol_site, HQ, True),
        Target("hq_ingest_audit", "audit_export", _hq_ingest_audit, HQ, True),
        Target(
            "hq_ingest_audit_payload", "audit_export_payload", _hq_ingest_audit_payload, HQ, True
        ),
        Target("hq_ingest_report", "site_report", _hq_ingest_report, HQ, True),
        Target(
            "hq_ingest_report_payload", "site_report_payload", _hq_ingest_report_payload, HQ, True
        ),
        Target("hq_station_crl", "station_crl", _hq_station_crl, HQ, True),
        Target("hq_approvals", "approvals", _hq_approvals, HQ, True),
    )
}


@dataclass(frozen=True)
class Crash:
    target: str
    signature: str  # exception type and the innermost frame in this project's code
    message: str
    data: bytes

    @property
    def file_name(self) -> str:
        return f"crash-{hashlib.sha256(self.data).hexdigest()[:16]}.bin"


_PROJECT_DIRS = ("trustcore", "hq", "registrar", "factory_station", "signers", "device_sim")


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if any(f"/{d}/" in f.filename for d in _PROJECT_DIRS)]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    if where is None:
        return f"{type(exc).__name__}@?"
    path = Path(where.filename)
    place = f"{path.parent.name}/{path.name}:{where.lineno}"
    return f"{type(exc).__name__}@{place}"


def run_one(target: Target, world: FuzzWorld, data: bytes) -> Crash | None:
    """Run one input; a :class:`Crash` if anything but a clean refusal escaped."""
    accepted = False
    try:
        with warnings.catch_warnings():
            # as the test suite runs (filterwarnings = error): a library warning that escapes
            # a parser is a crash there, so it is one here too
            warnings.simplefilter("error")
            target.run(world, data)
        accepted = True
    except target.allowed:
        pass
    except Exception as exc:
        accepted = True  # the state may be half-written: restore it
        return Crash(target.name, _signature(exc), f"{type(exc).__name__}: {exc}"[:300], data)
    finally:
        if accepted and target.restores:
            world.restore()
    return None


def seeds_of(target: Target, world: FuzzWorld) -> list[bytes]:
    if target.seeds in world.seeds:
        return world.seeds[target.seeds]
    if target.seeds == "decoders":
        return [world.seeds["site_report_payload"][0], world.seeds["audit_export_payload"][0]]
    if target.seeds == "topics":
        return [b"devices/dev-a/telemetry", b"devtrust/register/dev-a/request", b"devices/+/#"]
    if target.seeds == "site_bundle_payload":
        return [_bundle_payload(world)]
    raise KeyError(target.seeds)


@functools.cache
def _bundle_payload(world: FuzzWorld) -> bytes:
    package = world.seeds["site_bundle"][0]
    return open_package(
        package,
        receiver=world.site_transport,
        expected_content_type=CT_SITE_BUNDLE,
        trusted_sender_public=peek(package).sender_certificate().public_key(),  # type: ignore[arg-type]
        last_sequence=None,
        max_size=1 << 24,
    ).payload


def corpus_files(target: str) -> list[Path]:
    folder = CORPUS / target
    return sorted(folder.glob("*.bin")) if folder.is_dir() else []
