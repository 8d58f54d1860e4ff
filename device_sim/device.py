"""A simulated device: its own TPM (one swtpm and its state directory) and the files the
factory writes to it.

Device directory::

    tpm/                  swtpm state: the device's TPM, persistent across power cycles
                          (EK and EK certificate from the "TPM vendor", owner seed, NV)
    device-key.tss.pem    the device key: TPM-wrapped blob, useless outside this TPM
    idevid.pem            the factory certificate (IEEE 802.1AR IDevID)
    chain.pem             the issuing station CA certificate (what TLS clients send)
    device.json           {"device_id", "key", "certificate", "chain", "serial"}
    secrets/NAME.cbor     a product secret imported into the TPM: {"public", "private"}, the
                          private part wrapped by this TPM's storage key (useless elsewhere;
                          the secret itself never leaves the TPM: HMAC only, see
                          signers.tpm_import)

A device is "manufactured" (:meth:`SimDevice.manufacture`) with a TPM that already carries
an EK certificate, as a real TPM leaves its vendor: either a fresh ``swtpm_setup`` run
(about 0.6 s, its own EK) or, for large fleets and benchmarks, a copy of one template state
(fast, but every copy shares the template's EK and seeds: fine for load, documented as such).

:class:`TpmDevice` is the device side of the factory protocol
(``factory_station.provision.DeviceEndpoint``) over any TPM connection, so the station can
also provision a device it reaches only through a TCTI.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from cryptography import x509

from device_sim.errors import DeviceSimError
from device_sim.swtpm import Swtpm, provision_ek_certificate
from signers.attestation import (
    AttestationEvidence,
    AttestationIdentity,
    CredentialChallenge,
    TpmAttestor,
)
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.tpm import Tpm, TpmKey, TpmKeyUsage
from signers.tpm_import import SecretImport, check_secret_public
from trustcore import cbor
from trustcore.csr import build_device_csr
from trustcore.errors import EncodingError
from trustcore.identity import DeviceId

__all__ = [
    "DEVICE_FILE",
    "DeviceStateError",
    "SimDevice",
    "TpmDevice",
    "create_fleet",
    "manufacture_tpm_template",
    "power_off_all",
    "power_on_all",
    "vendor_ca_pem",
]

TPM_DIR = "tpm"
KEY_FILE = "device-key.tss.pem"
CERT_FILE = "idevid.pem"
CHAIN_FILE = "chain.pem"
DEVICE_FILE = "device.json"
SECRETS_DIR = "secrets"
_SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class DeviceStateError(DeviceSimError):
    """A device directory is missing, incomplete or inconsistent."""

    reason = "bad_device_state"


def _write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write-then-rename, so a reader never sees half a file. ``sync=False`` skips the
    fsync for files that a later synced write in the same directory commits."""
    try:
        write_private_file(path, data, overwrite=True, sync=sync)
    except SignerError as exc:
        raise DeviceStateError(exc.message) from exc


def _pem(kind: str, der: bytes) -> bytes:
    """PEM armour for DER already validated by the caller (no re-parse, no re-encode)."""
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"".join(
        [
            f"-----BEGIN {kind}-----\n".encode(),
            *(line + b"\n" for line in lines),
            f"-----END {kind}-----\n".encode(),
        ]
    )


def manufacture_tpm_template(directory: Path | str, *, ek_ca_dir: Path | str) -> Path:
    """One TPM state with an EK certificate from the vendor CA in ``ek_ca_dir``."""
    directory = Path(directory)
    provision_ek_certificate(directory, ca_dir=ek_ca_dir)
    return directory


def vendor_ca_pem(ek_ca_dir: Path | str) -> bytes:
    """The vendor CA chain ``swtpm_localca`` made: root first, then the issuing CA."""
    ca = Path(ek_ca_dir)
    return (ca / "swtpm-localca-rootca-cert.pem").read_bytes() + (
        ca / "issuercert.pem"
    ).read_bytes()


