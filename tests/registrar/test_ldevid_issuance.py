"""The device-certificate fast path (issuer prepared once per CA certificate and key: LDevIDs
at the registrar, IDevIDs at the factory station) makes exactly the certificate the generic
profile builder makes, and keeps every issuer check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tests.fixtures.pki import MANUFACTURER, SITE_OPERATOR, Pki, p256
from trustcore.cert_builder import build_certificate, device_subject
from trustcore.errors import ProfileError
from trustcore.identity import CertSerial, DeviceId, SiteId
from trustcore.profiles import (
    IDEVID_NO_EXPIRY,
    PROFILES,
    HqRole,
    device_id_from_certificate,
    hardware_module_name,
    issue_factory_certificate,
    issue_root_ca,
    issue_secondary_certificate,
    issue_site_ca,
)

DEVICE = DeviceId("dev-777001")


def test_prepared_issuer_makes_the_profile_builders_certificate(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = CertSerial.random()
    monkeypatch.setattr(CertSerial, "random", staticmethod(lambda: serial))
    key = p256("ldevid-bytes").public_key()
    start, end = pki.now - timedelta(minutes=5), pki.now + timedelta(days=365)
    for _ in range(2):  # first call prepares the issuer, the second uses it
        fast = issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            key,
            device_id=DEVICE,
            organization=SITE_OPERATOR,
            not_before=start,
            not_after=end,
        )
        reference = build_certificate(
            PROFILES["ldevid"],
            subject=device_subject(DEVICE, SITE_OPERATOR),
            subject_key=key,
            issuer_cert=pki.site_ca,
            issuer_key=pki.site_key,
            not_before=start,
            not_after=end,
            san=[hardware_module_name(DEVICE)],
        )
        assert fast.tbs_certificate_bytes == reference.tbs_certificate_bytes
        fast.verify_directly_issued_by(pki.site_ca)


@pytest.mark.parametrize("with_crl_issuer", [False, True])
@pytest.mark.parametrize("lifetime", [None, timedelta(days=30)])
def test_prepared_station_issuer_makes_the_profile_builders_idevid(
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    with_crl_issuer: bool,
    lifetime: timedelta | None,
) -> None:
    serial = CertSerial.random()
    monkeypatch.setattr(CertSerial, "random", staticmethod(lambda: serial))
    key = p256("idevid-bytes").public_key()
    crl_issuer = pki.roles[HqRole.REVOCATION_SIGNER][0].subject if with_crl_issuer else None
    start = pki.now - timedelta(minutes=5)
    end = IDEVID_NO_EXPIRY if lifetime is None else start + lifetime
    for _ in range(2):  # first call prepares the issuer, the second uses it
        fast = issue_factory_certificate(
            pki.station_ca,
            pki.station_key,
            key,
            device_id=DEVICE,
            manufacturer=MANUFACTURER,
            not_before=start,
            not_after=end,
            crl_issuer=crl_issuer,
        )
        reference = build_certificate(
            PROFILES["idevid"],
            subject=device_subject(DEVICE, MANUFACTURER),
            subject_key=key,
            issuer_cert=pki.station_ca,
            issuer_key=pki.station_key,
            not_before=start,
            not_after=end,
            san=[hardware_module_name(DEVICE)],
            allow_beyond_issuer=end == IDEVID_NO_EXPIRY,
            crl_issuer=crl_issuer,
        )
        assert fast.tbs_certificate_bytes == reference.tbs_certificate_bytes
        fast.verify_directly_issued_by(pki.station_ca)
    # Only 99991231235959Z may outlive the station CA (checked on the prepared issuer too).
    with pytest.raises(ProfileError, match="validity"):
        issue_factory_certificate(
            pki.station_ca,
            pki.station_key,
            key,
            device_id=DEVICE,
            manufacturer=MANUFACTURER,
            not_before=start,
            not_after=pki.station_ca.not_valid_after_utc + timedelta(days=1),
        )


@pytest.mark.parametrize(
    ("device", "organization", "start_offset", "lifetime"),
    [
        ("a", SITE_OPERATOR, timedelta(0), timedelta(days=1)),
        (
            "Dev-9.x-" + "y" * 56,
            "Société Générale — Bâtiment B",
            timedelta(microseconds=7),
            timedelta(days=3650),
        ),
        (
            "0",
            "O" * 200,
            timedelta(days=-1),
            timedelta(days=365 * 30),
        ),  # past 2050: GeneralizedTime
    ],
)
def test_assembled_ldevid_matches_the_builder_for_any_id_name_and_date(
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    organization: str,
    start_offset: timedelta,
    lifetime: timedelta,
) -> None:
    """Long, short and punctuated ids, non-ASCII and long organizations, microseconds in the
    start (dropped) and an end past 2049 (GeneralizedTime), with a CA valid long enough."""
    root_key = p256("root-long")
    root = issue_root_ca(
        root_key,
        common_name="Long Root",
        organization=SITE_OPERATOR,
        not_before=pki.now - timedelta(days=3),
        not_after=pki.now + timedelta(days=365 * 41),
    )
    long_ca = issue_site_ca(
        root,
        root_key,
        pki.site_key.public_key(),
        site_id=SiteId("site-long"),
        organization=SITE_OPERATOR,
        not_before=pki.now - timedelta(days=2),
        not_after=pki.now + timedelta(days=365 * 40),
    )
    serial = CertSerial.random()
    monkeypatch.setattr(CertSerial, "random", staticmethod(lambda: serial))
    key = p256(f"ldevid-{device}").public_key()
    start, end = pki.now + start_offset, pki.now + start_offset + lifetime
    fast = issue_secondary_certificate(
        long_ca,
        pki.site_key,
        key,
        device_id=DeviceId(device),
        organization=organization,
        not_before=start,
        not_after=end,
    )
    reference = build_certificate(
        PROFILES["ldevid"],
        subject=device_subject(DeviceId(device), organization),
        subject_key=key,
        issuer_cert=long_ca,
        issuer_key=pki.site_key,
        not_before=start,
        not_after=end,
        san=[hardware_module_name(DeviceId(device))],
    )
    assert fast.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert fast.public_bytes(Encoding.DER)[-len(fast.signature) :] == fast.signature
    fast.verify_directly_issued_by(long_ca)
    assert device_id_from_certificate(fast) == DeviceId(device)


def test_prepared_issuer_keeps_the_issuer_checks(pki: Pki) -> None:
    key = p256("ldevid-checks").public_key()
    common = {
        "device_id": DEVICE,
        "organization": SITE_OPERATOR,
        "not_before": pki.now,
        "not_after": pki.now + timedelta(days=30),
    }
    issue_secondary_certificate(pki.site_ca, pki.site_key, key, **common)  # type: ignore[arg-type]
    # the same CA certificate with another key object, and a key that is not the CA's
    with pytest.raises(ProfileError, match="does not match"):
        issue_secondary_certificate(pki.site_ca, pki.station_key, key, **common)  # type: ignore[arg-type]
    with pytest.raises(ProfileError):
        issue_secondary_certificate(pki.ldevid, pki.ldevid_key, key, **common)  # type: ignore[arg-type]
    with pytest.raises(ProfileError, match="within the issuer"):
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            key,
            device_id=DEVICE,
            organization=SITE_OPERATOR,
            not_before=pki.now,
            not_after=pki.site_ca.not_valid_after_utc + timedelta(seconds=1),
        )
    with pytest.raises(ProfileError):
        issue_secondary_certificate(
            pki.site_ca,
            pki.site_key,
            ec.generate_private_key(ec.SECP384R1()).public_key(),
            **common,  # type: ignore[arg-type]
        )
