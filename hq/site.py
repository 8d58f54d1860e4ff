"""HQ's side of a building: enrol a site (issue its site CA certificate), keep the latest CRL
of each station, and write the site bundle a registrar commissions itself from.

The bundle (``trustcore.site_bundle``) is sealed by the entitlement signer to the site's
transport key with a per-site monotonic sequence. It carries the newest **root CRL** (signed
at the last root ceremony, :data:`ROOT_CRL_VALIDITY`; making a bundle never uses the root
key), the latest CRL HQ holds for each station, a freshly published HQ revocation list
(with the indirect CRL signed by the delegated CRL signer, ``hq.revocation_data``), the
site's offline limit (``max_offline_days``), the manifest and admission rules, and the
site's payload keys re-sealed from the KMS to the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hq.errors import HomeError, HqError
from hq.home import HqHome, HqSecrets
from hq.kms import ensure_site_payload_key, kms_key, site_payload_keys
from hq.root_signing import BACKDATE, ROOT_CRL_VALIDITY, issue_root_crl, sign_ca_with_root
from hq.store import HqStore, SiteRow, StationCrlRow
from trustcore.crl import load_crl, verify_crl
from trustcore.errors import (
    CrlError,
    CsrError,
    EncodingError,
    InvalidValueError,
)
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import spki_der
from trustcore.messages import SiteEnrolment
from trustcore.profiles import HqRole, issue_site_ca
from trustcore.site_bundle import (
    AdmissionEntry,
    ManifestEntry,
    SiteBundlePayload,
    seal_payload_key,
    seal_site_bundle,
)
from trustcore.site_rollover import SiteCaRollover, SiteRolloverError, site_ca_generation
from trustcore.utctime import now_utc

__all__ = [
    "DEFAULT_MAX_OFFLINE_DAYS",
    "ROOT_CRL_VALIDITY",
    "SITE_CA_VALIDITY",
    "SiteBundleRequest",
    "SiteBundleResult",
    "SiteEnrolmentResult",
    "SiteError",
    "StationCrlResult",
    "build_site_bundle",
    "enrol_site",
    "record_station_crl",
    "rollover_site_ca",
]

SITE_CA_VALIDITY = timedelta(days=5 * 365)
#: How long a site may go without fresh HQ revocation data before it refuses new
#: registrations, unless HQ chooses otherwise for the site (1..MAX_OFFLINE_DAYS).
DEFAULT_MAX_OFFLINE_DAYS = 30


class SiteError(HqError):
    reason = "site_refused"


# ------------------------------------------------------------------------------ enrolment


@dataclass(frozen=True)
class SiteEnrolmentResult:
    site_id: str
    status: str  # "enrolled", "already_enrolled" or "replaced"
    site_ca_cert: x509.Certificate
    ca_key_id: str
    transport_key_id: str

    @classmethod
    def of(
        cls, site_id: str, status: str, cert: x509.Certificate, ca_der: bytes, transport_der: bytes
    ) -> SiteEnrolmentResult:
        """The result naming both keys by the hex SHA-256 of their SPKI DER."""
        return cls(
            site_id,
            status,
            cert,
            hashlib.sha256(ca_der).hexdigest(),
            hashlib.sha256(transport_der).hexdigest(),
        )


def enrol_site(
    home: HqHome,
    enrolment: bytes,
    secrets: HqSecrets,
    *,
    replace: bool = False,
    now: datetime | None = None,
) -> SiteEnrolmentResult:
    """Verify a site enrolment request, record the site and issue its site CA certificate
    (pathLen 0, :data:`SITE_CA_VALIDITY`, never beyond the root).

    As for stations, a site id already enrolled with other keys is refused unless
    ``replace``: a silent key change would hand the site's payload keys to whoever sent the
    request. The very same request again returns the certificate already issued."""
    moment = now_utc(now)
    try:
        request = SiteEnrolment.decode(enrolment)
        csr, transport = request.verify()
    except (EncodingError, CsrError, InvalidValueError) as exc:
        raise SiteError(f"site enrolment refused: {exc.message}", reason=exc.reason) from exc
    site_id = request.site_id.value
    ca_der, transport_der = spki_der(csr.public_key), spki_der(transport)
    if ca_der == transport_der:
        raise SiteError("the transport key must differ from the site CA key", reason="key_reuse")
    store = HqStore.open(home.store_location)
    try:
        existing = store.site(site_id)
        if existing is not None and (
            existing.ca_public_der == ca_der and existing.transport_public_der == transport_der
        ):
            cert = x509.load_der_x509_certificate(existing.site_ca_der)
            status = "already_enrolled"
        else:
            if existing is not None and not replace:
                raise SiteError(
                    f"site {site_id} is already enrolled with other keys "
                    "(use --replace to re-enrol it)",
                    reason="already_enrolled",
                )
            cert = _sign_site_ca(home, secrets, moment, site_id, csr.public_key)
            row = SiteRow(
                site_id,
                ca_der,
                transport_der,
                request.csr_der,
                cert.public_bytes(serialization.Encoding.DER),
                int(moment.timestamp()),
            )
            with store.transaction():
                store.put_site(row)
                # A CA certificate was issued: a root ceremony, so the root CRL is re-signed.
                issue_root_crl(home, store, secrets, moment)
            status = "enrolled" if existing is None else "replaced"
    finally:
        store.close()
    return SiteEnrolmentResult.of(site_id, status, cert, ca_der, transport_der)


def _sign_site_ca(
    home: HqHome,
    secrets: HqSecrets,
    moment: datetime,
    site_id: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    generation: int = 1,
) -> x509.Certificate:
    """A site CA certificate for ``public_key`` signed by the root (at enrolment and at each
    rollover): :data:`SITE_CA_VALIDITY` from ``moment`` (backdated by :data:`BACKDATE`),
    never outside the root's own validity."""
    root_cert = home.root_certificate()
    end = min(moment + SITE_CA_VALIDITY, root_cert.not_valid_after_utc)
    start = max(moment - BACKDATE, root_cert.not_valid_before_utc)
    return sign_ca_with_root(
        home,
        secrets,
        lambda root_key: issue_site_ca(
            root_cert,
            root_key,
            public_key,
            site_id=SiteId(site_id),
            organization=home.config.organization,
            not_before=start,
            not_after=end,
            generation=generation,
        ),
        "the site CA",
        SiteError,
    )


