"""Key backends behind ``trustcore.keys.Signer`` / ``KeyAgreement``.

- :mod:`signers.software`: P-256 keys in an encrypted PKCS#8 keystore file (or in memory).
- :mod:`signers.tpm`: P-256 keys inside a TPM 2.0 via tpm2-pytss, stored as TPM-wrapped
  ``TSS2 PRIVATE KEY`` blobs; NV counters for anti-rollback.

``signers.tpm`` is not imported here so that software-only users do not load the TSS
C libraries.
"""

from signers.errors import KeystoreError, PassphraseError, SignerError, TpmError, TpmKeyError
from signers.software import SoftwareKey, passphrase_from_env, passphrase_from_file

__all__ = [
    "KeystoreError",
    "PassphraseError",
    "SignerError",
    "SoftwareKey",
    "TpmError",
    "TpmKeyError",
    "passphrase_from_env",
    "passphrase_from_file",
]
