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
``AESGCM`` object is built once per key, and sealing is one ``os.urandom`` plus one AEAD call.
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

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_LENGTH:
            raise PayloadError(f"payload key id must be {KEY_ID_LENGTH} bytes")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LENGTH:
            raise PayloadError("payload key must be 32 bytes (AES-256)")
        object.__setattr__(self, "_aead", AESGCM(self.key))

    @classmethod
    def generate(cls, key_id: bytes | None = None) -> PayloadKey:
        """A fresh random key (and a random key id unless one is given)."""
        return cls(key_id if key_id is not None else os.urandom(KEY_ID_LENGTH), os.urandom(32))

    @property
    def aead(self) -> AESGCM:
        return self._aead


def _aad(header: bytes, topic: str) -> bytes:
    try:
        return _AAD_PREFIX + header + topic.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError("topic is not valid UTF-8") from exc


def _seal(key: PayloadKey, topic: str, plaintext: bytes, nonce: bytes) -> bytes:
    head = bytes((PAYLOAD_VERSION,)) + key.key_id
    return head + nonce + key.aead.encrypt(nonce, plaintext, _aad(head, topic))


def seal_payload(key: PayloadKey, topic: str, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` for publication on ``topic`` under ``key``."""
    if len(plaintext) > MAX_ENVELOPE_SIZE - ENVELOPE_OVERHEAD:
        raise PayloadError("payload too large", reason="oversized")
    return _seal(key, topic, plaintext, os.urandom(NONCE_LENGTH))


def envelope_key_id(envelope: bytes) -> bytes:
    """The key id an envelope names (unauthenticated until it opens)."""
    if len(envelope) < ENVELOPE_OVERHEAD or envelope[0] != PAYLOAD_VERSION:
        raise PayloadError("not a payload envelope (version or length)")
    return bytes(envelope[1 : 1 + KEY_ID_LENGTH])


def open_payload(
    keys: PayloadKey | Mapping[bytes, PayloadKey], topic: str, envelope: bytes
) -> bytes:
    """Decrypt an envelope received on ``topic``; ``keys`` is one key or a key-id map."""
    if len(envelope) > MAX_ENVELOPE_SIZE:
        raise PayloadError("envelope too large", reason="oversized")
    kid = envelope_key_id(envelope)
    key = (keys if keys.key_id == kid else None) if isinstance(keys, PayloadKey) else keys.get(kid)
    if key is None:
        raise PayloadError(f"unknown payload key id {kid.hex()}", reason="unknown_key")
    data = bytes(envelope)
    try:
        return key.aead.decrypt(
            data[1 + KEY_ID_LENGTH : _HEADER],
            data[_HEADER:],
            _aad(data[: 1 + KEY_ID_LENGTH], topic),
        )
    except InvalidTag as exc:
        raise PayloadError("payload does not open", reason="decrypt_failed") from exc
