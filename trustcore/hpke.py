"""HPKE (RFC 9180) base mode, single shot: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-GCM.

Why by hand rather than ``cryptography.hazmat.primitives.hpke``: that API wants the
receiver's private key object, but a station's or HQ's receiving key may live in a TPM and
only offer ECDH (:class:`trustcore.keys.KeyAgreement`). RFC 9180 needs nothing from the
receiver's key except ECDH, so the key schedule is built here from reviewed primitives
(HMAC-SHA256 for HKDF, ``cryptography``'s ECDH and AESGCM). It is checked byte for byte
against the RFC 9180 Appendix A.3 test vector and interoperates with ``cryptography``'s
HPKE in both directions (see tests/trustcore/test_hpke.py).

Sealing with an empty ``aad`` (the payload-key wrap) goes through ``cryptography``'s HPKE,
which computes the same bytes natively; opening always runs here (ECDH only).

Only the single-shot form is offered (one message per encapsulation, sequence number 0):
every sealed package gets a fresh ephemeral key, so nonce reuse cannot happen.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as pyca_hpke
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustcore.errors import SealedPackageError
from trustcore.keys import KeyAgreement

__all__ = ["AES_128_GCM", "AES_256_GCM", "ENC_LENGTH", "Aead", "open_", "seal"]

KEM_ID_P256_SHA256 = 0x0010
KDF_ID_HKDF_SHA256 = 0x0001
MODE_BASE = 0x00
#: Length of ``enc``: an uncompressed P-256 point (RFC 9180 §7.1, Nenc = 65).
ENC_LENGTH = 65
_NH = 32  # SHA-256 output length
_NSECRET = 32
_NN = 12  # AES-GCM nonce length
_VERSION_LABEL = b"HPKE-v1"


@dataclass(frozen=True, slots=True)
class Aead:
    """An RFC 9180 AEAD identifier and its key length."""

    aead_id: int
    key_length: int


#: AES-128-GCM: supported so the RFC 9180 A.3 vector can be checked exactly.
AES_128_GCM = Aead(0x0001, 16)
#: AES-256-GCM: what the project uses (DESIGN.md: AES-256-GCM everywhere).
AES_256_GCM = Aead(0x0002, 32)

_KEM_SUITE_ID = b"KEM" + KEM_ID_P256_SHA256.to_bytes(2, "big")
#: The same suites in ``cryptography.hazmat.primitives.hpke`` (sealing only: opening needs
#: the receiver's private key object, which a TPM-held key does not offer).
_PYCA_SUITES = {
    AES_128_GCM.aead_id: pyca_hpke.Suite(
        pyca_hpke.KEM.P256, pyca_hpke.KDF.HKDF_SHA256, pyca_hpke.AEAD.AES_128_GCM
    ),
    AES_256_GCM.aead_id: pyca_hpke.Suite(
        pyca_hpke.KEM.P256, pyca_hpke.KDF.HKDF_SHA256, pyca_hpke.AEAD.AES_256_GCM
    ),
}


def _extract(salt: bytes, ikm: bytes) -> bytes:
    # HKDF-Extract (RFC 5869): an empty salt means HashLen zero bytes, which HMAC treats
    # identically to an empty key (keys are zero-padded to the block size).
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, _VERSION_LABEL + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + _VERSION_LABEL + suite_id + label + info
    return _expand(prk, labeled_info, length)


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _shared_secret(dh: bytes, enc: bytes, pk_rm: bytes) -> bytes:
    """DHKEM ExtractAndExpand (RFC 9180 §4.1): binds both public keys into the secret."""
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", enc + pk_rm, _NSECRET)


def _key_schedule(shared_secret: bytes, info: bytes, aead: Aead) -> tuple[bytes, bytes]:
    """KeySchedule for mode_base with empty PSK (RFC 9180 §5.1): returns (key, base_nonce)."""
    suite_id = (
        b"HPKE"
        + KEM_ID_P256_SHA256.to_bytes(2, "big")
        + KDF_ID_HKDF_SHA256.to_bytes(2, "big")
        + aead.aead_id.to_bytes(2, "big")
    )
    psk_id_hash = _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite_id, b"", b"info_hash", info)
    context = bytes((MODE_BASE,)) + psk_id_hash + info_hash
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, aead.key_length)
    base_nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, _NN)
    return key, base_nonce


def _check_p256(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise TypeError("HPKE here is DHKEM(P-256): a P-256 public key is required")
    return public_key


def _seal_with_ephemeral(
    ephemeral: ec.EllipticCurvePrivateKey,
    receiver_public: ec.EllipticCurvePublicKey,
    plaintext: bytes,
    *,
    info: bytes,
    aad: bytes,
    aead: Aead,
) -> tuple[bytes, bytes]:
    """Seal with a given ephemeral key. Only :func:`seal` (fresh key) and the RFC test
    vector (fixed key) call this: reusing an ephemeral key would reuse the AEAD key+nonce."""
    receiver_public = _check_p256(receiver_public)
    dh = ephemeral.exchange(ec.ECDH(), receiver_public)
    enc = _point(ephemeral.public_key())
    shared = _shared_secret(dh, enc, _point(receiver_public))
    key, base_nonce = _key_schedule(shared, info, aead)
    # Single shot: sequence number 0, so the nonce is base_nonce itself.
    return enc, AESGCM(key).encrypt(base_nonce, plaintext, aad)


def seal(
    receiver_public: ec.EllipticCurvePublicKey,
    plaintext: bytes,
    *,
    info: bytes,
    aad: bytes,
    aead: Aead = AES_256_GCM,
) -> tuple[bytes, bytes]:
    """Encrypt ``plaintext`` to ``receiver_public``; returns ``(enc, ciphertext)``.

    ``info`` is bound into the key schedule and ``aad`` into the AEAD tag: a ciphertext opens
    only with exactly the same ``info`` and ``aad``.
    """
    receiver_public = _check_p256(receiver_public)
    suite = _PYCA_SUITES.get(aead.aead_id)
    if suite is not None and not aad:
        # cryptography's own single-shot HPKE (RFC 9180 base mode, empty aad): the same
        # bytes as _seal_with_ephemeral for the same ephemeral key (tests/trustcore/test_hpke.py
        # re-derives them), without this module's key schedule in Python.
        sealed = suite.encrypt(plaintext, receiver_public, info)
        return sealed[:ENC_LENGTH], sealed[ENC_LENGTH:]
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    return _seal_with_ephemeral(
        ephemeral, receiver_public, plaintext, info=info, aad=aad, aead=aead
    )


def open_(
    receiver: KeyAgreement,
    enc: bytes,
    ciphertext: bytes,
    *,
    info: bytes,
    aad: bytes,
    aead: Aead = AES_256_GCM,
) -> bytes:
    """Decrypt what :func:`seal` produced for ``receiver``'s public key.

    Every failure of the package itself (malformed or off-curve ``enc``, wrong key, wrong
    ``info``/``aad``, tampered ciphertext) is the same
    ``SealedPackageError(reason="decrypt_failed")``: distinguishing them would only help an
    attacker probing the receiver. Errors of the key backend (e.g. the TPM is unreachable)
    propagate unchanged: an outage must not look like a forged package.
    """
    try:
        if len(enc) != ENC_LENGTH or enc[0] != 0x04:
            raise ValueError("enc is not an uncompressed P-256 point")
        # from_encoded_point checks the point is on the curve (no invalid-curve attacks).
        ephemeral_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(enc))
    except (ValueError, TypeError) as exc:
        raise SealedPackageError("HPKE enc is not a P-256 point", reason="decrypt_failed") from exc
    receiver_public = _check_p256(receiver.public_key())
    dh = receiver.exchange(ephemeral_public)
    shared = _shared_secret(dh, bytes(enc), _point(receiver_public))
    key, base_nonce = _key_schedule(shared, info, aead)
    try:
        return AESGCM(key).decrypt(base_nonce, ciphertext, aad)
    except (InvalidTag, ValueError) as exc:
        raise SealedPackageError("HPKE open failed", reason="decrypt_failed") from exc
