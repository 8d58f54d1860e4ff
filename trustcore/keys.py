"""Key-handle protocols: what the core needs from a key, whatever holds it.

The core never touches a key store. It receives handles that satisfy these protocols at a
component's composition root: a software key from an encrypted keystore, a key inside a TPM
(tpm2-pytss) or, later, a PKCS#11 token. ``private_key()`` returns an object that
``cryptography`` accepts wherever it wants an ``EllipticCurvePrivateKey`` (certificate and
CSR builders, ECDH); for a TPM key that object forwards every operation to the TPM, so the
private scalar never exists outside it.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


@runtime_checkable
class Signer(Protocol):
    """A P-256 signing key. ``sign`` returns a DER ECDSA-SHA256 signature."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def private_key(self) -> ec.EllipticCurvePrivateKey: ...

    def sign(self, data: bytes) -> bytes: ...


@runtime_checkable
class KeyAgreement(Protocol):
    """A P-256 key that can do ECDH with a peer's public key (to open sealed packages)."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes: ...


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: how the core names a key on the wire."""
    return hashlib.sha256(spki_der(public_key)).digest()


#: A P-256 SubjectPublicKeyInfo in DER is always these 26 bytes (SEQUENCE, AlgorithmIdentifier
#: id-ecPublicKey + prime256v1, BIT STRING header) followed by the 65-byte uncompressed point.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
P256_SPKI_LENGTH = len(P256_SPKI_PREFIX) + 65


def load_canonical_p256_spki(der: bytes) -> ec.EllipticCurvePublicKey | None:
    """The key of a canonical P-256 SPKI (exactly what ``spki_der`` writes: named curve,
    uncompressed point on the curve), else None. A prefix comparison replaces parsing and
    re-encoding; ``from_encoded_point`` refuses coordinates outside the field and points
    off the curve."""
    if len(der) != P256_SPKI_LENGTH or not der.startswith(P256_SPKI_PREFIX):
        return None
    point = der[len(P256_SPKI_PREFIX) :]
    if point[0] != 0x04:
        return None
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return None
