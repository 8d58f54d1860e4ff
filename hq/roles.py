"""HQ role certificates over a device's lifetime: ``hq renew-roles`` (a root ceremony).

The role certificates (entitlement signer, audit receiver, revocation signer, and any
other :class:`~trustcore.profiles.HqRole` this HQ holds) last :data:`ROLE_VALIDITY` (five
years) while devices live ten years and more. Every site bundle, entitlement and revocation
list is signed by one of them, so after five years HQ could not speak to its sites or
stations any more. At a root ceremony, a role certificate with less than
:data:`RENEW_BEFORE` left is re-issued for the **same key** (nothing a station or site
pinned changes; packages already signed stay verifiable with the certificate they carry
while it is valid). Renewing a year ahead leaves time for every party to receive a package
signed under the new certificate before the old one ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hq.errors import HomeError, SecretError
from hq.home import HqHome, HqSecrets, cert_pem
from hq.root_signing import BACKDATE, ROLE_VALIDITY
from signers.errors import SignerError
from signers.private_files import write_private_file
from trustcore.errors import ProfileError
from trustcore.profiles import HqRole, issue_role_certificate
from trustcore.utctime import now_utc

__all__ = ["RENEW_BEFORE", "RoleRenewal", "renew_role_certificates"]

#: Re-issue a role certificate once less than this is left.
RENEW_BEFORE = timedelta(days=365)


@dataclass(frozen=True)
class RoleRenewal:
    role: str
    renewed: bool
    not_after: datetime


def renew_role_certificates(
    home: HqHome, secrets: HqSecrets, *, now: datetime | None = None, force: bool = False
) -> list[RoleRenewal]:
    """Re-issue (same key) every role certificate of ``home`` that ends within
    :data:`RENEW_BEFORE` (all of them with ``force``); the root key signs. Roles this HQ
    has no certificate for are skipped."""
    moment = now_utc(now)
    root_cert = home.root_certificate()
    due: list[HqRole] = []
    out: list[RoleRenewal] = []
    for role in HqRole:
        if not (home.certs_dir / f"{role.value}.pem").exists():
            continue
        cert = home.role_certificate(role)
        if force or cert.not_valid_after_utc - moment <= RENEW_BEFORE:
            due.append(role)
        else:
            out.append(RoleRenewal(role.value, False, cert.not_valid_after_utc))
    if not due:
        return out
    keys = {role: home.role_key(role, secrets) for role in due}  # check every key first
    end = min(moment + ROLE_VALIDITY, root_cert.not_valid_after_utc)
    if end - moment <= RENEW_BEFORE:
        raise HomeError(
            f"the root ends {root_cert.not_valid_after_utc.isoformat()}: role certificates "
            "cannot be renewed for long enough (a new root is needed)"
        )
    issued = {}
    with home.root_key(secrets) as root:
        for role, key in keys.items():
            try:
                issued[role] = issue_role_certificate(
                    root_cert,
                    root.private_key(),
                    key.public_key(),
                    role=role,
                    common_name=f"{home.config.organization} HQ {role.value}",
                    organization=home.config.organization,
                    not_before=max(moment - BACKDATE, root_cert.not_valid_before_utc),
                    not_after=end,
                )
            except (SignerError, ProfileError) as exc:
                raise SecretError(f"the root key failed to sign the {role.value}: {exc}") from exc
    for role, cert in issued.items():
        path = home.certs_dir / f"{role.value}.pem"
        try:
            write_private_file(path, cert_pem(cert), overwrite=True)
        except SignerError as exc:
            raise HomeError(f"cannot write {path}: {exc}") from exc
        out.append(RoleRenewal(role.value, True, cert.not_valid_after_utc))
    return sorted(out, key=lambda r: r.role)
