"""``hq entitle``: issue a factory station its next entitlement package.

Owns: :class:`EntitlementRequest` (what the operator asks for), :func:`issue_entitlement`
(policy with the next sequence, a fresh station CA certificate, the product secrets, sealed
to the station and recorded before it is returned) and the checks it makes on the way
(product secret sizes and rules, device-id ranges that overlap another station's,
a root too short for the devices' life: :data:`DEVICE_LIFETIME`).
"""

from __future__ import annotations

import hashlib
import secrets as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hq.errors import EntitlementError
from hq.home import HqHome, HqSecrets
from hq.root_signing import BACKDATE, issue_root_crl, sign_station_ca
from hq.store import EntitlementRow, HqStore, StationRow
from trustcore.device_secrets import MAX_SECRET_BYTES, MIN_SECRET_BYTES
from trustcore.entitlement import DeviceIdRule, EntitlementPolicy, QuorumRule, SecretRule
from trustcore.errors import InvalidValueError
from trustcore.messages import CT_ENTITLEMENT, EntitlementPayload
from trustcore.profiles import HqRole
from trustcore.sealed import seal_package
from trustcore.utctime import aware_utc, now_utc, to_unix

__all__ = [
    "DEVICE_LIFETIME",
    "EntitlementRequest",
    "EntitlementResult",
    "issue_entitlement",
]

#: A device made on the last day of an entitlement must verify for this long (stock plus
#: a ten-year field life): HQ refuses an entitlement whose window ends later than the
#: root's notAfter minus this, because the station CA cannot outlive the root.
DEVICE_LIFETIME = timedelta(days=12 * 365)


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
