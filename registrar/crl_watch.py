"""The CRL timer's decisions: what is due and what is said about the CRLs a registrar
enforces.

Owns when the site CA CRL is re-issued (:func:`refresh_site_crl_if_due`, at half its
validity) and when the broker and registrar service certificates are
(:func:`refresh_service_certificates_if_due`), and the alerts about CRLs and data the
registrar cannot re-sign itself (:func:`check_crls`: HQ's root and station CRLs stale or
close to it, the site CA near its end, HQ revocation data past the site's offline
tolerance), said loudly in the log at every check. The running registrar
(:mod:`registrar.site_runtime`) calls these on its timer and keeps the results for
``status.json``, ``/metrics`` and ``/healthz``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from registrar.metrics import CrlReading
from registrar.revocation import hq_data_freshness
from registrar.site import (
    SITE_CRL_VALIDITY,
    CommissionedSite,
    SiteHome,
    SiteSecrets,
    reissue_service_certificates,
    reissue_site_crl,
    revocation_lock,
)
from trustcore.revocation import RevocationList
from trustcore.utctime import system_clock

__all__ = [
    "CRL_WARNING_MARGIN",
    "SITE_CA_WARNING_MARGIN",
    "SITE_CRL_REFRESH_MARGIN",
    "CrlCheck",
    "check_crls",
    "crl_dates",
    "iso",
    "refresh_service_certificates_if_due",
    "refresh_site_crl_if_due",
]

log = logging.getLogger(__name__)

#: Re-issue the site CRL when less than this is left before its nextUpdate.
SITE_CRL_REFRESH_MARGIN = SITE_CRL_VALIDITY / 2
#: Root/station CRLs closer than this to nextUpdate are reported (warning) in status/logs.
CRL_WARNING_MARGIN = timedelta(days=1)
#: A site CA closer than this to its end is reported: time to `registrar rollover-ca`
#: (LDevIDs are cut at the CA's end, so they get shorter and shorter after this point).
SITE_CA_WARNING_MARGIN = timedelta(days=365)


@dataclass(frozen=True)
class CrlCheck:
    """One check: the alerts (also logged) and the enforced CRLs' dates."""

    alerts: tuple[str, ...]
    readings: tuple[CrlReading, ...]


def crl_dates(path: Path) -> list[x509.CertificateRevocationList]:
    data = path.read_bytes()
    end = b"-----END X509 CRL-----"
    return [
        x509.load_pem_x509_crl(block.strip() + b"\n" + end + b"\n")
        for block in data.split(end)[:-1]
    ]


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def refresh_site_crl_if_due(
    home: SiteHome,
    secrets: SiteSecrets,
    *,
    now: datetime | None = None,
    crl_number: Callable[[int], int] | None = None,
) -> bool:
    """Re-issue the site CA CRL when less than half of its validity is left (so a
    registrar that is down for a few days still finds a valid one); True if it did.
    ``crl_number``: the store's sequence (:func:`registrar.revocation.crl_numbers`)."""
    moment = system_clock() if now is None else now
    with revocation_lock(home):
        crl = x509.load_pem_x509_crl((home.current / "site-crl.pem").read_bytes())
        next_update = crl.next_update_utc
        if next_update is not None and next_update - moment > SITE_CRL_REFRESH_MARGIN:
            return False
        fresh = reissue_site_crl(home, secrets, now=moment, crl_number=crl_number)
    log.info(
        "site CRL re-issued (was valid until %s, now until %s)",
        iso(next_update),
        iso(fresh.next_update_utc),
    )
    return True


def refresh_service_certificates_if_due(
    home: SiteHome, secrets: SiteSecrets, *, now: datetime | None = None
) -> bool:
    """Re-issue the broker server certificate and the registrar client certificate from
    the site CA key once they pass half of their life (docs/site.md, "A year without
    HQ"): an HQ bundle is not needed for them, so a site cut off from HQ keeps its
    operational listener. True if it did (reload the brokers, use the new client
    certificate)."""
    moment = system_clock() if now is None else now
    with revocation_lock(home):
        end = reissue_service_certificates(home, secrets, now=moment)
    if end is None:
        return False
    log.info("broker and registrar service certificates re-issued (valid until %s)", iso(end))
    return True


def check_crls(
    home: SiteHome,
    site: CommissionedSite | None,
    revocations: RevocationList | None,
    *,
    now: datetime | None = None,
) -> CrlCheck:
    """Root and station CRLs come from HQ only (the registrar cannot re-sign them):
    stale ones make every factory certificate under them fail (fail closed) until a
    new site bundle is commissioned. Said loudly, every check."""
    now = system_clock() if now is None else now
    alerts: list[str] = []
    own = set()
    if site is not None:
        own.add(site.site_ca_cert.subject)
        if site.retiring_ca_cert is not None:
            own.add(site.retiring_ca_cert.subject)
    try:
        crls = crl_dates(home.current / "crls.pem")
    except (OSError, ValueError) as exc:
        alerts.append(f"CRL file unreadable: {exc}")
        crls = []
    readings = tuple(
        CrlReading(
            crl.issuer.rfc4514_string(),
            crl.last_update_utc.timestamp(),
            None if crl.next_update_utc is None else crl.next_update_utc.timestamp(),
        )
        for crl in crls
    )
    for crl in crls:
        if crl.issuer in own:  # the site's own CRLs: re-issued by this registrar
            continue
        issuer = crl.issuer.rfc4514_string()
        next_update = crl.next_update_utc
        if next_update is None or next_update < now:
            alerts.append(
                f"STALE CRL of {issuer} (nextUpdate {iso(next_update)}): registrations "
                "of devices under it are REFUSED (fail closed) until a new site bundle "
                "from HQ is commissioned"
            )
        elif next_update - now < CRL_WARNING_MARGIN:
            alerts.append(
                f"CRL of {issuer} runs out at {iso(next_update)}: commission a new "
                "site bundle from HQ before then"
            )
    if site is not None:
        end = site.site_ca_cert.not_valid_after_utc
        if end - now < SITE_CA_WARNING_MARGIN:
            alerts.append(
                f"the site CA expires at {iso(end)}: roll it over now (`registrar "
                "rollover-ca`, docs/site.md); new LDevIDs end with it"
            )
    if revocations is not None and site is not None:
        # Offline tolerance (docs/site.md): warn from 2/3 of HQ's limit for this site,
        # refuse new registrations past it (the verifier); devices already registered
        # keep working (their LDevIDs and the site CRL are the registrar's own).
        fresh = hq_data_freshness(revocations, site.max_offline_days, now)
        if fresh.state == "refusing":
            alerts.append("STALE " + fresh.message())
        elif fresh.state == "warning":
            alerts.append(fresh.message())
    for alert in alerts:
        (log.error if "STALE" in alert else log.warning)("%s", alert)
    return CrlCheck(tuple(alerts), readings)
