"""The site (building) home of a registrar: ``registrar init`` and ``registrar commission``.

Layout (see ``docs/site.md``)::

    SITE/                            0700
      site.json                      site id, organisation, broker names (strict JSON)
      certs/root-ca.pem              the manufacturer root, pinned at init (--root)
      keys/site-ca.key.pem           site CA key          (PKCS#8, encrypted, 0600)
      keys/site-ca-g2.key.pem        a later site CA key (rollover, ``registrar rollover-ca``);
                                     commission.json names the issuing and retiring keys
      keys/transport.key.pem         site transport key   (ECDH: opens bundles, payload keys)
      keys/broker.key.pem            broker TLS key       (made at the first commission)
      keys/registrar-client.key.pem  the registrar's own MQTT client key
      enrolment.cbor                 the site enrolment request to carry to HQ
      rollover.json                  a rollover in progress: the next key, not yet activated
      rollover-request.cbor          its request to carry to HQ (``hq site rollover``)
      current -> state-000003        symlink to the commissioned state, swapped atomically
      state-000003/
        commission.json              bundle sequence, digest, times, revocation list sequence
        site-ca.pem                  site CA certificate from HQ
        broker.pem                   broker certificate + site CA (server chain)
        registrar-client.pem         registrar client certificate + site CA
        registration-cas.pem         root + station CAs (registration listener)
        operational-cas.pem          site CA (operational listener)
        crls.pem                     root CRL + station CRLs + site CA CRL (PEM)
        site-crl.pem                 the site CA CRL alone (re-issued by the registrar)
        retiring-ca.pem              during a site CA rollover: the previous site CA
        retiring-crl.pem             ... and its CRL (same entries, kept fresh too)
        manifest.cbor                manifest and admission rules
        revocation-list.sealed       the HQ revocation list as received (signed)
        revocation-list.cbor         its verified content
        payload-keys.cbor            payload keys, sealed to the transport key
                                     (registrar.payload_keys format)

Commissioning verifies the whole bundle first (``trustcore.site_bundle.verify_site_bundle``),
then builds the new state in a private temporary directory and switches ``current`` to it
with one ``rename`` of a symlink: a refused bundle, a crash or a full disk leaves the
previous state exactly as it was. Secrets: the keystore passphrase comes from
``DEVTRUST_SITE_PASSPHRASE`` or a passphrase file, never the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets as _random
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings, BrokerTls
from registrar.errors import CommissionError, ConfigError
from registrar.payload_keys import PayloadKeyStore
from signers.errors import SignerError
from signers.private_files import private_home, write_private_file
from signers.software import SoftwareKey, passphrase_from_env, passphrase_from_file
from trustcore import cbor
from trustcore.crl import RevokedEntry, build_crl, verify_crl
from trustcore.csr import build_csr
from trustcore.errors import CrlError, EncodingError, InvalidValueError, TrustCoreError
from trustcore.identity import CertSerial, SiteId
from trustcore.key_rotation import DEFAULT_GRACE_S, MAX_GRACE_S
from trustcore.keys import key_id
from trustcore.messages import SiteEnrolment
from trustcore.profiles import (
    issue_broker_certificate,
    issue_service_client_certificate,
    station_id_from_certificate,
)
from trustcore.registration import Admission, AdmissionRule
from trustcore.revocation import RevocationList, indirect_crls_of
from trustcore.site_bundle import (
    MAX_SITE_BUNDLE_SIZE,
    AdmissionEntry,
    ManifestEntry,
    SiteBundleError,
    VerifiedSiteBundle,
    verify_site_bundle,
)
from trustcore.verify import ChainVerifier

__all__ = [
    "PASSPHRASE_ENV",
    "SITE_CRL_VALIDITY",
    "CommissionResult",
    "CommissionedSite",
    "SiteConfig",
    "SiteHome",
    "SiteInitResult",
    "SiteSecrets",
    "broker_settings",
    "broker_tls",
    "commission_site",
    "configure_site",
    "crl_pem",
    "init_site",
    "issuing_ca_key",
    "load_commissioned_site",
    "load_pem_crls",
    "read_crls",
    "reissue_service_certificates",
    "reissue_site_crl",
    "revocation_lock",
    "switch_current",
    "write_crls",
]

PASSPHRASE_ENV = "DEVTRUST_SITE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
CONFIG_VERSION = 1
#: The site CA CRL is signed by the registrar itself; ``registrar run`` re-issues it well
#: before this runs out (an expired CRL makes the brokers refuse every operational client).
SITE_CRL_VALIDITY = timedelta(days=7)
#: Broker and registrar client certificates: re-issued at every commission.
SERVICE_CERT_VALIDITY = timedelta(days=365)
BACKDATE = timedelta(minutes=5)
_STATE_PREFIX = "state-"
#: Keystore name of the first site CA key (``registrar init``); later keys are named by
#: ``registrar rollover-ca`` and recorded in ``commission.json``.
SITE_CA_KEY = "site-ca"


def _now(now: datetime | None) -> datetime:
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(UTC).replace(microsecond=0)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SiteSecrets:
    """Where the site keystore passphrase comes from (a file wins over the environment)."""

    passphrase_file: Path | None = None

    def passphrase(self) -> bytes:
        try:
            if self.passphrase_file is not None:
                return passphrase_from_file(self.passphrase_file)
            return passphrase_from_env(PASSPHRASE_ENV)
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
    path = home.path / "revocation.lock"
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
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} already exists and is not empty; refusing to overwrite it")
    moment = _now(now)
    passphrase = secrets.passphrase()
    target.parent.mkdir(parents=True, exist_ok=True)
    build = target.parent / f".{target.name}.init-{os.getpid()}-{_random.token_hex(4)}"
    build.mkdir(mode=0o700)
    try:
        (build / "certs").mkdir()
        (build / "keys").mkdir(mode=0o700)
        (build / "certs" / "root-ca.pem").write_bytes(_pem(root))
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
        try:
            build.rename(target)
        except OSError as exc:
            raise ConfigError(f"cannot create {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
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


# ----------------------------------------------------------------------------- commission


@dataclass(frozen=True)
class CommissionResult:
    site_id: str
    sequence: int
    state_dir: Path
    manifest_devices: int
    admission: tuple[AdmissionEntry, ...]
    station_ids: tuple[str, ...]
    revocation_list_sequence: int
    revoked_devices: int
    payload_key_ids: tuple[str, ...]
    current_payload_key: str
    root_crl_next_update: datetime
    broker_names: tuple[str, ...]
    warnings: tuple[str, ...]
    #: HQ's offline limit for the site (days without fresh HQ revocation data).
    max_offline_days: int = 30


def _ensure_key(home: SiteHome, name: str, passphrase: bytes) -> SoftwareKey:
    path = home.key_path(name)
    try:
        if path.exists():
            return SoftwareKey.load(path, passphrase)
        key = SoftwareKey.generate()
        key.save(path, passphrase)
        return key
    except SignerError as exc:
        raise ConfigError(f"{name} key: {exc}", reason="bad_secret") from exc


def _previous_site_crl(home: SiteHome, site_ca: x509.Certificate) -> tuple[list[RevokedEntry], int]:
    """The entries and number of the site CRL in the current state (carried forward, so a
    re-commission never un-revokes what the registrar revoked)."""
    path = home.current / "site-crl.pem"
    if not path.is_file():
        return [], 0
    try:
        revs = verify_crl(path.read_bytes(), site_ca, now=None)
    except (CrlError, OSError) as exc:
        raise ConfigError(f"the current site CRL {path} is unusable: {exc}") from exc
    crl = x509.load_pem_x509_crl(path.read_bytes())
    entries = [
        RevokedEntry(
            CertSerial(r.serial_number), r.revocation_date_utc, revs.entries[r.serial_number]
        )
        for r in crl
    ]
    return entries, revs.crl_number


def _sign_site_crl(
    site_ca: x509.Certificate,
    site_key: SoftwareKey,
    entries: list[RevokedEntry],
    number: int,
    moment: datetime,
) -> x509.CertificateRevocationList:
    return build_crl(
        site_ca,
        site_key.private_key(),
        revoked=entries,
        crl_number=number,
        this_update=max(moment - BACKDATE, site_ca.not_valid_before_utc),
        next_update=min(moment + SITE_CRL_VALIDITY, site_ca.not_valid_after_utc),
    )


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


_CRL_END = b"-----END X509 CRL-----"


def load_pem_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM bundle (``cryptography`` only parses one at a time)."""
    out = []
    for block in data.split(_CRL_END)[:-1]:
        out.append(x509.load_pem_x509_crl(block.strip() + b"\n" + _CRL_END + b"\n"))
    return out


