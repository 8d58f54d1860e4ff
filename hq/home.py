"""The HQ directory: configuration, certificates, the encrypted keystore and the database.

Layout (see ``docs/hq.md``)::

    HOME/
      hq.json                          organisation and where the root key lives
      certs/root-ca.pem                manufacturer root CA certificate
      certs/<role>.pem                 entitlement-signer, audit-receiver, revocation-signer
      keys/root-ca.key.pem             root key (software backend only), PKCS#8 encrypted
      keys/<role>.key.pem              HQ role keys, PKCS#8 encrypted, mode 0600
      keys/kms.key.pem                 payload-key KMS key (hq/kms.py), PKCS#8 encrypted
      hq.sqlite                        stations, entitlements, audit heads, devices, sites
                                       (or a PostgreSQL database: ``"store"`` in hq.json)

Secrets never come from the command line (``ps`` and shell history would show them): the
keystore passphrase comes from ``DEVTRUST_HQ_PASSPHRASE`` or a passphrase file, the token
PIN from ``DEVTRUST_HQ_PIN`` or a PIN file. The files HQ hands out (packages, bundles, CRLs)
are written by :func:`write_package`: never over an existing file, atomically, mode 0600.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hq.errors import HomeError, SecretError
from hq.store.location import StoreLocation, parse_store_location
from signers.errors import KeystoreError, SignerError
from signers.private_files import private_home, write_private_file
from signers.software import SoftwareKey, passphrase_from
from trustcore.keys import Signer
from trustcore.profiles import HqRole

__all__ = [
    "CONFIG_VERSION",
    "PASSPHRASE_ENV",
    "PIN_ENV",
    "HqConfig",
    "HqHome",
    "HqQuorumConfig",
    "HqSecrets",
    "Pkcs11Location",
    "read_secret",
    "write_package",
]

PASSPHRASE_ENV = "DEVTRUST_HQ_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
PIN_ENV = "DEVTRUST_HQ_PIN"
CONFIG_VERSION = 1
ROOT_NAME = "root-ca"


@dataclass(frozen=True)
class HqSecrets:
    """Where the keystore passphrase and the token PIN come from (files win over env)."""

    passphrase_file: Path | None = None
    pin_file: Path | None = None

    def passphrase(self) -> bytes:
        return read_secret(self.passphrase_file, PASSPHRASE_ENV, "keystore passphrase")

    def pin(self) -> bytes:
        return read_secret(self.pin_file, PIN_ENV, "token PIN")


def read_secret(path: Path | None, env: str, what: str) -> bytes:
    """A passphrase or PIN from ``path`` if given, else from the environment variable
    ``env``; ``SecretError("no <what>: …")`` if neither holds one."""
    try:
        return passphrase_from(path, env)
    except SignerError as exc:
        raise SecretError(f"no {what}: {exc}") from exc


@dataclass(frozen=True)
class Pkcs11Location:
    """A root key in a PKCS#11 token: module path, token label, key label."""

    module: str
    token: str
    label: str


@dataclass(frozen=True)
class HqQuorumConfig:
    """The optional ``"quorum"`` section of ``hq.json`` (see ``docs/quorum.md``).

    ``m`` approvals of the HQ approver set authorise a gated operation. Station CA
    revocation and adding an approver (once the set is non-empty) are always gated; an
    entitlement is gated when its quota exceeds ``entitlement_quota_above``; site bundles
    (which carry payload keys) when ``export_payload_key`` is true; a station CA re-key
    (``hq renew-station`` of a re-key request) when ``station_rekey`` is true.
    """

    m: int = 2
    entitlement_quota_above: int | None = None
    export_payload_key: bool = False
    request_lifetime_s: int = 86400
    station_rekey: bool = False

    _KEYS = frozenset(
        {"m", "entitlement_quota_above", "export_payload_key", "request_lifetime_s",
         "station_rekey"}
    )  # fmt: skip

    def __post_init__(self) -> None:
        if type(self.m) is not int or self.m < 1:
            raise ValueError("quorum.m must be an integer >= 1")
        q = self.entitlement_quota_above
        if q is not None and (type(q) is not int or q < 0):
            raise ValueError("quorum.entitlement_quota_above must be null or an integer >= 0")
        if type(self.export_payload_key) is not bool:
            raise ValueError("quorum.export_payload_key must be true or false")
        if type(self.station_rekey) is not bool:
            raise ValueError("quorum.station_rekey must be true or false")
        if type(self.request_lifetime_s) is not int or not 60 <= self.request_lifetime_s <= (
            30 * 86400
        ):
            raise ValueError("quorum.request_lifetime_s must be 60..2592000")

    def to_map(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in sorted(self._KEYS)}

    @classmethod
    def from_map(cls, data: Any) -> HqQuorumConfig:
        if not isinstance(data, dict) or not set(data) <= cls._KEYS:
            raise ValueError(f"quorum must be a map with keys from {sorted(cls._KEYS)}")
        return cls(**data)


