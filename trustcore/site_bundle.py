"""A building registrar's decision about a site bundle, as one ordered list of named checks.

The bundle's bytes (payload, manifest, admission rules, sealed payload keys) live in
:mod:`trustcore.site_bundle_format`; every public name there is re-exported here, where the
registrar, HQ and the tests import them.

:func:`verify_site_bundle` is the whole decision a registrar makes before it writes
anything (pure; the caller supplies the pinned root, its keys and its last sequence). Like
:mod:`trustcore.issuance` it runs :data:`SITE_BUNDLE_CHECKS` in a fixed order; the first
refusal wins and names its check (``SiteBundleError.check``), and each check only reads what
the checks before it have established (:class:`BundleFindings`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore.crl import RevocationSet, verify_crl
from trustcore.errors import (
    CrlError,
    EncodingError,
    ProfileError,
    ReplayError,
    SealedPackageError,
    TrustCoreError,
    VerificationError,
)
from trustcore.identity import SiteId
from trustcore.keys import KeyAgreement, key_id, spki_der
from trustcore.profiles import (
    OID_EKU_ENTITLEMENT_SIGNER,
    site_id_from_certificate,
    station_id_from_certificate,
)
from trustcore.revocation import RevocationList, RevocationListError, open_revocation_list
from trustcore.sealed import OpenedPackage, PackageHeader, open_package, peek
from trustcore.site_bundle_format import (
    CT_SITE_BUNDLE,
    MAX_SITE_BUNDLE_SIZE,
    PAYLOAD_KEY_AT_REST_INFO,
    AdmissionEntry,
    ManifestEntry,
    SealedPayloadKey,
    SiteBundlePayload,
    open_sealed_payload_key,
    seal_payload_key,
    seal_site_bundle,
)
from trustcore.verify import ChainVerifier

__all__ = [
    "CT_SITE_BUNDLE",
    "MAX_SITE_BUNDLE_SIZE",
    "PAYLOAD_KEY_AT_REST_INFO",
    "SITE_BUNDLE_CHECKS",
    "AdmissionEntry",
    "BundleFindings",
    "ManifestEntry",
    "SealedPayloadKey",
    "SiteBundleError",
    "SiteBundleInputs",
    "SiteBundlePayload",
    "VerifiedSiteBundle",
    "open_sealed_payload_key",
    "seal_payload_key",
    "seal_site_bundle",
    "verify_site_bundle",
]


class SiteBundleError(TrustCoreError):
    """A site bundle was refused; ``reason`` is a stable code (see :func:`verify_site_bundle`)
    and ``check`` the name of the check in :data:`SITE_BUNDLE_CHECKS` that refused it."""

    reason = "malformed"
    check = ""


@dataclass(frozen=True)
class VerifiedSiteBundle:
    """A bundle that passed every check of :func:`verify_site_bundle`."""

    sequence: int
    created: int
    payload: SiteBundlePayload
    sender_cert: x509.Certificate
    site_ca_cert: x509.Certificate
    root_crl: x509.CertificateRevocationList
    root_revocations: RevocationSet
    station_cas: tuple[x509.Certificate, ...]
    station_crls: tuple[x509.CertificateRevocationList, ...]
    #: station ids whose CRL in the bundle is past nextUpdate, or that have none: brokers
    #: that check the whole chain refuse those stations' devices until a fresh CRL arrives.
    stale_station_crls: tuple[str, ...]
    stations_without_crl: tuple[str, ...]
    revocations: RevocationList


@dataclass(frozen=True)
class SiteBundleInputs:
    """What the registrar supplies: the package and everything it pins or remembers."""

    package: bytes
    root: x509.Certificate
    transport: KeyAgreement
    site_id: SiteId
    site_ca_public: ec.EllipticCurvePublicKey
    last_sequence: int | None
    last_revocation_sequence: int | None
    now: datetime


class BundleFindings:
    """What the checks have established so far, filled in check order (working state of one
    verification, not a value: :class:`VerifiedSiteBundle` is the result). A check that
    read a finding no earlier check set would fail with ``AttributeError``, never pass."""

    header: PackageHeader
    sender_cert: x509.Certificate
    opened: OpenedPackage
    payload: SiteBundlePayload
    root_crl: x509.CertificateRevocationList
    root_revocations: RevocationSet
    site_ca: x509.Certificate
    station_cas: tuple[x509.Certificate, ...]
    station_crls: tuple[x509.CertificateRevocationList, ...]
    stale_station_crls: tuple[str, ...]
    stations_without_crl: tuple[str, ...]
    revocations: RevocationList


#: One check: refuses with :class:`SiteBundleError`, or records what it established.
SiteBundleCheck = Callable[[SiteBundleInputs, BundleFindings], None]


def _fail(reason: str, message: str) -> SiteBundleError:
    return SiteBundleError(message, reason=reason)


def _cert(der: bytes, what: str) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return x509.load_der_x509_certificate(der)
    except (ValueError, Warning) as exc:
        raise _fail("bad_certificate", f"{what} is not a DER certificate") from exc


def _issued_ca(cert: x509.Certificate, root: x509.Certificate, what: str) -> None:
    """``cert`` must be a pathLen-0 CA directly issued by the pinned root."""
    try:
        cert.verify_directly_issued_by(root)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
        raise _fail("bad_certificate", f"{what} is not issued by the pinned root") from exc
    if not bc.ca or bc.path_length != 0:
        raise _fail("bad_certificate", f"{what} is not a CA with pathLen 0")


# ------------------------------------------------------------------------------ the checks


def check_sealed_header(i: SiteBundleInputs, f: BundleFindings) -> None:
    """A sealed site bundle, encrypted, to this site's transport key."""
    try:
        header = peek(i.package, max_size=MAX_SITE_BUNDLE_SIZE)
    except SealedPackageError as exc:
        raise _fail(exc.reason, f"not a site bundle: {exc.message}") from exc
    if header.content_type != CT_SITE_BUNDLE:
        raise _fail("wrong_content_type", f"content type is {header.content_type!r}")
    if not header.encrypted:
        raise _fail("not_encrypted", "a site bundle must be encrypted to the site")
    if header.receiver_key_id != key_id(i.transport.public_key()):
        raise _fail(
            "wrong_site", "this bundle is encrypted to another site's transport key, not ours"
        )
    f.header = header


