"""Errors of the key backends. Every error the :mod:`signers` package raises derives from
``SignerError``.

::

    SignerError
    ├── KeystoreError          an encrypted key file could not be written, read or decrypted
    │                          (wrong passphrase, corrupt or foreign file, empty passphrase)
    ├── PassphraseError        no usable passphrase (variable unset, file missing or empty)
    ├── TlsBindingError        a TPM key cannot be given to Python's ssl (another OpenSSL,
    │                          unexpected SSLContext layout, key and certificate differ)
    └── TpmError               the TPM is unreachable or a TPM command failed
        └── TpmKeyError        a wrapped TPM key blob is malformed or has the wrong usage
            └── TpmImportError an import blob was refused by the TPM (``rc``: its response
                               code; TPM_RC_INTEGRITY when made for another TPM's storage key)

Library exceptions (``cryptography``, ``tpm2_pytss``, ``OSError``) are always chained with
``raise ... from exc`` so the cause stays visible in logs while callers catch one tree.
"""

from __future__ import annotations

__all__ = [
    "KeystoreError",
    "PassphraseError",
    "SignerError",
    "TlsBindingError",
    "TpmError",
    "TpmImportError",
    "TpmKeyError",
]


class SignerError(Exception):
    """Root of every error raised by :mod:`signers`."""


class KeystoreError(SignerError):
    """An encrypted keystore file could not be written, read or decrypted."""


class PassphraseError(SignerError):
    """A keystore passphrase could not be obtained from its configured source."""


class TlsBindingError(SignerError):
    """A TPM key could not be installed as the TLS key of an ``ssl.SSLContext``."""


class TpmError(SignerError):
    """The TPM could not be reached or refused a command."""


class TpmKeyError(TpmError):
    """A wrapped TPM key is malformed, foreign, or used for what its attributes forbid."""


class TpmImportError(TpmKeyError):
    """The TPM refused an import (duplication) blob: made for another TPM's storage key,
    tampered with, or with attributes the TPM does not accept. ``rc`` is the TPM response
    code (``TPM2_RC.INTEGRITY`` = 0x09F, reported as 0x3DF with the parameter number, for a
    blob wrapped to another storage key), ``None`` when refused before the TPM saw it."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc
