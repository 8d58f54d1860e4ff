"""Software P-256 keys kept in an encrypted keystore file.

For roles without a TPM (an HQ key on an operator's workstation, test fleets) a key lives in
a PKCS#8 PEM file encrypted with ``BestAvailableEncryption`` (PBES2: scrypt or PBKDF2 with
AES-256-CBC, chosen by ``cryptography``). The plaintext key is never written to disk: the
file is created 0600 under a temporary name, fsynced and renamed over the destination, so a
crash leaves either the old file or the new one, never a torn or world-readable one.

Passphrases come from an environment variable or a file (:func:`passphrase_from_env`,
:func:`passphrase_from_file`), never from the command line, where ``ps`` and shell history
would show them.

Python's ``ssl`` loads a private key only from a file. :func:`load_ssl_identity` is the one
way a software key enters an ``ssl.SSLContext``: the file it writes is encrypted under a
random one-time password and deleted at once, so only ciphertext ever touches the disk.
"""

from __future__ import annotations

import os
import secrets
import ssl
import stat
import tempfile
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signers.errors import KeystoreError, PassphraseError, SignerError
from signers.private_files import write_private_file

__all__ = [
    "SoftwareKey",
    "load_ssl_identity",
    "passphrase_from",
    "passphrase_from_env",
    "passphrase_from_file",
]

_MIN_PASSPHRASE = 1  # refuse empty; length policy belongs to the operator's setup


def passphrase_from(path: Path | str | None, var: str) -> bytes:
    """The passphrase (or PIN) from the file ``path`` if one is given, else from the
    environment variable ``var``: a file named on the command line wins, and a secret itself
    never comes from the command line (``ps`` and shell history would show it)."""
    if path is not None:
        return passphrase_from_file(path)
    return passphrase_from_env(var)


def passphrase_from_env(var: str) -> bytes:
    """Read a keystore passphrase from environment variable ``var`` (UTF-8, must be non-empty)."""
    value = os.environ.get(var)
    if value is None:
        raise PassphraseError(f"environment variable {var} is not set")
    if len(value) < _MIN_PASSPHRASE:
        raise PassphraseError(f"environment variable {var} is empty")
    return value.encode()


def passphrase_from_file(path: Path | str) -> bytes:
    """Read a keystore passphrase from a file; one trailing newline is stripped.

    The file must not be readable or writable by other users: a passphrase file others can
    read protects nothing, so it is refused rather than used (fail closed).
    """
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as exc:
        raise PassphraseError(f"cannot read passphrase file {p}: {exc}") from exc
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise PassphraseError(f"passphrase file {p} is accessible by other users (chmod 600)")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) < _MIN_PASSPHRASE:
        raise PassphraseError(f"passphrase file {p} is empty")
    return data


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with mode 0600 and write ``data``; no fsync: the
    files of :func:`load_ssl_identity` live for milliseconds and are never read back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def load_ssl_identity(
    ctx: ssl.SSLContext, chain_pem: bytes, key: ec.EllipticCurvePrivateKey
) -> None:
    """Make ``ctx`` present ``chain_pem`` (leaf first, then issuers) with the software ``key``.

    ``ssl`` can only read keys from files (no in-memory or callback API), and this project
    never writes a private key in plaintext, not even for a moment. So the key is written as
    PKCS#8 ``ENCRYPTED PRIVATE KEY`` under a fresh random 256-bit password that exists only
    in this call's memory, into a 0600 file in a private (0700) temporary directory; OpenSSL
    decrypts it in memory, and the directory is removed before returning (on success or
    failure). A leftover file after a crash is ciphertext under a forgotten password.

    Raises :class:`KeystoreError` if ``chain_pem`` holds a private key (it would be written
    in clear) or ``ssl`` refuses the pair (bad certificate, key not matching the leaf).
    """
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeystoreError(f"expected an EC private key, got {type(key).__name__}")
    if b"PRIVATE KEY" in chain_pem:
        raise KeystoreError("the certificate chain PEM must not contain a private key")
    # URL-safe text rather than raw bytes: no NUL byte can truncate it in OpenSSL's callback.
    password = secrets.token_urlsafe(32).encode("ascii")
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    try:
        with tempfile.TemporaryDirectory(prefix="devtrust-tls-") as tmp:
            directory = Path(tmp)
            directory.chmod(0o700)  # mkdtemp already does; stated so it cannot regress
            cert_file, key_file = directory / "chain.pem", directory / "key.pem"
            _write_new_private(cert_file, chain_pem)
            _write_new_private(key_file, encrypted)
            ctx.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as exc:
        raise KeystoreError(f"ssl refused the certificate chain or key: {exc}") from exc
    except OSError as exc:
        raise KeystoreError(f"cannot stage the TLS identity for ssl: {exc}") from exc