def check_sender(i: SiteBundleInputs, f: BundleFindings) -> None:
    """The sender chains to the pinned root as HQ's entitlement signer at ``now``."""
    try:
        sender_cert = f.header.sender_certificate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ChainVerifier(
                [i.root], required_eku=OID_EKU_ENTITLEMENT_SIGNER, require_crl=False
            ).verify(sender_cert, now=i.now)
    except (SealedPackageError, VerificationError) as exc:
        raise _fail(
            "untrusted_sender", f"sender is not HQ's entitlement signer: {exc.message}"
        ) from exc
    f.sender_cert = sender_cert


def check_open(i: SiteBundleInputs, f: BundleFindings) -> None:
    """Signature, sender, sequence (no replay or rollback) and decryption."""
    sender_public = f.sender_cert.public_key()
    assert isinstance(sender_public, ec.EllipticCurvePublicKey)  # checked by the verifier
    try:
        f.opened = open_package(
            i.package,
            receiver=i.transport,
            expected_content_type=CT_SITE_BUNDLE,
            trusted_sender_public=sender_public,
            last_sequence=i.last_sequence,
            max_size=MAX_SITE_BUNDLE_SIZE,
        )
    except ReplayError as exc:
        raise _fail(
            "replayed",
            f"bundle sequence {f.header.sequence} is not newer than the one imported last "
            f"({i.last_sequence}): a replayed or older bundle",
        ) from exc
    except SealedPackageError as exc:
        raise _fail(exc.reason, f"bundle refused: {exc.message}") from exc


def check_payload(i: SiteBundleInputs, f: BundleFindings) -> None:
    """The payload decodes and names this site."""
    try:
        payload = SiteBundlePayload.decode(f.opened.payload)
    except EncodingError as exc:
        raise _fail(exc.reason, f"bundle payload: {exc.message}") from exc
    if payload.site_id != i.site_id:
        raise _fail("wrong_site", f"bundle is for site {payload.site_id}, this is {i.site_id}")
    f.payload = payload


def check_root(i: SiteBundleInputs, f: BundleFindings) -> None:
    """The bundle carries the pinned root."""
    if f.payload.root_cert_der != i.root.public_bytes(serialization.Encoding.DER):
        raise _fail("wrong_root", "the bundle's root certificate is not the pinned root")


