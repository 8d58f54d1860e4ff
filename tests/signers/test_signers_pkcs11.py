"""PKCS#11 key backend against a real SoftHSM2 token created per test in tmp_path."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import threading
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from signers.errors import SignerError
from signers.pkcs11 import (
    KeyNotExportableError,
    Pkcs11Error,
    Pkcs11Key,
    Pkcs11KeyError,
    Pkcs11KeyNotFoundError,
    Pkcs11PinError,
    Pkcs11PrivateKey,
    Pkcs11Token,
    Pkcs11TokenNotFoundError,
)
from tests.fixtures.softhsm import SoftHsmToken
from trustcore.keys import Signer, key_id


@pytest.fixture
def token(softhsm_token: SoftHsmToken) -> SoftHsmToken:
    """The shared SoftHSM2 token (tests/fixtures/softhsm.py), under this module's name."""
    return softhsm_token


def _raw_session(tok: SoftHsmToken) -> pkcs11.Session:
    """A plain python-pkcs11 session, to inspect or plant objects behind the backend's back."""
    return pkcs11.lib(tok.module).get_token(token_label=tok.label).open(rw=True, user_pin=tok.pin)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _root_certificate(key: Pkcs11Key) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("Devtrust Test Root CA"))
        .issuer_name(_name("Devtrust Test Root CA"))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key.private_key(), hashes.SHA256())
    )


def _leaf_certificate(
    issuer: Pkcs11Key, issuer_cert: x509.Certificate
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = dt.datetime.now(dt.UTC)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("device-0001"))
        .issuer_name(issuer_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),
            critical=False,
        )
        .sign(issuer.private_key(), hashes.SHA256())
    )
    return cert, leaf_key


