"""Fleet mode: onboard many simulated devices at once, with a progress bar.

Each device is a :class:`~device_sim.client.DeviceClient` doing its real registration
(signed request, verified response, payload key unwrapped with its own ECDH key):

* **load mode** — software keys (:class:`~device_sim.client.SoftwareKeys`), for hundreds or
  thousands of devices in one process; the TLS identity is the device's own IDevID and key;
* **TPM mode** — one swtpm per device (:class:`~device_sim.client.TpmKeys`): the factory
  key, the new LDevID key and the wrap key live in the device's TPM, and the factory key
  also signs its TLS handshakes (``signers.tpm_tls``); the registrar still does not rely on
  TLS for identity (it verifies the request signed by the TPM factory key).

:func:`onboard` returns a :class:`FleetReport`: one :class:`DeviceResult` per device (ok or
the registrar's public reason code, latency from connect to the verified response) and the
wall-clock time of the whole fleet. A device that fails does not stop the others.

Load fleets on disk (``device-sim fleet``): a directory with one sub-directory per device
holding ``idevid.pem`` (factory certificate), ``chain.pem`` (station CA) and
``factory.key.pem`` (software factory key of a load-test device: an encrypted PKCS#8
keystore, :class:`~signers.software.SoftwareKey`, mode 0600); see :func:`write_load_device`
and :func:`load_fleet`. Even a load-test key is never stored in plaintext: a fleet
directory gets copied around, and a plaintext key that names a device id in an admitted
range would register as that device. The passphrase comes from ``DEVTRUST_DEVICE_PASSPHRASE``
or a passphrase file (see :data:`PASSPHRASE_ENV`), never from the command line.

TPM fleets on disk (``device-sim build-fleet --keys tpm``): device directories of
:mod:`device_sim.device` (swtpm state, TPM-wrapped key blob, certificates);
:func:`tpm_fleet` powers them on for the onboarding and off after it (:func:`fleet_kind`
tells the two layouts apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from device_sim.client import (
    DeviceClient,
    DeviceCredentials,
    DeviceRegistrationError,
    SoftwareKeys,
    TpmKeys,
)
from device_sim.device import DeviceStateError, SimDevice, power_off_all, power_on_all
from device_sim.errors import DeviceSimError
from device_sim.swtpm import SwtpmError
from signers.errors import SignerError
from signers.software import SoftwareKey
from trustcore.endpoint import Endpoint
from trustcore.errors import TrustCoreError
from trustcore.identity import DeviceId
from trustcore.profiles import device_id_from_certificate

__all__ = [
    "PASSPHRASE_ENV",
    "DeviceResult",
    "FleetError",
    "FleetReport",
    "fleet_kind",
    "load_fleet",
    "onboard",
    "software_device",
    "tpm_fleet",
    "write_load_device",
]

PEM = serialization.Encoding.PEM
IDEVID_FILE = "idevid.pem"
CHAIN_FILE = "chain.pem"
KEY_FILE = "factory.key.pem"
#: The swtpm state of a TPM device (``device_sim.device``): not a load-test device.
TPM_STATE_DIR = "tpm"
PASSPHRASE_ENV = "DEVTRUST_DEVICE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)


class FleetError(DeviceSimError):
    """A load fleet directory is missing or inconsistent."""

    reason = "bad_fleet"


@dataclass(frozen=True)
class DeviceResult:
    device_id: str
    ok: bool
    reason: str | None  # the registrar's public reason code, "timeout", or "connection"
    latency_ms: float  # connect to verified response (or to the failure)
    attempts_s: float  # when the device started, seconds after the fleet started


@dataclass(frozen=True)
class FleetReport:
    results: tuple[DeviceResult, ...]
    elapsed_s: float

    @property
    def registered(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failures(self) -> int:
        return len(self.results) - self.registered

    @property
    def per_second(self) -> float:
        return self.registered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, quantile: float) -> float | None:
        values = sorted(r.latency_ms for r in self.results if r.ok)
        if not values:
            return None
        index = min(len(values) - 1, max(0, round(quantile * len(values)) - 1))
        return values[index]

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                key = r.reason or "unknown"
                out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        ok = [r.latency_ms for r in self.results if r.ok]
        return {
            "devices": len(self.results),
            "registered": self.registered,
            "failures": self.failures,
            "failure_reasons": self.reasons(),
            "elapsed_s": round(self.elapsed_s, 3),
            "registrations_per_s": round(self.per_second, 1),
            "p50_ms": round(statistics.median(ok), 2) if ok else None,
            "p99_ms": round(v, 2) if (v := self.latency_ms(0.99)) is not None else None,
        }


def software_device(credentials: DeviceCredentials) -> DeviceClient:
    """A load-mode device: software keys, TLS with its own IDevID and factory key."""
    return DeviceClient(credentials, SoftwareKeys())


async def _register_one(
    device: DeviceClient,
    endpoint: Endpoint,
    *,
    timeout: float,
    attempts: int,
    tls: ssl.SSLContext | None,
    t0: float,
) -> DeviceResult:
    start = time.perf_counter()
    reason: str | None = None
    try:
        await device.register(endpoint, timeout=timeout, attempts=attempts, tls=tls)
    except DeviceRegistrationError as exc:
        reason = exc.reason
    except (aiomqtt.MqttError, OSError, ssl.SSLError, TimeoutError):
        reason = "connection"
    return DeviceResult(
        device.device_id.value,
        reason is None,
        reason,
        (time.perf_counter() - start) * 1000,
        start - t0,
    )


async def onboard(
    devices: Sequence[DeviceClient],
    endpoint: Endpoint,
    *,
    concurrency: int | None = None,
    timeout: float = 30.0,
    attempts: int = 3,
    progress: bool = True,
    console: Console | None = None,
) -> FleetReport:
    """Register every device through ``endpoint`` (the registration listener), at most
    ``concurrency`` at a time (default: all at once). TLS contexts are built before the
    clock starts, as a device has its TLS configuration before it is powered on."""
    contexts = [d.registration_context() for d in devices]
    limit = asyncio.Semaphore(concurrency or max(1, len(devices)))
    console = console or Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]onboarding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task("onboard", total=len(devices), failed=0)
        failed = 0

        async def one(device: DeviceClient, tls: ssl.SSLContext) -> DeviceResult:
            nonlocal failed
            async with limit:
                result = await _register_one(
                    device, endpoint, timeout=timeout, attempts=attempts, tls=tls, t0=t0
                )
            failed += not result.ok
            bar.update(task, advance=1, failed=failed)
            return result

        results = await asyncio.gather(*(one(d, c) for d, c in zip(devices, contexts, strict=True)))
    return FleetReport(tuple(results), time.perf_counter() - t0)


# ------------------------------------------------------------------------ load fleets on disk


def write_load_device(
    directory: Path,
    idevid: x509.Certificate,
    chain: Sequence[x509.Certificate],
    factory_key: ec.EllipticCurvePrivateKey,
    *,
    passphrase: bytes,
) -> Path:
    """Write one software-key (load-test) device into ``directory/<device id>``; the factory
    key is encrypted under ``passphrase`` (raises ``FleetError`` if it cannot be)."""
    device_id = device_id_from_certificate(idevid)
    target = directory / device_id.value
    target.mkdir(mode=0o700, parents=True, exist_ok=False)
    (target / IDEVID_FILE).write_bytes(idevid.public_bytes(PEM))
    (target / CHAIN_FILE).write_bytes(b"".join(c.public_bytes(PEM) for c in chain))
    try:
        SoftwareKey(factory_key).save(target / KEY_FILE, passphrase)
    except SignerError as exc:
        raise FleetError(f"cannot store the factory key of {device_id.value}: {exc}") from exc
    return target


def fleet_kind(directory: Path) -> Literal["software", "tpm"]:
    """``tpm`` if the devices under ``directory`` have swtpm states (``build-fleet --keys
    tpm``), ``software`` if none has; a mix is refused."""
    if not directory.is_dir():
        raise FleetError(f"{directory} is not a directory")
    kinds = {
        (p / TPM_STATE_DIR).is_dir()
        for p in directory.iterdir()
        if (p / IDEVID_FILE).is_file() or (p / TPM_STATE_DIR).is_dir()
    }
    if kinds == {True, False}:
        raise FleetError(f"{directory} mixes TPM and software-key devices: onboard them apart")
    return "tpm" if kinds == {True} else "software"


def _device_dirs(
    directory: Path, count: int | None, is_device: Callable[[Path], bool], none_found: str
) -> list[Path]:
    """The device directories under ``directory`` (sorted by name; the first ``count``):
    FleetError if it is no directory, holds fewer than ``count``, or none (``none_found``)."""
    if not directory.is_dir():
        raise FleetError(f"{directory} is not a directory")
    found = sorted(p for p in directory.iterdir() if is_device(p))
    if count is not None:
        if count > len(found):
            raise FleetError(f"{directory} holds {len(found)} devices, {count} asked for")
        found = found[:count]
    if not found:
        raise FleetError(none_found)
    return found


@contextlib.contextmanager
def tpm_fleet(
    directory: Path, roots: Sequence[x509.Certificate], *, count: int | None = None
) -> Iterator[list[DeviceClient]]:
    """The swtpm devices under ``directory`` (sorted by name; the first ``count``), powered
    on while the block runs and off after it. Every key of theirs is in their TPM: the
    factory key signs the registration request and the TLS handshakes
    (:mod:`signers.tpm_tls`), the LDevID and wrap keys are made there."""
    found = _device_dirs(
        directory,
        count,
        lambda p: (p / TPM_STATE_DIR).is_dir(),
        f"no TPM devices under {directory} (each needs {TPM_STATE_DIR}/)",
    )
    try:
        sims = [SimDevice(p) for p in found]
        unprovisioned = [str(s.directory) for s in sims if s.certificate() is None]
    except (DeviceStateError, OSError, ValueError) as exc:
        raise FleetError(f"unusable TPM device: {exc}") from exc
    if unprovisioned:
        raise FleetError(f"not provisioned by a station (no {IDEVID_FILE}): {unprovisioned[0]}")
    try:
        power_on_all(sims)
        clients = []
        for sim in sims:
            cert = sim.certificate()
            assert cert is not None and sim.tpm is not None  # checked above; powered on
            chain = tuple(
                x509.load_pem_x509_certificates((sim.directory / CHAIN_FILE).read_bytes())
            )
            credentials = DeviceCredentials(
                device_id_from_certificate(cert), cert, chain, sim.key(), tuple(roots)
            )
            clients.append(DeviceClient(credentials, TpmKeys(sim.tpm)))
    except (DeviceStateError, SwtpmError, SignerError, TrustCoreError, OSError, ValueError) as exc:
        power_off_all(sims)
        raise FleetError(f"cannot power on the TPM fleet: {exc}") from exc
    try:
        yield clients
    finally:
        power_off_all(sims)


def load_fleet(
    directory: Path,
    roots: Sequence[x509.Certificate],
    *,
    passphrase: bytes,
    count: int | None = None,
) -> list[DeviceClient]:
    """The load-mode devices under ``directory`` (sorted by name; the first ``count``), their
    factory keys decrypted with ``passphrase``. A plaintext key file is refused."""
    found = _device_dirs(
        directory,
        count,
        lambda p: (p / IDEVID_FILE).is_file(),
        f"no devices under {directory} (each needs {IDEVID_FILE})",
    )
    devices: list[DeviceClient] = []
    for path in found:
        if (path / TPM_STATE_DIR).is_dir():
            raise FleetError(
                f"{path} is a TPM device (its key is in {TPM_STATE_DIR}/): see tpm_fleet"
            )
        try:
            idevid = x509.load_pem_x509_certificate((path / IDEVID_FILE).read_bytes())
            chain = tuple(x509.load_pem_x509_certificates((path / CHAIN_FILE).read_bytes()))
            key = SoftwareKey.load(path / KEY_FILE, passphrase)
            device_id: DeviceId = device_id_from_certificate(idevid)
        except (OSError, ValueError, TypeError, TrustCoreError, SignerError) as exc:
            raise FleetError(f"device {path} is unusable: {exc}") from exc
        if key.public_key() != idevid.public_key():
            raise FleetError(f"device {path}: the factory key does not match {IDEVID_FILE}")
        credentials = DeviceCredentials(device_id, idevid, chain, key, tuple(roots))
        devices.append(software_device(credentials))
    return devices
