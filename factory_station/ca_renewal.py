"""Station CA renewal and re-key, the station's side: files and table it owns.

``factory-station renew-ca`` writes a signed request for HQ (``trustcore.station_ca_request``):
a renewal certifies the current TPM key again; a re-key first creates a new key in the TPM
(kept as ``station-ca.next.tss.pem`` until its certificate arrives). ``factory-station
import-ca`` takes HQ's answer (:meth:`FactoryStation.import_ca_certificate`).

This module owns:

* which recorded station CA certificate is current for a key (the ``ca_certificates`` table
  itself, every certificate the station used or imported, is :mod:`factory_station.ca_store`);
* the key files: ``station-ca.tss.pem`` (the CA key in use), ``station-ca.next.tss.pem``
  (a re-key waiting for its certificate) and ``station-ca.retired-<key id>.tss.pem`` (keys
  the station re-keyed away from: they no longer sign devices or checkpoints, only an empty
  CRL in each audit export so that devices made under them keep a current CRL at sites);
* :func:`finish_key_switch`: the file half of a re-key import, repeated at open when a crash
  fell between the database commit and the renames (the database decides).

The request and import flows themselves are :mod:`factory_station.ca_requests`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from factory_station.ca_store import CaCertificateStore
from factory_station.config import CA_KEY_FILE
from factory_station.errors import StationStateError
from signers.tpm import Tpm, TpmKey
from trustcore.keys import key_id, spki_der

__all__ = [
    "CA_KEY_FILE",
    "NEXT_CA_KEY_FILE",
    "current_certificate",
    "finish_key_switch",
    "latest_for_key",
    "record_certificate",
    "retired_key_files",
]

NEXT_CA_KEY_FILE: Final = "station-ca.next.tss.pem"
_RETIRED_PREFIX: Final = "station-ca.retired-"
_SUFFIX: Final = ".tss.pem"


def record_certificate(
    certs: CaCertificateStore, cert: x509.Certificate, kind: str, now: int
) -> bool:
    """Remember ``cert`` (inside the caller's transaction); False if it was known."""
    return certs.record(
        serial=format(cert.serial_number, "x"),
        key_id=_kid(cert),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        kind=kind,
        now=now,
    )


def _kid(cert: x509.Certificate) -> bytes:
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # station CA: P-256 (profile)
    return key_id(public)


def _certificates(certs: CaCertificateStore, kid: bytes) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in certs.certificates_der(kid)]


def latest_for_key(
    certs: CaCertificateStore,
    public: ec.EllipticCurvePublicKey,
    also: Sequence[x509.Certificate] = (),
) -> x509.Certificate | None:
    """The newest certificate (latest notBefore, then latest imported) for ``public`` among
    the imported ones and ``also`` (the active entitlement's certificate)."""
    want = spki_der(public)
    candidates = [c for c in also if spki_der(c.public_key()) == want]
    candidates += _certificates(certs, key_id(public))
    if not candidates:
        return None
    best = candidates[0]
    for cert in candidates[1:]:
        if cert.not_valid_before_utc >= best.not_valid_before_utc:
            best = cert
    return best


def current_certificate(
    certs: CaCertificateStore,
    ca_public: ec.EllipticCurvePublicKey,
    entitlement_cert: x509.Certificate,
) -> x509.Certificate:
    """The certificate the station issues under: the newest one for its current CA key. The
    entitlement's own certificate when nothing newer was imported; after a re-key, the
    entitlement's certificate names the old key and is never chosen."""
    best = latest_for_key(certs, ca_public, (entitlement_cert,))
    return entitlement_cert if best is None else best


def retired_key_files(home: Path) -> list[Path]:
    return sorted(home.glob(f"{_RETIRED_PREFIX}*{_SUFFIX}"))


def retired_name(public: ec.EllipticCurvePublicKey) -> str:
    return f"{_RETIRED_PREFIX}{key_id(public).hex()[:16]}{_SUFFIX}"


def finish_key_switch(home: Path, tpm: Tpm, certs: CaCertificateStore, ca_key: TpmKey) -> TpmKey:
    """Complete a re-key whose certificate is recorded but whose key files were not yet
    switched (a crash between the commit and the renames): the pending key becomes the CA
    key, the old one is retired. Returns the CA key to use."""
    nxt = home / NEXT_CA_KEY_FILE
    if not nxt.exists():
        return ca_key
    ca_key.unload()  # a raw swtpm has three object slots
    pending = TpmKey.load(tpm, nxt)
    pending_public = pending.public_key()
    if not certs.rekey_recorded(key_id(pending_public)):
        pending.unload()  # a re-key still waiting for HQ's certificate
        return ca_key
    switch_keys(home, ca_key, pending)
    return pending


def switch_keys(home: Path, old: TpmKey, new: TpmKey) -> None:
    """Retire ``old`` (keep its blob for the CRL it still signs) and make ``new`` the CA
    key. Each step is a rename, so a crash leaves either name in place and the next open
    finishes the job."""
    current = home / CA_KEY_FILE
    try:
        old.save(home / retired_name(old.public_key()), overwrite=True)
        new.save(current, overwrite=True)
        (home / NEXT_CA_KEY_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise StationStateError(f"cannot switch the station CA key files: {exc}") from exc
