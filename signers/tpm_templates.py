"""TPM object templates: what the keys :mod:`signers.tpm` creates look like, and the check
that a loaded blob is one of them.

Every key is a P-256 ordinary key under the owner hierarchy's storage primary (SRK), made
from a template built here once per process; its attributes fix its one purpose
(:class:`TpmKeyUsage`), and :func:`usage_of` refuses a blob whose attributes say anything
else (fail closed). Pure TPM structures: no TPM connection is opened here.
"""

from __future__ import annotations

from enum import Enum
from functools import cache
from typing import Final

from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from signers.errors import TpmKeyError

__all__ = [
    "ECDSA_SHA256",
    "TpmKeyUsage",
    "key_template_bytes",
    "storage_primary_public",
    "storage_primary_template",
    "usage_of",
]

# NODA: these keys have an empty authValue, so dictionary-attack protection guards nothing,
# while every non-orderly shutdown (power loss, a killed swtpm) after using a DA-protected
# key counts as a failed attempt; three of those lock the TPM for 1000 s.
_BASE_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
)


@cache
def storage_primary_public() -> TPM2B_PUBLIC:
    """The SRK template as a TPM2B_PUBLIC, built once: ESAPI only reads its inputs."""
    return TPM2B_PUBLIC(publicArea=storage_primary_template())


def storage_primary_template() -> TPMT_PUBLIC:
    """The TCG/tpm2-openssl ECC storage primary (SRK) template: same seed, same key."""
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.NODA
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )


class TpmKeyUsage(Enum):
    """What a TPM key may do; fixed in its attributes at creation, checked at load."""

    SIGN = "sign"
    ECDH = "ecdh"
    #: Restricted signing key: signs only TPM-generated attestation (TPM2_Certify/Quote),
    #: so a verifier knows a ``TPMS_ATTEST`` it signed was not forged by software.
    ATTEST = "attest"


def _key_template(usage: TpmKeyUsage) -> TPMT_PUBLIC:
    if usage is TpmKeyUsage.SIGN or usage is TpmKeyUsage.ATTEST:
        attrs = _BASE_ATTRS | TPMA_OBJECT.SIGN_ENCRYPT
        if usage is TpmKeyUsage.ATTEST:
            attrs |= TPMA_OBJECT.RESTRICTED
        scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    else:
        attrs = _BASE_ATTRS | TPMA_OBJECT.DECRYPT
        scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL)
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attrs,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=scheme,
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )


@cache
def key_template_bytes(usage: TpmKeyUsage) -> bytes:
    """The marshalled TPMT_PUBLIC template for TPM2_CreateLoaded (built once per usage)."""
    return bytes(_key_template(usage).marshal())


def usage_of(public: TPMT_PUBLIC) -> TpmKeyUsage:
    """Check a loaded blob's public area against what this module creates (fail closed)."""
    if public.type != TPM2_ALG.ECC:
        raise TpmKeyError("TPM key is not an ECC key")
    if public.parameters.eccDetail.curveID != TPM2_ECC.NIST_P256:
        raise TpmKeyError("TPM key is not on P-256")
    attrs = int(public.objectAttributes)
    if attrs & _BASE_ATTRS != _BASE_ATTRS:
        raise TpmKeyError("TPM key lacks fixedTPM/fixedParent/sensitiveDataOrigin/userWithAuth")
    sign = bool(attrs & TPMA_OBJECT.SIGN_ENCRYPT)
    decrypt = bool(attrs & TPMA_OBJECT.DECRYPT)
    if attrs & TPMA_OBJECT.RESTRICTED:
        if sign and not decrypt:
            return TpmKeyUsage.ATTEST
        raise TpmKeyError("restricted TPM key that is not an attestation key")
    if sign and not decrypt:
        return TpmKeyUsage.SIGN
    if decrypt and not sign:
        return TpmKeyUsage.ECDH
    raise TpmKeyError("TPM key must be either a signing or an ECDH key, not both or neither")


#: The signing scheme of every TPM2_Sign (the keys' own scheme is pinned to it as well).
ECDSA_SHA256: Final = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
ECDSA_SHA256.details.ecdsa.hashAlg = TPM2_ALG.SHA256
