"""Sealed packages: round trips, the docs/formats.md vector, and every refusal."""

from __future__ import annotations

import datetime
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from signers.software import SoftwareKey
from tests.fixtures.docs import doc_vector
from trustcore import cbor, hpke, sealed
from trustcore.errors import InvalidValueError, ReplayError, SealedPackageError
from trustcore.keys import key_id

MAX = 1 << 20


def make_cert(
    key: SoftwareKey, name: str = "sender", *, deterministic: bool = False
) -> x509.Certificate:
    """A minimal self-signed certificate: sealed.py only needs its public key."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key.private_key(), hashes.SHA256(), ecdsa_deterministic=deterministic or None)
    )


class Party:
    def __init__(self, name: str) -> None:
        self.key = SoftwareKey.ephemeral()
        self.cert = make_cert(self.key, name)


@pytest.fixture(scope="module")
def hq() -> Party:
    return Party("hq")


@pytest.fixture(scope="module")
def station() -> Party:
    return Party("station")


@pytest.fixture(scope="module")
def other() -> Party:
    return Party("other")


def seal(
    sender: Party, receiver: Party | None, *, seq: int = 5, ctype: str = "entitlement"
) -> bytes:
    return sealed.seal_package(
        content_type=ctype,
        payload=b"policy: quota=10",
        sender=sender.key,
        sender_cert=sender.cert,
        receiver_public=None if receiver is None else receiver.key.public_key(),
        sequence=seq,
        created=1_700_000_000,
    )


def open_(
    package: bytes | sealed.ParsedPackage,
    sender: Party,
    receiver: Party | None,
    *,
    last: int | None = 4,
    ctype: str = "entitlement",
    max_size: int = MAX,
) -> sealed.OpenedPackage:
    return sealed.open_package(
        package,
        receiver=None if receiver is None else receiver.key,
        expected_content_type=ctype,
        trusted_sender_public=sender.key.public_key(),
        last_sequence=last,
        max_size=max_size,
    )


def reason_of(package: bytes, sender: Party, receiver: Party | None, **kw: object) -> str:
    with pytest.raises(SealedPackageError) as err:
        open_(package, sender, receiver, **kw)  # type: ignore[arg-type]
    return err.value.reason


# -- round trips -----------------------------------------------------------------------------


def test_encrypted_roundtrip(hq: Party, station: Party) -> None:
    package = seal(hq, station)
    opened = open_(package, hq, station)
    assert opened.payload == b"policy: quota=10"
    h = opened.header
    assert h.content_type == "entitlement"
    assert h.sequence == 5
    assert h.created == 1_700_000_000
    assert h.sender_key_id == key_id(hq.key.public_key())
    assert h.receiver_key_id == key_id(station.key.public_key())
    assert h.encrypted
    assert h.sender_certificate() == hq.cert
    assert b"policy" not in package  # the payload really is encrypted


def test_signed_only_roundtrip(hq: Party) -> None:
    package = seal(hq, None, ctype="crl")
    assert b"policy: quota=10" in package
    opened = open_(package, hq, None, ctype="crl", last=None)
    assert opened.payload == b"policy: quota=10"
    assert not opened.header.encrypted
    assert opened.header.receiver_key_id is None


def test_peek_is_unverified_but_well_formed(hq: Party, station: Party) -> None:
    package = seal(hq, station, seq=9)
    header = sealed.peek(package)
    assert header.sequence == 9
    assert header.sender_key_id == key_id(hq.key.public_key())
    with pytest.raises(SealedPackageError) as err:
        sealed.peek(package[:-3])
    assert err.value.reason == "malformed"
    with pytest.raises(SealedPackageError) as err:
        sealed.peek(package, max_size=len(package) - 1)
    assert err.value.reason == "oversized"


# -- the documented test vector ----------------------------------------------------------------

VECTOR_SENDER = "6c0d3d6f1b1f4c3f8f1e0d4ad7e1f0b4c2a6b1e9d3f7a5c8e2b4d6f8a1c3e5b7"
VECTOR_RECEIVER = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988"
VECTOR_EPHEMERAL = "3a5c7e9f1b3d5f7a9c1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a"


def _scalar_key(hex_scalar: str) -> SoftwareKey:
    return SoftwareKey(ec.derive_private_key(int(hex_scalar, 16), ec.SECP256R1()), ephemeral=True)


def build_vector_package(cert: x509.Certificate) -> bytes:
    """Rebuild the documented vector from its fixed inputs: fixed HPKE ephemeral key and
    RFC 6979 deterministic ECDSA make every byte reproducible."""
    sender = _scalar_key(VECTOR_SENDER)
    receiver = _scalar_key(VECTOR_RECEIVER)
    header = sealed.PackageHeader(
        content_type="example",
        sender_key_id=key_id(sender.public_key()),
        sender_cert_der=cert.public_bytes(Encoding.DER),
        receiver_key_id=key_id(receiver.public_key()),
        sequence=1,
        created=1_700_000_000,
    )
    enc, ct = hpke._seal_with_ephemeral(
        ec.derive_private_key(int(VECTOR_EPHEMERAL, 16), ec.SECP256R1()),
        receiver.public_key(),
        b"hello",
        info=sealed._hpke_info(header),
        aad=sealed._hpke_aad(header),
        aead=hpke.AES_256_GCM,
    )
    sig = sender.private_key().sign(
        sealed._sig_input(header, enc, ct), ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    )
    return cbor.encode({"v": 1, "hdr": header.to_cbor_map(), "enc": enc, "ct": ct, "sig": sig})


def test_doc_vector_byte_for_byte() -> None:
    vector = doc_vector("sealed-package")
    header = sealed.peek(vector)
    cert = header.sender_certificate()
    # The embedded certificate itself is deterministic (RFC 6979) from the sender scalar.
    assert cert == make_cert(_scalar_key(VECTOR_SENDER), "example sender", deterministic=True)
    assert build_vector_package(cert) == vector


def test_doc_vector_opens() -> None:
    vector = doc_vector("sealed-package")
    opened = sealed.open_package(
        vector,
        receiver=_scalar_key(VECTOR_RECEIVER),
        expected_content_type="example",
        trusted_sender_public=_scalar_key(VECTOR_SENDER).public_key(),
        last_sequence=0,
        max_size=4096,
    )
    assert opened.payload == b"hello"
    assert opened.header.sequence == 1


def test_a_package_parsed_once_opens_as_its_bytes(hq: Party, station: Party) -> None:
    """``parse_package`` (what HQ does once for a 250 MB audit export) gives ``peek``'s
    header, and ``open_package`` verifies it exactly as it verifies the bytes: a flipped
    ciphertext byte is still ``bad_signature``, a replay still ``replayed``."""
    package = seal(hq, station, seq=9)
    parsed = sealed.parse_package(package, max_size=MAX)
    assert parsed.header == sealed.peek(package)
    assert open_(parsed, hq, station) == open_(package, hq, station)
    flipped = bytearray(package)
    flipped[package.index(parsed.ct) + 3] ^= 1  # inside the ciphertext
    bad = sealed.parse_package(bytes(flipped), max_size=MAX)
    assert bad.ct != parsed.ct
    with pytest.raises(SealedPackageError) as err:
        open_(bad, hq, station)
    assert err.value.reason == "bad_signature"
    with pytest.raises(ReplayError):
        open_(parsed, hq, station, last=9)
    with pytest.raises(SealedPackageError) as err:
        sealed.parse_package(package, max_size=len(package) - 1)
    assert err.value.reason == "oversized"


# -- refusals ------------------------------------------------------------------------------------


def test_every_byte_flip_is_refused(hq: Party, station: Party) -> None:
    package = seal(hq, station)
    open_(package, hq, station)  # the untampered one opens
    for position in range(len(package)):
        for mask in (0x01, 0x80):
            bad = bytearray(package)
            bad[position] ^= mask
            with pytest.raises(SealedPackageError):
                open_(bytes(bad), hq, station)


def test_every_byte_flip_is_refused_signed_only(hq: Party) -> None:
    package = seal(hq, None, ctype="crl")
    for position in range(len(package)):
        bad = bytearray(package)
        bad[position] ^= 0x04
        with pytest.raises(SealedPackageError):
            open_(bytes(bad), hq, None, ctype="crl")


def test_every_truncation_is_malformed(hq: Party, station: Party) -> None:
    package = seal(hq, station)
    for length in range(len(package)):
        assert reason_of(package[:length], hq, station) == "malformed"


def test_trailing_bytes_are_malformed(hq: Party, station: Party) -> None:
    assert reason_of(seal(hq, station) + b"\x00", hq, station) == "malformed"


def test_oversized_refused_before_parsing(hq: Party, station: Party) -> None:
    package = seal(hq, station)
    assert reason_of(package, hq, station, max_size=len(package) - 1) == "oversized"
    assert reason_of(b"\xff" * 100, hq, station, max_size=99) == "oversized"


def test_wrong_receiver(hq: Party, station: Party, other: Party) -> None:
    assert reason_of(seal(hq, station), hq, other) == "wrong_receiver"


def test_receiver_swapped_in_header_breaks_signature(
    hq: Party, station: Party, other: Party
) -> None:
    """An attacker rewrites the receiver key id to the key it holds: the signature fails."""
    top = cbor.decode(seal(hq, station), max_size=MAX)
    top["hdr"]["receiver"] = key_id(other.key.public_key())
    assert reason_of(cbor.encode(top), hq, other) == "bad_signature"


def test_ciphertext_cannot_move_under_another_header(hq: Party, station: Party) -> None:
    """Even the sender's own key re-signing a new header (say, a fresh sequence number) over an
    old ciphertext does not open: HPKE info and aad bind the header."""
    top = cbor.decode(seal(hq, station, seq=5), max_size=MAX)
    top["hdr"]["seq"] = 6
    parsed = sealed._parse(cbor.encode(top), MAX)
    top["sig"] = hq.key.sign(sealed._sig_input(parsed.header, parsed.enc, parsed.ct))
    assert reason_of(cbor.encode(top), hq, station, last=5) == "decrypt_failed"


def test_encrypted_package_without_receiver_key(hq: Party, station: Party) -> None:
    assert reason_of(seal(hq, station), hq, None) == "wrong_receiver"


def test_signed_only_where_secret_expected(hq: Party, station: Party) -> None:
    assert reason_of(seal(hq, None), hq, station) == "not_encrypted"


@pytest.mark.parametrize("last", [5, 6, 100])
def test_replay_of_equal_or_older_sequence(hq: Party, station: Party, last: int) -> None:
    with pytest.raises(ReplayError) as err:
        open_(seal(hq, station, seq=5), hq, station, last=last)
    assert err.value.reason == "replayed"
    assert isinstance(err.value, SealedPackageError)


def test_newer_sequence_and_first_package_accepted(hq: Party, station: Party) -> None:
    assert open_(seal(hq, station, seq=0), hq, station, last=None).header.sequence == 0
    assert open_(seal(hq, station, seq=7), hq, station, last=6).header.sequence == 7


def test_wrong_sender_key(hq: Party, station: Party, other: Party) -> None:
    assert reason_of(seal(other, station), hq, station) == "wrong_sender"


def test_impersonation_with_stolen_cert_is_bad_signature(
    hq: Party, station: Party, other: Party
) -> None:
    """``other`` copies HQ's key id and certificate into its header but can only sign with
    its own key."""
    top = cbor.decode(seal(other, station), max_size=MAX)
    top["hdr"]["sender"] = key_id(hq.key.public_key())
    top["hdr"]["cert"] = hq.cert.public_bytes(Encoding.DER)
    parsed = sealed._parse(cbor.encode(top), MAX)
    top["sig"] = other.key.sign(sealed._sig_input(parsed.header, parsed.enc, parsed.ct))
    assert reason_of(cbor.encode(top), hq, station) == "bad_signature"


def test_embedded_cert_of_another_key_is_wrong_sender(
    hq: Party, station: Party, other: Party
) -> None:
    """Header key id and signature are HQ's, but the embedded certificate is someone else's:
    the chain the caller verified would not be the key that signed."""
    top = cbor.decode(seal(hq, station), max_size=MAX)
    top["hdr"]["cert"] = other.cert.public_bytes(Encoding.DER)
    parsed = sealed._parse(cbor.encode(top), MAX)
    top["sig"] = hq.key.sign(sealed._sig_input(parsed.header, parsed.enc, parsed.ct))
    assert reason_of(cbor.encode(top), hq, station) == "wrong_sender"


def test_wrong_content_type(hq: Party, station: Party) -> None:
    package = seal(hq, station, ctype="site-bundle")
    assert reason_of(package, hq, station, ctype="entitlement") == "wrong_content_type"


def test_unknown_alg_and_inconsistent_fields_are_malformed(hq: Party, station: Party) -> None:
    base = cbor.decode(seal(hq, station), max_size=MAX)
    variants = []
    for key, value in (("alg", "rot13"), ("receiver", None), ("v", 2), ("seq", -1)):
        top = cbor.decode(cbor.encode(base), max_size=MAX)
        top["hdr"][key] = value
        variants.append(top)
    top = cbor.decode(cbor.encode(base), max_size=MAX)
    top["enc"] = None
    variants.append(top)
    top = cbor.decode(cbor.encode(base), max_size=MAX)
    top["extra"] = 1
    variants.append(top)
    for variant in variants:
        assert reason_of(cbor.encode(variant), hq, station) == "malformed"


def test_seal_refuses_bad_arguments(hq: Party, other: Party) -> None:
    kwargs: dict[str, object] = {
        "content_type": "x",
        "payload": b"",
        "sender": hq.key,
        "sender_cert": hq.cert,
        "receiver_public": None,
        "sequence": 0,
        "created": 0,
    }
    for change in (
        {"sender_cert": other.cert},
        {"sequence": -1},
        {"sequence": True},
        {"created": -5},
        {"content_type": ""},
    ):
        with pytest.raises(InvalidValueError):
            sealed.seal_package(**{**kwargs, **change})  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_always_refused_cleanly(data: bytes) -> None:
    sender = Party.__new__(Party)
    sender.key = _scalar_key(VECTOR_SENDER)
    with pytest.raises(SealedPackageError):
        sealed.open_package(
            data,
            receiver=sender.key,
            expected_content_type="x",
            trusted_sender_public=sender.key.public_key(),
            last_sequence=None,
            max_size=1000,
        )


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_mutations_of_a_valid_package_refused(data: st.DataObject) -> None:
    package = bytearray(doc_vector("sealed-package"))
    positions = data.draw(
        st.lists(st.integers(0, len(package) - 1), min_size=1, max_size=4, unique=True)
    )
    for pos in positions:
        package[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(SealedPackageError):
        sealed.open_package(
            bytes(package),
            receiver=_scalar_key(VECTOR_RECEIVER),
            expected_content_type="example",
            trusted_sender_public=_scalar_key(VECTOR_SENDER).public_key(),
            last_sequence=None,
            max_size=4096,
        )


def test_signature_input_is_the_specified_encoding() -> None:
    """The signature covers CBOR ``[domain, header, enc, ct]``; HQ hashes it in pieces
    (a 200 MB ciphertext is not copied), which must be the very same bytes."""
    header = sealed.PackageHeader("t/v1", b"\x01" * 32, b"cert", b"\x02" * 32, 5, 6)
    for ct in (b"", b"x", bytes(23), bytes(24), bytes(70_000)):
        for enc in (None, b"\x04" * 65):
            spec = cbor.encode(["devtrust/sealed/v1/sig", header.to_cbor_map(), enc, ct])
            assert sealed._sig_input(header, enc, ct) == spec
            assert sealed._sig_digest(header, enc, ct) == hashlib.sha256(spec).digest()


def test_large_package_opens_and_a_late_flip_is_refused(hq: Party, station: Party) -> None:
    payload = os.urandom(300_000)
    pkg = sealed.seal_package(
        content_type="entitlement",
        payload=payload,
        sender=hq.key,
        sender_cert=hq.cert,
        receiver_public=station.key.public_key(),
        sequence=5,
        created=1_700_000_000,
    )
    assert open_(pkg, hq, station).payload == payload
    flipped = bytearray(pkg)
    flipped[-1000] ^= 1  # inside the ciphertext
    assert reason_of(bytes(flipped), hq, station) == "bad_signature"