def read_crls(home: SiteHome) -> list[x509.CertificateRevocationList]:
    """Every CRL of the current state's ``crls.pem``."""
    return load_pem_crls((home.current / "crls.pem").read_bytes())


def write_crls(home: SiteHome, crls: Iterable[x509.CertificateRevocationList]) -> None:
    """Replace the current state's ``crls.pem`` atomically (callers hold the revocation
    lock; reload the broker's CRLs after)."""
    write_private_file(
        home.current / "crls.pem", b"".join(crl_pem(c) for c in crls), overwrite=True
    )


def _service_validity(site_ca: x509.Certificate, moment: datetime) -> tuple[datetime, datetime]:
    start = max(moment - BACKDATE, site_ca.not_valid_before_utc)
    end = min(moment + SERVICE_CERT_VALIDITY, site_ca.not_valid_after_utc)
    return start, end


@dataclass(frozen=True)
class _SiteCas:
    """The site CAs a new state is written with: the issuing one (the bundle's) and, during
    a rollover overlap, the retiring one (still trusted, its CRL still kept fresh)."""

    issuing_name: str
    retiring: tuple[str, SoftwareKey, x509.Certificate] | None = None
    #: the certificate the current ``site-crl.pem`` is verified with (None: bundle's CA)
    previous_crl_issuer: x509.Certificate | None = None


