"""Site enrolment and the site bundle at HQ: format vector, enrolment, bundle content, KMS,
station CRLs, and the new certificate profile under pkilint.

The world these tests run in (a real HQ home, an enrolled and entitled station, a real site
home) is built by tests/fixtures/site.py, which the commissioning and registrar tests share.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hq.errors import HomeError
from hq.kms import init_kms, kms_key, site_payload_keys
from hq.site import (
    ROOT_CRL_VALIDITY,
    SiteBundleRequest,
    SiteError,
    build_site_bundle,
    enrol_site,
    record_station_crl,
)
from hq.store import SCHEMA_VERSION, HqStore
from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from tests.fixtures.pki import Pki, p256
from tests.fixtures.pkilint import SEVERE, lint_certificate
from tests.fixtures.site import DAY, SITE, STATION, World, make_world, world, world_template
from trustcore import cbor
from trustcore.csr import build_csr
from trustcore.errors import CsrError, EncodingError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.messages import SiteEnrolment, StationEnrolment
from trustcore.profiles import PROFILES, issue_service_client_certificate
from trustcore.site_bundle import (
    SITE_BUNDLE_CHECKS,
    AdmissionEntry,
    ManifestEntry,
    SealedPayloadKey,
    SiteBundleError,
    SiteBundlePayload,
    open_sealed_payload_key,
    verify_site_bundle,
)

__all__ = ["world", "world_template"]  # fixtures (tests/fixtures/site.py)

# ----------------------------------------------------------------------------- format


def vector_payload() -> SiteBundlePayload:
    return SiteBundlePayload(
        site_id=SiteId("site-a"),
        site_ca_cert_der=b"\x30\x03\x02\x01\x01",
        root_cert_der=b"\x30\x03\x02\x01\x02",
        station_ca_certs_der=(b"\x30\x03\x02\x01\x03",),
        root_crl_der=b"\x30\x03\x02\x01\x04",
        station_crls_der=(b"\x30\x03\x02\x01\x05",),
        revocation_list=b"\xa0",
        manifest=(
            ManifestEntry(DeviceId("TH-000001"), CertSerial(0x1A2B), StationId("station-a")),
        ),
        admission=(AdmissionEntry(StationId("station-a"), "thermostat", "TH-"),),
        payload_keys=(
            SealedPayloadKey(bytes(range(8)), 1_700_000_000, b"\x04" + bytes(64), bytes(48)),
        ),
        current_payload_key=bytes(range(8)),
    )


def test_payload_vector() -> None:
    encoded = vector_payload().encode()
    assert encoded == doc_vector("site-bundle-payload")
    assert SiteBundlePayload.decode(encoded) == vector_payload()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("extra",), 1),
        (("site_id",), "site/a"),
        (("manifest", 0, "serial"), "01a2b"),
        (("admission", 0, "id_prefix"), "TH+"),
        (("payload_keys", 0, "key_id"), b"short"),
        (("payload_keys", 0, "ct"), bytes(47)),
        (("current_payload_key",), bytes(7)),
        (("station_ca_certs",), ["not bytes"]),
    ],
)
def test_payload_decoding_is_strict(path: tuple[object, ...], value: object) -> None:
    m = cbor.decode(vector_payload().encode(), max_size=1 << 20)
    target = m
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(EncodingError):
        SiteBundlePayload.decode(cbor.encode(m))


# ---------------------------------------------------------------------------- enrolment


def _site_request(site: str = SITE, cn: str | None = None) -> tuple[SiteEnrolment, SoftwareKey]:
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or site)]))
    return SiteEnrolment.create(SiteId(site), csr, ca, transport.public_key()), ca


def test_site_enrolment_round_trip_and_binding() -> None:
    request, _ = _site_request()
    decoded = SiteEnrolment.decode(request.encode())
    assert decoded == request
    decoded.verify()
    other = SoftwareKey.ephemeral()
    forged = SiteEnrolment.create(request.site_id, request.csr_der, other, other.public_key())
    swapped = SiteEnrolment(
        request.site_id, request.csr_der, forged.transport_public_der, request.binding_signature
    )
    with pytest.raises(CsrError) as e:
        swapped.verify()
    assert e.value.reason == "bad_signature"
    with pytest.raises(CsrError):
        _site_request(cn="site-2")[0].verify()


def test_station_and_site_requests_cannot_be_confused() -> None:
    request, _ = _site_request("same-id")
    with pytest.raises(EncodingError):
        StationEnrolment.decode(request.encode())
    station = StationEnrolment(
        StationId("same-id"),
        request.csr_der,
        request.transport_public_der,
        request.binding_signature,
    )
    with pytest.raises(CsrError):  # the site binding signature is not a station binding
        station.verify()
    with pytest.raises(EncodingError):
        SiteEnrolment.decode(station.encode())


def test_enrol_site_issues_site_ca(world: World) -> None:
    request, _ = _site_request("site-9")
    result = enrol_site(world.hq, request.encode(), world.hq_secrets)
    cert = result.site_ca_cert
    assert result.status == "enrolled"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "site-9"
    cert.verify_directly_issued_by(world.hq.root_certificate())
    again = enrol_site(world.hq, request.encode(), world.hq_secrets)
    assert again.status == "already_enrolled" and again.site_ca_cert == cert
    other, _ = _site_request("site-9")
    with pytest.raises(SiteError) as e:
        enrol_site(world.hq, other.encode(), world.hq_secrets)
    assert e.value.reason == "already_enrolled"
    replaced = enrol_site(world.hq, other.encode(), world.hq_secrets, replace=True)
    assert replaced.status == "replaced" and replaced.site_ca_cert != cert


def test_enrol_site_refuses_garbage(world: World) -> None:
    with pytest.raises(SiteError):
        enrol_site(world.hq, b"\xa0", world.hq_secrets)


# ------------------------------------------------------------------------------- bundle


def _verify(world: World, package: bytes, last: int | None = None):  # type: ignore[no-untyped-def]
    transport = world.site.key("transport", world.site_secrets)
    site_key = world.site.key("site-ca", world.site_secrets)
    return verify_site_bundle(
        package,
        root=world.site.root_certificate(),
        transport=transport,
        site_id=world.site.site_id,
        site_ca_public=site_key.public_key(),
        last_sequence=last,
        last_revocation_sequence=None,
        now=datetime.now(UTC),
    )


def test_bundle_round_trip(world: World) -> None:
    package = world.bundle(admit_stations=(STATION,), admit_products=("thermo",))
    verified = _verify(world, package)
    p = verified.payload
    assert verified.sequence == 1
    assert {e.device_id.value for e in p.manifest} == {"TH-000001", "TH-000002"}
    assert {e.serial.hex for e in p.manifest} == {"a1", "a2"}
    assert p.admission == (AdmissionEntry(StationId(STATION), "thermo", "TH-"),)
    assert [c.subject for c in verified.station_cas] == [
        x509.load_der_x509_certificate(p.station_ca_certs_der[0]).subject
    ]
    assert len(verified.station_crls) == 1 and not verified.stations_without_crl
    next_update = verified.root_crl.next_update_utc
    assert next_update is not None
    assert abs(next_update - (datetime.now(UTC) + ROOT_CRL_VALIDITY)) < timedelta(minutes=1)
    assert verified.revocations.sequence == 1 and verified.revocations.entries == ()
    # the payload key sealed to the site is the one the HQ KMS holds
    store = HqStore.open(world.hq.db_path)
    keys, current = site_payload_keys(store, kms_key(world.hq, world.hq_secrets), SITE)
    store.close()
    transport = world.site.key("transport", world.site_secrets)
    opened = [open_sealed_payload_key(transport, k) for k in p.payload_keys]
    assert [(k.key_id, k.key) for k in opened] == [(k.key_id, k.key) for k in keys]
    assert p.current_payload_key == current


def test_refusals_name_the_check_that_refused(world: World) -> None:
    """The checks run in the documented order, and a refusal names the one that refused."""
    assert [c.__name__ for c in SITE_BUNDLE_CHECKS] == [
        "check_sealed_header",
        "check_sender",
        "check_open",
        "check_payload",
        "check_root",
        "check_root_crl",
        "check_sender_not_revoked",
        "check_site_ca",
        "check_station_cas",
        "check_station_crls",
        "check_revocation_list",
        "check_payload_keys",
    ]
    with pytest.raises(SiteBundleError) as e:
        _verify(world, b"\xa0")
    assert (e.value.reason, e.value.check) == ("malformed", "check_sealed_header")
    package = world.bundle()
    verified = _verify(world, package)
    with pytest.raises(SiteBundleError) as e:
        _verify(world, package, last=verified.sequence)
    assert (e.value.reason, e.value.check) == ("replayed", "check_open")


def test_bundle_sequence_and_rotation(world: World) -> None:
    first = _verify(world, world.bundle())
    second = _verify(world, world.bundle(rotate_payload_key=True), last=first.sequence)
    assert second.sequence == first.sequence + 1
    assert len(second.payload.payload_keys) == 2
    assert second.payload.current_payload_key != first.payload.current_payload_key
    # The root key stays offline: bundles carry the root CRL of the last ceremony, and a
    # freshly published HQ revocation list (next sequence, new indirect CRL).
    assert second.root_crl.public_bytes(serialization.Encoding.DER) == first.root_crl.public_bytes(
        serialization.Encoding.DER
    )
    assert second.revocations.sequence == first.revocations.sequence + 1
    assert second.revocations.hq_crl is not None and first.revocations.hq_crl is not None
    assert second.revocations.hq_crl != first.revocations.hq_crl


def test_devices_from_station_and_whole_station_rule(world: World) -> None:
    package = build_site_bundle(
        world.hq,
        SiteBundleRequest(SITE, devices_from_stations=(STATION,), admit_stations=(STATION,)),
        world.hq_secrets,
    ).package
    p = _verify(world, package).payload
    assert len(p.manifest) == 3
    assert p.admission == (AdmissionEntry(StationId(STATION), "", ""),)


@pytest.mark.parametrize(
    ("request_kw", "reason"),
    [
        ({"devices": ("TH-999999",)}, "unknown_device"),
        ({"admit_stations": (STATION,), "admit_products": ("toaster",)}, "unknown_product"),
        ({"admit_stations": ("station-x",)}, "unknown_station"),
        ({"admit_products": ("thermo",)}, "bad_request"),
        ({"site_id": "site-x"}, "unknown_site"),
    ],
)
def test_bad_bundle_requests(world: World, request_kw: dict[str, object], reason: str) -> None:
    kw = {"site_id": SITE, **request_kw}
    with pytest.raises(SiteError) as e:
        build_site_bundle(world.hq, SiteBundleRequest(**kw), world.hq_secrets)  # type: ignore[arg-type]
    assert e.value.reason == reason
    store = HqStore.open(world.hq.db_path)
    assert store.last_bundle_sequence(SITE) == 0  # nothing recorded
    store.close()


def test_hq_without_kms_fails_clearly(world: World) -> None:
    (world.hq.keys_dir / "kms.key.pem").unlink()
    with pytest.raises(HomeError, match="init-kms"):
        world.bundle()
    assert init_kms(world.hq, world.hq_secrets) is True
    assert init_kms(world.hq, world.hq_secrets) is False
    assert _verify(world, world.bundle()).sequence == 1


def test_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "hq.sqlite"
    HqStore.create(path).close()
    conn = sqlite3.connect(path)
    for table in (
        "sites",
        "site_bundles",
        "payload_keys",
        "station_crls",
        "root_revocations",
        "root_crls",
        "revocation_lists",
    ):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    store = HqStore.open(path)
    assert store.sites() == [] and store.last_bundle_sequence("x") == 0
    store.close()
    conn = sqlite3.connect(path)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version == (str(SCHEMA_VERSION),)


# -------------------------------------------------------------------------- station CRLs


def test_station_crl_checks(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w")
    now = datetime.now(UTC)

    def crl(number: int, key: SoftwareKey) -> bytes:
        # Built by hand: build_crl itself refuses a key that does not match the issuer.
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(world.station_ca.subject)
            .last_update(now - DAY)
            .next_update(now + DAY)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        signed = builder.sign(key.private_key(), hashes.SHA256())
        return signed.public_bytes(serialization.Encoding.DER)

    second = crl(2, world.station_key)
    assert record_station_crl(world.hq, STATION, second).status == "recorded"
    assert record_station_crl(world.hq, STATION, second).status == "unchanged"
    with pytest.raises(SiteError) as e:
        record_station_crl(world.hq, STATION, crl(1, world.station_key))
    assert e.value.reason == "crl_rollback"
    with pytest.raises(SiteError) as e:
        record_station_crl(world.hq, STATION, crl(3, SoftwareKey.ephemeral()))
    assert e.value.reason == "crl_bad_signature"
    with pytest.raises(SiteError) as e:
        record_station_crl(world.hq, "station-x", crl(3, world.station_key))
    assert e.value.reason == "unknown_station"


# ---------------------------------------------------------------------------- profile


def test_service_client_profile_and_pkilint(pki: Pki, tmp_path: Path) -> None:
    key = p256("service-client")
    cert = issue_service_client_certificate(
        pki.site_ca,
        pki.site_key,
        key.public_key(),
        service_name="registrar@site",
        organization="Devtrust Test Site",
        not_before=pki.now,
        not_after=pki.now + 30 * DAY,
    )
    profile = PROFILES["service_client"]
    assert not profile.ca and profile.eku == (ExtendedKeyUsageOID.CLIENT_AUTH,)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "registrar@site"
    cert.verify_directly_issued_by(pki.site_ca)
    path = tmp_path / "service.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    findings = lint_certificate(path)
    assert [f for f in findings if f[0] in SEVERE] == []
    assert findings  # the linter did run


@pytest.mark.parametrize("name", ["dev-000001", "registrar@", "Registrar@site", "a@b/c"])
def test_service_names_that_could_be_devices_are_refused(pki: Pki, name: str) -> None:
    from trustcore.errors import ProfileError

    with pytest.raises(ProfileError):
        issue_service_client_certificate(
            pki.site_ca,
            pki.site_key,
            p256("service-client").public_key(),
            service_name=name,
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )


def test_pinned_root_fingerprint_matches_hq(world: World) -> None:
    assert world.site.root_certificate() == world.hq.root_certificate()
    assert world.site.key_path("site-ca").stat().st_mode & 0o077 == 0
