"""The site bundle's format: the payload HQ sends a building registrar, and its sealing.

This module owns the bytes; :mod:`trustcore.site_bundle` owns the decision a registrar
makes about them (:func:`trustcore.site_bundle.verify_site_bundle`) and re-exports every
name here.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor, hpke
from trustcore.errors import EncodingError, InvalidValueError
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import KeyAgreement, Signer
from trustcore.payload import KEY_ID_LENGTH, PayloadKey
from trustcore.sealed import seal_package

__all__ = [
    "CT_SITE_BUNDLE",
    "FORMAT_VERSION",
    "MAX_SITE_BUNDLE_SIZE",
    "PAYLOAD_KEY_AT_REST_INFO",
    "AdmissionEntry",
    "ManifestEntry",
    "SealedPayloadKey",
    "SiteBundlePayload",
    "open_sealed_payload_key",
    "seal_payload_key",
    "seal_site_bundle",
]

CT_SITE_BUNDLE = "devtrust/site-bundle/v1"
FORMAT_VERSION = 1
#: A manifest of a few hundred thousand devices plus CRLs fits comfortably.
MAX_SITE_BUNDLE_SIZE = 64 * 1024 * 1024
#: Must stay equal to the registrar's at-rest format (``registrar/payload_keys.py``).
PAYLOAD_KEY_AT_REST_INFO = "devtrust/payload-key-at-rest/v1"
_SEALED_KEY_CT = 32 + 16  # AES-256 key + GCM tag
_MAX_PRODUCT = 64


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
