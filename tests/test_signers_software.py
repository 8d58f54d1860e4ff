"""Software keystore: round trip, refusal of bad passphrases and files, no plaintext on disk."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signers.errors import KeystoreError, PassphraseError, SignerError
from signers.software import (
    SoftwareKey,
    passphrase_from_env,
    passphrase_from_file,
    write_private_file,
)
from trustcore.keys import KeyAgreement, Signer

PASS = b"correct horse battery staple"


def test_implements_protocols() -> None:
    key = SoftwareKey.generate()
    assert isinstance(key, Signer)
    assert isinstance(key, KeyAgreement)


def test_sign_verifies_and_is_der() -> None:
    key = SoftwareKey.generate()
    sig = key.sign(b"message")
    key.public_key().verify(sig, b"message", ec.ECDSA(hashes.SHA256()))
    assert sig[0] == 0x30  # DER SEQUENCE
    with pytest.raises(InvalidSignature):
        key.public_key().verify(sig, b"other", ec.ECDSA(hashes.SHA256()))


def test_exchange_matches_peer() -> None:
    a, b = SoftwareKey.generate(), SoftwareKey.generate()
    assert a.exchange(b.public_key()) == b.exchange(a.public_key())
    assert len(a.exchange(b.public_key())) == 32


def test_exchange_refuses_other_curve() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(SignerError):
        SoftwareKey.generate().exchange(other)


def test_refuses_non_p256_key() -> None:
    with pytest.raises(SignerError):
        SoftwareKey(ec.generate_private_key(ec.SECP384R1()))


def test_round_trip(tmp_path: Path) -> None:
    key = SoftwareKey.generate()
    path = tmp_path / "hq.key"
    key.save(path, PASS)
    loaded = SoftwareKey.load(path, PASS)
    assert loaded.public_key() == key.public_key()
    key.public_key().verify(loaded.sign(b"x"), b"x", ec.ECDSA(hashes.SHA256()))


def test_file_mode_0600_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    SoftwareKey.generate().save(path, PASS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_file_holds_no_plaintext_key(tmp_path: Path) -> None:
    key = SoftwareKey.generate()
    path = tmp_path / "k.pem"
    key.save(path, PASS)
    data = path.read_bytes()
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    assert b"BEGIN PRIVATE KEY" not in data
    assert b"BEGIN EC PRIVATE KEY" not in data
    scalar = key.private_key().private_numbers().private_value.to_bytes(32, "big")
    der = serialization.load_pem_private_key(data, PASS).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert scalar in der  # sanity: the check below would find it if it were there
    body = b"".join(data.splitlines()[1:-1])
    assert scalar not in base64.b64decode(body)
    assert scalar not in data
    assert PASS not in data


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    SoftwareKey.generate().save(path, PASS)
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupt"):
        SoftwareKey.load(path, b"wrong")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    SoftwareKey.generate().save(path, PASS)
    lines = path.read_bytes().splitlines(keepends=True)
    mid = len(lines) // 2
    lines[mid] = bytes(reversed(lines[mid][:-1])) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(KeystoreError):
        SoftwareKey.load(path, PASS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="cannot read"):
        SoftwareKey.load(tmp_path / "absent.pem", PASS)


def test_plaintext_keystore_refused(tmp_path: Path) -> None:
    raw = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "plain.pem"
    path.write_bytes(raw)
    with pytest.raises(KeystoreError, match="not an encrypted"):
        SoftwareKey.load(path, PASS)


def test_wrong_curve_keystore_refused(tmp_path: Path) -> None:
    data = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASS),
    )
    with pytest.raises(KeystoreError, match="P-256"):
        SoftwareKey.from_encrypted_pem(data, PASS)


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="empty passphrase"):
        SoftwareKey.generate().save(tmp_path / "k.pem", b"")
    assert not (tmp_path / "k.pem").exists()


def test_no_overwrite_by_default(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = SoftwareKey.generate()
    first.save(path, PASS)
    with pytest.raises(KeystoreError, match="already exists"):
        SoftwareKey.generate().save(path, PASS)
    assert SoftwareKey.load(path, PASS).public_key() == first.public_key()
    second = SoftwareKey.generate()
    second.save(path, PASS, overwrite=True)
    assert SoftwareKey.load(path, PASS).public_key() == second.public_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_ephemeral_never_persisted(tmp_path: Path) -> None:
    key = SoftwareKey.ephemeral()
    assert key.is_ephemeral
    key.public_key().verify(key.sign(b"m"), b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(KeystoreError, match="never persisted"):
        key.save(tmp_path / "e.pem", PASS)
    assert list(tmp_path.iterdir()) == []


def test_write_private_file_atomic_mode(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    write_private_file(path, b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVTRUST_TEST_PASS", "s3cret")
    assert passphrase_from_env("DEVTRUST_TEST_PASS") == b"s3cret"
    monkeypatch.setenv("DEVTRUST_TEST_PASS", "")
    with pytest.raises(PassphraseError, match="empty"):
        passphrase_from_env("DEVTRUST_TEST_PASS")
    monkeypatch.delenv("DEVTRUST_TEST_PASS")
    with pytest.raises(PassphraseError, match="not set"):
        passphrase_from_env("DEVTRUST_TEST_PASS")


def test_passphrase_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o600)
    assert passphrase_from_file(path) == b"s3cret"
    path.chmod(0o644)
    with pytest.raises(PassphraseError, match="other users"):
        passphrase_from_file(path)
    path.write_bytes(b"\n")
    path.chmod(0o600)
    with pytest.raises(PassphraseError, match="empty"):
        passphrase_from_file(path)
    with pytest.raises(PassphraseError, match="cannot read"):
        passphrase_from_file(tmp_path / "absent")
