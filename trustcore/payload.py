"""The telemetry/command payload envelope: AES-256-GCM with a key id, bound to its topic.

Layout (``docs/formats.md``, "Payload envelope")::

    version (1 byte = 0x01) | key id (8 bytes) | nonce (12 bytes) | ciphertext || tag (16)

The AAD is ``b"devtrust/payload/v1\\x00" || version || key id || topic (UTF-8)``: a payload
moved to another topic (another device's, or ``.../cmd`` instead of ``.../telemetry``) or
relabelled with another key id fails to open. The key id says which site payload key was
used, so keys can rotate while older envelopes are still in flight.

Why a random 96-bit nonce is acceptable: NIST SP 800-38D allows 2**32 random-nonce
messages per key; a site rotates its payload key long before that (``rotate-payload-key``).
No replay protection lives here: replay is a matter of the application (a sequence number
inside the plaintext) and of the broker's access control.

Cost matters (the telemetry bench wants encrypted throughput within 10 % of plain): the
``AESGCM`` object, the 9-byte header and the constant AAD prefix are built once per key, so
sealing is one ``os.urandom``, one topic encode and one AEAD call, and opening is one key
lookup and one AEAD call on slices of the envelope. The nonce stays a fresh ``os.urandom(12)``
per message: a buffered or counter-based nonce would save ~0.3 us but would have to be made
safe against ``fork()`` (a copied buffer or counter reuses nonces, fatal for GCM) and against
many devices sharing one site key, and the measured cost does not justify that risk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustcore.errors import TrustCoreError

__all__ = [
    "ENVELOPE_OVERHEAD",
    "KEY_ID_LENGTH",
    "MAX_ENVELOPE_SIZE",
    "PAYLOAD_VERSION",
    "PayloadError",
    "PayloadKey",
    "envelope_key_id",
    "open_payload",
    "seal_payload",
]

PAYLOAD_VERSION = 1
KEY_ID_LENGTH = 8
NONCE_LENGTH = 12
TAG_LENGTH = 16
KEY_LENGTH = 32
_HEADER = 1 + KEY_ID_LENGTH + NONCE_LENGTH
#: Bytes an envelope adds to its plaintext.
ENVELOPE_OVERHEAD = _HEADER + TAG_LENGTH
#: Largest envelope accepted (MQTT allows 256 MiB; telemetry has no business near that).
MAX_ENVELOPE_SIZE = 1024 * 1024
_AAD_PREFIX = b"devtrust/payload/v1\x00"
_HEADER_KID_END = 1 + KEY_ID_LENGTH
_MAX_PLAINTEXT = MAX_ENVELOPE_SIZE - ENVELOPE_OVERHEAD
_urandom = os.urandom


class PayloadError(TrustCoreError):
    """An envelope was refused: ``malformed``, ``oversized``, ``unknown_key`` or
    ``decrypt_failed`` (wrong key, wrong topic, or tampered: deliberately not told apart)."""

    reason = "malformed"


@dataclass(frozen=True, slots=True)
class PayloadKey:
    """One site payload key: an 8-byte key id and 32 secret bytes (never printed)."""

    key_id: bytes
    key: bytes = field(repr=False)
    _aead: AESGCM = field(init=False, repr=False, compare=False)
    #: ``version || key id``: the envelope's first 9 bytes, precomputed for every seal.
    _head: bytes = field(init=False, repr=False, compare=False)
    #: The constant part of the AAD (``prefix || version || key id``); the topic follows.
    _aad_head: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_LENGTH:
            raise PayloadError(f"payload key id must be {KEY_ID_LENGTH} bytes")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LENGTH:
            raise PayloadError("payload key must be 32 bytes (AES-256)")
        head = bytes((PAYLOAD_VERSION,)) + self.key_id
        object.__setattr__(self, "_aead", AESGCM(self.key))
        object.__setattr__(self, "_head", head)
        object.__setattr__(self, "_aad_head", _AAD_PREFIX + head)

    @classmethod
    def generate(cls, key_id: bytes | None = None) -> PayloadKey:
        """A fresh random key (and a random key id unless one is given)."""
        return cls(key_id if key_id is not None else os.urandom(KEY_ID_LENGTH), os.urandom(32))

    @property
    def aead(self) -> AESGCM:
        return self._aead


def _aad(key: PayloadKey, topic: str) -> bytes:
    """The AAD for ``topic`` under ``key`` (the key's precomputed head plus the topic)."""
    try:
        return key._aad_head + topic.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError("topic is not valid UTF-8") from exc


def _seal(key: PayloadKey, topic: str, plaintext: bytes, nonce: bytes) -> bytes:
    """Seal with a given nonce: only for the documented test vector; callers use
    :func:`seal_payload`, which never lets a nonce be chosen."""
    return key._head + nonce + key._aead.encrypt(nonce, plaintext, _aad(key, topic))


def seal_payload(key: PayloadKey, topic: str, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` for publication on ``topic`` under ``key``."""
    if len(plaintext) > _MAX_PLAINTEXT:
        raise PayloadError("payload too large", reason="oversized")
    nonce = _urandom(NONCE_LENGTH)
    return key._head + nonce + key._aead.encrypt(nonce, plaintext, _aad(key, topic))


def envelope_key_id(envelope: bytes) -> bytes:
    """The key id an envelope names (unauthenticated until it opens)."""
    if len(envelope) < ENVELOPE_OVERHEAD or envelope[0] != PAYLOAD_VERSION:
        raise PayloadError("not a payload envelope (version or length)")
    return bytes(envelope[1:_HEADER_KID_END])


def open_payload(
    keys: PayloadKey | Mapping[bytes, PayloadKey], topic: str, envelope: bytes
) -> bytes:
    """Decrypt an envelope received on ``topic``; ``keys`` is one key or a key-id map.

    The AAD is built from the key that was found (its precomputed head), not from the
    envelope's header: the version and key id have just been checked to equal that key's, so
    they are the same bytes. A mapping that files a key under another key id is refused as
    ``unknown_key`` (fail closed) rather than trusted.
    """
    size = len(envelope)
    if size > MAX_ENVELOPE_SIZE:
        raise PayloadError("envelope too large", reason="oversized")
    if size < ENVELOPE_OVERHEAD or envelope[0] != PAYLOAD_VERSION:
        raise PayloadError("not a payload envelope (version or length)")
    data = bytes(envelope)  # no copy for bytes; pins a bytearray/memoryview before use
    kid = data[1:_HEADER_KID_END]
    key = keys if isinstance(keys, PayloadKey) else keys.get(kid)
    if key is None or key.key_id != kid:
        raise PayloadError(f"unknown payload key id {kid.hex()}", reason="unknown_key")
    try:
        return key._aead.decrypt(data[_HEADER_KID_END:_HEADER], data[_HEADER:], _aad(key, topic))
    except InvalidTag as exc:
        raise PayloadError("payload does not open", reason="decrypt_failed") from exc
