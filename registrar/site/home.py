"""The site home: its directory, ``site.json`` (:class:`SiteConfig`), the keystore
passphrase (:class:`SiteSecrets`), the cross-process revocation lock, which site CA key
issues, and creating (``registrar init``) and configuring a site. Layout: see
:mod:`registrar.site`."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from registrar.errors import ConfigError
from signers.errors import SignerError
from signers.private_files import new_home, private_home, require_empty_home, write_private_file
from signers.software import SoftwareKey, passphrase_from
from trustcore.csr import build_csr
from trustcore.errors import InvalidValueError
from trustcore.identity import SiteId
from trustcore.key_rotation import DEFAULT_GRACE_S, MAX_GRACE_S
from trustcore.keys import key_id
from trustcore.messages import SiteEnrolment
from trustcore.utctime import now_utc

__all__ = [
    "BACKDATE",
    "CONFIG_VERSION",
    "PASSPHRASE_ENV",
    "SERVICE_CERT_VALIDITY",
    "SITE_CA_KEY",
    "SITE_CRL_VALIDITY",
    "SiteConfig",
    "SiteHome",
    "SiteInitResult",
    "SiteSecrets",
    "configure_site",
    "current_cert",
    "exclusive_lock",
    "init_site",
    "issuing_ca_key",
    "pem",
    "revocation_lock",
]


PASSPHRASE_ENV = "DEVTRUST_SITE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
CONFIG_VERSION = 1
#: The site CA CRL is signed by the registrar itself; ``registrar run`` re-issues it well
#: before this runs out (an expired CRL makes the brokers refuse every operational client).
SITE_CRL_VALIDITY = timedelta(days=7)
#: Broker and registrar client certificates: re-issued at every commission.
SERVICE_CERT_VALIDITY = timedelta(days=365)
BACKDATE = timedelta(minutes=5)
#: Keystore name of the first site CA key (``registrar init``); later keys are named by
#: ``registrar rollover-ca`` and recorded in ``commission.json``.
SITE_CA_KEY = "site-ca"


def pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM (the site state's certificate files)."""
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SiteSecrets:
    """Where the site keystore passphrase comes from (a file wins over the environment)."""

    passphrase_file: Path | None = None

    def passphrase(self) -> bytes:
        try:
            return passphrase_from(self.passphrase_file, PASSPHRASE_ENV)
        except SignerError as exc:
            raise ConfigError(f"no site keystore passphrase: {exc}", reason="no_secret") from exc


@dataclass(frozen=True)
class SiteConfig:
    """``site.json``: strict (unknown or missing keys are errors; ``payload_key_grace_s``
    may be absent in files written before it existed: 7 days)."""

    site_id: SiteId
    organization: str
    created: int
    broker_names: tuple[str, ...]
    broker_ips: tuple[str, ...]
    version: int = CONFIG_VERSION
    #: Telemetry under a payload key is accepted this long after the key was superseded.
    payload_key_grace_s: int = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        if type(self.payload_key_grace_s) is not int or not (
            0 <= self.payload_key_grace_s <= MAX_GRACE_S
        ):
            raise ConfigError(f"payload_key_grace_s must be 0..{MAX_GRACE_S} seconds")

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "site_id": self.site_id.value,
            "organization": self.organization,
            "created": self.created,
            "broker_names": list(self.broker_names),
            "broker_ips": list(self.broker_ips),
            "payload_key_grace_s": self.payload_key_grace_s,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SiteConfig:
        try:
            data = json.loads(text)
            keys = {"version", "site_id", "organization", "created", "broker_names", "broker_ips"}
            optional = {"payload_key_grace_s"}
            if not isinstance(data, dict) or not keys <= set(data) <= keys | optional:
                raise ValueError("unexpected keys")
            if data["version"] != CONFIG_VERSION:
                raise ValueError(f"unsupported version {data['version']!r}")
            names, ips = data["broker_names"], data["broker_ips"]
            if not all(isinstance(n, str) for n in [*names, *ips]):
                raise ValueError("broker names and addresses must be strings")
            if not isinstance(data["organization"], str) or type(data["created"]) is not int:
                raise ValueError("bad organization or created")
            return cls(
                SiteId(data["site_id"]),
                data["organization"],
                data["created"],
                tuple(names),
                tuple(ips),
                payload_key_grace_s=data.get("payload_key_grace_s", DEFAULT_GRACE_S),
            )
        except (ValueError, TypeError, InvalidValueError) as exc:
            raise ConfigError(f"site.json is invalid: {exc}") from exc