class TpmDevice:
    """The device side of provisioning over one TPM connection.

    ``directory``, when given, receives the key blob and the certificates; without it they
    are only kept in memory (``key_pem``, ``certificate_der``).
    """

    def __init__(self, tpm: Tpm, directory: Path | None = None) -> None:
        self.tpm = tpm
        self.directory = directory
        self._attestor = TpmAttestor(tpm)
        self.key: TpmKey | None = None
        self.device_id: DeviceId | None = None
        self.certificate_der: bytes | None = None
        #: Imported product secrets: name -> (public, TPM-wrapped private).
        self.secrets: dict[str, tuple[bytes, bytes]] = {}

    def prepare(self, device_id: DeviceId) -> bytes:
        """Have the TPM create a non-exportable P-256 key; return a CSR signed by it."""
        self.key = TpmKey.create(self.tpm, TpmKeyUsage.SIGN)
        self.device_id = device_id
        if self.directory is not None:
            self.key.save(self.directory / KEY_FILE, overwrite=True)
        return build_device_csr(self.key, device_id)

    def attestation_identity(self) -> AttestationIdentity:
        return self._attestor.identity()

    def attest(self, challenge: CredentialChallenge) -> AttestationEvidence:
        if self.key is None:
            raise DeviceStateError("prepare() has not created a key")
        return self._attestor.respond(
            self.key,
            credential_blob=challenge.credential_blob,
            encrypted_secret=challenge.encrypted_secret,
            nonce=challenge.nonce,
        )

    def store_certificate(
        self, device_id: DeviceId, certificate_der: bytes, chain_der: bytes
    ) -> None:
        """The factory releases the certificate: write it beside the TPM state."""
        if device_id != self.device_id:
            raise DeviceStateError(f"certificate for {device_id}, device prepared {self.device_id}")
        try:
            cert = x509.load_der_x509_certificate(certificate_der)
            x509.load_der_x509_certificate(chain_der)
        except ValueError as exc:
            raise DeviceStateError(
                f"the factory sent a certificate that does not parse: {exc}"
            ) from exc
        self.certificate_der = certificate_der
        if self.directory is None:
            return
        # Certificate and chain first (atomic, not synced), then device.json synced: the
        # file that says "provisioned". If power fails before that, the device is not
        # provisioned on disk and the station, which holds the certificate durably, re-sends
        # it (on ext4 a rename over a file also flushes the renamed file's data).
        _write_atomic(self.directory / CERT_FILE, _pem("CERTIFICATE", certificate_der), sync=False)
        _write_atomic(self.directory / CHAIN_FILE, _pem("CERTIFICATE", chain_der), sync=False)
        info = {
            "device_id": device_id.value,
            "key": KEY_FILE,
            "certificate": CERT_FILE,
            "chain": CHAIN_FILE,
            "serial": f"{cert.serial_number:x}",
        }
        _write_atomic(self.directory / DEVICE_FILE, json.dumps(info, indent=2).encode())

    # -- product secrets -----------------------------------------------------------------------

    def storage_parent(self) -> bytes:
        """The storage primary's public area, which the factory wraps secrets to."""
        return self.tpm.storage_public()

    def import_secrets(self, device_id: DeviceId, imports: Sequence[SecretImport]) -> None:
        """TPM2_Import each blob (after checking it is a non-duplicable, non-unsealable HMAC
        key) and keep the TPM-wrapped result beside the TPM state."""
        if device_id != self.device_id:
            raise DeviceStateError(f"secrets for {device_id}, device prepared {self.device_id}")
        for item in imports:
            check_secret_name(item.name)
            check_secret_public(item.public)
            private = self.tpm.import_object(item.public, item.duplicate, item.seed)
            self.secrets[item.name] = (item.public, private)
            if self.directory is not None:
                folder = self.directory / SECRETS_DIR
                folder.mkdir(exist_ok=True)
                data = cbor.encode({"public": item.public, "private": private})
                _write_atomic(folder / f"{item.name}.cbor", data)

    def secret_hmac(self, name: str, challenge: bytes) -> bytes:
        """Prove this device holds product secret ``name``: HMAC-SHA256 over ``challenge``
        computed inside the TPM (whoever knows the secret checks it with
        ``signers.tpm_import.secret_hmac``)."""
        entry = self.secrets.get(name)
        if entry is None and self.directory is not None:
            entry = read_secret_object(self.directory, name)
        if entry is None:
            raise DeviceStateError(f"this device holds no product secret {name!r}")
        return self.tpm.hmac_with(entry[0], entry[1], challenge)


def check_secret_name(name: str) -> None:
    """A secret name is a file name here: the entitlement's id characters only."""
    if not _SECRET_NAME.fullmatch(name):
        raise DeviceStateError(f"bad product secret name {name!r}")


def read_secret_object(directory: Path, name: str) -> tuple[bytes, bytes] | None:
    """The stored (public, private) of an imported secret, or None."""
    check_secret_name(name)
    path = directory / SECRETS_DIR / f"{name}.cbor"
    if not path.exists():
        return None
    try:
        m = cbor.map_of(cbor.decode(path.read_bytes(), max_size=4096), "secret object")
        cbor.expect_keys(m, {"public", "private"}, what="secret object")
        return cbor.field(m, "public", bytes), cbor.field(m, "private", bytes)
    except EncodingError as exc:
        raise DeviceStateError(f"{path} is not a secret object: {exc}") from exc


