"""The site's AES payload keys: encrypted at rest, decrypted only in memory.

File ``payload-keys.cbor`` (deterministic CBOR, written atomically with mode 0600)::

    {"v": 1, "current": h'<key id>',
     "keys": [{"key_id": h'..', "created": <unix s>, "enc": h'..', "ct": h'..'}, ...]}

Each key is HPKE-sealed (:mod:`trustcore.hpke`) to the site's *transport key*, a
:class:`~trustcore.keys.KeyAgreement` that is a TPM ECDH key or a software key from the
encrypted keystore. ``info`` binds the key id, so a sealed key cannot be relabelled as
another key id. Without the transport key the file is useless; the plaintext keys exist
only in the registrar's memory (:class:`PayloadKeyring`).

Rotation (:meth:`PayloadKeyStore.rotate`) adds a fresh random key with a new random key id
and makes it current; older keys stay so that envelopes already in flight still open, and
devices that have not yet received the new key keep working until they do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from registrar.errors import ConfigError
from signers.private_files import write_private_file
from trustcore import cbor
from trustcore.errors import EncodingError, SealedPackageError
from trustcore.hpke import open_, seal
from trustcore.keys import KeyAgreement
from trustcore.payload import KEY_ID_LENGTH, PayloadKey
from trustcore.utctime import system_clock, to_unix

__all__ = ["PayloadKeyStore", "PayloadKeyring", "listed_key_ids"]

_AT_REST_INFO = "devtrust/payload-key-at-rest/v1"
_MAX_FILE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PayloadKeyring:
    """Decrypted keys in memory: ``current`` wraps new registrations; ``keys`` opens any."""

    current: PayloadKey
    keys: Mapping[bytes, PayloadKey]


def _info(kid: bytes) -> bytes:
    return cbor.encode([_AT_REST_INFO, kid])


def _read_file(path: Path) -> tuple[bytes | None, list[dict[str, object]]]:
    if not path.exists():
        return None, []
    try:
        doc = cbor.map_of(cbor.decode(path.read_bytes(), max_size=_MAX_FILE), "keys")
        cbor.expect_keys(doc, {"v", "current", "keys"}, what="payload key file")
        if cbor.field(doc, "v", int) != 1:
            raise EncodingError("unknown payload key file version")
        current = cbor.field(doc, "current", bytes, size=KEY_ID_LENGTH)
        entries = [cbor.map_of(e, "key entry") for e in cbor.field(doc, "keys", list)]
    except (EncodingError, OSError) as exc:
        raise ConfigError(f"payload key file {path} is unreadable: {exc}") from exc
    return current, entries


def listed_key_ids(path: Path | str) -> tuple[bytes | None, list[bytes]]:
    """The current key id and every stored key id, read without decrypting anything (key
    ids are not secret): for ``registrar status`` without the site passphrase."""
    current, entries = _read_file(Path(path))
    ids = [e["key_id"] for e in entries if isinstance(e.get("key_id"), bytes)]
    return current, [bytes(i) for i in ids if isinstance(i, bytes)]


class PayloadKeyStore:
    def __init__(self, path: Path | str, transport: KeyAgreement) -> None:
        self.path = Path(path)
        self._transport = transport

    def exists(self) -> bool:
        return self.path.exists()

    def _read(self) -> tuple[bytes | None, list[dict[str, object]]]:
        return _read_file(self.path)

    def load(self) -> PayloadKeyring:
        """Decrypt every key with the transport key (``ConfigError`` if any fails)."""
        current, entries = self._read()
        if current is None:
            raise ConfigError(f"no payload keys at {self.path} (commission the site first)")
        keys: dict[bytes, PayloadKey] = {}
        for entry in entries:
            try:
                cbor.expect_keys(entry, {"key_id", "created", "enc", "ct"}, what="key entry")
                kid = cbor.field(entry, "key_id", bytes, size=KEY_ID_LENGTH)
                secret = open_(
                    self._transport,
                    cbor.field(entry, "enc", bytes),
                    cbor.field(entry, "ct", bytes),
                    info=_info(kid),
                    aad=b"",
                )
            except (EncodingError, SealedPackageError) as exc:
                raise ConfigError(
                    f"payload key in {self.path} does not open: {exc.message}"
                ) from exc
            keys[kid] = PayloadKey(kid, secret)
        if current not in keys:
            raise ConfigError("current payload key id is not among the stored keys")
        return PayloadKeyring(keys[current], keys)

    def add(self, key: PayloadKey, *, make_current: bool = True) -> PayloadKeyring:
        """Seal ``key`` to the transport key and store it (e.g. a key from the HQ bundle)."""
        current, entries = self._read()
        if any(e.get("key_id") == key.key_id for e in entries):
            raise ConfigError(f"payload key id {key.key_id.hex()} already stored")
        enc, ct = seal(self._transport.public_key(), key.key, info=_info(key.key_id), aad=b"")
        entries.append(
            {"key_id": key.key_id, "created": to_unix(system_clock()), "enc": enc, "ct": ct}
        )
        new_current = key.key_id if make_current or current is None else current
        doc = {"v": 1, "current": new_current, "keys": entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(self.path, cbor.encode(doc), overwrite=True)
        return self.load()

    def rotate(self) -> PayloadKeyring:
        """A new random key (new random key id) becomes current."""
        return self.add(PayloadKey.generate())
