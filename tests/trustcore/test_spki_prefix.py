"""The prefix check of a P-256 SPKI (trustcore.keys.load_canonical_p256_spki) accepts exactly
what parsing and re-encoding accepted before it."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from trustcore.errors import ProfileError
from trustcore.keys import P256_SPKI_PREFIX, load_canonical_p256_spki, spki_der
from trustcore.profiles import require_p256_public_key

P = 2**256 - 2**224 + 2**192 + 2**96 - 1  # the P-256 field prime


def _by_parsing(der: bytes) -> ec.EllipticCurvePublicKey | None:
    """What the registrar did before: parse, require P-256, compare with the re-encoding."""
    try:
        key = require_p256_public_key(serialization.load_der_public_key(der))
    except (ValueError, TypeError, ProfileError):
        return None
    return key if spki_der(key) == der else None


def _same(der: bytes) -> None:
    fast, slow = load_canonical_p256_spki(der), _by_parsing(der)
    assert (fast is None) == (slow is None)
    if fast is not None and slow is not None:
        assert spki_der(fast) == spki_der(slow) == der


def test_real_keys_are_accepted_alike() -> None:
    for _ in range(50):
        _same(spki_der(ec.generate_private_key(ec.SECP256R1()).public_key()))


def _point_spki(x: int, y: int, tag: int = 4) -> bytes:
    return P256_SPKI_PREFIX + bytes((tag,)) + x.to_bytes(32, "big") + y.to_bytes(32, "big")


@pytest.mark.parametrize(
    "der",
    [
        b"",
        P256_SPKI_PREFIX,
        _point_spki(1, 2),  # not on the curve
        _point_spki(P, 5),  # coordinate outside the field
        _point_spki(P + 1, 5),
        _point_spki(0, 0),
        _point_spki(1, 2, tag=2),  # not the uncompressed form
        spki_der(ec.generate_private_key(ec.SECP384R1()).public_key()),
        spki_der(ed25519.Ed25519PrivateKey.generate().public_key()),
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        + b"\x00",  # trailing byte
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint),
    ],
)
def test_malformed_keys_are_refused_alike(der: bytes) -> None:
    _same(der)
    assert load_canonical_p256_spki(der) is None


def test_a_valid_point_with_x_beyond_the_field_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    numbers = key.public_numbers()
    if numbers.x + P < 2**256:  # the same x mod p, written non-reduced
        _same(_point_spki(numbers.x + P, numbers.y))
        assert load_canonical_p256_spki(_point_spki(numbers.x + P, numbers.y)) is None
    assert load_canonical_p256_spki(_point_spki(numbers.x, numbers.y)) is not None