class SiteHome:
    """An initialised site directory (create with :func:`init_site`)."""

    def __init__(self, path: Path, config: SiteConfig) -> None:
        self.path = path
        self.config = config

    @classmethod
    def open(cls, path: Path | str) -> SiteHome:
        home = Path(path)
        cfg = home / "site.json"
        if not cfg.is_file():
            raise ConfigError(
                f"{home} is not a site directory (no site.json): run `registrar init`"
            )
        try:
            private_home(home)  # 0700/0600 whatever made the files
        except SignerError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            text = cfg.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {cfg}: {exc}") from exc
        return cls(home, SiteConfig.from_json(text))

    # -- layout
    @property
    def site_id(self) -> SiteId:
        return self.config.site_id

    @property
    def root_path(self) -> Path:
        return self.path / "certs" / "root-ca.pem"

    def key_path(self, name: str) -> Path:
        return self.path / "keys" / f"{name}.key.pem"

    @property
    def enrolment_path(self) -> Path:
        return self.path / "enrolment.cbor"

    @property
    def current(self) -> Path:
        """The commissioned state directory (through the ``current`` symlink)."""
        return self.path / "current"

    @property
    def commissioned(self) -> bool:
        return (self.current / "commission.json").is_file()

    @property
    def payload_keys_path(self) -> Path:
        return self.current / "payload-keys.cbor"

    # -- content
    def root_certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.root_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the pinned root {self.root_path}: {exc}") from exc

    def key(self, name: str, secrets: SiteSecrets) -> SoftwareKey:
        try:
            return SoftwareKey.load(self.key_path(name), secrets.passphrase())
        except SignerError as exc:
            raise ConfigError(f"cannot open the {name} key: {exc}", reason="bad_secret") from exc

    @property
    def rollover_path(self) -> Path:
        """``rollover.json``: a site CA rollover begun and not yet activated."""
        return self.path / "rollover.json"

    def pending_rollover_key(self) -> str | None:
        """The keystore name of the next site CA key of a rollover in progress, if any."""
        if not self.rollover_path.is_file():
            return None
        try:
            data = json.loads(self.rollover_path.read_text(encoding="utf-8"))
            name = data["key"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.rollover_path} is unreadable: {exc}") from exc
        if not isinstance(name, str) or not name.startswith(SITE_CA_KEY):
            raise ConfigError(f"{self.rollover_path} names no site CA key")
        return name

    def ca_key_names(self) -> tuple[str, str | None]:
        """(issuing, retiring) site CA keystore names of the commissioned state."""
        state = self.commission_state() or {}
        issuing = state.get("site_ca_key", SITE_CA_KEY)
        retiring = state.get("retiring_ca_key")
        if not isinstance(issuing, str) or not (retiring is None or isinstance(retiring, str)):
            raise ConfigError("commission.json names no usable site CA key")
        return issuing, retiring

    def commission_state(self) -> dict[str, Any] | None:
        path = self.current / "commission.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a JSON object")
        return data


@contextlib.contextmanager
def revocation_lock(home: SiteHome) -> Iterator[None]:
    """Exclusive lock (``SITE/revocation.lock``, ``flock``) around every read-modify-write
    of the site CRL, the revocation list and the payload-key file, across processes
    (commissioning, rollover, ``registrar revoke`` / ``import-revocations`` and the running
    registrar's refresh). Here, beside :class:`SiteHome`, so every writer of the site
    state reaches it without importing :mod:`registrar.revocation`."""
    with exclusive_lock(home.path / "revocation.lock"):
        yield


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block, waiting for
    it: the one cross-process lock of the site's read-modify-write files."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def issuing_ca_key(home: SiteHome, secrets: SiteSecrets) -> SoftwareKey:
    """THE current issuing site CA key (the one state-wide answer to "which CA signs new
    LDevIDs, the broker and registrar certificates, site CRLs and site reports"); its
    certificate is ``current/site-ca.pem``. Changes only when a rollover is activated."""
    return home.key(home.ca_key_names()[0], secrets)


def current_cert(home: SiteHome, name: str) -> x509.Certificate:
    """A certificate file of the commissioned state (``ConfigError`` if damaged)."""
    path = home.current / name
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the commissioned state is damaged ({path}): {exc}") from exc


# ----------------------------------------------------------------------------------- init


@dataclass(frozen=True)
class SiteInitResult:
    home: Path
    site_id: str
    enrolment_path: Path
    ca_key_id: str
    transport_key_id: str
    root_sha256: str  # compare with HQ's root fingerprint out of band


def _check_root(data: bytes) -> x509.Certificate:
    try:
        root = x509.load_pem_x509_certificate(data)
        root.verify_directly_issued_by(root)
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    except Exception as exc:  # any parse/verify failure: not a usable root
        raise ConfigError(f"--root is not a self-signed CA certificate: {exc}") from exc
    if not bc.ca:
        raise ConfigError("--root is not a CA certificate")
    return root


def init_site(
    home: Path | str,
    *,
    site_id: str,
    root_pem: bytes,
    secrets: SiteSecrets,
    organization: str = "",
    broker_names: tuple[str, ...] = ("localhost",),
    broker_ips: tuple[str, ...] = ("127.0.0.1",),
    now: datetime | None = None,
    payload_key_grace_s: int = DEFAULT_GRACE_S,
) -> SiteInitResult:
    """Create a site home: pin the root, make the site CA and transport keys (encrypted
    keystore) and write the enrolment request. Never overwrites; all-or-nothing (built in a
    sibling directory and renamed into place)."""
    target = Path(home)
    try:
        sid = SiteId(site_id)
    except InvalidValueError as exc:
        raise ConfigError(exc.message) from exc
    root = _check_root(root_pem)
    root_orgs = root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org = organization or (str(root_orgs[0].value) if root_orgs else site_id)
    if not isinstance(org, str) or not org.isprintable() or len(org) > 64:
        raise ConfigError("organisation must be 1..64 printable characters")
    if not broker_names and not broker_ips:
        raise ConfigError("the broker needs at least one host name or IP address")
    require_empty_home(target, ConfigError)
    moment = now_utc(now)
    passphrase = secrets.passphrase()
    with new_home(target, ConfigError) as build:
        (build / "certs").mkdir()
        (build / "keys").mkdir(mode=0o700)
        (build / "certs" / "root-ca.pem").write_bytes(pem(root))
        ca, transport = SoftwareKey.generate(), SoftwareKey.generate()
        ca.save(build / "keys" / "site-ca.key.pem", passphrase)
        transport.save(build / "keys" / "transport.key.pem", passphrase)
        csr = build_csr(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sid.value)]))
        request = SiteEnrolment.create(sid, csr, ca, transport.public_key())
        (build / "enrolment.cbor").write_bytes(request.encode())
        config = SiteConfig(
            sid,
            org,
            int(moment.timestamp()),
            broker_names,
            broker_ips,
            payload_key_grace_s=payload_key_grace_s,
        )
        (build / "site.json").write_text(config.to_json(), encoding="utf-8")
    return SiteInitResult(
        target,
        sid.value,
        target / "enrolment.cbor",
        key_id(ca.public_key()).hex(),
        key_id(transport.public_key()).hex(),
        hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def configure_site(home: SiteHome, *, payload_key_grace_s: int | None = None) -> SiteHome:
    """Change settings in ``site.json`` (atomically); the returned home carries them. A
    running registrar reads them at its next start."""
    config = home.config
    if payload_key_grace_s is not None:
        config = dataclasses.replace(config, payload_key_grace_s=payload_key_grace_s)
    write_private_file(home.path / "site.json", config.to_json().encode(), overwrite=True)
    return SiteHome(home.path, config)
