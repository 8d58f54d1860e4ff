"""Product secrets as TPM objects: an HMAC key made for one device's TPM, usable only there.

The sender (the factory station) knows the secret and the device's storage primary (SRK)
public area; it builds a TPM2 *duplication blob* for that one SRK in software
(:func:`build_secret_import`, TPM 2.0 Part 1 §23.3 "Duplication", ``tpm2_pytss.utils.wrap``):

* the object is a keyed-hash **HMAC-SHA256 key** whose key bytes are the secret
  (``sign`` set, ``decrypt`` clear: TPM2_Unseal refuses it, so the value never comes back
  out of the TPM; TPM2_HMAC is the only thing it does);
* the outer wrapper is keyed by a random seed encrypted to the SRK with ECDH (KDFe), and its
  HMAC covers the object's name: only the TPM holding that SRK's private key recovers the
  seed, and another TPM's TPM2_Import fails with ``TPM_RC_INTEGRITY`` (the wrong seed gives
  the wrong integrity key);
* the object cannot be duplicated out again: TPM2_Import requires ``fixedTPM`` and
  ``fixedParent`` clear (an imported object was by definition duplicated), so what stops a
  second duplication is the *authPolicy*: TPM2_Duplicate needs the DUP role, which only a
  policy session whose digest equals the object's authPolicy can give, and the authPolicy
  here is empty, which no policy session matches. ``noDA`` because the authValue is empty
  (see ``signers.tpm``);
* after TPM2_Import the device keeps the private part the TPM returns, encrypted by its
  own storage key (like a ``TSS2 PRIVATE KEY`` blob: useless outside this TPM).

The device checks the public area before importing (:func:`check_secret_public`), so a
sender cannot slip in a sealed-data object (unsealable), a duplicable one, or one with an
authValue it chose.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SENSITIVE,
    TPMT_SYM_DEF_OBJECT,
)
from tpm2_pytss.utils import wrap

from signers.errors import TpmImportError
from trustcore.device_secrets import MAX_SECRET_BYTES, MIN_SECRET_BYTES

__all__ = [
    "SECRET_OBJECT_ATTRIBUTES",
    "SecretImport",
    "build_secret_import",
    "check_secret_public",
    "check_storage_public",
    "secret_hmac",
    "tpm_name",
]


#: userWithAuth (empty authValue) | noDA | sign; fixedTPM/fixedParent clear (TPM2_Import
#: demands it); sensitiveDataOrigin clear (the sender chose the value); decrypt clear (no
#: TPM2_Unseal, no TPM2_EncryptDecrypt); authPolicy empty (no TPM2_Duplicate).
SECRET_OBJECT_ATTRIBUTES = TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.SIGN_ENCRYPT

#: What a storage parent must be to receive a product secret: a TPM-resident (fixedTPM,
#: fixedParent, sensitiveDataOrigin) restricted decryption key.
_STORAGE_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)

_NO_INNER_WRAPPER = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)


@dataclass(frozen=True)
class SecretImport:
    """One product secret wrapped for one TPM: the object's public area (marshalled
    TPM2B_PUBLIC), the duplicate (TPM2B_PRIVATE) and the encrypted seed
    (TPM2B_ENCRYPTED_SECRET). Safe to store and send: only the target TPM opens it."""

    name: str
    public: bytes
    duplicate: bytes
    seed: bytes


def _hmac_scheme() -> TPMT_KEYEDHASH_SCHEME:
    scheme = TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.HMAC)
    scheme.details.hmac.hashAlg = TPM2_ALG.SHA256
    return scheme


def tpm_name(public_area: bytes) -> bytes:
    """TPM name of a marshalled SHA-256-named TPMT_PUBLIC: 0x000B || SHA-256(area)."""
    return b"\x00\x0b" + hashlib.sha256(public_area).digest()


def _parse_public(public_area: bytes, what: str) -> TPMT_PUBLIC:
    try:
        area, used = TPMT_PUBLIC.unmarshal(public_area)
    except Exception as exc:  # the TSS unmarshal raises TSS2_Exception or TypeError
        raise TpmImportError(f"{what} is not a TPMT_PUBLIC: {exc}") from exc
    if used != len(public_area):
        raise TpmImportError(f"{what}: trailing bytes after the TPMT_PUBLIC")
    return area


def check_storage_public(public_area: bytes) -> TPMT_PUBLIC:
    """A marshalled TPMT_PUBLIC that may receive product secrets: a P-256 restricted
    decryption key, fixedTPM, fixedParent, sensitiveDataOrigin, SHA-256 name, AES-128-CFB
    (what ``tpm2_pytss.utils.wrap`` and every TPM support). Raises otherwise."""
    area = _parse_public(public_area, "storage parent")
    attrs = int(area.objectAttributes)
    if area.type != TPM2_ALG.ECC or area.nameAlg != TPM2_ALG.SHA256:
        raise TpmImportError("the storage parent is not a SHA-256-named ECC key")
    if attrs & _STORAGE_ATTRIBUTES != _STORAGE_ATTRIBUTES or attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        raise TpmImportError("the storage parent is not a TPM-resident restricted decryption key")
    sym = area.parameters.eccDetail.symmetric
    if sym.algorithm != TPM2_ALG.AES or int(sym.keyBits.aes) != 128 or sym.mode.aes != TPM2_ALG.CFB:
        raise TpmImportError("the storage parent's symmetric scheme is not AES-128-CFB")
    return area


def build_secret_import(parent_public: bytes, name: str, secret: bytes) -> SecretImport:
    """Wrap ``secret`` as an HMAC key for the TPM whose storage primary is
    ``parent_public`` (marshalled TPMT_PUBLIC, checked with :func:`check_storage_public`).
    Pure software: the plaintext stays in this process's memory."""
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise TpmImportError(
            f"secret {name!r} is {len(secret)} bytes; a TPM HMAC key takes "
            f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES}"
        )
    parent = check_storage_public(parent_public)
    sensitive, public = TPMT_SENSITIVE.keyedhash_from_secret(
        secret, objectAttributes=SECRET_OBJECT_ATTRIBUTES, scheme=_hmac_scheme()
    )
    public2b = TPM2B_PUBLIC(publicArea=public)
    _, duplicate, seed = wrap(
        parent, public2b, TPM2B_SENSITIVE(sensitiveArea=sensitive), b"", _NO_INNER_WRAPPER
    )
    return SecretImport(
        name=name,
        public=bytes(public2b.marshal()),
        duplicate=bytes(duplicate.marshal()),
        seed=bytes(seed.marshal()),
    )