class SoftwareKey:
    """A P-256 key held in process memory; implements ``Signer`` and ``KeyAgreement``.

    Create with :meth:`generate` (to be saved), :meth:`load` (from a keystore file) or
    :meth:`ephemeral` (load tests only: it refuses to be saved, so it can never end up on
    disk by mistake).
    """

    __slots__ = ("_ephemeral", "_key")

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, ephemeral: bool = False) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise SignerError(f"only P-256 keys are supported, got {key.curve.name}")
        self._key = key
        self._ephemeral = ephemeral

    @classmethod
    def generate(cls) -> Self:
        """A new random P-256 key, meant to be saved with :meth:`save`."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ephemeral(cls) -> Self:
        """A new in-memory key that is never persisted (:meth:`save` refuses it)."""
        return cls(ec.generate_private_key(ec.SECP256R1()), ephemeral=True)

    @property
    def is_ephemeral(self) -> bool:
        return self._ephemeral

    # -- keystore ------------------------------------------------------------------------------

    def to_encrypted_pem(self, passphrase: bytes) -> bytes:
        """PKCS#8 ``ENCRYPTED PRIVATE KEY`` PEM; the only serialisation this class offers."""
        if self._ephemeral:
            raise KeystoreError("ephemeral keys are never persisted")
        if not passphrase:
            raise KeystoreError("refusing to encrypt a keystore with an empty passphrase")
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )

    @classmethod
    def from_encrypted_pem(cls, data: bytes, passphrase: bytes) -> Self:
        """Decrypt a keystore PEM. Unencrypted PEMs are refused: they should not exist."""
        if not passphrase:
            raise KeystoreError("empty passphrase")
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data:
            raise KeystoreError("not an encrypted PKCS#8 keystore")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as exc:
            # cryptography does not distinguish a wrong passphrase from a damaged file.
            raise KeystoreError("wrong passphrase or corrupt keystore") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeystoreError(f"keystore holds a {type(key).__name__}, not an EC key")
        if not isinstance(key.curve, ec.SECP256R1):
            raise KeystoreError(f"keystore key is on {key.curve.name}, not P-256")
        return cls(key)

    def save(self, path: Path | str, passphrase: bytes, *, overwrite: bool = False) -> None:
        """Encrypt and write atomically with mode 0600 (:func:`write_private_file`)."""
        write_private_file(path, self.to_encrypted_pem(passphrase), overwrite=overwrite)

    @classmethod
    def load(cls, path: Path | str, passphrase: bytes) -> Self:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeystoreError(f"cannot read keystore {p}: {exc}") from exc
        try:
            return cls.from_encrypted_pem(data, passphrase)
        except KeystoreError as exc:
            raise KeystoreError(f"{p}: {exc}") from exc

    # -- Signer / KeyAgreement ---------------------------------------------------------------

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key

    def sign(self, data: bytes) -> bytes:
        """DER-encoded ECDSA-SHA256 signature over ``data``."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH shared secret (x coordinate, 32 bytes) with a P-256 peer."""
        if not isinstance(peer, ec.EllipticCurvePublicKey) or not isinstance(
            peer.curve, ec.SECP256R1
        ):
            raise SignerError("ECDH peer must be a P-256 public key")
        return self._key.exchange(ec.ECDH(), peer)

    def __repr__(self) -> str:
        kind = "ephemeral" if self._ephemeral else "software"
        return f"SoftwareKey({kind})"
