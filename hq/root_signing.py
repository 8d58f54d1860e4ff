"""Signatures by the HQ root key after ``hq init``, and the validities HQ gives.

Owns: the validity constants (root, role certificates, root CRL, the back-dating of every
certificate), :func:`sign_ca_with_root` (the one place a station or site CA certificate is
signed), :func:`sign_station_ca` (at each entitlement, renewal and re-key) and
:func:`issue_root_crl` (the root CRL, re-signed at every root ceremony). Creating the HQ and
its root is :mod:`hq.authority`; what is signed when is decided by the callers
(:mod:`hq.entitlements`, :mod:`hq.station_ca`, :mod:`hq.site`, :mod:`hq.revocation_data`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import HqError, SecretError
from hq.home import HqHome, HqSecrets
from hq.store import HqStore
from signers.errors import SignerError
from trustcore.crl import RevokedEntry, build_crl
from trustcore.errors import ProfileError
from trustcore.identity import CertSerial, StationId
from trustcore.keys import Signer
from trustcore.profiles import issue_station_ca

__all__ = [
    "BACKDATE",
    "ROLE_VALIDITY",
    "ROOT_CRL_VALIDITY",
    "ROOT_VALIDITY",
    "issue_root_crl",
    "sign_ca_with_root",
    "sign_station_ca",
]

ROOT_VALIDITY = timedelta(days=20 * 365)
ROLE_VALIDITY = timedelta(days=5 * 365)
#: The root CRL, signed only at a root ceremony (CA issuance or revocation, ``hq root-crl``).
ROOT_CRL_VALIDITY = timedelta(days=365)
#: Certificates start a little in the past so a station whose clock is slightly behind
#: HQ's does not see them as not yet valid.
BACKDATE = timedelta(minutes=5)


def sign_station_ca(
    home: HqHome,
    secrets: HqSecrets,
    root_cert: x509.Certificate,
    subject_key: ec.EllipticCurvePublicKey,
    station_id: str,
    validity: tuple[datetime, datetime],
    error: Callable[[str], HqError],
) -> x509.Certificate:
    """A station CA certificate for ``subject_key`` signed by the root (at each entitlement
    and at each renewal or re-key, :mod:`hq.station_ca`), valid for ``validity`` and never
    beyond it. A profile refusal raises ``error(message)``; a failing root key
    :class:`SecretError`."""
    start, end = validity
    return sign_ca_with_root(
        home,
        secrets,
        lambda root_key: issue_station_ca(
            root_cert,
            root_key,
            subject_key,
            station_id=StationId(station_id),
            organization=home.config.organization,
            not_before=start,
            not_after=end,
            max_not_after=end,
        ),
        "the station CA",
        error,
    )


def sign_ca_with_root(
    home: HqHome,
    secrets: HqSecrets,
    issue: Callable[[ec.EllipticCurvePrivateKey], x509.Certificate],
    what: str,
    error: Callable[[str], HqError],
) -> x509.Certificate:
    """``issue(root key)`` with the root key open only for that call: the one place a
    station or site CA certificate is signed. A profile refusal raises
    ``error("cannot issue <what>: …")``, a failing root key :class:`SecretError`."""
    root: Signer
    with home.root_key(secrets) as root:
        try:
            return issue(root.private_key())
        except ProfileError as exc:
            raise error(f"cannot issue {what}: {exc.message}") from exc
        except SignerError as exc:
            raise SecretError(f"the root key failed to sign: {exc}") from exc


def issue_root_crl(
    home: HqHome, store: HqStore, secrets: HqSecrets, moment: datetime
) -> x509.CertificateRevocationList:
    """A fresh root CRL (next CRL number) of every CA/role certificate the root revoked;
    recorded in the store (call inside a transaction)."""
    root_cert = home.root_certificate()
    entries = [
        RevokedEntry(
            CertSerial.from_hex(serial),
            datetime.fromtimestamp(at, UTC),
            x509.ReasonFlags(reason),
        )
        for serial, at, reason in store.root_revocations()
    ]
    number = store.last_root_crl_number() + 1
    this_update = moment - BACKDATE
    next_update = moment + ROOT_CRL_VALIDITY
    with home.root_key(secrets) as root:
        try:
            crl = build_crl(
                root_cert,
                root.private_key(),
                revoked=entries,
                crl_number=number,
                this_update=this_update,
                next_update=next_update,
            )
        except SignerError as exc:
            raise SecretError(f"the root key failed to sign the CRL: {exc}") from exc
    store.put_root_crl(
        number,
        int(this_update.timestamp()),
        int(next_update.timestamp()),
        crl.public_bytes(serialization.Encoding.DER),
    )
    return crl
