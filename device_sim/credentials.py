"""What a simulated device holds: where it makes keys, its TLS identities, the credentials
the factory left on it and its state once registered.

Owns :class:`KeyFactory` (TPM or software keys), :class:`TlsIdentity` (a certificate chain
with the key it certifies, given to ``ssl``), :class:`DeviceCredentials` and
:class:`Registered`. The network life that uses them is :mod:`device_sim.client`'s, which
re-exports every name here.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signers.software import SoftwareKey, load_ssl_identity
from trustcore.identity import DeviceId
from trustcore.keys import KeyAgreement, Signer
from trustcore.payload import PayloadKey
from trustcore.registration import open_payload_key, parse_key_update

if TYPE_CHECKING:
    from signers.tpm import TpmKey

__all__ = [
    "DeviceCredentials",
    "KeyFactory",
    "Registered",
    "SoftwareKeys",
    "TlsIdentity",
    "TpmKeys",
]

PEM = serialization.Encoding.PEM


# ----------------------------------------------------------------------------------- keys


class KeyFactory(Protocol):
    """Where the device makes new keys: its TPM, or software in load-test mode."""

    def new_signing_key(self) -> Signer: ...

    def new_ecdh_key(self) -> KeyAgreement: ...


class SoftwareKeys:
    """Load-test mode: ephemeral software keys (they refuse to be saved to disk)."""

    def new_signing_key(self) -> Signer:
        return SoftwareKey.ephemeral()

    def new_ecdh_key(self) -> KeyAgreement:
        return SoftwareKey.ephemeral()


class TpmKeys:
    """Keys created inside the device's TPM (swtpm), non-exportable, single-purpose."""

    def __init__(self, tpm: object) -> None:
        self._tpm = tpm

    def new_signing_key(self) -> Signer:
        from signers.tpm import TpmKey, TpmKeyUsage

        return TpmKey.create(self._tpm, TpmKeyUsage.SIGN)  # type: ignore[arg-type]

    def new_ecdh_key(self) -> KeyAgreement:
        from signers.tpm import TpmKey, TpmKeyUsage

        return TpmKey.create(self._tpm, TpmKeyUsage.ECDH)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ TLS


@dataclass(frozen=True)
class TlsIdentity:
    """A client certificate chain and the key it certifies: a software private key, or a
    TPM key that signs the handshake inside the TPM."""

    certificates: tuple[x509.Certificate, ...]  # leaf first, then its issuing CA
    key: ec.EllipticCurvePrivateKey | TpmKey = field(repr=False)

    @classmethod
    def from_signer(cls, certificates: Sequence[x509.Certificate], signer: Signer) -> TlsIdentity:
        """The device's own certificate with its own key (software or TPM)."""
        if isinstance(signer, SoftwareKey):
            return cls(tuple(certificates), signer.private_key())
        from signers.tpm import TpmKey

        if isinstance(signer, TpmKey):
            return cls(tuple(certificates), signer)
        raise TypeError(f"no TLS binding for a {type(signer).__name__} key")

    def context(self, trust_pem: bytes) -> ssl.SSLContext:
        """A client context trusting ``trust_pem`` (manufacturer root: the broker presents
        its certificate with the site CA, which the root issued) and presenting this identity."""
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            from signers.tpm_tls import tpm_client_context

            return tpm_client_context(self.certificates, self.key, trust_pem=trust_pem)
        ctx = ssl.create_default_context(cadata=trust_pem.decode("ascii"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_ssl_identity(ctx, b"".join(c.public_bytes(PEM) for c in self.certificates), self.key)
        return ctx


# ------------------------------------------------------------------- what the device holds


@dataclass(frozen=True)
class DeviceCredentials:
    """What the factory left on the device: its id, IDevID, the station CA chain, the
    factory key (usually in the TPM) and the manufacturer root(s) it trusts."""

    device_id: DeviceId
    idevid: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    factory_key: Signer
    roots: tuple[x509.Certificate, ...]

    @property
    def roots_pem(self) -> bytes:
        return b"".join(r.public_bytes(PEM) for r in self.roots)


#: Payload keys a device holds: the current one and the one before it (telemetry sealed
#: just before a rotation, a command sealed under it during the registrar's grace period).
#: What a real device keeps; an older key is of no use to it, and a simulated fleet that
#: kept every key grew by ~2.5 KB a device at every rotation (docs/scale.md, "Soak").
KEPT_PAYLOAD_KEYS = 2
#: Superseded LDevIDs a device keeps (the last one), for the same reason.
KEPT_PREVIOUS_LDEVIDS = 1


@dataclass
class Registered:
    """The device after registration: LDevID, its key, the wrap key, payload keys."""

    ldevid: x509.Certificate
    site_ca: x509.Certificate
    ldevid_key: Signer
    wrap_key: KeyAgreement
    payload_keys: dict[bytes, PayloadKey]
    current_key_id: bytes
    key_issued: int = 0
    renew_issued: int = 0

    #: The LDevID(s) this device held before the current one (oldest first), at most
    #: :data:`KEPT_PREVIOUS_LDEVIDS`.
    previous: list[x509.Certificate] = field(default_factory=list)

    @property
    def current_key(self) -> PayloadKey:
        return self.payload_keys[self.current_key_id]

    def apply_key_update(self, device_id: DeviceId, payload: bytes) -> tuple[PayloadKey, int]:
        """Verify a signed payload-key update (``devices/<id>/keys``) from the site CA,
        unwrap the key with the wrap key and make it current; the key and the update's
        ``issued`` (to acknowledge). ``RegistrationError`` if it does not verify, or
        (reason ``replayed``) is not newer than the last one applied."""
        update = parse_key_update(
            payload, device_id=device_id, site_ca=self.site_ca, newer_than=self.key_issued
        )
        key = open_payload_key(self.wrap_key, device_id, update.payload_key)
        self.adopt_payload_key(key)
        self.key_issued = update.issued
        return key, update.issued

    def adopt_payload_key(self, key: PayloadKey) -> None:
        """Make ``key`` current; keep the one it replaces, forget older ones
        (:data:`KEPT_PAYLOAD_KEYS`)."""
        if key.key_id != self.current_key_id:
            kept = (self.current_key_id, key.key_id)[-KEPT_PAYLOAD_KEYS:]
            self.payload_keys = {k: v for k, v in self.payload_keys.items() if k in kept}
        self.payload_keys[key.key_id] = key
        self.current_key_id = key.key_id

    def replace_ldevid(
        self, ldevid: x509.Certificate, site_ca: x509.Certificate, key: Signer
    ) -> None:
        """A renewal's new LDevID (and its key) becomes current; the old one is kept as the
        last previous one (:data:`KEPT_PREVIOUS_LDEVIDS`)."""
        self.previous.append(self.ldevid)
        del self.previous[:-KEPT_PREVIOUS_LDEVIDS]
        self.ldevid, self.site_ca, self.ldevid_key = ldevid, site_ca, key