def check_root_crl(i: SiteBundleInputs, f: BundleFindings) -> None:
    """The root CRL verifies against the pinned root and is fresh (fail closed)."""
    try:
        root_crl = x509.load_der_x509_crl(f.payload.root_crl_der)
        f.root_revocations = verify_crl(root_crl, i.root, now=i.now)
    except ValueError as exc:
        raise _fail("bad_crl", "root CRL does not parse") from exc
    except CrlError as exc:
        reason = "crl_stale" if exc.reason in ("crl_stale", "crl_not_yet_valid") else "bad_crl"
        raise _fail(reason, f"root CRL: {exc.message}") from exc
    f.root_crl = root_crl


def check_sender_not_revoked(i: SiteBundleInputs, f: BundleFindings) -> None:
    if f.sender_cert.serial_number in f.root_revocations:
        raise _fail("revoked_sender", "the root CRL revokes the bundle sender's certificate")


def check_site_ca(i: SiteBundleInputs, f: BundleFindings) -> None:
    """Root issued, pathLen 0, this site id, this site's CA key, valid now, not revoked."""
    site_ca = _cert(f.payload.site_ca_cert_der, "site CA certificate")
    _issued_ca(site_ca, i.root, "site CA certificate")
    try:
        cert_site = site_id_from_certificate(site_ca)
    except ProfileError as exc:
        raise _fail("bad_certificate", f"site CA certificate: {exc.message}") from exc
    if cert_site != i.site_id:
        raise _fail("wrong_site", f"site CA certificate is for {cert_site}, this is {i.site_id}")
    if spki_der(site_ca.public_key()) != spki_der(i.site_ca_public):
        raise _fail("wrong_site_key", "site CA certificate does not certify this site's CA key")
    if not site_ca.not_valid_before_utc <= i.now <= site_ca.not_valid_after_utc:
        raise _fail("bad_certificate", "site CA certificate is not valid now")
    if site_ca.serial_number in f.root_revocations:
        raise _fail("revoked", "the root CRL revokes this site's CA certificate")
    f.site_ca = site_ca


def check_station_cas(i: SiteBundleInputs, f: BundleFindings) -> None:
    """Each station CA: root issued, pathLen 0, a station id."""
    station_cas: list[x509.Certificate] = []
    for n, der in enumerate(f.payload.station_ca_certs_der):
        cert = _cert(der, f"station CA certificate #{n}")
        _issued_ca(cert, i.root, f"station CA certificate #{n}")
        try:
            station_id_from_certificate(cert)
        except ProfileError as exc:
            raise _fail("bad_certificate", f"station CA certificate #{n}: {exc.message}") from exc
        station_cas.append(cert)
    f.station_cas = tuple(station_cas)


def check_station_crls(i: SiteBundleInputs, f: BundleFindings) -> None:
    """Each station CRL verifies against a station CA of the bundle; a stale one is accepted
    and reported (``stale_station_crls``), as are stations without one."""
    station_crls: list[x509.CertificateRevocationList] = []
    stale: list[str] = []
    covered: set[str] = set()
    for n, der in enumerate(f.payload.station_crls_der):
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            raise _fail("bad_crl", f"station CRL #{n} does not parse") from exc
        issuers = [c for c in f.station_cas if c.subject == crl.issuer]
        revs: RevocationSet | None = None
        for issuer in issuers:
            try:
                revs = verify_crl(crl, issuer, now=None)
                break
            except CrlError:
                continue
        if revs is None:
            raise _fail("bad_crl", f"station CRL #{n} does not verify against any station CA")
        name = station_id_from_certificate(issuers[0]).value
        covered.add(name)
        try:
            revs.check_fresh(i.now)
        except CrlError:
            stale.append(name)
        station_crls.append(crl)
    f.station_crls = tuple(station_crls)
    f.stale_station_crls = tuple(sorted(set(stale)))
    f.stations_without_crl = tuple(
        sorted({station_id_from_certificate(c).value for c in f.station_cas} - covered)
    )


def check_revocation_list(i: SiteBundleInputs, f: BundleFindings) -> None:
    """The HQ revocation list verifies and is not older than the one imported last."""
    try:
        f.revocations = open_revocation_list(
            f.payload.revocation_list,
            root=i.root,
            now=i.now,
            root_crl=f.root_crl,
            not_older_than=i.last_revocation_sequence,
        )
    except RevocationListError as exc:
        reason = "revocation_rollback" if exc.reason == "rollback" else "bad_revocation_list"
        raise _fail(reason, f"HQ revocation list: {exc.message}") from exc


