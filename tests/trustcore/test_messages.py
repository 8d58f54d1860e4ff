"""HQ <-> station payloads: enrolment binding, strict decoding, and the documented vector."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from trustcore import cbor
from trustcore.csr import build_csr
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy
from trustcore.errors import CsrError, EncodingError
from trustcore.identity import StationId
from trustcore.messages import AuditExportPayload, EntitlementPayload, StationEnrolment


def vector_payload() -> EntitlementPayload:
    policy = EntitlementPolicy(
        entitlement_id="ent-0001",
        station_id="station-a",
        sequence=1,
        product="thermostat",
        total_quota=20,
        daily_limit=10,
        day_timezone="UTC",
        not_before=1_800_000_000,
        not_after=1_802_592_000,
        id_rule=DeviceIdRule("TH-", 0, 999, 6),
    )
    return EntitlementPayload(
        policy=policy,
        station_ca_cert_der=b"\x30\x03\x02\x01\x01",
        audit_receiver_cert_der=b"\x30\x03\x02\x01\x02",
        product_secrets={"wifi-psk": b"\x00\x01\x02\x03"},
    )


def test_entitlement_payload_vector() -> None:
    encoded = vector_payload().encode()
    assert encoded == doc_vector("entitlement-payload")
    assert EntitlementPayload.decode(encoded) == vector_payload()


def test_entitlement_payload_is_strict() -> None:
    m = cbor.decode(vector_payload().encode(), max_size=1 << 20)
    m["extra"] = 1
    with pytest.raises(EncodingError):
        EntitlementPayload.decode(cbor.encode(m))
    m.pop("extra")
    m["product_secrets"] = {"k": "not bytes"}
    with pytest.raises(EncodingError):
        EntitlementPayload.decode(cbor.encode(m))


def _enrolment(
    station: str = "station-a", cn: str | None = None
) -> tuple[StationEnrolment, SoftwareKey]:
    ca, transport = SoftwareKey.ephemeral(), SoftwareKey.ephemeral()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or station)])
    csr = build_csr(ca, subject)
    return StationEnrolment.create(StationId(station), csr, ca, transport.public_key()), transport


def test_enrolment_round_trip_binds_transport_key() -> None:
    enrolment, transport = _enrolment()
    decoded = StationEnrolment.decode(enrolment.encode())
    csr, key = decoded.verify()
    assert csr.common_name == "station-a"
    assert key.public_numbers() == transport.public_key().public_numbers()


def test_enrolment_with_swapped_transport_key_is_refused() -> None:
    enrolment, _ = _enrolment()
    other = SoftwareKey.ephemeral()
    forged = StationEnrolment.create(
        enrolment.station_id, enrolment.csr_der, other, other.public_key()
    )
    swapped = StationEnrolment(
        enrolment.station_id,
        enrolment.csr_der,
        forged.transport_public_der,
        enrolment.binding_signature,
    )
    with pytest.raises(CsrError) as e:
        swapped.verify()
    assert e.value.reason == "bad_signature"


def test_enrolment_csr_must_name_the_station() -> None:
    enrolment, _ = _enrolment(cn="station-b")
    with pytest.raises(CsrError) as e:
        enrolment.verify()
    assert e.value.reason == "wrong_name"


@pytest.mark.parametrize("data", [b"", b"\xa0", b"\x00" * 10, cbor.encode({"type": "x"})])
def test_enrolment_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(EncodingError):
        StationEnrolment.decode(data)


def test_audit_export_payload_round_trip_and_strictness() -> None:
    p = AuditExportPayload("station-a", 1, 3, b"export", (b"c1", b"c2"))
    assert AuditExportPayload.decode(p.encode(), max_size=1 << 20) == p
    m = cbor.decode(p.encode(), max_size=1 << 20)
    m["manifest"] = ["not bytes"]
    with pytest.raises(EncodingError):
        AuditExportPayload.decode(cbor.encode(m), max_size=1 << 20)
    with pytest.raises(EncodingError):
        AuditExportPayload.decode(p.encode(), max_size=10)
