"""Shared pieces of the factory-station tests (no tests here): a software HQ built on the
test PKI that enrols a station and seals entitlements to it, a TPM-vendor CA with one EK
template state per session, and a station on its own swtpm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from device_sim.device import SimDevice, vendor_ca_pem
from device_sim.swtpm import Swtpm, provision_ek_certificate
from factory_station.station import FactoryStation
from signers.software import SoftwareKey
from tests.fixtures.pki import MANUFACTURER, Pki
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, SecretRule
from trustcore.identity import StationId
from trustcore.messages import (
    CT_ENTITLEMENT,
    CT_TIME_STATEMENT,
    EntitlementPayload,
    StationEnrolment,
    TimeStatement,
)
from trustcore.profiles import HqRole, issue_station_ca
from trustcore.sealed import seal_package

STATION_ID = "station-t1"
PRODUCT = "widget-a"
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Vendor:
    ca_dir: Path
    template: Path  # a TPM state with an EK certificate from this vendor

    @property
    def ca_pem(self) -> bytes:
        return vendor_ca_pem(self.ca_dir)


def make_vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    """A vendor CA and one TPM state holding an EK certificate it issued (about 0.6 s)."""
    base = tmp_path_factory.mktemp("tpm-vendor")
    provision_ek_certificate(base / "template", ca_dir=base / "ca")
    return Vendor(base / "ca", base / "template")


@dataclass
class SoftHq:
    """HQ in software, on the test PKI: issues the station CA and seals entitlements."""

    pki: Pki
    enrolment: StationEnrolment
    station_ca: x509.Certificate | None = None
    sent: list[bytes] = field(default_factory=list)

    def entitlement(
        self,
        *,
        sequence: int = 1,
        station_id: str = STATION_ID,
        quota: int = 20,
        daily: int = 10,
        not_before: int | None = None,
        not_after: int | None = None,
        rule: DeviceIdRule | None = None,
        station_ca: x509.Certificate | None = None,
        to_transport: object | None = None,
        timezone: str = "UTC",
        created: int | None = None,
        secrets: dict[str, bytes] | None = None,
        secret_rules: tuple[SecretRule, ...] = (),
    ) -> bytes:
        """``created``: HQ's signing time (default: the real clock); the station anchors
        its trusted time to it."""
        now = int(datetime.now(UTC).timestamp()) if created is None else created
        nb = now - 3600 if not_before is None else not_before
        na = now + 30 * 86400 if not_after is None else not_after
        csr, transport = self.enrolment.verify()
        if station_ca is None:
            if self.station_ca is None:
                self.station_ca = issue_station_ca(
                    self.pki.root,
                    self.pki.root_key,
                    csr.public_key,
                    station_id=StationId(self.enrolment.station_id.value),
                    organization=MANUFACTURER,
                    not_before=self.pki.now - DAY,
                    not_after=self.pki.now + 60 * DAY,
                    max_not_after=self.pki.now + 60 * DAY,
                )
            station_ca = self.station_ca
        policy = EntitlementPolicy(
            entitlement_id=f"ent-{sequence}",
            station_id=station_id,
            sequence=sequence,
            product=PRODUCT,
            total_quota=quota,
            daily_limit=daily,
            day_timezone=timezone,
            not_before=nb,
            not_after=na,
            id_rule=rule or DeviceIdRule("dev-", 1, 999_999, 6),
            secrets=secret_rules,
        )
        audit_cert, _ = self.pki.roles[HqRole.AUDIT_RECEIVER]
        payload = EntitlementPayload(
            policy=policy,
            station_ca_cert_der=station_ca.public_bytes(Encoding.DER),
            audit_receiver_cert_der=audit_cert.public_bytes(Encoding.DER),
            product_secrets=secrets or {},
        )
        signer_cert, signer_key = self.pki.roles[HqRole.ENTITLEMENT_SIGNER]
        package = seal_package(
            content_type=CT_ENTITLEMENT,
            payload=payload.encode(),
            sender=SoftwareKey(signer_key),
            sender_cert=signer_cert,
            receiver_public=transport if to_transport is None else to_transport,  # type: ignore[arg-type]
            sequence=sequence,
            created=now,
        )
        self.sent.append(package)
        return package

    def time_statement(
        self, when: int, *, station_id: str = STATION_ID, role: HqRole = HqRole.ENTITLEMENT_SIGNER
    ) -> bytes:
        """What ``hq time-statement`` makes: HQ's time ``when`` for one station, signed."""
        cert, key = self.pki.roles[role]
        return seal_package(
            content_type=CT_TIME_STATEMENT,
            payload=TimeStatement(station_id, when).encode(),
            sender=SoftwareKey(key),
            sender_cert=cert,
            receiver_public=None,
            sequence=when,
            created=when,
        )


@dataclass
class StationEnv:
    home: Path
    swtpm: Swtpm
    hq: SoftHq
    vendor: Vendor
    root_pem: Path
    devices_dir: Path
    _devices: list[SimDevice] = field(default_factory=list)

    def open(self, **kwargs: object) -> FactoryStation:
        return FactoryStation.open(self.home, tcti=self.swtpm.tcti, **kwargs)  # type: ignore[arg-type]

    def device(self) -> SimDevice:
        dev = SimDevice.manufacture(
            self.devices_dir / f"dev{len(self._devices)}", template=self.vendor.template
        )
        self._devices.append(dev)
        return dev.power_on()

    def close(self) -> None:
        for dev in self._devices:
            dev.power_off()


def make_station(
    pki: Pki, vendor: Vendor, base: Path, swtpm_factory: Callable[..., Swtpm]
) -> StationEnv:
    tpm = swtpm_factory(base / "station-tpm")
    root_pem = base / "root.pem"
    root_pem.write_bytes(pki.root.public_bytes(Encoding.PEM))
    home = base / "station"
    enrolment = FactoryStation.init(
        home,
        station_id=StationId(STATION_ID),
        tcti=tpm.tcti,
        root_pem=root_pem.read_bytes(),
        vendor_ca_pem=vendor.ca_pem,
    )
    return StationEnv(home, tpm, SoftHq(pki, enrolment), vendor, root_pem, base / "devices")


def station_env_fixture(
    pki: Pki, vendor: Vendor, tmp_path: Path, swtpm_factory: Callable[..., Swtpm]
) -> Iterator[StationEnv]:
    """Body of each test module's ``station_env`` fixture (fixtures are per module)."""
    env = make_station(pki, vendor, tmp_path, swtpm_factory)
    try:
        yield env
    finally:
        env.close()