class SimDevice:
    """A simulated device in ``directory``: power it on to get a running TPM."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.state_dir = self.directory / TPM_DIR
        if not self.state_dir.is_dir():
            raise DeviceStateError(f"{self.directory} is not a device (no {TPM_DIR}/)")
        self.swtpm: Swtpm | None = None
        self.tpm: Tpm | None = None
        self._endpoint: TpmDevice | None = None

    @classmethod
    def manufacture(
        cls,
        directory: Path | str,
        *,
        ek_ca_dir: Path | str | None = None,
        template: Path | str | None = None,
    ) -> Self:
        """Make a new device directory whose TPM has an EK certificate: copied from
        ``template`` (fast) or made by ``swtpm_setup`` with the CA in ``ek_ca_dir``."""
        directory = Path(directory)
        if (directory / TPM_DIR).exists():
            raise DeviceStateError(f"{directory} already holds a device")
        directory.mkdir(parents=True, exist_ok=True)
        if template is not None:
            shutil.copytree(template, directory / TPM_DIR)
        elif ek_ca_dir is not None:
            provision_ek_certificate(directory / TPM_DIR, ca_dir=ek_ca_dir)
        else:
            raise DeviceStateError("a device TPM needs an EK template or a vendor CA directory")
        return cls(directory)

    # -- power -------------------------------------------------------------------------------

    def power_on(self) -> Self:
        if self.swtpm is None:
            self.swtpm = Swtpm(self.state_dir)
        if not self.swtpm.running:
            self.swtpm.start()
        if self.tpm is None:
            self.tpm = Tpm(self.swtpm.tcti)
        return self

    def power_off(self) -> None:
        if self.tpm is not None:
            self.tpm.close()
            self.tpm = None
        self._endpoint = None
        if self.swtpm is not None:
            self.swtpm.stop()

    def __enter__(self) -> Self:
        return self.power_on()

    def __exit__(self, *exc: object) -> None:
        self.power_off()

    @property
    def startup_seconds(self) -> float:
        return 0.0 if self.swtpm is None else self.swtpm.startup_seconds

    @property
    def tcti(self) -> str:
        if self.swtpm is None:
            raise DeviceStateError("device is powered off")
        return self.swtpm.tcti

    @property
    def endpoint(self) -> TpmDevice:
        """The factory protocol endpoint (the device must be powered on)."""
        if self.tpm is None:
            raise DeviceStateError("device is powered off")
        if self._endpoint is None:
            self._endpoint = TpmDevice(self.tpm, self.directory)
        return self._endpoint

    # -- what the factory wrote ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        path = self.directory / DEVICE_FILE
        if not path.exists():
            return {"directory": str(self.directory), "provisioned": False}
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise DeviceStateError(f"{path} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DeviceStateError(f"{path} is not a JSON object")
        cert = self.certificate()
        return {
            "directory": str(self.directory),
            "provisioned": True,
            **data,
            "subject": cert.subject.rfc4514_string() if cert else None,
            "issuer": cert.issuer.rfc4514_string() if cert else None,
            "secrets": sorted(p.stem for p in (self.directory / SECRETS_DIR).glob("*.cbor")),
        }

    @property
    def device_id(self) -> DeviceId | None:
        path = self.directory / DEVICE_FILE
        if not path.exists():
            return None
        return DeviceId(json.loads(path.read_text())["device_id"])

    def certificate(self) -> x509.Certificate | None:
        path = self.directory / CERT_FILE
        return x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None

    def key(self) -> TpmKey:
        """The device key, loaded into this device's (powered-on) TPM."""
        if self.tpm is None:
            raise DeviceStateError("device is powered off")
        return TpmKey.load(self.tpm, self.directory / KEY_FILE)


def create_fleet(
    base: Path | str,
    count: int,
    *,
    template: Path | str | None = None,
    ek_ca_dir: Path | str | None = None,
    start_index: int = 0,
    workers: int = 4,
) -> list[SimDevice]:
    """Manufacture ``count`` devices under ``base`` (``dev-00000`` ...), in parallel."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    names = [base / f"dev-{i:05d}" for i in range(start_index, start_index + count)]

    def make(path: Path) -> SimDevice:
        return SimDevice.manufacture(path, template=template, ek_ca_dir=ek_ca_dir)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(make, names))


def power_on_all(devices: Sequence[SimDevice], *, workers: int = 8) -> None:
    """Start every device's swtpm (in parallel: start-up is mostly waiting).

    Parallel starts can pick the same random port pair: the second swtpm then fails to bind
    and exits, but ``Swtpm.start`` may already have seen the *first* one answer on that
    control port and taken it for its own, leaving two devices on one TPM. So after the
    parallel start, devices sharing a port are sorted out: the one whose process died is
    powered on again, one at a time.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda d: d.power_on(), devices))
    by_port: dict[int, list[SimDevice]] = {}
    for device in devices:
        if device.swtpm is not None:
            by_port.setdefault(device.swtpm.port, []).append(device)
    for sharing in by_port.values():
        if len(sharing) < 2:
            continue
        deadline = time.monotonic() + 5.0
        while sum(d.swtpm is not None and d.swtpm.running for d in sharing) > 1:
            if time.monotonic() > deadline:
                raise DeviceStateError(f"two live swtpm processes claim one port: {sharing}")
            time.sleep(0.01)
        for device in sharing:
            if device.swtpm is not None and not device.swtpm.running:
                device.power_off()
                device.power_on()


def power_off_all(devices: Iterable[SimDevice]) -> None:
    errors: list[BaseException] = []
    for device in devices:
        try:
            device.power_off()
        except BaseException as exc:  # keep stopping the others
            errors.append(exc)
    if errors:
        raise errors[0]
