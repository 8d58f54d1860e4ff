"""Quorum-gated operations at a real (swtpm) factory station: exceeding the daily limit with
2-of-3 approvals works for the approved number of devices, a replay is refused, 1-of-3 is
refused, and the grant is audited with its evidence (re-verifiable offline)."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.cli import main as device_main
from factory_station.errors import IssuanceRefused
from factory_station.provision import provision_device
from factory_station.station import FactoryStation
from factory_station.store import StationStore
from signers.software import SoftwareKey
from tests.fixtures.station import (
    PRODUCT,
    STATION_ID,
    StationEnv,
)
from trustcore.audit import decode_record
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, QuorumRule
from trustcore.identity import DeviceId
from trustcore.keys import key_id
from trustcore.messages import CT_ENTITLEMENT, EntitlementPayload
from trustcore.profiles import HqRole
from trustcore.quorum import (
    ApprovalRequest,
    encode_bundle,
    parse_evidence,
    sign_approval,
    verify_quorum_rule,
)
from trustcore.sealed import seal_package

pytestmark = pytest.mark.tpm


@pytest.fixture(scope="module")
def approvers() -> list[SoftwareKey]:
    return [SoftwareKey.ephemeral() for _ in range(4)]  # three named, one outsider


def _entitlement(env: StationEnv, rule: QuorumRule, *, quota: int, daily: int) -> bytes:
    """Like ``SoftHq.entitlement`` but with a quorum rule in the policy."""
    env.hq.entitlement(quota=quota, daily=daily)  # issues the station CA once
    assert env.hq.station_ca is not None
    now = int(datetime.now(UTC).timestamp())
    policy = EntitlementPolicy(
        entitlement_id="ent-q1",
        station_id=STATION_ID,
        sequence=1,
        product=PRODUCT,
        total_quota=quota,
        daily_limit=daily,
        day_timezone="UTC",
        not_before=now - 3600,
        not_after=now + 30 * 86400,
        id_rule=DeviceIdRule("dev-", 1, 999_999, 6),
        quorum=(rule,),
    )
    _, transport = env.hq.enrolment.verify()
    audit_cert, _ = env.hq.pki.roles[HqRole.AUDIT_RECEIVER]
    payload = EntitlementPayload(
        policy=policy,
        station_ca_cert_der=env.hq.station_ca.public_bytes(Encoding.DER),
        audit_receiver_cert_der=audit_cert.public_bytes(Encoding.DER),
        product_secrets={},
    )
    signer_cert, signer_key = env.hq.pki.roles[HqRole.ENTITLEMENT_SIGNER]
    return seal_package(
        content_type=CT_ENTITLEMENT,
        payload=payload.encode(),
        sender=SoftwareKey(signer_key),
        sender_cert=signer_cert,
        receiver_public=transport,
        sequence=1,
        created=now,
    )


def _request(
    station: FactoryStation, rule: QuorumRule, extra: int, **over: object
) -> ApprovalRequest:
    policy = station.policy
    assert policy is not None
    now = station.now()
    params: dict[str, Any] = {
        "station_id": policy.station_id,
        "entitlement_id": policy.entitlement_id,
        "day": policy.day_of(now),
        "extra": extra,
        **over,
    }
    return ApprovalRequest(
        request_id=os.urandom(16),
        operation="exceed_daily_limit",
        params=params,
        approvers=rule.approvers,
        m=rule.m,
        created=now - 5,
        expires=now + 3600,
        requested_by="line-manager",
    )


def test_exceeding_the_daily_limit_with_two_of_three_approvals(
    station_env: StationEnv, approvers: list[SoftwareKey], tmp_path: Path
) -> None:
    env = station_env
    rule = QuorumRule("exceed_daily_limit", 2, tuple(key_id(k.public_key()) for k in approvers[:3]))
    with env.open() as station:
        station.import_entitlement(_entitlement(env, rule, quota=10, daily=2))
        devices = [env.device() for _ in range(4)]
        for dev in devices[:2]:
            provision_device(station, dev.endpoint)
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, devices[2].endpoint)
        assert info.value.reason == "over_daily_limit"

        now = station.now()
        request = _request(station, rule, extra=1)
        one = encode_bundle(request, [sign_approval(request, approvers[0], now=now)])
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([one])
        assert info.value.reason == "insufficient"
        # An outsider's signature does not make up the numbers.
        with_outsider = encode_bundle(
            request, [sign_approval(request, k, now=now) for k in (approvers[0], approvers[3])]
        )
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([with_outsider])
        assert info.value.reason == "unknown_approver"
        # Approvals for another station are refused here.
        foreign = _request(station, rule, extra=1, station_id="station-zz")
        signed = [sign_approval(foreign, k, now=now) for k in approvers[:2]]
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([encode_bundle(foreign, signed)])
        assert info.value.reason == "wrong_operation"
        with pytest.raises(IssuanceRefused):  # still over the limit
            provision_device(station, devices[2].endpoint)

        two = encode_bundle(request, [sign_approval(request, k, now=now) for k in approvers[1:3]])
        grant = station.accept_approvals([two])
        assert (grant.operation, grant.extra, grant.day) == (
            "exceed_daily_limit",
            1,
            request.params["day"],
        )
        third = provision_device(station, devices[2].endpoint)
        assert third.device_id.value == "dev-000003"
        # The grant was for one device more, not for the rest of the day.
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, devices[3].endpoint)
        assert info.value.reason == "over_daily_limit"
        # The same approvals again: replayed, nothing granted.
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([two])
        assert info.value.reason == "replayed"
        with pytest.raises(IssuanceRefused):
            provision_device(station, devices[3].endpoint)

        records = [decode_record(raw) for _, raw in station.store.audit_records(0)]
        approved = [r for r in records if r.event == "quorum_approved"]
        assert len(approved) == 1
        fields = approved[0].fields
        assert fields["operation"] == "exceed_daily_limit"
        assert fields["request_id"] == request.request_id
        assert set(str(fields["approvers"]).split(",")) == {
            key_id(k.public_key()).hex() for k in approvers[1:3]
        }
        # The evidence travels in the audit log: HQ can re-verify it offline.
        evidence = fields["evidence"]
        assert isinstance(evidence, bytes)
        decision = verify_quorum_rule(
            parse_evidence([evidence]), rule, params=request.params, now=now, used_request_ids=()
        )
        assert decision.request_id == request.request_id
        refusals = [r.fields["reason"] for r in records if r.event == "refused"]
        assert "quorum_insufficient" in refusals and "quorum_replayed" in refusals

    # The replay refusal is durable: it survives closing and reopening the station.
    with env.open() as station:
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([two])
        assert info.value.reason == "replayed"


def test_provision_cli_refuses_one_of_three(
    station_env: StationEnv, approvers: list[SoftwareKey], tmp_path: Path
) -> None:
    env = station_env
    rule = QuorumRule("exceed_daily_limit", 2, tuple(key_id(k.public_key()) for k in approvers[:3]))
    with env.open() as station:
        station.import_entitlement(_entitlement(env, rule, quota=10, daily=2))
        request = _request(station, rule, extra=3)
        now = station.now()
    (tmp_path / "req.cbor").write_bytes(request.encode())
    (tmp_path / "a0.cbor").write_bytes(sign_approval(request, approvers[0], now=now).encode())
    result = CliRunner().invoke(
        device_main,
        [
            "provision", "--station", str(env.home), "--tcti", env.swtpm.tcti,
            "--device-tcti", "swtpm:host=127.0.0.1,port=1",  # never reached
            "--approvals", str(tmp_path / "req.cbor"), "--approvals", str(tmp_path / "a0.cbor"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "insufficient" in result.output


# ------------------------------------------------------------- re-issuing a certificate


def _reissue_request(station: FactoryStation, rule: QuorumRule, device_id: str) -> ApprovalRequest:
    policy = station.policy
    assert policy is not None
    now = station.now()
    return ApprovalRequest(
        request_id=os.urandom(16),
        operation="reissue_device_certificate",
        params={
            "station_id": policy.station_id,
            "entitlement_id": policy.entitlement_id,
            "device_id": device_id,
        },
        approvers=rule.approvers,
        m=rule.m,
        created=now - 5,
        expires=now + 3600,
        requested_by="line-manager",
    )


def test_reissuing_a_certificate_with_two_of_three_approvals_works_once(
    station_env: StationEnv, approvers: list[SoftwareKey]
) -> None:
    env = station_env
    rule = QuorumRule(
        "reissue_device_certificate", 2, tuple(key_id(k.public_key()) for k in approvers[:3])
    )
    dev = DeviceId("dev-000001")
    with env.open() as station:
        station.import_entitlement(_entitlement(env, rule, quota=10, daily=10))
        first = station.issue(dev, SoftwareKey.ephemeral().public_key())
        with pytest.raises(IssuanceRefused) as info:
            station.issue(dev, SoftwareKey.ephemeral().public_key())
        assert info.value.reason == "duplicate_device"

        now = station.now()
        request = _reissue_request(station, rule, dev.value)
        one = encode_bundle(request, [sign_approval(request, approvers[0], now=now)])
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([one])
        assert info.value.reason == "insufficient"
        with pytest.raises(IssuanceRefused) as info:
            station.issue(dev, SoftwareKey.ephemeral().public_key())
        assert info.value.reason == "duplicate_device"

        two = encode_bundle(request, [sign_approval(request, k, now=now) for k in approvers[:2]])
        grant = station.accept_approvals([two])
        assert (grant.operation, grant.device_id) == ("reissue_device_certificate", dev.value)
        # The key must be new: re-issuing for the old key is refused and keeps the grant.
        with pytest.raises(IssuanceRefused) as info:
            station.issue(dev, first.certificate.public_key())  # type: ignore[arg-type]
        assert info.value.reason == "duplicate_key"
        second = station.issue(dev, SoftwareKey.ephemeral().public_key())
        assert second.serial_hex != first.serial_hex
        assert second.counter == first.counter + 1  # the re-issue uses a quota slot
        rows = station.store.db.execute(
            "SELECT serial, status FROM issuance WHERE device_id = ? ORDER BY counter",
            (dev.value,),
        ).fetchall()
        assert rows == [(first.serial_hex, "superseded"), (second.serial_hex, "issued")]

        # The grant was for one certificate: a third needs new approvals.
        with pytest.raises(IssuanceRefused) as info:
            station.issue(dev, SoftwareKey.ephemeral().public_key())
        assert info.value.reason == "duplicate_device"
        with pytest.raises(IssuanceRefused) as info:
            station.accept_approvals([two])
        assert info.value.reason == "replayed"
        # A grant names one device: another device id is untouched by it.
        other = station.issue(DeviceId("dev-000002"), SoftwareKey.ephemeral().public_key())
        with pytest.raises(IssuanceRefused) as info:
            station.issue(other.device_id, SoftwareKey.ephemeral().public_key())
        assert info.value.reason == "duplicate_device"

        records = [decode_record(raw) for _, raw in station.store.audit_records(0)]
        issued = [r.fields for r in records if r.event == "issued"]
        assert [f.get("reissue_of") for f in issued] == [None, first.serial_hex, None]
        # The export's manifest still carries the superseded certificate its log names.
        package, _ = station.export_audit()
        assert package

    with env.open() as station:  # the consumption is durable
        with pytest.raises(IssuanceRefused) as info:
            station.issue(dev, SoftwareKey.ephemeral().public_key())
        assert info.value.reason == "duplicate_device"


def test_a_station_database_from_before_reissues_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """CREATE TABLE issuance (
            counter INTEGER PRIMARY KEY, entitlement_seq INTEGER NOT NULL,
            device_id TEXT NOT NULL, day TEXT NOT NULL, time INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'issued', 'burned')),
            serial TEXT, key_id BLOB, certificate BLOB) STRICT;
        CREATE UNIQUE INDEX issued_device ON issuance(device_id) WHERE status = 'issued';
        INSERT INTO issuance VALUES (7, 1, 'dev-000001', '2024-01-01', 1, 'issued', 'ab',
            NULL, NULL);"""
    )
    old.close()
    store = StationStore(path)
    try:
        with store.transaction() as db:
            db.execute("UPDATE issuance SET status = 'superseded' WHERE counter = 7")
            db.execute(
                "INSERT INTO issuance VALUES (8, 1, 'dev-000001', '2024-01-01', 2, 'issued', "
                "'cd', NULL, NULL)"
            )
        assert store.issued_serial("dev-000001") == "cd"
        with pytest.raises(sqlite3.IntegrityError):  # still one current certificate a device
            store.db.execute(
                "INSERT INTO issuance VALUES (9, 1, 'dev-000001', '2024-01-01', 3, 'issued', "
                "'ef', NULL, NULL)"
            )
    finally:
        store.close()
