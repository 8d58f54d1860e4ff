"""The site bundle: everything a building registrar needs from HQ, and its verification.

HQ seals the bundle (:mod:`trustcore.sealed`, content type ``devtrust/site-bundle/v1``):
signed by the HQ **entitlement signer** (the role that already speaks for HQ to the
places it equips; the content type keeps a bundle from ever passing as an entitlement),
HPKE-encrypted to the site's **transport key**, package sequence monotonic per site. The
payload (deterministic CBOR, see ``docs/formats.md``)::

    payload = {"v": 1, "site_id": tstr,
               "site_ca_cert": bstr, "root_cert": bstr, "station_ca_certs": [bstr],
               "root_crl": bstr, "station_crls": [bstr],
               "revocation_list": bstr,            ; sealed signed-only package
               "manifest": [{"device_id": tstr, "serial": tstr, "station_id": tstr}],
               "admission": [{"station_id": tstr, "product": tstr, "id_prefix": tstr}],
               "payload_keys": [{"key_id": bstr(8), "created": uint,
                                 "enc": bstr(65), "ct": bstr(48)}],
               "current_payload_key": bstr(8)}

The AES payload keys are sealed a second time, each to the site transport key with HPKE
``info`` = CBOR ``["devtrust/payload-key-at-rest/v1", key_id]`` and empty ``aad`` — exactly
the registrar's at-rest format (``registrar/payload_keys.py``) — so the registrar stores
them as received and they never exist in clear outside memory, not even in its files.

:func:`verify_site_bundle` is the whole decision a registrar makes before it writes
anything (pure; the caller supplies the pinned root, its keys and its last sequence).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor, hpke
from trustcore.crl import RevocationSet, verify_crl
from trustcore.errors import (
    CrlError,
    EncodingError,
    InvalidValueError,
    ProfileError,
    ReplayError,
    SealedPackageError,
    TrustCoreError,
    VerificationError,
)
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import KeyAgreement, Signer, key_id, spki_der
from trustcore.payload import KEY_ID_LENGTH, PayloadKey
from trustcore.profiles import (
    OID_EKU_ENTITLEMENT_SIGNER,
    site_id_from_certificate,
    station_id_from_certificate,
)
from trustcore.revocation import RevocationList, RevocationListError, open_revocation_list
from trustcore.sealed import open_package, peek, seal_package
from trustcore.verify import ChainVerifier

__all__ = [
    "CT_SITE_BUNDLE",
    "MAX_SITE_BUNDLE_SIZE",
    "PAYLOAD_KEY_AT_REST_INFO",
    "AdmissionEntry",
    "ManifestEntry",
    "SealedPayloadKey",
    "SiteBundleError",
    "SiteBundlePayload",
    "VerifiedSiteBundle",
    "open_sealed_payload_key",
    "seal_payload_key",
    "seal_site_bundle",
    "verify_site_bundle",
]

CT_SITE_BUNDLE = "devtrust/site-bundle/v1"
FORMAT_VERSION = 1
#: A manifest of a few hundred thousand devices plus CRLs fits comfortably.
MAX_SITE_BUNDLE_SIZE = 64 * 1024 * 1024
#: Must stay equal to the registrar's at-rest format (``registrar/payload_keys.py``).
PAYLOAD_KEY_AT_REST_INFO = "devtrust/payload-key-at-rest/v1"
_SEALED_KEY_CT = 32 + 16  # AES-256 key + GCM tag
_MAX_PRODUCT = 64


class SiteBundleError(TrustCoreError):
    """A site bundle was refused; ``reason`` is a stable code (see :func:`verify_site_bundle`)."""

    reason = "malformed"


# --------------------------------------------------------------------------- the payload


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """A device destined for this site: its id, its factory certificate serial, its station."""

    device_id: DeviceId
    serial: CertSerial
    station_id: StationId

    def to_map(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id.value,
            "serial": self.serial.hex,
            "station_id": self.station_id.value,
        }

    @classmethod
    def from_map(cls, obj: object) -> ManifestEntry:
        m = cbor.map_of(obj, "manifest entry")
        cbor.expect_keys(m, {"device_id", "serial", "station_id"}, what="manifest entry")
        text = cbor.field(m, "serial", str)
        try:
            serial = CertSerial.from_hex(text)
            if serial.hex != text:
                raise InvalidValueError(f"serial {text!r} is not in canonical hex")
            return cls(
                DeviceId(cbor.field(m, "device_id", str)),
                serial,
                StationId(cbor.field(m, "station_id", str)),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad manifest entry: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class AdmissionEntry:
    """Admit any device of ``station_id`` whose id starts with ``id_prefix`` (the device-id
    prefix of ``product`` in that station's entitlements; ``""`` admits the whole station).
    ``product`` is informational: the prefix is what the registrar matches."""

    station_id: StationId
    product: str
    id_prefix: str

    def __post_init__(self) -> None:
        if not isinstance(self.station_id, StationId):
            raise InvalidValueError("station_id must be a StationId")
        if (
            not isinstance(self.product, str)
            or len(self.product) > _MAX_PRODUCT
            or not self.product.isprintable()
        ):
            raise InvalidValueError("product must be up to 64 printable characters")
        if not isinstance(self.id_prefix, str) or not _valid_prefix(self.id_prefix):
            raise InvalidValueError(f"bad device id prefix {self.id_prefix!r}")

    def to_map(self) -> dict[str, Any]:
        return {
            "station_id": self.station_id.value,
            "product": self.product,
            "id_prefix": self.id_prefix,
        }

    @classmethod
    def from_map(cls, obj: object) -> AdmissionEntry:
        m = cbor.map_of(obj, "admission entry")
        cbor.expect_keys(m, {"station_id", "product", "id_prefix"}, what="admission entry")
        try:
            return cls(
                StationId(cbor.field(m, "station_id", str)),
                cbor.field(m, "product", str),
                cbor.field(m, "id_prefix", str),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad admission entry: {exc.message}") from exc


def _valid_prefix(prefix: str) -> bool:
    """A prefix is valid when it is empty or itself a valid DeviceId (so some id can match)."""
    if not prefix:
        return True
    try:
        DeviceId(prefix)
    except InvalidValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SealedPayloadKey:
    """An AES-256 payload key HPKE-sealed to the site transport key (at-rest format)."""

    key_id: bytes
    created: int
    enc: bytes
    ct: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, bytes) or len(self.key_id) != KEY_ID_LENGTH:
            raise InvalidValueError(f"payload key id must be {KEY_ID_LENGTH} bytes")
        if not isinstance(self.enc, bytes) or len(self.enc) != hpke.ENC_LENGTH:
            raise InvalidValueError(f"enc must be {hpke.ENC_LENGTH} bytes")
        if not isinstance(self.ct, bytes) or len(self.ct) != _SEALED_KEY_CT:
            raise InvalidValueError(f"sealed key must be {_SEALED_KEY_CT} bytes")
        if isinstance(self.created, bool) or not isinstance(self.created, int) or self.created < 0:
            raise InvalidValueError("created must be unix seconds")

    def to_map(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "created": self.created, "enc": self.enc, "ct": self.ct}

    @classmethod
    def from_map(cls, obj: object) -> SealedPayloadKey:
        m = cbor.map_of(obj, "payload key")
        cbor.expect_keys(m, {"key_id", "created", "enc", "ct"}, what="payload key")
        try:
            return cls(
                cbor.field(m, "key_id", bytes),
                cbor.field(m, "created", int),
                cbor.field(m, "enc", bytes),
                cbor.field(m, "ct", bytes),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad payload key entry: {exc.message}") from exc


def _at_rest_info(kid: bytes) -> bytes:
    return cbor.encode([PAYLOAD_KEY_AT_REST_INFO, kid])


def seal_payload_key(
    receiver_public: ec.EllipticCurvePublicKey, key: PayloadKey, *, created: int
) -> SealedPayloadKey:
    """Seal one payload key to a transport key (the key id is bound through ``info``)."""
    enc, ct = hpke.seal(receiver_public, key.key, info=_at_rest_info(key.key_id), aad=b"")
    return SealedPayloadKey(key.key_id, created, enc, ct)


def open_sealed_payload_key(receiver: KeyAgreement, sealed: SealedPayloadKey) -> PayloadKey:
    """Open a sealed payload key (``SealedPackageError(decrypt_failed)`` on any failure)."""
    secret = hpke.open_(receiver, sealed.enc, sealed.ct, info=_at_rest_info(sealed.key_id), aad=b"")
    return PayloadKey(sealed.key_id, secret)


def _list_of_bytes(m: dict[Any, Any], name: str) -> tuple[bytes, ...]:
    items = cbor.field(m, name, list)
    if not all(isinstance(i, bytes) for i in items):
        raise EncodingError(f"{name} must be a list of byte strings")
    return tuple(items)


@dataclass(frozen=True)
class SiteBundlePayload:
    """What a site bundle carries (DER certificates and CRLs, sealed keys)."""

    site_id: SiteId
    site_ca_cert_der: bytes
    root_cert_der: bytes
    station_ca_certs_der: tuple[bytes, ...]
    root_crl_der: bytes
    station_crls_der: tuple[bytes, ...]
    revocation_list: bytes
    manifest: tuple[ManifestEntry, ...]
    admission: tuple[AdmissionEntry, ...]
    payload_keys: tuple[SealedPayloadKey, ...]
    current_payload_key: bytes
    #: How many days the site may go without fresh HQ revocation data (the newest list's
    #: ``issued``) before it refuses new registrations; 1..180, HQ's choice per site.
    max_offline_days: int = 30

    def __post_init__(self) -> None:
        days = self.max_offline_days
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 180:
            raise InvalidValueError("max_offline_days must be an integer in 1..180")

    def encode(self) -> bytes:
        doc: dict[str, object] = {
            "v": FORMAT_VERSION,
            "site_id": self.site_id.value,
            "site_ca_cert": self.site_ca_cert_der,
            "root_cert": self.root_cert_der,
            "station_ca_certs": list(self.station_ca_certs_der),
            "root_crl": self.root_crl_der,
            "station_crls": list(self.station_crls_der),
            "revocation_list": self.revocation_list,
            "manifest": [e.to_map() for e in self.manifest],
            "admission": [a.to_map() for a in self.admission],
            "payload_keys": [k.to_map() for k in self.payload_keys],
            "current_payload_key": self.current_payload_key,
        }
        # Written only when not the default, so bundles of sites that keep 30 days encode
        # exactly as before (docs/formats.md test vector).
        if self.max_offline_days != 30:
            doc["max_offline_days"] = self.max_offline_days
        return cbor.encode(doc)

    @classmethod
    def decode(cls, data: bytes) -> SiteBundlePayload:
        m = cbor.map_of(cbor.decode(data, max_size=MAX_SITE_BUNDLE_SIZE), "site bundle")
        cbor.expect_keys(
            m,
            {
                "v",
                "site_id",
                "site_ca_cert",
                "root_cert",
                "station_ca_certs",
                "root_crl",
                "station_crls",
                "revocation_list",
                "manifest",
                "admission",
                "payload_keys",
                "current_payload_key",
            },
            {"max_offline_days"},
            what="site bundle",
        )
        if cbor.field(m, "v", int) != FORMAT_VERSION:
            raise EncodingError(f"unsupported site bundle version {m['v']!r}")
        try:
            site_id = SiteId(cbor.field(m, "site_id", str))
        except InvalidValueError as exc:
            raise EncodingError(f"bad site id: {exc.message}") from exc
        try:
            return cls(
                site_id=site_id,
                site_ca_cert_der=cbor.field(m, "site_ca_cert", bytes),
                root_cert_der=cbor.field(m, "root_cert", bytes),
                station_ca_certs_der=_list_of_bytes(m, "station_ca_certs"),
                root_crl_der=cbor.field(m, "root_crl", bytes),
                station_crls_der=_list_of_bytes(m, "station_crls"),
                revocation_list=cbor.field(m, "revocation_list", bytes),
                manifest=tuple(ManifestEntry.from_map(e) for e in cbor.field(m, "manifest", list)),
                admission=tuple(
                    AdmissionEntry.from_map(a) for a in cbor.field(m, "admission", list)
                ),
                payload_keys=tuple(
                    SealedPayloadKey.from_map(k) for k in cbor.field(m, "payload_keys", list)
                ),
                current_payload_key=cbor.field(m, "current_payload_key", bytes, size=KEY_ID_LENGTH),
                max_offline_days=(
                    cbor.field(m, "max_offline_days", int) if "max_offline_days" in m else 30
                ),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad site bundle: {exc.message}") from exc


def seal_site_bundle(
    payload: SiteBundlePayload,
    *,
    sender: Signer,
    sender_cert: x509.Certificate,
    site_transport_public: ec.EllipticCurvePublicKey,
    sequence: int,
    created: int,
) -> bytes:
    """Sign (entitlement signer) and encrypt (site transport key) a bundle payload."""
    return seal_package(
        content_type=CT_SITE_BUNDLE,
        payload=payload.encode(),
        sender=sender,
        sender_cert=sender_cert,
        receiver_public=site_transport_public,
        sequence=sequence,
        created=created,
    )


# --------------------------------------------------------------------------- verification


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
    """Decide whether this site accepts ``package``. The first failing check decides the
    ``SiteBundleError.reason``:

    1. ``malformed`` / ``oversized``: not a sealed package;
    2. ``wrong_content_type``: not a site bundle; ``not_encrypted``: signed-only;
    3. ``wrong_site``: encrypted to another transport key (another site's bundle);
    4. ``untrusted_sender``: the sender certificate does not chain to the pinned root with
       the entitlement-signer EKU at ``now``;
    5. ``bad_signature`` / ``wrong_sender`` / ``replayed`` (sequence not above
       ``last_sequence``: replay or rollback) / ``decrypt_failed``;
    6. ``malformed``: payload; ``wrong_site``: the payload names another site id;
    7. ``wrong_root``: the bundle's root is not the pinned root;
    8. ``crl_stale`` / ``bad_crl``: the root CRL (must verify and be fresh: fail closed);
    9. ``revoked_sender``: the root CRL revokes the sender's certificate;
    10. ``bad_certificate`` / ``wrong_site_key`` / ``revoked``: the site CA certificate (root
        issued, pathLen 0, this site id, this site's CA key, valid now, not revoked);
    11. ``bad_certificate``: each station CA (root issued, pathLen 0, station id);
    12. ``bad_crl``: a station CRL that does not verify against a station CA in the bundle
        (a stale one is accepted and reported, see :class:`VerifiedSiteBundle`);
    13. ``bad_revocation_list`` / ``revocation_rollback``: the HQ revocation list;
    14. ``bad_payload_key``: a payload key that does not open, duplicate key ids, or a
        current key id that is not among them.
    """
    try:
        header = peek(package, max_size=MAX_SITE_BUNDLE_SIZE)
    except SealedPackageError as exc:
        raise _fail(exc.reason, f"not a site bundle: {exc.message}") from exc
    if header.content_type != CT_SITE_BUNDLE:
        raise _fail("wrong_content_type", f"content type is {header.content_type!r}")
    if not header.encrypted:
        raise _fail("not_encrypted", "a site bundle must be encrypted to the site")
    if header.receiver_key_id != key_id(transport.public_key()):
        raise _fail(
            "wrong_site", "this bundle is encrypted to another site's transport key, not ours"
        )
    try:
        sender_cert = header.sender_certificate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ChainVerifier(
                [root], required_eku=OID_EKU_ENTITLEMENT_SIGNER, require_crl=False
            ).verify(sender_cert, now=now)
    except (SealedPackageError, VerificationError) as exc:
        raise _fail(
            "untrusted_sender", f"sender is not HQ's entitlement signer: {exc.message}"
        ) from exc
    sender_public = sender_cert.public_key()
    assert isinstance(sender_public, ec.EllipticCurvePublicKey)  # checked by the verifier
    try:
        opened = open_package(
            package,
            receiver=transport,
            expected_content_type=CT_SITE_BUNDLE,
            trusted_sender_public=sender_public,
            last_sequence=last_sequence,
            max_size=MAX_SITE_BUNDLE_SIZE,
        )
    except ReplayError as exc:
        raise _fail(
            "replayed",
            f"bundle sequence {header.sequence} is not newer than the one imported last "
            f"({last_sequence}): a replayed or older bundle",
        ) from exc
    except SealedPackageError as exc:
        raise _fail(exc.reason, f"bundle refused: {exc.message}") from exc
    try:
        payload = SiteBundlePayload.decode(opened.payload)
    except EncodingError as exc:
        raise _fail(exc.reason, f"bundle payload: {exc.message}") from exc
    if payload.site_id != site_id:
        raise _fail("wrong_site", f"bundle is for site {payload.site_id}, this is {site_id}")
    if payload.root_cert_der != root.public_bytes(serialization.Encoding.DER):
        raise _fail("wrong_root", "the bundle's root certificate is not the pinned root")

    try:
        root_crl = x509.load_der_x509_crl(payload.root_crl_der)
        root_revocations = verify_crl(root_crl, root, now=now)
    except ValueError as exc:
        raise _fail("bad_crl", "root CRL does not parse") from exc
    except CrlError as exc:
        reason = "crl_stale" if exc.reason in ("crl_stale", "crl_not_yet_valid") else "bad_crl"
        raise _fail(reason, f"root CRL: {exc.message}") from exc
    if sender_cert.serial_number in root_revocations:
        raise _fail("revoked_sender", "the root CRL revokes the bundle sender's certificate")

    site_ca = _cert(payload.site_ca_cert_der, "site CA certificate")
    _issued_ca(site_ca, root, "site CA certificate")
    try:
        cert_site = site_id_from_certificate(site_ca)
    except ProfileError as exc:
        raise _fail("bad_certificate", f"site CA certificate: {exc.message}") from exc
    if cert_site != site_id:
        raise _fail("wrong_site", f"site CA certificate is for {cert_site}, this is {site_id}")
    if spki_der(site_ca.public_key()) != spki_der(site_ca_public):
        raise _fail("wrong_site_key", "site CA certificate does not certify this site's CA key")
    if not site_ca.not_valid_before_utc <= now <= site_ca.not_valid_after_utc:
        raise _fail("bad_certificate", "site CA certificate is not valid now")
    if site_ca.serial_number in root_revocations:
        raise _fail("revoked", "the root CRL revokes this site's CA certificate")

    station_cas: list[x509.Certificate] = []
    for i, der in enumerate(payload.station_ca_certs_der):
        cert = _cert(der, f"station CA certificate #{i}")
        _issued_ca(cert, root, f"station CA certificate #{i}")
        try:
            station_id_from_certificate(cert)
        except ProfileError as exc:
            raise _fail("bad_certificate", f"station CA certificate #{i}: {exc.message}") from exc
        station_cas.append(cert)

    station_crls: list[x509.CertificateRevocationList] = []
    stale: list[str] = []
    covered: set[str] = set()
    for i, der in enumerate(payload.station_crls_der):
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            raise _fail("bad_crl", f"station CRL #{i} does not parse") from exc
        issuers = [c for c in station_cas if c.subject == crl.issuer]
        revs: RevocationSet | None = None
        for issuer in issuers:
            try:
                revs = verify_crl(crl, issuer, now=None)
                break
            except CrlError:
                continue
        if revs is None:
            raise _fail("bad_crl", f"station CRL #{i} does not verify against any station CA")
        name = station_id_from_certificate(issuers[0]).value
        covered.add(name)
        try:
            revs.check_fresh(now)
        except CrlError:
            stale.append(name)
        station_crls.append(crl)
    without = sorted({station_id_from_certificate(c).value for c in station_cas} - covered)

    try:
        revocations = open_revocation_list(
            payload.revocation_list,
            root=root,
            now=now,
            root_crl=root_crl,
            not_older_than=last_revocation_sequence,
        )
    except RevocationListError as exc:
        reason = "revocation_rollback" if exc.reason == "rollback" else "bad_revocation_list"
        raise _fail(reason, f"HQ revocation list: {exc.message}") from exc

    if not payload.payload_keys:
        raise _fail("bad_payload_key", "the bundle carries no payload key")
    kids = [k.key_id for k in payload.payload_keys]
    if len(set(kids)) != len(kids):
        raise _fail("bad_payload_key", "payload key ids repeat")
    if payload.current_payload_key not in kids:
        raise _fail("bad_payload_key", "the current payload key id is not in the bundle")
    for sealed in payload.payload_keys:
        try:
            open_sealed_payload_key(transport, sealed)
        except (SealedPackageError, TrustCoreError) as exc:
            raise _fail(
                "bad_payload_key", f"payload key {sealed.key_id.hex()} does not open: {exc.message}"
            ) from exc

    return VerifiedSiteBundle(
        sequence=header.sequence,
        created=header.created,
        payload=payload,
        sender_cert=sender_cert,
        site_ca_cert=site_ca,
        root_crl=root_crl,
        root_revocations=root_revocations,
        station_cas=tuple(station_cas),
        station_crls=tuple(station_crls),
        stale_station_crls=tuple(sorted(set(stale))),
        stations_without_crl=tuple(without),
        revocations=revocations,
    )
