"""Software keystore: round trip, refusal of bad passphrases and files, no plaintext on disk."""

from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signers.errors import KeystoreError, PassphraseError, SignerError
from signers.software import (
    SoftwareKey,
    load_ssl_identity,
    passphrase_from,
    passphrase_from_env,
    passphrase_from_file,
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


def test_passphrase_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVTRUST_TEST_PASS", "s3cret")
    assert passphrase_from_env("DEVTRUST_TEST_PASS") == b"s3cret"
    monkeypatch.setenv("DEVTRUST_TEST_PASS", "")
    with pytest.raises(PassphraseError, match="empty"):
        passphrase_from_env("DEVTRUST_TEST_PASS")
    monkeypatch.delenv("DEVTRUST_TEST_PASS")
    with pytest.raises(PassphraseError, match="not set"):
        passphrase_from_env("DEVTRUST_TEST_PASS")


def test_passphrase_from_prefers_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVTRUST_TEST_PASS", "from-env")
    path = tmp_path / "pass"
    path.write_bytes(b"from-file\n")
    path.chmod(0o600)
    assert passphrase_from(path, "DEVTRUST_TEST_PASS") == b"from-file"
    assert passphrase_from(None, "DEVTRUST_TEST_PASS") == b"from-env"
    with pytest.raises(PassphraseError, match="cannot read"):  # a named file must exist
        passphrase_from(tmp_path / "absent", "DEVTRUST_TEST_PASS")


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


# ------------------------------------------------------------------ ssl: load_ssl_identity


def _cert(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment"),
            False,
        )
        builder = builder.add_extension(
            x509.KeyUsage(
                **usage,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    else:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class TlsPki:
    ca: x509.Certificate
    server: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    client: x509.Certificate
    client_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def tls_pki() -> TlsPki:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test CA", ca_key.public_key(), None, ca_key, ca=True)
    server = _cert("server", server_key.public_key(), ca, ca_key, server=True)
    client = _cert("client", client_key.public_key(), ca, ca_key)
    return TlsPki(ca, server, server_key, client, client_key)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class _RecordingContext(ssl.SSLContext):
    """A real SSLContext that notes what the files handed to OpenSSL hold at load time."""

    seen: list[dict[str, object]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        key_path = Path(keyfile)
        self.seen.append(
            {
                "dir": key_path.parent,
                "dir_mode": stat.S_IMODE(key_path.parent.stat().st_mode),
                "key_mode": stat.S_IMODE(key_path.stat().st_mode),
                "cert_mode": stat.S_IMODE(Path(certfile).stat().st_mode),
                "key": key_path.read_bytes(),
                "chain": Path(certfile).read_bytes(),
                "password": password,
            }
        )
        super().load_cert_chain(certfile, keyfile, password)


def test_ssl_identity_puts_only_ciphertext_on_disk(
    tls_pki: TlsPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # staging lands where we can look
    ca, leaf, key = tls_pki.ca, tls_pki.client, tls_pki.client_key
    ctx = _RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.seen = []
    load_ssl_identity(ctx, _pem(leaf, ca), key)

    (seen,) = ctx.seen
    data = seen["key"]
    assert isinstance(data, bytes)
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"BEGIN PRIVATE KEY" not in data and b"BEGIN EC PRIVATE KEY" not in data
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    assert scalar not in base64.b64decode(b"".join(data.splitlines()[1:-1]))
    with pytest.raises(TypeError):  # useless without the one-time password
        serialization.load_pem_private_key(data, None)
    password = seen["password"]
    assert isinstance(password, bytes) and len(password) >= 32
    assert password not in data
    assert serialization.load_pem_private_key(data, password).public_key() == key.public_key()
    assert seen["chain"] == _pem(leaf, ca)
    assert (seen["dir_mode"], seen["key_mode"], seen["cert_mode"]) == (0o700, 0o600, 0o600)
    staging = seen["dir"]
    assert isinstance(staging, Path) and staging.parent == tmp_path
    assert staging.name.startswith("devtrust-tls-")
    assert list(tmp_path.iterdir()) == []  # staging directory removed at once

    again = _RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    again.seen = []
    load_ssl_identity(again, _pem(leaf, ca), key)
    assert again.seen[0]["password"] != password  # one-time: fresh for every load


def test_ssl_identity_mutual_tls_handshake(tls_pki: TlsPki) -> None:
    """Both ends loaded through the helper complete a real mutual-TLS handshake over
    loopback, and the server sees the client's certificate (so the key was the right one)."""
    ca, server_cert, client_cert = tls_pki.ca, tls_pki.server, tls_pki.client
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=_pem(ca).decode())
    load_ssl_identity(server_ctx, _pem(server_cert, ca), tls_pki.server_key)
    client_ctx = ssl.create_default_context(cadata=_pem(ca).decode())
    load_ssl_identity(client_ctx, _pem(client_cert, ca), tls_pki.client_key)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"hello")
        except (OSError, ssl.SSLError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(5) == b"hello"
            assert tls.getpeercert(binary_form=True) == server_cert.public_bytes(
                serialization.Encoding.DER
            )
    finally:
        thread.join(10)
        listener.close()
    assert "error" not in seen, seen.get("error")
    assert seen["peer"] == client_cert.public_bytes(serialization.Encoding.DER)


def test_ssl_identity_refusals_leave_nothing(
    tls_pki: TlsPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ca, leaf, key = tls_pki.ca, tls_pki.client, tls_pki.client_key
    other = ec.generate_private_key(ec.SECP256R1())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(KeystoreError, match="ssl refused") as info:
        load_ssl_identity(ctx, _pem(leaf, ca), other)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert list(tmp_path.iterdir()) == []  # removed on failure too

    plaintext = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeystoreError, match="must not contain a private key"):
        load_ssl_identity(ctx, _pem(leaf, ca) + plaintext, key)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeystoreError, match="expected an EC private key"):
        load_ssl_identity(ctx, _pem(leaf, ca), SoftwareKey.generate())  # type: ignore[arg-type]