def rollover_site_ca(
    home: HqHome, request_bytes: bytes, secrets: HqSecrets, *, now: datetime | None = None
) -> SiteEnrolmentResult:
    """Issue the next site CA certificate of an enrolled site from a rollover request
    (``registrar rollover-ca``, :class:`trustcore.site_rollover.SiteCaRollover`).

    The request must be signed by the site CA key HQ holds for the site (continuity) and
    carry a valid enrolment of the new key with the site's **same** transport key (bundles
    stay readable). The new certificate (generation + 1, :data:`SITE_CA_VALIDITY`) replaces
    the recorded one: the next ``hq site bundle`` carries it, and the site activates it at
    ``registrar commission``. The same request again returns the certificate already issued
    (status ``already_rolled_over``)."""
    moment = now_utc(now)
    try:
        request = SiteCaRollover.decode(request_bytes)
        enrolment = request.site_enrolment()
        csr, transport = enrolment.verify()
    except (EncodingError, CsrError, InvalidValueError) as exc:
        raise SiteError(f"site CA rollover refused: {exc.message}", reason=exc.reason) from exc
    site_id = enrolment.site_id.value
    new_der, transport_der = spki_der(csr.public_key), spki_der(transport)
    store = HqStore.open(home.store_location)
    try:
        existing = store.site(site_id)
        if existing is None:
            raise SiteError(f"site {site_id!r} is not enrolled", reason="unknown_site")
        if existing.ca_public_der == new_der and existing.csr_der == enrolment.csr_der:
            cert = x509.load_der_x509_certificate(existing.site_ca_der)
            status = "already_rolled_over"
        else:
            try:
                request.verify(existing.ca_public_der)
            except (SiteRolloverError, EncodingError, CsrError) as exc:
                raise SiteError(
                    f"site CA rollover refused: {exc.args[0]}", reason=exc.reason
                ) from exc
            if transport_der != existing.transport_public_der:
                raise SiteError(
                    "a rollover keeps the site transport key (re-enrol with --replace to "
                    "change it)",
                    reason="wrong_transport_key",
                )
            if new_der == transport_der:
                raise SiteError(
                    "the transport key must differ from the site CA key", reason="key_reuse"
                )
            previous = x509.load_der_x509_certificate(existing.site_ca_der)
            cert = _sign_site_ca(
                home,
                secrets,
                moment,
                site_id,
                csr.public_key,
                generation=site_ca_generation(previous) + 1,
            )
            row = SiteRow(
                site_id,
                new_der,
                transport_der,
                enrolment.csr_der,
                cert.public_bytes(serialization.Encoding.DER),
                existing.enrolled_at,
            )
            with store.transaction():
                store.put_site(row)
            status = "rolled_over"
    finally:
        store.close()
    return SiteEnrolmentResult.of(site_id, status, cert, new_der, transport_der)


