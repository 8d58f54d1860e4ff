"""Building a fleet at a real factory station (``device-sim build-fleet``).

Every device goes through the one provisioning path of the station,
:func:`factory_station.provision.provision_batch`: ids from the entitlement's rule, policy
(quota, daily limit, window), the TPM NV counter, the factory certificate signed in the
station's TPM, the audit record. Only the device side differs:

* ``tpm`` — one swtpm per device with an EK certificate (:func:`device_sim.device.
  create_fleet`); the device key is made in its TPM and the station attests it
  (credential activation + TPM2_Certify) unless it runs ``unsafe-csr-only``. The fleet is a
  directory of device directories (``dev-00000/`` …, see :mod:`device_sim.device`).
* ``software`` — load-test devices: the factory key is a software key, written only as an
  encrypted PKCS#8 keystore beside its certificate (:func:`device_sim.fleet.
  write_load_device`, one directory per device id), which ``device-sim fleet`` onboards by
  the hundred. A software key cannot prove it lives in a TPM, so the station must have been
  initialised with ``--unsafe-csr-only`` (a load-test station); a station that attests
  device keys refuses it here, before any device work or audit record.

Refusals are the station's own (``FactoryStationError``, audited by the station); a fleet
that cannot be built at all is a :class:`~device_sim.fleet.FleetError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509

from device_sim.device import create_fleet, power_off_all, power_on_all
from device_sim.fleet import FleetError, write_load_device
from factory_station.errors import FactoryStationError
from factory_station.provision import BatchResult, ProvisionResult, provision_batch
from factory_station.station import AttestationMode, FactoryStation
from signers.attestation import AttestationEvidence, AttestationIdentity, CredentialChallenge
from signers.software import SoftwareKey
from signers.tpm_import import SecretImport
from trustcore.csr import build_device_csr
from trustcore.identity import DeviceId

__all__ = ["KeyMode", "SoftwareDevice", "build_fleet"]

KeyMode = Literal["software", "tpm"]
OnDone = Callable[[ProvisionResult | None, FactoryStationError | None], None]


class SoftwareDevice:
    """The device side of provisioning for a load-test device (software factory key): the
    key is made in memory and, once the station releases the certificate, stored encrypted
    under ``passphrase`` in ``fleet/<device id>/``."""

    def __init__(self, fleet: Path, passphrase: bytes) -> None:
        self._fleet = fleet
        self._passphrase = passphrase
        self._key: SoftwareKey | None = None
        self._device_id: DeviceId | None = None

    def prepare(self, device_id: DeviceId) -> bytes:
        self._key = SoftwareKey.generate()
        self._device_id = device_id
        return build_device_csr(self._key, device_id)

    def attestation_identity(self) -> AttestationIdentity:
        raise FleetError("a software-key device has no TPM to attest its key")

    def attest(self, challenge: CredentialChallenge) -> AttestationEvidence:
        raise FleetError("a software-key device has no TPM to attest its key")

    def storage_parent(self) -> bytes:
        raise FleetError("a software-key device has no TPM to hold product secrets")

    def import_secrets(self, device_id: DeviceId, imports: Sequence[SecretImport]) -> None:
        raise FleetError("a software-key device has no TPM to hold product secrets")

    def store_certificate(
        self, device_id: DeviceId, certificate_der: bytes, chain_der: bytes
    ) -> None:
        if self._key is None or device_id != self._device_id:
            raise FleetError(f"certificate for {device_id}, device prepared {self._device_id}")
        write_load_device(
            self._fleet,
            x509.load_der_x509_certificate(certificate_der),
            (x509.load_der_x509_certificate(chain_der),),
            self._key.private_key(),
            passphrase=self._passphrase,
        )


def build_fleet(
    station: FactoryStation,
    out: Path,
    count: int,
    keys: KeyMode,
    *,
    passphrase: bytes | None = None,
    ek_template: Path | None = None,
    ek_ca_dir: Path | None = None,
    workers: int = 4,
    on_done: OnDone | None = None,
) -> BatchResult:
    """Provision ``count`` new devices at ``station`` into ``out`` (module docstring).
    ``passphrase``: the software keys' keystore passphrase (``software``); ``ek_template``
    or ``ek_ca_dir``: where the device TPMs' EK certificates come from (``tpm``)."""
    if count < 1:
        raise FleetError("a fleet needs at least one device")
    if keys == "software":
        if station.config.attestation != AttestationMode.UNSAFE_CSR_ONLY:
            raise FleetError(
                f"station {station.station_id} attests every device key in the device's TPM "
                f"({station.config.attestation}); software-key devices need a load-test "
                "station initialised with --unsafe-csr-only, or use --keys tpm"
            )
        if passphrase is None:
            raise FleetError("software-key devices need a keystore passphrase")
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        devices = [SoftwareDevice(out, passphrase) for _ in range(count)]
        return provision_batch(station, devices, workers=workers, on_done=on_done)
    if (ek_template is None) == (ek_ca_dir is None):
        raise FleetError("TPM devices need exactly one of an EK template or a vendor CA directory")
    existing = len(list(out.glob("dev-*"))) if out.exists() else 0
    fleet = create_fleet(
        out, count, template=ek_template, ek_ca_dir=ek_ca_dir, start_index=existing
    )
    try:
        power_on_all(fleet)
        return provision_batch(
            station, [d.endpoint for d in fleet], workers=workers, on_done=on_done
        )
    finally:
        power_off_all(fleet)
