"""Errors of the key backends. Every error the :mod:`signers` package raises derives from
``SignerError`` (whose base is the shared ``trustcore.errors.ReasonedError``: a stable
``reason`` besides the message).

The tree names every subclass, wherever it is defined (``tests/project/test_error_trees.py`` checks
it against the code); classes outside this module carry their module in brackets::

    SignerError
    ├── KeystoreError          an encrypted key file could not be written, read or decrypted
    │                          (wrong passphrase, corrupt or foreign file, empty passphrase)
    ├── PassphraseError        no usable passphrase (variable unset, file missing or empty)
    ├── TlsBindingError        a TPM key cannot be given to Python's ssl (another OpenSSL,
    │                          unexpected SSLContext layout, key and certificate differ)
    ├── TpmError               the TPM is unreachable or a TPM command failed
    │   └── TpmKeyError        a wrapped TPM key blob is malformed or has the wrong usage
    │       └── TpmImportError an import blob was refused by the TPM (``rc``: its response
    │                          code; TPM_RC_INTEGRITY when made for another TPM's storage key)
    └── Pkcs11Error            the PKCS#11 module failed to load, or the token refused a call
        │                      [pkcs11]
        ├── Pkcs11PinError     the PIN is empty, wrong, locked or expired [pkcs11]
        ├── Pkcs11TokenNotFoundError   no token, or more than one, has the label [pkcs11]
        ├── Pkcs11KeyNotFoundError     no key with the label is in the token [pkcs11]
        └── Pkcs11KeyError     the key is unfit (ambiguous, wrong type, exportable) [pkcs11]
            └── KeyNotExportableError  a token key's private scalar cannot be read [pkcs11]

Library exceptions (``cryptography``, ``tpm2_pytss``, ``OSError``) are always chained with
``raise ... from exc`` so the cause stays visible in logs while callers catch one tree.
"""

from __future__ import annotations

from trustcore.errors import ReasonedError

__all__ = [
    "KeystoreError",
    "PassphraseError",
    "SignerError",
    "TlsBindingError",
    "TpmError",
    "TpmImportError",
    "TpmKeyError",
]


class SignerError(ReasonedError):
    """Root of every error raised by :mod:`signers`."""

    reason = "signer_failed"


class KeystoreError(SignerError):
    """An encrypted keystore file could not be written, read or decrypted."""

    reason = "keystore_refused"


class PassphraseError(SignerError):
    """A keystore passphrase could not be obtained from its configured source."""

    reason = "no_passphrase"


class TlsBindingError(SignerError):
    """A TPM key could not be installed as the TLS key of an ``ssl.SSLContext``."""

    reason = "tls_binding_failed"


class TpmError(SignerError):
    """The TPM could not be reached or refused a command."""

    reason = "tpm_failed"


class TpmKeyError(TpmError):
    """A wrapped TPM key is malformed, foreign, or used for what its attributes forbid."""

    reason = "bad_tpm_key"


class TpmImportError(TpmKeyError):
    """The TPM refused an import (duplication) blob: made for another TPM's storage key,
    tampered with, or with attributes the TPM does not accept. ``rc`` is the TPM response
    code (``TPM2_RC.INTEGRITY`` = 0x09F, reported as 0x3DF with the parameter number, for a
    blob wrapped to another storage key), ``None`` when refused before the TPM saw it."""

    reason = "tpm_import_refused"

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc
