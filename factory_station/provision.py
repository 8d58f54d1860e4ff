"""Provisioning one device, and batches: the factory-line flow around the station.

For one device, in this order (every refusal is audited as ``refused`` and consumes no
counter slot; only :meth:`FactoryStation.issue` touches the counter)::

    1. device id: given, or the next unused number of the entitlement's id rule
    2. policy pre-check (quota, daily limit, window, id range): refuse before device work
    3. device TPM creates a non-exportable P-256 key; device sends a CSR signed by it
    4. CSR validated (self-signature, P-256, names = the device id, no extra extensions)
    5. attestation: EK certificate → credential activation → TPM2_Certify of the CSR's key
    6. station issues (intent → NV increment → sign in TPM + audit + complete)
    7. release: the certificate is written to the device
    8. product secrets (only when the entitlement's rules give this device any): each is
       wrapped to the device TPM's storage primary, which step 5 proved to be the parent of
       the certified key, audited as ``secret_provisioned``, and imported by the device
       (TPM2_Import: from then on usable only inside that TPM). Needs attestation (fail
       closed: ``secret_needs_attestation`` in the ``unsafe-csr-only`` mode).

A batch overlaps device-side work (steps 3 to 5: each device is its own TPM process, and
tpm2-pytss releases the GIL inside TPM calls) with station-side work (step 6, serialised by
the station's lock) using a thread pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding

from factory_station.attestation import CredentialChallenge, VerifiedStorageParent
from factory_station.errors import (
    AttestationError,
    DeviceError,
    FactoryStationError,
    IssuanceRefused,
)
from factory_station.station import FactoryStation, IssuedCertificate
from signers.attestation import AttestationEvidence, AttestationIdentity
from signers.tpm_import import SecretImport
from trustcore.csr import validate_csr
from trustcore.errors import CsrError, ReasonedError
from trustcore.identity import DeviceId

__all__ = [
    "BatchResult",
    "DeviceEndpoint",
    "ProvisionResult",
    "provision_batch",
    "provision_device",
]

#: Refusals after which further devices in a batch cannot succeed either.
_STOP_BATCH = frozenset(
    {
        "over_quota",
        "over_daily_limit",
        "window_expired",
        "not_yet_valid",
        "clock_rollback",
        "no_entitlement",
        "station_ca_expired",
        "id_out_of_range",
    }
)


class DeviceEndpoint(Protocol):
    """What the station needs from a device (``device_sim.device.TpmDevice`` over a TPM)."""

    def prepare(self, device_id: DeviceId) -> bytes:
        """Create the device key in the device TPM; return a CSR (DER) signed by it."""
        ...

    def attestation_identity(self) -> AttestationIdentity: ...

    def attest(self, challenge: CredentialChallenge) -> AttestationEvidence: ...

    def store_certificate(
        self, device_id: DeviceId, certificate_der: bytes, chain_der: bytes
    ) -> None: ...

    def storage_parent(self) -> bytes:
        """The device TPM's storage primary public area (marshalled TPMT_PUBLIC); asked only
        when the device is to receive product secrets."""
        ...

    def import_secrets(self, device_id: DeviceId, imports: Sequence[SecretImport]) -> None:
        """TPM2_Import each product secret blob under the storage primary and keep the
        results (TPM-wrapped, useless elsewhere)."""
        ...


@dataclass(frozen=True)
class ProvisionResult:
    device_id: DeviceId
    issued: IssuedCertificate
    seconds: float
    #: Names of the product secrets imported into the device's TPM.
    secrets: tuple[str, ...] = ()


@dataclass
class BatchResult:
    provisioned: list[ProvisionResult] = field(default_factory=list)
    refused: list[tuple[str, FactoryStationError]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def devices_per_s(self) -> float:
        return len(self.provisioned) / self.seconds if self.seconds > 0 else 0.0


_T = TypeVar("_T")


def _device_call(what: str, fn: Callable[[], _T]) -> _T:
    """Device failures (TPM errors, nonsense answers) become ``DeviceError``. A device's own
    errors derive from the shared ``ReasonedError`` (``device_sim``'s, the signers'), which
    this package cannot name without importing the device side."""
    try:
        return fn()
    except (ReasonedError, OSError, ValueError, TypeError, RuntimeError) as exc:
        if isinstance(exc, FactoryStationError):
            raise
        raise DeviceError(f"device failed during {what}: {exc}") from exc


def provision_device(
    station: FactoryStation,
    device: DeviceEndpoint,
    device_id: DeviceId | None = None,
    *,
    product: str | None = None,
    secrets: Sequence[str] | None = None,
) -> ProvisionResult:
    """Provision one device end to end (module docstring); raises a
    :class:`FactoryStationError` subclass on refusal, with the refusal audited.

    ``secrets``: the product secrets to give it; ``None`` gives every secret whose rule
    covers this device, an explicit list refuses (before any device work) when one of them
    is outside its rule."""
    began = time.perf_counter()
    allocated = device_id is None
    did = station.allocate_device_id() if device_id is None else device_id
    parent: VerifiedStorageParent | None = None
    try:
        station.check(did, product)
        wanted = station.check_secrets(did, secrets, product)
        verifier = station.attestation_verifier()
        if wanted and verifier is None:
            station.refuse(did.value, "secret_needs_attestation")
            raise IssuanceRefused(
                "product secrets go only to an attested device TPM; this station runs "
                "unsafe-csr-only",
                reason="secret_needs_attestation",
            )
        try:
            csr_der = _device_call("key creation", lambda: device.prepare(did))
        except DeviceError:
            station.refuse(did.value, "device_error")
            raise
        try:
            csr = validate_csr(csr_der, expected_device_id=did)
        except CsrError as exc:
            station.refuse(did.value, f"csr_{exc.reason}")
            raise AttestationError(
                f"CSR refused: {exc.message}", reason=f"csr_{exc.reason}"
            ) from exc
        if verifier is not None:
            try:
                identity = _device_call("attestation", device.attestation_identity)
                challenge = verifier.begin(identity.ek_certificate, identity.ak_public)
                evidence = _device_call("attestation", lambda: device.attest(challenge))
                verifier.finish(
                    evidence.activated_secret,
                    evidence.attest,
                    evidence.signature,
                    evidence.certified_public,
                    csr.public_key,
                )
                if wanted:
                    srk = _device_call("storage parent", device.storage_parent)
                    parent = verifier.storage_parent(srk)
            except AttestationError as exc:
                station.refuse(did.value, f"attestation_{exc.reason}")
                raise
            except DeviceError:
                station.refuse(did.value, "device_error")
                raise
        issued = station.issue(did, csr.public_key, product=product)
    except BaseException:
        if allocated:
            station.release_id(did)
        raise
    # Release. A failure here leaves a durable, audited certificate the device lacks: the
    # operator re-runs with the device (reissue needs the quorum operation by policy).
    _device_call(
        "certificate write",
        lambda: device.store_certificate(
            did, issued.der, issued.station_ca.public_bytes(Encoding.DER)
        ),
    )
    imported: tuple[str, ...] = ()
    if parent is not None:
        # Audited as provisioned before the device imports: from here the blob is out.
        blobs = station.provision_secrets(did, parent, wanted, product=product)
        _device_call("secret import", lambda: device.import_secrets(did, blobs))
        imported = tuple(b.name for b in blobs)
    return ProvisionResult(did, issued, time.perf_counter() - began, imported)


def provision_batch(
    station: FactoryStation,
    devices: Sequence[DeviceEndpoint],
    *,
    workers: int = 4,
    on_done: Callable[[ProvisionResult | None, FactoryStationError | None], None] | None = None,
    stop_on: frozenset[str] = _STOP_BATCH,
) -> BatchResult:
    """Provision ``devices`` with ids from the entitlement's rule, ``workers`` at a time.

    A refusal that cannot clear within the batch (quota, daily limit, window) stops
    submitting further devices; others (a device failing attestation) are recorded and
    the batch goes on. ``on_done`` is called once per device finished (for progress bars).
    """
    result = BatchResult()
    stop = threading.Event()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: set[Future[ProvisionResult]] = set()
        labels: dict[Future[ProvisionResult], str] = {}
        queue = list(devices)
        index = 0
        while (queue and not stop.is_set()) or pending:
            while queue and not stop.is_set() and len(pending) < max(1, workers) * 2:
                endpoint = queue.pop(0)
                fut = pool.submit(provision_device, station, endpoint)
                labels[fut] = f"#{index}"
                index += 1
                pending.add(fut)
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is None:
                    res = fut.result()
                    result.provisioned.append(res)
                    if on_done:
                        on_done(res, None)
                elif isinstance(exc, FactoryStationError):
                    result.refused.append((labels[fut], exc))
                    if isinstance(exc, IssuanceRefused) and exc.reason in stop_on:
                        stop.set()
                    elif not isinstance(exc, IssuanceRefused | AttestationError | DeviceError):
                        stop.set()  # station state errors: do not continue
                    if on_done:
                        on_done(None, exc)
                else:
                    stop.set()
                    raise exc
    result.seconds = time.perf_counter() - began
    return result
