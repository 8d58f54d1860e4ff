"""The HQ payload-key KMS: one AES-256 payload key set per site, sealed at rest.

Every site payload key (8-byte key id + 32 random bytes, ``trustcore.payload.PayloadKey``)
is HPKE-sealed to the HQ **KMS key** (``keys/kms.key.pem``, a P-256 ECDH key in the HQ
encrypted keystore) the moment it is generated; only the sealed form reaches the database.
HPKE ``info`` = CBOR ``["devtrust/hq-kms/payload-key/v1", site_id, key_id]``: a sealed key
cannot be moved to another site's row or relabelled with another key id. The plaintext
exists only in memory, while a site bundle re-seals it to the site's transport key.

Quorum approval of payload-key export is a later issue; today the keystore passphrase is
the only gate.
"""

from __future__ import annotations

from pathlib import Path

from hq.errors import HomeError, SecretError
from hq.home import HqHome, HqSecrets
from hq.store import HqStore, StoredPayloadKey
from signers.errors import SignerError
from signers.software import SoftwareKey
from trustcore import cbor, hpke
from trustcore.errors import SealedPackageError
from trustcore.payload import PayloadKey
from trustcore.utctime import now_unix

__all__ = [
    "KMS_KEY_NAME",
    "ensure_site_payload_key",
    "init_kms",
    "kms_key",
    "kms_key_path",
    "open_payload_key",
    "site_payload_keys",
]

KMS_KEY_NAME = "kms"
_INFO_DOMAIN = "devtrust/hq-kms/payload-key/v1"


def kms_key_path(home_path: Path) -> Path:
    return home_path / "keys" / f"{KMS_KEY_NAME}.key.pem"


def init_kms(home: HqHome, secrets: HqSecrets) -> bool:
    """Create the KMS key of an HQ made before the KMS existed; False if it already has one."""
    path = kms_key_path(home.path)
    if path.exists():
        return False
    try:
        SoftwareKey.generate().save(path, secrets.passphrase())
    except SignerError as exc:
        raise HomeError(f"cannot create {path}: {exc}") from exc
    return True


def kms_key(home: HqHome, secrets: HqSecrets) -> SoftwareKey:
    """Open the KMS key. An HQ initialised before the KMS existed has none: that is a clear
    error (run ``hq init-kms``), never a silent fallback to storing keys some other way."""
    path = kms_key_path(home.path)
    if not path.exists():
        raise HomeError(
            f"this HQ has no payload-key KMS key ({path} is missing; the HQ was created "
            "before sites existed): run `hq init-kms --home ...` once, then retry"
        )
    try:
        return SoftwareKey.load(path, secrets.passphrase())
    except SignerError as exc:
        raise SecretError(f"cannot open the KMS key: {exc}") from exc


def _info(site_id: str, kid: bytes) -> bytes:
    return cbor.encode([_INFO_DOMAIN, site_id, kid])


def open_payload_key(kms: SoftwareKey, stored: StoredPayloadKey) -> PayloadKey:
    try:
        secret = hpke.open_(
            kms, stored.enc, stored.ct, info=_info(stored.site_id, stored.key_id), aad=b""
        )
    except SealedPackageError as exc:
        raise HomeError(
            f"payload key {stored.key_id.hex()} of site {stored.site_id} does not open with "
            "the KMS key (database and keystore do not belong together?)"
        ) from exc
    return PayloadKey(stored.key_id, secret)


def _new_key(kms: SoftwareKey, site_id: str, now: int) -> StoredPayloadKey:
    key = PayloadKey.generate()
    enc, ct = hpke.seal(kms.public_key(), key.key, info=_info(site_id, key.key_id), aad=b"")
    return StoredPayloadKey(site_id, key.key_id, now, enc, ct, True)


def ensure_site_payload_key(
    store: HqStore, kms: SoftwareKey, site_id: str, *, rotate: bool = False, now: int | None = None
) -> StoredPayloadKey | None:
    """Give the site a current payload key if it has none (or a new one when ``rotate``);
    return the key created, if any. Call inside a transaction."""
    existing = store.payload_keys(site_id)
    if existing and not rotate:
        return None
    created = _new_key(kms, site_id, now_unix(now))
    store.put_payload_key(created)
    return created


def site_payload_keys(
    store: HqStore, kms: SoftwareKey, site_id: str
) -> tuple[list[PayloadKey], bytes]:
    """All payload keys of a site, opened in memory, and the current key id."""
    stored = store.payload_keys(site_id)
    current = [s.key_id for s in stored if s.current]
    if len(current) != 1:
        raise HomeError(f"site {site_id} has {len(current)} current payload keys, expected 1")
    return [open_payload_key(kms, s) for s in stored], current[0]
