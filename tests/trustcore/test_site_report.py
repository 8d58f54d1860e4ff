"""The site report format (trustcore.site_report): documented vector, strict decoding,
and every refusal of open_site_report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from trustcore import cbor
from trustcore.errors import EncodingError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.site_report import (
    SeenCertificate,
    SiteRegistration,
    SiteReport,
    SiteReportError,
    open_site_report,
    seal_site_report,
)


def vector_report() -> SiteReport:
    return SiteReport(
        SiteId("site-a"),
        3,
        1_700_000_000,
        (
            SeenCertificate(
                StationId("station-a"),
                CertSerial(0x1A2B),
                DeviceId("TH-000001"),
                1_699_999_000,
                True,
                b"\x30\x03\x02\x01\x01",
            ),
        ),
        (
            SiteRegistration(
                DeviceId("TH-000001"),
                StationId("station-a"),
                CertSerial(0x1A2B),
                CertSerial(0x3C4D),
                1_699_999_001,
                1,
                "registered",
            ),
        ),
    )


def test_payload_vector() -> None:
    encoded = vector_report().encode()
    assert encoded == doc_vector("site-report-payload")
    assert SiteReport.decode(encoded) == vector_report()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("extra",), 1),
        (("seq",), -1),
        (("site_id",), "site/a"),
        (("seen", 0, "serial"), "01a2b"),
        (("seen", 0, "registered"), 1),
        (("seen", 0, "cert"), b""),
        (("registrations", 0, "count"), True),
        (("seen", 0, "station_id"), 7),
    ],
)
def test_decoding_is_strict(path: tuple[object, ...], value: object) -> None:
    doc = cbor.decode(vector_report().encode(), max_size=1 << 20)
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(EncodingError):
        SiteReport.decode(cbor.encode(doc))


def _site_ca(key: SoftwareKey, site: str = "site-a") -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, site),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, site),
        ]
    )
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key.private_key(), hashes.SHA256())
    )


def test_open_checks_sender_sequence_and_site() -> None:
    key, other = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    cert = _site_ca(key)
    package = seal_site_report(vector_report(), site_ca_key=key, site_ca_cert=cert)
    pub = key.public_key()
    assert (
        open_site_report(package, site_id=SiteId("site-a"), site_ca_public=pub, last_sequence=2)
        == vector_report()
    )
    with pytest.raises(SiteReportError) as info:
        open_site_report(package, site_id=SiteId("site-a"), site_ca_public=pub, last_sequence=3)
    assert info.value.reason == "replayed"
    with pytest.raises(SiteReportError) as info:
        open_site_report(
            package, site_id=SiteId("site-a"), site_ca_public=other.public_key(), last_sequence=None
        )
    assert info.value.reason == "wrong_sender"
    with pytest.raises(SiteReportError) as info:
        open_site_report(package, site_id=SiteId("site-b"), site_ca_public=pub, last_sequence=None)
    assert info.value.reason == "site_mismatch"
    tampered = bytearray(package)
    tampered[-80] ^= 1
    with pytest.raises(SiteReportError) as info:
        open_site_report(
            bytes(tampered), site_id=SiteId("site-a"), site_ca_public=pub, last_sequence=None
        )
    assert info.value.reason in ("bad_signature", "malformed")
