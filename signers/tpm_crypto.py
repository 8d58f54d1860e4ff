"""A TPM key as a ``cryptography`` private key: what :meth:`signers.tpm.TpmKey.private_key`
returns, so certificate, CRL and CSR builders sign inside the TPM.

:class:`TpmEccPrivateKey` is tpm2-pytss's ``tpm_ecc_private_key`` without its
TPM2_ReadPublic round trip, looking its handle up live on every use (a key the
:class:`~signers.tpm.Tpm` evicted for room is reloaded from its blob, under the TPM lock),
and delegating signing and ECDH to the owning key (:class:`TpmKeyOperations`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.cryptography import tpm_ecc_private_key
from tpm2_pytss.types import TPMT_PUBLIC

from signers.errors import TpmKeyError

__all__ = ["TpmEccPrivateKey", "TpmKeyOperations"]


class TpmKeyOperations(Protocol):
    """What the private-key face asks of its TPM key (``signers.tpm.TpmKey``)."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes: ...

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes: ...


class TpmEccPrivateKey(tpm_ecc_private_key):  # type: ignore[misc]
    """``tpm_ecc_private_key`` that reloads its key if it was evicted, under the TPM lock."""

    def __init__(
        self,
        owner: TpmKeyOperations,
        esapi: ESAPI,
        public: TPMT_PUBLIC,
        loaded_handle: Callable[[], ESYS_TR],
    ) -> None:
        # What tpm_ecc_private_key.__init__ sets, without its TPM2_ReadPublic round trip: the
        # public area is the blob's, which TPM2_Load bound to the private part (the TPM
        # checks the integrity of the private blob against the public area's name) and
        # usage_of checked (ECC, P-256). The key loads on first use, through _handle.
        self._owner = owner
        self._ectx = esapi
        self._session = ESYS_TR.PASSWORD
        self._public = public
        self._curve = ec.SECP256R1
        self._loaded_handle = loaded_handle

    @property
    def _handle(self) -> ESYS_TR:
        return self._loaded_handle()

    @_handle.setter
    def _handle(self, value: Any) -> None:
        """The base class assigns the handle once; ours is always looked up live."""

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The owner's key object, built once from the same public area (the base class
        converts the TPM structure again on every call: ~0.1 ms, and the certificate
        builder asks for it on every certificate the station signs)."""
        return self._owner.public_key()

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA-SHA256 only (the key's scheme is pinned to it)."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TpmKeyError("a TPM signing key does ECDSA only")
        if isinstance(signature_algorithm.algorithm, hashes.SHA256):
            return self._owner.sign_digest(hashlib.sha256(data).digest())
        raise TpmKeyError("a TPM signing key signs with SHA-256 only")

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        return self._owner.exchange(peer_public_key)

    def _copy(self) -> TpmEccPrivateKey:
        return TpmEccPrivateKey(self._owner, self._ectx, self._public, self._loaded_handle)

    def __copy__(self) -> TpmEccPrivateKey:
        return self._copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> TpmEccPrivateKey:
        return self._copy()