# ----------------------------------------------------------------------------- station CRLs


@dataclass(frozen=True)
class StationCrlResult:
    station_id: str
    crl_number: int
    status: str  # "recorded", "unchanged"
    next_update: datetime


def record_station_crl(
    home: HqHome, station_id: str, crl_der: bytes, *, now: datetime | None = None
) -> StationCrlResult:
    """Keep ``crl_der`` as the latest CRL of ``station_id`` after checking it is signed by
    that station's CA key (any certificate HQ issued to it: they share key and subject). A
    CRL with a lower number than the one held is refused (rollback would un-revoke); the
    same CRL again is a no-op. Stale CRLs are recorded (they are still evidence) but the
    bundle report shows them."""
    moment = int(now_utc(now).timestamp())
    store = HqStore.open(home.store_location)
    try:
        certs = store.station_ca_certificates(station_id)
        if not certs:
            raise SiteError(
                f"station {station_id!r} has no CA certificate at HQ (not enrolled or never "
                "entitled)",
                reason="unknown_station",
            )
        issuer = x509.load_der_x509_certificate(certs[-1][1])
        try:
            revocations = verify_crl(crl_der, issuer, now=None)
        except CrlError as exc:
            raise SiteError(f"station CRL refused: {exc.message}", reason=exc.reason) from exc
        der = load_crl(crl_der).public_bytes(serialization.Encoding.DER)
        held = store.station_crl(station_id)
        if held is not None and held.crl_der == der:
            status = "unchanged"
        elif held is not None and held.crl_number >= revocations.crl_number:
            raise SiteError(
                f"CRL number {revocations.crl_number} is not newer than the one held "
                f"({held.crl_number})",
                reason="crl_rollback",
            )
        else:
            with store.transaction():
                store.put_station_crl(
                    StationCrlRow(
                        station_id,
                        revocations.crl_number,
                        int(revocations.this_update.timestamp()),
                        int(revocations.next_update.timestamp()),
                        der,
                        moment,
                    )
                )
            status = "recorded"
    finally:
        store.close()
    return StationCrlResult(station_id, revocations.crl_number, status, revocations.next_update)


# --------------------------------------------------------------------------------- root CRL


# ----------------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class SiteBundleRequest:
    """What goes to the site: devices by id, all devices of some stations, and admission
    rules (each of ``admit_stations`` with each of ``admit_products``; no products means
    the whole station)."""

    site_id: str
    devices: tuple[str, ...] = ()
    devices_from_stations: tuple[str, ...] = ()
    admit_stations: tuple[str, ...] = ()
    admit_products: tuple[str, ...] = ()
    rotate_payload_key: bool = False
    #: Days the site may go without fresh HQ revocation data before it refuses new
    #: registrations (1..MAX_OFFLINE_DAYS; docs/site.md).
    max_offline_days: int = DEFAULT_MAX_OFFLINE_DAYS


@dataclass(frozen=True)
class SiteBundleResult:
    package: bytes
    site_id: str
    sequence: int
    manifest: tuple[ManifestEntry, ...]
    admission: tuple[AdmissionEntry, ...]
    station_ids: tuple[str, ...]
    station_crls: tuple[str, ...]
    stations_without_crl: tuple[str, ...]
    payload_key_ids: tuple[str, ...]
    current_payload_key: str
    root_crl_next_update: datetime
    revocation_list_sequence: int
    package_sha256: str
    max_offline_days: int = DEFAULT_MAX_OFFLINE_DAYS
    #: A warning for the operator (root CRL ending soon), or None.
    warning: str | None = None


