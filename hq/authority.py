"""The HQ authority: create the HQ and enrol factory stations.

Owns: :func:`init_hq` (a new HQ directory: the root key in a file or a PKCS#11 token, the
role certificates, the first root CRL, the database) and :func:`enrol_station` (verify a
station's enrolment request and record its keys). The other write-side duties have their
own modules: entitlements in :mod:`hq.entitlements`, later signatures by the root key and
the validity constants in :mod:`hq.root_signing`, output files in :mod:`hq.home`
(:func:`~hq.home.write_package`). The entitlement names are re-exported here for the
callers that have always imported them from ``hq.authority``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hq.entitlements import EntitlementRequest, EntitlementResult, issue_entitlement
from hq.errors import EnrolmentError, HomeError, SecretError
from hq.home import HqConfig, HqHome, HqSecrets, Pkcs11Location, cert_pem
from hq.root_signing import BACKDATE, ROLE_VALIDITY, ROOT_CRL_VALIDITY, ROOT_VALIDITY
from hq.store import HqStore, StationRow, parse_store_location
from signers.errors import SignerError
from signers.private_files import new_home, require_empty_home
from signers.software import SoftwareKey
from trustcore.crl import build_crl
from trustcore.errors import CsrError, EncodingError, InvalidValueError
from trustcore.keys import Signer, spki_der
from trustcore.messages import StationEnrolment
from trustcore.profiles import HqRole, issue_role_certificate, issue_root_ca
from trustcore.utctime import now_utc

__all__ = [
    "EnrolmentResult",
    "EntitlementRequest",
    "EntitlementResult",
    "InitResult",
    "enrol_station",
    "init_hq",
    "issue_entitlement",
]


# --------------------------------------------------------------------------------- init


@dataclass(frozen=True)
class InitResult:
    home: Path
    root_cert: x509.Certificate
    role_certs: Mapping[HqRole, x509.Certificate]
    root_in_token: bool
    root_key_generated: bool


def init_hq(
    home: Path | str,
    *,
    organization: str,
    secrets: HqSecrets,
    root_pkcs11: Pkcs11Location | None = None,
    store: str | None = None,
    now: datetime | None = None,
) -> InitResult:
    """Create a new HQ in ``home`` (absent or an empty directory; never overwritten).

    Everything is built in a private sibling directory and renamed into place at the end, so
    a failure half-way leaves no half-initialised HQ behind and ``home`` is untouched.
    ``store``: a PostgreSQL URL (an empty database) instead of ``hq.sqlite`` in ``home``;
    recorded in ``hq.json`` so that every later command opens it.
    """
    target = Path(home)
    if not organization or not organization.isprintable() or len(organization) > 64:
        raise HomeError("organisation name must be 1..64 printable characters")
    location = None if store is None else parse_store_location(store)
    require_empty_home(target, HomeError)
    moment = now_utc(now)
    passphrase = secrets.passphrase()  # fail before any key is made
    with new_home(target, HomeError) as build:
        (build / "certs").mkdir()
        (build / "keys").mkdir(mode=0o700)
        with _root_signer(build, root_pkcs11, secrets, passphrase) as (root, generated):
            root_cert = issue_root_ca(
                root.private_key(),
                common_name=f"{organization} Manufacturer Root CA",
                organization=organization,
                not_before=moment - BACKDATE,
                not_after=moment + ROOT_VALIDITY,
            )
            role_certs: dict[HqRole, x509.Certificate] = {}
            for role in HqRole:
                key = SoftwareKey.generate()
                key.save(build / "keys" / f"{role.value}.key.pem", passphrase)
                role_certs[role] = issue_role_certificate(
                    root_cert,
                    root.private_key(),
                    key.public_key(),
                    role=role,
                    common_name=f"{organization} HQ {role.value}",
                    organization=organization,
                    not_before=moment - BACKDATE,
                    not_after=moment + ROLE_VALIDITY,
                )
            # The first root CRL, while the root key is at hand (docs/pki.md).
            root_crl = build_crl(
                root_cert,
                root.private_key(),
                revoked=(),
                crl_number=1,
                this_update=moment - BACKDATE,
                next_update=moment + ROOT_CRL_VALIDITY,
            )
        # The payload-key KMS key (hq/kms.py): ECDH only, seals site payload keys at rest.
        SoftwareKey.generate().save(build / "keys" / "kms.key.pem", passphrase)
        (build / "certs" / "root-ca.pem").write_bytes(cert_pem(root_cert))
        for role, cert in role_certs.items():
            (build / "certs" / f"{role.value}.pem").write_bytes(cert_pem(cert))
        db = HqStore.create(build / "hq.sqlite" if location is None else location)
        try:
            with db.transaction():
                db.put_root_crl(
                    1,
                    int((moment - BACKDATE).timestamp()),
                    int((moment + ROOT_CRL_VALIDITY).timestamp()),
                    root_crl.public_bytes(serialization.Encoding.DER),
                )
        finally:
            db.close()
        config = HqConfig(organization, root_pkcs11, int(moment.timestamp()), store=store)
        (build / "hq.json").write_text(config.to_json(), encoding="utf-8")
    return InitResult(target, root_cert, role_certs, root_pkcs11 is not None, generated)


@contextlib.contextmanager
def _root_signer(
    build: Path, location: Pkcs11Location | None, secrets: HqSecrets, passphrase: bytes
) -> Iterator[tuple[Signer, bool]]:
    """Yield (root signer, whether it was generated now)."""
    if location is None:
        software = SoftwareKey.generate()
        software.save(build / "keys" / "root-ca.key.pem", passphrase)
        yield software, True
        return
    from signers.pkcs11 import Pkcs11KeyNotFoundError, Pkcs11Token

    try:
        token = Pkcs11Token.open(location.module, location.token, secrets.pin(), writable=True)
    except SignerError as exc:
        raise SecretError(f"cannot open token {location.token!r}: {exc}") from exc
    try:
        generated = False
        key: Signer
        try:
            key = token.key(location.label)
        except Pkcs11KeyNotFoundError:
            key = token.generate_key(location.label)
            generated = True
        yield key, generated
    except SignerError as exc:
        raise SecretError(f"root key in token {location.token!r}: {exc}") from exc
    finally:
        token.close()


# ----------------------------------------------------------------------------- enrolment


@dataclass(frozen=True)
class EnrolmentResult:
    station_id: str
    ca_key_id: str  # hex SHA-256 of the SPKI
    transport_key_id: str
    status: str  # "enrolled", "already_enrolled" or "replaced"


def enrol_station(
    home: HqHome, enrolment: bytes, *, replace: bool = False, now: datetime | None = None
) -> EnrolmentResult:
    """Verify a station enrolment request and record the station.

    The CSR self-signature proves possession of the CA key; the binding signature by that
    key covers the transport key, so nobody on the way can substitute their own encryption
    key. A station id already enrolled with another key is refused unless ``replace``: a
    silent key change would let whoever sends a request take over a station's entitlements.
    """
    moment = int(now_utc(now).timestamp())
    try:
        request = StationEnrolment.decode(enrolment)
        csr, transport = request.verify()
    except (EncodingError, CsrError, InvalidValueError) as exc:
        raise EnrolmentError(
            f"enrolment request refused: {exc.message}", reason=exc.reason
        ) from exc
    station_id = request.station_id.value
    ca_der = spki_der(csr.public_key)
    transport_der = spki_der(transport)
    if ca_der == transport_der:
        raise EnrolmentError(
            "the transport key must differ from the station CA key", reason="key_reuse"
        )
    store = HqStore.open(home.store_location)
    try:
        existing = store.station(station_id)
        if existing is not None and (
            existing.ca_public_der == ca_der and existing.transport_public_der == transport_der
        ):
            status = "already_enrolled"
        else:
            if existing is not None and not replace:
                raise EnrolmentError(
                    f"station {station_id} is already enrolled with another key "
                    "(use --replace to re-enrol it; its audit log then starts again)",
                    reason="already_enrolled",
                )
            row = StationRow(
                station_id,
                ca_der,
                transport_der,
                request.csr_der,
                moment,
                1 if existing is None else existing.generation + 1,
            )
            with store.transaction():
                store.put_station(row, replacing=existing, now=moment)
            status = "enrolled" if existing is None else "replaced"
    finally:
        store.close()
    return EnrolmentResult(
        station_id,
        hashlib.sha256(ca_der).hexdigest(),
        hashlib.sha256(transport_der).hexdigest(),
        status,
    )
