"""HPKE base mode: RFC 9180 A.3.1 vector byte for byte, interop with cryptography's HPKE."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hpke as pyca_hpke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from signers.software import SoftwareKey
from trustcore import hpke
from trustcore.errors import SealedPackageError

# RFC 9180 Appendix A.3.1: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, mode_base.
RFC_INFO = bytes.fromhex("4f6465206f6e2061204772656369616e2055726e")
RFC_SK_EM = "4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb"
RFC_PK_EM = bytes.fromhex(
    "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac9"
    "8536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4"
)
RFC_SK_RM = "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2"
RFC_PK_RM = bytes.fromhex(
    "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a82"
    "6a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0"
)
RFC_SHARED_SECRET = bytes.fromhex(
    "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8"
)
RFC_KEY = bytes.fromhex("868c066ef58aae6dc589b6cfdd18f97e")
RFC_BASE_NONCE = bytes.fromhex("4e0bc5018beba4bf004cca59")
RFC_PT = bytes.fromhex("4265617574792069732074727574682c20747275746820626561757479")
RFC_AAD0 = bytes.fromhex("436f756e742d30")
RFC_CT0 = bytes.fromhex(
    "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434"
)


def _private(hex_scalar: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(hex_scalar, 16), ec.SECP256R1())


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def test_rfc9180_a31_key_schedule() -> None:
    receiver = _private(RFC_SK_RM)
    assert _point(receiver.public_key()) == RFC_PK_RM
    dh = _private(RFC_SK_EM).exchange(ec.ECDH(), receiver.public_key())
    shared = hpke._shared_secret(dh, RFC_PK_EM, RFC_PK_RM)
    assert shared == RFC_SHARED_SECRET
    assert hpke._key_schedule(shared, RFC_INFO, hpke.AES_128_GCM) == (RFC_KEY, RFC_BASE_NONCE)


def test_rfc9180_a31_seal_is_byte_exact() -> None:
    receiver = _private(RFC_SK_RM)
    enc, ct = hpke._seal_with_ephemeral(
        _private(RFC_SK_EM),
        receiver.public_key(),
        RFC_PT,
        info=RFC_INFO,
        aad=RFC_AAD0,
        aead=hpke.AES_128_GCM,
    )
    assert enc == RFC_PK_EM
    assert ct == RFC_CT0


def test_rfc9180_a31_open_with_key_agreement() -> None:
    receiver = SoftwareKey(_private(RFC_SK_RM), ephemeral=True)
    pt = hpke.open_(
        receiver, RFC_PK_EM, RFC_CT0, info=RFC_INFO, aad=RFC_AAD0, aead=hpke.AES_128_GCM
    )
    assert pt == RFC_PT


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (hpke.AES_128_GCM, pyca_hpke.AEAD.AES_128_GCM),
        (hpke.AES_256_GCM, pyca_hpke.AEAD.AES_256_GCM),
    ],
)
def test_interop_with_cryptography_both_directions(ours: hpke.Aead, theirs: pyca_hpke.AEAD) -> None:
    suite = pyca_hpke.Suite(pyca_hpke.KEM.P256, pyca_hpke.KDF.HKDF_SHA256, theirs)
    receiver = SoftwareKey.ephemeral()
    info = b"interop info"
    message = b"entitlement payload \x00\xff" * 10

    # theirs -> ours: cryptography's output is enc || ciphertext.
    sealed = suite.encrypt(message, receiver.public_key(), info=info)
    enc, ct = sealed[: hpke.ENC_LENGTH], sealed[hpke.ENC_LENGTH :]
    assert hpke.open_(receiver, enc, ct, info=info, aad=b"", aead=ours) == message

    # ours -> theirs.
    enc, ct = hpke.seal(receiver.public_key(), message, info=info, aad=b"", aead=ours)
    assert suite.decrypt(enc + ct, receiver.private_key(), info=info) == message


def test_roundtrip_default_is_aes256_and_binds_info_and_aad() -> None:
    receiver = SoftwareKey.ephemeral()
    enc, ct = hpke.seal(receiver.public_key(), b"secret", info=b"i", aad=b"a")
    assert len(enc) == 65
    assert len(ct) == len(b"secret") + 16
    assert hpke.open_(receiver, enc, ct, info=b"i", aad=b"a") == b"secret"
    for info, aad in ((b"I", b"a"), (b"i", b"A")):
        with pytest.raises(SealedPackageError) as err:
            hpke.open_(receiver, enc, ct, info=info, aad=aad)
        assert err.value.reason == "decrypt_failed"
    # The suite is bound too: an AES-128 open of an AES-256 ciphertext fails.
    with pytest.raises(SealedPackageError):
        hpke.open_(receiver, enc, ct, info=b"i", aad=b"a", aead=hpke.AES_128_GCM)


def test_fresh_ephemeral_each_time() -> None:
    receiver = SoftwareKey.ephemeral()
    first = hpke.seal(receiver.public_key(), b"x", info=b"", aad=b"")
    second = hpke.seal(receiver.public_key(), b"x", info=b"", aad=b"")
    assert first[0] != second[0]
    assert first[1] != second[1]


def test_wrong_receiver_fails() -> None:
    enc, ct = hpke.seal(SoftwareKey.ephemeral().public_key(), b"x", info=b"", aad=b"")
    with pytest.raises(SealedPackageError) as err:
        hpke.open_(SoftwareKey.ephemeral(), enc, ct, info=b"", aad=b"")
    assert err.value.reason == "decrypt_failed"


@pytest.mark.parametrize(
    "bad_enc",
    [
        b"",
        b"\x04" + bytes(64),  # not on the curve
        b"\x02" + bytes(64),  # wrong prefix
        RFC_PK_EM[:-1],  # short
        RFC_PK_EM + b"\x00",  # long
        RFC_PK_EM[:-1] + bytes([RFC_PK_EM[-1] ^ 1]),  # off-curve after a bit flip
    ],
)
def test_malformed_enc_is_decrypt_failed(bad_enc: bytes) -> None:
    receiver = SoftwareKey(_private(RFC_SK_RM), ephemeral=True)
    with pytest.raises(SealedPackageError) as err:
        hpke.open_(receiver, bad_enc, RFC_CT0, info=RFC_INFO, aad=RFC_AAD0)
    assert err.value.reason == "decrypt_failed"


def test_tampered_ciphertext_every_byte() -> None:
    receiver = SoftwareKey(_private(RFC_SK_RM), ephemeral=True)
    for i in range(len(RFC_CT0)):
        bad = bytearray(RFC_CT0)
        bad[i] ^= 0x01
        with pytest.raises(SealedPackageError):
            hpke.open_(
                receiver, RFC_PK_EM, bytes(bad), info=RFC_INFO, aad=RFC_AAD0, aead=hpke.AES_128_GCM
            )
    with pytest.raises(SealedPackageError):
        hpke.open_(
            receiver, RFC_PK_EM, RFC_CT0[:-1], info=RFC_INFO, aad=RFC_AAD0, aead=hpke.AES_128_GCM
        )


def test_seal_refuses_non_p256_receiver() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(TypeError):
        hpke.seal(other, b"x", info=b"", aad=b"")


@pytest.mark.parametrize("aead", [hpke.AES_128_GCM, hpke.AES_256_GCM])
@pytest.mark.parametrize("info", [b"", RFC_INFO, b"i" * 300])
def test_seal_is_byte_identical_to_the_reference_key_schedule(aead: hpke.Aead, info: bytes) -> None:
    """seal() with an empty aad runs in cryptography's HPKE; for the ephemeral key it chose
    (enc), the RFC 9180 key schedule of this module (checked against A.3.1 above) gives
    exactly the same ciphertext."""
    receiver = SoftwareKey.generate()
    plaintext = bytes(range(32))
    enc, ct = hpke.seal(receiver.public_key(), plaintext, info=info, aad=b"", aead=aead)
    assert len(enc) == hpke.ENC_LENGTH and enc[0] == 0x04
    ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)
    dh = receiver.exchange(ephemeral)
    shared = hpke._shared_secret(dh, enc, _point(receiver.public_key()))
    key, base_nonce = hpke._key_schedule(shared, info, aead)
    assert AESGCM(key).encrypt(base_nonce, plaintext, b"") == ct
    assert hpke.open_(receiver, enc, ct, info=info, aad=b"", aead=aead) == plaintext
    # a non-empty aad takes the reference path; both open the same way
    enc2, ct2 = hpke.seal(receiver.public_key(), plaintext, info=info, aad=b"x", aead=aead)
    assert hpke.open_(receiver, enc2, ct2, info=info, aad=b"x", aead=aead) == plaintext
