"""Certificate profiles: every issued certificate has exactly its profile's fields."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.pki import MANUFACTURER, Pki, fixed_key, p256
from tests.fixtures.profiles import service_client_certificate
from trustcore.errors import EncodingError, ProfileError
from trustcore.identity import DeviceId, SiteId, StationId
from trustcore.profiles import (
    IDEVID_NO_EXPIRY,
    OID_EKU_AUDIT_RECEIVER,
    OID_EKU_CRL_SIGNER,
    OID_EKU_ENTITLEMENT_SIGNER,
    OID_EKU_REVOCATION_SIGNER,
    OID_HARDWARE_MODULE_NAME,
    OID_HW_TYPE_DEVICE,
    PROFILES,
    HqRole,
    decode_hardware_module_name,
    device_id_from_certificate,
    encode_hardware_module_name,
    issue_broker_certificate,
    issue_factory_certificate,
    issue_root_ca,
    issue_secondary_certificate,
    issue_site_ca,
    issue_station_ca,
    site_id_from_certificate,
    station_id_from_certificate,
)

DAY = timedelta(days=1)


def all_certificates(pki: Pki) -> dict[str, tuple[x509.Certificate, x509.Certificate]]:
    """profile name -> (certificate, issuer)."""
    certs = {
        "root_ca": (pki.root, pki.root),
        "station_ca": (pki.station_ca, pki.root),
        "site_ca": (pki.site_ca, pki.root),
        "idevid": (pki.idevid, pki.station_ca),
        "ldevid": (pki.ldevid, pki.site_ca),
        "broker_server": (pki.broker, pki.site_ca),
        "service_client": (service_client_certificate(pki), pki.site_ca),
    }
    for role, (cert, _key) in pki.roles.items():
        certs[role.value.replace("-", "_")] = (cert, pki.root)
    return certs


def test_every_profile_is_exercised(pki: Pki) -> None:
    assert set(all_certificates(pki)) == set(PROFILES)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_certificate_matches_its_profile(pki: Pki, name: str) -> None:
    cert, issuer = all_certificates(pki)[name]
    profile = PROFILES[name]
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is profile.ca
    assert bc.value.path_length == profile.path_length
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    set_bits = {
        f
        for f in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
        if getattr(ku.value, f)
    }
    assert set_bits == profile.key_usage
    if profile.eku:
        assert tuple(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == profile.eku
    else:
        with pytest.raises(x509.ExtensionNotFound):
            ext.get_extension_for_class(x509.ExtendedKeyUsage)
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    assert cert.issuer == issuer.subject
    assert 0 < cert.serial_number < 2**159
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(issuer)


def test_serials_are_random_and_distinct(pki: Pki) -> None:
    serials = [c.serial_number for c, _ in all_certificates(pki).values()]
    assert len(set(serials)) == len(serials)


def test_role_ekus_are_distinct_project_oids(pki: Pki) -> None:
    ekus = {role: role.eku for role in HqRole}
    assert ekus == {
        HqRole.ENTITLEMENT_SIGNER: OID_EKU_ENTITLEMENT_SIGNER,
        HqRole.AUDIT_RECEIVER: OID_EKU_AUDIT_RECEIVER,
        HqRole.REVOCATION_SIGNER: OID_EKU_REVOCATION_SIGNER,
        HqRole.CRL_SIGNER: OID_EKU_CRL_SIGNER,
    }
    assert all(o.dotted_string.startswith("1.3.6.1.4.1.55555.1.3.") for o in ekus.values())
    audit, _ = pki.roles[HqRole.AUDIT_RECEIVER]
    ku = audit.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and not ku.digital_signature


def test_idevid_subject_san_and_no_expiry(pki: Pki) -> None:
    cert = pki.idevid
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-000001"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "dev-000001"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == MANUFACTURER
    assert cert.not_valid_after_utc == IDEVID_NO_EXPIRY
    # 802.1AR: GeneralizedTime 99991231235959Z
    assert b"\x18\x0f99991231235959Z" in cert.tbs_certificate_bytes
    assert device_id_from_certificate(cert) == pki.device_id
    assert device_id_from_certificate(pki.ldevid) == pki.device_id


def test_station_and_site_ids_are_readable(pki: Pki) -> None:
    assert station_id_from_certificate(pki.station_ca) == StationId("station-01")
    assert site_id_from_certificate(pki.site_ca) == SiteId("site-hq-1")
    with pytest.raises(ProfileError):
        station_id_from_certificate(pki.root)


def test_broker_certificate_names(pki: Pki) -> None:
    san = pki.broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(ProfileError):
        issue_broker_certificate(
            pki.site_ca,
            pki.site_key,
            p256("b2").public_key(),
            dns_names=[],
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )
    with pytest.raises(ProfileError):
        issue_broker_certificate(
            pki.site_ca,
            pki.site_key,
            p256("b2").public_key(),
            dns_names=["ok.example"],
            ip_addresses=["999.1.1.1"],
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )


def test_station_ca_may_not_outlive_its_entitlement(pki: Pki) -> None:
    with pytest.raises(ProfileError, match="bound"):
        issue_station_ca(
            pki.root,
            pki.root_key,
            p256("s2").public_key(),
            station_id=StationId("station-02"),
            organization=MANUFACTURER,
            not_before=pki.now,
            not_after=pki.now + 100 * DAY,
            max_not_after=pki.now + 99 * DAY,
        )


@pytest.mark.parametrize("curve", ["p384", "rsa"])
def test_non_p256_subject_keys_are_refused(pki: Pki, curve: str) -> None:
    with pytest.raises(ProfileError) as info:
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            fixed_key(f"bad-{curve}", curve).public_key(),  # type: ignore[arg-type]
            device_id=DeviceId("dev-x"),
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )
    assert info.value.reason == "wrong_key_type"


def test_non_p256_signing_key_is_refused(pki: Pki) -> None:
    key = fixed_key("p384-root", "p384")
    with pytest.raises(ProfileError) as info:
        issue_root_ca(
            key,  # type: ignore[arg-type]
            common_name="x",
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )
    assert info.value.reason == "wrong_key_type"


def test_issuer_checks(pki: Pki) -> None:
    common = {
        "device_id": DeviceId("dev-x"),
        "organization": "x",
        "not_before": pki.now,
        "not_after": pki.now + DAY,
    }
    sub = p256("sub").public_key()
    with pytest.raises(ProfileError, match="does not match"):
        issue_secondary_certificate(pki.site_ca, pki.station_key, sub, **common)  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match=r"not allowed to sign|not a CA"):
        issue_secondary_certificate(pki.ldevid, pki.ldevid_key, sub, **common)  # type: ignore[arg-type]
    with pytest.raises(ProfileError) as info:
        issue_site_ca(
            pki.station_ca,
            pki.station_key,
            sub,
            site_id=SiteId("s"),
            organization="x",
            not_before=pki.now,
            not_after=pki.now + DAY,
        )
    assert info.value.reason == "path_length"


def test_validity_rules(pki: Pki) -> None:
    base = {"device_id": DeviceId("dev-x"), "organization": "x"}
    sub = p256("sub").public_key()
    with pytest.raises(ProfileError, match="within the issuer"):
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            sub,
            not_before=pki.now,
            not_after=pki.site_ca.not_valid_after_utc + DAY,
            **base,  # type: ignore[arg-type]
        )
    with pytest.raises(ProfileError, match="earlier"):
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            sub,
            not_before=pki.now,
            not_after=pki.now,
            **base,  # type: ignore[arg-type]
        )
    with pytest.raises(ProfileError, match="timezone"):
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            sub,
            not_before=datetime(2025, 1, 1),  # naive on purpose
            not_after=pki.now + DAY,
            **base,  # type: ignore[arg-type]
        )
    # Only the 802.1AR "no expiry" value may outlive the issuing station CA.
    with pytest.raises(ProfileError, match="within the issuer"):
        issue_factory_certificate(
            pki.station_ca,
            pki.station_key,
            sub,
            device_id=DeviceId("dev-x"),
            manufacturer="x",
            not_before=pki.now,
            not_after=pki.station_ca.not_valid_after_utc + DAY,
        )


def _device_cert(pki: Pki, cn: str, serial: str, san: list[x509.GeneralName]) -> x509.Certificate:
    key = p256("mismatch")
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                ]
            )
        )
        .issuer_name(pki.station_ca.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(pki.now)
        .not_valid_after(pki.now + DAY)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(pki.station_key, hashes.SHA256())


def _hw(serial: bytes, hw_type: ObjectIdentifier = OID_HW_TYPE_DEVICE) -> x509.OtherName:
    return x509.OtherName(OID_HARDWARE_MODULE_NAME, encode_hardware_module_name(hw_type, serial))


@pytest.mark.parametrize(
    ("cn", "serial", "san", "match"),
    [
        ("dev-a", "dev-a", [_hw(b"dev-b")], "mismatch"),
        ("dev-a", "dev-b", [_hw(b"dev-a")], "mismatch"),
        ("dev-a", "dev-a", [], "no SAN"),
        ("dev-a", "dev-a", [x509.DNSName("dev-a.example")], "exactly one"),
        ("dev-a", "dev-a", [_hw(b"dev-a"), _hw(b"dev-a")], "exactly one"),
        ("dev-a", "dev-a", [_hw(b"dev-a", ObjectIdentifier("1.2.3.4"))], "hwType"),
        ("dev/a", "dev/a", [_hw(b"dev/a")], "malformed"),
        ("dev-a", "dev-a", [_hw(b"dev-\xff")], "ASCII"),
    ],
)
def test_device_id_cross_check_refuses_inconsistent_identities(
    pki: Pki, cn: str, serial: str, san: list[x509.GeneralName], match: str
) -> None:
    with pytest.raises(ProfileError, match=match):
        device_id_from_certificate(_device_cert(pki, cn, serial, san))


def test_hardware_module_name_vector() -> None:
    der = encode_hardware_module_name(OID_HW_TYPE_DEVICE, b"dev-1")
    assert der.hex() == "3013060a2b0601040183b203010104056465762d31"
    assert decode_hardware_module_name(der) == (OID_HW_TYPE_DEVICE, b"dev-1")


oids = st.builds(
    lambda first, second, rest: ObjectIdentifier(".".join(map(str, [first, second, *rest]))),
    st.integers(0, 1),
    st.integers(0, 39),
    st.lists(st.integers(0, 2**40), max_size=8),
)


@given(oid=oids, serial=st.binary(max_size=300))
def test_hardware_module_name_round_trip(oid: ObjectIdentifier, serial: bytes) -> None:
    assert decode_hardware_module_name(encode_hardware_module_name(oid, serial)) == (oid, serial)


@given(data=st.binary(max_size=64))
def test_hardware_module_name_decoder_never_crashes(data: bytes) -> None:
    try:
        oid, serial = decode_hardware_module_name(data)
    except EncodingError:
        return
    assert encode_hardware_module_name(oid, serial) == data  # only canonical DER is accepted


@pytest.mark.parametrize(
    "bad",
    [
        "3013060a2b0601040183b203010104056465762d3100",  # trailing byte
        "3014060a2b0601040183b203010104056465762d31",  # length too long
        "3081130603290101040100",  # non-minimal length
        "300506012b0401",  # truncated octet string
        "30020400",  # no OID
    ],
)
def test_hardware_module_name_decoder_refuses(bad: str) -> None:
    with pytest.raises(EncodingError):
        decode_hardware_module_name(bytes.fromhex(bad))