def check_payload_keys(i: SiteBundleInputs, f: BundleFindings) -> None:
    """At least one key, distinct ids, the current id among them, and every key opens."""
    keys = f.payload.payload_keys
    if not keys:
        raise _fail("bad_payload_key", "the bundle carries no payload key")
    kids = [k.key_id for k in keys]
    if len(set(kids)) != len(kids):
        raise _fail("bad_payload_key", "payload key ids repeat")
    if f.payload.current_payload_key not in kids:
        raise _fail("bad_payload_key", "the current payload key id is not in the bundle")
    for sealed in keys:
        try:
            open_sealed_payload_key(i.transport, sealed)
        except (SealedPackageError, TrustCoreError) as exc:
            raise _fail(
                "bad_payload_key", f"payload key {sealed.key_id.hex()} does not open: {exc.message}"
            ) from exc


#: Every check a site bundle must pass, in the order they run.
SITE_BUNDLE_CHECKS: tuple[SiteBundleCheck, ...] = (
    check_sealed_header,
    check_sender,
    check_open,
    check_payload,
    check_root,
    check_root_crl,
    check_sender_not_revoked,
    check_site_ca,
    check_station_cas,
    check_station_crls,
    check_revocation_list,
    check_payload_keys,
)


def verify_site_bundle(
    package: bytes,
    *,
    root: x509.Certificate,
    transport: KeyAgreement,
    site_id: SiteId,
    site_ca_public: ec.EllipticCurvePublicKey,
    last_sequence: int | None,
    last_revocation_sequence: int | None,
    now: datetime,
) -> VerifiedSiteBundle:
    """Decide whether this site accepts ``package``: every check of
    :data:`SITE_BUNDLE_CHECKS` in order; the first failing one decides the
    ``SiteBundleError.reason`` (and names itself in ``SiteBundleError.check``):

    1. ``check_sealed_header``: ``malformed`` / ``oversized``: not a sealed package;
       ``wrong_content_type``: not a site bundle; ``not_encrypted``: signed-only;
       ``wrong_site``: encrypted to another transport key (another site's bundle);
    2. ``check_sender``: ``untrusted_sender``: the sender certificate does not chain to the
       pinned root with the entitlement-signer EKU at ``now``;
    3. ``check_open``: ``bad_signature`` / ``wrong_sender`` / ``replayed`` (sequence not
       above ``last_sequence``: replay or rollback) / ``decrypt_failed``;
    4. ``check_payload``: ``malformed``: payload; ``wrong_site``: the payload names another
       site id;
    5. ``check_root``: ``wrong_root``: the bundle's root is not the pinned root;
    6. ``check_root_crl``: ``crl_stale`` / ``bad_crl``: the root CRL (must verify and be
       fresh: fail closed);
    7. ``check_sender_not_revoked``: ``revoked_sender``: the root CRL revokes the sender;
    8. ``check_site_ca``: ``bad_certificate`` / ``wrong_site`` / ``wrong_site_key`` /
       ``revoked``: the site CA certificate (root issued, pathLen 0, this site id, this
       site's CA key, valid now, not revoked);
    9. ``check_station_cas``: ``bad_certificate``: each station CA (root issued, pathLen 0,
       station id);
    10. ``check_station_crls``: ``bad_crl``: a station CRL that does not verify against a
        station CA in the bundle (a stale one is accepted and reported, see
        :class:`VerifiedSiteBundle`);
    11. ``check_revocation_list``: ``bad_revocation_list`` / ``revocation_rollback``: the
        HQ revocation list;
    12. ``check_payload_keys``: ``bad_payload_key``: a payload key that does not open,
        duplicate key ids, or a current key id that is not among them.
    """
    inputs = SiteBundleInputs(
        package=package,
        root=root,
        transport=transport,
        site_id=site_id,
        site_ca_public=site_ca_public,
        last_sequence=last_sequence,
        last_revocation_sequence=last_revocation_sequence,
        now=now,
    )
    found = BundleFindings()
    for check in SITE_BUNDLE_CHECKS:
        try:
            check(inputs, found)
        except SiteBundleError as exc:
            exc.check = check.__name__
            raise
    return VerifiedSiteBundle(
        sequence=found.header.sequence,
        created=found.header.created,
        payload=found.payload,
        sender_cert=found.sender_cert,
        site_ca_cert=found.site_ca,
        root_crl=found.root_crl,
        root_revocations=found.root_revocations,
        station_cas=found.station_cas,
        station_crls=found.station_crls,
        stale_station_crls=found.stale_station_crls,
        stations_without_crl=found.stations_without_crl,
        revocations=found.revocations,
    )