def _openssl_verify(tmp_path: Path, ca: x509.Certificate, cert: x509.Certificate) -> None:
    ca_pem = tmp_path / "root.pem"
    cert_pem = tmp_path / "cert.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    openssl = shutil.which("openssl")
    assert openssl is not None
    result = subprocess.run(
        [openssl, "verify", "-CAfile", str(ca_pem), str(cert_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def _assert_signs(key: Pkcs11Key, data: bytes) -> None:
    """``key`` signed ``data``: the signature verifies under its public key, and only for
    ``data`` (a signature that verifies for anything would prove nothing)."""
    sig = key.sign(data)
    key.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(sig, data + b"!", ec.ECDSA(hashes.SHA256()))


def test_generated_key_signs_der_ecdsa_sha256(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        assert isinstance(key, Signer)
        # The key lives in this test's private token directory, nowhere else.
        assert any(token.tokendir.rglob("*.object"))
        assert isinstance(key.private_key(), ec.EllipticCurvePrivateKey)
        assert isinstance(key.public_key().curve, ec.SECP256R1)
        data = b"entitlement package bytes"
        sig = key.sign(data)
        r, s = decode_dss_signature(sig)  # DER, not raw r||s
        assert r > 0 and s > 0
        key.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.public_key().verify(sig, data + b"!", ec.ECDSA(hashes.SHA256()))
        # ECDSA with a random nonce: two signatures of the same data differ.
        assert key.sign(data) != sig


def test_root_ca_self_signed_in_token_verifies_with_openssl(
    token: SoftHsmToken, tmp_path: Path
) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        root = _root_certificate(key)
        leaf, _ = _leaf_certificate(key, root)
    root.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(root)
    assert root.public_key() == key.public_key()
    _openssl_verify(tmp_path, root, root)
    _openssl_verify(tmp_path, root, leaf)


def test_openssl_rejects_leaf_not_signed_by_token_root(token: SoftHsmToken, tmp_path: Path) -> None:
    """Control for the test above: the openssl check does fail on a foreign root."""
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        root = _root_certificate(key)
    with Pkcs11Key.generate(token.module, token.label, "impostor", token.pin) as other:
        impostor_root = _root_certificate(other)
        leaf, _ = _leaf_certificate(other, impostor_root)
    with pytest.raises(AssertionError):
        _openssl_verify(tmp_path, root, leaf)


def test_csr_and_crl_builders_sign_with_token_key(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "approver-1", token.pin) as key:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_name("approver-1"))
            .sign(key.private_key(), hashes.SHA256())
        )
        now = dt.datetime.now(dt.UTC)
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(_name("Devtrust Test Root CA"))
            .last_update(now)
            .next_update(now + dt.timedelta(days=7))
            .add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(1234).revocation_date(now).build()
            )
            .sign(key.private_key(), hashes.SHA256())
        )
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert crl.is_signature_valid(key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(1234) is not None


def test_key_found_again_by_label(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as made:
        made_pub = made.public_key()
    with Pkcs11Key.open(token.module, token.label, "root-ca", token.pin) as found:
        assert found.public_key() == made_pub
        assert found.label == "root-ca"
        sig = found.sign(b"again")
    made_pub.verify(sig, b"again", ec.ECDSA(hashes.SHA256()))
    # CKA_ID is the core's key id, so other PKCS#11 tools pair the objects the usual way.
    with _raw_session(token) as session:
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="root-ca")
        assert priv[Attribute.ID] == key_id(made_pub)


def test_wrong_pin_is_a_pin_error(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin):
        pass
    with pytest.raises(Pkcs11PinError, match="PinIncorrect") as info:
        Pkcs11Key.open(token.module, token.label, "root-ca", "not-the-pin")
    assert isinstance(info.value, SignerError)
    assert isinstance(info.value.__cause__, pkcs11.exceptions.PinIncorrect)
    # The right PIN still works afterwards: a failed login leaves nothing half-open.
    with Pkcs11Key.open(token.module, token.label, "root-ca", token.pin) as key:
        _assert_signs(key, b"x")


@pytest.mark.parametrize("pin", ["", b"", b"\xff\xfe"])
def test_empty_or_undecodable_pin_is_refused_before_the_token(
    token: SoftHsmToken, pin: str | bytes
) -> None:
    with pytest.raises(Pkcs11PinError):
        Pkcs11Key.open(token.module, token.label, "root-ca", pin)


def test_pin_as_bytes_is_accepted(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "k", token.pin.encode()) as key:
        _assert_signs(key, b"x")


def test_missing_key_is_a_not_found_error(token: SoftHsmToken) -> None:
    with pytest.raises(Pkcs11KeyNotFoundError, match="no-such-key"):
        Pkcs11Key.open(token.module, token.label, "no-such-key", token.pin)
    # The failed lookup logged out again: a new login succeeds.
    with Pkcs11Token.open(token.module, token.label, token.pin):
        pass


def test_missing_token_and_module_are_clear_errors(token: SoftHsmToken, tmp_path: Path) -> None:
    with pytest.raises(Pkcs11TokenNotFoundError, match="other-token"):
        Pkcs11Key.open(token.module, "other-token", "root-ca", token.pin)
    with pytest.raises(Pkcs11Error, match="does not exist"):
        Pkcs11Key.open(tmp_path / "nope.so", token.label, "root-ca", token.pin)
    not_a_module = tmp_path / "junk.so"
    not_a_module.write_bytes(b"not an ELF file")
    with pytest.raises(Pkcs11Error, match="cannot load"):
        Pkcs11Key.open(not_a_module, token.label, "root-ca", token.pin)


def test_private_key_is_not_extractable(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        priv = key.private_key()
        with pytest.raises(KeyNotExportableError):
            priv.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        with pytest.raises(KeyNotExportableError):
            priv.private_numbers()
        with pytest.raises(Pkcs11KeyError, match="signing only"):
            priv.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    # And the token itself agrees: the value cannot be read even with the user logged in.
    with _raw_session(token) as session:
        obj = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="root-ca")
        assert obj[Attribute.SENSITIVE] is True
        assert obj[Attribute.EXTRACTABLE] is False
        assert obj[Attribute.NEVER_EXTRACTABLE] is True
        assert obj[Attribute.DERIVE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            obj[Attribute.VALUE]


def test_extractable_key_is_refused_unless_allowed(token: SoftHsmToken) -> None:
    with _raw_session(token) as session:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(
            store=True,
            label="soft",
            private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(Pkcs11KeyError, match="extractable"):
        Pkcs11Key.open(token.module, token.label, "soft", token.pin)
    with Pkcs11Key.open(token.module, token.label, "soft", token.pin, allow_extractable=True) as k:
        k.public_key().verify(k.sign(b"d"), b"d", ec.ECDSA(hashes.SHA256()))


def test_non_p256_key_is_refused(token: SoftHsmToken) -> None:
    with _raw_session(token) as session:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")},
            local=True,
        )
        params.generate_keypair(store=True, label="p384")
    with pytest.raises(Pkcs11KeyError, match="P-256"):
        Pkcs11Key.open(token.module, token.label, "p384", token.pin)


def test_mismatched_public_and_private_objects_are_refused(token: SoftHsmToken) -> None:
    with Pkcs11Token.open(token.module, token.label, token.pin, writable=True) as tok:
        tok.generate_key("a")
        tok.generate_key("b")
    with _raw_session(token) as session:
        session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="a")[Attribute.LABEL] = "mix"
        session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="b")[Attribute.LABEL] = "mix"
    with pytest.raises(Pkcs11KeyError, match="not one key pair"):
        Pkcs11Key.open(token.module, token.label, "mix", token.pin)


