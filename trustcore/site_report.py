"""Site reports: what a building's registrar saw, signed for HQ (flow 5 of the design).

A site report lists every factory certificate (IDevID) the registrar has seen with a valid
chain, with the certificate itself as evidence, and every registration it made. HQ
cross-checks it against the audit logs (:mod:`hq.counterfeit`): a chain-valid certificate
that no audit log records was made outside the station software (a stolen station key).

Why signed-only and not encrypted to HQ: the content is certificates (public by nature) and
registration times; the site holds no HQ encryption key (its bundle carries none), and
adding one would change the bundle format for little gain. Integrity and origin are what
matter: the package is signed by the **site CA** key, whose certificate HQ issued at
enrolment, so HQ knows which site speaks. The package sequence is the report's monotonic
per-site sequence number (HQ refuses a report not newer than the last one it accepted:
a replayed old report cannot hide newer sightings), and the payload repeats it::

    payload = {"v": 1, "site_id": tstr, "seq": uint, "created": uint,
               "seen": [{"station_id": tstr / null, "serial": tstr (lowercase hex),
                         "device_id": tstr, "first_seen": uint, "registered": bool,
                         "cert": bstr (factory certificate DER)}, ...],
               "registrations": [{"device_id": tstr, "station_id": tstr / null,
                                  "idevid_serial": tstr, "ldevid_serial": tstr,
                                  "registered_at": uint, "count": uint,
                                  "status": tstr}, ...]}

Content type ``devtrust/site-report/v1``; deterministic CBOR (:mod:`trustcore.cbor`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustcore import cbor
from trustcore.errors import (
    X509_PARSE_ERRORS,
    EncodingError,
    InvalidValueError,
    ReplayError,
    SealedPackageError,
    TrustCoreError,
)
from trustcore.identity import CertSerial, DeviceId, SiteId, StationId
from trustcore.keys import Signer, key_id
from trustcore.sealed import open_package, peek, seal_package
from trustcore.x509parse import parsed_certificate

__all__ = [
    "CT_SITE_REPORT",
    "MAX_SITE_REPORT_SIZE",
    "SeenCertificate",
    "SiteRegistration",
    "SiteReport",
    "SiteReportError",
    "open_site_report",
    "peek_site_report",
    "seal_site_report",
]

CT_SITE_REPORT = "devtrust/site-report/v1"
FORMAT_VERSION = 1
#: Room for about 100,000 sightings with their certificates.
MAX_SITE_REPORT_SIZE = 128 * 1024 * 1024
_MAX_CERT = 16 * 1024
_MAX_STATUS = 32


class SiteReportError(TrustCoreError):
    """A site report was refused. ``reason``: ``malformed``, ``oversized``, ``wrong_sender``,
    ``bad_signature``, ``wrong_content_type``, ``not_signed_only``, ``replayed``,
    ``sequence_mismatch``, ``site_mismatch``."""

    reason = "malformed"


def _optional_station(m: dict[Any, Any]) -> StationId | None:
    """The ``station_id`` field: a station id, or null for a device of no known station."""
    station = m["station_id"]
    if station is not None and not isinstance(station, str):
        raise EncodingError("field 'station_id': expected str or null")
    return None if station is None else StationId(station)


def _serial(text: str) -> CertSerial:
    serial = CertSerial.from_hex(text)
    if serial.hex != text:  # one spelling per serial: lowercase, no leading zeros
        raise InvalidValueError(f"serial {text!r} is not in canonical hex")
    return serial


@dataclass(frozen=True, slots=True)
class SeenCertificate:
    """A factory certificate the site saw (chain-valid when seen), with the DER as evidence."""

    station_id: StationId | None
    serial: CertSerial
    device_id: DeviceId
    first_seen: int
    registered: bool
    certificate_der: bytes

    def __post_init__(self) -> None:
        if self.station_id is not None and not isinstance(self.station_id, StationId):
            raise InvalidValueError("station_id must be a StationId or None")
        if not isinstance(self.serial, CertSerial) or not isinstance(self.device_id, DeviceId):
            raise InvalidValueError("serial and device_id must be CertSerial and DeviceId")
        cbor.uint63(self.first_seen, "first_seen")
        if not isinstance(self.registered, bool):
            raise InvalidValueError("registered must be a bool")
        if not isinstance(self.certificate_der, bytes) or not 0 < len(self.certificate_der) <= (
            _MAX_CERT
        ):
            raise InvalidValueError(f"certificate_der must be 1..{_MAX_CERT} bytes")

    def certificate(self) -> x509.Certificate:
        """The evidence, parsed (:class:`EncodingError` when it does not parse)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return parsed_certificate(x509.load_der_x509_certificate(self.certificate_der))
        except X509_PARSE_ERRORS as exc:
            raise EncodingError(f"seen certificate does not parse: {exc}") from exc

    def to_map(self) -> dict[str, Any]:
        return {
            "station_id": None if self.station_id is None else self.station_id.value,
            "serial": self.serial.hex,
            "device_id": self.device_id.value,
            "first_seen": self.first_seen,
            "registered": self.registered,
            "cert": self.certificate_der,
        }

    @classmethod
    def from_map(cls, obj: object) -> SeenCertificate:
        m = cbor.map_of(obj, "seen certificate")
        cbor.expect_keys(
            m,
            {"station_id", "serial", "device_id", "first_seen", "registered", "cert"},
            what="seen certificate",
        )
        try:
            station = _optional_station(m)
            return cls(
                station,
                _serial(cbor.field(m, "serial", str)),
                DeviceId(cbor.field(m, "device_id", str)),
                cbor.field(m, "first_seen", int),
                cbor.field(m, "registered", bool),
                cbor.field(m, "cert", bytes),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad seen certificate: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class SiteRegistration:
    """One registered device as the site's database holds it."""

    device_id: DeviceId
    station_id: StationId | None
    idevid_serial: CertSerial
    ldevid_serial: CertSerial
    registered_at: int
    count: int
    status: str

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, DeviceId):
            raise InvalidValueError("device_id must be a DeviceId")
        if self.station_id is not None and not isinstance(self.station_id, StationId):
            raise InvalidValueError("station_id must be a StationId or None")
        if not isinstance(self.idevid_serial, CertSerial) or not isinstance(
            self.ldevid_serial, CertSerial
        ):
            raise InvalidValueError("serials must be CertSerial values")
        cbor.uint63(self.registered_at, "registered_at")
        cbor.uint63(self.count, "count")
        if not isinstance(self.status, str) or not 0 < len(self.status) <= _MAX_STATUS:
            raise InvalidValueError(f"status must be 1..{_MAX_STATUS} characters")

    def to_map(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id.value,
            "station_id": None if self.station_id is None else self.station_id.value,
            "idevid_serial": self.idevid_serial.hex,
            "ldevid_serial": self.ldevid_serial.hex,
            "registered_at": self.registered_at,
            "count": self.count,
            "status": self.status,
        }

    @classmethod
    def from_map(cls, obj: object) -> SiteRegistration:
        m = cbor.map_of(obj, "registration")
        cbor.expect_keys(
            m,
            {
                "device_id",
                "station_id",
                "idevid_serial",
                "ldevid_serial",
                "registered_at",
                "count",
                "status",
            },
            what="registration",
        )
        try:
            station = _optional_station(m)
            return cls(
                DeviceId(cbor.field(m, "device_id", str)),
                station,
                _serial(cbor.field(m, "idevid_serial", str)),
                _serial(cbor.field(m, "ldevid_serial", str)),
                cbor.field(m, "registered_at", int),
                cbor.field(m, "count", int),
                cbor.field(m, "status", str),
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad registration: {exc.message}") from exc


@dataclass(frozen=True, slots=True)
class SiteReport:
    """A complete report (not a delta): everything the site has seen so far."""

    site_id: SiteId
    sequence: int
    created: int
    seen: tuple[SeenCertificate, ...] = ()
    registrations: tuple[SiteRegistration, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, SiteId):
            raise InvalidValueError("site_id must be a SiteId")
        cbor.uint63(self.sequence, "sequence")
        cbor.uint63(self.created, "created")
        object.__setattr__(self, "seen", tuple(self.seen))
        object.__setattr__(self, "registrations", tuple(self.registrations))
        keys: set[tuple[str | None, int]] = set()
        for s in self.seen:
            if not isinstance(s, SeenCertificate):
                raise InvalidValueError("seen must hold SeenCertificate values")
            k = (None if s.station_id is None else s.station_id.value, s.serial.value)
            if k in keys:
                raise InvalidValueError(f"certificate {s.serial} of {s.station_id} listed twice")
            keys.add(k)
        ids: set[DeviceId] = set()
        for r in self.registrations:
            if not isinstance(r, SiteRegistration):
                raise InvalidValueError("registrations must hold SiteRegistration values")
            if r.device_id in ids:
                raise InvalidValueError(f"registration of {r.device_id} listed twice")
            ids.add(r.device_id)

    def encode(self) -> bytes:
        return cbor.encode(
            {
                "v": FORMAT_VERSION,
                "site_id": self.site_id.value,
                "seq": self.sequence,
                "created": self.created,
                "seen": [s.to_map() for s in self.seen],
                "registrations": [r.to_map() for r in self.registrations],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> SiteReport:
        m = cbor.map_of(cbor.decode(data, max_size=MAX_SITE_REPORT_SIZE), "site report")
        cbor.expect_keys(
            m, {"v", "site_id", "seq", "created", "seen", "registrations"}, what="site report"
        )
        if cbor.field(m, "v", int) != FORMAT_VERSION:
            raise EncodingError(f"unsupported site report version {m['v']!r}")
        seen = tuple(SeenCertificate.from_map(s) for s in cbor.field(m, "seen", list))
        regs = tuple(SiteRegistration.from_map(r) for r in cbor.field(m, "registrations", list))
        try:
            return cls(
                SiteId(cbor.field(m, "site_id", str)),
                cbor.field(m, "seq", int),
                cbor.field(m, "created", int),
                seen,
                regs,
            )
        except InvalidValueError as exc:
            raise EncodingError(f"bad site report: {exc.message}") from exc


def seal_site_report(
    report: SiteReport, *, site_ca_key: Signer, site_ca_cert: x509.Certificate
) -> bytes:
    """Sign ``report`` (signed-only package) with the site CA key."""
    return seal_package(
        content_type=CT_SITE_REPORT,
        payload=report.encode(),
        sender=site_ca_key,
        sender_cert=site_ca_cert,
        receiver_public=None,
        sequence=report.sequence,
        created=report.created,
    )


def peek_site_report(package: bytes) -> x509.Certificate:
    """The (UNVERIFIED) sender certificate of a report: HQ uses it only to find which
    enrolled site claims to have sent it, then calls :func:`open_site_report`."""
    try:
        header = peek(package, max_size=MAX_SITE_REPORT_SIZE)
        if header.content_type != CT_SITE_REPORT:
            raise SiteReportError(
                f"not a site report ({header.content_type!r})", reason="wrong_content_type"
            )
        if header.encrypted:
            raise SiteReportError("a site report is signed-only", reason="not_signed_only")
        return header.sender_certificate()
    except SealedPackageError as exc:
        raise SiteReportError(f"site report: {exc.message}", reason=exc.reason) from exc


def open_site_report(
    package: bytes,
    *,
    site_id: SiteId,
    site_ca_public: ec.EllipticCurvePublicKey,
    last_sequence: int | None,
) -> SiteReport:
    """Verify a report against the site CA key HQ enrolled for ``site_id``.

    Refuses: a package signed by any other key (``wrong_sender``), a bad signature, a
    report not newer than ``last_sequence`` (``replayed``: an old report could hide newer
    sightings), a payload whose sequence differs from the signed header
    (``sequence_mismatch``) or that names another site (``site_mismatch``).
    """
    if not isinstance(site_id, SiteId):
        raise InvalidValueError("site_id must be a SiteId")
    peek_site_report(package)  # content type and signed-only, before any crypto
    try:
        opened = open_package(
            package,
            receiver=None,
            expected_content_type=CT_SITE_REPORT,
            trusted_sender_public=site_ca_public,
            last_sequence=last_sequence,
            max_size=MAX_SITE_REPORT_SIZE,
        )
        report = SiteReport.decode(opened.payload)
    except ReplayError as exc:
        raise SiteReportError(f"site report: {exc.message}", reason="replayed") from exc
    except SealedPackageError as exc:
        raise SiteReportError(f"site report: {exc.message}", reason=exc.reason) from exc
    except EncodingError as exc:
        raise SiteReportError(f"site report payload: {exc.message}", reason="malformed") from exc
    if report.sequence != opened.header.sequence:
        raise SiteReportError(
            f"payload sequence {report.sequence} != package sequence {opened.header.sequence}",
            reason="sequence_mismatch",
        )
    if report.site_id != site_id:
        raise SiteReportError(
            f"report names site {report.site_id}, signed by site {site_id}",
            reason="site_mismatch",
        )
    if key_id(site_ca_public) != opened.header.sender_key_id:  # belt and braces
        raise SiteReportError("report not signed by the site CA", reason="wrong_sender")
    return report