def _manifest(store: HqStore, request: SiteBundleRequest) -> tuple[ManifestEntry, ...]:
    entries: dict[tuple[str, str, str], ManifestEntry] = {}

    def add(device_id: str, serial: str, station_id: str) -> None:
        try:
            entry = ManifestEntry(
                DeviceId(device_id), CertSerial.from_hex(serial), StationId(station_id)
            )
        except InvalidValueError as exc:
            raise HomeError(f"stored device {device_id!r} is malformed: {exc.message}") from exc
        entries.setdefault((device_id, entry.serial.hex, station_id), entry)

    for station in request.devices_from_stations:
        if store.station(station) is None:
            raise SiteError(f"station {station!r} is not enrolled", reason="unknown_station")
        for row in store.devices(station):
            add(row.device_id, row.serial, row.station_id)
    wanted = set(request.devices)
    if wanted:
        found: set[str] = set()
        for row in store.devices_with_ids(sorted(wanted)):
            found.add(row.device_id)
            add(row.device_id, row.serial, row.station_id)
        missing = sorted(wanted - found)
        if missing:
            raise SiteError(
                f"unknown device(s) {', '.join(missing)}: no audit export reported them",
                reason="unknown_device",
            )
    return tuple(sorted(entries.values(), key=lambda e: (e.device_id, e.station_id, e.serial)))


def _admission(store: HqStore, request: SiteBundleRequest) -> tuple[AdmissionEntry, ...]:
    if request.admit_products and not request.admit_stations:
        raise SiteError("--admit-product needs --admit-station", reason="bad_request")
    rules: list[AdmissionEntry] = []
    for station in request.admit_stations:
        if store.station(station) is None:
            raise SiteError(f"station {station!r} is not enrolled", reason="unknown_station")
        if not request.admit_products:
            rules.append(AdmissionEntry(StationId(station), "", ""))
            continue
        last = store.last_entitlement_sequence(station)
        by_product: dict[str, set[str]] = {}
        for seq in range(1, last + 1):
            row = store.entitlement(station, seq)
            if row is not None:
                by_product.setdefault(row.policy.product, set()).add(row.policy.id_rule.prefix)
        for product in request.admit_products:
            prefixes = by_product.get(product)
            if not prefixes:
                raise SiteError(
                    f"station {station} has no entitlement for product {product!r}",
                    reason="unknown_product",
                )
            for prefix in sorted(prefixes):
                try:
                    rules.append(AdmissionEntry(StationId(station), product, prefix))
                except InvalidValueError as exc:
                    raise SiteError(f"cannot admit {product!r}: {exc.message}") from exc
    return tuple(rules)


def _station_material(
    store: HqStore, moment: datetime
) -> tuple[list[tuple[str, bytes]], list[StationCrlRow]]:
    """Every station CA certificate still valid (or not yet valid) at ``moment`` (a station
    has one per entitlement, all with the same key), and the CRLs HQ holds for them."""
    certs = []
    # A revoked station CA certificate stays out (the root CRL refuses it anyway); renewed
    # and re-keyed ones (hq.station_ca) are all in: devices made under any still verify.
    revoked = {serial for serial, _, _ in store.root_revocations()}
    for station_id, der in store.station_ca_certificates():
        cert = x509.load_der_x509_certificate(der)
        if cert.not_valid_after_utc > moment and format(cert.serial_number, "x") not in revoked:
            certs.append((station_id, der))
    stations = {sid for sid, _ in certs}
    crls = [row for row in store.station_crls() if row.station_id in stations]
    # The CRLs of keys a station re-keyed away from: one per retired key.
    crls += [row for row in store.retired_station_crls() if row.station_id in stations]
    return certs, crls