def test_duplicate_label_is_refused_at_generation(token: SoftHsmToken) -> None:
    with Pkcs11Token.open(token.module, token.label, token.pin, writable=True) as tok:
        first = tok.generate_key("root-ca")
        with pytest.raises(Pkcs11KeyError, match="already used"):
            tok.generate_key("root-ca")
        assert tok.key("root-ca").public_key() == first.public_key()


def test_read_only_session_cannot_generate(token: SoftHsmToken) -> None:
    with (
        Pkcs11Token.open(token.module, token.label, token.pin) as tok,
        pytest.raises(Pkcs11Error, match="read-only"),
    ):
        tok.generate_key("root-ca")


def test_several_keys_share_one_token_session(token: SoftHsmToken) -> None:
    with Pkcs11Token.open(token.module, token.label, token.pin, writable=True) as tok:
        keys = [tok.generate_key(f"approver-{i}") for i in range(3)]
        assert len({key_id(k.public_key()) for k in keys}) == 3
        for k in keys:
            k.public_key().verify(k.sign(b"quorum"), b"quorum", ec.ECDSA(hashes.SHA256()))
        # PKCS#11 login is per process: a second login is refused with a pointed message.
        with pytest.raises(Pkcs11Error, match="already logged in"):
            Pkcs11Token.open(token.module, token.label, token.pin)
    with pytest.raises(Pkcs11Error, match="closed"):
        keys[0].sign(b"after close")


def test_concurrent_signing_from_threads(token: SoftHsmToken) -> None:
    errors: list[BaseException] = []
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        pub = key.public_key()

        def work(n: int) -> None:
            try:
                for i in range(50):
                    msg = f"{n}-{i}".encode()
                    pub.verify(key.sign(msg), msg, ec.ECDSA(hashes.SHA256()))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_private_key_interface_algorithms(token: SoftHsmToken) -> None:
    with Pkcs11Key.generate(token.module, token.label, "root-ca", token.pin) as key:
        priv = key.private_key()
        assert isinstance(priv, Pkcs11PrivateKey)
        assert priv.key_size == 256
        assert isinstance(priv.curve, ec.SECP256R1)
        assert priv.public_key() == key.public_key()
        data = b"tbs"
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        prehashed = priv.sign(digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA256())))
        key.public_key().verify(prehashed, data, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(Pkcs11KeyError, match="SHA-256"):
            priv.sign(data, ec.ECDSA(hashes.SHA384()))
        with pytest.raises(Pkcs11KeyError, match="deterministic"):
            priv.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        with pytest.raises(Pkcs11KeyError, match="32 bytes"):
            key.sign_digest(b"short")
