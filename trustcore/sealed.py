"""Sealed packages: signed by their sender, encrypted to exactly one receiver.

Everything that crosses between HQ, a factory and a site (entitlements, audit exports,
site bundles, site reports, revocation lists) travels in this one envelope.

Wire format (deterministic CBOR, see docs/formats.md)::

    package = {"v": 1, "hdr": header, "enc": bstr(65) / null, "ct": bstr, "sig": bstr}
    header  = {"v": 1, "type": tstr, "alg": "hpke-p256-sha256-aes256gcm" / "none",
               "sender": bstr(32), "cert": bstr, "receiver": bstr(32) / null,
               "seq": uint, "created": uint}

Encrypt-then-sign, everything bound:

* HPKE ``info`` = CBOR ``["devtrust/sealed/v1/info", header]`` and AEAD ``aad`` = CBOR
  ``["devtrust/sealed/v1/aad", header]``: a ciphertext cannot be moved under another header
  (other type, sequence number, sender or receiver) even by someone who can re-sign.
* The sender's ECDSA-P256-SHA256 signature covers CBOR
  ``["devtrust/sealed/v1/sig", header, enc, ct]``, so the receiver checks the sender before
  it spends an ECDH (possibly a TPM operation) and a signature on a package can never be
  confused with a signature on another format (domain separation).
* ``alg`` is in the signed header: a signed-only package (``"none"``, for public artifacts
  such as revocation lists) can never be passed off where an encrypted one is expected, nor
  the reverse.

Opening is two-step on purpose: :func:`peek` returns the *unverified* header so the caller
can choose the trust policy (look up the sender, verify its certificate chain with
``trustcore.verify``); :func:`open_package` then verifies and decrypts against the key the
caller decided to trust.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from trustcore import cbor, hpke
from trustcore.errors import (
    X509_PARSE_ERRORS,
    EncodingError,
    InvalidValueError,
    ReplayError,
    SealedPackageError,
)
from trustcore.keys import KeyAgreement, Signer, key_id
from trustcore.x509parse import parsed_certificate

__all__ = [
    "ALG_HPKE",
    "ALG_NONE",
    "DEFAULT_MAX_SIZE",
    "FORMAT_VERSION",
    "OpenedPackage",
    "PackageHeader",
    "ParsedPackage",
    "open_package",
    "parse_package",
    "peek",
    "seal_package",
]

FORMAT_VERSION = 1
ALG_HPKE = "hpke-p256-sha256-aes256gcm"
ALG_NONE = "none"
_DOMAIN_SIG = "devtrust/sealed/v1/sig"
_DOMAIN_INFO = "devtrust/sealed/v1/info"
_DOMAIN_AAD = "devtrust/sealed/v1/aad"
_KEY_ID_LEN = 32
_MAX_CONTENT_TYPE = 128
#: Default size limit for :func:`peek`: room for an audit export of about a million records.
DEFAULT_MAX_SIZE = 256 * 1024 * 1024


#: What loading a hostile sender certificate may raise (a warning is refused too).
_CERT_ERRORS: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS, CryptographyDeprecationWarning)


@dataclass(frozen=True, slots=True)
class PackageHeader:
    """The signed header of a package. From :func:`peek` it is NOT yet verified."""

    content_type: str
    sender_key_id: bytes
    sender_cert_der: bytes
    receiver_key_id: bytes | None  # None for a signed-only (public) package
    sequence: int
    created: int  # unix seconds, as claimed by the sender
    version: int = FORMAT_VERSION

    @property
    def encrypted(self) -> bool:
        return self.receiver_key_id is not None

    def sender_certificate(self) -> x509.Certificate:
        """The embedded sender certificate; the caller verifies its chain."""
        try:
            # A certificate cryptography only warns about (e.g. a non-positive serial,
            # forbidden by RFC 5280) is refused, not half-accepted.
            with warnings.catch_warnings():
                warnings.simplefilter("error", CryptographyDeprecationWarning)
                return parsed_certificate(x509.load_der_x509_certificate(self.sender_cert_der))
        except _CERT_ERRORS as exc:
            raise SealedPackageError(
                "embedded sender certificate is not valid DER", reason="malformed"
            ) from exc

    def to_cbor_map(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "type": self.content_type,
            "alg": ALG_HPKE if self.encrypted else ALG_NONE,
            "sender": self.sender_key_id,
            "cert": self.sender_cert_der,
            "receiver": self.receiver_key_id,
            "seq": self.sequence,
            "created": self.created,
        }


@dataclass(frozen=True, slots=True)
class OpenedPackage:
    """A package whose signature, sender, receiver, type and sequence number all checked out."""

    header: PackageHeader
    payload: bytes


def _sig_input(header: PackageHeader, enc: bytes | None, ct: bytes) -> bytes:
    """What the sender signs: CBOR ``[domain, header, enc, ct]``."""
    return _sig_prefix(header, enc, len(ct)) + ct


def _sig_prefix(header: PackageHeader, enc: bytes | None, ct_length: int) -> bytes:
    """:func:`_sig_input` up to the ciphertext's bytes: the encoding of a list is its head
    and its items' encodings, and an item ``ct`` is ``bytes_head(len(ct)) + ct``
    (tests/trustcore/test_sealed.py checks the equality with ``cbor.encode``)."""
    empty = cbor.encode([_DOMAIN_SIG, header.to_cbor_map(), enc, b""])
    return empty[:-1] + cbor.bytes_head(ct_length)  # drop the empty ct (0x40)


def _sig_digest(header: PackageHeader, enc: bytes | None, ct: bytes) -> bytes:
    """SHA-256 of :func:`_sig_input` without building it: a ciphertext of hundreds of MB is
    hashed in place instead of copied first."""
    digest = hashlib.sha256(_sig_prefix(header, enc, len(ct)))
    digest.update(ct)
    return digest.digest()


def _hpke_info(header: PackageHeader) -> bytes:
    return cbor.encode([_DOMAIN_INFO, header.to_cbor_map()])


def _hpke_aad(header: PackageHeader) -> bytes:
    return cbor.encode([_DOMAIN_AAD, header.to_cbor_map()])


def _is_p256(public_key: object) -> bool:
    return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
        public_key.curve, ec.SECP256R1
    )


def seal_package(
    *,
    content_type: str,
    payload: bytes,
    sender: Signer,
    sender_cert: x509.Certificate,
    receiver_public: ec.EllipticCurvePublicKey | None,
    sequence: int,
    created: int,
) -> bytes:
    """Build a package: HPKE-encrypt ``payload`` to ``receiver_public`` (or leave it in clear
    when that is ``None``, for public artifacts) and sign everything with ``sender``.

    ``sender_cert`` must certify ``sender``'s public key: a package whose certificate does
    not match its signature would be refused by every receiver, so it is refused here.
    """
    if not isinstance(content_type, str) or not 0 < len(content_type) <= _MAX_CONTENT_TYPE:
        raise InvalidValueError(f"content_type must be 1..{_MAX_CONTENT_TYPE} characters")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise InvalidValueError("sequence must be an integer >= 0")
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise InvalidValueError("created must be unix seconds >= 0")
    sender_public = sender.public_key()
    if not _is_p256(sender_public):
        raise InvalidValueError("sender key must be P-256")
    if key_id(sender_public) != _cert_key_id(sender_cert):
        raise InvalidValueError("sender_cert does not certify the sender's key")
    if receiver_public is not None and not _is_p256(receiver_public):
        raise InvalidValueError("receiver key must be P-256")

    header = PackageHeader(
        content_type=content_type,
        sender_key_id=key_id(sender_public),
        sender_cert_der=sender_cert.public_bytes(Encoding.DER),
        receiver_key_id=None if receiver_public is None else key_id(receiver_public),
        sequence=sequence,
        created=created,
    )
    enc: bytes | None
    if receiver_public is None:
        enc, ct = None, bytes(payload)
    else:
        enc, ct = hpke.seal(
            receiver_public,
            bytes(payload),
            info=_hpke_info(header),
            aad=_hpke_aad(header),
            aead=hpke.AES_256_GCM,
        )
    signature = sender.sign(_sig_input(header, enc, ct))
    return cbor.encode(
        {"v": FORMAT_VERSION, "hdr": header.to_cbor_map(), "enc": enc, "ct": ct, "sig": signature}
    )


def _cert_key_id(cert: x509.Certificate) -> bytes | None:
    """Key id of the certified key; None when it is not a usable P-256 key."""
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        return None
    return key_id(public)


@dataclass(frozen=True, slots=True)
class ParsedPackage:
    """A package decoded and well-formed (:func:`parse_package`), NOT verified: what
    :func:`peek` reads the header from, and what :func:`open_package` verifies. Parse a
    large package once and hand this to both (each parse of an audit export copies its
    ~250 MB ciphertext)."""

    header: PackageHeader
    enc: bytes | None
    ct: bytes
    sig: bytes


def parse_package(package: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> ParsedPackage:
    """Decode and structurally validate a package; any defect is ``malformed``
    (``oversized`` over ``max_size``). Nothing is verified."""
    return _parse(package, max_size)


def _parse(package: bytes, max_size: int) -> ParsedPackage:
    """Decode and structurally validate a package; any defect is ``malformed``."""
    try:
        top = cbor.map_of(cbor.decode(package, max_size=max_size), "package")
        cbor.expect_keys(top, {"v", "hdr", "enc", "ct", "sig"}, what="package")
        if cbor.field(top, "v", int) != FORMAT_VERSION:
            raise EncodingError(f"unsupported package version {top['v']!r}")
        hdr = cbor.map_of(top["hdr"], "header")
        cbor.expect_keys(
            hdr, {"v", "type", "alg", "sender", "cert", "receiver", "seq", "created"}, what="header"
        )
        if cbor.field(hdr, "v", int) != FORMAT_VERSION:
            raise EncodingError(f"unsupported header version {hdr['v']!r}")
        content_type = cbor.field(hdr, "type", str)
        if not 0 < len(content_type) <= _MAX_CONTENT_TYPE:
            raise EncodingError("content type length out of range")
        alg = cbor.field(hdr, "alg", str)
        sender = cbor.field(hdr, "sender", bytes, size=_KEY_ID_LEN)
        cert = cbor.field(hdr, "cert", bytes)
        seq = cbor.field(hdr, "seq", int)
        created = cbor.field(hdr, "created", int)
        if seq < 0 or created < 0:
            raise EncodingError("seq and created must be >= 0")
        enc = cbor.optional_field(top, "enc", bytes)
        receiver = cbor.optional_field(hdr, "receiver", bytes)
        if alg == ALG_HPKE:
            if receiver is None or len(receiver) != _KEY_ID_LEN:
                raise EncodingError("encrypted package without a 32-byte receiver key id")
            if enc is None or len(enc) != hpke.ENC_LENGTH:
                raise EncodingError(f"encrypted package needs a {hpke.ENC_LENGTH}-byte enc")
        elif alg == ALG_NONE:
            if receiver is not None or enc is not None:
                raise EncodingError("signed-only package must have null receiver and enc")
        else:
            raise EncodingError(f"unknown alg {alg!r}")
        ct = cbor.field(top, "ct", bytes)
        sig = cbor.field(top, "sig", bytes)
    except EncodingError as exc:
        reason = "oversized" if exc.reason == "oversized" else "malformed"
        raise SealedPackageError(exc.message, reason=reason) from exc
    header = PackageHeader(
        content_type=content_type,
        sender_key_id=sender,
        sender_cert_der=cert,
        receiver_key_id=receiver,
        sequence=seq,
        created=created,
    )
    return ParsedPackage(header=header, enc=enc, ct=ct, sig=sig)


def peek(package: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> PackageHeader:
    """The package's header, decoded and well-formed but NOT verified: use it only to decide
    whom to trust (which sender key, which last sequence number), then call
    :func:`open_package`."""
    return _parse(package, max_size).header


def open_package(
    package: bytes | ParsedPackage,
    *,
    receiver: KeyAgreement | None,
    expected_content_type: str,
    trusted_sender_public: ec.EllipticCurvePublicKey,
    last_sequence: int | None,
    max_size: int,
) -> OpenedPackage:
    """Verify and (when encrypted) decrypt a package.

    Checks, in this order, each refusal a :class:`SealedPackageError` with its own reason:
    ``oversized`` / ``malformed`` (before any crypto), ``wrong_sender`` (the header's sender
    key id is not ``trusted_sender_public``'s), ``bad_signature``, ``wrong_sender`` again
    when the embedded certificate does not certify that key (``malformed`` when it does not
    parse), ``wrong_content_type``, then :class:`ReplayError` (``replayed``) when
    ``sequence <= last_sequence``, ``wrong_receiver`` (encrypted to another key, or encrypted
    when ``receiver`` is None), ``not_encrypted`` (a signed-only package where ``receiver``
    expects a secret), ``decrypt_failed``. ``package`` may be the bytes or what
    :func:`parse_package` made of them (then ``max_size`` was applied there).

    The certificate chain of ``trusted_sender_public`` is the caller's job
    (``trustcore.verify``). The caller must durably record ``header.sequence`` as the new
    ``last_sequence`` once it has acted on the payload.
    """
    parsed = package if isinstance(package, ParsedPackage) else _parse(package, max_size)
    header = parsed.header

    if not _is_p256(trusted_sender_public):
        raise SealedPackageError("trusted sender key is not P-256", reason="wrong_sender")
    trusted_id = key_id(trusted_sender_public)
    if header.sender_key_id != trusted_id:
        raise SealedPackageError(
            "package sender key id is not the trusted sender's", reason="wrong_sender"
        )
    try:
        trusted_sender_public.verify(
            parsed.sig,
            _sig_digest(header, parsed.enc, parsed.ct),
            ec.ECDSA(Prehashed(hashes.SHA256())),
        )
    except InvalidSignature as exc:
        raise SealedPackageError(
            "sender signature does not verify", reason="bad_signature"
        ) from exc
    # Only now parse the (signed) certificate: the chain the caller verifies must certify
    # the very key that signed.
    if _cert_key_id(header.sender_certificate()) != trusted_id:
        raise SealedPackageError(
            "embedded certificate does not certify the trusted sender key", reason="wrong_sender"
        )

    if header.content_type != expected_content_type:
        raise SealedPackageError(
            f"content type {header.content_type!r}, expected {expected_content_type!r}",
            reason="wrong_content_type",
        )
    if last_sequence is not None and header.sequence <= last_sequence:
        raise ReplayError(
            f"sequence {header.sequence} is not newer than the last accepted {last_sequence}"
        )

    if receiver is None:
        if header.encrypted:
            raise SealedPackageError(
                "package is encrypted but no receiver key was given", reason="wrong_receiver"
            )
        return OpenedPackage(header=header, payload=parsed.ct)
    if not header.encrypted:
        raise SealedPackageError(
            "expected a package encrypted to this receiver, got a signed-only one",
            reason="not_encrypted",
        )
    if header.receiver_key_id != key_id(receiver.public_key()):
        raise SealedPackageError(
            "package is encrypted to another receiver", reason="wrong_receiver"
        )
    assert parsed.enc is not None  # guaranteed by _parse for ALG_HPKE
    payload = hpke.open_(
        receiver,
        parsed.enc,
        parsed.ct,
        info=_hpke_info(header),
        aad=_hpke_aad(header),
        aead=hpke.AES_256_GCM,
    )
    return OpenedPackage(header=header, payload=payload)