def build_site_bundle(
    home: HqHome,
    request: SiteBundleRequest,
    secrets: HqSecrets,
    *,
    now: datetime | None = None,
    approvals: Sequence[bytes] = (),
) -> SiteBundleResult:
    """Build, record and return the site's next bundle (see the module docstring).

    Everything HQ decides here (a new payload key, the root CRL number, the first revocation
    list, the bundle sequence) commits in one transaction before the package is returned."""
    from hq.approvals import EXPORT_PAYLOAD_KEY, authorize, precheck, site_bundle_params
    from hq.revocation_data import (
        MAX_OFFLINE_DAYS,
        latest_root_crl,
        publish_revocations,
        root_crl_warning,
    )

    moment = now_utc(now)
    days = request.max_offline_days
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_OFFLINE_DAYS:
        raise SiteError(
            f"max offline days must be 1..{MAX_OFFLINE_DAYS}, not {days!r}", reason="bad_request"
        )
    # The bundle exports the site's payload keys: HQ may require a quorum for that.
    quorum_params = site_bundle_params(request.site_id)
    precheck(home, EXPORT_PAYLOAD_KEY, quorum_params, approvals, now=int(moment.timestamp()))
    kms = kms_key(home, secrets)  # fail before anything else on an HQ without a KMS
    store = HqStore.open(home.store_location)
    try:
        site = store.site(request.site_id)
        if site is None:
            raise SiteError(f"site {request.site_id!r} is not enrolled", reason="unknown_site")
        manifest = _manifest(store, request)
        admission = _admission(store, request)
        station_certs, station_crls = _station_material(store, moment)
        transport = serialization.load_der_public_key(site.transport_public_der)
        signer = home.role_key(HqRole.ENTITLEMENT_SIGNER, secrets)
        with store.transaction() as conn:
            authorize(
                home,
                EXPORT_PAYLOAD_KEY,
                quorum_params,
                approvals,
                conn=conn,
                now=int(moment.timestamp()),
            )
            ensure_site_payload_key(
                store,
                kms,
                site.site_id,
                rotate=request.rotate_payload_key,
                now=int(moment.timestamp()),
            )
            keys, current = site_payload_keys(store, kms, site.site_id)
            sealed_keys = tuple(
                seal_payload_key(transport, k, created=int(moment.timestamp()))  # type: ignore[arg-type]
                for k in keys
            )
            # The root CRL of the last root ceremony: making a bundle never uses the root key.
            root_crl = latest_root_crl(store)
            if (
                root_crl is None
                or root_crl.next_update_utc is None
                or (root_crl.next_update_utc <= moment)
            ):
                raise SiteError(
                    "HQ has no current root CRL: run `hq root-crl` (root ceremony) first",
                    reason="root_crl_stale",
                )
            revocations, rl_package = publish_revocations(home, store, secrets, moment)
            rl_sequence = revocations.sequence
            payload = SiteBundlePayload(
                site_id=SiteId(site.site_id),
                site_ca_cert_der=site.site_ca_der,
                root_cert_der=home.root_certificate().public_bytes(serialization.Encoding.DER),
                station_ca_certs_der=tuple(der for _, der in station_certs),
                root_crl_der=root_crl.public_bytes(serialization.Encoding.DER),
                station_crls_der=tuple(row.crl_der for row in station_crls),
                revocation_list=rl_package,
                manifest=manifest,
                admission=admission,
                payload_keys=sealed_keys,
                current_payload_key=current,
                max_offline_days=days,
            )
            sequence = store.last_bundle_sequence(site.site_id) + 1
            package = seal_site_bundle(
                payload,
                sender=signer,
                sender_cert=home.role_certificate(HqRole.ENTITLEMENT_SIGNER),
                site_transport_public=transport,  # type: ignore[arg-type]
                sequence=sequence,
                created=int(moment.timestamp()),
            )
            digest = hashlib.sha256(package).digest()
            store.put_bundle(site.site_id, sequence, digest, int(moment.timestamp()), len(manifest))
    finally:
        store.close()
    stations = tuple(sorted({sid for sid, _ in station_certs}))
    with_crl = tuple(sorted({row.station_id for row in station_crls}))
    next_update = root_crl.next_update_utc
    assert next_update is not None
    return SiteBundleResult(
        package=package,
        site_id=site.site_id,
        sequence=sequence,
        manifest=manifest,
        admission=admission,
        station_ids=stations,
        station_crls=with_crl,
        stations_without_crl=tuple(s for s in stations if s not in with_crl),
        payload_key_ids=tuple(k.key_id.hex() for k in keys),
        current_payload_key=current.hex(),
        root_crl_next_update=next_update,
        revocation_list_sequence=rl_sequence,
        package_sha256=digest.hex(),
        max_offline_days=days,
        warning=root_crl_warning(root_crl, moment, home.role_certificate(HqRole.CRL_SIGNER)),
    )
