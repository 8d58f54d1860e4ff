"""Entitlement import at the factory station, with a real swtpm as the station TPM: the
happy path and every refusal (foreign station, tampered, replayed or rolled-back sequence,
expired window, a station CA certificate that is not ours), each leaving nothing changed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from factory_station.errors import EntitlementImportError, StationStateError
from factory_station.station import FactoryStation
from tests.fixtures.pki import MANUFACTURER, Pki, p256
from tests.fixtures.station import (
    STATION_ID,
    StationEnv,
)
from trustcore.audit import decode_record
from trustcore.identity import StationId
from trustcore.profiles import HqRole, issue_station_ca

pytestmark = pytest.mark.tpm


def _snapshot(station: FactoryStation) -> tuple[int, int, int]:
    return (
        station.store.last_entitlement_sequence(),
        station.store.audit_count(),
        station.status().counter,
    )


def _refused(station: FactoryStation, package: bytes, reason: str) -> None:
    before = _snapshot(station)
    with pytest.raises(EntitlementImportError) as info:
        station.import_entitlement(package)
    assert info.value.reason == reason, str(info.value)
    assert _snapshot(station) == before


def test_import_records_counter_base_and_audit(station_env: StationEnv) -> None:
    with station_env.open() as station:
        counter = station.status().counter
        imported = station.import_entitlement(station_env.hq.entitlement(quota=20, daily=10))
        assert imported.counter_base == counter
        assert imported.policy.total_quota == 20
        status = station.status()
        assert status.entitlement is not None
        assert status.entitlement["sequence"] == 1
        assert status.remaining == 20
        ((_, raw),) = list(station.store.audit_records(0))
        record = decode_record(raw)
        assert record.event == "entitlement_imported"
        fields = dict(record.fields)
        tpm = {k: fields.pop(k) for k in list(fields) if k.startswith("tpm")}
        signed, anchor = fields.pop("signed_time"), fields.pop("anchor_time")
        assert fields == {
            "entitlement_id": "ent-1",
            "entitlement_seq": 1,
            "counter_base": counter,
        }
        # HQ's signing time anchors the station's trusted time (host clock within 7 days).
        assert isinstance(signed, int) and signed <= anchor == record.time
        assert set(tpm) == {"tpm", "tpm_clock", "tpm_safe"}
        assert status.time is not None and status.time["anchor"]["source"] == "entitlement 1"
        assert 0 <= status.time["trusted_time"] - anchor <= 60
    # Survives a restart.
    with station_env.open() as station:
        assert station.policy is not None and station.policy.sequence == 1


def test_foreign_station_entitlement_is_refused(station_env: StationEnv) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with station_env.open() as station:
        # Encrypted to another station's transport key.
        _refused(station, station_env.hq.entitlement(to_transport=other), "foreign_station")
        # Encrypted to us, but the policy names another station.
        _refused(station, station_env.hq.entitlement(station_id="station-zz"), "foreign_station")


def test_tampered_entitlement_is_refused_at_any_byte(station_env: StationEnv) -> None:
    package = station_env.hq.entitlement()
    with station_env.open() as station:
        before = _snapshot(station)
        step = max(1, len(package) // 97)
        for pos in range(0, len(package), step):
            bad = bytearray(package)
            bad[pos] ^= 0x01
            with pytest.raises(EntitlementImportError) as info:
                station.import_entitlement(bytes(bad))
            assert info.value.reason in {
                "tampered",
                "malformed",
                "untrusted_sender",
                "foreign_station",
                "replayed",
            }, (pos, info.value)
        # Truncated, too.
        with pytest.raises(EntitlementImportError):
            station.import_entitlement(package[:-1])
        assert _snapshot(station) == before
        station.import_entitlement(package)  # the genuine one still imports


def test_replayed_and_rolled_back_sequences_are_refused(station_env: StationEnv) -> None:
    hq = station_env.hq
    first, third = hq.entitlement(sequence=1), hq.entitlement(sequence=3)
    second = hq.entitlement(sequence=2)
    with station_env.open() as station:
        station.import_entitlement(first)
        _refused(station, first, "replayed")
        station.import_entitlement(third)
        _refused(station, second, "replayed")  # older than the last imported
        _refused(station, third, "replayed")
        assert station.policy is not None and station.policy.sequence == 3


def test_expired_window_is_refused(station_env: StationEnv) -> None:
    now = int(datetime.now(UTC).timestamp())
    package = station_env.hq.entitlement(not_before=now - 10 * 86400, not_after=now - 60)
    with station_env.open() as station:
        _refused(station, package, "expired")


def test_station_ca_not_ours_or_not_from_root_is_refused(station_env: StationEnv, pki: Pki) -> None:
    csr, _ = station_env.hq.enrolment.verify()
    other_key = p256("foreign-station-ca").public_key()
    wrong_key = issue_station_ca(
        pki.root,
        pki.root_key,
        other_key,
        station_id=StationId(STATION_ID),
        organization=MANUFACTURER,
        not_before=pki.now,
        not_after=pki.now.replace(year=pki.now.year + 1),
        max_not_after=pki.now.replace(year=pki.now.year + 1),
    )
    rogue_root_key = p256("rogue-root")
    from trustcore.profiles import issue_root_ca

    rogue_root = issue_root_ca(
        rogue_root_key,
        common_name="Rogue",
        organization=MANUFACTURER,
        not_before=pki.now,
        not_after=pki.now.replace(year=pki.now.year + 2),
    )
    wrong_root = issue_station_ca(
        rogue_root,
        rogue_root_key,
        csr.public_key,
        station_id=StationId(STATION_ID),
        organization=MANUFACTURER,
        not_before=pki.now,
        not_after=pki.now.replace(year=pki.now.year + 1),
        max_not_after=pki.now.replace(year=pki.now.year + 1),
    )
    with station_env.open() as station:
        _refused(station, station_env.hq.entitlement(station_ca=wrong_key), "wrong_station_ca")
        _refused(station, station_env.hq.entitlement(station_ca=wrong_root), "wrong_station_ca")


def test_sender_without_entitlement_signer_role_is_refused(
    station_env: StationEnv, pki: Pki
) -> None:
    # A package signed by the revocation signer (valid HQ role, wrong EKU).
    from cryptography.hazmat.primitives.serialization import Encoding

    from signers.software import SoftwareKey
    from trustcore.messages import CT_ENTITLEMENT
    from trustcore.sealed import peek, seal_package

    good = station_env.hq.entitlement()
    header = peek(good)
    cert, key = pki.roles[HqRole.REVOCATION_SIGNER]
    del Encoding, header
    _, transport = station_env.hq.enrolment.verify()
    package = seal_package(
        content_type=CT_ENTITLEMENT,
        payload=b"\xa0",
        sender=SoftwareKey(key),
        sender_cert=cert,
        receiver_public=transport,
        sequence=1,
        created=0,
    )
    with station_env.open() as station:
        _refused(station, package, "untrusted_sender")


def test_station_files_open_only_once(station_env: StationEnv) -> None:
    with station_env.open(), pytest.raises(StationStateError):
        station_env.open()
