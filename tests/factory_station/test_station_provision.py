"""Provisioning at the factory station with real swtpm TPMs for the station and for every
device: the happy path (10 devices, the 11th refused on the same day, certificates accepted
by ``openssl verify``, audit export opened and verified as HQ would), policy refusals, a CSR
whose key is not in the device TPM, and batches."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.device import SimDevice, TpmDevice
from factory_station.errors import AttestationError, IssuanceRefused
from factory_station.provision import provision_batch, provision_device
from factory_station.station import FactoryStation
from signers.software import SoftwareKey
from tests.fixtures.pki import Pki
from tests.fixtures.station import (
    PRODUCT,
    StationEnv,
)
from trustcore.audit import FieldValue, verify_export
from trustcore.csr import build_device_csr
from trustcore.entitlement import DeviceIdRule
from trustcore.identity import DeviceId
from trustcore.keys import key_id
from trustcore.messages import CT_AUDIT_EXPORT, AuditExportPayload
from trustcore.profiles import HqRole, device_id_from_certificate
from trustcore.sealed import open_package
from trustcore.stationtime import unpack_tpm_field

pytestmark = pytest.mark.tpm


def _events(station: FactoryStation) -> list[tuple[str, dict[str, FieldValue]]]:
    from trustcore.audit import decode_record

    out = []
    for _, raw in station.store.audit_records(0):
        rec = decode_record(raw)
        out.append((rec.event, rec.fields))
    return out


def test_ten_devices_then_the_daily_limit_and_openssl_accepts_each(
    station_env: StationEnv, pki: Pki, tmp_path: Path
) -> None:
    env = station_env
    station_ca_pem = tmp_path / "station_ca.pem"
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(quota=20, daily=10))
        devices = [env.device() for _ in range(11)]
        results = [provision_device(station, d.endpoint) for d in devices[:10]]
        assert [r.device_id.value for r in results] == [f"dev-{i:06d}" for i in range(1, 11)]
        counter_before = station.status().counter
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, devices[10].endpoint)
        assert info.value.reason == "over_daily_limit"
        assert "daily limit of 10" in str(info.value)
        status = station.status()
        assert status.counter == counter_before  # a refusal consumes no slot
        assert (status.issued_total, status.issued_today, status.remaining) == (10, 10, 10)
        assert devices[10].certificate() is None

        events = _events(station)
        issued = [f for e, f in events if e == "issued"]
        assert len(issued) == 10
        assert [e for e, _ in events].count("refused") == 1
        event, refused = events[-1]
        assert (event, refused["device_id"], refused["reason"]) == (
            "refused", "dev-000011", "over_daily_limit",
        )  # fmt: skip
        # Every record carries the TPM clock reading it was decided on (HQ checks them).
        readings = [unpack_tpm_field(f["tpm"]) for f in (*issued, refused)]
        assert None not in readings and readings == sorted(readings)  # type: ignore[type-var]

        assert station.station_ca_certificate is not None
        station_ca_pem.write_bytes(station.station_ca_certificate.public_bytes(Encoding.PEM))
        for dev, res, fields in zip(devices[:10], results, issued, strict=True):
            cert = dev.certificate()
            assert cert is not None
            assert device_id_from_certificate(cert) == res.device_id
            # The certified key is the device TPM key (loadable from its blob in that TPM).
            tpm_key = dev.key()
            cert_key = cert.public_key()
            assert isinstance(cert_key, ec.EllipticCurvePublicKey)
            assert key_id(cert_key) == key_id(tpm_key.public_key()) == fields["key_id"]
            assert fields["serial"] == f"{cert.serial_number:x}"
            assert fields["product"] == PRODUCT and fields["entitlement_seq"] == 1
            out = subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-CAfile",
                    str(env.root_pem),
                    "-untrusted",
                    str(station_ca_pem),
                    str(dev.directory / "idevid.pem"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert out.returncode == 0, out.stdout + out.stderr

        # Audit export: sealed to HQ's audit receiver, signed by the station CA key (TPM).
        package, number = station.export_audit()
        station.record_export(number)
        assert number == 1
        cert, receiver = pki.roles[HqRole.AUDIT_RECEIVER]
        ca_pub = station.station_ca_certificate.public_key()
        assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
        opened = open_package(
            package,
            receiver=SoftwareKey(receiver),
            expected_content_type=CT_AUDIT_EXPORT,
            trusted_sender_public=ca_pub,
            last_sequence=0,
            max_size=1 << 24,
        )
        payload = AuditExportPayload.decode(opened.payload, max_size=1 << 24)
        assert payload.export_number == 1 and payload.station_id == "station-t1"
        head = verify_export(payload.audit_export, station_id="station-t1", station_public=ca_pub)
        assert head.count == len(events)
        assert len(payload.manifest) == 10
        manifest_ids = {
            device_id_from_certificate(x509.load_der_x509_certificate(c)).value
            for c in payload.manifest
        }
        assert manifest_ids == {f"dev-{i:06d}" for i in range(1, 11)}
        # The next export continues the chain with only the new records.
        with pytest.raises(IssuanceRefused):
            provision_device(station, devices[10].endpoint, DeviceId("dev-000500"))
        package2, number2 = station.export_audit()
        station.record_export(number2)
        opened2 = open_package(
            package2,
            receiver=SoftwareKey(receiver),
            expected_content_type=CT_AUDIT_EXPORT,
            trusted_sender_public=ca_pub,
            last_sequence=1,
            max_size=1 << 24,
        )
        payload2 = AuditExportPayload.decode(opened2.payload, max_size=1 << 24)
        head2 = verify_export(
            payload2.audit_export,
            station_id="station-t1",
            station_public=ca_pub,
            start_seq=head.next_seq,
            start_prev_hash=head.head_hash,
        )
        assert head2.count == head.count + 1 and payload2.manifest == ()


def test_over_quota_is_refused(station_env: StationEnv) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(quota=2, daily=2))
        for _ in range(2):
            provision_device(station, env.device().endpoint)
        dev = env.device()
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, dev.endpoint)
        assert info.value.reason == "over_quota"
        assert station.status().issued_total == 2


def test_device_id_out_of_range_is_refused(station_env: StationEnv) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(rule=DeviceIdRule("dev-", 1, 50, 6)))
        dev = env.device()
        for bad in ("dev-000051", "dev-000000", "xyz-000001", "dev-01"):
            with pytest.raises(IssuanceRefused) as info:
                provision_device(station, dev.endpoint, DeviceId(bad))
            assert info.value.reason == "id_out_of_range", bad
        assert station.status().issued_total == 0
        assert provision_device(station, dev.endpoint, DeviceId("dev-000050")).issued.counter


class SoftwareCsrDevice(TpmDevice):
    """A device that attests its genuine TPM key but asks to certify a software key."""

    def prepare(self, device_id: DeviceId) -> bytes:
        super().prepare(device_id)
        return build_device_csr(SoftwareKey.generate(), device_id)


def test_csr_key_not_in_the_device_tpm_is_refused(station_env: StationEnv) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement())
        dev = env.device()
        assert dev.tpm is not None
        before = station.status().counter
        with pytest.raises(AttestationError) as info:
            provision_device(station, SoftwareCsrDevice(dev.tpm, dev.directory))
        assert info.value.reason == "key_mismatch"
        assert station.status().counter == before
        assert _events(station)[-1] == (
            "refused",
            {"device_id": "dev-000001", "reason": "attestation_key_mismatch"},
        )
        assert dev.certificate() is None
        # The id was not consumed: the next genuine device gets it.
        assert provision_device(station, dev.endpoint).device_id == DeviceId("dev-000001")


def test_duplicate_device_id_is_refused(station_env: StationEnv) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement())
        provision_device(station, env.device().endpoint, DeviceId("dev-000007"))
        with pytest.raises(IssuanceRefused) as info:
            provision_device(station, env.device().endpoint, DeviceId("dev-000007"))
        assert info.value.reason == "duplicate_device"


def test_batch_stops_at_the_daily_limit(station_env: StationEnv) -> None:
    env = station_env
    with env.open() as station:
        station.import_entitlement(env.hq.entitlement(quota=10, daily=4))
        devices: list[SimDevice] = [env.device() for _ in range(6)]
        seen: list[object] = []
        result = provision_batch(
            station,
            [d.endpoint for d in devices],
            workers=3,
            on_done=lambda ok, err: seen.append(ok or err),
        )
        assert len(result.provisioned) == 4
        assert {e.reason for _, e in result.refused} == {"over_daily_limit"}
        assert len(seen) == len(result.provisioned) + len(result.refused)
        ids = sorted(r.device_id.value for r in result.provisioned)
        # Ids are unique; under concurrency a refused device may have held a lower one.
        assert len(set(ids)) == 4 and set(ids) <= {f"dev-{i:06d}" for i in range(1, 7)}
        assert station.status().issued_total == 4