@dataclass(frozen=True)
class HqConfig:
    """``hq.json``: strict (unknown or missing keys are errors)."""

    organization: str
    root_pkcs11: Pkcs11Location | None
    created: int
    version: int = CONFIG_VERSION
    quorum: HqQuorumConfig | None = None
    #: The HQ database when it is not ``hq.sqlite`` in the HQ directory: a PostgreSQL URL
    #: (without a password, see :func:`hq.store.parse_store_location`).
    store: str | None = None

    def __post_init__(self) -> None:
        if self.store is not None:
            parse_store_location(self.store)

    def to_json(self) -> str:
        root: dict[str, Any] = {"backend": "software"}
        if self.root_pkcs11 is not None:
            root = {
                "backend": "pkcs11",
                "module": self.root_pkcs11.module,
                "token": self.root_pkcs11.token,
                "label": self.root_pkcs11.label,
            }
        data = {
            "version": self.version,
            "organization": self.organization,
            "created": self.created,
            "root_key": root,
        }
        if self.quorum is not None:
            data["quorum"] = self.quorum.to_map()
        if self.store is not None:
            data["store"] = self.store
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HqConfig:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or set(data) - {"quorum", "store"} != {
                "version",
                "organization",
                "created",
                "root_key",
            }:
                raise ValueError("unexpected keys")
            quorum = HqQuorumConfig.from_map(data["quorum"]) if "quorum" in data else None
            if data["version"] != CONFIG_VERSION:
                raise ValueError(f"unsupported version {data['version']!r}")
            root = data["root_key"]
            location: Pkcs11Location | None = None
            if root == {"backend": "software"}:
                pass
            elif isinstance(root, dict) and set(root) == {"backend", "module", "token", "label"}:
                if root["backend"] != "pkcs11":
                    raise ValueError(f"unknown root key backend {root['backend']!r}")
                location = Pkcs11Location(
                    str(root["module"]), str(root["token"]), str(root["label"])
                )
            else:
                raise ValueError("bad root_key")
            organization, created = data["organization"], data["created"]
            if not isinstance(organization, str) or type(created) is not int:
                raise ValueError("bad organization or created")
            store = data.get("store")
            if store is not None and not isinstance(store, str):
                raise ValueError("store must be a URL string")
        except (ValueError, TypeError) as exc:
            raise HomeError(f"hq.json is invalid: {exc}") from exc
        try:
            return cls(
                organization=organization,
                root_pkcs11=location,
                created=created,
                quorum=quorum,
                store=store,
            )
        except HomeError as exc:
            raise HomeError(f"hq.json is invalid: {exc.message}") from exc


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise HomeError(f"cannot read certificate {path}: {exc}") from exc


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class HqHome:
    """An initialised HQ directory. Open with :meth:`open`; create with ``hq.authority``."""

    def __init__(self, path: Path, config: HqConfig) -> None:
        self.path = path
        self.config = config

    # -- layout -----------------------------------------------------------------------------

    @staticmethod
    def config_path_of(path: Path) -> Path:
        return path / "hq.json"

    @property
    def certs_dir(self) -> Path:
        return self.path / "certs"

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def db_path(self) -> Path:
        return self.path / "hq.sqlite"

    @property
    def store_location(self) -> StoreLocation:
        """Where this HQ's database is: ``hq.json``'s ``store``, else ``hq.sqlite`` here."""
        if self.config.store is None:
            return StoreLocation("sqlite", path=self.db_path)
        return parse_store_location(self.config.store)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str) -> HqHome:
        home = Path(path)
        cfg = cls.config_path_of(home)
        if not cfg.is_file():
            raise HomeError(f"{home} is not an HQ directory (no hq.json); run `hq init` first")
        try:
            private_home(home)  # 0700/0600 whatever made the files (docs/security: modes)
        except KeystoreError as exc:
            raise HomeError(str(exc)) from exc
        try:
            text = cfg.read_text(encoding="utf-8")
        except OSError as exc:
            raise HomeError(f"cannot read {cfg}: {exc}") from exc
        return cls(home, HqConfig.from_json(text))

    # -- certificates and keys --------------------------------------------------------------

    def root_certificate(self) -> x509.Certificate:
        return _load_cert(self.certs_dir / f"{ROOT_NAME}.pem")

    def role_certificate(self, role: HqRole) -> x509.Certificate:
        return _load_cert(self.certs_dir / f"{role.value}.pem")

    def role_key(self, role: HqRole, secrets: HqSecrets) -> SoftwareKey:
        """Decrypt one role key; its public key must match the role certificate."""
        path = self.keys_dir / f"{role.value}.key.pem"
        try:
            key = SoftwareKey.load(path, secrets.passphrase())
        except SignerError as exc:
            raise SecretError(f"cannot open the {role.value} key: {exc}") from exc
        if key.public_key() != self.role_certificate(role).public_key():
            raise HomeError(f"{path} does not match certs/{role.value}.pem")
        return key

    @contextmanager
    def root_key(self, secrets: HqSecrets) -> Iterator[Signer]:
        """The root CA key for the duration of the ``with`` block (a token session is logged
        out at the end). Its public key must match the root certificate."""
        root_public = self.root_certificate().public_key()
        location = self.config.root_pkcs11
        if location is None:
            try:
                key = SoftwareKey.load(self.keys_dir / f"{ROOT_NAME}.key.pem", secrets.passphrase())
            except SignerError as exc:
                raise SecretError(f"cannot open the root CA key: {exc}") from exc
            if key.public_key() != root_public:
                raise HomeError("keys/root-ca.key.pem does not match certs/root-ca.pem")
            yield key
            return
        from signers.pkcs11 import Pkcs11Key  # loaded only when a token is configured

        try:
            token_key = Pkcs11Key.open(
                location.module, location.token, location.label, secrets.pin()
            )
        except SignerError as exc:
            raise SecretError(f"cannot open the root CA key in the token: {exc}") from exc
        try:
            if token_key.public_key() != root_public:
                raise HomeError(f"token key {location.label!r} does not match certs/root-ca.pem")
            yield token_key
        finally:
            token_key.close()


def write_package(path: Path, data: bytes) -> None:
    """Write an output file without replacing an existing one (atomic, 0600: it is sealed,
    but there is no reason to let others copy it)."""
    try:
        write_private_file(path, data)
    except SignerError as exc:  # the output's directory (a USB stick): full, read-only, …
        raise HomeError(str(exc), reason="output_not_written") from exc
