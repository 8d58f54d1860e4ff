"""The site CA CRL: signing it (entries carried forward, never un-revoking), reading and
writing the state's CRL files, and re-issuing it (``registrar run`` before nextUpdate,
``registrar revoke``), during a rollover overlap for the retiring CA too."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from registrar.errors import ConfigError
from registrar.site.home import (
    BACKDATE,
    SITE_CRL_VALIDITY,
    SiteHome,
    SiteSecrets,
    current_cert,
    issuing_ca_key,
)
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore.crl import RevokedEntry, build_crl, verify_crl
from trustcore.errors import CrlError
from trustcore.identity import CertSerial
from trustcore.utctime import now_utc

__all__ = [
    "crl_pem",
    "load_pem_crls",
    "previous_site_crl",
    "read_crls",
    "reissue_site_crl",
    "sign_site_crl",
    "write_crls",
]


def previous_site_crl(home: SiteHome, site_ca: x509.Certificate) -> tuple[list[RevokedEntry], int]:
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


def sign_site_crl(
    site_ca: x509.Certificate,
    site_key: SoftwareKey,
    entries: list[RevokedEntry],
    number: int,
    moment: datetime,
) -> x509.CertificateRevocationList:
    """A site CA CRL valid from ``moment`` for :data:`SITE_CRL_VALIDITY` (within the CA's
    own validity)."""
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
    moment = now_utc(now)
    site_key = issuing_ca_key(home, secrets)
    site_ca = x509.load_pem_x509_certificate((home.current / "site-ca.pem").read_bytes())
    entries, previous = previous_site_crl(home, site_ca)
    number = previous + 1 if crl_number is None else crl_number(previous + 1)
    if number <= previous:
        raise ConfigError(f"CRL number {number} is not above the current site CRL's {previous}")
    known = {e.serial.value for e in entries}
    for entry in revoke:  # idempotent: a serial queued twice (two callers) is listed once
        if entry.serial.value not in known:
            known.add(entry.serial.value)
            entries.append(entry)
    crl = sign_site_crl(site_ca, site_key, entries, number, moment)
    # A rollover overlap: the retiring CA's CRL gets the same entries (it may have issued
    # any serial being revoked) and stays as fresh as the issuing one.
    retiring = home.ca_key_names()[1]
    own = [crl]
    if retiring is not None:
        old_cert = current_cert(home, "retiring-ca.pem")
        if moment < old_cert.not_valid_after_utc:
            key = home.key(retiring, secrets)
            own.append(sign_site_crl(old_cert, key, entries, number, moment))
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
