"""HQ's revocation data: what the root signs (rarely) and what the delegated CRL signer
signs (routinely), so the root key stays offline (docs/pki.md, "The root stays offline").

Root ceremonies — the only times the root key is used besides issuing CA certificates:

* the **root CRL** (:data:`ROOT_CRL_VALIDITY`, one year), re-signed when HQ issues or
  revokes a CA certificate (entitlement, site enrolment, ``hq revoke --station-ca``) or
  with ``hq root-crl`` (:func:`root_ceremony`);
* the **CRL signer** role certificate (``certs/crl-signer.pem``), created for an HQ made
  before the role existed and renewed when it ends within a year (:func:`root_ceremony`).

Routine, without the root key: :func:`publish_revocations` makes the next HQ revocation
list (same entries or more, next sequence, ``issued`` = now) carrying a fresh **indirect
CRL** of every factory certificate HQ revoked (signed by the CRL signer, valid
:data:`HQ_CRL_VALIDITY`, longer than the longest offline window a site may be given), the
CRL signer certificate and the newest root CRL. Every site bundle and every ``hq revoke``
publishes one; ``hq publish-revocations`` does so on its own (for sites between bundles).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hq.errors import HomeError, SecretError
from hq.home import HqHome, HqSecrets, cert_pem
from hq.root_signing import BACKDATE, ROLE_VALIDITY, ROOT_CRL_VALIDITY, issue_root_crl
from hq.store import HqStore
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore.crl import IndirectEntry, build_indirect_crl, load_crl
from trustcore.profiles import HqRole, issue_role_certificate
from trustcore.revocation import (
    CRL_REASONS,
    RevocationList,
    RevokedDevice,
    open_revocation_list,
    seal_revocation_list,
)

__all__ = [
    "HQ_CRL_VALIDITY",
    "MAX_OFFLINE_DAYS",
    "ROOT_CRL_VALIDITY",
    "ROOT_CRL_WARN_BEFORE",
    "CeremonyResult",
    "current_revocations",
    "latest_root_crl",
    "publish_revocations",
    "root_ceremony",
    "root_crl_warning",
]

#: The longest offline window HQ may give a site (``hq site bundle --max-offline-days``).
MAX_OFFLINE_DAYS = 180
#: The indirect CRL outlives the longest offline window: a site applies its own, shorter
#: bound on the age of HQ data; the CRL's nextUpdate only says when it is void everywhere.
HQ_CRL_VALIDITY = timedelta(days=MAX_OFFLINE_DAYS + 10)
#: HQ warns (``hq site bundle``, ``hq publish-revocations``, ``hq root-crl``) once the root
#: CRL ends within this time: a bundle made later could not last a 180-day offline window.
ROOT_CRL_WARN_BEFORE = timedelta(days=MAX_OFFLINE_DAYS + 20)
#: Renew the CRL signer certificate at a ceremony when it ends within this time.
CRL_SIGNER_RENEW_BEFORE = timedelta(days=365)


def latest_root_crl(store: HqStore) -> x509.CertificateRevocationList | None:
    """The newest root CRL HQ signed (at a ceremony), or None."""
    der = store.latest_root_crl_der()
    return None if der is None else load_crl(der)


def root_crl_warning(
    crl: x509.CertificateRevocationList | None,
    moment: datetime,
    crl_signer: x509.Certificate | None = None,
) -> str | None:
    """A one-line warning when the root CRL is missing or ends within
    :data:`ROOT_CRL_WARN_BEFORE` of ``moment`` (or the CRL signer certificate does), else
    None. Both are renewed by one root ceremony, ``hq root-crl``."""
    if crl is None:
        return "HQ holds no root CRL: run `hq root-crl` (root ceremony)"
    end = crl.next_update_utc
    assert end is not None
    if end - moment <= ROOT_CRL_WARN_BEFORE:
        days = (end - moment).days
        return (
            f"the root CRL ends {end.isoformat()} (in {days} days): run `hq root-crl` "
            "(root ceremony) soon; sites refuse new registrations once it has ended"
        )
    if crl_signer is not None and crl_signer.not_valid_after_utc - moment <= ROOT_CRL_WARN_BEFORE:
        return (
            f"the CRL signer certificate ends {crl_signer.not_valid_after_utc.isoformat()}: "
            "run `hq root-crl` (root ceremony) to renew it; sites refuse HQ lists it signs "
            "after that"
        )
    return None


# --------------------------------------------------------------------------- ceremony


@dataclass(frozen=True)
class CeremonyResult:
    root_crl_number: int
    root_crl_next_update: datetime
    crl_signer_issued: bool
    crl_signer_not_after: datetime


def _ensure_crl_signer(home: HqHome, secrets: HqSecrets, moment: datetime) -> bool:
    """Create or renew the CRL signer role certificate (root key); True if issued now."""
    path = home.certs_dir / f"{HqRole.CRL_SIGNER.value}.pem"
    if path.exists():
        cert = home.role_certificate(HqRole.CRL_SIGNER)
        if cert.not_valid_after_utc - moment > CRL_SIGNER_RENEW_BEFORE:
            return False
    root_cert = home.root_certificate()
    key = SoftwareKey.generate()
    end = min(moment + ROLE_VALIDITY, root_cert.not_valid_after_utc)
    with home.root_key(secrets) as root:
        try:
            cert = issue_role_certificate(
                root_cert,
                root.private_key(),
                key.public_key(),
                role=HqRole.CRL_SIGNER,
                common_name=f"{home.config.organization} HQ {HqRole.CRL_SIGNER.value}",
                organization=home.config.organization,
                not_before=max(moment - BACKDATE, root_cert.not_valid_before_utc),
                not_after=end,
            )
        except SignerError as exc:
            raise SecretError(f"the root key failed to sign: {exc}") from exc
    try:
        key.save(
            home.keys_dir / f"{HqRole.CRL_SIGNER.value}.key.pem",
            secrets.passphrase(),
            overwrite=True,
        )
        write_private_file(path, cert_pem(cert), overwrite=True)
    except (OSError, SignerError) as exc:
        raise HomeError(f"cannot write the CRL signer: {exc}") from exc
    return True


def root_ceremony(home: HqHome, secrets: HqSecrets, *, now: datetime) -> CeremonyResult:
    """``hq root-crl``: re-sign the root CRL and make sure the CRL signer certificate
    exists and has more than a year to run (both need the root key)."""
    issued = _ensure_crl_signer(home, secrets, now)
    store = HqStore.open(home.store_location)
    try:
        with store.transaction():
            crl = issue_root_crl(home, store, secrets, now)
    finally:
        store.close()
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    end = crl.next_update_utc
    assert end is not None
    signer = home.role_certificate(HqRole.CRL_SIGNER)
    return CeremonyResult(number, end, issued, signer.not_valid_after_utc)


# ------------------------------------------------------------------------- routine


def current_revocations(home: HqHome, store: HqStore, moment: datetime) -> RevocationList:
    """The content of the newest HQ revocation list (an empty list 0 if none yet)."""
    latest = store.latest_revocation_list()
    if latest is None:
        return RevocationList(0, int(moment.timestamp()))
    return open_revocation_list(
        latest[1], root=home.root_certificate(), now=moment, root_crl=None, not_older_than=None
    )


def _indirect_entries(store: HqStore, entries: tuple[RevokedDevice, ...]) -> list[IndirectEntry]:
    """One indirect-CRL entry per listed factory certificate whose station CA HQ issued
    (its certificateIssuer names that CA; a station HQ never certified issued nothing that
    chains to the root, so there is nothing to name)."""
    names: dict[str, x509.Name | None] = {}
    out = []
    for entry in entries:
        station = entry.station_id.value
        if station not in names:
            certs = store.station_ca_certificates(station)
            names[station] = x509.load_der_x509_certificate(certs[-1][1]).subject if certs else None
        name = names[station]
        if name is None:
            continue
        out.append(
            IndirectEntry(
                name,
                entry.serial,
                datetime.fromtimestamp(entry.revoked_at, UTC),
                CRL_REASONS[entry.reason],
            )
        )
    return out


def publish_revocations(
    home: HqHome,
    store: HqStore,
    secrets: HqSecrets,
    moment: datetime,
    *,
    added: tuple[RevokedDevice, ...] = (),
) -> tuple[RevocationList, bytes]:
    """Record and return the next HQ revocation list (current entries + ``added``) with a
    fresh indirect CRL, the CRL signer certificate and the newest root CRL. Call inside a
    store transaction. Uses the revocation-signer and CRL-signer keys, never the root's."""
    if not (home.certs_dir / f"{HqRole.CRL_SIGNER.value}.pem").exists():
        raise HomeError(
            "this HQ has no CRL signer yet (made before the role existed): run "
            "`hq root-crl` once (root ceremony) to create it"
        )
    current = current_revocations(home, store, moment)
    issued = max(int(moment.timestamp()), current.issued)
    nxt = current.with_entries(added, issued=issued)
    signer_cert = home.role_certificate(HqRole.CRL_SIGNER)
    if not signer_cert.not_valid_before_utc <= moment < signer_cert.not_valid_after_utc:
        raise HomeError(
            f"the CRL signer certificate is not valid now (it ends "
            f"{signer_cert.not_valid_after_utc.isoformat()}): run `hq root-crl` to renew it"
        )
    signer_key = home.role_key(HqRole.CRL_SIGNER, secrets)
    number = store.last_hq_crl_number() + 1
    this_update = datetime.fromtimestamp(issued, UTC) - BACKDATE
    next_update = this_update + HQ_CRL_VALIDITY
    try:
        crl = build_indirect_crl(
            signer_cert,
            signer_key.private_key(),
            revoked=_indirect_entries(store, nxt.entries),
            crl_number=number,
            this_update=this_update,
            next_update=next_update,
        )
    except SignerError as exc:
        raise SecretError(f"the CRL signer key failed to sign: {exc}") from exc
    der = crl.public_bytes(serialization.Encoding.DER)
    store.put_hq_crl(number, int(this_update.timestamp()), int(next_update.timestamp()), der)
    root_crl = store.latest_root_crl_der()
    nxt = nxt.with_crls(
        hq_crl=der,
        crl_signer=signer_cert.public_bytes(serialization.Encoding.DER),
        root_crl=root_crl,
    )
    package = seal_revocation_list(
        nxt,
        signer=home.role_key(HqRole.REVOCATION_SIGNER, secrets),
        signer_cert=home.role_certificate(HqRole.REVOCATION_SIGNER),
    )
    store.put_revocation_list(nxt.sequence, nxt.issued, package)
    return nxt, package
