"""The HQ authority: create the HQ, enrol factory stations, issue entitlements.

This is the composition root of the write-side HQ operations: it wires the keystore or
token (``hq.home``) and the database (``hq.store``) into the pure core (certificate profiles,
CSR checks, the entitlement policy, sealed packages).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets as _random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import EnrolmentError, EntitlementError, HomeError, HqError, SecretError
from hq.home import HqConfig, HqHome, HqSecrets, Pkcs11Location, cert_pem
from hq.store import EntitlementRow, HqStore, StationRow, parse_store_location
from signers.errors import SignerError
from signers.private_files import write_private_file
from signers.software import SoftwareKey
from trustcore.crl import RevokedEntry, build_crl
from trustcore.device_secrets import MAX_SECRET_BYTES, MIN_SECRET_BYTES
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, QuorumRule, SecretRule
from trustcore.errors import CsrError, EncodingError, InvalidValueError, ProfileError
from trustcore.identity import CertSerial, StationId
from trustcore.keys import Signer, spki_der
from trustcore.messages import CT_ENTITLEMENT, EntitlementPayload, StationEnrolment
from trustcore.profiles import HqRole, issue_role_certificate, issue_root_ca, issue_station_ca
from trustcore.sealed import seal_package
from trustcore.utctime import aware_utc, now_utc, to_unix

__all__ = [
    "EnrolmentResult",
    "EntitlementRequest",
    "EntitlementResult",
    "InitResult",
    "enrol_station",
    "init_hq",
    "issue_entitlement",
    "issue_root_crl",
    "sign_ca_with_root",
    "sign_station_ca",
]

ROOT_VALIDITY = timedelta(days=20 * 365)
ROLE_VALIDITY = timedelta(days=5 * 365)
#: A device made on the last day of an entitlement must verify for this long (stock plus
#: a ten-year field life): HQ refuses an entitlement whose window ends later than the
#: root's notAfter minus this, because the station CA cannot outlive the root.
DEVICE_LIFETIME = timedelta(days=12 * 365)
#: The root CRL, signed only at a root ceremony (CA issuance or revocation, ``hq root-crl``).
ROOT_CRL_VALIDITY = timedelta(days=365)
#: Certificates start a little in the past so a station whose clock is slightly behind
#: HQ's does not see them as not yet valid.
BACKDATE = timedelta(minutes=5)


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
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise HomeError(f"{target} already exists and is not empty; refusing to overwrite it")
    moment = now_utc(now)
    passphrase = secrets.passphrase()  # fail before any key is made
    target.parent.mkdir(parents=True, exist_ok=True)
    build = target.parent / f".{target.name}.init-{os.getpid()}-{_random.token_hex(4)}"
    build.mkdir(mode=0o700)
    try:
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
        try:
            # rename() onto an empty directory replaces it; onto a non-empty one it fails, so
            # an HQ created concurrently is never overwritten.
            build.rename(target)
        except OSError as exc:
            raise HomeError(f"cannot create {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
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


# --------------------------------------------------------------------------- entitlement


@dataclass(frozen=True)
class EntitlementRequest:
    """What the operator asks for; HQ adds the sequence number and the station CA cert."""

    station_id: str
    product: str
    total_quota: int
    daily_limit: int
    day_timezone: str
    not_before: datetime
    not_after: datetime
    id_rule: DeviceIdRule
    product_secrets: Mapping[str, bytes] = field(default_factory=dict)
    quorum: tuple[QuorumRule, ...] = ()
    #: Rules for some of ``product_secrets``; a secret without one goes to every device of
    #: the entitlement, of its product, until the key-use window ends.
    secret_rules: tuple[SecretRule, ...] = ()
    #: Issue even when the device-id range overlaps another station's entitlement: an
    #: explicit operator decision, recorded in ``entitlement_overrides`` (docs/hq.md).
    allow_overlap: bool = False


@dataclass(frozen=True)
class EntitlementResult:
    package: bytes
    policy: EntitlementPolicy
    station_ca_cert: x509.Certificate
    package_sha256: str
    #: Entitlements of other stations whose device-id range this one overlaps (issued
    #: only with ``allow_overlap``; each recorded as an override).
    overlaps: tuple[str, ...] = ()


def _zone_hint(message: str) -> EntitlementError:
    return EntitlementError(f"{message} (e.g. 2025-01-01T00:00:00Z)")


def issue_entitlement(
    home: HqHome,
    request: EntitlementRequest,
    secrets: HqSecrets,
    *,
    now: datetime | None = None,
    approvals: Sequence[bytes] = (),
) -> EntitlementResult:
    """Issue the station's next entitlement: a fresh station CA certificate valid until the
    root ends (devices outlive the key-use window, docs/pki.md), the policy with the next
    monotonic sequence, the audit receiver
    certificate and the product secrets, sealed (signed by the entitlement signer, encrypted
    to the station's enrolled transport key), and recorded before it is returned.

    An entitlement above HQ's quorum threshold needs ``approvals`` (``hq.approvals``): they
    are checked before anything is signed and consumed with the entitlement's record."""
    from hq.approvals import ISSUE_ENTITLEMENT, authorize, entitlement_params, precheck

    moment = now_utc(now)
    not_before = to_unix(aware_utc("not_before", request.not_before, _zone_hint))
    not_after = to_unix(aware_utc("not_after", request.not_after, _zone_hint))
    quorum_params = entitlement_params(request)
    precheck(home, ISSUE_ENTITLEMENT, quorum_params, approvals, now=int(moment.timestamp()))
    if not_after <= int(moment.timestamp()):
        raise EntitlementError("the key-use window has already ended", reason="window_expired")
    secret_rules = _secret_rules(request, not_after)
    store = HqStore.open(home.store_location)
    try:
        station = store.station(request.station_id)
        if station is None:
            raise EntitlementError(
                f"station {request.station_id!r} is not enrolled", reason="unknown_station"
            )
        sequence = store.last_entitlement_sequence(station.station_id) + 1
        try:
            policy = EntitlementPolicy(
                entitlement_id=f"ent-{sequence:06d}-{_random.token_hex(6)}",
                station_id=station.station_id,
                sequence=sequence,
                product=request.product,
                total_quota=request.total_quota,
                daily_limit=request.daily_limit,
                day_timezone=request.day_timezone,
                not_before=not_before,
                not_after=not_after,
                id_rule=request.id_rule,
                quorum=request.quorum,
                secrets=secret_rules,
            )
        except InvalidValueError as exc:
            raise EntitlementError(f"invalid policy: {exc.message}", reason="bad_policy") from exc
        overlaps = _overlapping_entitlements(store, station.station_id, request.id_rule)
        if overlaps and not request.allow_overlap:
            raise EntitlementError(
                f"device ids {_id_span(request.id_rule)} overlap {', '.join(overlaps[:3])}"
                f"{' and more' if len(overlaps) > 3 else ''}: two stations would make devices "
                "with the same id (--allow-overlap to issue anyway; it is recorded)",
                reason="overlapping_range",
            )
        root_cert = home.root_certificate()
        signer = home.role_key(HqRole.ENTITLEMENT_SIGNER, secrets)
        station_ca = _issue_station_ca(home, station, policy, root_cert, secrets, moment)
        payload = EntitlementPayload(
            policy=policy,
            station_ca_cert_der=station_ca.public_bytes(serialization.Encoding.DER),
            audit_receiver_cert_der=home.role_certificate(HqRole.AUDIT_RECEIVER).public_bytes(
                serialization.Encoding.DER
            ),
            product_secrets=dict(request.product_secrets),
            crl_signer_cert_der=_crl_signer_der(home),
        )
        transport = serialization.load_der_public_key(station.transport_public_der)
        package = seal_package(
            content_type=CT_ENTITLEMENT,
            payload=payload.encode(),
            sender=signer,
            sender_cert=home.role_certificate(HqRole.ENTITLEMENT_SIGNER),
            receiver_public=transport,  # type: ignore[arg-type]
            sequence=sequence,
            created=int(moment.timestamp()),
        )
        digest = hashlib.sha256(package).digest()
        row = EntitlementRow(
            station.station_id,
            sequence,
            policy.entitlement_id,
            policy,
            payload.station_ca_cert_der,
            format(station_ca.serial_number, "x"),
            int(moment.timestamp()),
        )
        # Recorded before the package is handed out: HQ must know every entitlement it issued
        # (the audit of the station is reconciled against it).
        with store.transaction() as conn:
            authorize(
                home,
                ISSUE_ENTITLEMENT,
                quorum_params,
                approvals,
                conn=conn,
                now=int(moment.timestamp()),
            )
            store.put_entitlement(row, digest)
            if overlaps:
                store.put_entitlement_override(
                    station.station_id,
                    sequence,
                    "overlapping_range",
                    f"device ids {_id_span(request.id_rule)} overlap {', '.join(overlaps)}",
                    int(moment.timestamp()),
                )
            # A CA certificate was issued: a root ceremony, so the root CRL is re-signed.
            issue_root_crl(home, store, secrets, moment)
    finally:
        store.close()
    return EntitlementResult(package, policy, station_ca, digest.hex(), tuple(overlaps))


def _id_span(rule: DeviceIdRule) -> str:
    return f"{rule.device_id(rule.first)}..{rule.device_id(rule.last)}"


def _overlapping_entitlements(store: HqStore, station_id: str, rule: DeviceIdRule) -> list[str]:
    """The entitlements of other stations that allow a device id ``rule`` allows too."""
    return [
        f"station {other} entitlement {sequence} ({_id_span(theirs)})"
        for other, sequence, theirs in store.other_stations_id_rules(station_id)
        if rule.overlaps(theirs)
    ]


def _secret_rules(request: EntitlementRequest, not_after: int) -> tuple[SecretRule, ...]:
    """One rule per product secret (explicit, or the default: all of the entitlement's
    devices of its product until the window ends); each value must fit a device TPM's
    HMAC key (``trustcore.device_secrets``)."""
    explicit = {r.name: r for r in request.secret_rules}
    if len(explicit) != len(request.secret_rules):
        raise EntitlementError("two rules for one product secret", reason="bad_policy")
    orphans = sorted(set(explicit) - set(request.product_secrets))
    if orphans:
        raise EntitlementError(f"rule for a secret not given: {orphans}", reason="bad_policy")
    rules = []
    for name, value in sorted(request.product_secrets.items()):
        if not MIN_SECRET_BYTES <= len(value) <= MAX_SECRET_BYTES:
            raise EntitlementError(
                f"product secret {name!r} is {len(value)} bytes; a device TPM HMAC key takes "
                f"{MIN_SECRET_BYTES}..{MAX_SECRET_BYTES}",
                reason="bad_secret",
            )
        try:
            rules.append(
                explicit.get(name)
                or SecretRule(
                    name,
                    (request.product,),
                    request.id_rule.first,
                    request.id_rule.last,
                    not_after,
                )
            )
        except InvalidValueError as exc:
            raise EntitlementError(f"bad product secret: {exc}", reason="bad_secret") from exc
    return tuple(rules)


def _crl_signer_der(home: HqHome) -> bytes | None:
    """The CRL signer certificate the station names in its IDevIDs' CRLDistributionPoints
    (None for an HQ made before the role existed, until ``hq root-crl`` creates it)."""
    if not (home.certs_dir / f"{HqRole.CRL_SIGNER.value}.pem").exists():
        return None
    return home.role_certificate(HqRole.CRL_SIGNER).public_bytes(serialization.Encoding.DER)


def _issue_station_ca(
    home: HqHome,
    station: StationRow,
    policy: EntitlementPolicy,
    root_cert: x509.Certificate,
    secrets: HqSecrets,
    moment: datetime,
) -> x509.Certificate:
    """The station CA certificate for this entitlement: the enrolled CA key, valid from the
    window start (or now, whichever is earlier; never before the root) until the root's
    notAfter. It outlives the entitlement on purpose: the devices it signs must verify for
    their whole life; the window bounds issuance (station policy, HQ audit), docs/pki.md."""
    subject_key = serialization.load_der_public_key(station.ca_public_der)
    start = datetime.fromtimestamp(policy.not_before - policy.clock_skew_s, UTC)
    start = max(min(start, moment - BACKDATE), root_cert.not_valid_before_utc)
    window_end = datetime.fromtimestamp(policy.not_after, UTC)
    end = root_cert.not_valid_after_utc
    if window_end + DEVICE_LIFETIME > end:
        raise EntitlementError(
            f"the root CA ends {end.isoformat()}: devices made until {window_end.isoformat()} "
            f"would not verify for {DEVICE_LIFETIME.days // 365} years (a new root is needed)",
            reason="root_too_short",
        )
    return sign_station_ca(
        home,
        secrets,
        root_cert,
        subject_key,  # type: ignore[arg-type]
        station.station_id,
        (start, end),
        EntitlementError,
    )


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


def write_package(path: Path, data: bytes) -> None:
    """Write an output file without replacing an existing one (atomic, 0600: it is sealed,
    but there is no reason to let others copy it)."""
    try:
        write_private_file(path, data)
    except SignerError as exc:  # the output's directory (a USB stick): full, read-only, …
        raise HomeError(str(exc), reason="output_not_written") from exc


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
