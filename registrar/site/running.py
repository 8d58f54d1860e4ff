"""What the running registrar takes from the commissioned state: the broker's TLS files and
settings, :class:`CommissionedSite` (loaded and checked), and the re-issue of the broker
and registrar client certificates from the site CA key the site holds (no HQ)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from registrar.broker import REGISTRAR_IDENTITY, BrokerSettings, BrokerTls
from registrar.errors import ConfigError
from registrar.payload_keys import PayloadKeyStore
from registrar.site.crl import (
    load_pem_crls,
)
from registrar.site.home import (
    BACKDATE,
    SERVICE_CERT_VALIDITY,
    SiteHome,
    SiteSecrets,
    current_cert,
    issuing_ca_key,
    pem,
)
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore import cbor
from trustcore.errors import EncodingError
from trustcore.identity import SiteId
from trustcore.profiles import (
    issue_broker_certificate,
    issue_service_client_certificate,
)
from trustcore.registration import Admission, AdmissionRule
from trustcore.revocation import RevocationList, indirect_crls_of
from trustcore.site_bundle import (
    MAX_SITE_BUNDLE_SIZE,
    AdmissionEntry,
    ManifestEntry,
)
from trustcore.utctime import now_utc
from trustcore.verify import ChainVerifier

__all__ = [
    "CommissionedSite",
    "broker_settings",
    "broker_tls",
    "issue_service_certificates",
    "load_commissioned_site",
    "reissue_service_certificates",
    "service_validity",
]


def service_validity(site_ca: x509.Certificate, moment: datetime) -> tuple[datetime, datetime]:
    """Validity of a broker or registrar client certificate issued at ``moment`` (within
    the site CA's own)."""
    start = max(moment - BACKDATE, site_ca.not_valid_before_utc)
    end = min(moment + SERVICE_CERT_VALIDITY, site_ca.not_valid_after_utc)
    return start, end


def issue_service_certificates(
    home: SiteHome,
    site_ca: x509.Certificate,
    site_ca_key: ec.EllipticCurvePrivateKey,
    broker_key: ec.EllipticCurvePublicKey,
    client_key: ec.EllipticCurvePublicKey,
    validity: tuple[datetime, datetime],
) -> tuple[x509.Certificate, x509.Certificate]:
    """The broker server certificate (the site's broker names and addresses) and the
    registrar's MQTT client certificate (:data:`REGISTRAR_IDENTITY`), both signed by the site
    CA for ``validity`` (:func:`service_validity`): at commission and at each re-issue."""
    org = home.config.organization
    start, end = validity
    broker_cert = issue_broker_certificate(
        site_ca,
        site_ca_key,
        broker_key,
        dns_names=list(home.config.broker_names),
        ip_addresses=list(home.config.broker_ips),
        organization=org,
        not_before=start,
        not_after=end,
    )
    client_cert = issue_service_client_certificate(
        site_ca,
        site_ca_key,
        client_key,
        service_name=REGISTRAR_IDENTITY,
        organization=org,
        not_before=start,
        not_after=end,
    )
    return broker_cert, client_cert


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
    moment = now_utc(now)
    broker_old = current_cert(home, "broker.pem")
    client_old = current_cert(home, "registrar-client.pem")
    site_ca = current_cert(home, "site-ca.pem")
    due = force or _service_due(broker_old, moment) or _service_due(client_old, moment)
    if not due or moment >= site_ca.not_valid_after_utc:
        return None
    start, end = service_validity(site_ca, moment)
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
    broker_cert, client_cert = issue_service_certificates(
        home,
        site_ca,
        site_key.private_key(),
        home.key("broker", secrets).public_key(),
        home.key("registrar-client", secrets).public_key(),
        (start, end),
    )
    write_private_file(
        home.current / "registrar-client.pem", pem(client_cert) + pem(site_ca), overwrite=True
    )
    write_private_file(home.current / "broker.pem", pem(broker_cert) + pem(site_ca), overwrite=True)
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