def _current_cert(home: SiteHome, name: str) -> x509.Certificate:
    path = home.current / name
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the commissioned state is damaged ({path}): {exc}") from exc


def _write_state(
    home: SiteHome,
    verified: VerifiedSiteBundle,
    package: bytes,
    site_key: SoftwareKey,
    transport: SoftwareKey,
    passphrase: bytes,
    moment: datetime,
    cas: _SiteCas | None = None,
) -> Path:
    """Build the state directory for ``verified`` beside the current one; return it."""
    cas = cas or _SiteCas(SITE_CA_KEY)
    site_ca = verified.site_ca_cert
    org = home.config.organization
    broker_key = _ensure_key(home, "broker", passphrase)
    client_key = _ensure_key(home, "registrar-client", passphrase)
    start, end = _service_validity(site_ca, moment)
    broker_cert = issue_broker_certificate(
        site_ca,
        site_key.private_key(),
        broker_key.public_key(),
        dns_names=list(home.config.broker_names),
        ip_addresses=list(home.config.broker_ips),
        organization=org,
        not_before=start,
        not_after=end,
    )
    client_cert = issue_service_client_certificate(
        site_ca,
        site_key.private_key(),
        client_key.public_key(),
        service_name=REGISTRAR_IDENTITY,
        organization=org,
        not_before=start,
        not_after=end,
    )
    entries, number = _previous_site_crl(home, cas.previous_crl_issuer or site_ca)
    site_crl = _sign_site_crl(site_ca, site_key, entries, number + 1, moment)
    # During a rollover overlap every site CA lists every serial the site revoked (one
    # entry list, one CRL number, each CA signs its own copy).
    retiring_files: dict[str, bytes] = {}
    retiring_crls: tuple[x509.CertificateRevocationList, ...] = ()
    retiring_cas: tuple[x509.Certificate, ...] = ()
    if cas.retiring is not None:
        _, old_key, old_cert = cas.retiring
        old_crl = _sign_site_crl(old_cert, old_key, entries, number + 1, moment)
        retiring_files = {"retiring-ca.pem": _pem(old_cert), "retiring-crl.pem": crl_pem(old_crl)}
        retiring_crls, retiring_cas = (old_crl,), (old_cert,)

    staging = home.path / f".{_STATE_PREFIX}{verified.sequence:06d}.{_random.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        files: dict[str, bytes] = {
            "site-ca.pem": _pem(site_ca),
            "broker.pem": _pem(broker_cert) + _pem(site_ca),
            "registrar-client.pem": _pem(client_cert) + _pem(site_ca),
            "registration-cas.pem": b"".join(
                _pem(c) for c in (home.root_certificate(), *verified.station_cas)
            ),
            "operational-cas.pem": b"".join(_pem(c) for c in (site_ca, *retiring_cas)),
            "crls.pem": b"".join(
                crl_pem(c)
                for c in (verified.root_crl, *verified.station_crls, site_crl, *retiring_crls)
            ),
            "site-crl.pem": crl_pem(site_crl),
            **retiring_files,
            "manifest.cbor": cbor.encode(
                {
                    "v": 1,
                    "manifest": [e.to_map() for e in verified.payload.manifest],
                    "admission": [a.to_map() for a in verified.payload.admission],
                }
            ),
            "revocation-list.sealed": verified.payload.revocation_list,
            "revocation-list.cbor": verified.revocations.encode(),
        }
        for name, data in files.items():
            write_private_file(staging / name, data)
        # Payload keys: what the registrar already holds (including keys it rotated itself),
        # plus the bundle's keys exactly as received (still sealed to the transport key).
        previous = PayloadKeyStore(home.payload_keys_path, transport)
        old_entries: list[dict[str, Any]] = []
        if home.commissioned and previous.exists():
            doc = cbor.decode(previous.path.read_bytes(), max_size=1 << 20)
            old_entries = list(doc["keys"])
        have = {e["key_id"] for e in old_entries}
        new_entries = [k.to_map() for k in verified.payload.payload_keys if k.key_id not in have]
        keys_doc = {
            "v": 1,
            "current": verified.payload.current_payload_key,
            "keys": old_entries + new_entries,
        }
        write_private_file(staging / "payload-keys.cbor", cbor.encode(keys_doc))
        PayloadKeyStore(staging / "payload-keys.cbor", transport).load()  # opens, or fails
        state = {
            "bundle_sequence": verified.sequence,
            "bundle_created": verified.created,
            "bundle_sha256": hashlib.sha256(package).hexdigest(),
            "commissioned_at": int(moment.timestamp()),
            "revocation_list_sequence": verified.revocations.sequence,
            "site_crl_number": number + 1,
            "site_ca_key": cas.issuing_name,
            "max_offline_days": verified.payload.max_offline_days,
        }
        if cas.retiring is not None:
            state["retiring_ca_key"] = cas.retiring[0]
        write_private_file(
            staging / "commission.json",
            (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(),
        )
        final = home.path / f"{_STATE_PREFIX}{verified.sequence:06d}"
        if final.exists():  # a leftover of a crash between rename and switch: never current
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def switch_current(home: SiteHome, state_dir: Path) -> None:
    """Point ``current`` at ``state_dir`` with one atomic rename, then drop old states
    (the previous one is kept for inspection)."""
    link = home.path / f".current.{_random.token_hex(4)}"
    link.symlink_to(state_dir.name)
    link.replace(home.current)
    fd = os.open(home.path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    states = sorted(p for p in home.path.glob(f"{_STATE_PREFIX}*") if p.is_dir())
    for old in states[:-2]:
        if old.name != state_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def _state_cas(home: SiteHome, secrets: SiteSecrets, *, activation: bool) -> _SiteCas:
    """Which site CAs the next state carries: on activation the pending key issues and the
    current issuing CA retires; otherwise the current ones carry forward."""
    issuing, retiring = home.ca_key_names()
    if not home.commissioned:
        return _SiteCas(issuing)
    if activation:
        pending = home.pending_rollover_key()
        assert pending is not None
        if retiring is not None:
            raise CommissionError(
                "a previous rollover is still in its overlap: retire its CA first "
                "(`registrar rollover-ca --retire`)",
                reason="rollover_in_progress",
            )
        old_cert = _current_cert(home, "site-ca.pem")
        return _SiteCas(pending, (issuing, home.key(issuing, secrets), old_cert), old_cert)
    if retiring is None:
        return _SiteCas(issuing)
    return _SiteCas(
        issuing, (retiring, home.key(retiring, secrets), _current_cert(home, "retiring-ca.pem"))
    )


def commission_site(
    home: SiteHome, package: bytes, secrets: SiteSecrets, *, now: datetime | None = None
) -> CommissionResult:
    """Verify ``package`` against this site and, only if every check passes, make it the
    commissioned state. Raises :class:`CommissionError` (``reason`` from
    ``verify_site_bundle``) on refusal; nothing is changed then."""
    moment = _now(now)
    if len(package) > MAX_SITE_BUNDLE_SIZE:
        raise CommissionError("the bundle is larger than any site bundle", reason="oversized")
    passphrase = secrets.passphrase()
    transport = home.key("transport", secrets)

    def verify_with(state: dict[str, Any] | None, site_key: SoftwareKey) -> VerifiedSiteBundle:
        try:
            return verify_site_bundle(
                package,
                root=home.root_certificate(),
                transport=transport,
                site_id=home.site_id,
                site_ca_public=site_key.public_key(),
                last_sequence=None if state is None else int(state["bundle_sequence"]),
                last_revocation_sequence=(
                    None if state is None else int(state["revocation_list_sequence"])
                ),
                now=moment,
            )
        except SiteBundleError as exc:
            raise CommissionError(str(exc.args[0]), reason=exc.reason) from exc

    # The bundle's site CA is either the issuing one, or (a rollover being activated) the
    # certificate HQ issued for the pending next key (``registrar rollover-ca``).
    activation = False
    site_key = issuing_ca_key(home, secrets)

    def verify(state: dict[str, Any] | None) -> VerifiedSiteBundle:
        nonlocal activation, site_key
        activation, site_key = False, issuing_ca_key(home, secrets)
        try:
            return verify_with(state, site_key)
        except CommissionError as exc:
            pending = home.pending_rollover_key()
            if exc.reason != "wrong_site_key" or pending is None:
                raise
            next_key = home.key(pending, secrets)
            verified = verify_with(state, next_key)
            activation, site_key = True, next_key
            return verified

    state = home.commission_state()
    verified = verify(state)  # a refused bundle changes nothing, not even the lock file
    # Writing and switching happen under the lock every writer of the site CRL and the
    # revocation list holds (a running registrar's revoke / import-revocations): the state
    # carried forward (site CRL entries, list sequence) must still be the state when
    # ``current`` switches, or a live revocation in between would be dropped (un-revoked
    # on the CRL, or the list rolled back).
    with revocation_lock(home):
        fresh = home.commission_state()
        if fresh != state:  # changed since the check: check again against it
            verified = verify(fresh)
        cas = _state_cas(home, secrets, activation=activation)
        try:
            state_dir = _write_state(
                home, verified, package, site_key, transport, passphrase, moment, cas
            )
            switch_current(home, state_dir)
        except (OSError, SignerError, TrustCoreError) as exc:
            raise ConfigError(f"cannot write the site state: {exc}") from exc
        if activation:
            home.rollover_path.unlink(missing_ok=True)
    if activation:
        warnings_prefix: tuple[str, ...] = (
            f"site CA rolled over to {verified.site_ca_cert.subject.rfc4514_string()}: new "
            "LDevIDs come from it; the previous CA stays trusted until `registrar rollover-ca "
            "--retire` (move devices with `--migrate-all` or at their next renewal)",
        )
    else:
        warnings_prefix = ()
    warnings: list[str] = list(warnings_prefix)
    for station in verified.stations_without_crl:
        warnings.append(
            f"no CRL for station {station}: the registration listener refuses its devices "
            "until HQ sends one"
        )
    for station in verified.stale_station_crls:
        warnings.append(
            f"the CRL of station {station} is past its nextUpdate: its devices are refused "
            "(fail closed) until HQ sends a fresh one"
        )
    if not verified.payload.manifest and not verified.payload.admission:
        warnings.append("the bundle admits no device")
    next_update = verified.root_crl.next_update_utc
    assert next_update is not None
    return CommissionResult(
        site_id=home.site_id.value,
        sequence=verified.sequence,
        state_dir=state_dir,
        manifest_devices=len(verified.payload.manifest),
        admission=verified.payload.admission,
        station_ids=tuple(
            sorted({station_id_from_certificate(c).value for c in verified.station_cas})
        ),
        revocation_list_sequence=verified.revocations.sequence,
        revoked_devices=len(verified.revocations.entries),
        payload_key_ids=tuple(k.key_id.hex() for k in verified.payload.payload_keys),
        current_payload_key=verified.payload.current_payload_key.hex(),
        root_crl_next_update=next_update,
        broker_names=home.config.broker_names + home.config.broker_ips,
        warnings=tuple(warnings),
        max_offline_days=verified.payload.max_offline_days,
    )


def reissue_site_crl(
    home: SiteHome,
    secrets: SiteSecrets,
    *,
    revoke: tuple[RevokedEntry, ...] = (),
    now: datetime | None = None,
    crl_number: Callable[[int], int] | None = None,
) -> x509.CertificateRevocationList:
    """Sign the next site CA CRL (previous entries + ``revoke``) and replace ``site-crl.pem``
    and ``crls.pem`` of the current state (each file atomically). For ``registrar run``
    (refresh before nextUpdate) and ``registrar revoke``; reload the broker's CRLs after.

    ``crl_number(at_least)`` hands out the number (the store's site-wide sequence, shared
    by every registrar instance: :meth:`registrar.store.Store.next_crl_number`); without
    it the number is the current file's plus one (one registrar, or the store not open)."""
    if not home.commissioned:
        raise ConfigError("the site is not commissioned yet")
    moment = _now(now)
    site_key = issuing_ca_key(home, secrets)
    site_ca = x509.load_pem_x509_certificate((home.current / "site-ca.pem").read_bytes())
    entries, previous = _previous_site_crl(home, site_ca)
    number = previous + 1 if crl_number is None else crl_number(previous + 1)
    if number <= previous:
        raise ConfigError(f"CRL number {number} is not above the current site CRL's {previous}")
    known = {e.serial.value for e in entries}
    for entry in revoke:  # idempotent: a serial queued twice (two callers) is listed once
        if entry.serial.value not in known:
            known.add(entry.serial.value)
            entries.append(entry)
    crl = _sign_site_crl(site_ca, site_key, entries, number, moment)
    # A rollover overlap: the retiring CA's CRL gets the same entries (it may have issued
    # any serial being revoked) and stays as fresh as the issuing one.
    retiring = home.ca_key_names()[1]
    own = [crl]
    if retiring is not None:
        old_cert = _current_cert(home, "retiring-ca.pem")
        if moment < old_cert.not_valid_after_utc:
            key = home.key(retiring, secrets)
            own.append(_sign_site_crl(old_cert, key, entries, number, moment))
        else:  # expired: nothing of it verifies any more; ``registrar run`` retires it
            own.append(x509.load_pem_x509_crl((home.current / "retiring-crl.pem").read_bytes()))
    subjects = {c.issuer for c in own}
    others = [
        c
        for c in load_pem_crls((home.current / "crls.pem").read_bytes())
        if c.issuer not in subjects
    ]
    try:
        write_private_file(
            home.current / "crls.pem",
            b"".join(crl_pem(c) for c in (*others, *own)),
            overwrite=True,
        )
    except SignerError as exc:  # disk full, read-only: the old CRL file stays whole
        raise ConfigError(f"the site CRL was not written: {exc}", reason="site_files") from exc
    if retiring is not None:
        write_private_file(home.current / "retiring-crl.pem", crl_pem(own[1]), overwrite=True)
    write_private_file(home.current / "site-crl.pem", crl_pem(crl), overwrite=True)
    return crl


def _service_due(cert: x509.Certificate, moment: datetime) -> bool:
    """Past half of its life (or already ended)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return moment >= start + (end - start) / 2


def reissue_service_certificates(
    home: SiteHome, secrets: SiteSecrets, *, now: datetime | None = None, force: bool = False
) -> datetime | None:
    """Re-issue the broker server certificate and the registrar's MQTT client certificate
    of the current state from the site CA key this site holds (no HQ), with the same keys,
    when either has passed half of its life (``force``: now). Their end is capped at the
    issuing site CA's own end; nothing is re-issued when that would not move the end
    (a site CA close to its end needs a rollover, which ``check_crls`` says loudly).
    Replaces ``broker.pem`` and ``registrar-client.pem`` (each atomically); callers hold
    the revocation lock and reload the brokers after. Returns the new end, or None."""
    if not home.commissioned:
        raise ConfigError("the site is not commissioned yet")
    moment = _now(now)
    broker_old = _current_cert(home, "broker.pem")
    client_old = _current_cert(home, "registrar-client.pem")
    site_ca = _current_cert(home, "site-ca.pem")
    due = force or _service_due(broker_old, moment) or _service_due(client_old, moment)
    if not due or moment >= site_ca.not_valid_after_utc:
        return None
    start, end = _service_validity(site_ca, moment)
    stale_issuer = broker_old.issuer != site_ca.subject or client_old.issuer != site_ca.subject
    if (
        not force
        and not stale_issuer
        and end <= min(broker_old.not_valid_after_utc, client_old.not_valid_after_utc)
    ):
        return None
    site_key = issuing_ca_key(home, secrets)
    if site_key.public_key() != site_ca.public_key():
        raise ConfigError("the issuing site CA key does not match the current site CA")
    org = home.config.organization
    broker_cert = issue_broker_certificate(
        site_ca,
        site_key.private_key(),
        home.key("broker", secrets).public_key(),
        dns_names=list(home.config.broker_names),
        ip_addresses=list(home.config.broker_ips),
        organization=org,
        not_before=start,
        not_after=end,
    )
    client_cert = issue_service_client_certificate(
        site_ca,
        site_key.private_key(),
        home.key("registrar-client", secrets).public_key(),
        service_name=REGISTRAR_IDENTITY,
        organization=org,
        not_before=start,
        not_after=end,
    )
    write_private_file(
        home.current / "registrar-client.pem", _pem(client_cert) + _pem(site_ca), overwrite=True
    )
    write_private_file(
        home.current / "broker.pem", _pem(broker_cert) + _pem(site_ca), overwrite=True
    )
    return end


# ------------------------------------------------------------------------ the running site


def broker_tls(home: SiteHome, secrets: SiteSecrets) -> BrokerTls:
    """The files the broker of the commissioned site needs (paths resolved through
    ``current``, so a re-commission is picked up by the next reload or restart)."""
    if not home.commissioned:
        raise ConfigError("the site is not commissioned: run `registrar commission` first")
    state = home.current.resolve()
    return BrokerTls(
        server_cert=state / "broker.pem",
        server_key=home.key_path("broker"),
        server_key_passphrase=secrets.passphrase(),
        registration_cas=state / "registration-cas.pem",
        operational_cas=state / "operational-cas.pem",
        crl_file=state / "crls.pem",
    )


def broker_settings(
    home: SiteHome,
    secrets: SiteSecrets,
    *,
    workdir: Path | None = None,
    host: str = "127.0.0.1",
    registration_port: int = 0,
    operational_port: int = 0,
) -> BrokerSettings:
    work = workdir if workdir is not None else home.path / "run"
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    return BrokerSettings(
        tls=broker_tls(home, secrets),
        workdir=work,
        host=host,
        registration_port=registration_port,
        operational_port=operational_port,
    )


@dataclass(frozen=True)
class CommissionedSite:
    """Everything ``registrar run`` needs from the commissioned state, loaded and checked."""

    site_id: SiteId
    organization: str
    root: x509.Certificate
    site_ca_cert: x509.Certificate
    site_ca_key: SoftwareKey
    transport_key: SoftwareKey
    station_cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    manifest: tuple[ManifestEntry, ...]
    admission: Admission
    revocations: RevocationList
    payload_keys: PayloadKeyStore
    client_cert: Path  # registrar MQTT client certificate + site CA (PEM)
    client_key: Path  # encrypted PKCS#8; the passphrase is the site keystore passphrase
    tls: BrokerTls
    #: during a site CA rollover overlap: the previous CA (still trusted) and its key
    retiring_ca_cert: x509.Certificate | None = None
    retiring_ca_key: SoftwareKey | None = None
    #: HQ's offline limit for this site (bundle ``max_offline_days``; 30 for older states).
    max_offline_days: int = 30

    def chain_verifier(self) -> ChainVerifier:
        """Verifier for factory certificates: root, station CAs, every CRL and the HQ
        indirect CRL of the HQ list held (docs/pki.md)."""
        return ChainVerifier(
            [self.root],
            self.station_cas,
            self.crls,
            indirect_crls=indirect_crls_of(self.revocations),
        )


def _read_manifest(path: Path) -> tuple[tuple[ManifestEntry, ...], tuple[AdmissionEntry, ...]]:
    try:
        doc = cbor.map_of(cbor.decode(path.read_bytes(), max_size=MAX_SITE_BUNDLE_SIZE), "file")
        cbor.expect_keys(doc, {"v", "manifest", "admission"}, what="manifest file")
        manifest = tuple(ManifestEntry.from_map(e) for e in cbor.field(doc, "manifest", list))
        rules = tuple(AdmissionEntry.from_map(a) for a in cbor.field(doc, "admission", list))
    except (OSError, EncodingError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return manifest, rules


def load_commissioned_site(home: SiteHome, secrets: SiteSecrets) -> CommissionedSite:
    if not home.commissioned:
        raise ConfigError("the site is not commissioned: run `registrar commission` first")
    state = home.current.resolve()
    issuing, retiring = home.ca_key_names()
    site_key = home.key(issuing, secrets)
    transport = home.key("transport", secrets)
    retiring_cert = retiring_key = None
    try:
        if retiring is not None:
            retiring_key = home.key(retiring, secrets)
            retiring_cert = x509.load_pem_x509_certificate((state / "retiring-ca.pem").read_bytes())
        site_ca = x509.load_pem_x509_certificate((state / "site-ca.pem").read_bytes())
        cas = x509.load_pem_x509_certificates((state / "registration-cas.pem").read_bytes())
        crls = load_pem_crls((state / "crls.pem").read_bytes())
        revocations = RevocationList.decode((state / "revocation-list.cbor").read_bytes())
    except (OSError, ValueError, EncodingError) as exc:
        raise ConfigError(f"the commissioned state {state} is damaged: {exc}") from exc
    if site_ca.public_key() != site_key.public_key():
        raise ConfigError(f"the site CA certificate does not match keys/{issuing}.key.pem")
    if (
        retiring_cert is not None
        and retiring_key is not None
        and retiring_cert.public_key() != retiring_key.public_key()
    ):
        raise ConfigError(f"the retiring site CA does not match keys/{retiring}.key.pem")
    root = home.root_certificate()
    manifest, rules = _read_manifest(state / "manifest.cbor")
    admission = Admission(
        devices=frozenset(e.device_id for e in manifest),
        rules=tuple(AdmissionRule(r.station_id, r.id_prefix) for r in rules),
    )
    return CommissionedSite(
        site_id=home.site_id,
        organization=home.config.organization,
        root=root,
        site_ca_cert=site_ca,
        site_ca_key=site_key,
        transport_key=transport,
        station_cas=tuple(c for c in cas if c.subject != root.subject),
        crls=tuple(crls),
        manifest=manifest,
        admission=admission,
        revocations=revocations,
        payload_keys=PayloadKeyStore(state / "payload-keys.cbor", transport),
        client_cert=state / "registrar-client.pem",
        client_key=home.key_path("registrar-client"),
        tls=broker_tls(home, secrets),
        retiring_ca_cert=retiring_cert,
        retiring_ca_key=retiring_key,
        max_offline_days=int((home.commission_state() or {}).get("max_offline_days", 30)),
    )