def check_secret_public(public: bytes) -> None:
    """Device side, before TPM2_Import: the object is exactly the HMAC-SHA256 key this
    module builds (attributes, scheme, empty authPolicy), so it cannot be unsealed or
    duplicated once inside. Raises :class:`TpmImportError` otherwise."""
    try:
        pub, used = TPM2B_PUBLIC.unmarshal(public)
    except Exception as exc:  # the TSS unmarshal raises TSS2_Exception or TypeError
        raise TpmImportError(f"secret public area does not parse: {exc}") from exc
    if used != len(public):
        raise TpmImportError("secret public area: trailing bytes")
    area = pub.publicArea
    scheme = area.parameters.keyedHashDetail.scheme
    if (
        area.type != TPM2_ALG.KEYEDHASH
        or area.nameAlg != TPM2_ALG.SHA256
        or int(area.objectAttributes) != int(SECRET_OBJECT_ATTRIBUTES)
        or len(bytes(area.authPolicy)) != 0
        or scheme.scheme != TPM2_ALG.HMAC
        or scheme.details.hmac.hashAlg != TPM2_ALG.SHA256
    ):
        raise TpmImportError(
            "the secret object is not a non-duplicable, non-unsealable HMAC-SHA256 key"
        )


def secret_hmac(secret: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 as the device's TPM computes it with the imported key: what a verifier
    who knows the secret compares a device's answer with."""
    return hmac.new(secret, data, hashlib.sha256).digest()
