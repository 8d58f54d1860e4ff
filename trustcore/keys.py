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
